"""Quality benchmark 6: on-policy distillation (GKD, Agarwal et al. 2024; Thinking Machines 2025) against off-policy
KD at equal optimizer steps, from one shared warmed-up student.

Teacher SmolLM2-135M-Instruct (the `smollm2-135m` asset), prompts the TREC questions as user turns (shuffled once
with seed 0; test prompts first, then train prompts). The teacher answers the train prompts greedily (sequence-level
KD data). The student is the teacher's `shrink_model` cut, warmed up once by sequence-level KD (CE on the teacher's
answers; one shared checkpoint), then continued at equal optimizer steps, 3 seeds (data order and sampling), with

- a_off_policy_fkl: off-policy KD on the teacher's answers, KL(p_t || p_s) at T = 1 (lmbda = 0);
- b_on_policy_rkl: on-policy, lmbda = 1, reverse KL(p_s || p_t) on the student's own samples (temperature 1);
- c_mixed_jsd: lmbda = 0.5, generalized JSD with beta = 0.5 (GKD's setting).

Metrics on the held-out prompts: (1) the mean per-token reverse KL(p_s || p_t) along the student's own sampled
completions (temperature 1, one fixed seed per evaluation), over the full vocabulary; (2) the teacher's per-token NLL
of the student's greedy completions. Wall time per arm.

    HF_DISTILL_ASSETS=... python benchmarks/quality/bench_on_policy.py --output docs/results/quality_on_policy.json \
        --quality_json docs/results/quality.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import datasets
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_chat import answer, prompts  # noqa: E402
from common import fmt, machine, mean_std, merge_quality, write_json  # noqa: E402

from hf_distill import DistillationConfig, DistillationTrainer, shrink_model  # noqa: E402
from hf_distill.data.assets import fetch  # noqa: E402
from hf_distill.data.chat import prepare_chat_dataset, prompt_ids, stop_ids  # noqa: E402
from hf_distill.teachers.sampled import SamplingSettings, sample_completions  # noqa: E402


def completed_rows(model, tokenizer, test_prompts, temperature: float, max_new_tokens: int, seed: int,
                   batch: int = 16) -> datasets.Dataset:
    """The model's own completions of the test prompts as training rows (prompt -100, completion counted)."""
    stops = tuple(stop_ids(tokenizer, conversational=True))
    settings = SamplingSettings(1.0, False, max_new_tokens, temperature, 1.0, 0, 1, seed, tokenizer.pad_token_id, stops)
    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    for start in range(0, len(test_prompts), batch):
        encoded = [prompt_ids(tokenizer, p) for p in test_prompts[start: start + batch]]
        for prompt, completion in zip(encoded, sample_completions(model, encoded, settings, seed + start)):
            rows["input_ids"].append(prompt + completion)
            rows["attention_mask"].append([1] * (len(prompt) + len(completion)))
            rows["labels"].append([-100] * len(prompt) + completion)
    return datasets.Dataset.from_dict(rows)


def mean_term(model, teacher, rows, collator, workdir: str, **weights) -> dict[str, float]:
    args = DistillationConfig(output_dir=os.path.join(workdir, "eval"), report_to=[], use_cpu=True,
                              per_device_eval_batch_size=16, temperature=1.0, disable_tqdm=True, **weights)
    return DistillationTrainer(model=model, teacher_model=teacher, args=args, eval_dataset=rows,
                               data_collator=collator).evaluate()


def evaluate(student, teacher, tokenizer, test_prompts, collator, workdir: str, max_new_tokens: int) -> dict:
    """(1) reverse KL(p_s || p_t) per token on the student's sampled completions; (2) the teacher's NLL per token of
    the student's greedy completions; plus the mean length of each."""
    sampled = completed_rows(student, tokenizer, test_prompts, 1.0, max_new_tokens, seed=1234)
    greedy = completed_rows(student, tokenizer, test_prompts, 0.0, max_new_tokens, seed=0)
    rkl = mean_term(student, teacher, sampled, collator, workdir, task_weight=0.0, logits_weight=1.0,
                    logits_loss="reverse_kl")["eval_logits_loss"]
    nll = mean_term(teacher, None, greedy, collator, workdir, task_weight=1.0, logits_weight=0.0)["eval_task_loss"]
    length = {name: sum(sum(1 for t in r if t != -100) for r in rows["labels"]) / len(rows)
              for name, rows in (("sampled_length", sampled), ("greedy_length", greedy))}
    return {"reverse_kl": rkl, "teacher_nll_greedy": nll, **length}


def train(student, teacher, tokenizer, rows, collator, workdir: str, steps: int, seed: int, options, held_out=None,
          **settings):
    """`steps` optimizer steps; with `held_out` (prompt-only rows), the library's held-out samples (teacher beside
    student, collapse flagged: `hf_distill.data.samples`) are logged at the end."""
    args = DistillationConfig(
        output_dir=workdir, report_to=[], use_cpu=True, seed=seed, max_steps=steps,
        per_device_train_batch_size=options.batch_size, learning_rate=options.learning_rate,
        lr_scheduler_type="constant", logging_steps=10, save_strategy="no", disable_tqdm=True, temperature=1.0,
        max_new_tokens=options.max_new_tokens, **settings)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=rows,
                                  eval_dataset=held_out, data_collator=collator, processing_class=tokenizer)
    start = time.perf_counter()
    trainer.train()
    logs = [log for log in trainer.state.log_history if "generation_seconds_per_step" in log]
    generation = sum(log["generation_seconds_per_step"] * 10 for log in logs)
    return time.perf_counter() - start, generation


