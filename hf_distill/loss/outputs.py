"""How the output terms (the task loss and the output term, e.g. the logits KL) are computed: the run's output
strategy, chosen once (`plan_output`).

- `FullLogits`: the models return full logits ``[..., V]``; the task loss comes from them (or from the loss the
  student returns), the output term reads them like every other signal.
- `ChunkedHead`: causal LMs; each model returns its final hidden states, and its last position's logits on its first
  batch only (``logits_to_keep=1``, checked once against our output layer; then an empty index); the task and output
  terms are computed chunk by chunk from those (`kernels.chunked.chunked_head_losses`), so no ``[tokens, V]`` tensor
  exists.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn
from transformers.utils import logging

from ..checks.before_training import check_output_sizes
from ..kernels.chunked import (
    FinalHiddenTap,
    HeadCheck,
    OutputHead,
    OutputTerms,
    auto_chunk_size,
    chunked_head_losses,
    chunking_obstacle,
    output_head,
)
from ..kernels.compiled import CompiledOutputTerms
from ..kernels.liger import liger_head_losses, liger_obstacle
from ..modeling import accepts_input, describe, model_inputs, output_logits, output_loss
from ..positions import PositionUnit, align_labels
from ..signals import Signal, task_loss_sum
from ..signals.output import CachedTargets
from ..speed.performance import compile_obstacle
from ..teachers import CachedTeacher, TeacherHeads, TeacherLogits, TeacherOutputs
from .accounting import BatchCounts

logger = logging.get_logger(__name__)


@dataclass
class OutputResult:
    """The output terms of one batch: per-term sums (detached where `fused` carries their gradient), the fused
    weighted loss ``sum_k c_k * S_k`` of the chunked terms, the names it covers, the (shared-vocabulary) logits the
    other signals read, and the top-1 agreement with the teacher on evaluation batches."""

    sums: dict[str, torch.Tensor]
    student_logits: torch.Tensor | None = None
    teacher_logits: torch.Tensor | None = None
    fused: torch.Tensor | None = None
    fused_terms: frozenset[str] = frozenset()
    agreement: torch.Tensor | None = None


@dataclass
class OutputContext:
    """What a strategy reads to compute the output terms of one batch."""

    measure: BatchCounts
    labels: torch.Tensor | None  # the targets when the task term is on, else None
    teacher: TeacherOutputs | None
    output_signal: Signal | None
    coefficient: Callable[[str], torch.Tensor]  # term -> weight * 1 / denominator
    training: bool
    vocab_mismatch: str
    student: nn.Module
    tokens: torch.Tensor | None = None  # the batch's labels whatever the task term (the tokens that followed)


class FullLogits:
    """The plain path: full logits from every model."""

    head_only = False

    def __init__(self, label_names: tuple[str, ...]) -> None:
        self.label_names = label_names

    def fuses(self, signal: Signal) -> bool:
        return False

    def forward(self, model: nn.Module, inputs: Mapping[str, Any], measure: BatchCounts, want_task: bool,
                drop: tuple[str, ...], options: dict[str, bool]) -> tuple[Any, bool]:
        """The student's outputs, and whether it was given the labels (its own loss is then the task loss)."""
        pass_labels = want_task and accepts_input(model, self.label_names[0])
        drop = drop if pass_labels else (*self.label_names, *drop)
        outputs = model(**model_inputs(model, inputs, drop=drop), **options)
        logits = output_logits(outputs)
        if measure.mask.shape != logits.shape[:-1]:
            raise ValueError(
                f"The student returned outputs of shape {tuple(logits.shape)}, but the batch was counted as "
                f"{measure.unit.value} positions of shape {tuple(measure.mask.shape)}. Token-level models need "
                "per-token labels (-100 for ignored tokens) or an attention_mask; sequence-level models one output row "
                "per example."
            )
        return outputs, pass_labels

    def terms(self, context: OutputContext, outputs: Any, pass_labels: bool) -> OutputResult:
        measure, teacher = context.measure, context.teacher
        student_logits = output_logits(outputs)
        sums: dict[str, torch.Tensor] = {}
        if context.labels is not None:
            model_loss = output_loss(outputs) if pass_labels else None
            sums["task"] = task_loss_sum(student_logits, context.labels, measure.labelled, measure.unit,
                                         model_loss=model_loss)
        full = teacher.form(TeacherLogits) if teacher is not None else None
        cached = teacher.form(CachedTargets) if teacher is not None else None
        teacher_logits = full.logits if full is not None else None
        if teacher_logits is not None:
            student_logits, teacher_logits = shared_vocabulary(student_logits, teacher_logits, measure.unit, context)
        agreement = None
        if not context.training and student_logits.shape[-1] > 1:
            if cached is not None:
                agreement = (student_logits[measure.mask].argmax(dim=-1) == cached.ids[:, 0]).sum()
            elif teacher_logits is not None:
                mask = measure.mask
                agreement = (student_logits[mask].argmax(-1) == teacher_logits[mask].argmax(-1)).sum()
        return OutputResult(sums, student_logits, teacher_logits, agreement=agreement)


