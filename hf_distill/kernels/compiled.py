"""The chunked output terms' closed-form value and gradient as one compiled kernel per chunk.

`output_kernel="compiled"`.

`signals.closed_form` computes, per chunk of rows, ``L = c_task * sum CE(z) + c_logits * s * sum D(z, z_t)`` and
``dL/dz = c_task (softmax(z) - onehot(y)) + c_logits * s * dD/dz`` (``s = T^2`` when the signal scales by it, else 1)
in some fifteen eager passes over the ``[chunk, V]`` tensors, each one a round trip through memory, plus the casts of
the bf16 logits to float32 and of the gradient back. `torch.compile` (inductor: C++/OpenMP loops on a CPU, Triton on
a GPU) fuses them into a few passes that read the logits in their own dtype, compute in float32 and write the
gradient once, in the dtype of the output layer's matmuls. Measured on the SmolLM2 chunk (``[341, 49152]``, bf16
logits, JSD; docs/performance.md, section 8): 185 ms eager, 75 ms compiled, equal to float tolerance.

The row count is marked dynamic (one compile for every chunk size; a new compile per kind, temperature, beta,
vocabulary size and dtype, once per run). Compiling costs seconds on the first chunk (13 s here; less from inductor's
on-disk cache). Where it cannot run (no C++ compiler, no Triton: `performance.compile_obstacle`) the run is refused
before training when asked for explicitly; a compile that fails at run time logs a warning once and the run goes on
with the eager closed form, which computes the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.utils import logging

from ..signals.closed_form import cross_entropy_and_grad, divergence_and_grad
from .chunked import OutputTerms

logger = logging.get_logger(__name__)


def chunk_terms(z: torch.Tensor, teacher: torch.Tensor | None, labels: torch.Tensor | None, c_task: torch.Tensor,
                c_logits: torch.Tensor, kind: str, temperature: float, beta: float, scale: float,
                grad_dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """``(sum CE, s * sum D, dL/dz)`` of one chunk, ``L = c_task * sum CE + c_logits * s * sum D`` (module
    docstring); the sums float32, the gradient in `grad_dtype`. `labels` None: no task term; `teacher` None: no
    divergence. The function `torch.compile` fuses; eager it equals `closed_form`'s functions."""
    task = logits = grad = None
    if labels is not None:
        task, grad = cross_entropy_and_grad(z, labels, branch_free=True)
        grad = grad * c_task
    if teacher is not None:
        values, g = divergence_and_grad(z, teacher, kind, temperature, beta)
        logits = values.sum() * scale
        g = g * (c_logits * scale)
        grad = g if grad is None else grad + g
    return task, logits, grad.to(grad_dtype)


class CompiledKernel:
    """`chunk_terms` through `torch.compile`, built on the first call; after a failed compile (a warning, once) the
    eager function. Calls with fewer than two rows run eagerly (dynamo specialises sizes 0 and 1)."""

    def __init__(self) -> None:
        self.compiled: Any = None
        self.failed = False

    def __call__(self, z: torch.Tensor, teacher: torch.Tensor | None, labels: torch.Tensor | None,
                 *args: Any) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        if self.failed or z.shape[0] < 2:
            return chunk_terms(z, teacher, labels, *args)
        if self.compiled is None:
            self.compiled = torch.compile(chunk_terms, fullgraph=True)
        for tensor in (z, teacher, labels):
            if tensor is not None:
                torch._dynamo.maybe_mark_dynamic(tensor, 0)
        try:
            return self.compiled(z, teacher, labels, *args)
        except Exception as error:  # (a compiler error: the eager function computes the same numbers)
            self.failed = True
            logger.warning("output_kernel='compiled': torch.compile failed (%s: %s); the output terms run eagerly "
                           "from here on (same values, slower).", type(error).__name__, str(error).splitlines()[0]
                           if str(error) else "")
            return chunk_terms(z, teacher, labels, *args)


#: One per process: its compiled graphs serve every run and chunk in it.
COMPILED_KERNEL = CompiledKernel()


def _scalar(value: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A coefficient as a 0-d float32 tensor (a tensor input, so a changing weight does not recompile)."""
    return torch.as_tensor(value, dtype=torch.float32, device=device).detach()


@dataclass
class CompiledOutputTerms(OutputTerms):
    """`OutputTerms` whose closed form runs as `chunk_terms` through `COMPILED_KERNEL`, on the logits in the
    matmuls' dtype (`takes_raw_logits`); what has no closed form (cached targets, a cut vocabulary, other kinds) and
    evaluation (top-1 agreement) take `OutputTerms`' paths."""

    takes_raw_logits = True

    def closed_form(self, z: torch.Tensor, start: int, end: int, coefficients: dict[str, Any]
                    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, torch.Tensor] | None:
        if not self.closed_form_applies():
            return None
        signal = self.signal
        if self.agreement or (signal is None and self.labels is None):
            return super().closed_form(z, start, end, coefficients)
        form = signal.closed_form() if signal is not None else None
        labels = None if self.labels is None else self.labels[start:end]
        teacher = None if signal is None else self.teacher_logits(start, end, raw=True)
        name = signal.name if signal is not None else "logits"
        task, output, grad = COMPILED_KERNEL(
            z, teacher, labels, _scalar(coefficients.get("task", 0.0), z.device),
            _scalar(coefficients.get(name, 0.0), z.device), form.kind if form else "forward_kl",
            form.temperature if form else 1.0, form.beta if form else 0.5, form.scale if form else 1.0, z.dtype)
        terms = {key: value for key, value in (("task", task), (name, output)) if value is not None}
        return terms, grad, z
