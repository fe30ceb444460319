"""The `TeacherSource` interface: where a run's teacher outputs come from, and how a batch's sequences are made.

Given a batch and a `TeacherRequest` (what the active signals asked for), a source returns `TeacherOutputs`: the
teacher's output distribution in one of its forms (full logits, output layers and hidden states for the chunked
path, an offline cache's top-k with the tail, aligned spans of another tokenizer), and the first teacher's raw
outputs (hidden states, attentions) and feature. `prepare_batch` may rewrite a
training batch before anything is counted (teacher generations, the student's own samples, another tokenizer); the
counted positions follow the rewritten batch. The trainer never asks which kind of source it holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn


@dataclass
class TeacherRequest:
    """What one batch needs from the teacher.

    Attributes:
        mask: the counted positions of the batch (``[B]`` or ``[B, T]``).
        forward_options: extra forward flags (``output_hidden_states`` / ``output_attentions``).
        head_only: the chunked output path: each teacher returns its output layer and the final hidden states of the
            counted positions instead of full logits.
        feature_layer: capture the first teacher's feature (`FeatureTap`) when `want_features`.
        want_features: whether a signal reads the feature.
        soft: whether an ensemble averages temperature-softened probabilities (else logits).
        drop: batch keys never fed to a teacher (targets, cache columns).
    """

    mask: torch.Tensor
    forward_options: dict[str, bool] = field(default_factory=dict)
    head_only: bool = False
    feature_layer: str | None = None
    want_features: bool = False
    soft: bool = True
    drop: tuple[str, ...] = ()


@dataclass
class TeacherLogits:
    """The teacher's full logits ``[..., V]`` (an ensemble's combined), detached."""

    logits: torch.Tensor


@dataclass
class TeacherHeads:
    """The chunked output path: each teacher's output layer (`OutputHead`) and final hidden states at the counted
    positions; `combine` makes one set of logits of the teachers' chunks (an ensemble), so no ``[N, V]`` tensor of
    the teacher's exists."""

    heads: tuple[Any, ...]
    hidden: tuple[torch.Tensor, ...]
    combine: Callable[[list[torch.Tensor]], torch.Tensor] | None = None


@dataclass
class TeacherOutputs:
    """What a source returns for one batch: the teacher's output distribution in one of its forms — full logits
    (`TeacherLogits`), output layers and hidden states to chunk (`TeacherHeads`), an offline cache's top-k
    log-probabilities with the tail's mass (`signals.output.CachedTargets`), or the aligned spans of a teacher with
    another tokenizer (`signals.cross_vocab.AlignedSpans`) — and what the other signals read of the first teacher.
    A signal reads the form it can serve (`form`); a source returns the one it has."""

    distribution: Any = None  #: `TeacherLogits` | `TeacherHeads` | `CachedTargets` | `AlignedSpans` | None
    outputs: Any = None  #: the first teacher's raw outputs (hidden states, attentions)
    model: nn.Module | None = None  #: the first teacher itself (gradient signals run extra passes through it)
    features: torch.Tensor | None = None  #: the first teacher's feature (`FeatureTap`)

    def form(self, kind: type | tuple[type, ...]) -> Any:
        """The distribution when it comes in the form `kind` (or one of them), else None."""
        return self.distribution if isinstance(self.distribution, kind) else None


class TeacherSource:
    """Base class of every teacher source (see the module docstring). Subclasses override what they provide."""

    #: whether this source gives teacher outputs at all (False: a run on the task loss alone)
    has_teacher: bool = True
    #: whether the teacher has its own tokens (another tokenizer): its outputs come as aligned spans, the student's
    #: output term reads full logits, and output sizes are not compared
    aligns_tokens: bool = False

    @property
    def models(self) -> list[nn.Module]:
        """The live teacher models in use now (for size checks, chunking plans, input columns); [] for a cache."""
        return []

    @property
    def first_model(self) -> nn.Module | None:
        """The teacher every signal but the output term reads (the first of an ensemble)."""
        return self.models[0] if self.models else None

    def prepare(self, accelerator: Any, args: Any, signals: list, on_new_models: Callable[[], None]) -> None:
        """Make the source ready for the run (freeze, cast, place its models); `on_new_models` runs whenever the
        models in use change (the trainer's size checks)."""

    def prepare_batch(self, batch: Mapping[str, Any], student: nn.Module,
                      step: tuple[int, int] = (0, 0)) -> Mapping[str, Any]:
        """A training batch as it is trained on: unchanged here; sources that produce sequences rewrite it (its
        labels say which positions count). `step`: (the optimizer step, the micro-batch within it)."""
        return batch

    def prepare_batches(self, batches: list[Mapping[str, Any]], student: nn.Module, step: int) -> list[Any]:
        """All micro-batches of optimizer step `step` as they are trained on (`prepare_batch` each, in order); a
        source that samples draws every micro-batch's completions in one generation."""
        return [self.prepare_batch(batch, student, (step, micro)) for micro, batch in enumerate(batches)]

    def outputs(self, inputs: Mapping[str, Any], request: TeacherRequest) -> TeacherOutputs | None:
        """The teacher's outputs for a batch, or None when this batch has none."""
        return None

    def on_step(self, state: Any) -> None:
        """Called before every training micro-batch with the Trainer's state (e.g. a route changes teachers)."""

    def log_values(self) -> dict[str, float]:
        """Values to add to each training log."""
        return {}

    def input_columns(self) -> list[str]:
        """Dataset columns the source reads besides the student's inputs (kept by `remove_unused_columns`)."""
        return []

    def batch_only_keys(self) -> tuple[str, ...]:
        """Batch keys that belong to the source and are never fed to a model."""
        return ()

    def wrap_collator(self, collator: Callable) -> Callable:
        """The data collator to use with this source."""
        return collator

    def check_run(self, args: Any, active: dict[str, float], processing_class: Any = None) -> None:
        """Refuse, before training, active teacher terms (``{weight_field: weight}``), settings or a tokenizer this
        source cannot serve."""

    def declared_vocab_size(self) -> int | None:
        """The output width a source without live models declares (a cache's manifest), checked against the
        student's before training."""
        return None


class NoTeacher(TeacherSource):
    """A run without a teacher: the task loss alone."""

    has_teacher = False
