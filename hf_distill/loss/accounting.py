"""Accounting: how many positions (`positions`: tokens, examples) count in a micro-batch and in a whole optimizer
step, and the means every logged and evaluated term is divided by.

Each term is a sum over what it counts in a micro-batch, divided by the number that count in the whole optimizer
step (all accumulated micro-batches, all processes with global counts): ``L = sum_k w_k * S_k / N_k``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from ..positions import (
    IGNORE_INDEX,
    PositionUnit,
    batch_size_of,
    infer_position_unit,
    position_mask,
    token_mask,
)


@dataclass
class BatchCounts:
    """What counts in one micro-batch: its position unit, the counted positions (``mask``), those of them with a label
    (``labelled``: the task loss's positions), the counted tokens of the token-level signals (``tokens``, when one is
    active) and the count per unit in use."""

    unit: PositionUnit
    mask: torch.Tensor
    tokens: torch.Tensor | None
    counts: dict[str, torch.Tensor]
    labelled: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.labelled is None:
            self.labelled = self.mask


def labelled_mask(inputs: Mapping[str, Any], unit: PositionUnit, mask: torch.Tensor,
                  label_name: str = "labels") -> torch.Tensor:
    """The counted positions that carry a label. Token-level units count labelled tokens already (``mask``);
    examples with an integer label of -100 are unlabelled (a transfer set's rows: soft targets only), so the task loss
    is ``sum over labelled rows / number of labelled rows`` while the teacher's terms count every row."""
    labels = inputs.get(label_name)
    if unit is PositionUnit.EXAMPLE and torch.is_tensor(labels) and labels.dim() == 1 and not labels.is_floating_point():
        return labels != IGNORE_INDEX
    return mask


class Accounting:
    """The counts and denominators of one run.

    Args:
        units: the term units in use ("positions" always; "labelled" for the task loss; "tokens" / "examples" when a
            signal counts those).
        model_unit: the student's position unit (`infer_position_unit`); EXAMPLE models are re-read per batch.
        label_name: the batch key of the targets.
        gather: the accelerator's gather (all processes' values, stacked).
        global_counts: whether step counts are summed over processes (`average_tokens_across_devices` with more than
            one process); the loss is then multiplied by `num_processes`, undoing DDP's gradient averaging.
    """

    def __init__(self, units: Sequence[str], model_unit: PositionUnit, label_name: str,
                 gather: Callable[[torch.Tensor], torch.Tensor], global_counts: bool, num_processes: int) -> None:
        self.units = ("positions", *sorted(set(units) - {"positions"}))
        self.model_unit = model_unit
        self.label_name = label_name
        self.gather = gather
        self.global_counts = global_counts
        self.num_processes = num_processes
        self.step_counts: dict[str, torch.Tensor] | None = None

    def position_unit(self, inputs: Mapping[str, Any]) -> PositionUnit:
        if self.model_unit is not PositionUnit.EXAMPLE:
            return self.model_unit
        return infer_position_unit(None, inputs, self.label_name)

    def measure(self, inputs: Mapping[str, Any]) -> BatchCounts:
        """The counted positions (and tokens) of a batch and what each unit in use counts there."""
        unit = self.position_unit(inputs)
        mask = position_mask(inputs, unit, self.label_name)
        tokens = token_mask(inputs) if "tokens" in self.units else None
        labelled = labelled_mask(inputs, unit, mask, self.label_name)
        counts = {"positions": mask.sum()}
        if "labelled" in self.units:
            counts["labelled"] = counts["positions"] if labelled is mask else labelled.sum()
        if tokens is not None:
            counts["tokens"] = tokens.sum()
        if "examples" in self.units:
            counts["examples"] = torch.tensor(batch_size_of(inputs), device=mask.device)
        return BatchCounts(unit, mask, tokens, counts, labelled)

    def count_step(self, batches: Sequence[Mapping[str, Any]], device: torch.device) -> dict[str, torch.Tensor]:
        """What counts in all micro-batches of one optimizer step (summed over processes with global counts); kept
        as `step_counts` for the denominators of the step's micro-batches."""
        per_batch = [self.measure(batch).counts for batch in batches]
        totals = torch.stack([sum(c[unit].to(device) for c in per_batch) for unit in self.units])
        if self.global_counts:
            totals = self.gather(totals.reshape(1, -1)).sum(dim=0)
        self.step_counts = dict(zip(self.units, totals.unbind()))
        return self.step_counts

    def inverse_counts(self, counts: dict[str, torch.Tensor],
                       num_items_in_batch: Any = None) -> dict[str, torch.Tensor]:
        """1 / denominator per unit: the whole step's count when the Trainer passes `num_items_in_batch` (ours, from
        `count_step`), else this batch's own count; times the number of processes for global counts."""
        step: dict[str, Any] = {}
        if num_items_in_batch is not None:
            ours = self.step_counts
            step = dict(ours) if ours is not None and ours.get("positions") is num_items_in_batch else {
                "positions": num_items_in_batch
            }
        inverse = {}
        for unit, local in counts.items():
            denominator = step.get(unit, local)
            denominator = torch.as_tensor(denominator, dtype=torch.float32, device=local.device).clamp_min(1)
            scale = 1.0 / denominator
            if unit in step and self.global_counts:
                scale = scale * self.num_processes
            inverse[unit] = scale
        return inverse


class TermLog:
    """Per-term training losses (each term's contribution ``S_k / N_k`` to the step loss), averaged over the optimizer
    steps since the last log and over processes, logged as ``<term>_loss``; plus values signals report per step."""

    def __init__(self, gather: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.gather = gather
        self.reset(0)

    def reset(self, step: int) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.step_values: dict[str, list[float]] = {}
        self.since = step
        self.tokens, self.started = 0, time.perf_counter()

    def add_tokens(self, batches: Sequence[Mapping[str, Any]]) -> None:
        """Count the input tokens (attention mask 1) of a step's micro-batches, for ``tokens_per_second``."""
        for batch in batches:
            mask = batch.get("attention_mask", batch.get("input_ids"))
            if torch.is_tensor(mask):
                self.tokens += int(mask.sum()) if "attention_mask" in batch else mask.numel()

    def add(self, sums: dict[str, torch.Tensor], inverse_counts: dict[str, torch.Tensor],
            units: dict[str, str]) -> None:
        for name, value in sums.items():
            scaled = (value.detach() * inverse_counts[units[name]]).float()
            self.sums[name] = self.sums.get(name, 0.0) + scaled

    def add_step_values(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.step_values.setdefault(key, []).append(value)

    def flush(self, logs: dict[str, float], step: int) -> None:
        """Write the averages into `logs` (and ``tokens_per_second``: input tokens of all processes over the
        interval's wall-clock time) and start a new interval at `step`."""
        steps = max(step - self.since, 1)
        tokens = self.gather(torch.tensor([float(self.tokens)], device=self._device())).sum().item()  # (every process)
        if tokens:
            logs["tokens_per_second"] = tokens / max(time.perf_counter() - self.started, 1e-9)
        for name, total in self.sums.items():
            logs[f"{name}_loss"] = self.gather(total.detach().reshape(1)).mean().item() / steps
        for key, values in self.step_values.items():
            logs[key] = sum(values) / len(values)
        self.reset(step)


    def _device(self) -> torch.device:
        return next((t.device for t in self.sums.values() if torch.is_tensor(t)), torch.device("cpu"))


class EvalTotals:
    """Exact evaluation means: per-term sums and counts over the whole evaluation set, gathered across processes,
    reported as ``<prefix>_<term>_loss = sum S_k / sum N_k`` and ``<prefix>_teacher_agreement``."""

    def __init__(self) -> None:
        self.totals: dict[str, torch.Tensor] = {}

    def _add(self, key: str, value: torch.Tensor, device: torch.device) -> None:
        zero = torch.zeros((), dtype=torch.float64, device=device)
        self.totals[key] = self.totals.get(key, zero) + value.double()

    def add(self, counts: dict[str, torch.Tensor], sums: dict[str, torch.Tensor], agreement: torch.Tensor | None):
        device = counts["positions"].device
        for unit, count in counts.items():
            self._add(f"count:{unit}", count, device)
        for name, value in sums.items():
            self._add(f"{name}_loss", value.detach(), device)
        if agreement is not None:
            self._add("teacher_agreement", agreement, device)

    def metrics(self, prefix: str, units: dict[str, str], gather: Callable[[torch.Tensor], torch.Tensor]):
        """The means, gathered over processes (every process must call this)."""
        if not self.totals:
            return {}
        keys = sorted(self.totals)
        values = torch.stack([self.totals[k] for k in keys]).reshape(1, -1)
        reduced = dict(zip(keys, gather(values).sum(dim=0).tolist()))
        counts = {key.split(":", 1)[1]: max(reduced.pop(key), 1.0) for key in keys if key.startswith("count:")}
        metrics = {}
        for key, value in reduced.items():
            term = key[: -len("_loss")] if key.endswith("_loss") else None
            metrics[f"{prefix}_{key}"] = value / counts[units.get(term, "positions")]
        return metrics
