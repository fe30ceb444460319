"""Teacher sources: where the teacher outputs of a batch come from (`TeacherSource`), and `teacher_source`, which
picks one from what the trainer was given.

- `LiveTeachers`: one frozen model, or an ensemble;
- `RouteTeachers`: checkpoint routes (RCO), one anchor in memory at a time;
- `SelfDistillation`: a PEFT student's base model with its adapters disabled;
- `CachedTeacher`: an offline top-k cache carried by the training set;
- `CrossTokenizerTeacher`: wraps a live source whose teacher has another tokenizer (aligned spans of the text);
- `SampledCompletions`: wraps one of these for on-policy distillation (the student's own samples, lmbda) and seq_kd;
- `NoTeacher`: the task loss alone.
A new kind of teacher is one `TeacherSource` subclass, passed as ``DistillationTrainer(teacher_source=...)``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from torch import nn
from transformers.utils import logging

from ..data.teacher_cache import cache_manifest
from ..signals import fields_where
from .adapter import AdapterDisabledTeacher, SelfDistillation
from .base import NoTeacher, TeacherHeads, TeacherLogits, TeacherOutputs, TeacherRequest, TeacherSource
from .cached import CachedTeacher
from .cross import CrossTokenizerTeacher, cross_tokenizer_source
from .live import LiveTeachers, combine_teacher_logits
from .route import (
    RouteTeachers,
    TeacherRoute,
    anchor_at,
    load_checkpoint_model,
    route_boundaries,
)
from .sampled import SampledCompletions, SamplingSettings, on_policy_source

logger = logging.get_logger(__name__)

__all__ = [
    "AdapterDisabledTeacher",
    "CachedTeacher",
    "CrossTokenizerTeacher",
    "LiveTeachers",
    "NoTeacher",
    "RouteTeachers",
    "SampledCompletions",
    "SamplingSettings",
    "SelfDistillation",
    "TeacherHeads",
    "TeacherLogits",
    "TeacherOutputs",
    "TeacherRequest",
    "TeacherRoute",
    "TeacherSource",
    "anchor_at",
    "combine_teacher_logits",
    "cross_tokenizer_source",
    "load_checkpoint_model",
    "checked_source",
    "on_policy_source",
    "route_boundaries",
    "run_teacher_source",
    "teacher_source",
]


def _as_teacher_list(teacher_model: Any) -> list[nn.Module]:
    if teacher_model is None:
        return []
    teachers = list(teacher_model) if isinstance(teacher_model, (list, tuple)) else [teacher_model]
    for teacher in teachers:
        if not isinstance(teacher, nn.Module):
            raise TypeError(
                f"teacher_model must be an nn.Module or a list of them (load each with AutoModel*.from_pretrained), "
                f"got {type(teacher).__name__}."
            )
    if not teachers:
        raise ValueError("teacher_model=[] holds no teacher: pass at least one, or None to train on the task alone.")
    return teachers


def teacher_source(
    args: Any, student: nn.Module, teacher_model: nn.Module | Sequence[nn.Module] | None,
    route_loader: Callable[[str], nn.Module] | None, train_dataset: Any, teacher_terms: dict[str, float],
) -> TeacherSource:
    """The source a run's arguments call for: a route (`args.teacher_route`), the given model(s), the cache the
    training set carries, the PEFT student's base model (self-distillation), or none; refuses active teacher terms
    (`teacher_terms`, ``{weight_field: weight}``) that no source can serve."""
    if args.teacher_route:
        if teacher_model is not None:
            raise ValueError(
                "teacher_route gives the teachers (one checkpoint per anchor): pass teacher_model=None with it."
            )
        return RouteTeachers(args.teacher_route, route_loader, args.route_steps)
    teachers = _as_teacher_list(teacher_model)
    if teachers:
        return LiveTeachers(teachers)
    manifest = cache_manifest(train_dataset)
    if manifest is not None:
        return CachedTeacher(manifest)
    if teacher_terms and hasattr(student, "disable_adapter"):
        logger.info("Self-distillation: the teacher is the student's base model with its adapters disabled.")
        return SelfDistillation(student)
    if teacher_terms:
        raise ValueError(
            f"{', '.join(f'{k}={v}' for k, v in teacher_terms.items())} compares the student with a teacher, so "
            "it needs a teacher: pass teacher_model=..., or set it to 0 to train on the task loss alone."
        )
    return NoTeacher()


def run_teacher_source(args: Any, student: nn.Module, teacher_model: Any, route_loader: Callable[[str], nn.Module] | None,
                       train_dataset: Any, tokenizer: Any, teacher_tokenizer: Any) -> TeacherSource:
    """The whole source of a run: `teacher_source`'s pick, wrapped for a teacher with another tokenizer
    (`cross_tokenizer_source`) and for the student's own samples (`on_policy_source`), checked against the run."""
    teacher_terms = fields_where(args, needs_teacher=True)
    source = teacher_source(args, student, teacher_model, route_loader, train_dataset, teacher_terms)
    return checked_source(args, student, source, train_dataset, tokenizer, teacher_tokenizer)


def checked_source(args: Any, student: nn.Module, source: TeacherSource, train_dataset: Any, tokenizer: Any,
                   teacher_tokenizer: Any) -> TeacherSource:
    """`source` (picked, or the caller's own) wrapped across tokenizers and for on-policy sampling as the arguments
    ask, and checked against the active teacher terms before the Trainer writes anything."""
    source = cross_tokenizer_source(args, source, student, tokenizer, teacher_tokenizer)
    source = on_policy_source(args, source, student, tokenizer, train_dataset)
    source.check_run(args, fields_where(args, needs_teacher=True), tokenizer)
    return source
