"""Talking to arbitrary models: which inputs they take, where their logits and loss are, how wide their outputs are.

Teacher and student may be any `nn.Module` returning a `ModelOutput`, a dict with ``logits``, a tuple or a tensor.
"""

from __future__ import annotations

import hashlib
import inspect
import types
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import nn
from transformers.utils import logging

logger = logging.get_logger(__name__)

#: Config attributes holding the attention-probability dropout, by family (BERT-likes, Llama-likes / DistilBERT, GPT-2).
ATTENTION_DROPOUT_ATTRIBUTES: tuple[str, ...] = ("attention_probs_dropout_prob", "attention_dropout", "attn_pdrop")


def unwrap(model: nn.Module, peft: bool = True) -> nn.Module:
    """The user's module under DDP / DataParallel / DeepSpeed / compile wrappers and, with `peft`, under a PEFT
    model (its `get_base_model()`, which holds the injected adapters)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif peft and hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            return model


def _forward_signature(model: nn.Module) -> tuple[frozenset[str], bool]:
    params = inspect.signature(unwrap(model, peft=False).forward).parameters
    names = frozenset(name for name, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    return names, takes_any


def forward_parameter_names(model: nn.Module) -> list[str]:
    """The named parameters of the model's `forward`."""
    return sorted(_forward_signature(model)[0])


def model_inputs(model: nn.Module, inputs: Mapping[str, Any], drop: Iterable[str] = ()) -> dict[str, Any]:
    """The part of the batch that `model.forward` accepts, without the keys in `drop`.

    A forward with ``**kwargs`` takes every key. ``use_cache=False`` is added where the forward takes it (training and
    distillation never reuse a KV cache).
    """
    names, takes_any = _forward_signature(model)
    dropped = set(drop) | {"num_items_in_batch"}
    kept = {k: v for k, v in inputs.items() if k not in dropped and (takes_any or k in names)}
    if "use_cache" in names and "use_cache" not in kept:
        kept["use_cache"] = False
    return kept


@contextmanager
def config_use_cache(model: nn.Module, value: bool | None) -> Iterator[None]:
    """``model.config.use_cache`` set to `value` inside the block (None, or a model without a config: unchanged).
    The Trainer sets it to ``args.use_cache`` (False by default) for training; a student saved with it would generate
    without a KV cache wherever no generation_config.json says otherwise, so saving writes the value it was loaded with."""
    config = getattr(unwrap(model), "config", None)
    if value is None or config is None or not hasattr(config, "use_cache"):
        yield
        return
    before, config.use_cache = config.use_cache, value
    try:
        yield
    finally:
        config.use_cache = before


def accepts_input(model: nn.Module, name: str) -> bool:
    """Whether `model.forward` takes an argument called `name` (explicitly or through ``**kwargs``)."""
    names, takes_any = _forward_signature(model)
    return takes_any or name in names


def output_logits(outputs: Any) -> torch.Tensor:
    """The logits of a model output: ``outputs.logits`` / ``outputs["logits"]``, a tensor itself, or the first tensor
    of a tuple that is not a 0-dim loss. A 1-D output ``[B]`` becomes ``[B, 1]`` (one regression output)."""
    if isinstance(outputs, Mapping):
        if "logits" not in outputs:
            raise ValueError(f"The model output has no `logits` (keys: {sorted(outputs.keys())}).")
        logits = outputs["logits"]
    elif torch.is_tensor(outputs):
        logits = outputs
    elif isinstance(outputs, (tuple, list)):
        candidates = [o for o in outputs if torch.is_tensor(o) and o.dim() > 0]
        if not candidates:
            raise ValueError("The model returned a tuple with no non-scalar tensor to use as logits.")
        logits = candidates[0]
    else:
        raise TypeError(
            f"Cannot find logits in a model output of type {type(outputs).__name__}: return a ModelOutput, a dict with "
            "'logits', a tuple whose first non-scalar tensor is the logits, or a tensor."
        )
    return logits.unsqueeze(-1) if logits.dim() == 1 else logits


def output_loss(outputs: Any) -> torch.Tensor | None:
    """The loss a model returned: ``outputs["loss"]`` or a leading 0-dim tensor of a tuple; else `None`."""
    if isinstance(outputs, Mapping):
        loss = outputs.get("loss")
    elif isinstance(outputs, (tuple, list)) and outputs and torch.is_tensor(outputs[0]) and outputs[0].dim() == 0:
        loss = outputs[0]
    else:
        loss = None
    return loss if torch.is_tensor(loss) else None


