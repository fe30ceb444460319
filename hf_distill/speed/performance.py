"""Speed settings of the process and the precision this hardware runs fast: what the command line applies by default
(and logs), what Python users call themselves (docs/performance.md, section 8).

- `keep_freed_memory`: glibc returns every allocation above its mmap threshold (at most 32 MB) to the system when it
  is freed, so the next one page-faults its memory in again; the ``[chunk, vocab]`` tensors of the output loss (64 MB
  at "auto") and a model's larger activations pay that on every use: an element-wise pass over a fresh tensor cost 3x
  one over a reused one here. Allocating from the heap and keeping freed memory halves the element-wise time of a
  distillation step on CPU (measured in docs/performance.md); the process keeps its high-water mark resident.
- `fast_bf16`: whether this device multiplies bf16 matrices fast (CPUs with AVX512-BF16 or AMX, CUDA GPUs of compute
  capability 8.0 and newer).
- `compile_obstacle`: why `torch.compile` cannot build a kernel here (no C++ compiler on a CPU, no Triton on a GPU), for
  ``output_kernel="compiled"``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import shutil
import sys
from dataclasses import dataclass

from ..signals.registry import fields_where

#: glibc's `mallopt` parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


@functools.lru_cache(maxsize=None)
def keep_freed_memory() -> bool:
    """Make glibc's malloc serve large allocations from the heap and keep freed memory for the next one
    (``mallopt(M_MMAP_MAX, 0)``, ``mallopt(M_TRIM_THRESHOLD, 2**31 - 1)``): no page faults for re-allocated tensors.
    Returns whether it took effect (False off Linux / glibc, e.g. on macOS or musl). Process-wide and not undone."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def fast_bf16(device_type: str = "cpu") -> bool:
    """Whether bf16 matmuls are fast here: CUDA with compute capability >= 8.0 (Ampere and newer), or a CPU with
    AVX512-BF16 or AMX-BF16 instructions (read from /proc/cpuinfo; False where it cannot be read)."""
    import torch

    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8
    if device_type != "cpu":
        return False
    return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())


def slow_half_precision(args, device_type: str = "cpu") -> list[str]:
    """The half-precision settings of `args` (a `DistillationConfig`) that this device multiplies slowly: on a CPU
    without AVX512-BF16 / AMX (`fast_bf16` False) torch runs bf16 and fp16 matmuls as a scalar loop, about 1 GFLOP/s
    against 128 in float32 on a 2-core AMD EPYC (docs/performance.md, section 8.9), so ``teacher_dtype``,
    ``output_layer_dtype``, ``linear_backward_dtype`` in bf16/fp16 and ``--bf16``/``--fp16`` autocast slow a step down
    by that much. Empty on GPUs and on CPUs with fast bf16."""
    if device_type != "cpu" or fast_bf16(device_type):
        return []
    half = ("bfloat16", "float16")
    named = [f"{name}={getattr(args, name)!r}" for name in ("teacher_dtype", "output_layer_dtype",
                                                             "linear_backward_dtype")
             if getattr(args, name, None) in half]
    return named + [f"--{name}" for name in ("bf16", "fp16") if getattr(args, name, False)]


def warn_slow_half_precision(args, device_type: str, logger) -> bool:
    """Log a warning naming each `slow_half_precision` setting and the fix (leave it out: float32 is this CPU's fastest
    precision); returns whether it warned. The run goes on: half precision still halves the memory it touches."""
    slow = slow_half_precision(args, device_type)
    if slow:
        logger.warning(
            f"{', '.join(slow)}: this CPU has no bf16 matrix units (no AVX512-BF16 or AMX in /proc/cpuinfo), so torch "
            "multiplies bf16 / fp16 matrices about 100x slower than float32 here. Leave these settings out (float32 is "
            "this CPU's fastest precision) unless you need the memory; the command line's speed defaults already do.")
    return bool(slow)


