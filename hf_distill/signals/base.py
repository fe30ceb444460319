"""The tiny interface every distillation signal implements, and the view of a batch that signals read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch


@dataclass
class SignalView:
    """What one batch offers to the signals.

    Attributes:
        student_logits: student outputs, ``[B, C]`` or ``[B, T, V]``, already cut to the shared vocabulary.
        teacher_logits: teacher outputs of the same shape (no grad), or `None` when no signal needs the teacher.
        mask: bool tensor of shape ``student_logits.shape[:-1]``: the positions that count (for causal LMs position t
            counts when the label of t + 1 is not -100).
        inputs: the batch as the trainer received it.
        student_outputs / teacher_outputs: the raw model outputs (for signals that need more than logits).
    """

    student_logits: torch.Tensor
    teacher_logits: torch.Tensor | None
    mask: torch.Tensor
    inputs: Mapping[str, Any]
    student_outputs: Any = None
    teacher_outputs: Any = None
    _counted: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def counted_logits(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Student and teacher logits at the counted positions only, each ``[N, V]`` (computed once per batch)."""
        if self.teacher_logits is None:
            raise ValueError("This signal needs teacher outputs, but no teacher ran on this batch.")
        if self._counted is None:
            self._counted = (self.student_logits[self.mask], self.teacher_logits[self.mask])
        return self._counted


class Signal:
    """One term of the combined loss. Subclasses set `name` and implement `loss_sum`.

    `loss_sum` returns the *sum* of the term over the counted positions of the batch; the trainer divides by the
    number of positions that count in the whole accumulated (and, in distributed runs, global) batch, which makes
    gradient accumulation and multi-device training exact. The term is logged as ``<name>_loss``.
    """

    name: str = "signal"
    #: whether the teacher must run for this signal
    needs_teacher: bool = True

    def loss_sum(self, view: SignalView) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError
