"""Output (logit) distillation: divergences between teacher and student output distributions.

Every function takes logits of shape ``[N, V]`` (one row per counted position) and returns one value per row
(half-precision inputs are upcast to float32). Rows are reduced by the trainer, which knows how many positions count in the whole accumulated batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..options import check_choice
from .base import BuildContext, Signal, SignalView, upcast_half
from .cross_vocab import CROSS_LOSSES, aligned_loss_sum, same_vocabulary_distance
from .divergences import jsd_from_log_probs, kl_from_log_probs
from .registry import register_signal

#: The `logits_loss` kinds, in the order the docs list them.
LOGITS_LOSSES: tuple[str, ...] = ("forward_kl", "reverse_kl", "jsd", "tvd", "mse", "sampled_token", "uld", "hybrid")
#: The kinds that compare temperature-softened distributions (and so take the T^2 factor).
SOFT_LOSSES: frozenset[str] = frozenset({"forward_kl", "reverse_kl", "jsd", "tvd", "sampled_token", "uld", "hybrid"})
#: The kinds that read the token each position was followed by (the sampled one, on-policy).
TOKEN_LOSSES: frozenset[str] = frozenset({"sampled_token"})


def _log_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.log_softmax(upcast_half(logits) / temperature, dim=-1)


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Forward KL per row: KL(p_t || p_s) = sum_v p_t (log p_t - log p_s), with p = softmax(z / T) (Hinton 2015)."""
    return kl_from_log_probs(_log_softmax(teacher_logits, temperature), _log_softmax(student_logits, temperature))


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Reverse KL per row: KL(p_s || p_t) = sum_v p_s (log p_s - log p_t), with p = softmax(z / T)."""
    return kl_from_log_probs(_log_softmax(student_logits, temperature), _log_softmax(teacher_logits, temperature))


def generalized_jsd(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 0.5, temperature: float = 1.0
) -> torch.Tensor:
    """Generalized JSD per row (GKD, Agarwal et al. 2024, eq. 1).

    ``JSD_beta = beta * KL(p_t || m) + (1 - beta) * KL(p_s || m)`` with ``m = beta * p_t + (1 - beta) * p_s``;
    beta = 0 is defined as KL(p_t || p_s) and beta = 1 as KL(p_s || p_t), as in TRL's `GKDTrainer`.
    """
    return jsd_from_log_probs(_log_softmax(student_logits, temperature), _log_softmax(teacher_logits, temperature),
                              beta)


def total_variation(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Total variation distance per row: TVD = 0.5 * sum_v |p_t - p_s|, with p = softmax(z / T)."""
    p_s = _log_softmax(student_logits, temperature).exp()
    p_t = _log_softmax(teacher_logits, temperature).exp()
    return 0.5 * (p_t - p_s).abs().sum(dim=-1)


def sampled_token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tokens: torch.Tensor,
                     temperature: float = 1.0) -> torch.Tensor:
    """The sampled-token estimator of reverse KL per row (on-policy distillation: Thinking Machines 2025, Qwen3):
    value ``r = log p_s(y) - log p_t(y)`` at the token y that followed (sampled from the student: E_y[r] =
    KL(p_s || p_t)), gradient that of the policy-gradient loss ``-A * log p_s(y)`` with the advantage ``A = -r`` held
    constant, whose expectation over ``y ~ p_s`` is the gradient of KL(p_s || p_t). Only ``p_t(y)`` is read from the
    teacher."""
    index = tokens.long().unsqueeze(-1)
    log_s = _log_softmax(student_logits, temperature).gather(-1, index).squeeze(-1)
    log_t = _log_softmax(teacher_logits, temperature).gather(-1, index).squeeze(-1)
    r = (log_s - log_t).detach()
    return r + r * (log_s - log_s.detach())


