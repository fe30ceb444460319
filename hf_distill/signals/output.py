"""The output term: one definition of the divergence between the student's and the teacher's output distributions,
and the forms of the teacher's outputs that every output path hands it.

An output signal (`OutputSignal`) defines one method, ``divergence(a_s, a_t, tokens, vocab)``: one value per row of
two log-distributions at its temperature (raw logits where it reads them: `reads_raw_logits`). Every way of computing
the output layer calls it through the teacher-output form it has:

- full logits, or a chunk of the output layer (`kernels.chunked`): ``logits_rows`` =
  ``s * D(log softmax(z_s / T), log softmax(z_t / T))``;
- a top-k teacher cache (`CachedTargets`: top-k log-probabilities and the tail's mass): ``top_k_rows`` =
  ``s * D(P_s, P_t)`` over the k ids and one tail bucket (the coarsened distributions);
- aligned spans of a teacher with another tokenizer (`cross_vocab.span_divergence_sum`): ``s * D(log P_s, log P_t)``
  of the span distributions;

with ``s = T^2`` when the signal scales by it. Fused paths use a closed form of value and gradient where the signal
has one (`closed_form`), and Liger's kernel where it declares `liger_beta`; a signal with neither trains on the
autograd paths, and the paths that cannot serve it refuse it before training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .base import Signal, SignalView, upcast_half
from .closed_form import divergence_and_grad
from .cross_vocab import AlignedSpans, span_divergence_sum


@dataclass
class CachedTargets:
    """An offline teacher's targets for the counted positions, one row each: top-k ids ``[N, k]``, their
    log-probabilities at the cache's temperature ``[N, k]``, and the log of the remaining mass ``[N]``."""

    ids: torch.Tensor
    log_probs: torch.Tensor
    tail_log_prob: torch.Tensor

    def rows(self, start: int, end: int) -> "CachedTargets":
        return CachedTargets(self.ids[start:end], self.log_probs[start:end], self.tail_log_prob[start:end])


