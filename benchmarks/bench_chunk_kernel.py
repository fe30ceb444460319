"""The chunked output loss's closed form per chunk: eager (`output_kernel="chunked"`) vs `torch.compile`d ("compiled").

What runs, per (vocabulary, logits dtype, loss): one chunk of student and teacher logits ``[chunk, V]`` (chunk =
``2**24 // V``, what ``logits_chunk_size="auto"`` picks), random ``N(0, 3^2)``, labels for the task term, and
``L = 0.5 CE + 0.5 T^2 D`` with its gradient ``dL/dz`` returned in the logits' dtype: exactly the per-chunk work of
`kernels.chunked` between the output layer's matmuls.

- eager: the logits cast to float32, `closed_form.cross_entropy_and_grad` + `divergence_and_grad`, the gradient cast
  back (what ``"chunked"`` does);
- compiled: `kernels.compiled.CompiledKernel` (one `torch.compile` kernel; its compile time is printed apart).

Time: median of --repeats calls after two warm-ups, `keep_freed_memory()` on (as the command line). The gradient's
relative difference ``||g_c - g_e|| / ||g_e||`` and the loss's are printed (both read the same logits). No matmul
runs here, so the machine's matmul limit does not apply: the compiled kernel's rate is given as the bytes of the three
``[chunk, V]`` tensors it must touch (two read, one written) over its time.

    python benchmarks/bench_chunk_kernel.py
    python benchmarks/bench_chunk_kernel.py --vocab 49152 --dtypes bfloat16 --losses jsd --output docs/results/x.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def measure(vocab: int, dtype_name: str, loss: str, repeats: int, device: str) -> dict:
    import torch

    from hf_distill.kernels.compiled import CompiledKernel, chunk_terms

    dtype = getattr(torch, dtype_name)
    rows = 2**24 // vocab
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(rows, vocab, generator=g) * 3).to(device=device, dtype=dtype)
    teacher = (torch.randn(rows, vocab, generator=g) * 3).to(device=device, dtype=dtype)
    labels = torch.randint(0, vocab, (rows,), generator=g).to(device)
    half = torch.tensor(0.5, device=device)
    args = (half, half, loss, 2.0, 0.5, 4.0, dtype)
    kernel = CompiledKernel()

    def timed(fn) -> float:
        fn(), fn()
        times = []
        for _ in range(repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    start = time.perf_counter()
    compiled_out = kernel(z, teacher, labels, *args)
    compile_s = time.perf_counter() - start
    eager_out = chunk_terms(z, teacher, labels, *args)
    eager_s = timed(lambda: chunk_terms(z, teacher, labels, *args))
    compiled_s = timed(lambda: kernel(z, teacher, labels, *args))
    value = lambda out: float(0.5 * out[0] + 0.5 * out[1])  # noqa: E731
    ge, gc = eager_out[2].float(), compiled_out[2].float()
    return {
        "vocab": vocab, "rows": rows, "dtype": dtype_name, "loss": loss, "eager_ms": eager_s * 1e3,
        "compiled_ms": compiled_s * 1e3, "speedup": eager_s / compiled_s, "compile_s": compile_s,
        "compiled_gb_s": 3 * z.numel() * z.element_size() / compiled_s / 1e9,
        "fell_back": kernel.failed, "grad_rel_diff": float((gc - ge).norm() / ge.norm()),
        "loss_rel_diff": abs(value(compiled_out) - value(eager_out)) / abs(value(eager_out)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[49_152, 262_144])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--losses", nargs="+", default=["jsd", "forward_kl"], choices=["jsd", "forward_kl",
                                                                                      "reverse_kl"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", default=None)
    opts = parser.parse_args()

    import torch
    from bench_logits_loss import machine

    from hf_distill.speed.performance import compile_obstacle, keep_freed_memory

    keep_freed_memory()
    obstacle = compile_obstacle(opts.device)
    if obstacle:
        raise SystemExit(f"torch.compile cannot run here: {obstacle}")
    rows = []
    for vocab in opts.vocab:
        for dtype in opts.dtypes:
            for loss in opts.losses:
                rows.append(measure(vocab, dtype, loss, opts.repeats, opts.device))
                print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    print(f"\n### One chunk's closed-form loss and gradient: eager vs compiled ({opts.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads)\n")
    print("| vocab | rows | logits | loss | eager ms | compiled ms | speedup | compiled GB/s | compile s (first call) "
          "| grad rel. diff | loss rel. diff |")
    print("|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        note = " (fell back to eager)" if r["fell_back"] else ""
        print(f"| {r['vocab']:,} | {r['rows']} | {r['dtype']} | {r['loss']} | {r['eager_ms']:.1f} | "
              f"{r['compiled_ms']:.1f}{note} | {r['speedup']:.2f}x | {r['compiled_gb_s']:.1f} | {r['compile_s']:.1f} | {r['grad_rel_diff']:.1e} | "
              f"{r['loss_rel_diff']:.1e} |")
    info = machine(opts.device)
    print(f"\nMachine: {json.dumps(info)}\nSettings: L = 0.5 CE + 0.5 T^2 D, T = 2, beta = 0.5, chunk = 2**24 // V, "
          f"median of {opts.repeats}")
    if opts.output:
        os.makedirs(os.path.dirname(opts.output) or ".", exist_ok=True)
        with open(opts.output, "w") as f:
            json.dump({"machine": info, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
