"""Relational signals: similarity-preserving KD (Tung & Mori 2019)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import BuildContext, Signal, SignalView, upcast_half
from .geometry import is_token_model
from .hidden import output_field
from .registry import register_signal


def similarity_matrix(features: torch.Tensor) -> torch.Tensor:
    """``G = F F^T`` over one feature vector per example (flattened), each row L2-normalised (Tung & Mori, eq. 2)."""
    flat = features.reshape(features.shape[0], -1)
    flat = upcast_half(flat)
    return F.normalize(flat @ flat.T, p=2, dim=1)


def similarity_loss(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """``||G_s - G_t||_F^2 / b^2`` (Tung & Mori, eq. 3); the widths of the two feature sets may differ."""
    b = student_features.shape[0]
    return (similarity_matrix(student_features) - similarity_matrix(teacher_features)).pow(2).sum() / (b * b)


def mean_over_tokens(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per example, the mean of ``hidden[b, t]`` over the tokens t with ``mask[b, t]``."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1)


@register_signal
class SimilaritySignal(Signal):
    """Similarity-preserving KD over the batch's examples. Counted in *examples*: `loss_sum` returns
    ``||G_s - G_t||_F^2 / b``, which the trainer divides by the b examples (exactly L_SP for one batch; with
    accumulation, the example-weighted mean of the micro-batches' L_SP)."""

    name = "similarity"
    weight_field = "similarity_weight"
    build_order = 70
    option_fields = ("feature_layer",)
    unit = "examples"
    reads_logits = False
    needs_separate_teacher = True

    def __init__(self, token_model: bool) -> None:
        self.token_model = token_model
        self.needs_hidden_states = token_model
        self.needs_features = not token_model

    @classmethod
    def from_config(cls, context: BuildContext) -> "SimilaritySignal":
        return cls(is_token_model(context.student) and is_token_model(context.teacher))

    def loss_sum(self, view: SignalView) -> torch.Tensor:
        if self.token_model:
            mask = view.token_mask()
            student = mean_over_tokens(output_field(view.student_outputs, "hidden_states", "student")[-1], mask)
            teacher = mean_over_tokens(output_field(view.teacher_outputs, "hidden_states", "teacher")[-1], mask)
        else:
            student, teacher = view.cache["student_features"], view.cache["teacher_features"]
        b = student.shape[0]
        return similarity_loss(student, teacher.detach()) * b
