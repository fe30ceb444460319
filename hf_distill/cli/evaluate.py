"""``hf-distill evaluate``: a student (with its teacher, and the student before distillation) on held-out data and,
optionally, HumanEval; a table, a report and the student's model card (`hf_distill.evaluation.heldout`)."""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import HfArgumentParser, TrainingArguments
from transformers.utils import logging

from ..data.chat import pad_id, stop_ids
from ..data.loading import TASKS, DataArguments
from ..data.sampler import SamplingSettings, packed_once, sample_completions
from ..data.samples import collapse_reasons, completion_stats, held_out_prompts, samples_markdown
from ..evaluation.code_eval import (
    ALLOW_FLAG,
    CodeBlockEnd,
    Sandbox,
    humaneval_messages,
    humaneval_problems,
    score_answers,
    write_answers,
)
from ..evaluation.heldout import (
    assisted_generation,
    draft_acceptance,
    greedy_answers,
    held_out_scores,
    mcnemar_exact,
    teacher_nll,
)
from ..modeling import weights_fingerprint
from ..storage.hub import update_card_evaluation
from .arguments import ModelArguments
from .models import collator_for, load_model, prepare_inputs, resolve_source
from .report import SIGNIFICANT, folder_size, parameters, throughput

logger = logging.get_logger(__name__)


#: The command-line flag of each model (internal name -> flag): the baseline is "before" inside.
FLAGS = {"teacher": "teacher", "before": "baseline", "student": "student"}


@dataclass
class EvaluateArguments:
    """What `hf-distill evaluate` compares and measures."""

    student: str | None = field(default=None, metadata={"help": "The distilled student: folder, Hub id or asset."})
    teacher: str | None = field(default=None, metadata={"help": "Its teacher (KL, agreement, draft acceptance)."})
    baseline: str | None = field(default=None, metadata={"help": "The student before distillation, to compare with."})
    task: str = field(default="causal-lm", metadata={"help": "What the models do.", "choices": list(TASKS)})
    output_dir: str = field(default="evaluation", metadata={"help": "Where the report and answers go."})
    num_prompts: int = field(default=32, metadata={"help": "Held-out prompts answered greedily by every model."})
    show: int = field(default=5, metadata={"help": "Of them, shown side by side in the log and report."})
    max_new_tokens: int = field(default=128, metadata={"help": "Length cap of the greedy answers."})
    batch_size: int = field(default=8, metadata={"help": "Rows per forward pass / generation batch."})
    draft_lengths: str = field(default="4", metadata={"help": "Draft lengths k of the speculative acceptance: 2,4,8"})
    assisted_prompts: int = field(default=4, metadata={"help": "Prompts timed with transformers' assisted generation "
                                                               "(student drafting for the teacher); 0: skip."})
    humaneval: bool = field(default=False, metadata={"help": f"Score HumanEval (needs {ALLOW_FLAG})."})
    humaneval_limit: int | None = field(default=None, metadata={"help": "Only the first N HumanEval problems."})
    humaneval_max_new_tokens: int = field(default=384, metadata={"help": "Length cap of a HumanEval answer."})
    humaneval_models: str = field(default="all", metadata={"help": "Which models HumanEval scores: all, or some of "
                                                                    "student,baseline,teacher (a large teacher's "
                                                                    "HumanEval can take hours on CPU)."})
    num_samples: int = field(default=1, metadata={"help": "HumanEval answers per problem (1: greedy; more: "
                                                          "sampled at --sampling_temperature, for pass@k)."})
    pass_k: str = field(default="1", metadata={"help": "The k of pass@k, e.g. 1,10 (k <= --num_samples)."})
    sampling_temperature: float = field(default=0.8, metadata={"help": "Temperature with --num_samples > 1."})
    allow_code_execution: bool = field(default=False, metadata={"help": "Run model-written programs (each in its "
                                                                        "own subprocess, as an unprivileged user, "
                                                                        "with limits; see hf_distill.evaluation.code_eval)."})
    answers_dir: str | None = field(default=None, metadata={"help": "Where generated answers are kept, one file per "
                                                                    "model weights, prompts and settings (default: "
                                                                    "--output_dir); a folder shared by several "
                                                                    "evaluations answers each model once."})
    sandbox_user: str | None = field(default=None, metadata={"help": "User the programs run as (root: nobody)."})
    sandbox_timeout: float = field(default=10.0, metadata={"help": "Seconds a program may run."})
    update_card: bool = field(default=True, metadata={"help": "Write the results into the student folder's "
                                                              "README.md (model-index metadata and a section)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow models whose code lives on the Hub."})
    seed: int = field(default=42, metadata={"help": "Seed of the held-out split and of sampled answers."})

    def ks(self) -> list[int]:
        values = [int(v) for v in self.draft_lengths.split(",") if v.strip()]
        if not values or min(values) < 1:
            raise ValueError(f"--draft_lengths takes positive integers such as 2,4,8 (got {self.draft_lengths!r}).")
        return values

    def humaneval_names(self, loaded: Sequence[str]) -> list[str]:
        """The loaded models (internal names: student, before, teacher) that --humaneval_models chose."""
        if self.humaneval_models.strip() == "all":
            return list(loaded)
        names = {flag: name for name, flag in FLAGS.items()}
        asked = [v.strip() for v in self.humaneval_models.split(",") if v.strip()]
        wrong = [v for v in asked if names.get(v) not in loaded]
        if wrong or not asked:
            raise ValueError(f"--humaneval_models {self.humaneval_models!r}: choose 'all' or some of "
                             f"{', '.join(FLAGS[n] for n in loaded)} (models given by their flags); "
                             f"not {', '.join(wrong) or 'nothing'}.")
        return [names[v] for v in asked]


