"""Output (logit) distillation: the `logits_loss` divergences between teacher and student output distributions.

`LogitsSignal.divergence` is their one definition (on log-distributions at the temperature; `signals.output` hands it
every form of the teacher's outputs). The functions below take logits of shape ``[N, V]`` (one row per counted
position) and return one value per row through it (half-precision inputs are upcast to float32). Rows are reduced by
the trainer, which knows how many positions count in the whole accumulated batch.
"""

from __future__ import annotations

from typing import Any

import torch

from ..checks.options import check_choice
from .base import BuildContext
from .closed_form import CLOSED_FORM_KINDS
from .cross_vocab import CROSS_LOSSES, AlignedSpans, hybrid_distance, sorted_l1, span_divergence_sum
from .divergences import jsd_from_log_probs, kl_from_log_probs, sampled_token_estimate, tvd_from_log_probs
from .output import CachedTargets, ClosedForm, OutputSignal
from .registry import register_signal

#: The `logits_loss` kinds, in the order the docs list them.
LOGITS_LOSSES: tuple[str, ...] = ("forward_kl", "reverse_kl", "jsd", "tvd", "mse", "sampled_token", "uld", "hybrid")
#: The kinds that compare temperature-softened distributions (and so take the T^2 factor).
SOFT_LOSSES: frozenset[str] = frozenset({"forward_kl", "reverse_kl", "jsd", "tvd", "sampled_token", "uld", "hybrid"})
#: The kinds that read the token each position was followed by (the sampled one, on-policy).
TOKEN_LOSSES: frozenset[str] = frozenset({"sampled_token"})


@register_signal
class LogitsSignal(OutputSignal):
    """Teacher-student output divergence summed over counted positions: sum_i D(z_s[i], z_t[i]) (times T^2 if soft),
    D the `logits_loss` kind (`divergence`; every output path of `signals.output` calls it)."""

    name = "logits"
    weight_field = "logits_weight"
    build_order = 10
    option_fields = ("logits_loss", "temperature", "jsd_beta", "scale_by_temperature_squared", "hybrid_matched_weight")
    option_choices = {"logits_loss": LOGITS_LOSSES}
    works_from_cache = True
    works_across_tokenizers = True  # (logits_loss uld / hybrid, over aligned spans)

    def __init__(
        self, kind: str, temperature: float = 1.0, jsd_beta: float = 0.5, scale_by_temperature_squared: bool = True,
        hybrid_matched_weight: float | None = None,
    ) -> None:
        self.kind = kind  # (checked by `check_options` with the settings, and by `divergence` when used)
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
    def reads_raw_logits(self) -> bool:
        """``mse`` compares raw logits; every other kind softened distributions."""
        return self.kind not in SOFT_LOSSES

    def divergence(self, student: torch.Tensor, teacher: torch.Tensor, tokens: torch.Tensor | None = None,
                   vocab: Any = None) -> torch.Tensor:
        """The `kind` per row of log-distributions at T (raw logits for ``mse``): ``forward_kl`` KL(p_t || p_s) =
        sum_v p_t (log p_t - log p_s) (Hinton 2015), ``reverse_kl`` KL(p_s || p_t), ``jsd`` the generalized JSD (GKD,
        `jsd_from_log_probs`), ``tvd`` 0.5 * sum_v |p_t - p_s|, ``sampled_token`` the sampled-token estimator of
        reverse KL at `tokens` (`sampled_token_estimate`), ``uld`` / ``hybrid`` (`cross_vocab`; over two
        vocabularies with `vocab`), ``mse`` mean_v (z_s - z_t)^2 (Bucilua 2006)."""
        kind = self.kind
        if kind == "forward_kl":
            return kl_from_log_probs(teacher, student)
        if kind == "reverse_kl":
            return kl_from_log_probs(student, teacher)
        if kind == "jsd":
            return jsd_from_log_probs(student, teacher, self.jsd_beta)
        if kind == "tvd":
            return tvd_from_log_probs(student, teacher)
        if kind == "mse":
            return (student - teacher).pow(2).mean(dim=-1)
        if kind == "sampled_token":
            if tokens is None:
                raise ValueError("logits_loss='sampled_token' reads the token that followed each position: pass "
                                 "`tokens`.")
            return sampled_token_estimate(student, teacher, tokens)
        if kind == "uld":
            return sorted_l1(student.exp(), teacher.exp())
        if kind == "hybrid":
            return hybrid_distance(student.exp(), teacher.exp(), vocab, self.jsd_beta, self.hybrid_matched_weight)
        check_choice("logits_loss", kind, LOGITS_LOSSES)
        raise AssertionError(kind)  # (a kind in LOGITS_LOSSES without a branch above)

    def closed_form(self) -> ClosedForm | None:
        if self.kind not in CLOSED_FORM_KINDS:
            return None
        return ClosedForm(self.kind, float(self.temperature), float(self.jsd_beta), self.scale)

    @property
    def liger_beta(self) -> float | None:
        return {"jsd": self.jsd_beta, "forward_kl": 0.0, "reverse_kl": 1.0}.get(self.kind)

    def top_k_rows(self, student: torch.Tensor, targets: CachedTargets) -> torch.Tensor:
        check_cacheable(self.kind)
        return super().top_k_rows(student, targets)

    def check_spans(self) -> None:
        """Refuse a kind that compares the two distributions token by token over the aligned spans of two
        tokenizers."""
        if self.kind not in CROSS_LOSSES:
            raise ValueError(
                f"logits_loss={self.kind!r} compares the two models' distributions token by token, which needs one "
                f"vocabulary; across tokenizers use one of {sorted(CROSS_LOSSES)}."
            )


