"""Issue 39's benchmark: Qwen2.5-Coder-1.5B-Instruct teaches Qwen2.5-Coder-0.5B-Instruct on code prompts built from
the standard library (`code_prompts.py`, never HumanEval); HumanEval's 164 problems score the result.

Every step is its own resumable command (it is skipped when its result exists; HumanEval answers are kept as they
come), logs to ``docs/results/issue39/<step>.log`` and writes ``<step>.json``:

    python benchmarks/quality/bench_code_pair.py prompts            # 200 prompts (40 held out) + HumanEval overlap
    python benchmarks/quality/bench_code_pair.py generate           # the teacher's greedy answers, top-32 cache
    python benchmarks/quality/bench_code_pair.py eval teacher       # HumanEval of the 1.5B (the ceiling)
    python benchmarks/quality/bench_code_pair.py eval untouched     # the 0.5B before distillation
    python benchmarks/quality/bench_code_pair.py arm a|b|c|d        # train an arm, then evaluate it
    python benchmarks/quality/bench_code_pair.py speed NAME         # assisted-generation speed-up of the best arm
    python benchmarks/quality/bench_code_pair.py table              # the table of docs/results.md

Arms (equal optimizer steps and prompts; LoRA r 16 on every linear layer of the 0.5B, merged for evaluation, since a
full fine-tuning step of the 0.5B beside a live 1.5B teacher does not fit 24 GB in float32):
a. SFT on the teacher's answers (sequence-level KD); b. off-policy KD on them from the generation-pass top-32 cache
(no teacher in memory); c. on-policy, lmbda 1, JSD beta 0.5; d. mixed, lmbda 0.5, JSD beta 0.5.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from common import ROOT, machine

RESULTS = os.path.join(ROOT, "docs", "results", "issue39")
WORK = os.environ.get("HF_DISTILL_BENCH_DIR", "/tmp/hf_distill_code_pair")
HF = [os.path.join(os.path.dirname(sys.executable), "hf-distill")]
TEACHER, STUDENT = "asset:qwen-coder-1.5b", "asset:qwen-coder-0.5b"

ARMS = {
    "a": ["--logits_weight", "0", "--task_weight", "1"],
    "b": ["--teacher_cache", "{gen}", "--logits_weight", "1", "--task_weight", "0", "--temperature", "1"],
    "c": ["--lmbda", "1", "--logits_loss", "jsd", "--jsd_beta", "0.5", "--logits_weight", "1", "--task_weight", "0",
          "--temperature", "1", "--max_new_tokens", "{tokens}"],
    "d": ["--lmbda", "0.5", "--logits_loss", "jsd", "--jsd_beta", "0.5", "--logits_weight", "1", "--task_weight", "0",
          "--temperature", "1", "--max_new_tokens", "{tokens}"],
}


def run(step: str, command: list[str]) -> float:
    """Run `command`, its output appended to ``<step>.log``; returns the wall seconds (raises on failure)."""
    os.makedirs(RESULTS, exist_ok=True)
    start = time.time()
    with open(os.path.join(RESULTS, f"{step}.log"), "a") as log:
        log.write(f"\n$ {' '.join(command)}\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {json.dumps(machine('cpu'))}\n")
        log.flush()
        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return time.time() - start


def done(step: str) -> bool:
    return os.path.exists(os.path.join(RESULTS, f"{step}.json"))


def record(step: str, payload: dict) -> None:
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{step}.json"), "w") as f:
        json.dump({"machine": machine("cpu"), **payload}, f, indent=1)


def prompts(options) -> None:
    from code_prompts import build

    from hf_distill.evaluation.code_eval import humaneval_messages

    built = build(options.prompts, options.held_out)
    os.makedirs(WORK, exist_ok=True)
    for split in ("train", "held_out"):
        with open(os.path.join(WORK, f"{split}.jsonl"), "w") as f:
            for row in built["rows"]:
                if row["split"] == split:
                    f.write(json.dumps({"messages": humaneval_messages({"prompt": row["prompt"]}),
                                        "source": row["source"]}) + "\n")
    record("prompts", built)
    print(f"{len(built['rows'])} prompts; largest {built['ngram']}-gram overlap with HumanEval: "
          f"{built['largest_overlap']}")


def generate(options) -> None:
    seconds = {}
    for split in ("train", "held_out"):
        if os.path.exists(os.path.join(WORK, f"gen-{split}", "manifest.json")):  # (done by an earlier piece)
            continue
        seconds[split] = run("generate", [*HF, "generate", "--teacher", TEACHER, "--dataset",
                                          os.path.join(WORK, f"{split}.jsonl"), "--output_dir",
                                          os.path.join(WORK, f"gen-{split}"), "--max_new_tokens", str(options.tokens),
                                          "--temperature", "0", "--cache_top_k", "32", "--batch_size", "32"])
    record("generate", {"seconds": seconds, "max_new_tokens": options.tokens})


def evaluate(name: str, student: str, options, humaneval: bool = True, assisted: int = 0) -> dict:
    """`hf-distill evaluate` of `student` against the teacher on the held-out split (and HumanEval): every model's
    answers are kept in WORK/humaneval-answers, so the teacher's are written once; HumanEval scores the evaluated model
    only (the teacher's, 2 hours of the 1.5B on 2 cores, is the step ``eval teacher``). The paired HumanEval comparison
    with the untouched student is made by `table` from the answer files (the same McNemar test as ``--baseline``,
    without scoring the untouched student again); the wall-clock speed-up only with `assisted` prompts (`speed`)."""
    out = os.path.join(WORK, f"eval-{name}")
    command = [*HF, "evaluate", "--student", student, "--output_dir", out, "--batch_size", "32",
               "--max_new_tokens", str(options.tokens), "--num_prompts", "40", "--show", "5",
               "--draft_lengths", "2,4,8", "--assisted_prompts", str(assisted),
               "--update_card", "false", "--answers_dir", os.path.join(WORK, "humaneval-answers")]
    if humaneval:
        command += ["--humaneval", "--allow_code_execution", "--humaneval_max_new_tokens", str(options.humaneval_tokens),
                    "--humaneval_models", "student"]  # (the 1.5B's HumanEval is its own step: `eval teacher`)
    if name != "teacher":
        command += ["--teacher", TEACHER, "--dataset", os.path.join(WORK, "gen-held_out"), "--eval_split", "train",
                    "--max_length", "512"]  # (prompt + answer: up to 315 + 192 tokens; the default 128 cuts most)
    if options.humaneval_limit:
        command += ["--humaneval_limit", str(options.humaneval_limit)]
    seconds = run(f"eval-{name}", command)
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    # what a person reads: every HumanEval answer and the report beside the numbers
    shutil.copy(os.path.join(out, "report.md"), os.path.join(RESULTS, f"eval-{name}.report.md"))
    answers = os.path.join(out, "humaneval-student.jsonl")
    if os.path.exists(answers):
        shutil.copy(answers, os.path.join(RESULTS, f"humaneval-{name}.jsonl"))
    if name == "untouched" and os.path.exists(os.path.join(out, "humaneval-teacher.jsonl")):
        shutil.copy(os.path.join(out, "humaneval-teacher.jsonl"), os.path.join(RESULTS, "humaneval-teacher.jsonl"))
    record(f"eval-{name}", {"seconds": seconds, "results": results})
    return results


def arm(name: str, options) -> None:
    out = os.path.join(WORK, f"arm-{name}")
    if not os.path.exists(os.path.join(out, "merged", "model.safetensors")):
        flags = [a.format(gen=os.path.join(WORK, "gen-train"), tokens=options.tokens) for a in ARMS[name]]
        data = os.path.join(WORK, "gen-train")  # (every arm: the same prompts; on-policy rows ignore the answers)
        if any(entry.startswith("checkpoint-") for entry in (os.listdir(out) if os.path.isdir(out) else [])):
            flags += ["--resume_from_checkpoint", "true"]  # (an earlier piece stopped after a checkpoint)
        seconds = run(f"arm-{name}", [
            *HF, "distill", "--task", "causal-lm", "--teacher", TEACHER, "--student", STUDENT, "--dataset", data,
            "--use_peft", "--lora_r", "16", "--lora_alpha", "32", "--merge_adapters", "--output_dir", out,
            "--max_steps", str(options.steps), "--per_device_train_batch_size", "2", "--gradient_accumulation_steps",
            "2", "--learning_rate", str(options.learning_rate), "--lr_scheduler_type", "cosine", "--warmup_steps",
            "4", "--eval_fraction", "0.05", "--eval_strategy", "no", "--logging_steps", "2", "--save_strategy",
            "steps", "--save_steps", "10", "--save_total_limit", "1", "--report_to", "none", "--seed", "0",
            "--max_length", "512", "--gradient_checkpointing", "true", "--sample_max_new_tokens", str(options.tokens),
            *flags])
        pieces = (_load(f"arm-{name}.train") or {}).get("pieces", [])  # (set when a run was stopped and resumed)
        with open(os.path.join(RESULTS, f"arm-{name}.train.json"), "w") as f:
            json.dump({"seconds": seconds + sum(pieces), "pieces": [*pieces, seconds]}, f)
    evaluate(f"arm-{name}", os.path.join(out, "merged"), options)


def speed(name: str, options) -> None:
    """The wall-clock speed-up of transformers' assisted generation with arm `name`'s student drafting for the
    teacher (the untouched student's comes with ``eval untouched``); run it for the best arm."""
    evaluate(f"speed-arm-{name}", os.path.join(WORK, f"arm-{name}", "merged"), options, humaneval=False,
             assisted=options.assisted_prompts)


def table(options) -> None:
    """The results so far as docs/results.md's table (and quality.json's ``code_pair`` section): per model HumanEval
    pass@1, problems gained / lost against the untouched 0.5B with the exact McNemar p-value (from the answer files),
    held-out KL and agreement, diversity against the teacher's, draft tokens per teacher forward, wall time."""
    from common import merge_quality

    rows, entries = [], {}
    untouched = _load("eval-untouched")
    if untouched:
        scores = untouched["results"]["scores"]
        for name, label in (("teacher", "1.5B teacher (ceiling)"), ("student", "0.5B untouched")):
            rows.append((label, scores.get(name, {}), None, None))
    teacher = untouched["results"]["scores"].get("teacher", {}) if untouched else {}
    ceiling = _load("eval-teacher")
    if ceiling and rows:  # (its HumanEval: the step ``eval teacher``)
        rows[0][1].update({k: v for k, v in ceiling["results"]["scores"]["student"].items() if k.startswith("humaneval")})
    for arm_name in ARMS:
        result = _load(f"eval-arm-{arm_name}")
        answered = _humaneval(f"arm-{arm_name}")
        if result or answered is not None:  # (HumanEval answers without the held-out part: a stopped evaluation)
            scores = result["results"]["scores"]["student"] if result else {
                "humaneval_pass@1": sum(row["passed"] for row in answered.values()) / len(answered)}
            paired = _paired("untouched", f"arm-{arm_name}")
            seconds = (_load(f"arm-{arm_name}.train") or {}).get("seconds")
            rows.append((f"{arm_name}. {ARM_NAMES[arm_name]}", scores, paired, seconds))
            entries[arm_name] = {"scores": scores, "vs_untouched": paired, "train_seconds": seconds,
                                 "vs_sft": _paired("arm-a", f"arm-{arm_name}") if arm_name != "a" else None,
                                 "diversity_within_25pct_of_teacher": _diverse(scores, teacher),
                                 "held_out": "measured" if result else "not measured yet"}
    print("| model | HumanEval pass@1 | vs untouched (+ / -, McNemar p) | held-out KL | agreement | distinct-4 | "
          "repeated 4-grams | tokens per teacher forward (k=4) | distill command wall time |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for label, scores, paired, seconds in rows:
        vs = f"+{paired['gained']} / -{paired['lost']}, p = {paired['mcnemar_p']:.3g}" if paired else ""
        wall = f"{seconds / 60:.0f} min" if seconds else ""
        print(f"| {label} | {_pct(scores.get('humaneval_pass@1'))} | {vs} | {_num(scores.get('kl_to_teacher'))} | "
              f"{_num(scores.get('teacher_agreement'))} | {_num(scores.get('answers_distinct_4'))} | "
              f"{_num(scores.get('answers_repeated_4gram_share'))} | {_num(scores.get('draft_tokens_per_forward_k4'))} "
              f"| {wall} |")
    for arm_name, entry in entries.items():
        if entry["vs_sft"]:
            p = entry["vs_sft"]
            print(f"- arm {arm_name} against SFT (arm a): +{p['gained']} / -{p['lost']}, p = {p['mcnemar_p']:.3g}")
    speedups = {"untouched": (untouched or {}).get("results", {}).get("scores", {}).get("student", {})}
    speedups.update({name: (_load(f"eval-speed-arm-{name}") or {}).get("results", {}).get("scores", {})
                     .get("student", {}) for name in ARMS})
    for name, scores in speedups.items():
        if scores.get("assisted_speedup_k2") is not None:
            print(f"- wall-clock speed-up of the teacher with the {name} student drafting (k=2): "
                  f"{scores['assisted_speedup_k2']:.2f}x, identical outputs {scores.get('assisted_identical')}")
    if entries:
        merge_quality("code_pair", "arms", entries)
        if untouched:
            merge_quality("code_pair", "untouched", {"scores": untouched["results"]["scores"]["student"],
                                                     "teacher_held_out": teacher})
        best = max(entries, key=lambda a: entries[a]["scores"].get("humaneval_pass@1") or 0)
        quote_answers(best, options.quote)


def _humaneval(name: str) -> dict[str, dict] | None:
    """The kept HumanEval answers of `name` (docs/results/issue39/humaneval-<name>.jsonl) by task id, or None."""
    path = os.path.join(RESULTS, f"humaneval-{name}.jsonl")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return {row["task_id"]: row for row in map(json.loads, f)}


def _solved(name: str) -> set[str] | None:
    rows = _humaneval(name)
    return None if rows is None else {task for task, row in rows.items() if row["passed"]}


def _paired(before: str, after: str) -> dict | None:
    """Problems `after` solved and `before` did not (gained), the reverse (lost), and the exact McNemar p-value."""
    from hf_distill.evaluation.heldout import mcnemar_exact

    old, new = _solved(before), _solved(after)
    if old is None or new is None:
        return None
    gained, lost = len(new - old), len(old - new)
    return {"gained": gained, "lost": lost, "net": gained - lost, "mcnemar_p": mcnemar_exact(gained, lost)}


def _diverse(scores: dict, teacher: dict) -> bool | None:
    """The collapse target, as the library's relative collapse flags read it: distinct-4 at least 75% of the
    teacher's, and the repeated-4-gram share at most 25 points above the teacher's."""
    if "answers_distinct_4" not in teacher or "answers_distinct_4" not in scores:
        return None
    return bool(scores["answers_distinct_4"] >= 0.75 * teacher["answers_distinct_4"]
                and scores["answers_repeated_4gram_share"] <= teacher["answers_repeated_4gram_share"] + 0.25)


def quote_answers(arm_name: str, count: int) -> None:
    """`count` HumanEval problems with the untouched student's and arm `arm_name`'s answers side by side: problems
    the arm gained first, then those it lost, then ones both solved (markdown, for docs/results.md)."""
    before, after = _humaneval("untouched"), _humaneval(f"arm-{arm_name}")
    if before is None or after is None:
        return
    order = sorted(before, key=lambda t: (not (after[t]["passed"] and not before[t]["passed"]),
                                         not (before[t]["passed"] and not after[t]["passed"]),
                                         not (before[t]["passed"] and after[t]["passed"]), int(t.split("/")[1])))
    print(f"\n### HumanEval answers: the untouched 0.5B and arm {arm_name} ({ARM_NAMES[arm_name]})\n")
    for task in order[:count]:
        print(f"**{task}** — untouched: {'pass' if before[task]['passed'] else 'fail'}, arm {arm_name}: "
              f"{'pass' if after[task]['passed'] else 'fail'}\n")
        for label, row in (("untouched", before[task]), (f"arm {arm_name}", after[task])):
            print(f"{label}:\n```python\n{_code(row['answers'][0])}\n```\n")


def _code(answer: str, lines: int = 25) -> str:
    from hf_distill.evaluation.code_eval import extract_code

    code = extract_code(answer).strip("\n").splitlines()
    return "\n".join(code[:lines] + ([f"# ... ({len(code) - lines} more lines)"] if len(code) > lines else []))


ARM_NAMES = {"a": "SFT on the teacher's answers", "b": "off-policy KD, top-32 cache",
             "c": "on-policy, lmbda 1, JSD 0.5", "d": "mixed, lmbda 0.5, JSD 0.5"}


def _load(step: str) -> dict | None:
    path = os.path.join(RESULTS, f"{step}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _num(value) -> str:
    return "-" if not isinstance(value, (int, float)) else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["prompts", "generate", "eval", "arm", "speed", "table"])
    parser.add_argument("name", nargs="?")
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--held_out", type=int, default=40)
    parser.add_argument("--tokens", type=int, default=192, help="most new tokens of a training answer")
    parser.add_argument("--humaneval_tokens", type=int, default=384)
    parser.add_argument("--humaneval_limit", type=int, default=None, help="(smoke runs only)")
    parser.add_argument("--assisted_prompts", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--quote", type=int, default=5, help="HumanEval answers quoted by `table`")
    options = parser.parse_args()
    step = options.step if options.step not in ("eval", "arm", "speed") else f"{options.step}-{options.name}"
    finished = {"arm": f"eval-arm-{options.name}", "speed": f"eval-speed-arm-{options.name}"}.get(options.step, step)
    if options.step != "table" and done(finished):
        print(f"{step}: done (docs/results/issue39/{step}.json)")
        return
    if options.step == "prompts":
        prompts(options)
    elif options.step == "generate":
        generate(options)
    elif options.step == "eval":
        evaluate(options.name, {"teacher": TEACHER, "untouched": STUDENT}[options.name], options,
                 assisted=options.assisted_prompts if options.name == "untouched" else 0)
    elif options.step == "speed":
        speed(options.name, options)
    elif options.step == "arm":
        arm(options.name, options)
    else:
        table(options)


if __name__ == "__main__":
    main()