def evaluate_main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``hf-distill evaluate``: parse the flags and run `evaluate`."""
    parser = HfArgumentParser((EvaluateArguments, DataArguments))
    options, data_args = parser.parse_args_into_dataclasses(args=list(argv) if argv is not None else None)
    return evaluate(options, data_args)


def evaluate(options: EvaluateArguments, data_args: DataArguments | None = None) -> dict[str, Any]:
    """The evaluation of the module docstring; returns the results (also written to ``output_dir/results.json``)."""
    if options.student is None:
        raise ValueError("--student is required: the distilled model to evaluate (folder, Hub id or asset:NAME).")
    if options.humaneval and not options.allow_code_execution:
        raise ValueError(f"--humaneval runs the models' programs: pass {ALLOW_FLAG} to allow it (each runs in its own "
                         "subprocess as an unprivileged user, with a timeout and limits).")
    if options.humaneval and options.task != "causal-lm":
        raise ValueError("--humaneval needs --task causal-lm.")
    if data_args is None or (data_args.dataset is None and not options.humaneval):
        raise ValueError("Give held-out data (--dataset, as for distill) or --humaneval.")
    ks, pass_ks = options.ks(), [int(v) for v in options.pass_k.split(",")]
    sources = {name: getattr(options, flag) for name, flag in FLAGS.items() if getattr(options, flag)}
    if options.humaneval:  # (a wrong name fails here, before any model is loaded)
        options.humaneval_names(list(sources))
    sandbox = Sandbox(timeout=options.sandbox_timeout, user=options.sandbox_user) if options.humaneval else None
    os.makedirs(options.output_dir, exist_ok=True)
    model_args = ModelArguments(teacher=options.teacher or options.student, student=options.student,
                                task=options.task, trust_remote_code=options.trust_remote_code)
    data = None
    if data_args.dataset is not None:
        job = TrainingArguments(output_dir=options.output_dir, report_to=[], seed=options.seed, use_cpu=True)
        tokenizer, data = prepare_inputs(model_args, data_args, job, require_labels=False,
                                        prompts=options.task == "causal-lm")
    else:
        from .models import load_tokenizer

        tokenizer = load_tokenizer(model_args, options.student)
    models = {name: load_model(source, options.task, data, trust_remote_code=options.trust_remote_code,
                               flag=f"--{FLAGS[name]}").eval()
              for name, source in sources.items()}
    results: dict[str, Any] = {"models": dict(sources), "scores": {name: {} for name in models}}
    scores = results["scores"]
    for name, model in models.items():
        folder = resolve_source(sources[name], f"--{FLAGS[name]}") if not sources[name].startswith("asset:") else None
        scores[name]["parameters"] = parameters(model)
        scores[name]["bytes_on_disk"] = folder_size(folder) if folder else folder_size(resolve_source(sources[name]))
    if data is not None and len(data.eval) and "labels" in data.eval.column_names:
        loader = DataLoader(data.eval, batch_size=options.batch_size,
                            collate_fn=collator_for(options.task, tokenizer, options.seed, data))
        for name, values in held_out_scores(models, loader, options.task,
                                            reference="teacher" if "teacher" in models else None).items():
            scores[name].update(values)
        if options.task != "causal-lm":
            batch = {k: v for k, v in next(iter(loader)).items() if k != "labels" and torch.is_tensor(v)}
            for name, model in models.items():
                scores[name]["examples_per_second"] = throughput(model, batch)
    samples = []
    if options.task == "causal-lm" and data is not None:
        samples = _generation(options, tokenizer, data, models, scores, ks)
    if options.humaneval:
        results["humaneval"] = _humaneval(options, tokenizer, models, scores, sandbox, pass_ks)
    _report(options, results, samples)
    if options.update_card and os.path.isdir(options.student) and os.path.exists(
            os.path.join(options.student, "README.md")):
        update_card_evaluation(options.student, _card_metrics(options, data_args, scores))
        logger.warning("Results written into %s", os.path.join(options.student, "README.md"))
    return results


def _generation(options: EvaluateArguments, tokenizer: Any, data: Any, models: dict[str, torch.nn.Module],
                scores: dict[str, dict[str, Any]], ks: list[int]) -> list[dict[str, Any]]:
    """Greedy answers of every model on the held-out prompts: statistics, the teacher's NLL of them, collapse flags,
    the student as a draft for the teacher; returns the side-by-side table (as the samples of `distill`)."""
    pairs = held_out_prompts(data.eval, options.num_prompts)
    if not pairs:
        return []
    prompts = [p for p, _ in pairs]
    stops = tuple(stop_ids(tokenizer, bool(getattr(tokenizer, "chat_template", None))))
    pad = pad_id(tokenizer, stops)
    answers, stats = {}, {}
    for name, model in models.items():
        store = _store(options, model, prompts, {"max_new_tokens": options.max_new_tokens, "stops": list(stops)},
                       "held-out")
        kept = store.read().get("all")
        if kept:
            logger.warning("Greedy answers of the %s kept from %s.", name, store.path)
            answers[name], seconds = kept["answers"], kept["seconds"]
        else:
            answers[name], seconds = greedy_answers(model, prompts, options.max_new_tokens, pad, stops,
                                                    options.batch_size, desc=f"Greedy answers of the {name}")
            store.append({"all": {"answers": [list(map(int, a)) for a in answers[name]], "seconds": seconds}})
        stats[name] = completion_stats(answers[name], stops, options.max_new_tokens)
        scores[name].update({f"answers_{k}": v for k, v in stats[name].items() if k != "count"})
        scores[name]["generated_tokens_per_second"] = sum(map(len, answers[name])) / max(seconds, 1e-9)
    reference = stats.get("teacher")
    for name in models:
        if name != "teacher":
            flags = collapse_reasons(stats[name], reference)
            scores[name]["collapse"] = "; ".join(flags) if flags else "no"
            if flags:
                logger.warning("Collapse: the %s's greedy answers look degenerate: %s.", name, "; ".join(flags))
    if "teacher" in models:
        teacher = models["teacher"]
        for name in models:
            scores[name]["teacher_nll_of_answers"] = _kept_teacher_nll(options, teacher, prompts, answers[name], pad)
        for name in (n for n in models if n != "teacher"):
            accepted = draft_acceptance(models[name], prompts, answers["teacher"], pad, ks, options.max_new_tokens)
            scores[name]["draft_match_rate"] = accepted.match_rate
            for k in ks:
                scores[name][f"draft_tokens_per_forward_k{k}"] = accepted.tokens_per_forward(k)
            if options.assisted_prompts > 0:
                timed = assisted_generation(teacher, models[name], prompts[: options.assisted_prompts], ks[0],
                                            options.max_new_tokens, stops)
                scores[name][f"assisted_speedup_k{ks[0]}"] = timed["speedup"]
                scores[name]["assisted_identical"] = f"{timed['identical']}/{len(prompts[:options.assisted_prompts])}" \
                                                     + (f" ({timed['ties']} ties)" if timed["ties"] else "")
    names = list(models)
    rows = [[_text(tokenizer, prompts[i], 160), *[_text(tokenizer, answers[n][i]) for n in names]]
            for i in range(min(options.show, len(prompts)))]
    entry = {"step": "evaluate", "columns": ["prompt", *names], "rows": rows,
             "teacher_stats": reference, "student_stats": stats["student"],
             "student_flags": collapse_reasons(stats["student"], reference)}
    logger.warning("Greedy answers (at most %d new tokens):\n%s", options.max_new_tokens, samples_markdown(entry))
    return [entry]


def _text(tokenizer: Any, tokens: Sequence[int], limit: int = 400) -> str:
    words = tokenizer.decode(list(tokens), skip_special_tokens=True).strip().replace("\n", "\\n")
    return words if len(words) <= limit else "…" + words[-limit:]


def _humaneval(options: EvaluateArguments, tokenizer: Any, models: dict[str, torch.nn.Module],
               scores: dict[str, dict[str, Any]], sandbox: Sandbox, pass_ks: list[int]) -> dict[str, Any]:
    """pass@k of every model on HumanEval; the answers in ``output_dir/humaneval-<model>.jsonl``; the student's
    problems solved against the baseline's, with the exact McNemar p-value."""
    problems = humaneval_problems(options.humaneval_limit)
    chat = bool(getattr(tokenizer, "chat_template", None))
    prompts = [tokenizer.apply_chat_template(humaneval_messages(p), add_generation_prompt=True, tokenize=True,
                                             return_dict=False) if chat else tokenizer(p["prompt"])["input_ids"]
               for p in problems]
    prompts = [list(p["input_ids"] if isinstance(p, dict) else p) for p in prompts]
    stops = tuple(stop_ids(tokenizer, chat))
    pad = pad_id(tokenizer, stops)
    solved = {}
    settings = {"max_new_tokens": options.humaneval_max_new_tokens, "num_samples": options.num_samples,
                "temperature": options.sampling_temperature if options.num_samples > 1 else 0.0, "seed": options.seed}
    for name in sorted(options.humaneval_names(list(models)), key=("student", "before", "teacher").index):
        # (the quickest first)
        model = models[name]
        # answers are kept as they come (a stopped run resumes where it was): one line per problem
        store = _store(options, model, prompts, settings, "humaneval")
        done = store.read()
        todo = sorted((i for i, p in enumerate(problems) if p["task_id"] not in done), key=lambda i: len(prompts[i]))
        if done:
            logger.warning("HumanEval: %d answers of the %s kept from %s; %d to write.", len(done), name, store.path,
                           len(todo))
        with packed_once(model, options.batch_size):  # (once for all batches: the model does not change)
            for first in tqdm(range(0, len(todo), options.batch_size), desc=f"HumanEval answers of the {name}",
                              unit="batch"):
                chunk = todo[first: first + options.batch_size]
                rows: list[list[str]] = [[] for _ in chunk]
                for sample in range(options.num_samples):
                    answers = _answers(model, [prompts[i] for i in chunk], options, pad, stops, sample, tokenizer)
                    for row, answer in zip(rows, answers):
                        row.append(tokenizer.decode(answer, skip_special_tokens=True))
                batch = {problems[i]["task_id"]: row for i, row in zip(chunk, rows)}
                done.update(batch)
                store.append(batch)  # (kept per batch: a stopped pass resumes here)
        texts = [done[p["task_id"]] for p in problems]
        result = score_answers(problems, texts, sandbox, pass_ks)
        solved[name] = set(result.pop("solved"))
        write_answers(os.path.join(options.output_dir, f"humaneval-{name}.jsonl"), problems, texts, solved[name])
        scores[name].update({f"humaneval_{k}": v for k, v in result.items()})
    out: dict[str, Any] = {"problems": len(problems), "solved": {n: sorted(v) for n, v in solved.items()}}
    if "before" in solved and "student" in solved:
        gained, lost = solved["student"] - solved["before"], solved["before"] - solved["student"]
        out["paired"] = {"gained": len(gained), "lost": len(lost), "mcnemar_p": mcnemar_exact(len(gained), len(lost))}
        scores["student"]["humaneval_net_vs_before"] = f"+{len(gained)} -{len(lost)} (p={out['paired']['mcnemar_p']:.3g})"
    return out


