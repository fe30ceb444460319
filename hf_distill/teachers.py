"""Teachers beyond one live model: ensembles (combined soft targets) and checkpoint routes (RCO, Jin et al. 2019)."""

from __future__ import annotations

import json
import os
from typing import Callable, Sequence

import torch
from torch import nn


def combine_teacher_logits(
    logits: Sequence[torch.Tensor], mode: str, temperature: float, soft: bool = True
) -> torch.Tensor:
    """One set of teacher logits standing for an ensemble.

    ``mean_logits`` (and every non-soft comparison such as MSE): ``mean_k z_k``. ``mean_probs``: logits whose
    temperature-softened distribution is the mean of the teachers' ones, ``T * log(mean_k softmax(z_k / T))``, so that
    any divergence applying ``softmax(z / T)`` sees ``p = mean_k p_k``. One teacher is returned unchanged.
    """
    if len(logits) == 1:
        return logits[0]
    if mode == "mean_logits" or not soft:
        return torch.stack([z.float() for z in logits]).mean(dim=0)
    if mode != "mean_probs":
        raise ValueError(f"Unknown ensemble {mode!r}; choose mean_probs or mean_logits.")
    log_probs = torch.stack([torch.log_softmax(z.float() / temperature, dim=-1) for z in logits])
    return temperature * (torch.logsumexp(log_probs, dim=0) - torch.log(torch.tensor(float(len(logits)))))


def route_boundaries(num_anchors: int, total_steps: int, route_steps: Sequence[int] | None = None) -> list[int]:
    """The global step at which each anchor takes over: ``[0, s_1, ..., s_{K-1}]``; equal shares by default
    (anchor k from ``round(k * total_steps / K)``)."""
    if route_steps is not None:
        return [0, *[int(s) for s in route_steps]]
    return [round(k * total_steps / num_anchors) for k in range(num_anchors)]


def anchor_at(step: int, boundaries: Sequence[int]) -> int:
    """Index of the anchor teaching at global step `step` (0-based)."""
    return max(k for k, start in enumerate(boundaries) if step >= start)


def load_checkpoint_model(path: str, dtype: torch.dtype | None = None) -> nn.Module:
    """A transformers model from a checkpoint folder, with the class its config names (``architectures[0]``);
    no remote code."""
    import transformers

    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(
            f"Route anchor {path!r} has no config.json: teacher_route takes folders written by save_pretrained / "
            "Trainer checkpoints (or pass route_loader=... to DistillationTrainer)."
        )
    with open(config_file) as handle:
        architectures = json.load(handle).get("architectures") or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    if model_class is None:
        raise ValueError(
            f"Cannot tell which class to load route anchor {path!r} with (config architectures={architectures}); "
            "pass route_loader=... to DistillationTrainer."
        )
    kwargs = {"dtype": dtype} if dtype is not None else {}
    return model_class.from_pretrained(path, **kwargs)


class TeacherRoute:
    """The anchors of a route and which one is loaded; only one teacher is in memory at a time."""

    def __init__(self, paths: Sequence[str], loader: Callable[[str], nn.Module], route_steps: Sequence[int] | None):
        if not paths:
            raise ValueError("teacher_route is empty: give at least one checkpoint folder.")
        self.paths = list(paths)
        self.loader = loader
        self.route_steps = route_steps
        self.boundaries: list[int] | None = None
        self.planned_for: int | None = None  # the run length the boundaries were computed for
        self.current: int | None = None

    def plan(self, total_steps: int) -> None:
        """Fix the switching steps for a run of `total_steps` optimizer steps (once per run length)."""
        if self.planned_for != total_steps:
            self.boundaries = route_boundaries(len(self.paths), total_steps, self.route_steps)
            self.planned_for = total_steps

    def anchor_for(self, step: int) -> int:
        return anchor_at(step, self.boundaries) if self.boundaries else 0

    def load(self, index: int) -> nn.Module:
        self.current = index
        return self.loader(self.paths[index])


class AdapterDisabledTeacher(nn.Module):
    """Self-distillation from the base model: the PEFT student itself with its adapters disabled, in eval mode, for
    the teacher's forward pass. One copy of the weights in memory.

    The student is held as a plain attribute, not a submodule, so that what the trainer does to "the teacher" (freeze,
    cast, move) never touches the student.
    """

    is_self_distillation_teacher = True

    def __init__(self, peft_model: nn.Module) -> None:
        super().__init__()
        if not hasattr(peft_model, "disable_adapter"):
            raise TypeError("Self-distillation needs a PEFT student (a model with disable_adapter()).")
        object.__setattr__(self, "student", peft_model)

    @property
    def config(self):
        return self.student.config

    def forward(self, *args, **kwargs):
        """``student(...)`` with adapters disabled and dropout off; the student's train/eval mode is restored."""
        was_training = self.student.training
        self.student.eval()
        try:
            with self.student.disable_adapter():
                return self.student(*args, **kwargs)
        finally:
            self.student.train(was_training)
