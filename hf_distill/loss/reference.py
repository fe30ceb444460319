"""The reference micro-batch: a causal-LM student's loss against a teacher's, from full logits, in one short function.

Every fast path of the package (the chunked output layer, its compiled kernel, Liger's fused kernel, the top-k teacher
cache at full width, data-parallel counting) computes this same number; the tests compare each one against it. Read it
first: the rest of `loss/` and `kernels/` is this function made to fit in memory and run fast.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..positions import IGNORE_INDEX
from ..signals.output import OutputSignal


def reference_loss(student: nn.Module, teacher: nn.Module, batch: Mapping[str, torch.Tensor], output: OutputSignal,
                   task_weight: float, output_weight: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``L = task_weight * CE(z_s, y) + output_weight * s * D(p_s, p_t)``, each a mean over the counted positions
    (those whose next token's label is not -100), with ``p = softmax(z / T)`` and ``s = T^2`` as `output` defines
    them (`OutputSignal.logits_rows`). Returns the loss and its two terms (the values the trainer logs)."""
    labels = batch["labels"]
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    student_logits = student(**inputs).logits[:, :-1]  # position i predicts token i + 1
    with torch.no_grad():
        teacher_logits = teacher(**inputs).logits[:, :-1]
    targets = labels[:, 1:]
    counted = targets != IGNORE_INDEX
    positions = counted.sum()
    z_s, z_t, y = student_logits[counted].float(), teacher_logits[counted].float(), targets[counted]
    task = F.cross_entropy(z_s, y, reduction="sum") / positions
    distillation = output.logits_rows(z_s, z_t, y if output.needs_tokens else None).sum() / positions
    return task_weight * task + output_weight * distillation, {"task_loss": task, f"{output.name}_loss": distillation}
