"""The command line's evaluation and report: metrics of teacher and student, speed, size, the summary table."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import (
    Trainer,
)
from transformers.utils import logging

from ..data.samples import samples_markdown
from ..signals.modules import ATTACHED_NAME
from ..teachers import AdapterDisabledTeacher

logger = logging.get_logger(__name__)


def accuracy_metrics(prediction) -> dict[str, float]:
    """Held-out accuracy from the Trainer's predictions (numpy; no Hub metric download)."""
    return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}


def regression_metrics(prediction) -> dict[str, float]:
    return {"mse": float(((prediction.predictions.reshape(-1) - prediction.label_ids.reshape(-1)) ** 2).mean())}


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, trainer: Trainer, task: str, name: str = "model") -> dict[str, float]:
    """The task metric of `model` (called `name` in the progress bar) on the trainer's evaluation set, computed the
    same way for teacher and student: accuracy, MSE, or perplexity = exp(mean token cross-entropy). Per-example sums
    are gathered across processes (without the padding duplicates of distributed sampling)."""
    model.eval()
    device = trainer.args.device
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of the per-example values, count)
    metric = {"sequence-classification": "accuracy", "regression": "MSE"}.get(task, "perplexity")
    bar = tqdm(trainer.get_eval_dataloader(), desc=f"Held-out {metric} of the {name}", unit="batch", leave=False,
               disable=trainer.args.disable_tqdm or not trainer.is_world_process_zero())
    for batch in bar:
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
def throughput(model: torch.nn.Module, batch: dict[str, torch.Tensor], repeats: int = 3, slow_s: float = 4.0) -> float:
    """Examples per second of `model` on one batch (after a warm-up pass), on the model's device: the mean of
    `repeats` timed passes, one where the warm-up took over `slow_s` seconds (a pass that long is timed well once; a
    1.5B teacher's 8 x 512-token batch on 2 CPU cores takes 2 minutes a pass, and 4 passes made a run's end wait 12)."""
    model.eval()
    start = time.perf_counter()
    model(**batch)
    if time.perf_counter() - start > slow_s:
        repeats = 1
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


class Significant:
    """A row format (``.format(value)``) with `digits` significant figures and no exponent: 0.52, 13, 1,200."""

    def __init__(self, digits: int = 2) -> None:
        self.digits = digits

    def format(self, value: float) -> str:
        if value == 0 or not math.isfinite(value):
            return f"{value:g}"
        decimals = self.digits - 1 - math.floor(math.log10(abs(value)))
        return f"{round(value, decimals):,.{max(decimals, 0)}f}"


SIGNIFICANT = Significant(2)

#: One line of the summary: label, teacher value, student value (None: unknown), display format (a format string, or
#: anything with ``.format(value)``).
Row = tuple[str, Any, Any, Any]


def displayed(rows: list[Row]) -> list[tuple[str, str, str]]:
    """The rows as text: each value in its row's format, "-" where unknown."""
    return [(n, *("-" if v is None else fmt.format(v) for v in (t, s))) for n, t, s, fmt in rows]


#: What runs log besides their terms (an on-policy run: `teachers.SampledCompletions.log_values`, a cross-tokenizer
#: one: `teachers.CrossTokenizerTeacher.log_values`), shown in the report: counters (on their own axes, log scale) and
#: shares in [0, 1] (their own axes too), so the loss curves keep a readable scale.
COUNTER_LOGS = ("tokens_per_second", "generated_tokens", "completion_length", "generation_seconds_per_step",
                "aligned_spans")
SHARE_LOGS = ("sampled_share", "span_share", "completion_distinct_2", "completion_repeated_4gram_share",
              "completion_capped_share", "completion_collapse")
SAMPLING_LOGS = COUNTER_LOGS + SHARE_LOGS