ARMS = {
    "a_off_policy_fkl": {"task_weight": 0.0, "logits_weight": 1.0, "logits_loss": "forward_kl", "lmbda": 0.0},
    "b_on_policy_rkl": {"task_weight": 0.0, "logits_weight": 1.0, "logits_loss": "reverse_kl", "lmbda": 1.0},
    "c_mixed_jsd": {"task_weight": 0.0, "logits_weight": 1.0, "logits_loss": "jsd", "jsd_beta": 0.5, "lmbda": 0.5},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train_prompts", type=int, default=320)
    parser.add_argument("--test_prompts", type=int, default=64)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--generation_batch_size", type=int, default=16)
    parser.add_argument("--student_layers", type=int, default=10)
    parser.add_argument("--warmup_steps", type=int, default=40)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--learning_rate", type=float, default=2e-4)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--output", default=None)
    parser.add_argument("--quality_json", default=None)
    options = parser.parse_args()
    options.temperature = 1.0
    started = time.perf_counter()
    workdir = tempfile.mkdtemp(prefix="bench_on_policy_")
    source = str(fetch("smollm2-135m"))
    tokenizer = AutoTokenizer.from_pretrained(source)
    teacher = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    test_prompts, train_prompts = prompts(options.test_prompts), prompts(options.train_prompts,
                                                                         skip=options.test_prompts)
    generations, t_generate = answer(teacher, tokenizer, train_prompts, os.path.join(workdir, "gen"), options)
    rows, collator = prepare_chat_dataset(generations, tokenizer, options.max_length)
    held_out, _ = prepare_chat_dataset(datasets.Dataset.from_dict({"prompt": test_prompts}), tokenizer,
                                       options.max_length, prompts=True)
    print(f"teacher answers: {len(rows)} rows in {t_generate:.0f} s", file=sys.stderr, flush=True)

    torch.manual_seed(0)
    student = shrink_model(teacher, num_layers=options.student_layers)
    start = time.perf_counter()
    train(student, None, tokenizer, rows, collator, os.path.join(workdir, "warmup"), options.warmup_steps, 0, options,
          task_weight=1.0, logits_weight=0.0)
    t_warmup = time.perf_counter() - start
    checkpoint = os.path.join(workdir, "warm")
    student.save_pretrained(checkpoint)
    warm = evaluate(student, teacher, tokenizer, test_prompts, collator, workdir, options.max_new_tokens)
    print(f"warmed-up student ({t_warmup:.0f} s): {warm}", file=sys.stderr, flush=True)

    runs: dict[str, list[dict]] = {}
    for name in options.arms:
        runs[name] = []
        for seed in range(options.seeds):
            student = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
            seconds, generation = train(student, teacher, tokenizer, rows, collator, os.path.join(workdir, name),
                                        options.steps, seed, options, held_out, **ARMS[name])
            result = {"seed": seed, "train_seconds": seconds, "generation_seconds": generation,
                      **evaluate(student, teacher, tokenizer, test_prompts, collator, workdir, options.max_new_tokens)}
            runs[name].append(result)
            print(f"{name} seed {seed}: {result}", file=sys.stderr, flush=True)
    total = time.perf_counter() - started

    lines = [f"\n### On-policy: SmolLM2-135M-Instruct (30 layers) -> {options.student_layers}-layer student, warmed up "
             f"{options.warmup_steps} steps by sequence-level KD, then {options.steps} steps of {options.batch_size} "
             f"prompts; {len(rows)} train / {len(test_prompts)} test prompts, at most {options.max_new_tokens} new "
             "tokens\n",
             "| student | test reverse KL per token on its own samples | teacher NLL per token of its greedy answers | "
             "mean sampled / greedy length | train time s (of which generating) |", "|---|---:|---:|---:|---:|",
             f"| warmed-up start | {warm['reverse_kl']:.4f} | {warm['teacher_nll_greedy']:.4f} | "
             f"{warm['sampled_length']:.1f} / {warm['greedy_length']:.1f} | - |"]
    for name, results in runs.items():
        lines.append(
            f"| {name} | {fmt([r['reverse_kl'] for r in results], 1, 4)} | "
            f"{fmt([r['teacher_nll_greedy'] for r in results], 1, 4)} | "
            f"{mean_std([r['sampled_length'] for r in results])[0]:.1f} / "
            f"{mean_std([r['greedy_length'] for r in results])[0]:.1f} | "
            f"{mean_std([r['train_seconds'] for r in results])[0]:.0f} "
            f"({mean_std([r['generation_seconds'] for r in results])[0]:.0f}) |")
    if "a_off_policy_fkl" in runs and "b_on_policy_rkl" in runs:
        a = mean_std([r["reverse_kl"] for r in runs["a_off_policy_fkl"]])[0]
        b = mean_std([r["reverse_kl"] for r in runs["b_on_policy_rkl"]])[0]
        lines.append(f"\n(b) vs (a) on the reverse KL along the student's own samples: {100 * (b - a) / a:+.1f}% "
                     "(target: at most -10%).")
    lines.append(f"\nTeacher answers {t_generate:.0f} s; warm-up {t_warmup:.0f} s; total {total / 60:.1f} min.")
    print("\n".join(lines))
    info = machine("cpu")
    print(f"\nMachine: {info}")
    if options.quality_json:
        means = {n: {k: mean_std([r[k] for r in rs])[0] for k in ("reverse_kl", "teacher_nll_greedy", "train_seconds")}
                 for n, rs in runs.items()}
        merge_quality("on_policy", f"smollm2-135m-instruct_trec_{options.student_layers}_layers", {
            "warm_start": warm, "students": means, "steps": options.steps, "seeds": options.seeds},
            options.quality_json)
    write_json(options.output, {"machine": info, "settings": vars(options), "warm_start": warm, "runs": runs,
                                "teacher_generation_seconds": t_generate, "warmup_seconds": t_warmup,
                                "total_seconds": total})
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
