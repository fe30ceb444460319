"""What the quality benchmarks share: the machine description, held-out splits, seeds statistics, JSON output."""

from __future__ import annotations

import json
import os
import statistics
import sys
from typing import Any, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from bench_logits_loss import machine  # noqa: E402,F401  (re-exported for the quality benchmarks)

#: The headline file of issue 8; every benchmark merges its own part into it.
QUALITY_JSON = os.path.join(ROOT, "docs", "results", "quality.json")


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = list(values)
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def fmt(values: Sequence[float], scale: float = 100.0, digits: int = 2) -> str:
    """``mean +- std`` of `values` times `scale` (percentages by default)."""
    mean, std = mean_std(values)
    return f"{mean * scale:.{digits}f} +- {std * scale:.{digits}f}"


def merge_quality(section: str, name: str, entry: dict[str, Any], path: str = QUALITY_JSON) -> None:
    """Write `entry` at ``quality[section][name]`` in docs/results/quality.json, keeping the other entries."""
    data: dict[str, Any] = {}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    data.setdefault(section, {})[name] = entry
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    """The benchmark's full record (machine, settings, results) as JSON at `path` (when given)."""
    if not path:
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)


def perplexity(trainer: Any, dataset: Any) -> float:
    """exp(mean next-token CE over `dataset`), from a `DistillationTrainer`'s exact per-term evaluation (the task
    term is the CE)."""
    import math

    return math.exp(trainer.evaluate(eval_dataset=dataset)["eval_task_loss"])


def teacher_perplexity(teacher: Any, tokenizer: Any, collator: Any, folder: str, batch_size: int,
                       splits: dict[str, Any]) -> dict[str, float]:
    """The teacher's `perplexity` on each split (`splits`: name -> dataset), through a CE-only trainer."""
    from hf_distill import DistillationConfig, DistillationTrainer

    trainer = DistillationTrainer(
        model=teacher, args=DistillationConfig(output_dir=folder, report_to=[], use_cpu=True, task_weight=1.0,
                                               logits_weight=0.0, per_device_eval_batch_size=batch_size),
        data_collator=collator, processing_class=tokenizer)
    return {name: perplexity(trainer, dataset) for name, dataset in splits.items()}