def logits_mse(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the raw outputs per row: mean_v (z_s - z_t)^2 (Bucilua 2006; ||y_s - y_t||^2 for one output)."""
    return (upcast_half(student_logits) - upcast_half(teacher_logits)).pow(2).mean(dim=-1)


def logits_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
    scale_by_temperature_squared: bool = True,
    tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """The per-row `kind` divergence, times T^2 for soft kinds when `scale_by_temperature_squared` (Hinton 2015);
    `tokens` (one per row) are the tokens that followed, for ``"sampled_token"``."""
    if kind == "mse":
        return logits_mse(student_logits, teacher_logits)
    if kind == "forward_kl":
        values = forward_kl(student_logits, teacher_logits, temperature)
    elif kind == "reverse_kl":
        values = reverse_kl(student_logits, teacher_logits, temperature)
    elif kind == "jsd":
        values = generalized_jsd(student_logits, teacher_logits, jsd_beta, temperature)
    elif kind == "tvd":
        values = total_variation(student_logits, teacher_logits, temperature)
    elif kind == "sampled_token":
        if tokens is None:
            raise ValueError("logits_loss='sampled_token' reads the token that followed each position: pass `tokens`.")
        values = sampled_token_kl(student_logits, teacher_logits, tokens, temperature)
    elif kind in CROSS_LOSSES:  # (one vocabulary here: across tokenizers the spans go through `aligned_loss_sum`)
        values = same_vocabulary_distance(kind, student_logits, teacher_logits, temperature, jsd_beta)
    else:
        check_choice("logits_loss", kind, LOGITS_LOSSES)
        raise AssertionError(kind)  # (a kind in LOGITS_LOSSES without a branch above)
    return values * (temperature**2) if scale_by_temperature_squared else values


@register_signal
class LogitsSignal(Signal):
    """Teacher-student output divergence summed over counted positions: sum_i D(z_s[i], z_t[i]) (times T^2 if soft).

    The output term: the run's output strategy computes it from full logits or, chunk by chunk, from the output layer
    (`signals.chunked`); an offline top-k teacher cache serves it for every soft kind.
    """

    name = "logits"
    weight_field = "logits_weight"
    build_order = 10
    option_fields = ("logits_loss", "temperature", "jsd_beta", "scale_by_temperature_squared", "hybrid_matched_weight")
    option_choices = {"logits_loss": LOGITS_LOSSES}
    is_output_term = True
    works_from_cache = True
    works_across_tokenizers = True  # (logits_loss uld / hybrid, over aligned spans)

    def __init__(
        self, kind: str, temperature: float, jsd_beta: float = 0.5, scale_by_temperature_squared: bool = True,
        hybrid_matched_weight: float | None = None,
    ) -> None:
        self.kind = kind  # (checked by `check_options` with the settings, and by `logits_divergence` when used)
        self.temperature = temperature
        self.jsd_beta = jsd_beta
        self.scale_by_temperature_squared = scale_by_temperature_squared
        self.hybrid_matched_weight = hybrid_matched_weight

    @classmethod
    def from_config(cls, context: BuildContext) -> "LogitsSignal":
        args = context.args
        return cls(args.logits_loss, args.temperature, args.jsd_beta, args.scale_by_temperature_squared,
                   getattr(args, "hybrid_matched_weight", None))

    @property
    def needs_tokens(self) -> bool:
        """Whether the divergence reads the token that followed each counted position (its label)."""
        return self.kind in TOKEN_LOSSES

    @property
    def soft(self) -> bool:
        """Whether the term compares temperature-softened distributions (an ensemble then averages probabilities)."""
        return self.kind in SOFT_LOSSES

    def loss_sum(self, view: SignalView) -> torch.Tensor:
        if view.aligned is not None:  # a teacher with another tokenizer: over the batch's aligned spans
            return aligned_loss_sum(view.student_logits, view.aligned, self.kind, self.temperature, self.jsd_beta,
                                    self.hybrid_matched_weight, self.scale_by_temperature_squared)
        if view.cached_targets is not None:
            targets = view.cached_targets
            return bucket_divergence(
                view.student_logits[view.mask], targets.ids, targets.log_probs, targets.tail_log_prob, self.kind,
                self.temperature, self.jsd_beta, self.scale_by_temperature_squared,
            ).sum()
        student, teacher = view.counted_logits()
        tokens = view.counted_tokens() if self.needs_tokens else None
        if self.kind in SOFT_LOSSES and student.shape[-1] == 1:
            raise ValueError(
                f"logits_loss={self.kind!r} compares softmax distributions, but the models have a single output "
                "(a regression head), whose softmax is constant. Use logits_loss='mse' for regression students."
            )
        values = logits_divergence(
            student, teacher, self.kind, self.temperature, self.jsd_beta, self.scale_by_temperature_squared, tokens
        )
        return values.sum()


def topk_bucket_log_probs(student_logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The student's log-probabilities over k + 1 buckets: the k ids given per row, then everything else (the tail):
    ``[log p_s[ids], log sum_{j not in ids} p_s[j]]`` with ``p_s = softmax(z / T)``; the tail is a logsumexp over the
    non-top-k entries (exact even when the tail mass is tiny)."""
    log_p = _log_softmax(student_logits, temperature)
    top = log_p.gather(-1, ids)
    tail = log_p.scatter(-1, ids, float("-inf")).logsumexp(dim=-1, keepdim=True)
    return torch.cat([top, tail], dim=-1)


def check_cacheable(kind: str) -> None:
    """A top-k teacher cache holds temperature-softened log-probabilities: only the soft kinds can learn from it."""
    if kind in CROSS_LOSSES:
        raise ValueError(
            f"logits_loss={kind!r} sorts the teacher's whole distribution, which a top-k cache does not hold: use a "
            "live teacher, or forward_kl / reverse_kl / jsd with the cache."
        )
    if kind in TOKEN_LOSSES:
        raise ValueError(
            f"logits_loss={kind!r} reads the teacher's log-probability of every sampled token, which a top-k cache does "
            "not hold for tokens outside its top k: use a live teacher, or reverse_kl / jsd with the cache."
        )
    if kind not in SOFT_LOSSES:
        raise ValueError(
            f"logits_loss={kind!r} compares raw logits, which a top-k teacher cache does not hold: use one of "
            f"{', '.join(k for k in LOGITS_LOSSES if k in SOFT_LOSSES)} with a cache."
        )


def bucket_divergence(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    teacher_tail_log_prob: torch.Tensor,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
    scale_by_temperature_squared: bool = True,
) -> torch.Tensor:
    """The `kind` divergence per row between teacher and student distributions coarsened to the teacher's top-k ids
    plus one tail bucket (an offline top-k teacher cache): D(P_t || P_s) with
    ``P = [p[id_1], ..., p[id_k], 1 - sum_i p[id_i]]``, teacher log-probabilities stored at temperature T (the
    stored values are renormalised over the k + 1 buckets). A proper divergence of the coarsened distributions: zero
    when the student's distribution equals the teacher's. Times T^2 when `scale_by_temperature_squared`."""
    check_cacheable(kind)
    student = topk_bucket_log_probs(student_logits, teacher_ids.long(), temperature)
    teacher = torch.cat([teacher_log_probs.float(), teacher_tail_log_prob.float().unsqueeze(-1)], dim=-1)
    teacher = teacher.to(student.dtype)
    # Both are already log-probabilities at T: compare them at temperature 1 (log_softmax renormalises).
    values = logits_divergence(student, teacher, kind, 1.0, jsd_beta, scale_by_temperature_squared=False)
    return values * (temperature**2) if scale_by_temperature_squared else values
