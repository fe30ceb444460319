"""The tiny interface every distillation signal implements, and the view of a batch that signals read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping

import torch
from torch import nn

from ..checks.options import check_choice
from ..positions import align_labels, token_mask


def upcast_half(tensor: torch.Tensor) -> torch.Tensor:
    """float16 / bfloat16 tensors as float32 (signals compare in float32); other dtypes unchanged."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


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
        student_model / teacher_model: the models themselves (for signals that run extra passes, e.g. gradients;
            the teacher is the first one of an ensemble).
        labels: the batch's targets (or `None`); unit: how output positions are counted; training: whether the
            student is training (signals keep graphs for the student's update only then).
        label_names: batch keys that are targets (dropped from extra forward passes).
        cache: per-batch results that several signals share (e.g. input gradients for Sobolev and GREAT).
        teacher_targets: the teacher's output distribution when it is not logits of the student's shape: an offline
            cache's top-k targets for the counted positions (`output.CachedTargets`), or the counted aligned spans
            of a teacher with another tokenizer (`cross_vocab.AlignedSpans`); `teacher_logits` is then None.
        token_positions: bool ``[B, T]``, the tokens that count for token-level signals (the accounting's, measured
            once per micro-batch); None: `token_mask` computes it from the inputs.
    """

    student_logits: torch.Tensor
    teacher_logits: torch.Tensor | None
    mask: torch.Tensor
    inputs: Mapping[str, Any]
    student_outputs: Any = None
    teacher_outputs: Any = None
    student_model: Any = None
    teacher_model: Any = None
    labels: Any = None
    unit: Any = None
    training: bool = True
    label_names: tuple[str, ...] = ("labels",)
    cache: dict[str, Any] = field(default_factory=dict, repr=False)
    teacher_targets: Any = None
    token_positions: torch.Tensor | None = field(default=None, repr=False)
    _counted: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def counted_logits(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Student and teacher logits at the counted positions only, each ``[N, V]`` (computed once per batch)."""
        if self.teacher_logits is None:
            raise ValueError("This signal needs teacher outputs, but no teacher ran on this batch.")
        if self._counted is None:
            self._counted = (self.student_logits[self.mask], self.teacher_logits[self.mask])
        return self._counted

    def counted_tokens(self) -> torch.Tensor:
        """The token that followed each counted position (its label, aligned with the outputs), ``[N]``: for a
        sampled completion, the token the student sampled there."""
        if not torch.is_tensor(self.labels):
            raise ValueError("This signal reads the token that followed each position, but the batch has no labels.")
        return align_labels(self.labels, self.unit)[self.mask]

    def token_mask(self) -> torch.Tensor:
        """Bool ``[B, T]`` mask of the tokens that count for token-level signals (hidden states, attention maps):
        the attention mask, or every token when the batch has none. Padding never counts."""
        if self.token_positions is None:
            self.token_positions = token_mask(self.inputs)
        return self.token_positions


@dataclass
class BuildContext:
    """What a signal reads to build itself (`Signal.from_config`): the settings, both models, and a memo for what
    several signals share (one layer map for hidden states and attention, one input-gradient computation for
    Sobolev and GREAT), built by the first signal that asks."""

    args: Any
    student: nn.Module | None = None
    teacher: nn.Module | None = None
    _shared: dict[str, Any] = field(default_factory=dict, repr=False)

    def shared(self, key: str, make: Callable[[], Any]) -> Any:
        """`make()` the first time `key` is asked for, the same object afterwards."""
        if key not in self._shared:
            self._shared[key] = make()
        return self._shared[key]

    def weight(self, field_name: str) -> float:
        """A weight field's value (0 when the settings have no such field)."""
        return float(getattr(self.args, field_name, 0.0) or 0.0)


class Signal:
    """One term of the combined loss. Subclasses set `name`, `weight_field` and implement `loss_sum`; registered
    classes (`register_signal`) are built from the settings by `from_config` whenever their weight is > 0.

    `loss_sum` returns the *sum* of the term over the counted positions (or tokens, see `unit`) of the batch; the
    trainer divides by how many count in the whole accumulated (and, in distributed runs, global) batch, which makes
    gradient accumulation and multi-device training exact. The term is logged as ``<name>_loss``.

    The class attributes declare what the signal needs; the trainer, the teacher sources and the checks read them
    (never the signal's name).
    """

    name: str = "signal"
    #: the settings field holding the term's weight (`DistillationConfig.<weight_field>`, or a subclass's field)
    weight_field: ClassVar[str] = ""
    #: settings fields the signal reads besides its weight, and those among them with a fixed set of values
    option_fields: ClassVar[tuple[str, ...]] = ()
    option_choices: ClassVar[dict[str, tuple[str, ...]]] = {}
    #: where the signal is built among the active ones (built-ins 10..70; yours after them by default)
    build_order: ClassVar[int] = 100
    #: whether the teacher must run for this signal
    needs_teacher: bool = True
    #: whether the term needs the batch's labels (the gradient signals differentiate the task loss)
    needs_labels: bool = False
    #: whether it can learn from an offline teacher cache (top-k output distributions only)
    works_from_cache: bool = False
    #: whether it needs a teacher of its own (not the PEFT student with its adapters disabled)
    needs_separate_teacher: bool = False
    #: what the term is summed over, and so divided by: "positions" (the task's positions: examples, labelled tokens)
    #: "tokens" (every token the attention mask keeps) or "examples" (rows of the batch)
    unit: str = "positions"
    #: whether both models must return `hidden_states` / `attentions` for this signal
    needs_hidden_states: bool = False
    needs_attentions: bool = False
    #: whether `loss_sum` reads the full logits (`view.student_logits` / `counted_logits`): when no active signal
    #: but the output term does, causal LMs can use the chunked output path (`logits_chunk_size`)
    reads_logits: bool = True
    #: the output term: the output strategy computes it (from full logits, or chunk by chunk from the output layer)
    is_output_term: bool = False
    #: whether the trainer must capture each model's feature (`feature_layer` output / head input) in the main forward
    needs_features: bool = False
    #: whether the student's graph is differentiated twice (its attention must then support double backward: eager)
    differentiates_twice: bool = False
    #: whether the term differentiates through the teacher (its input gradients): the teacher then keeps its dtype
    differentiates_teacher: ClassVar[bool] = False
    #: whether the term compares the models across tokenizers (over aligned spans; token-by-token terms cannot)
    works_across_tokenizers: ClassVar[bool] = False

    @classmethod
    def from_config(cls, context: BuildContext) -> "Signal":
        """Build the signal from the settings (`context.args`) and the models; called when its weight is > 0."""
        return cls()

    @classmethod
    def check_options(cls, args: Any) -> None:
        """Refuse unknown values of the signal's options (run for every registered signal, whatever its weight)."""
        for option, choices in cls.option_choices.items():
            if hasattr(args, option):
                check_choice(option, getattr(args, option), choices)

    def trainable_modules(self) -> dict[str, nn.Module]:
        """Modules the signal learns with the student (e.g. projections), by name: trained by the student's optimizer,
        saved in checkpoints, never exported with the student."""
        return {}

    # Signals with a training state of their own (e.g. GREAT's discriminator and its optimizer) override these.
    def after_optimizer_step(self) -> dict[str, float]:
        """Called once per optimizer step, after the student's update; returns values to log."""
        return {}

    def checkpoint_state(self) -> dict[str, Any]:
        """State to save in checkpoints besides `trainable_modules` (restored by `load_checkpoint_state`)."""
        return {}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        """Restore what `checkpoint_state` returned."""

    def loss_sum(self, view: SignalView) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError
