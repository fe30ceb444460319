"""The signal registry: every signal class the settings can turn on, in the order their terms are built
(`Signal.build_order`: the order projections are created in, so a seed gives the same run).

Built-in signals register themselves where they are defined; a user's signal registers with `register_signal` (a
class decorator). A registered class names its weight field; it is active in a run whose settings have that field
> 0 (for a signal of your own: a field of a `DistillationConfig` subclass). Checks that read weights iterate this
registry, never a list kept by hand.
"""

from __future__ import annotations

from typing import Any, TypeVar

from .base import Signal

_SIGNALS: dict[str, type[Signal]] = {}
S = TypeVar("S", bound=type)


def register_signal(cls: S) -> S:
    """Class decorator: make `cls` (a `Signal` subclass with a unique `name` and `weight_field`) a signal the
    settings turn on by its weight field. Registering a class again under the same weight field replaces it."""
    if not (isinstance(cls, type) and issubclass(cls, Signal)):
        raise TypeError(f"register_signal takes a Signal subclass, got {cls!r}.")
    if not cls.weight_field or cls.name == Signal.name:
        raise ValueError(
            f"{cls.__name__} needs a `name` (its term is logged as <name>_loss) and a `weight_field` (the settings "
            "field holding its weight, e.g. a field of your DistillationConfig subclass)."
        )
    taken = {other.name: field for field, other in _SIGNALS.items() if field != cls.weight_field}
    if cls.name in taken or cls.name == "task":
        raise ValueError(f"A signal named {cls.name!r} is registered already: give {cls.__name__} another `name`.")
    _SIGNALS[cls.weight_field] = cls
    return cls


def unregister_signal(cls: type[Signal]) -> None:
    """Remove a class `register_signal` added (e.g. at the end of a test)."""
    if _SIGNALS.get(cls.weight_field) is cls:
        del _SIGNALS[cls.weight_field]


def registered_signals() -> tuple[type[Signal], ...]:
    """Every registered signal class, by `Signal.build_order` (built-ins first), then registration order."""
    ranked = sorted(enumerate(_SIGNALS.values()), key=lambda item: (item[1].build_order, item[0]))
    return tuple(cls for _, cls in ranked)


def signal_weight_fields(args: Any = None) -> tuple[str, ...]:
    """The weight fields of the registered signals (those `args` has, when given)."""
    return tuple(c.weight_field for c in registered_signals() if args is None or hasattr(args, c.weight_field))


def fields_where(args: Any, **needs: bool) -> dict[str, float]:
    """``{weight_field: weight}`` of the registered signals active in `args` (weight > 0) whose declared needs match,
    e.g. ``fields_where(args, needs_labels=True)``."""
    active = {}
    for cls in registered_signals():
        field = cls.weight_field
        weight = float(getattr(args, field, 0.0) or 0.0)
        if weight > 0 and all(bool(getattr(cls, need)) == value for need, value in needs.items()):
            active[field] = weight
    return active


def label_weights(args: Any) -> dict[str, float]:
    """The active weights whose terms need labels: the task loss and every signal declaring `needs_labels`."""
    task = {"task_weight": args.task_weight} if getattr(args, "task_weight", 0) > 0 else {}
    return {**task, **fields_where(args, needs_labels=True)}