def declared_output_size(model: nn.Module, unit: Any) -> int | None:
    """The width of the model's outputs as its configuration declares it, or `None` when it cannot be known before
    a forward pass: the output embedding's rows for language models, ``config.num_labels`` for classifiers (`unit`:
    the student's `positions.PositionUnit`)."""
    base = unwrap(model)
    if unit.is_token_level and hasattr(base, "get_output_embeddings"):
        head = base.get_output_embeddings()
        if head is not None and getattr(head, "weight", None) is not None:
            # (a ZeRO-3 partitioned weight is empty here; DeepSpeed keeps its full shape in `ds_shape`)
            return int(getattr(head.weight, "ds_shape", head.weight.shape)[0])
    config = getattr(base, "config", None)
    if not unit.is_token_level and config is not None and hasattr(config, "num_labels"):
        return int(config.num_labels)
    return None


def describe(model: nn.Module) -> str:
    """A short name for error messages: the class and, for Hub models, where it was loaded from."""
    base = unwrap(model)
    source = getattr(getattr(base, "config", None), "_name_or_path", "") or ""
    return f"{type(base).__name__}" + (f" ({source})" if source else "")


def text_config(model_or_config: Any) -> Any:
    """The text config of a model under its wrappers (DDP, PEFT, compile) or of a config: ``get_text_config()`` where
    the config has one (a multimodal model's), else the config itself; `None` for plain modules (and None)."""
    config = getattr(unwrap(model_or_config), "config", None) if isinstance(model_or_config, nn.Module) \
        else model_or_config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


#: Values per parameter that `weights_fingerprint` reads (evenly strided).
SAMPLED_VALUES = 4096


def weights_fingerprint(model: torch.nn.Module) -> str:
    """``sha256`` over every parameter's name, shape and `SAMPLED_VALUES` evenly strided values rounded to bfloat16:
    the same for the same weights in any of float32 / bfloat16 (a cache built with a bfloat16 teacher matches the
    float32 one it was cast from), different for other weights. A short hex string (16 characters)."""
    digest = hashlib.sha256()
    for name, parameter in unwrap(model).named_parameters():
        flat = parameter.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // SAMPLED_VALUES)][:SAMPLED_VALUES]
        digest.update(f"{name}:{tuple(parameter.shape)}".encode())
        digest.update(sample.to(torch.bfloat16).float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


#: Config entries that bound a model's positions, by family (Llama/BERT, GPT-2, older GPT, some others).
CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


def context_length(model_or_config: Any) -> int | None:
    """The most positions a model reads (its config's first `CONTEXT_FIELDS` entry), for a model or a config; None
    where the config states none."""
    config = text_config(model_or_config)
    for name in CONTEXT_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


#: Why a signal needs eager attention, by reason key (said in the warning when a model is switched).
EAGER_REASONS = {
    "attention_maps": "{fields} needs attention probabilities, which only eager attention returns",
    "double_backward": "{fields} differentiates the student twice through its attention, and the fused SDPA / flash "
    "kernels have no double backward",
}


def use_eager_attention(model: nn.Module, who: str, reason: str, fields: Iterable[str]) -> None:
    """Switch `model` to eager attention when the signals of `fields` (their weight fields) need it for `reason` (see
    `EAGER_REASONS`), saying so."""
    base = unwrap(model)
    config = getattr(base, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current in (None, "eager") or not hasattr(base, "set_attn_implementation"):
        return
    logger.warning(
        "%s: switching the %s %s from %r to 'eager' attention (slower and more memory on long sequences).",
        EAGER_REASONS[reason].format(fields=" and ".join(f"{name} > 0" for name in fields)), who, describe(model),
        current,
    )
    base.set_attn_implementation("eager")


def check_no_attention_dropout(student: nn.Module) -> None:
    """Raise when the student drops attention probabilities in training (its returned maps are then no distributions)."""
    config = text_config(student)
    for name in ATTENTION_DROPOUT_ATTRIBUTES:
        value = getattr(config, name, None)
        if isinstance(value, (int, float)) and value > 0:
            raise ValueError(
                f"attention_weight > 0 compares attention distributions, but the student {describe(student)} has "
                f"{name}={value}: in training it returns attention maps after dropout, which are not distributions "
                f"(zeroed entries make the KL infinite). Load the student with {name}=0.0, e.g. "
                f"AutoModelFor...from_pretrained(path, {name}=0.0) or shrink_model(teacher, "
                f"config_overrides={{'{name}': 0.0}})."
            )


def patch_forward(modules: Iterable[nn.Module], mark: str, value: Any, forward) -> int:
    """Give each module the instance attribute `mark` = `value` and `forward` as its bound forward (a training-only
    mode, `linear_backward` / `layer_compile`); returns how many. `unpatch_forward` undoes it."""
    count = 0
    for module in modules:
        setattr(module, mark, value)
        module.forward = types.MethodType(forward, module)
        count += 1
    return count


def unpatch_forward(model: nn.Module, mark: str) -> int:
    """Undo `patch_forward` on every module of `model` that holds `mark`: its class's forward again; returns how many."""
    restored = 0
    for module in model.modules():
        if mark in module.__dict__:
            del module.__dict__[mark]
            module.__dict__.pop("forward", None)
            restored += 1
    return restored
