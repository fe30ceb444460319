"""The machine's own matmul limit at a job's shapes, and each benchmark row's share of it (the `machine` section).

`matmul_rate` times ``torch.mm`` of one shape in one dtype (median of a few runs of at least --seconds each, after a
warm-up; a product above `MAX_TIMED_PRODUCT` multiply-adds on fewer columns). `job_limit` takes the products one step
of a job runs (`hf_distill.speed.flops.matmul_shapes`: every linear
layer, the chunked output layer, attention) and returns the rate at which those products alone would run here:
``sum_i flops_i / sum_i (flops_i / rate_i)``, each product at its own measured rate. A row's achieved FLOP/s is its
tokens/s times `hf_distill.speed.flops.distillation_flops_per_token`; its share is that over the limit.

    python benchmarks/machine_limits.py                 # the SmolLM2 job of bench_vs_trl.py at 4 x 256, fp32 and bf16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

#: Products above this many multiply-adds are timed on fewer output columns (same rows and inner size): a
#: ``[2048, 640] @ [640, 262144]`` is timed as ``[2048, 640] @ [640, 16384]``, 20 GFLOP, where the rate no longer grows.
MAX_TIMED_PRODUCT = 2048 * 640 * 16384
#: Columns of the product that estimates a dtype's speed before it is timed (`_affordable_cols`).
PROBE_COLS = 64
DTYPES_BY_DEVICE = {"cpu": ("float32", "bfloat16"), "cuda": ("float32", "tf32", "bfloat16", "float16")}


def matmul_rate(rows: int, inner: int, cols: int, dtype: str, device: str = "cpu", seconds: float = 0.2,
                repeats: int = 3) -> float:
    """GFLOP/s of ``[rows, inner] @ [inner, cols]`` in `dtype` ("tf32": float32 with TF32 tensor cores on)."""
    import torch

    torch_dtype = torch.float32 if dtype == "tf32" else getattr(torch, dtype)
    if rows * inner * cols > MAX_TIMED_PRODUCT:  # (timed on fewer columns: the rate is flat at this size)
        cols = max(1, MAX_TIMED_PRODUCT // (rows * inner))
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = dtype == "tf32"
    try:
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        cols = _affordable_cols(rows, inner, cols, torch_dtype, device, seconds, sync)
        a = torch.randn(rows, inner, device=device, dtype=torch_dtype)
        b = torch.randn(inner, cols, device=device, dtype=torch_dtype)
        for _ in range(2):
            a @ b
        sync()
        flops = 2.0 * rows * inner * cols
        start = time.perf_counter()
        a @ b
        sync()
        once = max(time.perf_counter() - start, 1e-6)
        n = max(1, int(seconds / once))
        rates = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(n):
                a @ b
            sync()
            rates.append(flops * n / (time.perf_counter() - start) / 1e9)
        return statistics.median(rates)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def _affordable_cols(rows: int, inner: int, cols: int, torch_dtype, device: str, seconds: float, sync) -> int:
    """`cols`, or fewer where one product would take over `seconds`: a dtype this machine has no units for (bf16 on a
    CPU without AVX512-BF16 / AMX runs a scalar loop at about 1 GFLOP/s, 100x below float32) is timed on as many
    columns as one `seconds`-long product holds, estimated from a ``PROBE_COLS``-column product (such a loop's rate does
    not grow with the columns); a fast dtype keeps its columns."""
    import torch

    probe = min(cols, PROBE_COLS)
    a = torch.randn(rows, inner, device=device, dtype=torch_dtype)
    b = torch.randn(inner, probe, device=device, dtype=torch_dtype)
    a @ b
    sync()
    start = time.perf_counter()
    a @ b
    sync()
    estimate = (time.perf_counter() - start) * cols / probe
    return cols if estimate <= seconds else max(probe, int(cols * seconds / estimate))


def job_limit(shapes, dtypes, device: str = "cpu", seconds: float = 0.2) -> dict:
    """For each dtype: the rate of every distinct shape and the job's limit (see the module docstring)."""
    out = {"shapes": [{"rows": s.rows, "inner": s.inner, "cols": s.cols, "count": s.count, "part": s.part,
                       "gflop_per_step": s.flops / 1e9} for s in shapes], "limit_gflops": {}, "rates_gflops": {}}
    total = sum(s.flops for s in shapes)
    cache: dict[tuple, float] = {}
    for dtype in dtypes:
        seconds_needed, rates = 0.0, []
        for s in shapes:
            key = (s.rows, s.inner, s.cols, dtype)
            if key not in cache:
                cache[key] = matmul_rate(s.rows, s.inner, s.cols, dtype, device, seconds)
            rates.append(cache[key])
            seconds_needed += s.flops / (cache[key] * 1e9)
        out["rates_gflops"][dtype] = rates
        out["limit_gflops"][dtype] = total / seconds_needed / 1e9
    out["gflop_per_step"] = total / 1e9
    out["fastest_dtype"] = fastest_dtype(out)
    return out


