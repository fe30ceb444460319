"""The backward products of the student's `nn.Linear` layers in bf16, their forward in the model's float32.

For ``y = x W^T + b`` the forward stays ``F.linear(x, W, b)`` in float32 (bitwise the plain layer's output); the
backward takes ``dL/dx = bf16(g) @ bf16(W)`` and ``dL/dW = bf16(g)^T @ bf16(x)`` (bf16 operands, float32 accumulation
inside the matmul, results rounded to bf16 and returned in float32) and ``dL/db = sum g`` in float32. Only the bf16
copy of ``x`` is saved for the backward (half the float32 activation memory of these layers).

Why this split (docs/performance.md, section 8.2): measured on a SmolLM2 student, bf16 rounding in the *forward* moves
one step's gradient 16-25% from float32's and raised the held-out loss 2.9% after 60 steps, while the same rounding
in the backward products alone moves the gradient about 1% and left the held-out loss within 0.02% (a likely reason:
a forward rounding changes what every later layer and the loss see, a backward rounding only the products it enters).
The backward is two thirds of a decoder's matmul FLOPs; bf16 multiplied 1.2-3.6x faster than float32 at that
student's shapes on a CPU with AMX (`benchmarks/machine_limits.py`).

`LinearBackwardPrecision` (a `TrainerCallback`) puts the layers in this mode for the length of `train()` and restores
them after; `low_precision_backward` / `restore_linears` do the same by hand.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from transformers import TrainerCallback
from transformers.utils import logging

from ..modeling import patch_forward, unpatch_forward

logger = logging.get_logger(__name__)

#: The dtypes the backward products may take. float16 is left out: without loss scaling its range (6e-5 .. 65504)
#: underflows small gradients, and with it (``--fp16``) the forward is half precision already.
BACKWARD_DTYPES = ("bfloat16",)
_MARK = "_hf_distill_backward_dtype"


class LowPrecisionBackwardLinear(torch.autograd.Function):
    """``y = x W^T + b`` forward in the inputs' dtype; ``dL/dx = low(g) @ low(W)``, ``dL/dW = low(g)^T @ low(x)`` in
    `dtype` (returned in the inputs' dtype), ``dL/db = sum g``. Not twice differentiable."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                dtype: torch.dtype) -> torch.Tensor:
        needs_weight_grad = ctx.needs_input_grad[1]
        ctx.save_for_backward(x.to(dtype) if needs_weight_grad else None, weight)
        ctx.dtype, ctx.x_dtype = dtype, x.dtype
        return F.linear(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x_low, weight = ctx.saved_tensors
        g = grad.to(ctx.dtype)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ weight.to(ctx.dtype)).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            rows = g.reshape(-1, g.shape[-1])
            grad_weight = (rows.t() @ x_low.reshape(-1, x_low.shape[-1])).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, grad_weight, grad_bias, None


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The patched `nn.Linear.forward`: the low-precision backward while autograd records float32 work, else plain."""
    dtype = getattr(self, _MARK)
    recording = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
    if recording and x.dtype == self.weight.dtype == torch.float32 and not torch.is_autocast_enabled(x.device.type):
        return LowPrecisionBackwardLinear.apply(x, self.weight, self.bias, dtype)
    return F.linear(x, self.weight, self.bias)


def eligible_linears(model: nn.Module) -> list[nn.Linear]:
    """The model's plain `nn.Linear` layers with float32 weights, its output layer (`get_output_embeddings`) aside:
    the output layers have their own precision (`output_layer_dtype`); subclasses (quantised layers) keep theirs."""
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    return [m for m in model.modules()
            if type(m) is nn.Linear and m is not output and m.weight.dtype == torch.float32]


def low_precision_backward(model: nn.Module, dtype: str = "bfloat16") -> int:
    """Put `eligible_linears(model)` in the low-precision-backward mode (`LowPrecisionBackwardLinear`); returns how
    many layers. The forward, the parameters and what `save_pretrained` writes are unchanged."""
    if dtype not in BACKWARD_DTYPES:
        raise ValueError(f"linear_backward_dtype={dtype!r} is not supported: use one of {BACKWARD_DTYPES} or None.")
    return patch_forward(eligible_linears(model), _MARK, getattr(torch, dtype), _forward)


def restore_linears(model: nn.Module) -> int:
    """Undo `low_precision_backward`: the layers' own `nn.Linear.forward` again; returns how many were restored."""
    return unpatch_forward(model, _MARK)


def check_linear_backward(dtype: str | None, signals, distributed_type: str) -> None:
    """Refuse, before training, what the low-precision backward cannot serve: a signal that differentiates the
    student twice (the backward is not differentiable), DeepSpeed / FSDP (they shard and re-gather the weights
    around the layers' own backward)."""
    if dtype is None:
        return
    twice = [signal.name for signal, _ in signals if signal.differentiates_twice]
    if twice:
        raise ValueError(f"linear_backward_dtype={dtype!r} cannot serve {', '.join(twice)}: those signals "
                         "differentiate the student's gradient again, and the bf16 backward is not differentiable. "
                         "Leave linear_backward_dtype None for this run.")
    if distributed_type in ("DEEPSPEED", "FSDP"):
        raise ValueError(f"linear_backward_dtype={dtype!r} is not supported under {distributed_type}, which shards "
                         "the weights and re-gathers them around the layers' own backward. Leave it None, or use "
                         "--bf16 for mixed precision there.")


class LinearBackwardPrecision(TrainerCallback):
    """The student's linear layers in the low-precision-backward mode from `on_train_begin` to `on_train_end`, so the
    model the user holds afterwards is the plain one again; refuses what it cannot serve (`check_linear_backward`)
    when built, before training."""

    def __init__(self, student: nn.Module, dtype: str, signals=(), distributed_type: str = "NO") -> None:
        check_linear_backward(dtype, signals, distributed_type)
        self.student, self.dtype = student, dtype
        self.layers = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.layers = low_precision_backward(self.student, self.dtype)
        logger.info(f"{self.layers} linear layers of the student take their backward products in {self.dtype} "
                    "(forward float32; linear_backward_dtype)")

    def on_train_end(self, args, state, control, **kwargs):
        restore_linears(self.student)
