"""Students from teachers: keep some of a teacher's layers, with their weights (DistilBERT-style initialisation).

>>> student = shrink_model(teacher, num_layers=6, strategy="distilbert")  # doctest: +SKIP
>>> student.config.distilled_from_layers  # doctest: +SKIP
[0, 2, 4, 7, 9, 11]
"""

from __future__ import annotations

import copy
import re
from typing import Any, Sequence

import torch
from torch import nn
from transformers import PreTrainedModel

from .modeling import text_config

#: Config attributes that may hold the depth of the layer stack, in the order they are tried.
DEPTH_ATTRIBUTES: tuple[str, ...] = ("num_hidden_layers", "n_layer", "n_layers", "num_layers")
#: Layer selection strategies of `shrink_model`.
SHRINK_STRATEGIES: tuple[str, ...] = ("every_other", "uniform", "distilbert")


def select_layers(num_teacher_layers: int, num_layers: int, strategy: str = "every_other") -> list[int]:
    """Indices of the teacher layers a `num_layers`-deep student keeps, for `strategy`.

    - ``every_other``: ``0, 2, 4, ...`` (needs ``num_layers <= ceil(T / 2)``).
    - ``uniform``: evenly spaced with the first and the last kept: ``round(i * (T - 1) / (n - 1))``.
    - ``distilbert``: DistilBERT's extraction (``0, 2, 4, 7, 9, 11`` for 12 -> 6): every other layer from the bottom
      for the first ``ceil(n / 2)``, every other layer ending at the top for the remaining ``floor(n / 2)``
      (the two halves must not overlap: about ``num_layers <= T / 2``).
    """
    t, n = num_teacher_layers, num_layers
    if not 1 <= n <= t:
        raise ValueError(f"A student of {n} layers cannot be cut from a {t}-layer teacher: choose 1 <= num_layers <= {t}.")
    if strategy == "every_other":
        if 2 * (n - 1) > t - 1:
            raise ValueError(
                f"strategy='every_other' keeps layers 0, 2, 4, ...: a {t}-layer teacher has only {(t + 1) // 2} of "
                f"them, fewer than num_layers={n}. Use strategy='uniform' or pass layers=[...]."
            )
        return [2 * i for i in range(n)]
    if strategy == "uniform":
        if n == 1:
            return [0]
        return [round(i * (t - 1) / (n - 1)) for i in range(n)]
    if strategy == "distilbert":
        bottom, top = (n + 1) // 2, n // 2
        low = [2 * i for i in range(bottom)]
        high = [t - 1 - 2 * (top - 1 - j) for j in range(top)]
        if high and low and high[0] <= low[-1]:
            raise ValueError(
                f"strategy='distilbert' keeps every other layer from the bottom and from the top; {n} such layers do "
                f"not fit in a {t}-layer teacher without overlapping. Use strategy='uniform' or layers=[...]."
            )
        return low + high
    raise ValueError(f"Unknown strategy {strategy!r}; choose one of {', '.join(SHRINK_STRATEGIES)}.")


#: What ``--shrink_strategy auto`` keeps for a causal LM: the first of these that fits the depths. Measured on
#: SmolLM2-135M (30 layers) -> 10 layers after 30 distillation steps (docs/results.md section 8): held-out
#: perplexity 444 with distilbert's ends (0, 2, 4, 6, 8, 21, ..., 29), 870 with uniform, 1,887 with every_other.
CAUSAL_LM_STRATEGIES: tuple[str, ...] = ("distilbert", "uniform")


