"""Live teachers: one frozen model or an ensemble, run on every batch under `torch.no_grad()`."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ..checks.options import check_choice
from ..config import ENSEMBLE_MODES
from ..engines import prepare_frozen_teacher
from ..kernels.chunked import FinalHiddenTap, HeadCheck, output_head
from ..modeling import (
    forward_parameter_names,
    model_inputs,
    output_logits,
    use_eager_attention,
)
from ..signals.gradients import FeatureTap
from .base import TeacherHeads, TeacherLogits, TeacherOutputs, TeacherRequest, TeacherSource

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def combine_teacher_logits(
    logits: Sequence[torch.Tensor], mode: str, temperature: float, soft: bool = True
) -> torch.Tensor:
    """One set of teacher logits standing for an ensemble.

    ``mean_logits`` (and every non-soft comparison such as MSE): ``mean_k z_k``. ``mean_probs``: logits whose
    temperature-softened distribution is the mean of the teachers' ones, ``T * log(mean_k softmax(z_k / T))``, so that
    any divergence applying ``softmax(z / T)`` sees ``p = mean_k p_k``. One teacher is returned unchanged.
    """
    if len(logits) == 1:
        return logits[0]
    if mode == "mean_logits" or not soft:
        return torch.stack([z.float() for z in logits]).mean(dim=0)
    check_choice("ensemble", mode, ENSEMBLE_MODES)
    log_probs = torch.stack([torch.log_softmax(z.float() / temperature, dim=-1) for z in logits])
    return temperature * (torch.logsumexp(log_probs, dim=0) - torch.log(torch.tensor(float(len(logits)))))


class LiveTeachers(TeacherSource):
    """One teacher model, or an ensemble combined as `args.ensemble` says. Each is put in eval mode, frozen, cast to
    `args.teacher_dtype`, switched to eager attention when a signal reads attention maps, and placed (FSDP /
    DeepSpeed: wrapped) for inference by the accelerator; never part of the training state."""

    def __init__(self, models: Sequence[nn.Module]) -> None:
        self._models = list(models)
        self.ensemble, self.temperature = "mean_probs", 1.0
        self.precision: Callable[[], Any] = nullcontext
        self.head_check = HeadCheck("teacher")

    @property
    def models(self) -> list[nn.Module]:
        return self._models

    def prepare(self, accelerator: Any, args: Any, signals: list, on_new_models: Callable[[], None]) -> None:
        self.accelerator, self.teacher_dtype = accelerator, args.teacher_dtype
        self.attention_fields = [signal.weight_field for signal, _ in signals if signal.needs_attentions]
        self.ensemble, self.temperature = args.ensemble, args.temperature
        self.precision = accelerator.autocast
        self.on_new_models = on_new_models
        self._models = [self.prepare_model(teacher) for teacher in self._models]

    def prepare_model(self, teacher: nn.Module) -> nn.Module:
        """One teacher made ready: eager attention when needed, cast, eval mode, frozen, placed for inference."""
        if self.attention_fields:
            use_eager_attention(teacher, "teacher", "attention_maps", self.attention_fields)
        if self.teacher_dtype not in (None, "auto"):
            teacher = teacher.to(_DTYPES[self.teacher_dtype])
        teacher.eval()
        teacher.requires_grad_(False)
        # Placed, sharded (FSDP) or wrapped (DeepSpeed) for inference only: it stays out of the accelerator's model
        # list (which the Trainer reads to decide whether the student still needs preparing) and never reaches the
        # optimizer.
        return prepare_frozen_teacher(teacher, self.accelerator)

    def input_columns(self) -> list[str]:
        return list(forward_parameter_names(self.first_model)) if self.first_model is not None else []

    def outputs(self, inputs: Mapping[str, Any], request: TeacherRequest) -> TeacherOutputs:
        result = TeacherOutputs(model=self.first_model)
        each_logits, heads, hidden = [], [], []
        for index, teacher in enumerate(self.models):
            first = index == 0
            taps = (FeatureTap(teacher, request.feature_layer) if first and request.want_features else nullcontext(),
                    FinalHiddenTap(teacher) if request.head_only else nullcontext())
            extra = {"logits_to_keep": self.head_check.logits_to_keep(teacher, request.mask.device)
                     } if request.head_only else {}
            with torch.no_grad(), taps[0] as feature_tap, taps[1] as hidden_tap:
                outputs = teacher(**model_inputs(teacher, inputs, drop=request.drop), **request.forward_options,
                                  **extra)
            if first:
                result.outputs = outputs
                result.features = feature_tap.value if request.want_features else None
            if request.head_only:
                head = output_head(teacher)
                self.head_check(teacher, head, hidden_tap.value, outputs, self.precision)
                heads.append(head)
                hidden.append(hidden_tap.value[request.mask])
            else:
                each_logits.append(output_logits(outputs).detach())
        combine = self.combiner(request.soft)
        result.distribution = TeacherHeads(tuple(heads), tuple(hidden), combine) if request.head_only \
            else TeacherLogits(combine(each_logits))
        return result

    def combiner(self, soft: bool) -> Callable[[list[torch.Tensor]], torch.Tensor]:
        """How the teachers' logits become one set (`combine_teacher_logits` with the run's settings)."""
        return lambda each: combine_teacher_logits(each, self.ensemble, self.temperature, soft)
