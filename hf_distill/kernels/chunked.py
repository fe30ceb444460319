"""Chunked output losses: the logits signal and the task cross-entropy computed from final hidden states and the
output layer, a chunk of positions at a time, so that no ``[positions, vocab]`` tensor ever exists whole.

For a causal LM the logits are ``z = softcap(h W^T + b)`` with h the decoder's final hidden state. For each chunk
of counted positions the forward computes z for the student (and the teachers), the terms of the chunk, and, when a
gradient is needed, ``dL/dz`` with autograd over the chunk alone; it turns that into ``dL/dh = dL/dz W`` and adds
``dL/dW = (dL/dz)^T h`` (Liger-style: the gradient is formed in the forward, chunk by chunk, and the backward only
scales it). Peak memory is a few ``[chunk, vocab]`` tensors plus one output-layer-sized gradient; the matmuls are
those of the plain path.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ContextManager

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling import accepts_input, output_logits, text_config, unwrap
from ..signals.closed_form import cross_entropy_and_grad
from ..signals.output import CachedTargets, OutputSignal

#: Elements of one ``[chunk, vocab]`` float32 tensor that "auto" aims at (64 MB): chunk = 2**24 // vocab.
AUTO_CHUNK_ELEMENTS = 2**24


def auto_chunk_size(vocab_size: int) -> int:
    """The chunk length "auto" picks: ``max(16, 2**24 // vocab)`` positions (64 at Gemma 3's 262,144)."""
    return max(16, AUTO_CHUNK_ELEMENTS // max(int(vocab_size), 1))


@dataclass
class OutputHead:
    """A model's output layer as plain tensors: ``z = softcap(h W^T + b)``, softcap(x) = c * tanh(x / c)."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    softcap: float | None = None

    @property
    def vocab_size(self) -> int:
        return int(self.weight.shape[0])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``softcap(h W^T + b)`` for hidden states of any leading shape."""
        z = F.linear(hidden, self.weight.to(hidden.dtype), None if self.bias is None else self.bias.to(hidden.dtype))
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z


def _causal_lm(model: nn.Module) -> nn.Module:
    base = unwrap(model)
    return base


def chunking_obstacle(model: nn.Module) -> str | None:
    """Why the chunked path cannot run on `model` (None when it can): it needs a transformers causal LM whose forward
    takes `logits_to_keep`, with a plain linear output layer on top of a decoder (its `base_model`)."""
    lm = _causal_lm(model)
    if not accepts_input(model, "logits_to_keep"):
        return f"{type(lm).__name__}.forward takes no `logits_to_keep`"
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor) or head.weight.dim() != 2:
        return f"{type(lm).__name__} has no linear output layer (get_output_embeddings)"
    if type(head) is not nn.Linear:
        return f"its output layer is a {type(head).__name__} (e.g. a LoRA-wrapped lm_head), not a plain nn.Linear"
    decoder = getattr(lm, "base_model", None)
    if decoder is None or decoder is lm:
        return f"{type(lm).__name__} has no separate decoder (`base_model`) whose output feeds the output layer"
    if getattr(getattr(lm, "config", None), "logit_scale", None) not in (None, 1, 1.0):
        return f"{type(lm).__name__} scales its logits (config.logit_scale)"
    return None


def output_head(model: nn.Module) -> OutputHead:
    """The output layer of a causal LM (see `chunking_obstacle`), with the config's `final_logit_softcapping`."""
    lm = _causal_lm(model)
    head = lm.get_output_embeddings()
    config = text_config(lm.config)
    return OutputHead(head.weight, head.bias, getattr(config, "final_logit_softcapping", None))


class FinalHiddenTap:
    """Context manager capturing the decoder's final hidden state ``[B, T, H]`` (the output layer's input) during a
    forward of the whole causal LM, so the forward still goes through every wrapper (DDP, PEFT)."""

    def __init__(self, model: nn.Module) -> None:
        self.decoder = _causal_lm(model).base_model
        self.value: torch.Tensor | None = None
        self._handle = None

    def __enter__(self) -> "FinalHiddenTap":
        def hook(_module, _args, output):
            if isinstance(output, (tuple, list)):
                self.value = output[0]
            elif hasattr(output, "last_hidden_state"):
                self.value = output.last_hidden_state
            else:
                self.value = output["last_hidden_state"] if isinstance(output, dict) else output

        self._handle = self.decoder.register_forward_hook(hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()


def compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype a matmul of `hidden` and `weight` runs in here: autocast's when it is on for their device, else the
    inputs' (the lower-precision one)."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return hidden.dtype if torch.finfo(hidden.dtype).eps >= torch.finfo(weight.dtype).eps else weight.dtype


def head_tolerance(dtype: torch.dtype) -> float:
    """Largest relative difference accepted between two computations of the same logits in `dtype`:
    ``max(1e-3, 2 * eps(dtype))`` (1e-3 in float32, 1.6e-2 in bfloat16, 2e-3 in float16)."""
    return max(1e-3, 2 * torch.finfo(dtype).eps)


def check_head_reproduces_logits(head: OutputHead, hidden: torch.Tensor, logits: torch.Tensor, who: str,
                                 precision: Callable[[], ContextManager] = nullcontext) -> None:
    """The model returned the logits of its last position (``logits_to_keep=1``): recomputing them from the captured
    hidden state, in the precision the model's forward ran in (`precision`: e.g. the accelerator's autocast), must
    agree within that precision's `head_tolerance`, else the model does something to its logits that the chunked
    path would miss."""
    with precision():
        ours = head.logits(hidden[:, -1:, :]).float()
        tolerance = head_tolerance(compute_dtype(hidden, head.weight))
    theirs = logits[:, -1:, :].float()
    scale = theirs.abs().max().clamp_min(1e-6)
    error = ((ours - theirs).abs().max() / scale).item()
    if error > tolerance:
        raise ValueError(
            f"The chunked logits loss recomputes the {who}'s logits from its final hidden state and output layer, but "
            f"they differ from the model's own logits (max relative difference {error:.2e}, more than the "
            f"{tolerance:.1e} its precision allows): this model changes its logits in a way the chunked path does not "
            "know. Set logits_chunk_size=0 to use the full logits."
        )


class HeadCheck:
    """`check_head_reproduces_logits` once per model (the first batch it sees)."""

    def __init__(self, who: str) -> None:
        self.who = who
        self._checked: set[int] = set()

    def logits_to_keep(self, model: nn.Module, device: torch.device) -> int | torch.Tensor:
        """What the model's forward is asked for: its last position's logits until the check has passed, then none (an
        empty index: the model's own output layer does no work, and a non-contiguous ``[B, 1, H]`` slice no longer
        makes the matmul copy the output weight once per row, 0.5 s a step for SmolLM2 under CPU autocast)."""
        if id(model) in self._checked:
            return torch.empty(0, dtype=torch.long, device=device)
        return 1

    def __call__(self, model: nn.Module, head: OutputHead, hidden: torch.Tensor, outputs: Any,
                 precision: Callable[[], ContextManager] = nullcontext) -> None:
        if id(model) in self._checked:
            return
        check_head_reproduces_logits(head, hidden.detach(), output_logits(outputs).detach(), self.who, precision)
        self._checked.add(id(model))


#: terms_fn(z, start, end) -> {term: sum over the chunk's rows}; z the student's ``[chunk, vocab]`` logits.
TermsFn = Callable[[torch.Tensor, int, int], dict[str, torch.Tensor]]


def _capped(z: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return torch.tanh(z / softcap) * softcap if softcap is not None else z


class _ChunkedHeadLoss(torch.autograd.Function):
    """``total = sum_k c_k * S_k`` with ``S_k = sum over chunks of terms_fn(z_chunk)[k]``, z = head(hidden); returns
    (total, S as a vector in `names` order, non-differentiable). Gradients are formed in the forward, per chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, head_softcap, terms_fn, names, coefficients, chunk_size, precision):
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        want_grad = needs_hidden or needs_weight or needs_bias
        n = hidden.shape[0]
        dtype = hidden.dtype
        with precision():  # the output layer's matmuls in the precision of the student's forward (autocast: bf16)
            on = torch.is_autocast_enabled(hidden.device.type)
            mm = torch.get_autocast_dtype(hidden.device.type) if on else dtype
        w = weight.to(mm)  # (cast once, not per chunk)
        b = None if bias is None else bias.to(mm)
        grad_hidden = torch.zeros_like(hidden) if needs_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if needs_bias else None
        sums = torch.zeros(len(names), dtype=torch.float64, device=hidden.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            h = hidden[start:end].to(mm)
            z = F.linear(h, w, b)
            closed_form = getattr(terms_fn, "closed_form", None) if want_grad else None
            raw = head_softcap is None and getattr(terms_fn, "takes_raw_logits", False)  # (z in the matmuls' dtype)
            z_in = z if raw else _capped(z.float(), head_softcap)
            found = closed_form(z_in, start, end, coefficients) if closed_form else None
            if found is not None:  # value and dL/dz by formula (`signals.closed_form`), no autograd graph
                terms, grad_z, capped = found
                weighted = sum(coefficients[k] * terms[k].float() for k in names)
                if head_softcap is not None and grad_z is not None:  # d(c tanh(z / c))/dz = 1 - tanh^2
                    grad_z.mul_(1 - (capped / head_softcap).square_())
            else:
                with torch.enable_grad():
                    z = z.float().detach().requires_grad_(want_grad)
                    terms = terms_fn(_capped(z, head_softcap), start, end)
                    weighted = sum(coefficients[k] * terms[k].float() for k in names)
                    if want_grad and weighted.requires_grad:
                        (grad_z,) = torch.autograd.grad(weighted, z)
                    else:
                        grad_z = None
            total += weighted.detach()
            sums += torch.stack([terms[k].detach().double() for k in names])
            if grad_z is None:
                continue
            g = grad_z.to(mm)  # dL/dh and dL/dW as matmuls in the forward's precision, accumulated in float32
            if grad_hidden is not None:
                grad_hidden[start:end] = g @ w
            if grad_weight is not None:
                if mm == torch.float32:
                    grad_weight.addmm_(g.T, h)
                else:
                    grad_weight += g.T @ h
            if grad_bias is not None:
                grad_bias += grad_z.float().sum(dim=0)
        ctx.save_for_backward(
            grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
        )
        ctx.mark_non_differentiable(sums)
        return total, sums

    @staticmethod
    def backward(ctx, grad_total, _grad_sums):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scale = grad_total
        unit = scale.device.type == "cpu" and float(scale) == 1.0  # (the usual case: no pass over the gradients)

        def scaled(g):
            return None if g is None else g if unit else g * scale.to(g.dtype)

        return scaled(grad_hidden), scaled(grad_weight), scaled(grad_bias), None, None, None, None, None, None


def chunked_head_losses(
    hidden: torch.Tensor,
    head: OutputHead,
    terms_fn: TermsFn,
    coefficients: dict[str, float | torch.Tensor],
    chunk_size: int,
    precision: Callable[[], ContextManager] = nullcontext,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Chunk by chunk over the rows of `hidden` (``[N, H]``, the counted positions): ``S_k = sum_rows terms_k(z)``
    with ``z = head(hidden)`` computed under `precision` (the autocast the student's forward ran in; z is then used
    in float32, as the plain path's logits). Returns ``(sum_k c_k * S_k, {k: S_k})``: the first carries the gradient
    with respect to `hidden` and the head's parameters, the sums are detached (for logs)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    names = tuple(coefficients)
    if not names:  # no output term is active (hidden-state signals alone): nothing to compute
        return hidden.new_zeros((), dtype=torch.float32), {}
    weight, bias = head.weight, head.bias
    if not torch.is_grad_enabled():  # (evaluation: no gradient is formed, though the parameters require one)
        hidden, weight, bias = hidden.detach(), weight.detach(), None if bias is None else bias.detach()
    total, sums = _ChunkedHeadLoss.apply(
        hidden, weight, bias, head.softcap, terms_fn, names, coefficients, int(chunk_size), precision
    )
    return total, {name: sums[i].float() for i, name in enumerate(names)}


@dataclass
class OutputTerms:
    """What `terms_fn` computes from a chunk of student logits ``z`` (rows ``start:end`` of the counted positions):

    - ``task``: ``sum_rows -log softmax(z)[label]`` when `labels` (``[N]``, aligned with the rows) is given;
    - ``<signal.name>``: the output term ``sum_rows s * D(z_s, z_t)`` of `signal` (an `OutputSignal`), the teacher
      logits from each of `teacher_heads` applied to its `teacher_hidden` rows (combined by `combine`), or from
      `cached` top-k targets (`OutputSignal.logits_rows` / `top_k_rows`);
    - ``agreement``: the number of rows whose student and teacher top-1 agree (evaluation).
    `shared_vocab` cuts both to the first ids for the teacher comparison (vocab_mismatch="truncate"). The teacher
    heads run under `precision` (the autocast the teachers' forwards ran in) and are compared in float32.
    """

    labels: torch.Tensor | None = None
    signal: OutputSignal | None = None
    teacher_heads: tuple[OutputHead, ...] = ()
    teacher_hidden: tuple[torch.Tensor, ...] = ()
    combine: Callable[[list[torch.Tensor]], torch.Tensor] | None = None
    cached: CachedTargets | None = None
    shared_vocab: int | None = None
    agreement: bool = False
    precision: Callable[[], ContextManager] = nullcontext
    tokens: torch.Tensor | None = None  #: ``[N]``: the token that followed each row (`OutputSignal.needs_tokens`)

    def teacher_logits(self, start: int, end: int, raw: bool = False) -> torch.Tensor:
        """The (combined) teacher logits of rows ``start:end``, float32, cut to the shared vocabulary; `raw`: one
        teacher's in the dtype of its output layer's matmul."""
        with torch.no_grad(), self.precision():
            each = [head.logits(h[start:end]) for head, h in zip(self.teacher_heads, self.teacher_hidden)]
            if not (raw and len(each) == 1 and self.combine is None):
                each = [logits.float() for logits in each]
            teacher = self.combine(each) if self.combine is not None else each[0]
        return teacher if self.shared_vocab is None else teacher[:, : self.shared_vocab]

    def __call__(self, z: torch.Tensor, start: int, end: int) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if self.labels is not None:
            out["task"] = F.cross_entropy(z.float(), self.labels[start:end].long(), reduction="sum")
        if self.signal is None and not self.agreement:
            return out
        student = z if self.shared_vocab is None else z[:, : self.shared_vocab]
        signal = self.signal
        if self.cached is not None:
            rows = self.cached.rows(start, end)
            teacher_top1 = rows.ids[:, 0]
            if signal is not None:
                out[signal.name] = signal.top_k_rows(student, rows).sum()
        else:
            teacher = self.teacher_logits(start, end)
            teacher_top1 = teacher.argmax(dim=-1) if self.agreement else None
            if signal is not None:
                tokens = None if self.tokens is None else self.tokens[start:end]
                out[signal.name] = signal.logits_rows(student, teacher, tokens).sum()
        if self.agreement:
            out["agreement"] = (student.detach().argmax(dim=-1) == teacher_top1).sum()
        return out

    def closed_form_applies(self) -> bool:
        """Whether every term of a chunk has a closed form of value and gradient (the one eligibility check of the
        fused paths): no cached targets, no cut vocabulary, and an output signal with a `closed_form` (or none)."""
        return self.cached is None and self.shared_vocab is None and (
            self.signal is None or self.signal.closed_form() is not None)

    def closed_form(self, z: torch.Tensor, start: int, end: int, coefficients: dict[str, Any]
                    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, torch.Tensor] | None:
        """The chunk's terms and ``dL/dz`` of ``L = sum_k c_k * term_k`` by formula (`signals.closed_form`), or None
        where a term needs autograd (`closed_form_applies`)."""
        if not self.closed_form_applies():
            return None
        terms: dict[str, torch.Tensor] = {}
        grad: torch.Tensor | None = None
        if self.labels is not None:
            terms["task"], grad = cross_entropy_and_grad(z, self.labels[start:end])
            grad.mul_(coefficients["task"])
        if self.signal is not None or self.agreement:
            teacher = self.teacher_logits(start, end)
            if self.agreement:
                terms["agreement"] = (z.argmax(dim=-1) == teacher.argmax(dim=-1)).sum()
        if self.signal is not None:
            values, g = self.signal.closed_form()(z, teacher)
            terms[self.signal.name] = values.sum()
            g.mul_(coefficients[self.signal.name])
            grad = g if grad is None else grad.add_(g)
        return terms, grad, z
