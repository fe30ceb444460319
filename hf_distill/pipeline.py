"""The command-line jobs: fine-tune a teacher, distil it into a student, evaluate both, report, push."""

from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.utils import logging

from .cli import CacheArguments, ModelArguments, parse_distill_args
from .config import DistillationConfig
from .data import DataArguments, PreparedData, load_raw, named_labels, prepare_datasets, split_dataset
from .hub import CardInfo, hub_errors
from .output_dir import check_output_dir, move_aside_on_main
from .signal_modules import ATTACHED_NAME
from .students import model_depth, shrink_model
from .teacher_cache import build_teacher_cache, cache_manifest, cache_size, load_teacher_cache
from .trainer import LABEL_WEIGHT_FIELDS, DistillationTrainer, check_one_run

logger = logging.get_logger(__name__)

AUTO_CLASSES = {
    "sequence-classification": AutoModelForSequenceClassification,
    "regression": AutoModelForSequenceClassification,
    "causal-lm": AutoModelForCausalLM,
    "masked-lm": AutoModelForMaskedLM,
}


def resolve_source(source: str, flag: str = "--teacher") -> str:
    """``asset:NAME`` -> the local folder of a packaged asset (fetched when needed); a local folder -> itself; a Hub
    id (``name`` or ``owner/name``) unchanged. Something that can only be a path (``./x``, ``/x``, ``a/b/c``) and does
    not exist is refused naming `flag`."""
    if source.startswith("asset:"):
        from .assets import fetch

        return str(fetch(source.split(":", 1)[1]))
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"{flag} {source!r} is a file: give the model's folder (with config.json), a "
                                     "Hub id or asset:NAME.")
        return str(path)
    if source.startswith((".", "/", "~")) or source.count("/") > 1 or os.sep != "/" and os.sep in source:
        raise FileNotFoundError(
            f"{flag} {source!r}: no such folder. Give an existing model folder (with config.json), a Hub id "
            "(owner/name) or asset:NAME (hf-distill assets list)."
        )
    return source


def load_model(source: str, task: str, data: PreparedData | None, gguf_file: str | None = None,
               trust_remote_code: bool = False, flag: str = "--teacher") -> torch.nn.Module:
    """A model for `task` from a Hub id / folder / asset (GGUF dequantised to float32); a classifier gets the data's
    label set (`data.id2label`: the teacher's own when it names its labels). `flag` names the source in errors."""
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if task == "regression":
        kwargs.update(num_labels=1, problem_type="regression")
    elif task == "sequence-classification" and data is not None and data.num_labels:
        kwargs.update(num_labels=data.num_labels, id2label=data.id2label,
                      label2id={v: k for k, v in data.id2label.items()})
    if gguf_file:
        kwargs.update(gguf_file=gguf_file, dtype=torch.float32)
    folder = resolve_source(source, flag)
    try:
        model = AUTO_CLASSES[task].from_pretrained(folder, **kwargs)
    except Exception as error:
        broken = unreadable_weights(folder) if Path(folder).is_dir() else None
        if broken:
            raise ValueError(
                f"{flag} {source!r}: the weights file {broken} cannot be read ({error}). It is truncated or corrupt: "
                "save or download the model again."
            ) from error
        if isinstance(error, OSError) and not Path(folder).is_dir():
            raise ValueError(f"{flag} {source!r}: cannot load it from the Hub ({' '.join(str(error).split())[:300]}). "
                             "Check the id, the network and your token, or give a local folder.") from error
        raise
    if gguf_file:  # a plain float model from here on (saves and reloads without the quantizer)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model


def unreadable_weights(folder: str) -> str | None:
    """The first ``*.safetensors`` file in `folder` that safetensors cannot open (truncated, corrupt), or None."""
    from safetensors import safe_open

    for file in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    handle.get_slice(key)
        except Exception as error:  # safetensors raises its own SafetensorError
            logger.debug("cannot open %s: %s", file, error)
            return str(file)
    return None


def collator_for(task: str, tokenizer: Any, seed: int):
    if task == "causal-lm":
        return DataCollatorForLanguageModeling(tokenizer, mlm=False)
    if task == "masked-lm":
        return DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15, seed=seed)
    return DataCollatorWithPadding(tokenizer)


def accuracy_metrics(prediction) -> dict[str, float]:
    """Held-out accuracy from the Trainer's predictions (numpy; no Hub metric download)."""
    return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}


