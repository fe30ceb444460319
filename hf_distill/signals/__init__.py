"""Distillation signals: each turns (student outputs, teacher outputs, batch) into one summed scalar.

Importing this package registers the built-in signals (built in `Signal.build_order`); `register_signal` adds one
of your own.
"""

from .base import BuildContext, Signal, SignalView
from .gradients import (
    AdversarialGradientSignal,
    FeatureGradientSignal,
    InputGradientSignal,
)
from .hidden import AttentionSignal, HiddenStateSignal
from .logits import (
    LOGITS_LOSSES,
    LogitsSignal,
    forward_kl,
    generalized_jsd,
    logits_divergence,
    logits_mse,
    reverse_kl,
    total_variation,
)
from .registry import (
    fields_where,
    label_weights,
    register_signal,
    registered_signals,
    signal_weight_fields,
    unregister_signal,
)
from .relational import SimilaritySignal
from .task import task_loss_sum

__all__ = [
    "LOGITS_LOSSES",
    "AdversarialGradientSignal",
    "AttentionSignal",
    "BuildContext",
    "FeatureGradientSignal",
    "HiddenStateSignal",
    "InputGradientSignal",
    "LogitsSignal",
    "Signal",
    "SignalView",
    "SimilaritySignal",
    "fields_where",
    "forward_kl",
    "generalized_jsd",
    "label_weights",
    "logits_divergence",
    "logits_mse",
    "register_signal",
    "registered_signals",
    "reverse_kl",
    "signal_weight_fields",
    "task_loss_sum",
    "total_variation",
    "unregister_signal",
]