def pick_layers(num_teacher_layers: int, num_layers: int, strategy: str) -> tuple[list[int], str]:
    """(`select_layers` for `strategy`, the strategy used); ``"auto"`` takes the first of `CAUSAL_LM_STRATEGIES`
    that fits (distilbert's needs ``num_layers`` up to about half the teacher's depth)."""
    if strategy != "auto":
        return select_layers(num_teacher_layers, num_layers, strategy), strategy
    for candidate in CAUSAL_LM_STRATEGIES[:-1]:
        try:
            return select_layers(num_teacher_layers, num_layers, candidate), candidate
        except ValueError:
            continue
    return select_layers(num_teacher_layers, num_layers, CAUSAL_LM_STRATEGIES[-1]), CAUSAL_LM_STRATEGIES[-1]


def model_depth(config: Any) -> int | None:
    """The number of layers of the (text) model a config describes, or `None` when it declares none."""
    config = text_config(config)
    for name in DEPTH_ATTRIBUTES:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def model_width(config: Any) -> int | None:
    """The hidden size of the (text) model a config describes (``hidden_size`` / ``n_embd`` / ``d_model`` / ``dim``)."""
    config = text_config(config)
    for name in ("hidden_size", "n_embd", "d_model", "dim"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def find_layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The qualified name and module of the one `nn.ModuleList` holding the model's transformer layers.

    It is the `nn.ModuleList` whose length is the depth the config declares (`num_hidden_layers`, `n_layer`,
    `n_layers` or `num_layers`); a clear error names what was looked for when there is none, or more than one.
    """
    config = getattr(model, "config", None)
    depth = model_depth(config) if config is not None else None
    if depth is None:
        raise ValueError(
            f"Cannot shrink {type(model).__name__}: its config declares no depth (looked for "
            f"{', '.join(DEPTH_ATTRIBUTES)}). shrink_model supports models whose layers sit in one nn.ModuleList whose "
            "length the config declares (BERT, RoBERTa, MPNet, DistilBERT, Llama, Qwen2, Gemma 3, GPT-2, ...)."
        )
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == depth and name
    ]
    # A stack nested inside another candidate (e.g. per-layer sub-lists) is not the layer stack itself.
    outer = [(n, m) for n, m in candidates if not any(n.startswith(o + ".") for o, _ in candidates if o != n)]
    if len(outer) == 1:
        return outer[0]
    lists = sorted(f"{n} ({len(m)})" for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and n)
    if not outer:
        raise ValueError(
            f"Cannot shrink {type(model).__name__}: looked for one nn.ModuleList of {depth} layers (its config's depth) "
            f"and found none. Its ModuleLists: {', '.join(lists) or 'none'}."
        )
    raise ValueError(
        f"Cannot shrink {type(model).__name__}: more than one nn.ModuleList has {depth} layers "
        f"({', '.join(n for n, _ in outer)}), so the layer stack is ambiguous (encoder-decoder and multi-tower models "
        "are not supported)."
    )


def _subset_per_layer_lists(config: Any, kept: list[int], depth: int) -> None:
    """Cut every per-layer list attribute of `config` (length == depth, e.g. `layer_types`) to the kept layers, set
    the depth, and keep Qwen2's `max_window_layers` (a count of leading layers) consistent."""
    for name, value in list(vars(config).items()):
        if name.startswith("_"):
            continue
        if isinstance(value, (list, tuple)) and len(value) == depth:
            setattr(config, name, type(value)(value[i] for i in kept))
    if isinstance(getattr(config, "max_window_layers", None), int):
        config.max_window_layers = sum(1 for i in kept if i < config.max_window_layers)
    for name in DEPTH_ATTRIBUTES:
        if isinstance(getattr(config, name, None), int):
            setattr(config, name, len(kept))
            break


def _resolve_layers(
    depth: int, num_layers: int | None, layers: Sequence[int] | None, strategy: str
) -> list[int]:
    if layers is not None:
        kept = [int(i) for i in layers]
        if not kept:
            raise ValueError("layers=[] keeps no layer: give at least one teacher layer index.")
        if any(not 0 <= i < depth for i in kept):
            raise ValueError(f"layers={kept} has indices outside the teacher's 0..{depth - 1}.")
        if any(b <= a for a, b in zip(kept, kept[1:])):
            raise ValueError(f"layers={kept} must be strictly increasing (teacher layers are kept in their order).")
        if num_layers is not None and num_layers != len(kept):
            raise ValueError(f"num_layers={num_layers} disagrees with layers={kept} ({len(kept)} layers); give one.")
        return kept
    return select_layers(depth, num_layers if num_layers is not None else max(depth // 2, 1), strategy)


def shrink_model(
    teacher: PreTrainedModel,
    num_layers: int | None = None,
    layers: Sequence[int] | None = None,
    strategy: str = "every_other",
    config_overrides: dict[str, Any] | None = None,
) -> PreTrainedModel:
    """A shallower copy of `teacher` that keeps some of its layers, with their weights (DistilBERT's initialisation).

    The student is a new model of the teacher's class sharing no tensor with it: embeddings, the kept layers (in
    order), final norm and head are copied. Its config has the new depth (`num_hidden_layers` / `n_layer` / ...),
    every per-layer list (e.g. `layer_types`) cut to the kept layers, and ``distilled_from_layers`` recording the kept
    teacher indices (the default layer map of the hidden-state signal).

    Args:
        teacher: a `PreTrainedModel` whose layers sit in one `nn.ModuleList` of the depth its config declares.
        num_layers: depth of the student; defaults to half the teacher's (at least 1).
        layers: explicit teacher layer indices to keep (strictly increasing); overrides `strategy`.
        strategy: ``"every_other"`` (0, 2, 4, ...), ``"uniform"`` (evenly spaced, first and last kept) or
            ``"distilbert"`` (0, 2, 4, 7, 9, 11 for 12 -> 6); see `select_layers`.
        config_overrides: extra config attributes for the student (e.g. ``{"attention_probs_dropout_prob": 0.0}``).
    """
    if not isinstance(teacher, PreTrainedModel):
        raise TypeError(
            f"shrink_model needs a transformers PreTrainedModel (it rebuilds the student from its config), got "
            f"{type(teacher).__name__}."
        )
    stack_name, stack = find_layer_stack(teacher)
    depth = len(stack)
    kept = _resolve_layers(depth, num_layers, layers, strategy)

    config = copy.deepcopy(teacher.config)
    text = text_config(config)
    _subset_per_layer_lists(text, kept, depth)
    config.distilled_from_layers = list(kept)
    for key, value in (config_overrides or {}).items():
        setattr(config, key, value)

    from transformers.initialization import no_init_weights

    parameter = next(teacher.parameters())
    with no_init_weights():
        student = type(teacher)(config)
    student.to(device=parameter.device, dtype=parameter.dtype)

    new_index = {old: new for new, old in enumerate(kept)}
    pattern = re.compile(rf"^{re.escape(stack_name)}\.(\d+)\.(.*)$")
    state: dict[str, torch.Tensor] = {}
    for key, tensor in teacher.state_dict().items():
        match = pattern.match(key)
        if match is None:
            state[key] = tensor
        elif int(match.group(1)) in new_index:
            state[f"{stack_name}.{new_index[int(match.group(1))]}.{match.group(2)}"] = tensor
    missing, unexpected = student.load_state_dict(state, strict=False)  # copies: no storage is shared
    # Tied weights (e.g. lm_head = embeddings) may be absent from one side's state dict; anything else is a bug.
    tied = set(getattr(student, "all_tied_weights_keys", {}) or {})
    if unexpected or [k for k in missing if k not in tied]:
        raise RuntimeError(
            f"shrink_model could not map the teacher's weights onto the student: missing {missing}, unexpected "
            f"{unexpected}."
        )
    if hasattr(student, "tie_weights"):
        student.tie_weights()
    if getattr(teacher, "generation_config", None) is not None and hasattr(student, "generation_config"):
        student.generation_config = copy.deepcopy(teacher.generation_config)
    student.train(teacher.training)
    return student
