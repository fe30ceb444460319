"""The modules some signals learn alongside the student (projections, discriminators).

They train with the student's optimizer (their own parameter groups), have their gradients averaged across processes
and clipped with the student's, are saved in every checkpoint as ``hf_distill_modules.safetensors`` and restored on
resume, and are never part of the exported student. Under DeepSpeed they are attached to the student instead
(`ATTACHED_NAME`), so that the engine does all of this for them (its checkpoints hold them).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.utils import logging

from ..engines import average_gradients
from ..modeling import check_no_attention_dropout, use_eager_attention
from ..storage.files import atomic_path
from .base import Signal

logger = logging.get_logger(__name__)

#: File holding the signals' own training state (e.g. GREAT's discriminator and its optimizer) in a checkpoint.
SIGNAL_STATE_FILE = "hf_distill_signal_state.pt"
#: File holding the signals' modules inside a checkpoint folder.
MODULES_FILE = "hf_distill_modules.safetensors"
#: Under DeepSpeed the modules are attached to the student under this name (DeepSpeed optimises, reduces, clips and
#: checkpoints only the parameters of the module it wraps); the exported student never holds them.
ATTACHED_NAME = "hf_distill_signal_modules"



def prepare_student_for_signals(model: nn.Module, signals: list[tuple[Signal, float]]) -> None:
    """What the active signals need of the student before it trains: eager attention (attention maps, or a second
    differentiation that fused kernels do not support), and no attention dropout where maps are compared."""
    for need, reason in (("needs_attentions", "attention_maps"), ("differentiates_twice", "double_backward")):
        fields = [signal.weight_field for signal, _ in signals if getattr(signal, need)]
        if fields and need == "needs_attentions":
            check_no_attention_dropout(model)
        if fields:
            use_eager_attention(model, "student", reason, fields)


class SignalModules(nn.ModuleDict):
    """All trainable signal modules, by ``<signal>.<module>`` name."""

    @classmethod
    def from_signals(cls, signals: Iterable[Any]) -> "SignalModules":
        modules = cls()
        for signal in signals:
            for name, module in signal.trainable_modules().items():
                modules[f"{signal.name}__{name}"] = module
        return modules

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def add_to_optimizer(
        self, optimizer: torch.optim.Optimizer, weight_decay: float, decay_names: Callable[[nn.Module], list[str]]
    ) -> None:
        """Add the modules' parameters to `optimizer` as two groups (with / without weight decay), once."""
        present = {id(p) for group in optimizer.param_groups for p in group["params"]}
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad and id(p) not in present]
        if not named:
            return
        decay = set(decay_names(self))
        for params, decay_value in (
            ([p for n, p in named if n in decay], weight_decay),
            ([p for n, p in named if n not in decay], 0.0),
        ):
            if params:
                optimizer.add_param_group({"params": params, "weight_decay": decay_value})

    def average_gradients_across_processes(self) -> None:
        """All-reduce (mean) the gradients, as DDP does for the student's parameters."""
        average_gradients(self.trainable_parameters())

    def clipped_with(self, model: nn.Module, distributed_type: str) -> list[nn.Parameter] | None:
        """The parameters to clip under one global norm: the student's and these modules', when there are modules
        and the engine clips plain parameter lists (no engine, DDP); None: let the engine clip (FSDP and DeepSpeed
        clip what they wrap; under DeepSpeed the modules ride inside the student)."""
        if not len(self) or distributed_type not in ("NO", "MULTI_CPU", "MULTI_GPU"):
            return None
        return [*model.parameters(), *self.parameters()]

    def zero_gradients(self) -> None:
        for parameter in self.parameters():
            parameter.grad = None

    def save(self, folder: str) -> None:
        """Write the modules' weights to ``folder/hf_distill_modules.safetensors`` (atomically)."""
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        with atomic_path(os.path.join(folder, MODULES_FILE)) as partial:
            save_file(state, partial, metadata={"format": "pt"})

    def load(self, folder: str) -> bool:
        """Load the modules' weights from a checkpoint folder; `False` when the folder has none."""
        path = os.path.join(folder, MODULES_FILE)
        if not os.path.isfile(path):
            return False
        self.load_state_dict(load_file(path, device="cpu"), strict=True)
        return True


def _is_stateful(signal: Signal) -> bool:
    return type(signal).checkpoint_state is not Signal.checkpoint_state


def save_signal_state(signals: Iterable[Signal], folder: str) -> None:
    """Write the signals' own states (`Signal.checkpoint_state`, e.g. GREAT's discriminator optimizer) to
    ``folder/hf_distill_signal_state.pt`` (atomically; nothing when no signal has a state)."""
    states = {signal.name: signal.checkpoint_state() for signal in signals}
    states = {name: state for name, state in states.items() if state}
    if states:
        with atomic_path(os.path.join(folder, SIGNAL_STATE_FILE)) as partial:
            torch.save(states, partial)


def load_signal_state(signals: Iterable[Signal], folder: str, device: Any) -> None:
    """Restore what `save_signal_state` wrote into every signal that keeps a state (a warning when the file is
    missing: those states start afresh)."""
    stateful = [signal for signal in signals if _is_stateful(signal)]
    if not stateful:
        return
    path = os.path.join(folder, SIGNAL_STATE_FILE)
    if not os.path.isfile(path):
        logger.warning("Checkpoint %s has no %s: the signals' own state starts afresh.", folder, SIGNAL_STATE_FILE)
        return
    states = torch.load(path, map_location=device, weights_only=True)
    for signal in stateful:
        signal.load_checkpoint_state(states.get(signal.name, {}))


def attach_signal_modules(model: nn.Module, modules: SignalModules, deepspeed: bool, optimizer: Any) -> bool:
    """Under DeepSpeed, which trains, reduces, clips and checkpoints only the parameters of the module it wraps, the
    signal modules ride inside the student (under `ATTACHED_NAME`; dropped again from every exported student);
    returns whether they do. A user-built optimizer, which cannot hold them, is refused."""
    if len(modules) and optimizer is not None:
        raise ValueError(f"The active signals learn modules of their own ({', '.join(modules.keys())}), which a "
                         "user-built optimizer does not hold. Let the trainer build the optimizer (args.optim, or "
                         "optimizer_cls_and_kwargs=...) instead of passing optimizers=(...).")
    inside = bool(len(modules)) and deepspeed
    if inside:
        model.add_module(ATTACHED_NAME, modules)
    return inside
