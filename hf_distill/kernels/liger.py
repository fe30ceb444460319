"""The output terms through Liger's fused linear + distillation loss (`output_kernel="liger"`; `liger-kernel`).

Liger's `LigerFusedLinearJSDLoss` computes, chunk by chunk over the counted rows, from the final hidden states and
the output layers of both models:

    L = w_hard * mean_rows CE(z_s, y) + w_soft * mean_rows JSD_beta(softmax(z_s / T), softmax(z_t / T))

with ``JSD_beta = beta KL(p_t || m) + (1 - beta) KL(p_s || m)``, ``m = (1 - beta) p_s + beta p_t`` (beta 0: forward
KL(p_t || p_s), beta 1: reverse KL(p_s || p_t)): our ``jsd`` / ``forward_kl`` / ``reverse_kl`` divergences. We pass
``w_hard = c_task``, ``w_soft = c_logits * T^2`` (with `scale_by_temperature_squared`) and multiply by the number of
rows N, so the result is the chunked path's ``sum_k c_k S_k`` (`kernels.chunked.chunked_head_losses`), equal within
float tolerance (tested on CPU). On CUDA Liger compiles its chunk step (``torch.compile``); elsewhere it runs eagerly
(for tests; our own chunked loss is faster there). Training steps only: evaluation (top-1 agreement) stays on ours.
"""

from __future__ import annotations

from typing import Any

import torch


def liger_available() -> bool:
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss  # noqa: F401
    except ImportError:
        return False
    return True


def liger_obstacle(signal: Any, teachers: int, cached: bool) -> str | None:
    """Why `output_kernel="liger"` cannot run this job's output term `signal` (an `OutputSignal`, or None) (None: it
    can), checked before training: the term must declare its Liger JSD beta (`OutputSignal.liger_beta`)."""
    if signal is not None and signal.liger_beta is None:
        what = f"logits_loss={signal.kind!r}" if hasattr(signal, "kind") else f"the {signal.name} term"
        return f"{what} has no Liger kernel (it has jsd, forward_kl and reverse_kl)"
    if not liger_available():
        return "liger-kernel is not installed (pip install liger-kernel)"
    if cached:
        return "a teacher cache holds top-k targets, Liger needs the teacher's output layer"
    if teachers != 1:
        return f"{teachers} teachers: Liger takes one teacher's output layer"
    return None


def liger_head_losses(rows: torch.Tensor, head: Any, teacher_rows: torch.Tensor, teacher_head: Any,
                      labels: torch.Tensor | None, signal: Any, coefficients: dict[str, Any],
                      dtype: torch.dtype | None = None, chunk_size: int = 1024,
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(sum_k c_k S_k, {k: S_k})`` for ``k`` in task / logits over the ``N`` counted `rows` (``[N, H]``), as
    `chunked_head_losses` returns them, through Liger's fused kernel. `dtype`: the matmuls' dtype (autocast's);
    `chunk_size`: rows per chunk."""
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    count = rows.shape[0]
    beta, scale = signal.liger_beta, signal.scale
    c_task = float(coefficients.get("task", 0.0)) if labels is not None else 0.0
    c_soft = float(coefficients.get(signal.name, 0.0))
    target = labels.long() if labels is not None else torch.zeros(count, dtype=torch.long, device=rows.device)
    loss_fn = LigerFusedLinearJSDLoss(weight_hard_loss=c_task, weight_soft_loss=c_soft * scale, beta=beta,
                                      temperature=signal.temperature, compiled=rows.device.type == "cuda",
                                      chunk_size=chunk_size, return_soft_hard_loss=True)
    # both models' operands in the student's matmul dtype: Liger takes the softmax of each side's logits in the dtype
    # they come out in, so a bf16 teacher beside a float32 student would get a bf16 softmax
    dtype = dtype or rows.dtype
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    loss, soft, hard = loss_fn(cast(rows), cast(head.weight), cast(teacher_rows).detach(),
                               cast(teacher_head.weight).detach(), target, cast(head.bias),
                               None if teacher_head.bias is None else cast(teacher_head.bias).detach())
    sums = {signal.name: soft.detach().float() * count * scale}
    if labels is not None:
        sums = {"task": torch.as_tensor(hard).detach().float() * count, **sums}
    return loss.float() * count, sums