def compile_obstacle(device_type: str) -> str | None:
    """Why `torch.compile` cannot build the chunk kernel on this device (None: it can): inductor needs a C++ compiler
    on a CPU and Triton on a GPU; ``TORCHDYNAMO_DISABLE=1`` or ``TORCH_COMPILE_DISABLE=1`` turn `torch.compile` off."""
    import torch._dynamo

    if os.environ.get("TORCHDYNAMO_DISABLE", "") == "1" or torch._dynamo.config.disable:
        return "torch.compile is disabled in this process (TORCHDYNAMO_DISABLE=1 or TORCH_COMPILE_DISABLE=1)"
    if device_type == "cpu":
        try:
            from torch._inductor import cpp_builder

            compiler = cpp_builder.get_cpp_compiler()
        except Exception as error:  # (inductor raises its own error type when it finds no compiler)
            return f"torch.compile found no C++ compiler ({error})"
        if shutil.which(compiler) is None:
            return f"torch.compile's C++ compiler {compiler!r} is not on PATH (install g++ or set CXX)"
        return None
    if device_type in ("cuda", "xpu"):
        from torch.utils._triton import has_triton

        return None if has_triton() else "torch.compile needs Triton on this GPU (pip install triton)"
    return f"torch.compile's chunk kernel is not offered on device type {device_type!r}"


@dataclass(frozen=True)
class PrecisionAdvice:
    """What the command line applies unless told otherwise: the teacher's weights in `teacher_dtype`, and why."""

    teacher_dtype: str | None
    reason: str



def recommended_precision(device_type: str, teacher_dtype: str | None, teacher_gradients: bool = False,
                          task: str = "causal-lm") -> PrecisionAdvice:
    """A bf16 teacher where bf16 is fast (`fast_bf16`), the task is causal-LM, the user chose no teacher dtype and no
    signal differentiates through the teacher: the teacher is frozen, so its bf16 outputs cost no optimizer precision
    (KL between fp32 and bf16 SmolLM2-135M outputs: 0.002 per token); otherwise the user's choice, unchanged.
    Classifiers keep their dtype: the gain there is unmeasured, and a near-tied prediction can flip (a tiny test
    classifier's accuracy fell from 1.0 to 0.57 in bf16)."""
    if teacher_dtype not in (None, "auto"):
        return PrecisionAdvice(teacher_dtype, f"teacher_dtype={teacher_dtype} as given")
    if task != "causal-lm":
        return PrecisionAdvice(teacher_dtype, f"a {task} teacher keeps its dtype (the bf16 teacher is a causal-LM "
                                              "default)")
    if teacher_gradients:
        return PrecisionAdvice(teacher_dtype, "a gradient signal differentiates through the teacher: it keeps its dtype")
    if fast_bf16(device_type):
        unit = "this GPU" if device_type == "cuda" else "this CPU (AVX512-BF16 / AMX)"
        return PrecisionAdvice("bfloat16", f"{unit} multiplies bf16 matrices fast: the frozen teacher runs in bf16")
    return PrecisionAdvice(teacher_dtype, "no fast bf16 on this device: the teacher keeps its dtype")


def apply_speed_defaults(args, device_type: str, task: str = "causal-lm") -> list[str]:
    """What the command line does unless ``--fast_defaults false``: `keep_freed_memory` on CPU, the
    `recommended_precision` teacher dtype, the `recommended_output_layer_dtype`, the
    `recommended_linear_backward_dtype`, the `recommended_output_kernel` and `recommended_compile_student_layers`
    written into `args` (a
    `DistillationConfig`); returns what was done, for the log. The Python API applies nothing (`TrainingArguments`
    defaults); call this yourself for the same."""
    done = []
    if device_type == "cpu" and keep_freed_memory():
        done.append("glibc keeps freed memory for reuse (no page faults on re-allocated tensors)")
    # (signals that differentiate through the teacher, `Signal.differentiates_teacher`: a bf16 one makes them coarse)
    gradients = bool(fields_where(args, differentiates_teacher=True))
    advice = recommended_precision(device_type, args.teacher_dtype, gradients, task)
    if advice.teacher_dtype != args.teacher_dtype:
        args.teacher_dtype = advice.teacher_dtype
    done.append(advice.reason)
    output_layers = recommended_output_layer_dtype(device_type, args, gradients, task)
    if output_layers is not None:
        args.output_layer_dtype = output_layers
        done.append("the chunked output layers' matmuls run in bf16, their log-sum-exp, loss and gradient accumulation "
                    "in float32 (held-out loss +0.13% vs float32 after 60 SmolLM2 steps, 1.5x the tokens/s)")
    backward = recommended_linear_backward_dtype(device_type, args, gradients, task)
    if backward is not None:
        args.linear_backward_dtype = backward
        done.append("the student's linear layers keep their float32 forward and take their backward products in bf16 "
                    "(linear_backward_dtype; one step's gradient within about 1% of float32's)")
    kernel = recommended_output_kernel(device_type, args, task)
    if kernel is not None:
        args.output_kernel = kernel
        done.append("the chunked output terms run as one torch.compile kernel per chunk (output_kernel='compiled': "
                    "the same values, a few passes instead of some fifteen; seconds of compiling on the first step)")
    if recommended_compile_student_layers(device_type, args, gradients, task):
        args.compile_student_layers = True
        done.append("the student's decoder layers run through torch.compile in training steps (compile_student_layers: "
                    "their element-wise work fused, the same values; one layer's graph compiled on the first step)")
    return done


