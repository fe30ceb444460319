"""Regional compilation: each decoder layer of the student through `torch.compile` while it trains.

`compile_student_layers=True`. A decoder layer's forward is some thirty eager operators between its matmuls (RMSNorm,
rotary embedding, SiLU times up, residual adds) and as many again in its backward, each a round trip through memory.
`torch.compile` (inductor: C++/OpenMP on a CPU, Triton on a GPU) fuses them; the matmuls and attention stay the same
ATen kernels, so the values are those of the eager layer to float tolerance. One compiled function serves every layer
of a class (the layer is an argument; its parameters are graph inputs), so compiling costs one layer's graph, not the
model's: about 20 s on the first step for the SmolLM2 student on a CPU (whole-model `torch_compile`: 131 s), for
1.10x its tokens/s in the recommended setting (docs/performance.md, section 8.8).

Only the training forward is compiled (grad enabled, ``module.training``): evaluation, generation (its KV cache and
one-token steps would recompile on every new shape) and `save_pretrained` see the plain layer, and the model the user
holds after `train()` is plain again. Where `torch.compile` cannot build (`performance.compile_obstacle`) the run is
refused before training; a compile that fails at run time logs a warning once and the layers run eagerly from there.
`StudentLayerCompile` (a `TrainerCallback`) turns it on in `on_train_begin` and off in `on_train_end`.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.utils import logging

from ..modeling import patch_forward, unpatch_forward
from .performance import compile_obstacle

logger = logging.get_logger(__name__)

_MARK = "_hf_distill_layer_compile"
#: One compiled forward per decoder-layer class and process: its graphs serve every layer and run in it.
_COMPILED: dict[type, Callable[..., Any]] = {}


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: the modules whose class a `PreTrainedModel` inside it names in
    `_no_split_modules` (``LlamaDecoderLayer``, ``Qwen2DecoderLayer``, ...), under DDP / PEFT wrappers too."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


class CompileState:
    """Whether the layers run compiled; after a failed compile, eager for the rest of the run (a warning, once)."""

    def __init__(self) -> None:
        self.failed = False

    def fail(self, error: Exception) -> None:
        self.failed = True
        first = str(error).splitlines()[0] if str(error) else ""
        logger.warning("compile_student_layers: torch.compile failed (%s: %s); the student's layers run eagerly from "
                       "here on (same values, slower).", type(error).__name__, first)


def _forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The layer's patched forward: its class's compiled forward in a training forward that records a graph, else
    the class's own."""
    state: CompileState = getattr(self, _MARK)
    plain = type(self).forward
    if not state.failed and self.training and torch.is_grad_enabled():
        compiled = _COMPILED.get(type(self))
        if compiled is None:
            compiled = _COMPILED[type(self)] = torch.compile(plain)
        try:
            return compiled(self, *args, **kwargs)
        except Exception as error:  # (a compiler error: the plain forward computes the same numbers)
            state.fail(error)
    return plain(self, *args, **kwargs)


def compile_layers(model: nn.Module, state: CompileState | None = None) -> int:
    """Route every `decoder_layers(model)` forward through `_forward`; returns how many layers. Parameters, state
    dict and what `save_pretrained` writes are unchanged."""
    return patch_forward(decoder_layers(model), _MARK, state or CompileState(), _forward)


def uncompile_layers(model: nn.Module) -> int:
    """Undo `compile_layers`: the layers' own forward again; returns how many were restored."""
    return unpatch_forward(model, _MARK)


def check_compile_layers(model: nn.Module, args, signals, device_type: str, distributed_type: str) -> None:
    """Refuse, before training, what the compiled layers cannot serve, each with its fix."""
    fix = "Set compile_student_layers=False"
    obstacle = compile_obstacle(device_type)
    if obstacle:
        raise ValueError(f"compile_student_layers=True cannot run here: {obstacle}. {fix}.")
    if getattr(args, "torch_compile", False):
        raise ValueError(f"compile_student_layers=True with torch_compile=True compiles the student twice. {fix}, "
                         "or torch_compile=False to compile only its layers (one graph for all, seconds to build).")
    twice = [signal.name for signal, _ in signals if signal.differentiates_twice]
    if twice:
        raise ValueError(f"compile_student_layers=True cannot serve {', '.join(twice)}: those signals differentiate "
                         f"the student's gradient again, which torch.compile does not support. {fix}.")
    if distributed_type in ("DEEPSPEED", "FSDP"):
        raise ValueError(f"compile_student_layers=True is not supported under {distributed_type}, which wraps the "
                         f"layers' parameters itself. {fix}.")
    if not decoder_layers(model):
        raise ValueError(f"compile_student_layers=True found no decoder layers in the student "
                         f"({type(model).__name__}: no `_no_split_modules` names its blocks). {fix}, or compile "
                         "the whole model with torch_compile=True.")


class StudentLayerCompile(TrainerCallback):
    """The student's decoder layers compiled from `on_train_begin` to `on_train_end`; refuses what it cannot serve
    (`check_compile_layers`) when built, before training."""

    def __init__(self, student: nn.Module, args, signals=(), device_type: str = "cpu",
                 distributed_type: str = "NO") -> None:
        check_compile_layers(student, args, signals, device_type, distributed_type)
        self.student, self.state, self.layers = student, CompileState(), 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.layers = compile_layers(self.student, self.state)
        logger.info(f"{self.layers} decoder layers of the student run through torch.compile in training steps "
                    "(compile_student_layers; the first step compiles)")

    def on_train_end(self, args, state, control, **kwargs):
        uncompile_layers(self.student)