def regression_metrics(prediction) -> dict[str, float]:
    return {"mse": float(((prediction.predictions.reshape(-1) - prediction.label_ids.reshape(-1)) ** 2).mean())}


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, trainer: Trainer, task: str) -> dict[str, float]:
    """The task metric of `model` on the trainer's evaluation set, computed the same way for teacher and student:
    accuracy, MSE, or perplexity = exp(mean token cross-entropy). Per-example sums are gathered across processes
    (without the padding duplicates of distributed sampling)."""
    model.eval()
    device = trainer.args.device
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of the per-example values, count)
    for batch in trainer.get_eval_dataloader():
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        if task == "sequence-classification":
            values, counts = (logits.argmax(-1) == labels).double(), torch.ones_like(labels, dtype=torch.float64)
        elif task == "regression":
            values = (logits.reshape(-1) - labels.float()).double() ** 2
            counts = torch.ones_like(values)
        else:
            if task == "causal-lm":
                logits, labels = logits[:, :-1], labels[:, 1:]
            mask = labels != -100
            losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp_min(0), reduction="none")
            values, counts = (losses * mask).sum(-1).double(), mask.sum(-1).double()
        gathered = trainer.accelerator.gather_for_metrics(torch.stack([values, counts], dim=-1))
        totals += gathered.reshape(-1, 2).sum(dim=0)
    mean = float(totals[0] / totals[1].clamp_min(1))
    if task == "sequence-classification":
        return {"accuracy": mean}
    if task == "regression":
        return {"mse": mean}
    return {"perplexity": math.exp(mean)}


@torch.no_grad()
def throughput(model: torch.nn.Module, batch: dict[str, torch.Tensor], repeats: int = 3) -> float:
    """Examples per second of `model` on one batch (after a warm-up pass), on the model's device."""
    model.eval()
    model(**batch)
    start = time.perf_counter()
    for _ in range(repeats):
        model(**batch)
    return repeats * len(next(iter(batch.values()))) / (time.perf_counter() - start)


def folder_size(path: str | None) -> int | None:
    if not path or not Path(path).is_dir():
        return None
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file() and f.suffix in (".safetensors", ".bin"))


def parameters(model: torch.nn.Module) -> int:
    """Parameter count; a self-distillation teacher counts its (shared) base model without the adapters, a student
    under DeepSpeed without the signal modules riding in it; ZeRO-3 partitions count whole (`ds_numel`)."""
    if getattr(model, "is_self_distillation_teacher", False):
        return sum(p.numel() for n, p in model.student.named_parameters() if "lora_" not in n)
    return sum(getattr(p, "ds_numel", p.numel()) for n, p in model.named_parameters()
               if ATTACHED_NAME not in n.split("."))


#: One line of the summary: label, teacher value, student value (None: unknown), display format.
Row = tuple[str, Any, Any, str]


def displayed(rows: list[Row]) -> list[tuple[str, str, str]]:
    """The rows as text: each value in its row's format, "-" where unknown."""
    return [(n, *("-" if v is None else fmt.format(v) for v in (t, s))) for n, t, s, fmt in rows]


def write_report(folder: str, rows: list[Row], log_history: list[dict[str, Any]]) -> list[str]:
    """``folder/report.md`` (the summary table and the loss components over steps) and, when matplotlib is
    installed, ``folder/report.png`` (loss components over steps; teacher vs student bars). Returns written files."""
    os.makedirs(folder, exist_ok=True)
    table = ["| | teacher | student |", "|---|---|---|"] + [f"| {n} | {t} | {s} |" for n, t, s in displayed(rows)]
    terms = sorted({k for row in log_history for k in row
                    if k.endswith("_loss") and not k.startswith(("eval_", "train_"))})
    steps = [row for row in log_history if "loss" in row and "step" in row]
    history = ["| step | loss | " + " | ".join(terms) + " |", "|---" * (len(terms) + 2) + "|"]
    for row in steps:
        history.append(f"| {row['step']} | {row['loss']:.4f} | "
                       + " | ".join(f"{row[t]:.4f}" if t in row else "-" for t in terms) + " |")
    text = "# Distillation report\n\n" + "\n".join(table) + "\n\n## Loss components\n\n" + "\n".join(history) + "\n"
    written = [os.path.join(folder, "report.md")]
    Path(written[0]).write_text(text)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for term in ["loss", *terms]:
        points = [(row["step"], row[term]) for row in steps if term in row]
        if points:
            left.plot(*zip(*points), label=term, marker="." if len(points) < 3 else None)
    left.set_xlabel("step"), left.set_title("training loss components")
    if steps:
        left.legend()
    numeric = [(n, t, s) for n, t, s, _ in rows if t is not None and s is not None]
    if numeric:
        positions = np.arange(len(numeric))
        teacher_values = [float(t) for _, t, _ in numeric]
        student_values = [float(s) for _, _, s in numeric]
        scale = [max(abs(a), abs(b), 1e-12) for a, b in zip(teacher_values, student_values)]
        right.bar(positions - 0.2, [a / m for a, m in zip(teacher_values, scale)], 0.4, label="teacher")
        right.bar(positions + 0.2, [b / m for b, m in zip(student_values, scale)], 0.4, label="student")
        right.set_xticks(positions, [n for n, _, _ in numeric], rotation=30, ha="right")
        right.set_title("teacher vs student (relative to the larger)"), right.legend()
    figure.tight_layout()
    written.append(os.path.join(folder, "report.png"))
    figure.savefig(written[-1], dpi=100)
    plt.close(figure)
    return written