class ChunkedHead:
    """The chunked path (causal LMs): the output terms from final hidden states and output layers, `chunk_size`
    counted tokens at a time, in the precision of the models' forwards (`precision`: the accelerator's autocast)."""

    head_only = True
    terms_class: type[OutputTerms] = OutputTerms

    def __init__(self, chunk_size: int, label_names: tuple[str, ...], precision: Callable[[], Any]) -> None:
        self.chunk_size = chunk_size
        self.label_names = label_names
        self.precision = precision
        self.head_check = HeadCheck("student")

    def fuses(self, signal: Signal) -> bool:
        return signal.is_output_term

    def forward(self, model: nn.Module, inputs: Mapping[str, Any], measure: BatchCounts, want_task: bool,
                drop: tuple[str, ...], options: dict[str, bool]) -> tuple[Any, tuple[OutputHead, torch.Tensor]]:
        """The student's outputs, and its output layer with the final hidden states of the counted positions."""
        drop = (*self.label_names, *drop)  # labels would make the model compute a full-vocabulary loss
        with FinalHiddenTap(model) as tap:
            keep = self.head_check.logits_to_keep(model, measure.mask.device)
            outputs = model(**model_inputs(model, inputs, drop=drop), logits_to_keep=keep, **options)
        head = output_head(model)
        self.head_check(model, head, tap.value, outputs, self.precision)
        return outputs, (head, tap.value[measure.mask])

    def terms(self, context: OutputContext, outputs: Any, student: tuple[OutputHead, torch.Tensor]) -> OutputResult:
        measure, teacher, (head, rows) = context.measure, context.teacher, student
        layers = teacher.form(TeacherHeads) if teacher is not None else None
        heads = layers.heads if layers is not None else ()
        shared = None
        if heads:
            sizes = {head.vocab_size, *(h.vocab_size for h in heads)}
            if len(sizes) > 1:
                check_output_sizes(head.vocab_size, heads[0].vocab_size, measure.unit, context.vocab_mismatch,
                                   teacher.model, context.student)
                shared = min(sizes)
        signal = context.output_signal if teacher is not None else None
        terms = self.terms_class(
            labels=None if context.labels is None else align_labels(context.labels, measure.unit)[measure.mask],
            signal=signal,
            teacher_heads=tuple(heads),
            teacher_hidden=layers.hidden if layers is not None else (),
            combine=layers.combine if layers is not None else None,
            cached=teacher.form(CachedTargets) if teacher is not None else None,
            shared_vocab=shared,
            agreement=teacher is not None and not context.training,
            precision=self.precision,
            tokens=(align_labels(context.tokens, measure.unit)[measure.mask]
                    if signal is not None and getattr(signal, "needs_tokens", False) else None),
        )
        coefficients: dict[str, Any] = {}
        if terms.labels is not None:
            coefficients["task"] = context.coefficient("task")
        if signal is not None:
            coefficients[signal.name] = context.coefficient(signal.name)
        if terms.agreement:
            coefficients["agreement"] = 0.0
        kernel = self.fused_kernel(rows, head, terms, coefficients, context.training)
        if kernel is not None:
            fused, sums = kernel
            return OutputResult(sums, fused=fused, fused_terms=frozenset(sums), agreement=None)
        fused, sums = chunked_head_losses(rows, head, terms, coefficients, self.chunk_size, precision=self.precision)
        agreement = sums.pop("agreement", None)
        return OutputResult(sums, fused=fused, fused_terms=frozenset(sums), agreement=agreement)

    def fused_kernel(self, rows: torch.Tensor, head: OutputHead, terms: OutputTerms, coefficients: dict[str, Any],
                     training: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        """Another implementation of the same ``(sum_k c_k S_k, {k: S_k})`` (`LigerHead`); None: ours."""
        return None


class LigerHead(ChunkedHead):
    """`ChunkedHead` whose training steps compute the output terms with Liger's fused linear JSD
    (`output_kernel="liger"`, `hf_distill.kernels.liger`); evaluation (top-1 agreement) and a truncated shared vocabulary
    (``vocab_mismatch="truncate"``) stay on ours."""

    def fused_kernel(self, rows: torch.Tensor, head: OutputHead, terms: OutputTerms, coefficients: dict[str, Any],
                     training: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        if not training or terms.signal is None or len(terms.teacher_heads) != 1 or terms.shared_vocab is not None:
            return None
        with self.precision():  # the dtype the matmuls are autocast to (None: none)
            device = rows.device.type
            dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        return liger_head_losses(rows, head, terms.teacher_hidden[0], terms.teacher_heads[0], terms.labels,
                                 terms.signal, coefficients, dtype, self.chunk_size)


class CompiledHead(ChunkedHead):
    """`ChunkedHead` whose closed-form chunk terms run as one `torch.compile` kernel (`output_kernel="compiled"`,
    `kernels.compiled`): the same values and gradients in fewer passes over each ``[chunk, V]`` tensor."""

    terms_class = CompiledOutputTerms


def shared_vocabulary(student_logits: torch.Tensor, teacher_logits: torch.Tensor, unit: PositionUnit,
                      context: OutputContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Both logits cut to the ids they share (``vocab_mismatch="truncate"``; else sizes must be equal)."""
    if teacher_logits.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(
            f"Teacher outputs of shape {tuple(teacher_logits.shape)} do not line up with the student's "
            f"{tuple(student_logits.shape)}: both models must see the same batch and produce one row per position."
        )
    student_size, teacher_size = student_logits.shape[-1], teacher_logits.shape[-1]
    if student_size == teacher_size:
        return student_logits, teacher_logits
    check_output_sizes(student_size, teacher_size, unit, context.vocab_mismatch, context.teacher.model,
                       context.student)
    shared = min(student_size, teacher_size)
    return student_logits[..., :shared], teacher_logits[..., :shared]


def output_precision(accelerator: Any, dtype: str | None) -> Callable[[], Any]:
    """The context the chunked output layer's matmuls run in: the accelerator's autocast (`dtype` None: the
    forward's precision), or autocast to `dtype` (`output_layer_dtype`) on the models' device; the loss itself and the
    accumulation of the output layer's gradient stay in float32 (`kernels.chunked`)."""
    if dtype is None:
        return accelerator.autocast
    device, torch_dtype = accelerator.device.type, getattr(torch, dtype)
    return lambda: torch.autocast(device_type=device, dtype=torch_dtype)


def checked_kernel(args: Any, source: Any, signals: list[tuple[Signal, float]] = ()) -> str:
    """`args.output_kernel`, after checking before training that it can run this job's output term (in `signals`,
    the active ones) (an error naming the fix)."""
    if args.output_kernel == "liger":
        output = next((signal for signal, _ in signals if signal.is_output_term), None)
        obstacle = liger_obstacle(output, len(source.models), isinstance(source, CachedTeacher))
        if obstacle:
            raise ValueError(f"output_kernel='liger' cannot run this job: {obstacle}. Set output_kernel='chunked' "
                             "(our chunked loss, the default).")
    if args.output_kernel == "compiled":
        obstacle = compile_obstacle(args.device.type)
        if obstacle:
            raise ValueError(f"output_kernel='compiled' cannot run here: {obstacle}. Set output_kernel='chunked' "
                             "(the same loss, eager).")
    return args.output_kernel


def plan_output(setting: str | int, model_unit: PositionUnit, student: nn.Module, teachers: list[nn.Module],
                signals: list[tuple[Signal, float]], distributed_type: str, label_names: tuple[str, ...],
                precision: Callable[[], Any] = nullcontext, aligned: bool = False,
                kernel: str = "chunked") -> FullLogits | ChunkedHead:
    """The output strategy of a run (`logits_chunk_size`): `ChunkedHead` where the models allow it ("auto", or an
    integer that insists, with an error saying why it cannot), else `FullLogits`. `aligned` (a teacher with another
    tokenizer): `FullLogits` for the student; `logits_chunk_size` then chunks the teacher's side of the spans.
    `kernel` "liger" (`output_kernel`) needs the chunked path: an error says why where it cannot have it."""
    if kernel == "liger" and (setting == 0 or aligned):
        raise ValueError(f"output_kernel={kernel!r} computes the chunked output terms, but "
                         f"{'logits_chunk_size=0' if setting == 0 else 'a teacher with another tokenizer'} asks for "
                         "full logits. Set output_kernel='chunked' or logits_chunk_size='auto'.")
    if setting == 0 or aligned:
        return FullLogits(label_names)
    reasons = []
    if model_unit is not PositionUnit.NEXT_TOKEN:
        reasons.append(f"the student {describe(student)} is not a causal LM")
    else:
        for who, model in (("student", student), *(("teacher", t) for t in teachers)):
            obstacle = chunking_obstacle(model)
            if obstacle:
                reasons.append(f"the {who}: {obstacle}")
    readers = [signal.name for signal, _ in signals if signal.reads_logits and not signal.is_output_term]
    if readers:
        reasons.append(f"the {', '.join(readers)} signal(s) read the full logits")
    if distributed_type not in ("NO", "MULTI_CPU", "MULTI_GPU", "MULTI_XPU", "MULTI_NPU"):
        reasons.append(f"{distributed_type} shards the output layer")
    if reasons:
        if setting == "auto" and kernel != "liger":
            logger.info("Logits loss on full logits (not chunked): %s.", "; ".join(reasons))
            return FullLogits(label_names)
        raise ValueError(
            f"logits_chunk_size={setting} asks for the chunked logits loss, but {'; '.join(reasons)}. Set "
            "logits_chunk_size=0 for the full-logits path, or 'auto' to chunk only where possible."
        )
    if kernel == "liger" and any(output_head(model).softcap is not None for model in (student, *teachers)):
        raise ValueError("output_kernel='liger' has no logit softcap (Gemma 2's final_logit_softcapping): set "
                         "output_kernel='chunked'.")
    size = auto_chunk_size(output_head(student).vocab_size) if setting == "auto" else int(setting)
    strategy = {"liger": LigerHead, "compiled": CompiledHead}.get(kernel, ChunkedHead)
    return strategy(size, label_names, precision)
