"""The frozen teacher under Accelerate's engines: placed, sharded or wrapped for inference only, never optimised.

- DDP / one device: moved to the device, no wrapper (a frozen model has no gradients to synchronise).
- FSDP: sharded like the student (FSDP2 `fully_shard` per decoder layer and at the root, or an FSDP1 wrapper), so
  each process holds 1/world of the teacher between forwards; it is never given to the optimizer.
- DeepSpeed: a ZeRO-3 inference engine (parameters partitioned) under ZeRO-3, else stage 0 (a full copy per process);
  the optimizer, scheduler and offloaded-optimizer blocks of the training config are dropped.

Also `average_gradients`, the all-reduce that modules outside the engine's wrapper (signal modules, GREAT's
discriminator) use to stay in step across processes.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

logger = logging.get_logger(__name__)


def _block_classes(model: nn.Module) -> set[str]:
    """The class names of the model's repeated blocks (transformers' `_no_split_modules`, e.g. LlamaDecoderLayer)."""
    return set(getattr(model, "_no_split_modules", None) or [])


def fully_shard_teacher(teacher: nn.Module, mesh: Any = None, **fsdp_kwargs: Any) -> nn.Module:
    """FSDP2: ``fully_shard`` every repeated block (by `_no_split_modules`) and then the root; returns the teacher.

    Between forwards each process keeps ``1/world`` of every sharded parameter; a forward all-gathers one block at a
    time. The teacher must already be frozen (`requires_grad_(False)`) and in eval mode.
    """
    from torch.distributed.fsdp import fully_shard

    blocks = _block_classes(teacher)
    for module in teacher.modules():
        if module is not teacher and type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh, **fsdp_kwargs)
    fully_shard(teacher, mesh=mesh, **fsdp_kwargs)
    return teacher


def deepspeed_inference_config(training_config: dict[str, Any], hidden_size: int | None) -> dict[str, Any]:
    """A DeepSpeed config for the frozen teacher derived from the student's: no optimizer, scheduler or optimizer
    offload; ZeRO-3 keeps partitioning (with buckets sized to the hidden size), any other stage becomes 0."""
    config = copy.deepcopy(training_config)
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    zero = config.setdefault("zero_optimization", {})
    zero.pop("offload_optimizer", None)
    if zero.get("stage", 0) == 3:
        if hidden_size:
            zero["reduce_bucket_size"] = hidden_size * hidden_size
            zero["stage3_param_persistence_threshold"] = 10 * hidden_size
            zero["stage3_prefetch_bucket_size"] = int(0.9 * hidden_size * hidden_size)
    else:
        zero["stage"] = 0
    return config


def prepare_frozen_teacher(teacher: nn.Module, accelerator: Any) -> nn.Module:
    """The teacher ready for inference under the accelerator's engine (see the module docstring); it is never added
    to the accelerator's list of trained models."""
    kind = accelerator.distributed_type.value
    if kind == "DEEPSPEED":
        import deepspeed

        plugin = accelerator.state.deepspeed_plugin
        config = getattr(teacher, "config", None)
        hidden = getattr(config, "hidden_size", None) if config is not None else None
        engine, *_ = deepspeed.initialize(model=teacher, config=deepspeed_inference_config(plugin.deepspeed_config,
                                                                                           hidden))
        engine.eval()
        return engine
    if kind == "FSDP":
        plugin = accelerator.state.fsdp_plugin
        teacher = teacher.to(accelerator.device)
        if getattr(plugin, "fsdp_version", 1) == 2:
            mesh = getattr(accelerator, "torch_device_mesh", None)
            kwargs: dict[str, Any] = {"reshard_after_forward": True}
            if getattr(plugin, "mixed_precision_policy", None) is not None:
                kwargs["mp_policy"] = plugin.mixed_precision_policy
            return fully_shard_teacher(teacher, mesh=mesh, **kwargs).eval()
        from torch.distributed.fsdp import FullyShardedDataParallel

        plugin.set_auto_wrap_policy(teacher)
        return FullyShardedDataParallel(
            teacher, sharding_strategy=plugin.sharding_strategy, auto_wrap_policy=plugin.auto_wrap_policy,
            mixed_precision=plugin.mixed_precision_policy, use_orig_params=True, device_id=accelerator.device,
        ).eval()
    prepared = accelerator.prepare_model(teacher, evaluation_mode=True)
    if prepared in accelerator._models:
        accelerator._models.remove(prepared)
    return prepared


def average_gradients(parameters: list[nn.Parameter]) -> None:
    """Average the parameters' gradients over the processes of a distributed run (no-op in a single process)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    world = torch.distributed.get_world_size()
    if world == 1:
        return
    for parameter in parameters:
        if parameter.grad is None:  # keep every process in the same collective sequence
            parameter.grad = torch.zeros_like(parameter)
        torch.distributed.all_reduce(parameter.grad, op=torch.distributed.ReduceOp.SUM)
        parameter.grad.div_(world)
