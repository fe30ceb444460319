"""Accounting: which output positions (tokens, examples) count, how many count in a whole optimizer step, and the
means every logged and evaluated term is divided by.

A *position* is one row of the output: an example for classification and regression, a token for masked LMs and
token classification, and for causal LMs the token whose *next* label is supervised (position t predicts t + 1).
Each term is a sum over what it counts in a micro-batch, divided by the number that count in the whole optimizer
step (all accumulated micro-batches, all processes with global counts): ``L = sum_k w_k * S_k / N_k``.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from ..modeling import unwrap

#: The label of a position that does not count (transformers' and PyTorch's ``ignore_index``).
IGNORE_INDEX = -100


class PositionUnit(str, enum.Enum):
    """How rows of the output are counted."""

    EXAMPLE = "example"  #: one position per example (sequence classification, regression, plain modules)
    TOKEN = "token"  #: one per token whose label != -100 (masked LM, token classification)
    NEXT_TOKEN = "next_token"  #: causal LM: position t counts when label[t + 1] != -100

    @property
    def is_token_level(self) -> bool:
        return self is not PositionUnit.EXAMPLE


def batch_size_of(inputs: Mapping[str, Any]) -> int:
    """The leading dimension of the first tensor in the batch."""
    for value in inputs.values():
        if torch.is_tensor(value) and value.dim() > 0:
            return int(value.shape[0])
    raise ValueError(f"Cannot tell the batch size: the batch has no tensor (keys: {sorted(inputs)}).")


def align_labels(labels: torch.Tensor, unit: PositionUnit) -> torch.Tensor:
    """Labels aligned with output positions: for causal LMs ``aligned[:, t] = labels[:, t + 1]`` (last = -100)."""
    if unit is not PositionUnit.NEXT_TOKEN:
        return labels
    aligned = torch.full_like(labels, IGNORE_INDEX)
    aligned[:, :-1] = labels[:, 1:]
    return aligned


def _token_grid(inputs: Mapping[str, Any]) -> torch.Tensor:
    """All-true mask over the token grid when nothing says which tokens are padding."""
    for key in ("input_ids", "inputs_embeds"):
        value = inputs.get(key)
        if torch.is_tensor(value):
            return torch.ones(value.shape[:2], dtype=torch.bool, device=value.device)
    raise ValueError(
        "Token-level distillation needs `labels`, `attention_mask` or `input_ids` in the batch to know which tokens "
        f"count; got keys {sorted(inputs)}."
    )


def position_mask(inputs: Mapping[str, Any], unit: PositionUnit, label_name: str = "labels") -> torch.Tensor:
    """Bool mask of the positions that count, shaped like the outputs without their last dimension.

    Examples: all true ``[B]``. Tokens: ``labels != -100`` when labels are present, else the attention mask
    (else every token). Causal LMs: ``labels[:, t + 1] != -100`` at t (the last position never counts), else the
    attention mask.
    """
    labels = inputs.get(label_name)
    if unit is PositionUnit.EXAMPLE:
        size = int(labels.shape[0]) if torch.is_tensor(labels) else batch_size_of(inputs)
        device = labels.device if torch.is_tensor(labels) else None
        return torch.ones(size, dtype=torch.bool, device=device)
    if torch.is_tensor(labels):
        return align_labels(labels, unit) != IGNORE_INDEX
    return token_mask(inputs)


def token_mask(inputs: Mapping[str, Any]) -> torch.Tensor:
    """Bool ``[B, T]`` mask of the tokens that count for token-level signals (hidden states, attention maps):
    ``attention_mask != 0``, else every token of ``input_ids`` / ``inputs_embeds``. Padding never counts."""
    attention_mask = inputs.get("attention_mask")
    if torch.is_tensor(attention_mask) and attention_mask.dim() == 2:
        return attention_mask.bool()
    return _token_grid(inputs)


def count_positions(inputs: Mapping[str, Any], unit: PositionUnit, label_name: str = "labels") -> torch.Tensor:
    """Number of positions that count in the batch (a 0-dim int64 tensor): ``position_mask(...).sum()``."""
    return position_mask(inputs, unit, label_name).sum()


def infer_position_unit(model: torch.nn.Module | None, inputs: Mapping[str, Any] | None = None,
                        label_name: str = "labels") -> PositionUnit:
    """The position unit of a student: causal LMs -> NEXT_TOKEN; masked LM / token classification -> TOKEN;
    otherwise TOKEN when the batch's labels are integer and per-token (2-D or more), else EXAMPLE."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
    )

    if model is not None:
        base = unwrap(model)
        name = type(base).__name__
        if name in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()) or getattr(base, "loss_type", None) == "ForCausalLM":
            return PositionUnit.NEXT_TOKEN
        token_models = set(MODEL_FOR_MASKED_LM_MAPPING_NAMES.values()) | set(
            MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES.values()
        )
        if name in token_models:
            return PositionUnit.TOKEN
    labels = inputs.get(label_name) if inputs is not None else None
    if torch.is_tensor(labels) and labels.dim() >= 2 and not torch.is_floating_point(labels):
        return PositionUnit.TOKEN
    return PositionUnit.EXAMPLE


@dataclass
class Measure:
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

    def measure(self, inputs: Mapping[str, Any]) -> Measure:
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
        return Measure(unit, mask, tokens, counts, labelled)

    def count_step(self, batches: Sequence[Mapping[str, Any]], device: torch.device) -> dict[str, torch.Tensor]:
        """What counts in all micro-batches of one optimizer step (summed over processes with global counts); kept
        as `step_counts` for the denominators of the step's micro-batches."""
        per_batch = [self.measure(batch).counts for batch in batches]
        totals = torch.stack([sum(c[unit].to(device) for c in per_batch) for unit in self.units])
        if self.global_counts:
            totals = self.gather(totals.reshape(1, -1)).sum(dim=0)
        self.step_counts = dict(zip(self.units, totals.unbind()))
        return self.step_counts

    def scales(self, counts: dict[str, torch.Tensor], num_items_in_batch: Any = None) -> dict[str, torch.Tensor]:
        """1 / denominator per unit: the whole step's count when the Trainer passes `num_items_in_batch` (ours, from
        `count_step`), else this batch's own count; times the number of processes for global counts."""
        step: dict[str, Any] = {}
        if num_items_in_batch is not None:
            ours = self.step_counts
            step = dict(ours) if ours is not None and ours.get("positions") is num_items_in_batch else {
                "positions": num_items_in_batch
            }
        scales = {}
        for unit, local in counts.items():
            denominator = step.get(unit, local)
            denominator = torch.as_tensor(denominator, dtype=torch.float32, device=local.device).clamp_min(1)
            scale = 1.0 / denominator
            if unit in step and self.global_counts:
                scale = scale * self.num_processes
            scales[unit] = scale
        return scales


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

    def add(self, sums: dict[str, torch.Tensor], scales: dict[str, torch.Tensor], units: dict[str, str]) -> None:
        for name, value in sums.items():
            scaled = (value.detach() * scales[units[name]]).float()
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
