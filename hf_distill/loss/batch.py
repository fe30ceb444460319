"""One micro-batch's loss terms, through one path: count, run the student, ask the teacher source, compute the
output terms with the run's output strategy (`outputs`), then every other signal from one `SignalView`.

Each term is a sum over what it counts in the batch; ``BatchTerms.total`` weighs and scales them:
``L = sum_k w_k * S_k * scale[unit_k]`` with ``scale = 1 / N`` (N: what counts in the whole optimizer step).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from ..signals import Signal, SignalView
from ..signals.cross_vocab import AlignedSpans
from ..signals.gradients import FeatureTap
from ..signals.output import CachedTargets
from ..teachers import TeacherRequest, TeacherSource
from .accounting import Accounting, BatchCounts
from .outputs import ChunkedHead, FullLogits, OutputContext


@dataclass
class BatchTerms:
    """One forward pass of student (and teacher): per-term sums over counted positions, and what produced them."""

    sums: dict[str, torch.Tensor]
    measure: BatchCounts
    student_outputs: Any
    inverse_counts: dict[str, torch.Tensor]  # 1 / denominator per unit (`Accounting.inverse_counts`)
    #: the chunked path: ``sum_k w_k * S_k * scale_k`` over `fused_terms`, carrying their gradient (their entries in
    #: `sums` are detached, for logs)
    fused: torch.Tensor | None = None
    fused_terms: frozenset[str] = frozenset()
    agreement: torch.Tensor | None = None  # counted positions where student and teacher top-1 agree (evaluation)

    @property
    def counts(self) -> dict[str, torch.Tensor]:
        return self.measure.counts

    def total(self, weights: dict[str, float], units: dict[str, str]) -> torch.Tensor:
        """The weighted loss of the batch: ``sum_k w_k * S_k * scale[unit_k]`` (+ the fused terms)."""
        total = sum(
            weights[name] * value * self.inverse_counts[units[name]]
            for name, value in self.sums.items()
            if name not in self.fused_terms
        )
        return total + self.fused if self.fused is not None else total


class MicroBatchLoss:
    """Computes `BatchTerms` for the run's signals, teacher source and output strategy (all fixed for the run).

    Args:
        signals: the active ``(signal, weight)`` pairs; weights / units: per term (``"task"`` and each signal).
        source: the teacher source; output: the output strategy (`plan_output`); accounting: the run's counts.
        label_names: batch keys holding targets; feature_layer: `args.feature_layer`; vocab_mismatch: its setting.
    """

    def __init__(self, signals: list[tuple[Signal, float]], weights: dict[str, float], units: dict[str, str],
                 source: TeacherSource, output: FullLogits | ChunkedHead, accounting: Accounting,
                 label_names: tuple[str, ...], feature_layer: str | None, vocab_mismatch: str) -> None:
        self.signals = [signal for signal, _ in signals]
        self.weights, self.units = weights, units
        self.source, self.output, self.accounting = source, output, accounting
        self.full = output if isinstance(output, FullLogits) else FullLogits(label_names)
        self.label_names = label_names
        self.feature_layer, self.vocab_mismatch = feature_layer, vocab_mismatch
        self.output_signal = next((s for s in self.signals if s.is_output_term), None)
        self.options = {}
        if any(s.needs_hidden_states for s in self.signals):
            self.options["output_hidden_states"] = True
        if any(s.needs_attentions for s in self.signals):
            self.options["output_attentions"] = True
        self.want_features = any(s.needs_features for s in self.signals)
        self.soft = getattr(self.output_signal, "soft", True)
        self.teacher_in_training = any(s.needs_teacher for s in self.signals)

    def terms(self, model: nn.Module, inputs: Mapping[str, Any], training: bool,
              num_items_in_batch: Any = None, full_logits: bool = False) -> BatchTerms:
        """Every active term of one batch as a sum over what it counts (`full_logits`: never the chunked path, for
        callers that read the student's logits)."""
        label_name = self.label_names[0]
        labels = inputs.get(label_name)
        want_task = self.weights["task"] > 0 and (training or labels is not None)
        if want_task and labels is None:
            raise ValueError(
                f"task_weight={self.weights['task']} turns the task loss on, but this batch has no `{label_name}` "
                f"(keys: {sorted(inputs)}). Add labels to the dataset, or set task_weight=0."
            )
        measure = self.accounting.measure(inputs)
        inverse_counts = self.accounting.inverse_counts(measure.counts, num_items_in_batch)
        strategy = self.full if full_logits else self.output
        drop = self.source.batch_only_keys()
        with FeatureTap(model, self.feature_layer) if self.want_features else nullcontext() as tap:
            student_outputs, extra = strategy.forward(model, inputs, measure, want_task, drop, self.options)
        teacher = None
        if self.source.has_teacher and (not training or self.teacher_in_training):
            request = TeacherRequest(measure.mask, self.options, strategy.head_only, self.feature_layer,
                                     self.want_features, self.soft, drop=(*self.label_names, *drop))
            teacher = self.source.outputs(inputs, request)
        context = OutputContext(
            measure, labels if want_task else None, teacher, self.output_signal,
            lambda name: self.weights[name] * inverse_counts[self.units[name]], training, self.vocab_mismatch, model,
            labels if torch.is_tensor(labels) else None,
        )
        result = strategy.terms(context, student_outputs, extra)
        cache = {}
        if self.want_features:
            cache = {"student_features": tap.value,
                     "teacher_features": teacher.features if teacher is not None else None}
        view = SignalView(
            result.student_logits, result.teacher_logits, measure.mask, inputs, student_outputs,
            teacher.outputs if teacher is not None else None,
            student_model=model, teacher_model=self.source.first_model, labels=labels, unit=measure.unit,
            training=training, label_names=self.label_names, cache=cache,
            teacher_targets=teacher.form((CachedTargets, AlignedSpans)) if teacher is not None else None,
            token_positions=measure.tokens,
        )
        sums = result.sums
        for signal in self.signals:
            if strategy.fuses(signal) or (signal.needs_teacher and teacher is None):
                continue  # computed by the output strategy / an evaluation batch without teacher outputs
            sums[signal.name] = signal.loss_sum(view)
        return BatchTerms(sums, measure, student_outputs, inverse_counts, result.fused, result.fused_terms,
                          result.agreement)
