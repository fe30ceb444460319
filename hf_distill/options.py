"""The one check for a setting that takes one of a fixed set of values."""

from __future__ import annotations

from typing import Any, Iterable


def check_choice(field: str, value: Any, choices: Iterable[Any], allow_none: bool = False) -> None:
    """Raise ``ValueError("Unknown <field> <value>; choose one of ...")`` unless `value` is one of `choices` (or None
    when `allow_none`)."""
    choices = tuple(choices)
    if value in choices or (allow_none and value is None):
        return
    extra = " or None" if allow_none else ""
    raise ValueError(f"Unknown {field} {value!r}; choose one of {', '.join(map(str, choices))}{extra}.")