def fastest_dtype(limits: dict) -> str:
    """The dtype of `limits` (a `job_limit` result) with the highest limit: the machine's fastest precision here."""
    return max(limits["limit_gflops"], key=limits["limit_gflops"].get)


def distillation_job(teacher_dir: str, student_layers: int | str, batch: int, seq_len: int, chunk: int | None):
    """The teacher and its `student_layers`-layer cut (or the student model folder, when `student_layers` is a path)
    as meta-device models (shapes only), their products of one step (teacher forward; student forward and backward)
    and the FLOPs per token."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from hf_distill.speed.flops import distillation_flops_per_token, matmul_shapes

    config = AutoConfig.from_pretrained(teacher_dir)
    student_config = (AutoConfig.from_pretrained(student_layers) if isinstance(student_layers, str)
                      else AutoConfig.from_pretrained(teacher_dir, num_hidden_layers=student_layers))
    with torch.device("meta"):
        teacher = AutoModelForCausalLM.from_config(config)
        student = AutoModelForCausalLM.from_config(student_config)
    tokens = batch * seq_len
    counted = batch * (seq_len - 1)  # (the positions that predict a next token: the output layer's rows)
    shapes = (matmul_shapes(teacher, tokens, seq_len, batch, chunk, output_rows=counted, name="teacher")
              + matmul_shapes(student, tokens, seq_len, batch, chunk, backward=True, output_rows=counted,
                              name="student"))
    return shapes, distillation_flops_per_token(teacher, student, seq_len)


def machine_limits(teacher_dir: str, student_layers: int | str, batch: int, seq_len: int, chunk: int | None,
                   device: str = "cpu", seconds: float = 0.2) -> dict:
    """The `machine` section of a benchmark of the distillation job: FLOPs per token written out, the limit per
    dtype."""
    shapes, step = distillation_job(teacher_dir, student_layers, batch, seq_len, chunk)
    limits = job_limit(shapes, DTYPES_BY_DEVICE.get(device, ("float32",)), device, seconds)
    limits["flops_per_token"] = step.as_dict()
    limits["flops_per_token_formula"] = (
        "teacher forward + 3 x student forward; forward = sum over nn.Linear of 2*in*out (output layer included) "
        "+ attention 2*2*heads*head_dim*(T+1)/2 per layer")
    return limits


def shares(tokens_per_s: float, limits: dict) -> dict:
    """A row's achieved GFLOP/s and its share of each dtype's limit."""
    return gflops_shares(tokens_per_s * limits["flops_per_token"]["total"] / 1e9, limits)


def gflops_shares(achieved_gflops: float, limits: dict) -> dict:
    """``{"achieved_gflops": ..., "share_of_<dtype>_limit": achieved / limit, ...}`` for each dtype of `limits`, and
    ``share_of_fastest_limit`` against the fastest dtype's (the issue-21 target: bf16 where the machine has bf16 units,
    float32 where it has none)."""
    found = {"achieved_gflops": achieved_gflops,
             **{f"share_of_{d}_limit": achieved_gflops / v for d, v in limits["limit_gflops"].items()}}
    found["share_of_fastest_limit"] = achieved_gflops / limits["limit_gflops"][fastest_dtype(limits)]
    return found


def share_cells(row: dict) -> str:
    """``"123 GFLOP/s = 45% of the float32 limit, 12% of the bfloat16 limit"`` of a row with `gflops_shares` keys."""
    return f"{row['achieved_gflops']:,.0f} GFLOP/s = " + ", ".join(
        f"{v:.0%} of the {k[len('share_of_'):-len('_limit')]} limit" for k, v in row.items() if k.startswith("share_of_"))


def output_loss_shapes(rows: int, hidden: int, vocab: int, chunk: int | None, teacher: bool = True):
    """The products of the output loss alone (`bench_logits_loss.py`): the teacher's output layer ``[rows, H] @ [H,
    V]`` (forward only) and the student's (forward, input gradient ``[rows, V] @ [V, H]``, weight gradient ``[H,
    rows] @ [rows, V]``), `chunk` rows at a time when given: ``2 * rows * H * V`` FLOPs each, 8 in all with a
    teacher."""
    from hf_distill.speed.flops import MatmulShape

    full, rest = divmod(rows, chunk) if chunk else (1, 0)
    pieces = ([(chunk or rows, full)] if full else []) + ([(rest, 1)] if rest else [])
    shapes = []
    for n, count in pieces:
        if teacher:
            shapes.append(MatmulShape(n, hidden, vocab, count, "teacher output"))
        shapes += [MatmulShape(n, hidden, vocab, count, "student output"),
                   MatmulShape(n, vocab, hidden, count, "student output"),
                   MatmulShape(hidden, n, vocab, count, "student output")]
    return shapes


def decode_shapes(model, batch: int):
    """The products of one decoding step of `model` at `batch` sequences: every linear layer ``[batch, in] @ [in,
    out]``, the output layer included (the attention over the cache, a matrix-vector product per head, is left out:
    under 3% of a 135M model's FLOPs at a few hundred positions)."""
    from hf_distill.speed.flops import matmul_shapes

    return [s for s in matmul_shapes(model, batch, 1, batch) if not s.part.endswith("attention")]


def limits_table(limits: dict) -> str:
    dtypes = list(limits["limit_gflops"])
    lines = ["| product [rows, inner] @ [inner, cols] | part | per step | GFLOP per step | "
             + " | ".join(f"{d} GFLOP/s" for d in dtypes) + " |", "|---|---|---:|---:|" + "---:|" * len(dtypes)]
    for i, s in enumerate(limits["shapes"]):
        rates = " | ".join(f"{limits['rates_gflops'][d][i]:,.0f}" for d in dtypes)
        lines.append(f"| [{s['rows']}, {s['inner']}] @ [{s['inner']}, {s['cols']}] | {s['part']} | {s['count']} | "
                     f"{s['gflop_per_step']:,.2f} | {rates} |")
    lines.append(f"| **the job's limit** | | | {limits['gflop_per_step']:,.1f} | "
                 + " | ".join(f"**{limits['limit_gflops'][d]:,.0f}**" for d in dtypes) + " |")
    fastest = fastest_dtype(limits)
    lines.append(f"\nThe fastest precision here: {fastest} ({limits['limit_gflops'][fastest]:,.0f} GFLOP/s at this "
                 "job's shapes; 'fastest' in the shares below).")
    f = limits.get("flops_per_token")
    if f is None:
        return "\n".join(lines)
    lines.append(f"\nFLOPs per token: teacher forward {f['teacher_forward'] / 1e6:,.1f} M + student forward "
                 f"{f['student_forward'] / 1e6:,.1f} M + student backward {f['student_backward'] / 1e6:,.1f} M = "
                 f"{f['total'] / 1e9:.3f} GFLOP ({limits['flops_per_token_formula']}).")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--student_layers", type=int, default=15)
    parser.add_argument("--chunk_size", type=int, default=None, help="default: what 'auto' picks (2**24 // vocab)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seconds", type=float, default=0.2)
    parser.add_argument("--output", default=None)
    opts = parser.parse_args()
    from hf_distill.data.assets import fetch
    from hf_distill.kernels.chunked import auto_chunk_size

    teacher_dir = str(fetch("smollm2-135m"))
    chunk = opts.chunk_size or auto_chunk_size(49_152)
    limits = machine_limits(teacher_dir, opts.student_layers, opts.batch_size, opts.seq_len, chunk, opts.device,
                            opts.seconds)
    print(limits_table(limits))
    if opts.output:
        with open(opts.output, "w") as f:
            json.dump(limits, f, indent=1)


if __name__ == "__main__":
    main()
