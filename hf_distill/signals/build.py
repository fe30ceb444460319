"""Which signals a run uses: one `Signal` per non-zero weight, built from the config and both models."""

from __future__ import annotations

from torch import nn

from ..config import DistillationConfig
from ..modeling import describe, text_config, unwrap
from ..students import model_depth, model_width
from .base import Signal
from .hidden import AttentionSignal, HiddenStateSignal, attention_pairs, resolve_layer_map
from .logits import LogitsSignal

#: The weight fields whose terms compare the student with a teacher.
TEACHER_WEIGHT_FIELDS: tuple[str, ...] = ("logits_weight", "hidden_weight", "attention_weight")


def _layer_geometry(model: nn.Module, who: str, weight_names: list[str]) -> tuple[int, int]:
    """(depth, width) of a model from its config, or a clear error for models that declare neither."""
    config = text_config(model)
    depth = model_depth(config) if config is not None else None
    width = model_width(config) if config is not None else None
    if depth is None or width is None:
        raise ValueError(
            f"{' and '.join(weight_names)} > 0 match layers by index, which needs transformers models whose configs "
            f"declare their depth and width (num_hidden_layers, hidden_size); the {who} {describe(model)} declares "
            f"none. Set {' and '.join(weight_names)} to 0 for plain modules."
        )
    return depth, width


def build_signals(
    args: DistillationConfig, student: nn.Module | None = None, teacher: nn.Module | None = None
) -> list[tuple[Signal, float]]:
    """The active signals with their weights; a signal whose weight is 0 is not built (and costs nothing).

    Layer-matching signals (hidden states, attention) read the depths and widths of `student` and `teacher` from their
    configs to resolve `args.layer_map` and create projections.
    """
    signals: list[tuple[Signal, float]] = []
    if args.logits_weight > 0:
        signals.append(
            (
                LogitsSignal(args.logits_loss, args.temperature, args.jsd_beta, args.scale_by_temperature_squared),
                args.logits_weight,
            )
        )
    if args.hidden_weight > 0 or args.attention_weight > 0:
        names = [f for f in ("hidden_weight", "attention_weight") if getattr(args, f) > 0]
        student_depth, student_width = _layer_geometry(student, "student", names)
        teacher_depth, teacher_width = _layer_geometry(teacher, "teacher", names)
        distilled_from = getattr(getattr(unwrap(student), "config", None), "distilled_from_layers", None)
        layer_map = resolve_layer_map(args.layer_map, student_depth, teacher_depth, distilled_from)
        if args.hidden_weight > 0:
            signal = HiddenStateSignal(args.hidden_loss, layer_map, student_width, teacher_width, args.hidden_projection)
            signals.append((signal, args.hidden_weight))
        if args.attention_weight > 0:
            signals.append((AttentionSignal(attention_pairs(layer_map)), args.attention_weight))
    return signals
