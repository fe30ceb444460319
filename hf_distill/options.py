"""The checks of settings that take one of a fixed set of values, or a size given as text."""

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


def parse_chunk_size(value: str | int) -> str | int:
    """`logits_chunk_size` as "auto" or an int >= 0 (the command line passes strings)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        size = int(value)
    except (TypeError, ValueError):
        size = None
    if size is None or size < 0 or (isinstance(value, float) and value != size):
        raise ValueError(
            f"logits_chunk_size must be 'auto', 0 (full logits) or a positive number of tokens, got {value!r}."
        )
    return size
