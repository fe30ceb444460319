"""The command line's evaluation and report: metrics of teacher and student, speed, size, the summary table."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import (
    Trainer,
)
from transformers.utils import logging

from ..signal_modules import ATTACHED_NAME
from ..teachers import AdapterDisabledTeacher

logger = logging.get_logger(__name__)


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
        batch = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}  # (not a teacher's prompt lists)
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
    if isinstance(model, AdapterDisabledTeacher):
        return sum(p.numel() for n, p in model.student.named_parameters() if "lora_" not in n)
    return sum(getattr(p, "ds_numel", p.numel()) for n, p in model.named_parameters()
               if ATTACHED_NAME not in n.split("."))


def weights_dtype(model) -> str | None:
    """The dtype of a model's floating-point weights (a self-distillation teacher: its base model's), e.g. "float32";
    None without any."""
    model = model.student if isinstance(model, AdapterDisabledTeacher) else model
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.is_floating_point()})
    return " + ".join(dtypes) if dtypes else None


#: One line of the summary: label, teacher value, student value (None: unknown), display format.
Row = tuple[str, Any, Any, str]


def displayed(rows: list[Row]) -> list[tuple[str, str, str]]:
    """The rows as text: each value in its row's format, "-" where unknown."""
    return [(n, *("-" if v is None else fmt.format(v) for v in (t, s))) for n, t, s, fmt in rows]


#: What an on-policy run (`teachers.SampledCompletions.log_values`) and a cross-tokenizer run
#: (`teachers.CrossTokenizerTeacher.log_values`) log besides their terms, shown in the report.
SAMPLING_LOGS = ("generated_tokens", "completion_length", "sampled_share", "generation_seconds_per_step",
                 "aligned_spans", "span_share")


def write_report(folder: str, rows: list[Row], log_history: list[dict[str, Any]]) -> list[str]:
    """``folder/report.md`` (the summary table and the loss components over steps) and, when matplotlib is
    installed, ``folder/report.png`` (loss components over steps; teacher vs student bars). Returns written files."""
    os.makedirs(folder, exist_ok=True)
    table = ["| | teacher | student |", "|---|---|---|"] + [f"| {n} | {t} | {s} |" for n, t, s in displayed(rows)]
    terms = sorted({k for row in log_history for k in row
                    if k.endswith("_loss") and not k.startswith(("eval_", "train_"))})
    terms += [k for k in SAMPLING_LOGS if any(k in row for row in log_history)]  # on-policy / cross-tokenizer
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
    numeric = [(n, t, s) for n, t, s, _ in rows
               if isinstance(t, (int, float)) and isinstance(s, (int, float))]  # (not "weights dtype")
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
