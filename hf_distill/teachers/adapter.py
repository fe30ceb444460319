"""Self-distillation: the PEFT student's own base model (its adapters disabled) is the teacher."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..signals import fields_where
from .live import LiveTeachers


class AdapterDisabledTeacher(nn.Module):
    """Self-distillation from the base model: the PEFT student itself with its adapters disabled, in eval mode, for
    the teacher's forward pass. One copy of the weights in memory.

    The student is held as a plain attribute, not a submodule, so that what the trainer does to "the teacher" (freeze,
    cast, move) never touches the student.
    """

    def __init__(self, peft_model: nn.Module) -> None:
        super().__init__()
        if not hasattr(peft_model, "disable_adapter"):
            raise TypeError("Self-distillation needs a PEFT student (a model with disable_adapter()).")
        object.__setattr__(self, "student", peft_model)

    @property
    def config(self):
        return self.student.config

    @property
    def device(self):
        return self.student.device

    def generate(self, *args, **kwargs):
        """``student.generate(...)`` with adapters disabled and dropout off (seq_kd: the base model writes)."""
        was_training = self.student.training
        self.student.eval()
        try:
            with self.student.disable_adapter():
                return self.student.generate(*args, **kwargs)
        finally:
            self.student.train(was_training)

    def forward(self, *args, **kwargs):
        """``student(...)`` with adapters disabled and dropout off; the student's train/eval mode is restored."""
        was_training = self.student.training
        self.student.eval()
        try:
            with self.student.disable_adapter():
                return self.student(*args, **kwargs)
        finally:
            self.student.train(was_training)


class SelfDistillation(LiveTeachers):
    """The teacher source of a PEFT student without a teacher: its base model, never frozen, cast or wrapped (it is
    the student). Serves the output, hidden-state and attention signals; those that need a teacher of their own
    (`Signal.needs_separate_teacher`) are refused."""

    def __init__(self, peft_model: nn.Module) -> None:
        super().__init__([AdapterDisabledTeacher(peft_model)])

    def prepare_model(self, teacher: nn.Module) -> nn.Module:
        return teacher  # the student itself: never frozen, cast or wrapped here

    def check_run(self, args: Any, active: dict[str, float], processing_class: Any = None) -> None:
        unsupported = fields_where(args, needs_separate_teacher=True)
        if unsupported:
            raise ValueError(
                f"Self-distillation (a PEFT student without a teacher) supports the output, hidden-state and "
                f"attention signals; {', '.join(unsupported)} need a separate teacher_model."
            )
