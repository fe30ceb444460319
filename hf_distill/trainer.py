"""`DistillationTrainer`: a `transformers.Trainer` whose loss is a weighted sum of distillation signals.

``L = task_weight * L_task + sum_k weight_k * L_k``. Each term is a sum over the positions (or tokens) that count in a
micro-batch, divided by the number that count in the whole optimizer step (all accumulated micro-batches, all
processes), so gradient accumulation and data parallelism give the same update as one big batch. This module wires
the HF hooks; the micro-batch is `loss/` (`loss/reference.py` in one function), the teachers `teachers/`."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import EvalLoopOutput
from transformers.utils import logging

from .checks.before_training import check_declared_sizes, check_labels_available
from .checks.safety import (
    NonFiniteGuard,
    check_finite_weights,
    check_label_values,
    check_one_run,
    classification_labels,
    drop_gradients,
)
from .config import DistillationConfig
from .data.provenance import RunRecordCallback, check_resume
from .data.samples import samples_callbacks
from .loss.accounting import Accounting, EvalTotals, TermLog
from .loss.batch import MicroBatchLoss
from .loss.outputs import checked_kernel, output_precision, plan_output
from .modeling import config_use_cache, output_logits
from .positions import infer_position_unit
from .signals import label_weights
from .signals.build import build_signals
from .signals.modules import (
    ATTACHED_NAME,
    SignalModules,
    attach_signal_modules,
    load_signal_state,
    prepare_student_for_signals,
    save_signal_state,
)
from .speed.performance import warn_slow_half_precision
from .speed.student_modes import student_mode_callbacks
from .storage.hub import CardInfo, write_model_card
from .storage.output_dir import API_WORDS, prepare_output_dir
from .teachers import TeacherSource, checked_source, run_teacher_source

logger = logging.get_logger(__name__)


def _checked_config(args: DistillationConfig | None, model: nn.Module | None) -> DistillationConfig:
    """The trainer's config (default: one writing to tmp_trainer), refused when it is not a `DistillationConfig`,
    without a student, or when the processes are not one run (`check_one_run`)."""
    args = DistillationConfig(output_dir="tmp_trainer") if args is None else args
    if not isinstance(args, DistillationConfig):
        raise TypeError(f"DistillationTrainer needs a DistillationConfig, got {type(args).__name__}. Build one with "
                        "DistillationConfig(output_dir=..., temperature=..., task_weight=..., logits_weight=...).")
    if model is None:
        raise ValueError("DistillationTrainer needs a student `model`.")
    check_one_run(args)
    return args


class DistillationTrainer(Trainer):
    """Train a student `model` against a frozen `teacher_model` with the combined distillation loss.

    Everything else is the HF `Trainer`: accumulation, mixed precision, Accelerate, callbacks, checkpoints,
    `save_model` (which writes the plain student only).

    Args:
        model: the student (any `nn.Module`; a `PreTrainedModel` to save and reload with `from_pretrained`).
        teacher_model: the teacher, an `nn.Module` with outputs of the student's width, or a list of them (an
            ensemble, combined as `args.ensemble` says). Each is put in eval mode, frozen, optionally cast to
            `args.teacher_dtype`, placed on the student's device, and run under `torch.no_grad()` (gradient signals
            differentiate it with respect to its inputs only). `None` with `args.teacher_route` (RCO), with a
            training set that is a teacher cache, or for self-distillation of a PEFT student.
        args: a [`DistillationConfig`] (or a subclass declaring the weight fields of your registered signals).
        route_loader: with `args.teacher_route`, how to load one anchor from its path (default: the transformers
            class named in the checkpoint's config).
        peft_config: a `peft` config (e.g. `LoraConfig`): the student is wrapped with `get_peft_model` and only its
            adapters train. With no teacher, the teacher is the student's base model with its adapters disabled
            (self-distillation, one copy of the weights).
        teacher_source: a `teachers.TeacherSource` of your own instead of `teacher_model` (e.g. one that produces
            the sequences of each batch).
        teacher_processing_class: the teacher's tokenizer, when not the student's: batches are aligned to its tokens
            (`teachers.CrossTokenizerTeacher`; ``logits_loss="hybrid"`` or ``"uld"``).
        All other arguments are those of `transformers.Trainer`.

    Signals are built from `args` (one per registered signal whose weight is > 0, `signals.register_signal`); each
    asks only for what it needs. Modules a signal learns (projections between widths) live in
    ``trainer.signal_modules``: trained by the student's optimizer, saved in checkpoints, never exported.

    Logged: ``loss`` (the weighted total) and ``<term>_loss`` for every active term, each averaged over the logging
    interval, and ``tokens_per_second``; evaluation adds ``eval_<term>_loss`` and ``eval_teacher_agreement`` (top-1,
    on counted positions). Causal LMs: held-out samples, teacher beside student (`samples.SamplesCallback`).
    """

    loss_is_scaled_for_ga = True  # (compute_loss divides by the whole accumulated step's count: the Trainer must not)

    def __init__(
        self,
        model: nn.Module | None = None,
        teacher_model: nn.Module | Sequence[nn.Module] | None = None,
        args: DistillationConfig | None = None,
        route_loader: Callable[[str], nn.Module] | None = None,
        peft_config: Any | None = None,
        teacher_source: TeacherSource | None = None,
        teacher_processing_class: Any | None = None,
        **kwargs: Any,
    ) -> None:
        args = _checked_config(args, model)
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        tokenizer, train_dataset = kwargs.get("processing_class"), kwargs.get("train_dataset")
        source = checked_source(args, model, teacher_source, train_dataset, tokenizer, teacher_processing_class) \
            if teacher_source is not None else run_teacher_source(args, model, teacher_model, route_loader,
                                                                   train_dataset, tokenizer, teacher_processing_class)
        sizes = {n for n in map(classification_labels, (model, *source.models)) if n is not None}
        if label_weights(args) and len(sizes) <= 1:  # (else: the size check says it)
            check_label_values(train_dataset, model, ("labels",))  # before the Trainer writes anything
        self.student_use_cache = getattr(getattr(model, "config", None), "use_cache", None)  # (written on save)
        super().__init__(model=model, args=args, **kwargs)
        warn_slow_half_precision(args, self.args.device.type, logger)  # (bf16 on a CPU without bf16 units: ~100x)
        self.teacher_source = source
        # Built after the Trainer has seeded the RNGs, so projections start the same way in every run with one seed.
        self.signals = build_signals(args, model, source.first_model)
        # Per term (the task and each signal): its weight and the unit it is counted in; fixed for the run.
        self._term_weights = {"task": args.task_weight, **{signal.name: weight for signal, weight in self.signals}}
        self._term_units = {"task": "labelled", **{signal.name: signal.unit for signal, _ in self.signals}}
        prepare_student_for_signals(model, self.signals)
        self.signal_modules = SignalModules.from_signals(signal for signal, _ in self.signals).to(self.args.device)
        self._modules_in_student = attach_signal_modules(model, self.signal_modules, self.is_deepspeed_enabled,
                                                         self.optimizer)
        modes = student_mode_callbacks(model, args, self.signals, self.accelerator)  # (RunRecord: what a resume checks)
        for callback in (_AfterOptimizerStep(self), RunRecordCallback(self), *modes, *samples_callbacks(self)):
            self.add_callback(callback)
        self.model_accepts_loss_kwargs = True  # (transformers without `loss_is_scaled_for_ga` reads this flag)
        if not self.label_names:  # plain nn.Modules: the data collators' name for targets
            self.label_names = ["labels"]
        model_unit = infer_position_unit(model)

        def check_sizes() -> None:  # (a teacher with another tokenizer is compared on aligned spans, not by ids)
            check_declared_sizes(self.model, [] if source.aligns_tokens else source.models, model_unit,
                                 source.declared_vocab_size(), args.vocab_mismatch)

        source.prepare(self.accelerator, args, self.signals, check_sizes)
        self.card_info: CardInfo | None = None  #: the student's model card (set by the command line or you; None: HF's)
        self.term_log = TermLog(self.accelerator.gather)
        self._eval_totals = EvalTotals()
        self.data_collator = source.wrap_collator(self.data_collator)
        self._build_loss_path(source, model_unit, check_sizes)

    # ---- set-up ----------------------------------------------------------------------------------------------------

    def _build_loss_path(self, source: TeacherSource, model_unit: Any, check_sizes: Callable[[], None]) -> None:
        """The output strategy (full logits, or chunks of the output layer), the run's last checks of sizes and
        labels, the non-finite guard, the accounting of counted positions, and the one batch path that uses them."""
        args = self.args
        self.output_strategy = plan_output(  # the output terms: from full logits, or chunks of the output layer
            args.logits_chunk_size, model_unit, self.model, source.models, self.signals,
            self.accelerator.distributed_type.value, tuple(self.label_names), kernel=checked_kernel(args, source, self.signals),
            precision=output_precision(self.accelerator, args.output_layer_dtype), aligned=source.aligns_tokens)
        check_sizes()
        check_labels_available(self.train_dataset, self.data_collator,
                               lambda d: self._remove_unused_columns(d, description="label check"),
                               self.label_names, label_weights(args))
        self.nonfinite_guard = NonFiniteGuard(  # stops (or skips) a step whose loss, terms or grad norm are not finite
            self._term_weights, args.on_nonfinite, self.accelerator.gather)
        self.accounting = Accounting(set(self._term_units.values()), model_unit, self.label_name,
                                     self.accelerator.gather, args.world_size > 1 and args.average_tokens_across_devices,
                                     self.accelerator.num_processes)
        self.batch_path = MicroBatchLoss(self.signals, self._term_weights, self._term_units, source, self.output_strategy,
                                         self.accounting, tuple(self.label_names), args.feature_layer, args.vocab_mismatch)

    @property
    def label_name(self) -> str:
        """The batch key holding the targets (the first of `label_names`)."""
        return self.label_names[0]

    @property
    def teacher_model(self) -> nn.Module | None:
        """The (first) teacher: the one every signal but the soft targets reads."""
        return self.teacher_source.first_model

    @property
    def logits_chunk_size(self) -> int | None:
        """Tokens per chunk of the chunked output path, or None for the full-logits path."""
        return getattr(self.output_strategy, "chunk_size", None)

    def _set_signature_columns_if_needed(self) -> None:
        """Keep the dataset columns the student *or* the teacher source reads (the teacher may take other inputs)."""
        if self._signature_columns is None:
            super()._set_signature_columns_if_needed()
            extra = [c for c in self.teacher_source.input_columns() if c not in self._signature_columns]
            self._signature_columns = list(self._signature_columns) + extra

    # ---- counting and the loss -------------------------------------------------------------------------------------

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        """Fetch the micro-batches of one optimizer step, let the teacher source make their sequences
        (`TeacherSource.prepare_batches`), and count what counts in all of them (`Accounting.count_step`).

        The position count replaces transformers' `num_items_in_batch`: it is taken for every task (examples, tokens,
        shifted tokens, or attention-masked tokens without labels) and, with `average_tokens_across_devices`, summed
        over processes. Token-level signals get the same treatment for their token count.
        """
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        batch_samples = self.teacher_source.prepare_batches(batches, self.model, self.state.global_step)
        if not batch_samples:
            self.accounting.step_counts = None
            return batch_samples, None
        self.term_log.add_tokens(batch_samples)
        return batch_samples, self.accounting.count_step(batch_samples, device)["positions"]

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
        terms = self.batch_path.terms(model, inputs, training=model.training, num_items_in_batch=num_items_in_batch)
        loss = terms.total(self._term_weights, self._term_units)
        if model.training:
            self.nonfinite_guard.record(loss, terms.sums)
            self.term_log.add(terms.sums, terms.inverse_counts, self._term_units)
        return (loss, terms.student_outputs) if return_outputs else loss

    # ---- the step: optimizer, gradients, checkpoints ---------------------------------------------------------------

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer, plus parameter groups for the signals' own modules (projections)."""
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        if len(self.signal_modules):
            self.signal_modules.add_to_optimizer(self.optimizer, self.args.weight_decay, self.get_decay_parameter_names)
        return optimizer

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        """The Trainer's step; on the last micro-batch of an optimizer step, the signal modules' gradients are
        averaged across processes (DDP does it for the student)."""
        self.teacher_source.on_step(self.state)
        loss = super().training_step(model, inputs, num_items_in_batch)
        if len(self.signal_modules) and self.accelerator.sync_gradients and not self._modules_in_student:
            self.signal_modules.average_gradients_across_processes()
        return loss

    def _clip_grad_norm(self, model: nn.Module):
        """Clip the student's and the signal modules' gradients together (one global norm) where the engine lets us."""
        parameters = self.signal_modules.clipped_with(model, self.accelerator.distributed_type.value)
        if parameters is None:
            return super()._clip_grad_norm(model)
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
        """The Trainer's `train`. A fresh run refuses an `output_dir` of earlier ``checkpoint-*`` folders (unless
        `args.overwrite_output_dir` moves them aside), a resumed one other settings than its checkpoint's."""
        if not resume_from_checkpoint:
            prepare_output_dir(self.args, resuming=False, checkpoints_only=True, words=API_WORDS)
        check_resume(self, resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The Trainer's save, without the signal modules where they ride inside the student (DeepSpeed), with the
        student's own ``use_cache`` (`config_use_cache`); a student with NaN or inf weights is refused."""
        if self._modules_in_student:
            if state_dict is None:
                state_dict = self.model.state_dict()
            state_dict = {k: v for k, v in state_dict.items() if ATTACHED_NAME not in k.split(".")}
        check_finite_weights(state_dict if state_dict is not None else self.model.named_parameters(),
                             output_dir or self.args.output_dir)
        with config_use_cache(self.model, self.student_use_cache):
            super()._save(output_dir, state_dict=state_dict)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if not self.args.should_save:
            return
        if len(self.signal_modules) and not self._modules_in_student:  # (DeepSpeed's checkpoint holds them there)
            self.signal_modules.save(output_dir)
        save_signal_state([signal for signal, _ in self.signals], output_dir)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        if len(self.signal_modules) and not self._modules_in_student and not self.signal_modules.load(checkpoint):
            logger.warning("Checkpoint %s has no hf_distill_modules.safetensors: the signals' projections start afresh.",
                           checkpoint)
        load_signal_state([signal for signal, _ in self.signals], checkpoint, self.args.device)

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
        """Add ``<term>_loss`` (averaged over the steps since the last log, across processes), the signals' and the
        teacher source's values and ``skipped_steps`` to training logs."""
        if "loss" in logs:
            self.term_log.flush(logs, self.state.global_step)
            logs.update(self.teacher_source.log_values())
            if self.nonfinite_guard.skipped:
                logs["skipped_steps"] = self.nonfinite_guard.skipped
        super().log(logs, *args, **kwargs)

    # ---- evaluation ---------------------------------------------------------------------------------------------------

    def prediction_step(self, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> tuple[torch.Tensor | None, ...]:
        """Distillation loss of one evaluation batch; accumulates per-term sums and teacher agreement."""
        inputs = self._prepare_inputs(inputs)
        labels = inputs.get(self.label_name)
        # logits are returned for predict() and compute_metrics: the chunked path (no full logits) only when nobody
        # reads them
        nobody_reads = not self._predicting and self.compute_metrics is None and self.preprocess_logits_for_metrics is None
        loss_only = prediction_loss_only or nobody_reads
        with torch.no_grad(), self.compute_loss_context_manager():
            terms = self.batch_path.terms(model, inputs, training=False, full_logits=not loss_only)
        loss = terms.total(self._term_weights, self._term_units)
        self._eval_totals.add(terms.counts, terms.sums, terms.agreement)
        if loss_only:
            return loss.detach(), None, None
        logits = output_logits(terms.student_outputs).detach()
        return loss.detach(), logits, labels.detach() if torch.is_tensor(labels) else None

    _predicting = False

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        """The Trainer's `predict`: the student's logits as `predictions` (also without `compute_metrics`), plus the
        per-term losses and teacher agreement in its metrics."""
        self._predicting = True
        try:
            return super().predict(*args, **kwargs)
        finally:
            self._predicting = False

    def evaluation_loop(self, dataloader: Any, description: str, prediction_loss_only: bool | None = None,
                        ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval") -> EvalLoopOutput:
        """The Trainer's loop, plus ``<prefix>_<term>_loss`` and ``<prefix>_teacher_agreement`` over everything the
        evaluation set counts (exact means, gathered across processes)."""
        self._eval_totals = EvalTotals()
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        output.metrics.update(self._eval_totals.metrics(metric_key_prefix, self._term_units, self.accelerator.gather))
        self._eval_totals = EvalTotals()
        return output


class _AfterOptimizerStep(TrainerCallback):
    """After each optimizer step: clear the signal modules' gradients (the Trainer zeroes only the student's) and let
    stateful signals update (GREAT's discriminator). At the start of training (a resumed one's too, which does not
    start at step 0): reset the term averages' origin."""

    def __init__(self, trainer: DistillationTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.term_log.reset(state.global_step)

    def on_optimizer_step(self, args, state, control, **kwargs):
        if not self.trainer._modules_in_student:  # (DeepSpeed zeroes the gradients of what it wraps)
            self.trainer.signal_modules.zero_gradients()
        for signal, _ in self.trainer.signals:
            self.trainer.term_log.add_step_values(signal.after_optimizer_step())
