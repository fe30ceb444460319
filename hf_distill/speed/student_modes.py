"""The callbacks that put the student in a training-only mode for the length of `train()`, from the config."""

from __future__ import annotations

from torch import nn
from transformers import TrainerCallback

from ..kernels.linear_backward import LinearBackwardPrecision
from .layer_compile import StudentLayerCompile


def student_mode_callbacks(model: nn.Module, args, signals, accelerator) -> list[TrainerCallback]:
    """`LinearBackwardPrecision` for `linear_backward_dtype`, `StudentLayerCompile` for `compile_student_layers`;
    each refuses, when built (before training), what it cannot serve."""
    distributed = accelerator.distributed_type.value
    callbacks: list[TrainerCallback] = []
    if args.linear_backward_dtype:  # bf16 backward products of the student's linear layers
        callbacks.append(LinearBackwardPrecision(model, args.linear_backward_dtype, signals, distributed))
    if getattr(args, "compile_student_layers", False):  # its decoder layers through torch.compile
        callbacks.append(StudentLayerCompile(model, args, signals, accelerator.device.type, distributed))
    return callbacks