def topk_bucket_log_probs(student_logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The student's log-probabilities over k + 1 buckets: the k ids given per row, then everything else (the tail):
    ``[log p_s[ids], log sum_{j not in ids} p_s[j]]`` with ``p_s = softmax(z / T)``; the tail is a logsumexp over the
    non-top-k entries (exact even when the tail mass is tiny)."""
    log_p = F.log_softmax(upcast_half(student_logits) / temperature, dim=-1)
    top = log_p.gather(-1, ids)
    tail = log_p.scatter(-1, ids, float("-inf")).logsumexp(dim=-1, keepdim=True)
    return torch.cat([top, tail], dim=-1)


@dataclass(frozen=True)
class ClosedForm:
    """A divergence's value and gradient by formula (`closed_form.divergence_and_grad`): per row
    ``s * D(z_s, z_t)`` and ``s * dD/dz_s`` for `kind` at `temperature` (``beta``: the JSD's), ``s`` = `scale`."""

    kind: str
    temperature: float
    beta: float
    scale: float

    def __call__(self, student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values, grad = divergence_and_grad(student, teacher, self.kind, self.temperature, self.beta)
        if self.scale != 1:
            values, grad = values * self.scale, grad.mul_(self.scale)
        return values, grad


class OutputSignal(Signal):
    """An output term ``S = sum_rows s * D(p_s, p_t)`` (module docstring). Subclasses set `name`, `weight_field` and
    implement `divergence`; the rest is shared by every output path."""

    is_output_term = True
    #: the temperature the distributions are softened at, and whether the term is times T^2 (Hinton 2015)
    temperature: float = 1.0
    scale_by_temperature_squared: bool = True
    #: whether `divergence` reads raw logits (not log-probabilities): no cache or span form can serve it
    reads_raw_logits: bool = False
    #: whether `divergence` reads the token that followed each row (`tokens`)
    needs_tokens: bool = False

    def divergence(self, student: torch.Tensor, teacher: torch.Tensor, tokens: torch.Tensor | None = None,
                   vocab: Any = None) -> torch.Tensor:  # pragma: no cover - interface
        """``D`` per row (``[n]``) of the student's and the teacher's log-distributions ``[n, V]`` at `temperature`
        (raw logits with `reads_raw_logits`); `tokens` ``[n]`` the token that followed each row; `vocab` the
        vocabulary map of two tokenizers (`alignment.VocabularyMap`) for rows over different vocabularies."""
        raise NotImplementedError

    @property
    def soft(self) -> bool:
        """Whether the term compares temperature-softened distributions (an ensemble then averages probabilities)."""
        return not self.reads_raw_logits

    @property
    def scale(self) -> float:
        """``s``: T^2 for a soft term that scales by it, else 1."""
        return float(self.temperature) ** 2 if self.soft and self.scale_by_temperature_squared else 1.0

    def closed_form(self) -> ClosedForm | None:
        """The term's value and gradient by formula for the fused paths, or None (autograd through `divergence`)."""
        return None

    @property
    def liger_beta(self) -> float | None:
        """The beta of Liger's fused JSD that computes this term (`output_kernel="liger"`), or None: no Liger kernel."""
        return None

    def check_spans(self) -> None:
        """Refuse, before training, to compare the span distributions of two tokenizers where the term cannot."""
        if self.reads_raw_logits or not self.works_across_tokenizers:
            raise ValueError(f"The {self.name} term cannot compare the distributions of two tokenizers over aligned "
                             "spans (it does not declare works_across_tokenizers, or reads raw logits).")

    def log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """``log softmax(z / T)`` in float32 (half-precision logits upcast)."""
        return F.log_softmax(upcast_half(logits) / self.temperature, dim=-1)

    def logits_rows(self, student: torch.Tensor, teacher: torch.Tensor,
                    tokens: torch.Tensor | None = None) -> torch.Tensor:
        """``s * D`` per row of two logit rows ``[n, V]`` (full logits or a chunk of the output layer)."""
        if self.reads_raw_logits:
            values = self.divergence(upcast_half(student), upcast_half(teacher), tokens)
        else:
            values = self.divergence(self.log_probs(student), self.log_probs(teacher), tokens)
        return values * self.scale

    def top_k_rows(self, student: torch.Tensor, targets: CachedTargets) -> torch.Tensor:
        """``s * D`` per row between the distributions coarsened to the teacher's top-k ids plus one tail bucket,
        ``P = [p[id_1], ..., p[id_k], 1 - sum_i p[id_i]]``: a proper divergence of the coarsened distributions, zero
        when the student's equals the teacher's. The teacher's stored log-probabilities (at T) are renormalised over
        the k + 1 buckets."""
        buckets = topk_bucket_log_probs(student, targets.ids.long(), self.temperature)
        teacher = torch.cat([targets.log_probs.float(), targets.tail_log_prob.float().unsqueeze(-1)], dim=-1)
        values = self.divergence(F.log_softmax(buckets, dim=-1), F.log_softmax(teacher.to(buckets.dtype), dim=-1))
        return values * self.scale

    def loss_sum(self, view: SignalView) -> torch.Tensor:
        """The term over the batch's counted rows, in the form the teacher's outputs came in."""
        if isinstance(view.teacher_targets, AlignedSpans):  # another tokenizer: over the batch's aligned spans
            return span_divergence_sum(view.student_logits, view.teacher_targets, self)
        if isinstance(view.teacher_targets, CachedTargets):
            return self.top_k_rows(view.student_logits[view.mask], view.teacher_targets).sum()
        student, teacher = view.counted_logits()
        if self.soft and student.shape[-1] == 1:
            raise ValueError(
                f"The {self.name} term compares softmax distributions, but the models have a single output (a "
                "regression head), whose softmax is constant. Use logits_loss='mse' for regression students."
            )
        return self.logits_rows(student, teacher, view.counted_tokens() if self.needs_tokens else None).sum()
