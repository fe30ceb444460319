"""Which signals a run uses: one `Signal` per non-zero weight, built from the config and both models."""

from __future__ import annotations

from torch import nn

from ..config import WEIGHT_FIELDS, DistillationConfig
from ..modeling import describe, text_config, unwrap
from ..students import model_depth, model_width
from .base import Signal
from .gradients import AdversarialGradientSignal, FeatureGradientSignal, InputGradientSignal, feature_width
from .hidden import AttentionSignal, HiddenStateSignal, attention_pairs, resolve_layer_map
from .logits import LogitsSignal
from .relational import SimilaritySignal

#: The weight fields whose terms compare the student with a teacher: all but the task loss's.
TEACHER_WEIGHT_FIELDS: tuple[str, ...] = tuple(f for f in WEIGHT_FIELDS if f != "task_weight")


def is_token_model(model: nn.Module | None) -> bool:
    """Whether the model reads token ids through input embeddings (a transformers model with an embedding table)."""
    base = unwrap(model) if model is not None else None
    base = base.get_base_model() if hasattr(base, "get_base_model") else base
    getter = getattr(base, "get_input_embeddings", None)
    try:
        return getter is not None and isinstance(getter(), nn.Embedding)
    except (NotImplementedError, AttributeError):
        return False


def _embedding_width(model: nn.Module) -> int:
    base = unwrap(model)
    base = base.get_base_model() if hasattr(base, "get_base_model") else base
    return int(base.get_input_embeddings().embedding_dim)


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
    if args.input_grad_weight > 0 or args.adversarial_grad_weight > 0:
        embeddings = args.input_grad_key is None and is_token_model(student) and is_token_model(teacher)
        widths = (_embedding_width(teacher), _embedding_width(student)) if embeddings else (None, None)
        input_gradient = InputGradientSignal(args.input_grad_key, embeddings, *widths)
        if args.input_grad_weight > 0:
            signals.append((input_gradient, args.input_grad_weight))
        if args.adversarial_grad_weight > 0:
            adversarial = AdversarialGradientSignal(args.input_grad_key, embeddings, args.discriminator_lr,
                                                    input_gradient)
            adversarial.owns_projection = args.input_grad_weight == 0
            signals.append((adversarial, args.adversarial_grad_weight))
    if args.feature_grad_weight > 0:
        widths = feature_width(student, args.feature_layer), feature_width(teacher, args.feature_layer)
        signals.append((FeatureGradientSignal(args.feature_layer, *widths), args.feature_grad_weight))
    if args.similarity_weight > 0:
        signals.append((SimilaritySignal(is_token_model(student) and is_token_model(teacher)), args.similarity_weight))
    return signals
