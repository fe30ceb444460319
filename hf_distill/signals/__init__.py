"""Distillation signals: each turns (student outputs, teacher outputs, batch) into one summed scalar."""

from .base import Signal, SignalView
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
from .task import task_loss_sum

__all__ = [
    "LOGITS_LOSSES",
    "LogitsSignal",
    "Signal",
    "SignalView",
    "forward_kl",
    "generalized_jsd",
    "logits_divergence",
    "logits_mse",
    "reverse_kl",
    "task_loss_sum",
    "total_variation",
]
