"""Positions: which rows of a model's output count. A *position* is one row of the output: an example for
classification and regression, a token for masked LMs and token classification, and for causal LMs the token whose
*next* label is supervised (position t predicts t + 1); padding and labels of -100 never count.
"""

from __future__ import annotations

import enum
from typing import Any, Mapping

import torch

from .modeling import unwrap

#: The label of a position that does not count (transformers' and PyTorch's ``ignore_index``).
IGNORE_INDEX = -100


class PositionUnit(str, enum.Enum):
    """How rows of the output are counted."""

    EXAMPLE = "example"  #: one position per example (sequence classification, regression, plain modules)
    TOKEN = "token"  #: one per token whose label != -100 (masked LM, token classification)
    NEXT_TOKEN = "next_token"  #: causal LM: position t counts when label[t + 1] != -100

    @property
    def is_token_level(self) -> bool:
        return self is not PositionUnit.EXAMPLE


def batch_size_of(inputs: Mapping[str, Any]) -> int:
    """The leading dimension of the first tensor in the batch."""
    for value in inputs.values():
        if torch.is_tensor(value) and value.dim() > 0:
            return int(value.shape[0])
    raise ValueError(f"Cannot tell the batch size: the batch has no tensor (keys: {sorted(inputs)}).")


def align_labels(labels: torch.Tensor, unit: PositionUnit) -> torch.Tensor:
    """Labels aligned with output positions: for causal LMs ``aligned[:, t] = labels[:, t + 1]`` (last = -100)."""
    if unit is not PositionUnit.NEXT_TOKEN:
        return labels
    aligned = torch.full_like(labels, IGNORE_INDEX)
    aligned[:, :-1] = labels[:, 1:]
    return aligned


def _token_grid(inputs: Mapping[str, Any]) -> torch.Tensor:
    """All-true mask over the token grid when nothing says which tokens are padding."""
    for key in ("input_ids", "inputs_embeds"):
        value = inputs.get(key)
        if torch.is_tensor(value):
            return torch.ones(value.shape[:2], dtype=torch.bool, device=value.device)
    raise ValueError(
        "Token-level distillation needs `labels`, `attention_mask` or `input_ids` in the batch to know which tokens "
        f"count; got keys {sorted(inputs)}."
    )


def position_mask(inputs: Mapping[str, Any], unit: PositionUnit, label_name: str = "labels") -> torch.Tensor:
    """Bool mask of the positions that count, shaped like the outputs without their last dimension.

    Examples: all true ``[B]``. Tokens: ``labels != -100`` when labels are present, else the attention mask
    (else every token). Causal LMs: ``labels[:, t + 1] != -100`` at t (the last position never counts), else the
    attention mask.
    """
    labels = inputs.get(label_name)
    if unit is PositionUnit.EXAMPLE:
        size = int(labels.shape[0]) if torch.is_tensor(labels) else batch_size_of(inputs)
        device = labels.device if torch.is_tensor(labels) else None
        return torch.ones(size, dtype=torch.bool, device=device)
    if torch.is_tensor(labels):
        return align_labels(labels, unit) != IGNORE_INDEX
    return token_mask(inputs)


def token_mask(inputs: Mapping[str, Any]) -> torch.Tensor:
    """Bool ``[B, T]`` mask of the tokens that count for token-level signals (hidden states, attention maps):
    ``attention_mask != 0``, else every token of ``input_ids`` / ``inputs_embeds``. Padding never counts."""
    attention_mask = inputs.get("attention_mask")
    if torch.is_tensor(attention_mask) and attention_mask.dim() == 2:
        return attention_mask.bool()
    return _token_grid(inputs)


def count_positions(inputs: Mapping[str, Any], unit: PositionUnit, label_name: str = "labels") -> torch.Tensor:
    """Number of positions that count in the batch (a 0-dim int64 tensor): ``position_mask(...).sum()``."""
    return position_mask(inputs, unit, label_name).sum()


def infer_position_unit(model: torch.nn.Module | None, inputs: Mapping[str, Any] | None = None,
                        label_name: str = "labels") -> PositionUnit:
    """The position unit of a student: causal LMs -> NEXT_TOKEN; masked LM / token classification -> TOKEN;
    otherwise TOKEN when the batch's labels are integer and per-token (2-D or more), else EXAMPLE."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
    )

    if model is not None:
        base = unwrap(model)
        name = type(base).__name__
        if name in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()) or getattr(base, "loss_type", None) == "ForCausalLM":
            return PositionUnit.NEXT_TOKEN
        token_models = set(MODEL_FOR_MASKED_LM_MAPPING_NAMES.values()) | set(
            MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES.values()
        )
        if name in token_models:
            return PositionUnit.TOKEN
    labels = inputs.get(label_name) if inputs is not None else None
    if torch.is_tensor(labels) and labels.dim() >= 2 and not torch.is_floating_point(labels):
        return PositionUnit.TOKEN
    return PositionUnit.EXAMPLE