@dataclass
class KeptRecords:
    """Results kept as JSON lines in `path`, each line the `key` (what they depend on: weights, prompts, settings),
    a ``task_id`` and its value (``answers``); lines of other keys share the file and are skipped, and a line cut by a
    stop is ignored, so a stopped evaluation resumes with what it had."""

    path: str
    key: dict[str, Any]

    def read(self) -> dict[str, Any]:
        """task id -> value, of the lines with this key."""
        kept: dict[str, Any] = {}
        if os.path.exists(self.path):
            with open(self.path) as f:
                for line in f:
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:  # (a line cut by a stop)
                        continue
                    if all(row.get(k) == v for k, v in self.key.items()):
                        kept[row["task_id"]] = row["answers"]
        return kept

    def append(self, values: dict[str, Any]) -> None:
        """A line per task id -> value, written at once (a stop loses at most these; a line it cut is closed first,
        so the next line is whole)."""
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        cut = False
        if os.path.exists(self.path) and os.path.getsize(self.path):
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                cut = f.read(1) != b"\n"
        with open(self.path, "a") as f:
            f.write("\n" if cut else "")
            f.writelines(json.dumps({**self.key, "task_id": task, "answers": value}) + "\n"
                         for task, value in values.items())


def _store(options: EvaluateArguments, model: torch.nn.Module, prompts: Sequence[Sequence[int]],
           settings: dict[str, Any], kind: str) -> KeptRecords:
    """Where the answers of `model` to `prompts` under `settings` are kept, keyed by the weights' fingerprint
    (`weights_fingerprint`, so a retrained folder is never mistaken for its old self), the prompts' tokens (so another
    chat template or prompt set is another file) and the settings: one file per key."""
    prompt_digest = hashlib.sha256(json.dumps([list(map(int, p)) for p in prompts]).encode()).hexdigest()[:16]
    key = {"weights": weights_fingerprint(model), "prompts": prompt_digest, **settings}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return _kept(options, f"{kind}-answers-{digest}.jsonl", key)