def write_report(folder: str, rows: list[Row], log_history: list[dict[str, Any]],
                 samples: list[dict[str, Any]] = ()) -> list[str]:
    """``folder/report.md`` (the summary table, the loss components and other logged values over steps, the
    evaluation curve, the held-out samples with their collapse checks) and, when matplotlib is installed,
    ``folder/report.png`` (loss components and the evaluation loss; counters and shares on their own axes; one
    teacher-vs-student bar pair per metric on its own scale). Returns the files written."""
    os.makedirs(folder, exist_ok=True)
    table = ["| | teacher | student |", "|---|---|---|"] + [f"| {n} | {t} | {s} |" for n, t, s in displayed(rows)]
    terms = sorted({k for row in log_history for k in row
                    if k.endswith("_loss") and not k.startswith(("eval_", "train_"))})
    logged = [k for k in SAMPLING_LOGS if any(k in row for row in log_history)]
    steps = [row for row in log_history if "loss" in row and "step" in row]
    evals = [(row["step"], row["eval_loss"]) for row in log_history if "eval_loss" in row and "step" in row]
    history = ["| step | loss | " + " | ".join(terms + logged) + " |", "|---" * (len(terms) + len(logged) + 2) + "|"]
    for row in steps:
        history.append(f"| {row['step']} | {row['loss']:.4f} | "
                       + " | ".join(f"{row[t]:.4g}" if t in row else "-" for t in terms + logged) + " |")
    text = "# Distillation report\n\n" + "\n".join(table) + "\n\n## Loss components\n\n" + "\n".join(history) + "\n"
    if evals:
        text += "\n## Evaluation\n\n| step | eval_loss |\n|---|---|\n" + "".join(f"| {a} | {b:.4f} |\n"
                                                                            for a, b in evals)
    collapsed = [row["step"] for row in log_history if row.get("completion_collapse")]
    flagged = [entry["step"] for entry in samples if entry.get("student_flags")]
    if collapsed or flagged:
        text += ("\n## Collapse\n\n" + (f"- the student's on-policy samples were flagged at the logs of steps "
                                          f"{collapsed}\n" if collapsed else "")
                 + (f"- its held-out samples were flagged at steps {flagged}\n" if flagged else ""))
    for entry in samples:
        text += f"\n## Held-out samples at step {entry['step']} (greedy)\n\n{samples_markdown(entry)}\n"
    written = [os.path.join(folder, "report.md")]
    Path(written[0]).write_text(text)
    picture = _report_figure(rows, log_history, terms, logged, evals, os.path.join(folder, "report.png"))
    return written + ([picture] if picture else [])


def _report_figure(rows: list[Row], log_history: list[dict[str, Any]], terms: list[str], logged: list[str],
                   evals: list[tuple[int, float]], path: str) -> str | None:
    """``report.png``: the loss components with the evaluation loss, counters and shares on their own axes, and one
    teacher-vs-student bar pair per numeric row (log scale where they differ 20x); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = [("training loss components", ["loss", *terms], "linear")]
    panels += [(title, keys, scale) for title, keys, scale in (
        ("counters", [k for k in COUNTER_LOGS if k in logged], "log"),
        ("shares and sample statistics", [k for k in SHARE_LOGS if k in logged], "linear")) if keys]
    numeric = [(n, float(t), float(s)) for n, t, s, _ in rows
               if isinstance(t, (int, float)) and isinstance(s, (int, float))]  # (not "weights dtype")
    columns = max(len(panels), len(numeric), 1)
    figure = plt.figure(figsize=(max(11, 2.6 * columns), 8 if numeric else 4))
    grid = figure.add_gridspec(2 if numeric else 1, 1)
    top = grid[0].subgridspec(1, len(panels))
    for i, (title, keys, scale) in enumerate(panels):
        axis = figure.add_subplot(top[0, i])
        for key in keys:
            points = [(row["step"], row[key]) for row in log_history if key in row and "step" in row]
            if points:
                axis.plot(*zip(*points), label=key, marker="." if len(points) < 3 else None)
        if i == 0 and evals:
            axis.plot(*zip(*evals), label="eval_loss", linestyle="--", marker="o")
        axis.set_xlabel("step"), axis.set_title(title), axis.set_yscale(scale)
        if axis.lines:
            axis.legend(fontsize=7)
    if numeric:
        bottom = grid[1].subgridspec(1, len(numeric))
        for i, (name, teacher_value, student_value) in enumerate(numeric):
            axis = figure.add_subplot(bottom[0, i])
            bars = axis.bar([0, 1], [teacher_value, student_value], color=["tab:blue", "tab:orange"])
            axis.bar_label(bars, [SIGNIFICANT.format(v) for v in (teacher_value, student_value)], fontsize=8)
            axis.set_xticks([0, 1], ["teacher", "student"]), axis.set_title(name, fontsize=8)
            low, high = sorted(abs(v) for v in (teacher_value, student_value))
            if low > 0 and high / low > 20:  # (perplexity 2.3 vs 2,900: a linear axis would hide the teacher)
                axis.set_yscale("log"), axis.set_ylim(low / 4, high * 3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
