"""The student's own supervised (task) loss, as a sum over counted positions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..positions import PositionUnit, align_labels


def task_loss_sum(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    unit: PositionUnit,
    model_loss: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum of the task loss over counted positions.

    With ``model_loss`` (the mean the student model returned over its own counted positions): ``model_loss * n``
    with n = number of counted positions. Otherwise from the logits: ``sum_i (z_i - y_i)^2`` for a single
    regression output with float labels, else ``sum_i -log softmax(z_i)[y_i]`` (labels aligned for causal LMs).
    """
    count = mask.sum()
    if model_loss is not None:
        if int(count) == 0:  # the model's mean is 0/0 here; keep the graph, contribute nothing
            return student_logits.sum() * 0.0
        return model_loss.float() * count
    aligned = align_labels(labels, unit)
    if unit is PositionUnit.EXAMPLE and student_logits.shape[-1] == 1 and torch.is_floating_point(labels):
        prediction = student_logits.float().reshape(-1)
        return (prediction - aligned.float().reshape(-1)).pow(2).sum()
    if torch.is_floating_point(aligned):
        raise ValueError(
            f"Float labels of shape {tuple(labels.shape)} with {student_logits.shape[-1]} outputs: the task loss is "
            "cross-entropy over class ids (integer labels) or MSE for a single regression output. Return a `loss` from "
            "the student for other tasks, or set task_weight=0."
        )
    return F.cross_entropy(student_logits[mask].float(), aligned[mask].long(), reduction="sum")