def _sharded(args) -> bool:
    """Whether the run shards the student (DeepSpeed / FSDP, in `args` or accelerate's ``ACCELERATE_USE_*``)."""
    return bool(getattr(args, "deepspeed", None) or getattr(args, "fsdp", None) or any(
        os.environ.get(f"ACCELERATE_USE_{engine}", "false").lower() in ("1", "true") for engine in ("DEEPSPEED", "FSDP")))


def _student_precision_free(device_type: str, args, teacher_gradients: bool, task: str) -> bool:
    """Whether the command line may lower the precision of the student's own matmuls: bf16 is fast here, the task is
    causal-LM, no ``--bf16`` / ``--fp16`` (they set it already) and no signal differentiates through the teacher."""
    if task != "causal-lm" or teacher_gradients or getattr(args, "bf16", False) or getattr(args, "fp16", False):
        return False
    return fast_bf16(device_type)


def recommended_output_layer_dtype(device_type: str, args, teacher_gradients: bool = False,
                                   task: str = "causal-lm") -> str | None:
    """``"bfloat16"`` for `output_layer_dtype` where the student's precision is free to choose
    (`_student_precision_free`), the output loss is chunked (``logits_chunk_size != 0``) and the user chose no
    output-layer dtype; else None (keep the user's setting). The output layers are most of an LLM distillation step's
    FLOPs (``2 * d * V`` per token for each model, three times for the student): on this CPU the step ran 1.5x faster
    with a held-out loss within 0.13% of the float32 run's (docs/performance.md, section 8)."""
    if getattr(args, "output_layer_dtype", None) is not None or args.logits_chunk_size == 0:
        return None
    return "bfloat16" if _student_precision_free(device_type, args, teacher_gradients, task) else None


def recommended_linear_backward_dtype(device_type: str, args, teacher_gradients: bool = False,
                                      task: str = "causal-lm") -> str | None:
    """``"bfloat16"`` for `linear_backward_dtype` where the student's precision is free to choose
    (`_student_precision_free`), the user chose none and the run is not DeepSpeed / FSDP; else None. The backward is
    two thirds of the decoder's matmul FLOPs; its bf16 products move one step's gradient about 1% (a bf16 forward:
    16-25%) and kept the held-out loss of a 60-step SmolLM2 run within 0.1% of float32's (docs/performance.md,
    section 8)."""
    if getattr(args, "linear_backward_dtype", None) is not None or _sharded(args):
        return None
    return "bfloat16" if _student_precision_free(device_type, args, teacher_gradients, task) else None


def recommended_output_kernel(device_type: str, args, task: str = "causal-lm") -> str | None:
    """``"compiled"`` for `output_kernel` where the run is causal-LM, its output loss is chunked
    (``logits_chunk_size != 0``), the kernel is the default ``"chunked"`` and `torch.compile` can build here
    (`compile_obstacle`); else None. The fused closed form ran a SmolLM2 chunk 2.4x faster than the eager one on a
    CPU and the whole step about 1.18x (docs/performance.md, section 8), for seconds of compiling on the first chunk;
    the values are the same to float tolerance."""
    if task != "causal-lm" or getattr(args, "output_kernel", "chunked") != "chunked" or args.logits_chunk_size == 0:
        return None
    return "compiled" if compile_obstacle(device_type) is None else None


def recommended_compile_student_layers(device_type: str, args, teacher_gradients: bool = False,
                                       task: str = "causal-lm") -> bool:
    """True for `compile_student_layers` where the run is causal-LM, `torch.compile` can build here
    (`compile_obstacle`), nothing compiles the student already (``torch_compile``), no signal differentiates twice
    (every teacher-gradient signal does) and the run is not DeepSpeed / FSDP. Fusing the decoder layers' element-wise
    work ran the SmolLM2 student's recommended step 1.10x faster on a CPU for about 20 s of compiling on the first
    step, with the same values to float tolerance (docs/performance.md, section 8.8)."""
    if task != "causal-lm" or teacher_gradients or getattr(args, "compile_student_layers", False) or getattr(
            args, "torch_compile", False) or _sharded(args):
        return False
    return compile_obstacle(device_type) is None
