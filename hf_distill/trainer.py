"""`DistillationTrainer`: a `transformers.Trainer` whose loss is a weighted sum of distillation signals.

``L = task_weight * L_task + sum_k weight_k * L_k``. Each term is a sum over the positions (or tokens) that count in a
micro-batch, divided by the number that count in the whole optimizer step (all accumulated micro-batches, all
processes), so gradient accumulation and data parallelism give the same update as one big batch.
"""

from __future__ import annotations

import gc
import os
import random
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import EvalLoopOutput
from transformers.utils import logging

from .config import DistillationConfig
from .engines import prepare_frozen_teacher
from .hub import CardInfo, write_model_card
from .modeling import (
    accepts_input,
    check_no_attention_dropout,
    declared_output_size,
    describe,
    forward_parameter_names,
    model_inputs,
    output_logits,
    output_loss,
    use_eager_attention,
)
from .output_dir import API_WORDS, prepare_output_dir
from .positions import PositionUnit, align_labels, batch_size_of, infer_position_unit, position_mask, token_mask
from .safety import (
    NonFiniteGuard,
    check_finite_weights,
    check_label_values,
    check_one_run,
    classification_labels,
    drop_gradients,
)
from .signal_modules import ATTACHED_NAME, SignalModules
from .signals import Signal, SignalView, task_loss_sum
from .signals.build import TEACHER_WEIGHT_FIELDS, build_signals
from .signals.chunked import (
    CachedTargets,
    FinalHiddenTap,
    OutputTerms,
    auto_chunk_size,
    check_head_reproduces_logits,
    chunked_head_losses,
    chunking_obstacle,
    output_head,
)
from .signals.gradients import FeatureTap
from .teacher_cache import CACHE_COLUMNS, TeacherCacheCollator, cache_manifest, tokenizer_hash
from .teachers import AdapterDisabledTeacher, TeacherRoute, combine_teacher_logits, load_checkpoint_model

logger = logging.get_logger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: Weights whose terms need labels: the task loss, and the gradient signals (they differentiate the task loss).
LABEL_WEIGHT_FIELDS = ("task_weight", "input_grad_weight", "adversarial_grad_weight", "feature_grad_weight")
#: File holding the signals' own training state (e.g. GREAT's discriminator and its optimizer) in a checkpoint.
SIGNAL_STATE_FILE = "hf_distill_signal_state.pt"


@dataclass
class _BatchTerms:
    """One forward pass of student (and teacher): per-term sums over counted positions, and what produced them."""

    sums: dict[str, torch.Tensor]
    counts: dict[str, torch.Tensor]  # by unit: "positions", and "tokens" when a token-level signal is on
    student_outputs: Any
    view: SignalView
    scales: dict[str, torch.Tensor]  # 1 / denominator per unit (see `_scales`)
    #: the chunked path: ``sum_k w_k * S_k * scale_k`` over the terms in `fused_terms`, carrying their gradient (their
    #: entries in `sums` are detached, for logs)
    fused: torch.Tensor | None = None
    fused_terms: frozenset[str] = frozenset()
    agreement: torch.Tensor | None = None  # counted positions where student and teacher top-1 agree (chunked / cached)

    def total(self, weights: dict[str, float], units: dict[str, str]) -> torch.Tensor:
        """The weighted loss of the batch: ``sum_k w_k * S_k * scale[unit_k]`` (+ the fused terms)."""
        total = sum(
            weights[name] * value * self.scales[units[name]]
            for name, value in self.sums.items()
            if name not in self.fused_terms
        )
        return total + self.fused if self.fused is not None else total


