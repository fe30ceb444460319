"""Checks that keep a run from ending "successfully" with a wrong or broken student: processes that are not one run,
class labels the student cannot have, non-finite losses and gradients during training, non-finite weights at save."""

from __future__ import annotations

import os
from typing import Any, Iterable

import torch
from torch import nn
from transformers.utils import logging

from ..modeling import unwrap

logger = logging.get_logger(__name__)


class NonFiniteLossError(FloatingPointError):
    """A training step's loss, one of its terms, or its gradient norm was NaN or infinite."""


def check_one_run(args: Any) -> None:
    """Refuse several processes that are not one run: `torch.distributed` initialised with more than one process
    (as ``accelerate launch --multi_gpu`` does) while the training arguments see one (``world_size == 1``). Each
    process would train alone on all the data and write the same `output_dir`."""
    import torch.distributed as dist

    launched = dist.get_world_size() if dist.is_available() and dist.is_initialized() else int(
        os.environ.get("WORLD_SIZE", "1") or 1)
    if launched > 1 and args.world_size == 1:
        fix = ("pass --use_cpu true (TrainingArguments(use_cpu=True)) so that transformers joins the processes into one "
               "run" if not torch.cuda.is_available() else "check that every process sees its GPU")
        raise ValueError(
            f"{launched} processes were launched, but the training arguments see only this one (world_size 1): each "
            f"would train on its own and all would write {args.output_dir!r}. On a machine without GPUs {fix}, or "
            "launch one process."
        )


def classification_labels(model: nn.Module) -> int | None:
    """The number of classes of a single-label sequence classifier (transformers config), else None."""
    base = unwrap(model)
    config = getattr(base, "config", None)
    names = [*(getattr(config, "architectures", None) or []), type(base).__name__]
    if config is None or not any("SequenceClassification" in name for name in names):
        return None
    if getattr(config, "problem_type", None) not in (None, "single_label_classification"):
        return None
    return int(config.num_labels) if int(getattr(config, "num_labels", 0)) > 1 else None


def check_label_values(dataset: Any, model: nn.Module, label_names: Iterable[str]) -> None:
    """For a single-label sequence classifier with `num_labels` classes, the dataset's label column must hold integer
    class ids in ``[0, num_labels)`` (-100: ignored): float labels would be truncated, others fail at some later step
    (an `IndexError`) or never, if unsampled. Reads the column's type and range in Arrow (the rows the dataset holds,
    after any `select` / `filter`; no copy without those)."""
    import datasets

    num_labels = classification_labels(model)
    if num_labels is None or not isinstance(dataset, datasets.Dataset):
        return
    column = next((name for name in (*label_names, "label", "label_ids") if name in dataset.column_names), None)
    if column is None:
        return
    import pyarrow as pa
    import pyarrow.compute as pc

    values = dataset.with_format("arrow")[column]
    if pa.types.is_floating(values.type):
        raise ValueError(
            f"The training set's `{column}` column holds floats ({values.type}), but the student is a classifier with "
            f"{num_labels} classes: class ids must be integers 0..{num_labels - 1} (floats would be truncated). Cast "
            "the column to int, or for numeric targets use a regression head (num_labels=1, problem_type='regression')."
        )
    if not pa.types.is_integer(values.type):
        return
    counted = pc.filter(values, pc.not_equal(values, -100)) if len(values) else values
    if not len(counted):
        return
    low, high = (v.as_py() for v in pc.min_max(counted).values())
    if low is None:
        return
    if low < 0 or high >= num_labels:
        bad = sorted({v for v in counted.to_pylist() if v is not None and not 0 <= v < num_labels})
        raise ValueError(
            f"The training set's `{column}` column holds labels {bad[:10]} outside [0, {num_labels}): the student "
            f"classifies into {num_labels} classes (config.num_labels). Map the labels to 0..{num_labels - 1}, or give "
            "student and teacher the data's label set."
        )


class NonFiniteGuard:
    """Watches every micro-batch's loss terms and each optimizer step's gradient norm.

    `record(terms)` ORs ``not isfinite`` per term into flags (no synchronisation); `check(norm, step)` once per
    optimizer step gathers the flags of every process (so all decide alike, and none hangs), and when anything is
    non-finite either raises `NonFiniteLossError` naming the step, the terms and the processes (`mode="error"`), or
    returns True so that the caller drops the update (`mode="skip_step"`).
    """

    def __init__(self, term_names: Iterable[str], mode: str, gather) -> None:
        self.names = ("loss", *term_names)
        self.mode = mode
        self.gather = gather
        self.skipped = 0
        self._flags: torch.Tensor | None = None

    def record(self, loss: torch.Tensor, sums: dict[str, torch.Tensor]) -> None:
        values = {"loss": loss, **sums}
        flags = torch.stack([
            ~torch.isfinite(values[name].detach()).all() if name in values else torch.tensor(False, device=loss.device)
            for name in self.names
        ])
        self._flags = flags if self._flags is None else self._flags | flags.to(self._flags.device)

    def check(self, grad_norm: Any, step: int, device: torch.device) -> bool:
        """True when this step must be skipped (raises in mode "error"); resets the flags."""
        flags = self._flags if self._flags is not None else torch.zeros(len(self.names), dtype=torch.bool,
                                                                         device=device)
        self._flags = None
        norm = torch.as_tensor(grad_norm if grad_norm is not None else 0.0, dtype=torch.float32, device=flags.device)
        row = torch.cat([flags.float(), (~torch.isfinite(norm)).float().reshape(1)]).reshape(1, -1)
        every = self.gather(row).reshape(-1, row.shape[-1])
        if not bool(every.any()):
            return False
        terms = [name for i, name in enumerate(self.names)
                 if name != "loss" and bool(every[:, i].any())]
        losses = every[:, :-1]  # where the loss went non-finite (the gradient norm is shared once gradients are reduced)
        ranks = [r for r in range(every.shape[0]) if bool((losses if bool(losses.any()) else every)[r].any())]
        what = (f"the term(s) {', '.join(terms)}" if terms else
                "the total loss" if bool(every[:, 0].any()) else "the gradient norm (every loss term was finite)")
        where = f" on process(es) {ranks}" if every.shape[0] > 1 else ""
        message = (f"Training step {step}: {what} went non-finite (NaN or inf){where}. The optimizer did not apply "
                   "this step, so the student holds the weights of the step before.")
        if self.mode == "skip_step":
            self.skipped += 1
            logger.warning("%s Skipping it (on_nonfinite='skip_step'; %d skipped so far).", message, self.skipped)
            return True
        raise NonFiniteLossError(
            message + " Common causes: a too large learning rate or loss weight, a teacher or data yielding NaN, fp16 "
            "overflow. Set on_nonfinite='skip_step' to drop such steps and train on."
        )


def drop_gradients(parameters: Iterable[nn.Parameter]) -> None:
    """Set every gradient to None, so that the optimizer leaves these parameters (and their state) as they are."""
    for parameter in parameters:
        parameter.grad = None


def check_finite_weights(state: dict[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], where: str) -> None:
    """Refuse to write a model whose floating-point tensors hold NaN or inf."""
    items = state.items() if isinstance(state, dict) else state
    bad = [name for name, tensor in items
           if torch.is_tensor(tensor) and tensor.is_floating_point() and tensor.numel()
           and not bool(torch.isfinite(tensor).all())]
    if bad:
        raise NonFiniteLossError(
            f"Not saving the student to {where}: {len(bad)} of its tensors hold NaN or inf ({', '.join(bad[:5])}"
            f"{', ...' if len(bad) > 5 else ''}). A broken student is never written; earlier checkpoints are intact."
        )
