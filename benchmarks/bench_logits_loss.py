"""Benchmark 1: the output loss alone, plain full logits vs chunked (`logits_chunk_size`), peak memory and time.

What runs: the student's and the teacher's output layers on N counted tokens (final hidden states ``[N, H]`` and
output weights ``[V, H]``), ``L = 0.5 * CE + 0.5 * T^2 * KL(p_t || p_s)`` at T = 2, and the backward to the student's
hidden states and output weight: exactly what `DistillationTrainer` does per batch for a causal LM beyond the
decoder layers.

- plain: ``z = h W^T`` for both models, the losses on the full ``[N, V]`` logits, autograd backward.
- chunked: `hf_distill.kernels.chunked.chunked_head_losses` (chunks of ``2**24 // V`` tokens unless --chunk_size).

Each (path, vocabulary, tokens) runs in its own subprocess, so peak memory is its own: on CPU the increase of the
process's peak RSS (``ru_maxrss``) over its RSS once the inputs exist; on CUDA ``max_memory_allocated`` over the
allocation before the loss. Time: one timed forward + backward after a small warm-up, median of --repeats.
Hidden sizes are the real models': 576 for vocab 49,152 (SmolLM2) and 640 for 262,144 (Gemma 3 270M).

Target (issue 6): chunked peak <= 10% of plain at 262,144 x 2,048 tokens, time <= 1.2x plain.

Machine section (off with --no_machine; `machine_limits.py`): each row's achieved GFLOP/s, ``8 N H V`` FLOPs per step
over its time, and its share of the matmul limit of this machine in fp32 and bf16 at that row's own products.

    python benchmarks/bench_logits_loss.py                       # CPU: vocab 49,152 and 262,144, 512-2,048 tokens
    python benchmarks/bench_logits_loss.py --tokens 512 1024 2048 4096 --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HIDDEN = {49_152: 576, 262_144: 640}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(path: str, vocab: int, tokens: int, device: str, dtype_name: str, repeats: int, chunk: int | None) -> dict:
    import torch
    import torch.nn.functional as F

    from hf_distill.kernels.chunked import OutputHead, OutputTerms, auto_chunk_size, chunked_head_losses
    from hf_distill.signals.logits import LogitsSignal, logits_divergence

    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    hidden_size = HIDDEN.get(vocab, 576)
    signal = LogitsSignal("forward_kl", 2.0)
    chunk = chunk or auto_chunk_size(vocab)

    def make(n):
        h = (torch.randn(n, hidden_size, device=device, dtype=dtype) * 0.5).requires_grad_(True)
        ht = torch.randn(n, hidden_size, device=device, dtype=dtype) * 0.5
        labels = torch.randint(0, vocab, (n,), device=device)
        return h, ht, labels

    weight = (torch.randn(vocab, hidden_size, device=device, dtype=dtype) * 0.02).requires_grad_(True)
    teacher_weight = torch.randn(vocab, hidden_size, device=device, dtype=dtype) * 0.02

    def step(h, ht, labels):
        if path == "plain":
            z = h @ weight.T
            with torch.no_grad():
                zt = ht @ teacher_weight.T
            ce = F.cross_entropy(z.float(), labels, reduction="sum")
            kl = logits_divergence(z, zt, "forward_kl", 2.0).sum()
            loss = 0.5 * ce + 0.5 * kl
        else:
            terms = OutputTerms(labels=labels, signal=signal, teacher_heads=(OutputHead(teacher_weight),),
                                teacher_hidden=(ht,))
            loss, _ = chunked_head_losses(h, OutputHead(weight), terms, {"task": 0.5, "logits": 0.5}, chunk)
        loss.backward()
        value = float(loss.detach())
        weight.grad = None
        h.grad = None
        return value

    step(*make(32))  # warm-up: kernels, allocator
    inputs = make(tokens)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_alloc = torch.cuda.memory_allocated()
    base_rss = _rss_mb()
    times, loss = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        loss = step(*inputs)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {
        "path": path, "vocab": vocab, "tokens": tokens, "hidden": hidden_size, "chunk": chunk if path != "plain" else None,
        "seconds": statistics.median(times), "loss": loss,
        "peak_increase_mb": (torch.cuda.max_memory_allocated() - base_alloc) / 2**20 if device == "cuda"
        else peak_rss - base_rss,
    }
    return result


def machine(device: str) -> dict:
    """The machine and versions a benchmark ran on: CPU model, cores (all and usable), Python and the installed
    torch / transformers / trl / accelerate / datasets versions, and the GPU's name on CUDA."""
    import platform
    from importlib import metadata

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(),
            "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "python": platform.python_version()}
    for package in ("torch", "transformers", "trl", "accelerate", "datasets"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = None
    if device == "cuda":
        import torch

        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def machine_section(rows: list[dict], device: str, chunk_size: int | None) -> dict:
    """Each row's GFLOP/s (``8 * N * H * V`` per step: the teacher's output layer, the student's and its two gradient
    products, `machine_limits.output_loss_shapes`) and its share of this machine's matmul limit at the row's own
    products (plain: whole, chunked: per chunk), measured after the rows; printed as a table, returned for the JSON."""
    from machine_limits import DTYPES_BY_DEVICE, gflops_shares, job_limit, output_loss_shapes

    from hf_distill.kernels.chunked import auto_chunk_size

    dtypes = DTYPES_BY_DEVICE.get(device, ("float32",))
    print("\n### Machine: achieved GFLOP/s and share of the matmul limit at each row's products (8 N H V FLOPs per "
          "step)\n")
    print("| vocab | tokens | path | GFLOP per step | GFLOP/s | " + " | ".join(f"{d} limit | share" for d in dtypes)
          + " |")
    print("|---:|---:|---|---:|---:|" + "---:|---:|" * len(dtypes))
    out = []
    for pair in rows:
        for path, row in pair.items():
            if "error" in row:
                continue
            n, hidden, vocab = row["tokens"], row["hidden"], row["vocab"]
            chunk = (chunk_size or auto_chunk_size(vocab)) if path == "chunked" else None
            limits = job_limit(output_loss_shapes(n, hidden, vocab, chunk), dtypes, device)
            found = gflops_shares(limits["gflop_per_step"] / row["seconds"], limits)
            cells = " | ".join(f"{limits['limit_gflops'][d]:,.0f} | {found[f'share_of_{d}_limit']:.0%}" for d in dtypes)
            print(f"| {vocab:,} | {n:,} | {path} | {limits['gflop_per_step']:,.1f} | {found['achieved_gflops']:,.0f} | "
                  f"{cells} |", flush=True)
            out.append({"path": path, "vocab": vocab, "tokens": n, **limits, **found})
    return {"rows": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[49_152, 262_144])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--chunk_size", type=int, default=None, help="default: 2**24 // vocab (what 'auto' picks)")
    parser.add_argument("--output", default=None, help="also write the results as JSON here")
    parser.add_argument("--no_machine", action="store_true", help="skip the matmul-limit measurement")
    parser.add_argument("--worker", nargs=3, metavar=("PATH", "VOCAB", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        path, vocab, tokens = args.worker[0], int(args.worker[1]), int(args.worker[2])
        print(json.dumps(worker(path, vocab, tokens, args.device, args.dtype, args.repeats, args.chunk_size)))
        return

    rows = []
    for vocab in args.vocab:
        for tokens in args.tokens:
            pair = {}
            for path in ("plain", "chunked"):
                command = [sys.executable, __file__, "--worker", path, str(vocab), str(tokens), "--device",
                           args.device, "--dtype", args.dtype, "--repeats", str(args.repeats)]
                if args.chunk_size:
                    command += ["--chunk_size", str(args.chunk_size)]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode != 0:
                    tail = (done.stderr.strip().splitlines() or ["killed (out of memory?)"])[-1]
                    pair[path] = {"path": path, "vocab": vocab, "tokens": tokens, "error": tail}
                else:
                    pair[path] = json.loads(done.stdout.strip().splitlines()[-1])
                print(f"  {path:7s} vocab {vocab:>7,} tokens {tokens:>5,}: {pair[path]}", file=sys.stderr, flush=True)
            rows.append(pair)

    print(f"\n### Output loss alone: plain vs chunked ({args.device}, {args.dtype})\n")
    print("| vocab | tokens | hidden | chunk | plain peak MB | chunked peak MB | peak ratio | plain s | chunked s "
          "| time ratio | loss rel. diff |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for pair in rows:
        plain, chunked = pair["plain"], pair["chunked"]
        if "error" in plain or "error" in chunked:
            def cell(row, key, form):
                return row.get("error", "") if "error" in row else form.format(row[key])

            print(f"| {plain['vocab']:,} | {plain['tokens']:,} | {chunked.get('hidden', '')} | {chunked.get('chunk', '')} "
                  f"| {cell(plain, 'peak_increase_mb', '{:,.0f}')} | {cell(chunked, 'peak_increase_mb', '{:,.0f}')} | "
                  f"| {cell(plain, 'seconds', '{:.2f}')} | {cell(chunked, 'seconds', '{:.2f}')} | | |")
            continue
        print(
            f"| {plain['vocab']:,} | {plain['tokens']:,} | {plain['hidden']} | {chunked['chunk']} "
            f"| {plain['peak_increase_mb']:,.0f} | {chunked['peak_increase_mb']:,.0f} "
            f"| {chunked['peak_increase_mb'] / plain['peak_increase_mb']:.3f} "
            f"| {plain['seconds']:.2f} | {chunked['seconds']:.2f} | {chunked['seconds'] / plain['seconds']:.2f} "
            f"| {abs(chunked['loss'] - plain['loss']) / abs(plain['loss']):.1e} |"
        )
    info = machine(args.device)
    if not args.no_machine:
        info["limits"] = machine_section(rows, args.device, args.chunk_size)
    settings = {"loss": "0.5 CE + 0.5 T^2 forward KL, T=2", "repeats": args.repeats, "dtype": args.dtype,
                "chunk": args.chunk_size or "2**24 // vocab"}
    shown = {k: v for k, v in info.items() if k != "limits"}  # (the limits: the tables above, and the JSON)
    print(f"\nMachine: {json.dumps(shown)}\nSettings: {json.dumps(settings)}")
    if args.output:
        os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
        with open(args.output, "w") as f:
            json.dump({"machine": info, "settings": settings, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
