"""Output losses between two vocabularies, over aligned spans (`hf_distill.data.alignment`).

For a span whose tokens y_1..y_k are predicted at positions p_1..p_k, a model's span distribution is the chain rule
``P(v) = p(v | prefix, y_<k) * prod_{j<k} p(y_j | prefix, y_<j)`` (its last position's distribution times the
probabilities of the span's earlier tokens; GOLD's "bayesian" merge): the entry of the span's last token is the
probability of the whole span. Both sides condition on the same text before the span.

- ``uld`` (Universal Logit Distillation, Boizard et al. 2024): ``sum_i |sort(P_s)_i - sort(P_t)_i|``, both sorted in
  decreasing order and the shorter padded with zeros (the Wasserstein-1 distance of the sorted distributions): no
  token correspondence needed.
- ``hybrid`` (in the manner of TRL's GOLD): tokens spelled the same in both vocabularies (`VocabularyMap`) compared
  directly, the rest by the sorted distance:
  ``w * JSD_beta(P_s[matched], P_t[matched]) + (1 - w) * ULD(P_s[unmatched], P_t[unmatched])`` with
  ``w = |matched| / V_t`` unless given, probabilities clamped at 1e-8 inside the logs (as GOLD). With one vocabulary
  (every token mapped) it is the matched JSD alone.
Teacher logits are computed a chunk of spans at a time from its output layer, so no ``[tokens, V_t]`` tensor of the
whole batch exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..data.alignment import VocabularyMap
from .base import upcast_half
from .divergences import jsd_from_log_probs

#: The output-term kinds that compare distributions over different vocabularies.
CROSS_LOSSES: frozenset[str] = frozenset({"uld", "hybrid"})
#: Probabilities are clamped here inside the logs of the matched JSD (as GOLD).
CLAMP = 1e-8


def _top(p: torch.Tensor, n: int) -> torch.Tensor:
    """The n largest entries of each row, in decreasing order (a full sort when n is the row's length)."""
    if p.shape[-1] == n:
        return p.sort(dim=-1, descending=True).values
    return p.topk(n, dim=-1, sorted=True).values


def sorted_l1(p_s: torch.Tensor, p_t: torch.Tensor) -> torch.Tensor:
    """ULD per row: ``sum_i |sort(p_s)_i - sort(p_t)_i|`` over probabilities sorted in decreasing order, the shorter
    padded with zeros (its missing entries contribute the longer one's remaining mass); only the n = min(V_s, V_t)
    largest entries of the longer side are sorted."""
    n = min(p_s.shape[-1], p_t.shape[-1])
    a, b = _top(p_s, n), _top(p_t, n)
    return (a - b).abs().sum(-1) + (p_s.sum(-1) - a.sum(-1)) + (p_t.sum(-1) - b.sum(-1))


def clamped_jsd(p_s: torch.Tensor, p_t: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """Generalized JSD per row on (possibly unnormalised) probabilities clamped at 1e-8:
    ``beta * KL(p_t || m) + (1 - beta) * KL(p_s || m)``, ``m = beta * p_t + (1 - beta) * p_s``, with
    ``KL(a || b) = sum a (log a - log b)``; beta = 0 is KL(p_t || p_s), beta = 1 KL(p_s || p_t)."""
    return jsd_from_log_probs(p_s.clamp_min(CLAMP).log(), p_t.clamp_min(CLAMP).log(), beta)


def hybrid_distance(p_s: torch.Tensor, p_t: torch.Tensor, vocab: VocabularyMap | None, beta: float = 0.5,
                    matched_weight: float | None = None) -> torch.Tensor:
    """The hybrid per row (module docstring): mapped ids by the clamped JSD, the rest by `sorted_l1`; `vocab` None
    or an identity map: one vocabulary, the JSD over all of it."""
    if vocab is None or vocab.identity:
        return clamped_jsd(p_s, p_t, beta)
    device = p_s.device
    s_mask, t_mask = vocab.masks(p_s.shape[-1], p_t.shape[-1], device)
    weight = len(vocab) / p_t.shape[-1] if matched_weight is None else matched_weight
    total = 0.0
    if weight > 0:
        total = weight * clamped_jsd(p_s[:, vocab.student_ids.to(device)], p_t[:, vocab.teacher_ids.to(device)], beta)
    if weight < 1:
        total = total + (1 - weight) * sorted_l1(p_s[:, ~s_mask], p_t[:, ~t_mask])
    return total


def span_log_probs(logits: torch.Tensor, tokens: torch.Tensor, group: torch.Tensor, last: torch.Tensor,
                   groups: int, temperature: float) -> torch.Tensor:
    """Each span's log distribution ``[groups, V]`` from the logits of its predicting positions (``[n, V]``, spans in
    order): the last position's ``log softmax(z / T)`` plus the log-probabilities of the span's earlier tokens
    (`tokens[i]` is the token row i predicts, `group[i]` its span, `last[g]` the row of span g's last token)."""
    z = upcast_half(logits)
    log_p = F.log_softmax(z if temperature == 1 else z / temperature, dim=-1)
    picked = log_p.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
    earlier = torch.ones_like(picked, dtype=torch.bool)
    earlier[last] = False
    extra = torch.zeros(groups, dtype=log_p.dtype, device=log_p.device)
    extra = extra.index_add(0, group[earlier], picked[earlier])
    return log_p[last] + extra.unsqueeze(-1)


@dataclass
class SpanSide:
    """One model's side of a batch's aligned spans, in span order: the rows predicting each span's tokens
    (`rows`: flat positions into the student's ``[B * T]`` logits; the teacher's are its own hidden rows 0..n-1),
    the token each row predicts, the span of each row, and the first row of each span (plus a final end)."""

    rows: torch.Tensor
    tokens: torch.Tensor
    group: torch.Tensor
    starts: torch.Tensor  # [G + 1]

    def chunk(self, g0: int, g1: int) -> tuple[slice, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows of spans g0..g1-1: their slice, tokens, span index (from 0) and last rows (from 0)."""
        a, b = int(self.starts[g0]), int(self.starts[g1])
        last = self.starts[g0 + 1: g1 + 1] - 1 - a
        return slice(a, b), self.tokens[a:b], self.group[a:b] - g0, last


@dataclass
class SpanPooling:
    """Every aligned span of a batch for hidden-state matching: the flat token positions of each side (student
    ``[B * T]``, teacher ``[B * T_t]``) and the span of each; `mean` pools a ``[B, T, H]`` state into ``[spans, H]``
    (the mean over each span's tokens); `student_counts` the student tokens of each span (its weight)."""

    student_index: torch.Tensor
    student_group: torch.Tensor
    teacher_index: torch.Tensor
    teacher_group: torch.Tensor
    spans: int

    @staticmethod
    def _mean(states: torch.Tensor, index: torch.Tensor, group: torch.Tensor, spans: int) -> torch.Tensor:
        rows = states.reshape(-1, states.shape[-1])[index]
        sums = rows.new_zeros(spans, rows.shape[-1]).index_add(0, group, rows)
        return sums / torch.bincount(group, minlength=spans).clamp_min(1).unsqueeze(-1).to(rows.dtype)

    def student(self, states: torch.Tensor) -> torch.Tensor:
        return self._mean(states, self.student_index, self.student_group, self.spans)

    def teacher(self, states: torch.Tensor) -> torch.Tensor:
        return self._mean(states, self.teacher_index, self.teacher_group, self.spans)

    @property
    def student_counts(self) -> torch.Tensor:
        return torch.bincount(self.student_group, minlength=self.spans)


@dataclass
class AlignedSpans:
    """A batch's counted aligned spans (from a cross-tokenizer teacher source): both sides' rows, the teacher's
    logits for any of its rows (`teacher_logits(slice)`, computed under no grad), the vocabulary map and how many
    teacher rows one chunk may hold (0: all at once)."""

    student: SpanSide
    teacher: SpanSide
    teacher_logits: Callable[[slice], torch.Tensor]
    vocab: VocabularyMap | None
    chunk_rows: int = 0
    pooling: SpanPooling | None = None  #: every span, for hidden-state matching (when a hidden signal is on)

    def chunks(self) -> list[tuple[int, int]]:
        """Consecutive span ranges whose teacher rows fit `chunk_rows` (refused when one span alone does not)."""
        starts = self.teacher.starts.tolist()
        sizes = [b - a for a, b in zip(starts, starts[1:])]
        if not self.chunk_rows:
            return [(0, len(sizes))] if sizes else []
        if sizes and max(sizes) > self.chunk_rows:
            raise ValueError(
                f"logits_chunk_size={self.chunk_rows} cannot hold one aligned span of {max(sizes)} teacher tokens: "
                f"raise it to at least {max(sizes)}, or use 'auto'."
            )
        ranges, g0, rows = [], 0, 0
        for g, size in enumerate(sizes):
            if rows + size > self.chunk_rows:
                ranges.append((g0, g))
                g0, rows = g, 0
            rows += size
        if sizes:
            ranges.append((g0, len(sizes)))
        return ranges


def span_divergence_sum(student_logits: torch.Tensor, spans: AlignedSpans, signal: Any) -> torch.Tensor:
    """``sum_spans s * D(P_s, P_t)`` of the span distributions (`span_log_probs` at the signal's temperature) with
    the output signal's divergence over the two vocabularies (`signal.divergence(..., vocab=spans.vocab)`) and its
    scale ``s`` (T^2 when it scales by it); the teacher's logits a chunk of spans at a time."""
    signal.check_spans()
    temperature = signal.temperature
    flat = student_logits.reshape(-1, student_logits.shape[-1])
    # zero when no span counts, still on the student's graph (a micro-batch may have no span: its backward runs)
    total = (flat.sum() * 0).to(torch.float64 if flat.dtype == torch.float64 else torch.float32)
    for g0, g1 in spans.chunks():
        s_rows, s_tok, s_group, s_last = spans.student.chunk(g0, g1)
        t_rows, t_tok, t_group, t_last = spans.teacher.chunk(g0, g1)
        log_s = span_log_probs(flat[spans.student.rows[s_rows]], s_tok, s_group, s_last, g1 - g0, temperature)
        with torch.no_grad():
            log_t = span_log_probs(spans.teacher_logits(t_rows), t_tok, t_group, t_last, g1 - g0, temperature)
        total = total + signal.divergence(log_s, log_t, vocab=spans.vocab).sum()
    return total * signal.scale


def describe_vocab(vocab: Any) -> str:
    """A one-line summary of a vocabulary map, for logs."""
    if vocab is None or vocab.identity:
        return "one shared vocabulary"
    return (f"{len(vocab):,} tokens spelled the same in both vocabularies ({len(vocab) / vocab.teacher_size:.1%} of "
            f"the teacher's {vocab.teacher_size:,}, {len(vocab) / vocab.student_size:.1%} of the student's "
            f"{vocab.student_size:,})")