def _kept(options: EvaluateArguments, name: str, key: dict[str, Any]) -> KeptRecords:
    """The kept records `name` in ``--answers_dir`` (default: ``--output_dir``)."""
    return KeptRecords(os.path.join(options.answers_dir or options.output_dir, name), key)


def _kept_teacher_nll(options: EvaluateArguments, teacher: torch.nn.Module, prompts: Sequence[Sequence[int]],
                      answers: Sequence[Sequence[int]], pad: int) -> float:
    """`teacher_nll` of `answers`, kept beside the answers by the teacher's weights and the prompts' and answers'
    tokens: each arm evaluated against one teacher reads the teacher's NLL of its own (kept) answers back (a 1.5B
    teacher on 40 answers: 8 minutes on 2 CPU cores)."""
    tokens = json.dumps([[list(map(int, p)), list(map(int, a))] for p, a in zip(prompts, answers)]).encode()
    key = {"teacher": weights_fingerprint(teacher), "tokens": hashlib.sha256(tokens).hexdigest()[:16]}
    store = _kept(options, "teacher-nll.jsonl", key)
    kept = store.read()
    if "nll" not in kept:
        kept["nll"] = teacher_nll(teacher, prompts, answers, pad)
        store.append({"nll": kept["nll"]})
    return kept["nll"]