def logits_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
    scale_by_temperature_squared: bool = True,
    tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """The per-row `kind` divergence of two logit rows (`LogitsSignal.logits_rows`), times T^2 for soft kinds when
    `scale_by_temperature_squared` (Hinton 2015); `tokens` (one per row): the tokens that followed, for
    ``"sampled_token"``."""
    return LogitsSignal(kind, temperature, jsd_beta, scale_by_temperature_squared).logits_rows(
        student_logits, teacher_logits, tokens)


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Forward KL per row: KL(p_t || p_s) = sum_v p_t (log p_t - log p_s), with p = softmax(z / T) (Hinton 2015)."""
    return logits_divergence(student_logits, teacher_logits, "forward_kl", temperature, scale_by_temperature_squared=False)


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Reverse KL per row: KL(p_s || p_t) = sum_v p_s (log p_s - log p_t), with p = softmax(z / T)."""
    return logits_divergence(student_logits, teacher_logits, "reverse_kl", temperature, scale_by_temperature_squared=False)


def generalized_jsd(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 0.5, temperature: float = 1.0
) -> torch.Tensor:
    """Generalized JSD per row (GKD, Agarwal et al. 2024, eq. 1): ``beta * KL(p_t || m) + (1 - beta) * KL(p_s || m)``
    with ``m = beta * p_t + (1 - beta) * p_s``; beta = 0 is KL(p_t || p_s) and beta = 1 KL(p_s || p_t), as in TRL's
    `GKDTrainer`."""
    return logits_divergence(student_logits, teacher_logits, "jsd", temperature, beta, False)


def total_variation(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Total variation distance per row: TVD = 0.5 * sum_v |p_t - p_s|, with p = softmax(z / T)."""
    return logits_divergence(student_logits, teacher_logits, "tvd", temperature, scale_by_temperature_squared=False)


def sampled_token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tokens: torch.Tensor,
                     temperature: float = 1.0) -> torch.Tensor:
    """The sampled-token estimator of reverse KL per row at the token that followed (`sampled_token_estimate`)."""
    return logits_divergence(student_logits, teacher_logits, "sampled_token", temperature,
                             scale_by_temperature_squared=False, tokens=tokens)


def logits_mse(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the raw outputs per row: mean_v (z_s - z_t)^2 (Bucilua 2006; ||y_s - y_t||^2 for one
    output)."""
    return logits_divergence(student_logits, teacher_logits, "mse")


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
    plus one tail bucket (an offline top-k teacher cache: `OutputSignal.top_k_rows`), times T^2 when
    `scale_by_temperature_squared`."""
    return LogitsSignal(kind, temperature, jsd_beta, scale_by_temperature_squared).top_k_rows(
        student_logits, CachedTargets(teacher_ids, teacher_log_probs, teacher_tail_log_prob))


def aligned_loss_sum(student_logits: torch.Tensor, spans: AlignedSpans, kind: str, temperature: float = 1.0,
                     beta: float = 0.5, matched_weight: float | None = None,
                     scale_by_temperature_squared: bool = True) -> torch.Tensor:
    """``sum_spans s * D(P_s, P_t)`` of the aligned span distributions, D = ``uld`` or ``hybrid``
    (`cross_vocab.span_divergence_sum`)."""
    signal = LogitsSignal(kind, temperature, beta, scale_by_temperature_squared, matched_weight)
    return span_divergence_sum(student_logits, spans, signal)
