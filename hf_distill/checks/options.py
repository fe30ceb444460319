"""The checks of settings that take one of a fixed set of values, or a size given as text."""

from __future__ import annotations

import math
from dataclasses import fields
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


#: Which sampler draws completions (`DistillationConfig.sampler`, `data.sampler.uses_decode`): "auto" (the decode loop
#: on a CPU where it can serve the model, else `generate`), "decode" (the decode loop wherever it can), "generate".
SAMPLERS = ("auto", "decode", "generate")


def check_sampling_settings(args: Any) -> None:
    """The on-policy / seq_kd sampling settings, each in its range."""
    if not 0.0 <= args.lmbda <= 1.0:
        raise ValueError(f"lmbda must lie in [0, 1] (the share of micro-batches the student samples: 0 off-policy, 1 "
                         f"always on-policy), got {args.lmbda}.")
    bad = [f"{name}={getattr(args, name)} (must be {rule})" for name, ok, rule in (
        ("max_new_tokens", args.max_new_tokens >= 1, ">= 1"),
        ("generation_temperature", args.generation_temperature >= 0, ">= 0; 0 is greedy"),
        ("top_p", 0 < args.top_p <= 1, "in (0, 1]"),
        ("top_k", args.top_k >= 0, ">= 0; 0 is off"),
        ("num_generations", args.num_generations >= 1, ">= 1"),
    ) if not ok]
    if bad:
        raise ValueError(f"Sampling settings out of range: {'; '.join(bad)}.")
    check_choice("sampler", getattr(args, "sampler", "auto"), SAMPLERS)
    if args.logits_loss == "sampled_token" and args.logits_weight > 0 and args.lmbda == 0 and not args.seq_kd:
        raise ValueError(
            "logits_loss='sampled_token' is an on-policy estimator (log p_s(y) - log p_t(y) at tokens y the student "
            "sampled): with lmbda=0 and no seq_kd there are no student samples, and on the dataset's tokens it "
            "estimates nothing (its logged loss can be negative). Set --lmbda (e.g. 1.0) to sample, or use "
            "--logits_loss reverse_kl for off-policy data."
        )


def check_finite_settings(settings: object) -> None:
    """Refuse every float setting of a dataclass that is NaN or infinite (``temperature=inf`` trains to a NaN student,
    ``logits_weight=nan`` silently drops its term): a `ValueError` naming each such field."""
    bad = {f.name: getattr(settings, f.name) for f in fields(settings)
           if isinstance(getattr(settings, f.name, None), float) and not math.isfinite(getattr(settings, f.name))}
    if bad:
        raise ValueError(
            f"{', '.join(f'{k}={v}' for k, v in bad.items())}: settings must be finite numbers (NaN or infinity make "
            "every loss and weight of the student NaN, or silently drop a term). Give finite values."
        )

