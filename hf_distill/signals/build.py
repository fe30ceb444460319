"""Which signals a run uses: one `Signal` per registered class whose weight is > 0, plus the caller's own."""

from __future__ import annotations

from typing import Any, Iterable

from torch import nn

from .base import BuildContext, Signal
from .registry import registered_signals


def build_signals(
    args: Any, student: nn.Module | None = None, teacher: nn.Module | None = None,
    extra: Iterable[tuple[Signal, float]] = (),
) -> list[tuple[Signal, float]]:
    """The active signals with their weights, in registration order; a signal whose weight is 0 is not built (and
    costs nothing). Each builds itself from `args` and the models (`Signal.from_config`); `extra` holds signals
    built by the caller, with their weights, added after (those with weight 0 dropped)."""
    context = BuildContext(args, student, teacher)
    signals = [(cls.from_config(context), context.weight(cls.weight_field))
               for cls in registered_signals() if context.weight(cls.weight_field) > 0]
    signals += [(signal, float(weight)) for signal, weight in extra if weight > 0]
    names = [signal.name for signal, _ in signals]
    duplicates = sorted({name for name in names if names.count(name) > 1} | ({"task"} & set(names)))
    if duplicates:
        raise ValueError(f"Two terms would be logged as {duplicates[0]}_loss: give each signal its own `name`.")
    outputs = [signal for signal, _ in signals if signal.is_output_term]
    if len(outputs) > 1:
        raise ValueError(f"{' and '.join(f'{s.weight_field or s.name} > 0' for s in outputs)} turn on two output terms; "
                         "a run computes one output term (the output paths fuse it with the task loss): set all but "
                         "one of these weights to 0.")
    return signals