class DistillationTrainer(Trainer):
    """Train a student `model` against a frozen `teacher_model` with the combined distillation loss.

    Everything else is the HF `Trainer`: accumulation, mixed precision, Accelerate, callbacks, checkpoints,
    `save_model` (which writes the plain student only).

    Args:
        model: the student (any `nn.Module`; a `PreTrainedModel` to save and reload with `from_pretrained`).
        teacher_model: the teacher, an `nn.Module` with outputs of the student's width, or a list of them (an
            ensemble, combined as `args.ensemble` says). Each is put in eval mode, frozen, optionally cast to
            `args.teacher_dtype`, placed on the student's device, and run under `torch.no_grad()` (gradient signals
            differentiate it with respect to its inputs only). `None` with `args.teacher_route` (RCO).
        route_loader: with `args.teacher_route`, how to load one anchor from its path (default: the transformers
            class named in the checkpoint's config).
        peft_config: a `peft` config (e.g. `LoraConfig`): the student is wrapped with `get_peft_model` and only its
            adapters train. With no teacher, the teacher is the student's base model with its adapters disabled
            (self-distillation, one copy of the weights).
        args: a [`DistillationConfig`].
        All other arguments are those of `transformers.Trainer`.

    Signals are built from `args` (one per non-zero weight: logits, hidden states, attention maps); each asks only for
    what it needs (hidden states and attention maps are requested from the models only when a signal reads them).
    Modules a signal learns (projections between widths) live in ``trainer.signal_modules``: trained by the student's
    optimizer, saved in checkpoints, never exported with the student.

    Logged: ``loss`` (the weighted total) and ``<term>_loss`` for every active term, each averaged over the logging
    interval; evaluation adds ``eval_<term>_loss`` and ``eval_teacher_agreement`` (top-1 agreement on counted
    positions).
    """

    # compute_loss divides by the positions counted over the whole accumulated batch: the Trainer must not divide again.
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: nn.Module | None = None,
        teacher_model: nn.Module | Sequence[nn.Module] | None = None,
        args: DistillationConfig | None = None,
        route_loader: Callable[[str], nn.Module] | None = None,
        peft_config: Any | None = None,
        **kwargs: Any,
    ) -> None:
        if args is None:
            args = DistillationConfig(output_dir="tmp_trainer")
        if not isinstance(args, DistillationConfig):
            raise TypeError(
                f"DistillationTrainer needs a DistillationConfig, got {type(args).__name__}. Build one with "
                "DistillationConfig(output_dir=..., temperature=..., task_weight=..., logits_weight=...)."
            )
        if model is None:
            raise ValueError("DistillationTrainer needs a student `model`.")
        check_one_run(args)
        self.route: TeacherRoute | None = None
        if args.teacher_route:
            if teacher_model is not None:
                raise ValueError(
                    "teacher_route gives the teachers (one checkpoint per anchor): pass teacher_model=None with it."
                )
            self.route = TeacherRoute(args.teacher_route, route_loader or load_checkpoint_model, args.route_steps)
            teachers = [self.route.load(0)]
        else:
            teachers = _as_teacher_list(teacher_model)
        #: the manifest of the offline teacher cache the training set carries (`hf-distill cache-teacher`), if any
        self.teacher_cache = cache_manifest(kwargs.get("train_dataset")) if not teachers and self.route is None else None
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        teacher_terms = {f: getattr(args, f) for f in TEACHER_WEIGHT_FIELDS if getattr(args, f) > 0}
        if self.teacher_cache is not None:
            _check_cache_settings(self.teacher_cache, args, teacher_terms, kwargs.get("processing_class"))
        elif not teachers and teacher_terms and hasattr(model, "disable_adapter"):
            unsupported = [f for f in LABEL_WEIGHT_FIELDS[1:] + ("similarity_weight",) if getattr(args, f) > 0]
            if unsupported:
                raise ValueError(
                    f"Self-distillation (a PEFT student without a teacher) supports the output, hidden-state and "
                    f"attention signals; {', '.join(unsupported)} need a separate teacher_model."
                )
            logger.info("Self-distillation: the teacher is the student's base model with its adapters disabled.")
            teachers = [AdapterDisabledTeacher(model)]
        if not teachers and teacher_terms and self.teacher_cache is None:
            raise ValueError(
                f"{', '.join(f'{k}={v}' for k, v in teacher_terms.items())} compares the student with a teacher, so "
                "it needs a teacher: pass teacher_model=..., or set it to 0 to train on the task loss alone."
            )
        sizes = {n for n in map(classification_labels, (model, *teachers)) if n is not None}
        if any(getattr(args, f) > 0 for f in LABEL_WEIGHT_FIELDS) and len(sizes) <= 1:  # (else: the size check says it)
            check_label_values(kwargs.get("train_dataset"), model, ("labels",))  # before the Trainer writes anything
        super().__init__(model=model, args=args, **kwargs)
        # Built after the Trainer has seeded the RNGs, so projections start the same way in every run with one seed.
        self.signals = build_signals(args, model, teachers[0] if teachers else None)
        # Per term (the task and each signal): its weight and the unit it is counted in; fixed for the run. `_units`:
        # the denominators in use ("positions" always, "tokens" / "examples" when a signal counts those).
        self._term_weights = {"task": args.task_weight, **{signal.name: weight for signal, weight in self.signals}}
        self._term_units = {"task": "positions", **{signal.name: signal.unit for signal, _ in self.signals}}
        self._units = ("positions", *sorted(set(self._term_units.values()) - {"positions"}))
        if any(signal.needs_attentions for signal, _ in self.signals):
            check_no_attention_dropout(model)
            use_eager_attention(model, "student")
        if any(getattr(signal, "differentiates_twice", False) for signal, _ in self.signals):
            use_eager_attention(model, "student", reason="double_backward")
        self.signal_modules = SignalModules.from_signals(signal for signal, _ in self.signals).to(self.args.device)
        #: DeepSpeed trains, reduces, clips and checkpoints only the parameters of the module it wraps: there the signal
        #: modules ride inside the student (under `ATTACHED_NAME`) and are dropped again from every exported student.
        self._modules_in_student = bool(len(self.signal_modules)) and self.is_deepspeed_enabled
        if self._modules_in_student:
            model.add_module(ATTACHED_NAME, self.signal_modules)
        if len(self.signal_modules):
            if self.optimizer is not None:
                raise ValueError(
                    f"The active signals learn modules of their own ({', '.join(self.signal_modules.keys())}), which "
                    "a user-built optimizer does not hold. Let the trainer build the optimizer (args.optim, or "
                    "optimizer_cls_and_kwargs=...) instead of passing optimizers=(...)."
                )
        self.add_callback(_AfterOptimizerStep(self))
        # transformers releases without `loss_is_scaled_for_ga` decide from this flag (our loss is already normalised).
        self.model_accepts_loss_kwargs = True
        if not self.label_names:  # plain nn.Modules: the data collators' name for targets
            self.label_names = ["labels"]
        self._model_unit = infer_position_unit(model)
        self.teachers = [self._prepare_teacher(teacher) for teacher in teachers]
        #: what the student's model card says (set by the command line, or by you); None: the Trainer's own card
        self.card_info: CardInfo | None = None
        self._component_sums: dict[str, torch.Tensor] = {}
        self._step_logs: dict[str, list[float]] = {}
        self._components_logged_at = 0
        self._eval_stats: dict[str, torch.Tensor] = {}
        if self.teacher_cache is not None:
            self.data_collator = TeacherCacheCollator(self.data_collator)
        #: tokens per chunk of the chunked logits / CE path, or None for the plain full-logits path
        self.logits_chunk_size = self._plan_chunking()
        self._heads_checked: set[int] = set()
        self._check_output_sizes()
        self._check_labels_available()
        #: stops (or skips) a step whose loss, terms or gradient norm are not finite (`on_nonfinite`)
        self.nonfinite_guard = NonFiniteGuard(self._term_weights, args.on_nonfinite, self.accelerator.gather)

    # ---- set-up ----------------------------------------------------------------------------------------------------

    @property
    def label_name(self) -> str:
        """The batch key holding the targets (the first of `label_names`)."""
        return self.label_names[0]

    @property
    def teacher_model(self) -> nn.Module | None:
        """The (first) teacher: the one every signal but the soft targets reads."""
        return self.teachers[0] if self.teachers else None

    def _prepare_teacher(self, teacher: nn.Module) -> nn.Module:
        if getattr(teacher, "is_self_distillation_teacher", False):
            return teacher  # the student itself: never frozen, cast or wrapped here
        if any(signal.needs_attentions for signal, _ in self.signals):
            use_eager_attention(teacher, "teacher")
        dtype = self.args.teacher_dtype
        if dtype not in (None, "auto"):
            teacher = teacher.to(_DTYPES[dtype])
        teacher.eval()
        teacher.requires_grad_(False)
        # Placed, sharded (FSDP) or wrapped (DeepSpeed) for inference only. It is not part of the training state: it
        # stays out of the accelerator's model list, which the Trainer reads to decide whether the student still needs
        # preparing (evaluate() before train()), and never reaches the optimizer.
        return prepare_frozen_teacher(teacher, self.accelerator)

    def _position_unit(self, inputs: dict[str, Any]) -> PositionUnit:
        if self._model_unit is not PositionUnit.EXAMPLE:
            return self._model_unit
        return infer_position_unit(None, inputs, self.label_name)

    def _check_output_sizes(self) -> None:
        """Teacher and student must produce outputs of the same width (checked from configs when they declare it)."""
        unit = self._model_unit
        student_size = declared_output_size(self.model, unit)
        cached_size = (self.teacher_cache or {}).get("vocab_size")
        if student_size is not None and cached_size is not None and int(cached_size) != student_size:
            raise ValueError(
                f"The teacher cache was made by a teacher with {cached_size} outputs, the student "
                f"{describe(self.model)} has {student_size}: rebuild the cache with a teacher of the student's "
                "vocabulary (the same tokenizer)."
            )
        for teacher in self.teachers:
            teacher_size = declared_output_size(teacher, unit)
            if student_size is not None and teacher_size is not None:
                self._check_sizes(student_size, teacher_size, unit, teacher)

    def _check_sizes(
        self, student_size: int, teacher_size: int, unit: PositionUnit, teacher: nn.Module | None = None
    ) -> None:
        if student_size == teacher_size:
            return
        if self.args.vocab_mismatch == "truncate" and unit.is_token_level:
            return
        what = "vocabulary" if unit.is_token_level else "number of outputs"
        hint = (
            "If both tokenizers agree on the shared ids (a config vocabulary padded past the tokenizer, as Qwen's), set "
            "vocab_mismatch='truncate'; otherwise use a teacher and student that share a tokenizer."
            if unit.is_token_level
            else "Give the student the teacher's label set (num_labels / id2label)."
        )
        raise ValueError(
            f"Teacher and student output sizes differ: the teacher {describe(teacher or self.teacher_model)} has "
            f"{teacher_size} ({what}), the student {describe(self.model)} has {student_size}. {hint}"
        )

    def _check_labels_available(self) -> None:
        """With the task loss or a gradient signal on, a collated training batch must contain labels (checked on two
        examples)."""
        dataset = self.train_dataset
        needing = {f: getattr(self.args, f) for f in LABEL_WEIGHT_FIELDS if getattr(self.args, f) > 0}
        if not needing or dataset is None or isinstance(dataset, torch.utils.data.IterableDataset):
            return
        try:
            n = min(2, len(dataset))
        except TypeError:
            return
        if n == 0:
            return
        try:
            import datasets

            if isinstance(dataset, datasets.Dataset):
                sample = self._remove_unused_columns(dataset.select(range(n)), description="label check")
                features = [sample[i] for i in range(n)]
            else:
                features = [dataset[i] for i in range(n)]
            with _preserved_rng():
                batch = self.data_collator(features)
        except Exception as error:  # a collator that needs the real dataloader: checked at the first step instead
            logger.info("Could not collate a sample batch to check for labels (%s); checking at the first step.", error)
            return
        if not any(name in batch for name in (*self.label_names, "label", "label_ids")):
            named = ", ".join(f"{k}={v}" for k, v in needing.items())
            raise ValueError(
                f"{named} need(s) labels (the task loss, or the task-loss gradients the gradient signals compare), but "
                f"the training batches have no `{self.label_name}` (batch keys: {sorted(batch.keys())}). Add a label "
                "column (or a collator that makes labels, e.g. DataCollatorForLanguageModeling), or set these weights "
                "to 0 to learn from the teacher alone."
            )

    def _set_signature_columns_if_needed(self) -> None:
        """Keep the dataset columns the student *or* the teacher accepts (the teacher may take other inputs)."""
        if self._signature_columns is None:
            super()._set_signature_columns_if_needed()
            if self.teacher_model is not None:
                extra = [c for c in forward_parameter_names(self.teacher_model) if c not in self._signature_columns]
                self._signature_columns = list(self._signature_columns) + extra
            if self.teacher_cache is not None:
                self._signature_columns = list(self._signature_columns) + list(CACHE_COLUMNS)

    # ---- counting ----------------------------------------------------------------------------------------------------

    def _count_units(
        self, inputs: dict[str, Any], mask: torch.Tensor | None = None, tokens: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """What each unit in use counts in a batch (`mask` / `tokens`: the batch's masks when already computed)."""
        if mask is None:
            mask = position_mask(inputs, self._position_unit(inputs), self.label_name)
        counts = {"positions": mask.sum()}
        if "tokens" in self._units:
            counts["tokens"] = (tokens if tokens is not None else token_mask(inputs)).sum()
        if "examples" in self._units:
            counts["examples"] = torch.tensor(batch_size_of(inputs), device=mask.device)
        return counts

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        """Fetch the micro-batches of one optimizer step and count what counts in all of them.

        The position count replaces transformers' `num_items_in_batch`: it is taken for every task (examples, tokens,
        shifted tokens, or attention-masked tokens without labels) and, with `average_tokens_across_devices`, summed
        over processes. Token-level signals get the same treatment for their token count.
        """
        batch_samples = []
        for _ in range(num_batches):
            try:
                batch_samples.append(next(epoch_iterator))
            except StopIteration:
                break
        if not batch_samples:
            self._step_counts = None
            return batch_samples, None
        per_batch = [self._count_units(batch) for batch in batch_samples]
        totals = torch.stack([sum(c[unit].to(device) for c in per_batch) for unit in self._units])
        if self.args.world_size > 1 and self.args.average_tokens_across_devices:
            totals = self.accelerator.gather(totals.reshape(1, -1)).sum(dim=0)
        counts = dict(zip(self._units, totals.unbind()))
        self._step_counts = counts
        return batch_samples, counts["positions"]

    # ---- the loss ------------------------------------------------------------------------------------------------

    def _forward_options(self) -> dict[str, bool]:
        """Extra forward flags the active signals need (nothing when no signal asks)."""
        options = {}
        if any(s.needs_hidden_states for s, _ in self.signals):
            options["output_hidden_states"] = True
        if any(s.needs_attentions for s, _ in self.signals):
            options["output_attentions"] = True
        return options

    def _batch_terms(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        training: bool,
        num_items_in_batch: torch.Tensor | int | None = None,
        allow_chunked: bool = True,
    ) -> _BatchTerms:
        """Run student and teacher on one batch and return every active term as a sum over what it counts (the
        chunked path for causal LMs when `logits_chunk_size` allows it)."""
        unit = self._position_unit(inputs)
        labels = inputs.get(self.label_name)
        mask = position_mask(inputs, unit, self.label_name)
        want_task = self.args.task_weight > 0 and (training or labels is not None)
        if want_task and labels is None:
            raise ValueError(
                f"task_weight={self.args.task_weight} turns the task loss on, but this batch has no "
                f"`{self.label_name}` (keys: {sorted(inputs)}). Add labels to the dataset, or set task_weight=0."
            )
        cached = self._cached_targets(inputs, mask)
        need_teacher = cached is None and self.teacher_model is not None and (
            not training or any(signal.needs_teacher for signal, _ in self.signals)
        )
        tokens = token_mask(inputs) if "tokens" in self._units else None
        counts = self._count_units(inputs, mask, tokens)
        scales = self._scales(counts, num_items_in_batch)
        if self.logits_chunk_size is not None and allow_chunked:
            return self._chunked_batch_terms(
                model, inputs, training, unit, mask, labels if want_task else None, cached, need_teacher, counts, scales,
                tokens,
            )
        pass_labels = want_task and accepts_input(model, self.label_name)
        drop = CACHE_COLUMNS if pass_labels else (*self.label_names, *CACHE_COLUMNS)
        options = self._forward_options()
        feature_layer = self.args.feature_layer
        want_features = any(s.needs_features for s, _ in self.signals)
        with FeatureTap(model, feature_layer) if want_features else _nothing() as tap:
            student_outputs = model(**model_inputs(model, inputs, drop=drop), **options)
        cache = {"student_features": tap.value} if want_features else {}
        student_logits = output_logits(student_outputs)
        if mask.shape != student_logits.shape[:-1]:
            raise ValueError(
                f"The student returned outputs of shape {tuple(student_logits.shape)}, but the batch was counted as "
                f"{unit.value} positions of shape {tuple(mask.shape)}. Token-level models need per-token labels (-100 "
                "for ignored tokens) or an attention_mask; sequence-level models one output row per example."
            )

        teacher_logits = teacher_outputs = None
        if need_teacher:
            all_logits = []
            for index, teacher in enumerate(self.teachers):
                with torch.no_grad(), FeatureTap(teacher, feature_layer) if want_features and index == 0 else _nothing() as tap:
                    outputs = teacher(**model_inputs(teacher, inputs, drop=self._teacher_drop), **options)
                if index == 0:
                    teacher_outputs = outputs
                    if want_features:
                        cache["teacher_features"] = tap.value
                all_logits.append(output_logits(outputs).detach())
            soft = self.args.logits_loss != "mse"
            teacher_logits = combine_teacher_logits(all_logits, self.args.ensemble, self.args.temperature, soft)
        shared_student, teacher_logits = self._shared_vocabulary(student_logits, teacher_logits, unit)

        sums: dict[str, torch.Tensor] = {}
        if want_task:
            model_loss = output_loss(student_outputs) if pass_labels else None
            sums["task"] = task_loss_sum(student_logits, labels, mask, unit, model_loss=model_loss)
        view = SignalView(
            shared_student, teacher_logits, mask, inputs, student_outputs, teacher_outputs,
            student_model=model, teacher_model=self.teacher_model, labels=labels, unit=unit, training=training,
            label_names=tuple(self.label_names), cache=cache, cached_targets=cached, _token_mask=tokens,
        )
        for signal, _ in self.signals:
            if signal.needs_teacher and teacher_logits is None and cached is None:
                continue  # an evaluation batch without the teacher cache: no teacher terms
            sums[signal.name] = signal.loss_sum(view)
        agreement = None
        if cached is not None and student_logits.shape[-1] > 1:
            agreement = (student_logits[mask].argmax(dim=-1) == cached.ids[:, 0]).sum()
        return _BatchTerms(sums, counts, student_outputs, view, scales, agreement=agreement)

    @property
    def _teacher_drop(self) -> tuple[str, ...]:
        """Batch keys never fed to a teacher: the targets and the teacher-cache columns."""
        return (*self.label_names, *CACHE_COLUMNS)

    def _cached_targets(self, inputs: dict[str, Any], mask: torch.Tensor) -> CachedTargets | None:
        """The offline teacher's targets of this batch (collated by `TeacherCacheCollator`), checked against `mask`."""
        if self.teacher_cache is None or CACHE_COLUMNS[0] not in inputs:
            return None
        ids, log_probs, tail = (inputs[name] for name in CACHE_COLUMNS)
        counted = int(mask.sum())
        if ids.shape[0] != counted:
            raise ValueError(
                f"The teacher cache holds {ids.shape[0]} positions for this batch, but the batch counts {counted}: the "
                "cache was built from other data, labels or collation. Rebuild it with `hf-distill cache-teacher` on "
                "the training data as tokenised for this run."
            )
        return CachedTargets(ids.long(), log_probs, tail)

    def _plan_chunking(self) -> int | None:
        """The chunk size of the chunked logits / CE path, or None for the plain path (`logits_chunk_size`)."""
        setting = self.args.logits_chunk_size
        if setting == 0:
            return None
        reasons = []
        if self._model_unit is not PositionUnit.NEXT_TOKEN:
            reasons.append(f"the student {describe(self.model)} is not a causal LM")
        else:
            for who, model in (("student", self.model), *(("teacher", t) for t in self.teachers)):
                obstacle = chunking_obstacle(model)
                if obstacle:
                    reasons.append(f"the {who}: {obstacle}")
        readers = [signal.name for signal, _ in self.signals if signal.reads_logits and signal.name != "logits"]
        if readers:
            reasons.append(f"the {', '.join(readers)} signal(s) read the full logits")
        if self.accelerator.distributed_type.value not in ("NO", "MULTI_CPU", "MULTI_GPU", "MULTI_XPU", "MULTI_NPU"):
            reasons.append(f"{self.accelerator.distributed_type.value} shards the output layer")
        if reasons:
            if setting == "auto":
                logger.info("Logits loss on full logits (not chunked): %s.", "; ".join(reasons))
                return None
            raise ValueError(
                f"logits_chunk_size={setting} asks for the chunked logits loss, but {'; '.join(reasons)}. Set "
                "logits_chunk_size=0 for the full-logits path, or 'auto' to chunk only where possible."
            )
        if setting == "auto":
            return auto_chunk_size(output_head(self.model).vocab_size)
        return int(setting)

    def _chunked_batch_terms(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        training: bool,
        unit: PositionUnit,
        mask: torch.Tensor,
        task_labels: torch.Tensor | None,
        cached: CachedTargets | None,
        need_teacher: bool,
        counts: dict[str, torch.Tensor],
        scales: dict[str, torch.Tensor],
        tokens: torch.Tensor | None,
    ) -> _BatchTerms:
        """The causal-LM path without full logits: each model returns its last position's logits only
        (``logits_to_keep=1``, checked once against our head) and its final hidden states; the task and logits terms
        are computed from those, chunk by chunk (`chunked_head_losses`)."""
        options = self._forward_options()
        drop = (*self.label_names, *CACHE_COLUMNS)  # labels would make the model compute a full-vocabulary loss
        with FinalHiddenTap(model) as tap:
            student_outputs = model(**model_inputs(model, inputs, drop=drop), logits_to_keep=1, **options)
        student_head = output_head(model)
        self._check_head(model, student_head, tap.value, student_outputs, "student")
        student_rows = tap.value[mask]

        teacher_outputs, heads, hidden = None, [], []
        if need_teacher:
            for index, teacher in enumerate(self.teachers):
                with torch.no_grad(), FinalHiddenTap(teacher) as teacher_tap:
                    outputs = teacher(**model_inputs(teacher, inputs, drop=self._teacher_drop), logits_to_keep=1,
                                      **options)
                head = output_head(teacher)
                self._check_head(teacher, head, teacher_tap.value, outputs, "teacher")
                teacher_outputs = outputs if index == 0 else teacher_outputs
                heads.append(head)
                hidden.append(teacher_tap.value[mask])
        logits_signal = next((signal for signal, _ in self.signals if signal.name == "logits"), None)
        has_teacher = cached is not None or need_teacher
        shared = None
        if heads:
            sizes = {student_head.vocab_size, *(head.vocab_size for head in heads)}
            if len(sizes) > 1:
                self._check_sizes(student_head.vocab_size, heads[0].vocab_size, unit)  # raises unless truncating
                shared = min(sizes)
        soft = self.args.logits_loss != "mse"
        terms = OutputTerms(
            labels=None if task_labels is None else align_labels(task_labels, unit)[mask],
            signal=logits_signal if has_teacher else None,
            teacher_heads=tuple(heads),
            teacher_hidden=tuple(hidden),
            combine=lambda each: combine_teacher_logits(each, self.args.ensemble, self.args.temperature, soft),
            cached=cached,
            shared_vocab=shared,
            agreement=has_teacher and not training,
            precision=self.accelerator.autocast,
        )
        coefficients: dict[str, Any] = {}
        if terms.labels is not None:
            coefficients["task"] = self._term_weights["task"] * scales["positions"]
        if terms.signal is not None:
            coefficients["logits"] = self._term_weights["logits"] * scales[self._term_units["logits"]]
        if terms.agreement:
            coefficients["agreement"] = 0.0
        fused, sums = chunked_head_losses(student_rows, student_head, terms, coefficients, self.logits_chunk_size,
                                          precision=self.accelerator.autocast)
        agreement = sums.pop("agreement", None)
        view = SignalView(
            None, None, mask, inputs, student_outputs, teacher_outputs,
            student_model=model, teacher_model=self.teacher_model, labels=inputs.get(self.label_name), unit=unit,
            training=training, label_names=tuple(self.label_names), cached_targets=cached, _token_mask=tokens,
        )
        for signal, _ in self.signals:
            if signal.name == "logits" or (signal.needs_teacher and teacher_outputs is None):
                continue
            sums[signal.name] = signal.loss_sum(view)
        fused_terms = frozenset(name for name in coefficients if name != "agreement")
        return _BatchTerms(sums, counts, student_outputs, view, scales, fused, fused_terms, agreement)

    def _check_head(self, model: nn.Module, head, hidden: torch.Tensor, outputs: Any, who: str) -> None:
        """Once per model: our output layer reproduces the logits the model returned for its last position, in the
        precision its forward ran in (the accelerator's autocast wraps the student's and the teachers' forwards)."""
        if id(model) in self._heads_checked:
            return
        check_head_reproduces_logits(head, hidden.detach(), output_logits(outputs).detach(), who,
                                     self.accelerator.autocast)
        self._heads_checked.add(id(model))

    def _shared_vocabulary(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, unit: PositionUnit
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if teacher_logits is None:
            return student_logits, None
        if teacher_logits.shape[:-1] != student_logits.shape[:-1]:
            raise ValueError(
                f"Teacher outputs of shape {tuple(teacher_logits.shape)} do not line up with the student's "
                f"{tuple(student_logits.shape)}: both models must see the same batch and produce one row per position."
            )
        student_size, teacher_size = student_logits.shape[-1], teacher_logits.shape[-1]
        if student_size == teacher_size:
            return student_logits, teacher_logits
        self._check_sizes(student_size, teacher_size, unit)  # raises unless truncation is allowed
        shared = min(student_size, teacher_size)
        return student_logits[..., :shared], teacher_logits[..., :shared]

    def _scales(self, counts: dict[str, torch.Tensor], num_items_in_batch: torch.Tensor | int | None) -> dict[str, torch.Tensor]:
        """1 / denominator per unit: the whole step's count when the Trainer passes `num_items_in_batch` (from
        `get_batch_samples`), else this batch's own count; times the number of processes for global counts."""
        step: dict[str, Any] = {}
        if num_items_in_batch is not None:
            ours = getattr(self, "_step_counts", None)
            step = dict(ours) if ours is not None and ours.get("positions") is num_items_in_batch else {
                "positions": num_items_in_batch
            }
        global_counts = self.args.world_size > 1 and self.args.average_tokens_across_devices
        scales = {}
        for unit, local in counts.items():
            denominator = step.get(unit, local)
            denominator = torch.as_tensor(denominator, dtype=torch.float32, device=local.device).clamp_min(1)
            scale = 1.0 / denominator
            if unit in step and global_counts:
                scale = scale * self.accelerator.num_processes
            scales[unit] = scale
        return scales

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        """``L = sum_k w_k * S_k / N_k``: S_k the term sums over this micro-batch, N_k what the term counts (positions,
        or tokens for hidden / attention terms) in the whole optimizer step (from `get_batch_samples`, with
        `num_items_in_batch`; this batch's own counts when `None`). Under data parallelism with global counts the loss
        is multiplied by the number of processes, undoing the gradient averaging, as transformers does for
        `average_tokens_across_devices`."""
        terms = self._batch_terms(model, inputs, training=model.training, num_items_in_batch=num_items_in_batch)
        loss = terms.total(self._term_weights, self._term_units)
        if model.training:
            self.nonfinite_guard.record(loss, terms.sums)
            units = self._term_units
            for name, value in terms.sums.items():
                scaled = (value.detach() * terms.scales[units[name]]).float()
                self._component_sums[name] = self._component_sums.get(name, 0.0) + scaled
        return (loss, terms.student_outputs) if return_outputs else loss

    # ---- signal modules (projections): optimizer, gradients, checkpoints ------------------------------------------

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer, plus parameter groups for the signals' own modules (projections)."""
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        if len(self.signal_modules):
            self.signal_modules.add_to_optimizer(self.optimizer, self.args.weight_decay, self.get_decay_parameter_names)
        return optimizer

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        """The Trainer's step; on the last micro-batch of an optimizer step, the signal modules' gradients are
        averaged across processes (DDP does it for the student)."""
        if self.route is not None:
            self._follow_route()
        loss = super().training_step(model, inputs, num_items_in_batch)
        if len(self.signal_modules) and self.accelerator.sync_gradients and not self._modules_in_student:
            self.signal_modules.average_gradients_across_processes()
        return loss

    def _clip_grad_norm(self, model: nn.Module):
        """Clip the student's and the signal modules' gradients together (one global norm)."""
        plain = self.accelerator.distributed_type.value in ("NO", "MULTI_CPU", "MULTI_GPU")
        if not len(self.signal_modules) or not plain:
            return super()._clip_grad_norm(model)
        parameters = [*model.parameters(), *self.signal_modules.parameters()]
        return self.accelerator.clip_grad_norm_(parameters, self.args.max_grad_norm)

    def _get_grad_norm(self, model: nn.Module, grad_norm=None):
        """The Trainer's gradient norm (taken just before the optimizer step), and the place where a step whose loss,
        terms or gradient norm went non-finite stops the run or, with ``on_nonfinite="skip_step"``, loses its
        gradients so that the optimizer leaves the student and its own state as they are."""
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if self.nonfinite_guard.check(grad_norm, self.state.global_step + 1, self.args.device):
            drop_gradients([*model.parameters(), *self.signal_modules.parameters()])
        return grad_norm

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        """The Trainer's `train`. A fresh run refuses an `output_dir` holding an earlier run's ``checkpoint-*``
        folders (`save_total_limit` would delete them, `resume_from_checkpoint=True` would pick them up), unless
        `args.overwrite_output_dir` moves them aside."""
        if not resume_from_checkpoint:
            prepare_output_dir(self.args, resuming=False, checkpoints_only=True, words=API_WORDS)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The Trainer's save, without the signal modules where they ride inside the student (DeepSpeed); a student
        with NaN or inf weights is refused (`check_finite_weights`)."""
        if self._modules_in_student:
            if state_dict is None:
                state_dict = self.model.state_dict()
            state_dict = {k: v for k, v in state_dict.items() if ATTACHED_NAME not in k.split(".")}
        check_finite_weights(state_dict if state_dict is not None else self.model.named_parameters(),
                             output_dir or self.args.output_dir)
        super()._save(output_dir, state_dict=state_dict)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if not self.args.should_save:
            return
        if len(self.signal_modules) and not self._modules_in_student:  # (DeepSpeed's checkpoint holds them there)
            self.signal_modules.save(output_dir)
        states = {signal.name: signal.checkpoint_state() for signal, _ in self.signals}
        states = {name: state for name, state in states.items() if state}
        if states:
            path = os.path.join(output_dir, SIGNAL_STATE_FILE)
            torch.save(states, path + ".partial")
            os.replace(path + ".partial", path)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        if len(self.signal_modules) and not self._modules_in_student and not self.signal_modules.load(checkpoint):
            logger.warning(
                "Checkpoint %s has no %s: the signals' projections start afresh.", checkpoint, "hf_distill_modules.safetensors"
            )
        path = os.path.join(checkpoint, SIGNAL_STATE_FILE)
        stateful = [signal for signal, _ in self.signals if type(signal).checkpoint_state is not Signal.checkpoint_state]
        if stateful and not os.path.isfile(path):
            logger.warning("Checkpoint %s has no %s: the signals' own state starts afresh.", checkpoint, SIGNAL_STATE_FILE)
        elif stateful:
            states = torch.load(path, map_location=self.args.device, weights_only=True)
            for signal in stateful:
                signal.load_checkpoint_state(states.get(signal.name, {}))

    # ---- teachers: checkpoint routes ---------------------------------------------------------------------------------

    def _follow_route(self) -> None:
        """Load the route anchor that teaches at this global step (one teacher in memory at a time)."""
        route = self.route
        route.plan(self.state.max_steps)
        anchor = route.anchor_for(self.state.global_step)
        if anchor == route.current:
            return
        self.teachers = []
        gc.collect()
        logger.info("Route: anchor %d (%s) teaches from step %d.", anchor, route.paths[anchor], self.state.global_step)
        self.teachers = [self._prepare_teacher(route.load(anchor))]
        self._check_output_sizes()

    def _after_optimizer_step(self) -> None:
        """Signals with their own training state (GREAT's discriminator) update once per optimizer step."""
        for signal, _ in self.signals:
            for key, value in signal.after_optimizer_step().items():
                self._step_logs.setdefault(key, []).append(value)

    # ---- saving: the student's model card -----------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The Trainer's save (the plain student only), plus the student's model card as README.md when
        `card_info` is set."""
        super().save_model(output_dir, _internal_call=_internal_call)
        if self.card_info is not None and self.args.should_save:
            write_model_card(output_dir or self.args.output_dir, self.card_info)

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """Our card (teacher, kept layers, losses, data, metrics) when `card_info` is set; else the Trainer's draft."""
        if self.card_info is None:
            return super().create_model_card(*args, **kwargs)
        if self.is_world_process_zero():
            write_model_card(self.args.output_dir, self.card_info)

    # ---- logging ---------------------------------------------------------------------------------------------------

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add ``<term>_loss`` (averaged over the steps since the last log, across processes) to training logs."""
        if "loss" in logs and self._component_sums:
            steps = max(self.state.global_step - self._components_logged_at, 1)
            for name, total in self._component_sums.items():
                gathered = self.accelerator.gather(total.detach().reshape(1)).mean()
                logs[f"{name}_loss"] = gathered.item() / steps
            self._component_sums = {}
            self._components_logged_at = self.state.global_step
        if "loss" in logs:
            for key, values in self._step_logs.items():
                logs[key] = float(np.mean(values))
            self._step_logs = {}
            if self.route is not None and self.route.current is not None:
                logs["teacher_anchor"] = self.route.current
            if self.nonfinite_guard.skipped:
                logs["skipped_steps"] = self.nonfinite_guard.skipped
        super().log(logs, *args, **kwargs)

    # ---- evaluation ---------------------------------------------------------------------------------------------------

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Distillation loss of one evaluation batch; accumulates per-term sums and teacher agreement."""
        inputs = self._prepare_inputs(inputs)
        labels = inputs.get(self.label_name)
        # logits are returned for predict() and compute_metrics: the chunked path (no full logits) only when nobody
        # reads them
        nobody_reads = not self._predicting and self.compute_metrics is None and self.preprocess_logits_for_metrics is None
        loss_only = prediction_loss_only or nobody_reads
        with torch.no_grad(), self.compute_loss_context_manager():
            terms = self._batch_terms(model, inputs, training=False, allow_chunked=loss_only)
        loss = terms.total(self._term_weights, self._term_units)
        self._record_eval(terms)
        if loss_only:
            return loss.detach(), None, None
        logits = output_logits(terms.student_outputs).detach()
        return loss.detach(), logits, labels.detach() if torch.is_tensor(labels) else None

    def _record_eval(self, terms: _BatchTerms) -> None:
        stats = self._eval_stats
        device = terms.counts["positions"].device

        def add(key: str, value: torch.Tensor) -> None:
            stats[key] = stats.get(key, torch.zeros((), dtype=torch.float64, device=device)) + value.double()

        for unit, count in terms.counts.items():
            add(f"count:{unit}", count)
        for name, value in terms.sums.items():
            add(f"{name}_loss", value.detach())
        view = terms.view
        if terms.agreement is not None:
            add("teacher_agreement", terms.agreement)
        elif view.teacher_logits is not None and view.student_logits.shape[-1] > 1:
            student, teacher = view.counted_logits()
            add("teacher_agreement", (student.argmax(-1) == teacher.argmax(-1)).sum())

    _predicting = False

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        """The Trainer's `predict`: the student's logits as `predictions` (also without `compute_metrics`), plus the
        per-term losses and teacher agreement in its metrics."""
        self._predicting = True
        try:
            return super().predict(*args, **kwargs)
        finally:
            self._predicting = False

    def evaluation_loop(self, *args: Any, **kwargs: Any) -> EvalLoopOutput:
        """The Trainer's loop, plus ``<prefix>_<term>_loss`` and ``<prefix>_teacher_agreement`` over everything the
        evaluation set counts (exact means, gathered across processes)."""
        self._eval_stats = {}
        output = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        stats = self._eval_stats
        self._eval_stats = {}
        if stats:
            keys = sorted(stats)
            values = torch.stack([stats[k] for k in keys]).reshape(1, -1)
            totals = self.accelerator.gather(values).sum(dim=0)
            reduced = dict(zip(keys, totals.tolist()))
            counts = {key.split(":", 1)[1]: max(reduced.pop(key), 1.0) for key in keys if key.startswith("count:")}
            units = self._term_units
            for key, value in reduced.items():
                term = key[: -len("_loss")] if key.endswith("_loss") else None
                output.metrics[f"{prefix}_{key}"] = value / counts[units.get(term, "positions")]
        return output


class _AfterOptimizerStep(TrainerCallback):
    """After each optimizer step: clear the signal modules' gradients (the Trainer zeroes only the student's) and let
    stateful signals update (GREAT's discriminator). At the start of training: reset the term averages' origin."""

    def __init__(self, trainer: "DistillationTrainer") -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        # term averages start at the step training starts from (a resumed run does not start at 0)
        self.trainer._components_logged_at = state.global_step
        self.trainer._component_sums, self.trainer._step_logs = {}, {}

    def on_optimizer_step(self, args, state, control, **kwargs):
        if not self.trainer._modules_in_student:  # (DeepSpeed zeroes the gradients of what it wraps)
            self.trainer.signal_modules.zero_gradients()
        self.trainer._after_optimizer_step()


def _check_cache_settings(
    manifest: dict[str, Any], args: DistillationConfig, teacher_terms: dict[str, float], processing_class: Any
) -> None:
    """A teacher cache serves the output-distribution term only, at the temperature and tokenizer it was made for."""
    others = {name: weight for name, weight in teacher_terms.items() if name != "logits_weight"}
    if others:
        raise ValueError(
            f"The training set is an offline teacher cache, which holds the teacher's top-k output distributions only; "
            f"{', '.join(f'{k}={v}' for k, v in others.items())} need(s) the live teacher's internals. Pass "
            "teacher_model=... (and the plain tokenised dataset), or set these weights to 0."
        )
    if args.logits_loss == "mse":
        raise ValueError(
            "logits_loss='mse' compares raw logits, which a top-k teacher cache does not hold: use forward_kl, "
            "reverse_kl, jsd or tvd with a cache."
        )
    made_at = float(manifest.get("temperature", 1.0))
    if abs(made_at - args.temperature) > 1e-9:
        raise ValueError(
            f"The teacher cache holds log-probabilities at temperature {made_at}, but temperature={args.temperature}: "
            f"set temperature={made_at}, or rebuild the cache with --temperature {args.temperature}."
        )
    expected = manifest.get("tokenizer_hash")
    if processing_class is not None and expected and hasattr(processing_class, "get_vocab"):
        if tokenizer_hash(processing_class) != expected:
            raise ValueError(
                f"The teacher cache was made for another tokenizer (teacher {manifest.get('teacher_id')!r}): its token "
                "ids mean other tokens for this student. Rebuild the cache with the student's tokenizer "
                "(`hf-distill cache-teacher`), or distil from the live teacher."
            )
    elif processing_class is None:
        logger.warning(
            "Training from a teacher cache without processing_class: the cache's tokenizer cannot be checked against "
            "the student's. Pass processing_class=tokenizer to check it."
        )


def _as_teacher_list(teacher_model: Any) -> list[nn.Module]:
    if teacher_model is None:
        return []
    teachers = list(teacher_model) if isinstance(teacher_model, (list, tuple)) else [teacher_model]
    for teacher in teachers:
        if not isinstance(teacher, nn.Module):
            raise TypeError(
                f"teacher_model must be an nn.Module or a list of them (load each with AutoModel*.from_pretrained), "
                f"got {type(teacher).__name__}."
            )
    if not teachers:
        raise ValueError("teacher_model=[] holds no teacher: pass at least one, or None to train on the task alone.")
    return teachers


class _nothing:
    """A context manager that does nothing and yields an object with `value = None`."""

    value = None

    def __enter__(self) -> "_nothing":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


class _preserved_rng:
    """Context manager restoring the Python, NumPy and torch (CPU) random states on exit."""

    def __enter__(self) -> None:
        self._states = (random.getstate(), np.random.get_state(), torch.get_rng_state())

    def __exit__(self, *exc: Any) -> None:
        python_state, numpy_state, torch_state = self._states
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)
