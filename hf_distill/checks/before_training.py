"""Checks a run makes before its first step: output sizes of teacher and student, labels where a term needs them."""

from __future__ import annotations

import random
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from transformers.utils import logging

from ..modeling import declared_output_size, describe
from ..positions import PositionUnit

logger = logging.get_logger(__name__)


def check_output_sizes(student_size: int, teacher_size: int, unit: PositionUnit, vocab_mismatch: str,
                       teacher: nn.Module | None = None, student: nn.Module | None = None) -> None:
    """Teacher and student outputs must have the same width, unless language models truncate to the shared ids."""
    if student_size == teacher_size:
        return
    if vocab_mismatch == "truncate" and unit.is_token_level:
        return
    what = "vocabulary" if unit.is_token_level else "number of outputs"
    hint = (
        "If both tokenizers agree on the shared ids (a config vocabulary padded past the tokenizer, as Qwen's), set "
        "vocab_mismatch='truncate'; if the teacher has another tokenizer, pass it as teacher_processing_class=... "
        "(cross-tokenizer distillation, logits_loss='hybrid' or 'uld')."
        if unit.is_token_level
        else "Give the student the teacher's label set (num_labels / id2label)."
    )
    raise ValueError(
        f"Teacher and student output sizes differ: the teacher {describe(teacher)} has {teacher_size} ({what}), the "
        f"student {describe(student)} has {student_size}. {hint}"
    )


def check_declared_sizes(student: nn.Module, teachers: Sequence[nn.Module], unit: PositionUnit,
                         cached_size: Any, vocab_mismatch: str) -> None:
    """The output sizes the models' configs (and a teacher cache's manifest) declare, checked before training."""
    student_size = declared_output_size(student, unit)
    if student_size is not None and cached_size is not None and int(cached_size) != student_size:
        raise ValueError(
            f"The teacher cache was made by a teacher with {cached_size} outputs, the student "
            f"{describe(student)} has {student_size}: rebuild the cache with a teacher of the student's "
            "vocabulary (the same tokenizer)."
        )
    for teacher in teachers:
        teacher_size = declared_output_size(teacher, unit)
        if student_size is not None and teacher_size is not None:
            check_output_sizes(student_size, teacher_size, unit, vocab_mismatch, teacher, student)


def check_labels_available(dataset: Any, collate: Callable[[list], dict], select_columns: Callable[[Any], Any],
                           label_names: Sequence[str], needing: dict[str, float]) -> None:
    """With the task loss or a gradient signal on (`needing`, ``{weight_field: weight}``), a collated training batch
    must contain labels (checked on two examples; `select_columns` drops the columns the Trainer would)."""
    if not needing or dataset is None or isinstance(dataset, torch.utils.data.IterableDataset):
        return
    try:
        n = min(2, len(dataset))
    except TypeError:
        return
    if n == 0:
        return
    try:
        import datasets

        if isinstance(dataset, datasets.Dataset):
            sample = select_columns(dataset.select(range(n)))
            features = [sample[i] for i in range(n)]
        else:
            features = [dataset[i] for i in range(n)]
        with rng_untouched():
            batch = collate(features)
    except Exception as error:  # a collator that needs the real dataloader: checked at the first step instead
        logger.info("Could not collate a sample batch to check for labels (%s); checking at the first step.", error)
        return
    if not any(name in batch for name in (*label_names, "label", "label_ids")):
        named = ", ".join(f"{k}={v}" for k, v in needing.items())
        raise ValueError(
            f"{named} need(s) labels (the task loss, or the task-loss gradients the gradient signals compare), but "
            f"the training batches have no `{label_names[0]}` (batch keys: {sorted(batch.keys())}). Add a label "
            "column (or a collator that makes labels, e.g. DataCollatorForLanguageModeling), or set these weights "
            "to 0 to learn from the teacher alone."
        )


class rng_untouched:
    """Context manager restoring the Python, NumPy and torch (CPU) random states on exit."""

    def __enter__(self) -> None:
        self._states = (random.getstate(), np.random.get_state(), torch.get_rng_state())

    def __exit__(self, *exc: Any) -> None:
        python_state, numpy_state, torch_state = self._states
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)