def _answers(model, prompts, options, pad, stops, sample, tokenizer) -> list[list[int]]:
    """One answer per prompt, ending at its code block: greedy, or sampled (``--num_samples`` > 1)."""
    stopping = lambda width: CodeBlockEnd(tokenizer, width)  # noqa: E731
    if options.num_samples == 1:
        return greedy_answers(model, prompts, options.humaneval_max_new_tokens, pad, stops, len(prompts),
                              stopping=stopping, desc="batch")[0]
    settings = SamplingSettings(options.sampling_temperature, False, options.humaneval_max_new_tokens, 0.0, 0.95, 0,
                                1, options.seed + sample, pad, stops)
    return sample_completions(model, prompts, settings, options.seed + sample, stopping=stopping)


def _format(value: Any) -> str:
    if isinstance(value, float):
        return SIGNIFICANT.format(value) if abs(value) >= 10 or value == 0 else f"{value:.4g}"
    return "-" if value is None else str(value)


def _report(options: EvaluateArguments, results: dict[str, Any], samples: list[dict[str, Any]]) -> None:
    scores = results["scores"]
    names = list(scores)
    metrics = list(dict.fromkeys(k for values in scores.values() for k in values))
    table = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    table += [f"| {m} | " + " | ".join(_format(scores[n].get(m)) for n in names) + " |" for m in metrics]
    print("\n".join(table))
    lines = ["# Evaluation", "", *[f"- {n}: `{s}`" for n, s in results["models"].items()], "", *table]
    for entry in samples:
        lines += ["", "## Greedy answers on held-out prompts", "", samples_markdown(entry)]
    if "humaneval" in results:
        lines += ["", f"## HumanEval ({results['humaneval']['problems']} problems)", "",
                  "Answers and results per problem: `humaneval-<model>.jsonl`."]
    with open(os.path.join(options.output_dir, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(options.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    print(f"\nreport in {os.path.join(options.output_dir, 'report.md')}")


def _card_metrics(options: EvaluateArguments, data_args: DataArguments | None,
                  scores: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The student's results as model-index entries (dataset, metric name, value)."""
    student = scores["student"]
    entries = []
    if data_args is not None and data_args.dataset:
        held_out = {k: v for k, v in student.items() if k in ("perplexity", "accuracy", "kl_to_teacher",
                                                                "teacher_agreement", "teacher_nll_of_answers")
                    and isinstance(v, float) and math.isfinite(v)}
        if held_out:
            entries.append({"dataset": data_args.dataset, "type": "held-out", "metrics": held_out})
    passes = {k.removeprefix("humaneval_"): v for k, v in student.items() if k.startswith("humaneval_pass@")}
    if passes:
        entries.append({"dataset": "openai_humaneval", "name": "HumanEval", "type": "openai_humaneval",
                        "metrics": passes})
    return entries