def prepare_inputs(model_args: ModelArguments, data_args: DataArguments, args: TrainingArguments | CacheArguments,
                   teacher_head_trained: bool = True, require_labels: bool = True):
    """Tokenizer and tokenised splits for a job (the teacher's tokenizer); `args` gives the seed of the held-out
    split (and, for training jobs, `main_process_first`). Classification labels become the teacher's class ids
    (`hf_distill.data.label_plan`); `teacher_head_trained`: the teacher's number of classes bounds the labels (not
    for `train-teacher`, which trains the head)."""
    if model_args.teacher is None:
        raise ValueError("--teacher is required: a Hub id, a local folder, or asset:NAME.")
    if data_args.dataset is None:
        raise ValueError("--dataset is required: a Hub dataset name or a local csv/json/jsonl/parquet/txt file.")
    teacher_source = resolve_source(model_args.teacher)
    tokenizer_kwargs = {"gguf_file": model_args.teacher_gguf_file} if model_args.teacher_gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(teacher_source, trust_remote_code=model_args.trust_remote_code,
                                              **tokenizer_kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    teacher_labels, teacher_classes = None, None
    if model_args.task == "sequence-classification":
        config = AutoConfig.from_pretrained(teacher_source, trust_remote_code=model_args.trust_remote_code,
                                            **tokenizer_kwargs)
        teacher_labels = named_labels(config)
        teacher_classes = int(config.num_labels) if teacher_head_trained else None
    raw = load_raw(resolve_source(data_args.dataset) if data_args.dataset.startswith("asset:") else data_args.dataset,
                   data_args.dataset_config)
    train, held_out = split_dataset(raw, data_args, args.seed)
    first = args.main_process_first(desc="tokenising") if hasattr(args, "main_process_first") else nullcontext()
    with first:
        prepared = prepare_datasets(model_args.task, train, held_out, tokenizer, data_args, teacher_labels,
                                    teacher_classes, require_labels)
    if prepared.labels is not None and prepared.labels.warning and teacher_head_trained:
        logger.warning(prepared.labels.warning)
    return tokenizer, prepared


def check_model_arguments(model_args: ModelArguments, args: DistillationConfig) -> None:
    """The model flags that cannot work, refused before anything loads."""
    if model_args.student_layers is not None and model_args.student_layers < 1:
        raise ValueError(
            f"--student_layers must be at least 1 (the number of teacher layers the student keeps), got "
            f"{model_args.student_layers}. For LoRA self-distillation without a smaller student, drop --student_layers "
            "and pass --use_peft true."
        )
    if model_args.student and model_args.student_layers:
        raise ValueError("Give either --student (a model to start from) or --student_layers (cut from the teacher), "
                         "not both.")
    if model_args.teacher and not model_args.teacher.startswith("asset:"):
        resolve_source(model_args.teacher)
    if model_args.student and not model_args.student.startswith("asset:"):
        resolve_source(model_args.student, "--student")
    for anchor in args.teacher_route or []:
        resolve_source(anchor, "--teacher_route")
    if args.teacher_route and model_args.teacher_cache:
        raise ValueError("--teacher_route and --teacher_cache are two different teachers: give one of them.")


def resume_checkpoint(args: TrainingArguments) -> str | None:
    """The checkpoint `--resume_from_checkpoint` names: a folder, or ``true`` for the last ``checkpoint-*`` in
    `output_dir` (as the HF example scripts do); ``false`` / unset: None."""
    value = args.resume_from_checkpoint
    if value is None or str(value).strip().lower() in ("", "false", "no", "none"):
        return None
    if str(value).strip().lower() in ("true", "yes", "last"):
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
        if last is None:
            raise ValueError(
                f"--resume_from_checkpoint true: output_dir {args.output_dir!r} holds no checkpoint-* folder to resume. "
                "Start a fresh run (drop the flag) or name a checkpoint folder."
            )
        return last
    if not os.path.isdir(value):
        raise FileNotFoundError(f"--resume_from_checkpoint {value!r}: no such checkpoint folder.")
    return str(value)


def distill_main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``scripts/distill.py`` / ``hf-distill distill``: distil, evaluate teacher and student, report, save, push."""
    model_args, data_args, args = parse_distill_args(argv)
    return run_distillation(model_args, data_args, args)


def run_distillation(model_args: ModelArguments, data_args: DataArguments, args: DistillationConfig) -> dict[str, Any]:
    """The whole job. Every check that can run before a model loads does (flags, output folder, processes), and the
    order of the end is: save the student and its card, write the report, merge adapters, push last."""
    check_one_run(args)
    check_model_arguments(model_args, args)
    resume = resume_checkpoint(args)
    move_earlier = check_output_dir(args.output_dir, resuming=resume is not None, overwrite=args.overwrite_output_dir)
    set_seed(args.seed)
    labelled = any(getattr(args, f) > 0 for f in LABEL_WEIGHT_FIELDS)
    tokenizer, data = prepare_inputs(model_args, data_args, args, require_labels=labelled)
    task = model_args.task
    teacher = load_model(model_args.teacher, task, data, model_args.teacher_gguf_file, model_args.trust_remote_code)
    cached = teacher_cache_for(model_args.teacher_cache, tokenizer, data.train) if model_args.teacher_cache else None
    peft_config = lora_config(model_args) if model_args.use_peft else None
    if model_args.student:
        student = load_model(model_args.student, task, data, trust_remote_code=model_args.trust_remote_code,
                             flag="--student")
        check_same_vocabulary(tokenizer, model_args.student, model_args.trust_remote_code)
    elif model_args.student_layers:
        student = shrink_model(teacher, num_layers=model_args.student_layers, strategy=model_args.shrink_strategy)
    elif model_args.use_peft:  # self-distillation: LoRA on the teacher, whose adapter-free base teaches
        student, teacher = teacher, None
    else:
        raise ValueError("Give the student: --student (Hub id / folder), --student_layers N (cut from the teacher), "
                         "or --use_peft alone (LoRA self-distillation).")
    eval_labelled = "labels" in data.eval.column_names or task in ("causal-lm", "masked-lm")
    if move_earlier:
        move_aside_on_main(args)
    with hub_errors(args):
        trainer = DistillationTrainer(
            model=student, teacher_model=teacher if cached is None and not args.teacher_route else None, args=args,
            peft_config=peft_config, train_dataset=data.train if cached is None else cached, eval_dataset=data.eval,
            processing_class=tokenizer, data_collator=collator_for(task, tokenizer, args.seed),
            route_loader=(lambda path: load_model(path, task, data, trust_remote_code=model_args.trust_remote_code,
                                                  flag="--teacher_route")) if args.teacher_route else None,
            compute_metrics={"sequence-classification": accuracy_metrics,
                             "regression": regression_metrics}.get(task) if eval_labelled else None,
        )
    student = trainer.model
    if cached is None and not args.teacher_route:
        teacher = trainer.teacher_model
    trainer.card_info = CardInfo(
        teacher=model_args.teacher, student_source=model_args.student,
        kept_layers=getattr(student.config, "distilled_from_layers", None) if not model_args.student else None,
        teacher_layers=model_depth(teacher.config), student_layers=model_depth(student.config), task=task,
        dataset=data_args.dataset, loss_weights=args.loss_weights, temperature=args.temperature,
        logits_loss=args.logits_loss, parameters={"teacher": parameters(teacher), "student": parameters(student)},
        labels=data.labels.described if data.labels is not None else None,
        labels_note=data.labels.warning if data.labels is not None else None,
    )
    trainer.train(resume_from_checkpoint=resume)
    student_eval = trainer.evaluate()
    if cached is not None or args.teacher_route:  # the teacher only now runs: for the comparison
        teacher = teacher.to(args.device).eval()
    teacher_scores = evaluate_model(teacher, trainer, task) if eval_labelled else {}
    student_scores = evaluate_model(trainer.model, trainer, task) if eval_labelled else {}
    trainer.card_info.metrics = {k: {"teacher": teacher_scores[k], "student": student_scores[k]} for k in teacher_scores}
    if "eval_teacher_agreement" in student_eval:
        trainer.card_info.metrics["teacher agreement"] = {"teacher": 1.0,
                                                          "student": student_eval["eval_teacher_agreement"]}
    trainer.save_model(args.output_dir, _internal_call=True)  # the push comes last, once

    batch = next(iter(trainer.get_eval_dataloader()))
    batch = {k: v.to(args.device) for k, v in batch.items() if k != "labels"}
    speed = {"teacher": throughput(teacher, batch), "student": throughput(trainer.model, batch)}
    teacher_size = folder_size(resolve_source(model_args.teacher) if not model_args.teacher_gguf_file else None)
    student_size = folder_size(args.output_dir)
    device = args.device.type
    megabytes = {k: v / 1e6 if v else None for k, v in (("teacher", teacher_size), ("student", student_size))}
    rows: list[Row] = [
        ("layers", model_depth(teacher.config), model_depth(student.config), "{:d}"),
        ("parameters", parameters(teacher) / 1e6, parameters(student) / 1e6, "{:.1f}M"),
        ("size on disk", megabytes["teacher"], megabytes["student"], "{:.1f}MB"),
        *[(f"held-out {k}", teacher_scores[k], student_scores[k], "{:.4f}") for k in teacher_scores],
    ]
    if "eval_teacher_agreement" in student_eval:
        rows.append(("teacher agreement", 1.0, student_eval["eval_teacher_agreement"], "{:.4f}"))
    rows.append((f"{device.upper()} examples/s (batch {len(next(iter(batch.values())))})",
                 speed["teacher"], speed["student"], "{:.0f}"))
    shown = displayed(rows)
    summary = {"rows": shown, "teacher": teacher_scores, "student": student_scores, "eval": student_eval}
    if trainer.is_world_process_zero():
        table = ["", f"| {'':<30} | {'teacher':>10} | {'student':>10} |", f"|{'-' * 32}|{'-' * 12}|{'-' * 12}|"]
        table += [f"| {n:<30} | {t:>10} | {s:>10} |" for n, t, s in shown]
        print("\n".join(table))
        # the report sits in `_report`, which the Hub upload skips (only student files are pushed)
        summary["report"] = write_report(os.path.join(args.output_dir, "_report"), rows, trainer.state.log_history)
        print(f"\nstudent, tokenizer and model card in {args.output_dir}; report in {summary['report'][0]}")
    if model_args.merge_adapters and hasattr(trainer.model, "merge_and_unload") and trainer.is_world_process_zero():
        merged_dir = os.path.join(args.output_dir, "merged")
        merged = trainer.model.merge_and_unload()
        merged.save_pretrained(merged_dir)
        tokenizer.save_pretrained(merged_dir)
        summary["merged"] = merged_dir
        print(f"student with merged adapters (a plain model) in {merged_dir}")
    if args.push_to_hub:
        with hub_errors(args, pushing=True):
            trainer.push_to_hub()
    return summary


def teacher_cache_for(path: str, tokenizer: Any, train: Any) -> Any:
    """The offline teacher cache at `path` as the training set (refused when made with another tokenizer); a warning
    when it was built from other training data than these data flags give (its own examples are what trains)."""
    cached = load_teacher_cache(path, tokenizer)
    made_from = (cache_manifest(cached) or {}).get("dataset_fingerprint")
    if made_from and made_from != getattr(train, "_fingerprint", None):
        logger.warning(
            "The teacher cache %s was built from other training data than these data flags give: training reads the "
            "cache's %d examples, evaluation the held-out split of these flags. Rebuild the cache with the same data "
            "flags and --seed to be sure they do not overlap.", path, len(cached),
        )
    return cached


def lora_config(model_args: ModelArguments):
    """The LoRA config of `--use_peft`: rank, alpha, dropout and target modules ("all-linear" by default)."""
    from peft import LoraConfig, TaskType

    task_type = {"sequence-classification": TaskType.SEQ_CLS, "regression": TaskType.SEQ_CLS,
                 "causal-lm": TaskType.CAUSAL_LM}.get(model_args.task)
    return LoraConfig(r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
                      target_modules=model_args.lora_target_modules or "all-linear", task_type=task_type)


def check_same_vocabulary(tokenizer: Any, student_source: str, trust_remote_code: bool) -> None:
    """A student with its own tokenizer must share the teacher's vocabulary (token -> id)."""
    try:
        student_tokenizer = AutoTokenizer.from_pretrained(resolve_source(student_source),
                                                          trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return  # the student ships no tokenizer: it is used with the teacher's
    if student_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError(
            f"The student {student_source!r} has a different vocabulary from the teacher's tokenizer: their logits "
            "would compare different tokens. Use a student that shares the teacher's tokenizer (or --student_layers)."
        )


def train_teacher_main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """``scripts/train_teacher.py`` / ``hf-distill train-teacher``: fine-tune `--teacher` (a backbone) on the task
    with the plain Trainer; saves model and tokenizer to `--output_dir`."""
    # DistillationConfig is a TrainingArguments: the recipes of `distill` work here too (their distillation fields are
    # simply unused by the plain Trainer)
    model_args, data_args, args = parse_distill_args(argv, prog="hf-distill train-teacher")
    check_one_run(args)
    check_model_arguments(model_args, args)
    resume = resume_checkpoint(args)
    move_earlier = check_output_dir(args.output_dir, resuming=resume is not None, overwrite=args.overwrite_output_dir)
    set_seed(args.seed)
    tokenizer, data = prepare_inputs(model_args, data_args, args, teacher_head_trained=False)
    model = load_model(model_args.teacher, model_args.task, data, model_args.teacher_gguf_file,
                       model_args.trust_remote_code)
    if move_earlier:
        move_aside_on_main(args)
    with hub_errors(args):
        trainer = Trainer(
            model=model, args=args, train_dataset=data.train, eval_dataset=data.eval, processing_class=tokenizer,
            data_collator=collator_for(model_args.task, tokenizer, args.seed),
            compute_metrics={"sequence-classification": accuracy_metrics,
                             "regression": regression_metrics}.get(model_args.task),
        )
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(args.output_dir, _internal_call=True)
    metrics = evaluate_model(model, trainer, model_args.task)
    if trainer.is_world_process_zero():
        print(f"teacher saved to {args.output_dir}; held-out " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    if args.push_to_hub:
        with hub_errors(args, pushing=True):
            trainer.push_to_hub()
    return metrics


def cache_teacher_main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``scripts/cache_teacher.py`` / ``hf-distill cache-teacher``: the teacher's top-k log-probabilities on the
    training split, tokenised and collated as `distill` does with the same flags (see `build_teacher_cache`); prints
    where the cache is, its size on disk and bytes per counted token."""
    model_args, data_args, cache_args = parse_distill_args(argv, (ModelArguments, DataArguments, CacheArguments),
                                                           prog="hf-distill cache-teacher")
    if cache_args.output_dir is None:
        raise ValueError("--output_dir is required: the folder the cache goes to.")
    if model_args.task == "masked-lm":
        raise ValueError("--task masked-lm cannot be cached: its collator masks other tokens every time, so the "
                         "counted positions change between caching and training. Use a live teacher.")
    tokenizer, data = prepare_inputs(model_args, data_args, cache_args)
    teacher = load_model(model_args.teacher, model_args.task, data, model_args.teacher_gguf_file,
                         model_args.trust_remote_code)
    teacher.to(cache_args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    path = build_teacher_cache(
        teacher, data.train, cache_args.output_dir, tokenizer=tokenizer, top_k=cache_args.top_k,
        temperature=cache_args.temperature, batch_size=cache_args.batch_size, shard_size=cache_args.shard_size,
        data_collator=collator_for(model_args.task, tokenizer, cache_args.seed), teacher_id=model_args.teacher,
    )
    cache = load_teacher_cache(path, tokenizer)
    sizes = cache_size(path, cache)
    positions, on_disk, teacher_bytes = sizes["counted_positions"], sizes["bytes_on_disk"], sizes["teacher_bytes"]
    summary = {"path": path, "examples": len(cache), "counted_positions": positions, "bytes_on_disk": on_disk,
               "bytes_per_position": on_disk / max(positions, 1),
               "teacher_bytes_per_position": teacher_bytes / max(positions, 1)}
    size = f"{on_disk / 1e6:.1f} MB" if on_disk >= 1e6 else f"{on_disk / 1e3:.1f} kB"
    print(f"teacher cache in {path}: {len(cache)} examples, {positions} counted tokens, {size} on disk = "
          f"{summary['bytes_per_position']:.0f} B per counted token (teacher columns "
          f"{summary['teacher_bytes_per_position']:.0f} B at top_k={cache_args.top_k})")
    return summary
