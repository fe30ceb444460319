"""The output terms' value and gradient with respect to the student's logits, in closed form, for a chunk of rows.

The chunked output path (`kernels.chunked`) needs ``dL/dz`` of each chunk. Autograd through a divergence makes some
50 element-wise passes over the ``[chunk, V]`` tensors (forward and backward); on a CPU those passes, not the output
layer's matmuls, were most of a distillation step (docs/performance.md, section 8). The gradients below need a
handful. With ``p = softmax(z_s / T)``, ``q = softmax(z_t / T)`` and ``<a, b> = sum_v a_v b_v`` per row:

- forward KL, ``KL(q || p)``:            ``dL/dz_s = (p - q) / T``
- reverse KL, ``KL(p || q)``:            ``dL/dz_s = p * (r - <p, r>) / T``, ``r = log p - log q``
- generalized JSD (GKD), ``beta KL(q || m) + (1 - beta) KL(p || m)``, ``m = beta q + (1 - beta) p``:
  ``dL/dz_s = (1 - beta) p * (d - <p, d>) / T``, ``d = log p - log m`` (the terms through m cancel: ``dL/dp = (1 -
  beta) d``)
- task cross-entropy, ``-log softmax(z)[y]``: ``dL/dz = softmax(z) - onehot(y)``

Each term is times T^2 (its gradient times T) when the signal scales by it. ``0 log 0 = 0`` as in
`divergences.kl_from_log_probs`: log-probabilities are floored at float32's lowest finite value, so a zero probability
times a floored log is zero, while a NaN stays NaN. Kinds not listed here take autograd (`OutputTerms.closed_form`
returns None).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: The `logits_loss` kinds with a closed-form gradient here.
CLOSED_FORM_KINDS = frozenset({"forward_kl", "reverse_kl", "jsd"})
_FLOOR = torch.finfo(torch.float32).min
_TINY = torch.finfo(torch.float32).tiny


def _log_probs(z: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.log_softmax(z if temperature == 1 else z / temperature, dim=-1).clamp_(min=_FLOOR)


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum_v a_v b_v`` per row, (`torch.linalg.vecdot`)."""
    return torch.linalg.vecdot(a, b)


def divergence_and_grad(student: torch.Tensor, teacher: torch.Tensor, kind: str, temperature: float,
                        beta: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``D(z_s, z_t)`` (``[n]``) and ``dD/dz_s`` (``[n, V]``) of a kind in `CLOSED_FORM_KINDS`, both float32,
    without the T^2 factor (see the module docstring for the formulas)."""
    if kind == "jsd" and beta in (0, 1):
        kind = "forward_kl" if beta == 0 else "reverse_kl"  # (JSD's end points, as `jsd_from_log_probs`)
    log_p, log_q = _log_probs(student.float(), temperature), _log_probs(teacher.float(), temperature)
    p = log_p.exp()
    if kind == "forward_kl":
        q = log_q.exp()
        value = _row_dot(q, log_q.sub_(log_p))  # (one dot of the difference: two dots would cancel digits)
        grad = p.sub_(q)
    elif kind == "reverse_kl":
        r = log_p.sub_(log_q)  # (log p is not needed after this)
        value = _row_dot(p, r)
        grad = r.sub_(value.unsqueeze(-1)).mul_(p)
    elif kind == "jsd":
        q = log_q.exp()
        # log m from m = p + beta (q - p) (one lerp and one log, not a log-space logaddexp): floored at float32's
        # smallest normal number, where p and q are both below it and their terms vanish at float32 precision.
        log_m = torch.lerp(p, q, beta).clamp_(min=_TINY).log_()
        d_t = log_q.sub_(log_m)
        value_t = _row_dot(q, d_t)
        d_s = log_p.sub_(log_m)
        value_s = _row_dot(p, d_s)
        value = beta * value_t + (1 - beta) * value_s
        grad = d_s.sub_(value_s.unsqueeze(-1)).mul_(p).mul_(1 - beta)
    else:
        raise ValueError(f"No closed-form gradient for logits_loss={kind!r}; it takes autograd.")
    if temperature != 1:
        grad.div_(temperature)
    return value, grad


def cross_entropy_and_grad(z: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                           branch_free: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over rows of ``-log softmax(z)[y]`` and its gradient ``softmax(z) - onehot(y)`` (rows whose label is
    `ignore_index` count zero, as `F.cross_entropy`). `branch_free`: mask the gradient even when every row counts
    (one more pass, no data-dependent branch: for `torch.compile`)."""
    log_p = F.log_softmax(z.float(), dim=-1)
    labels = labels.long()
    keep = labels != ignore_index
    safe = torch.where(keep, labels, 0).unsqueeze(-1)
    picked = log_p.gather(-1, safe).squeeze(-1)
    value = -(picked * keep).sum()
    grad = log_p.exp_()
    grad.scatter_add_(-1, safe, -keep.to(grad.dtype).unsqueeze(-1))
    if branch_free or not bool(keep.all()):
        grad.mul_(keep.unsqueeze(-1))
    return value, grad
