"""Peak memory and time of the cross-tokenizer output term at a 262k teacher vocabulary: chunked vs direct.

One batch of aligned spans (--rows student predicting positions, spans of 1-3 tokens on each side) against a
Gemma-3-sized teacher output layer (--teacher_vocab x --hidden, random) and a SmolLM2-sized student vocabulary:
the forward and backward of `aligned_loss_sum` for ``uld`` and ``hybrid``,

- chunked: the teacher's logits made from its final hidden states a chunk of spans at a time ("auto":
  `auto_chunk_size(V_t)` rows), as `CrossTokenizerTeacher` does;
- direct: the teacher's ``[rows, V_t]`` logits of the whole batch at once (what a plain implementation holds).

Each measurement runs in its own process (peak RSS minus the RSS after setting up its inputs). Machine section (off
with --no_machine): the teacher output layer's GFLOP/s and its share of this machine's fp32 and bf16 matmul limit at
its products.

    python benchmarks/bench_cross_vocab.py [--rows 512 --teacher_vocab 262144 --student_vocab 49152]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_logits_loss import machine  # noqa: E402

from hf_distill.data.alignment import VocabularyMap  # noqa: E402
from hf_distill.kernels.chunked import OutputHead, auto_chunk_size  # noqa: E402
from hf_distill.signals.cross_vocab import AlignedSpans, SpanSide  # noqa: E402
from hf_distill.signals.logits import aligned_loss_sum  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return 0.0


def side(sizes, rows, vocab, generator):
    starts = [0]
    for size in sizes:
        starts.append(starts[-1] + size)
    group = [g for g, size in enumerate(sizes) for _ in range(size)]
    return SpanSide(torch.tensor(rows), torch.randint(0, vocab, (len(rows),), generator=generator),
                    torch.tensor(group), torch.tensor(starts))


def measure(options) -> dict:
    torch.set_num_threads(options.threads)
    g = torch.Generator().manual_seed(0)
    spans = options.rows * 2 // 3
    s_sizes = [1 + (i % 3 == 0) for i in range(spans)][: spans]
    t_sizes = [1 + (i % 4 == 1) for i in range(spans)]
    rows = sum(s_sizes)
    student_logits = torch.randn(1, rows, options.student_vocab, generator=g, requires_grad=True)
    head = OutputHead(torch.randn(options.teacher_vocab, options.hidden, generator=g) * 0.05)
    hidden = torch.randn(sum(t_sizes), options.hidden, generator=g)
    matched = torch.randperm(options.student_vocab, generator=g)[: options.student_vocab // 2]
    vocab = VocabularyMap(torch.randperm(options.teacher_vocab, generator=g)[: len(matched)].sort().values,
                          matched, options.teacher_vocab, options.student_vocab)
    chunk = auto_chunk_size(options.teacher_vocab) if options.mode == "chunked" else 0
    if options.mode == "direct":
        with torch.no_grad():
            all_logits = head.logits(hidden)  # the whole batch's [rows, V_t]
        teacher_logits = lambda r: all_logits[r]  # noqa: E731
    else:
        teacher_logits = lambda r: head.logits(hidden[r])  # noqa: E731
    aligned = AlignedSpans(side(s_sizes, list(range(rows)), options.student_vocab, g),
                           side(t_sizes, list(range(sum(t_sizes))), options.teacher_vocab, g),
                           teacher_logits, vocab, chunk)
    base = rss_mb()
    start = time.perf_counter()
    loss = aligned_loss_sum(student_logits, aligned, options.kind)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": options.mode, "kind": options.kind, "spans": spans, "teacher_rows": sum(t_sizes),
            "chunk_rows": chunk, "loss": float(loss), "seconds": seconds, "peak_over_inputs_mb": peak - base}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--teacher_vocab", type=int, default=262144)
    parser.add_argument("--student_vocab", type=int, default=49152)
    parser.add_argument("--hidden", type=int, default=640)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=None)
    parser.add_argument("--no_machine", action="store_true", help="skip the matmul-limit measurement")
    parser.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--kind", default="hybrid", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.mode:
        print(json.dumps(measure(options)))
        return
    results = []
    for kind in ("uld", "hybrid"):
        for mode in ("direct", "chunked"):
            argv = [sys.executable, __file__, "--mode", mode, "--kind", kind]
            for key in ("rows", "teacher_vocab", "student_vocab", "hidden", "threads"):
                argv += [f"--{key}", str(getattr(options, key))]
            out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
    print(f"\n### Cross-tokenizer output term, one batch: {results[0]['spans']} spans, {results[0]['teacher_rows']} "
          f"teacher rows, V_t = {options.teacher_vocab:,}, V_s = {options.student_vocab:,}\n")
    print("| loss | teacher logits | chunk rows | loss value | forward + backward s | peak memory over inputs MB |")
    print("|---|---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['kind']} | {r['mode']} | {r['chunk_rows'] or 'all'} | {r['loss']:.4f} | {r['seconds']:.2f} | "
              f"{r['peak_over_inputs_mb']:.0f} |")
    info = machine("cpu")
    if not options.no_machine:  # (measured after the rows)
        from machine_limits import DTYPES_BY_DEVICE, gflops_shares, job_limit

        from hf_distill.speed.flops import MatmulShape

        print("\n### Machine: the teacher's output layer (2 x rows x H x V_t FLOPs; the student side is given logits "
              "and all element-wise) against this machine's matmul limit at its products\n")
        dtypes = DTYPES_BY_DEVICE["cpu"]
        print("| loss | teacher logits | GFLOP | GFLOP/s | " + " | ".join(f"{d} limit | share" for d in dtypes) + " |")
        print("|---|---|---:|---:|" + "---:|---:|" * len(dtypes))
        for r in results:
            rows, chunk = r["teacher_rows"], r["chunk_rows"] or r["teacher_rows"]
            full, rest = divmod(rows, chunk)
            shapes = [MatmulShape(chunk, options.hidden, options.teacher_vocab, full, "teacher output")] + (
                [MatmulShape(rest, options.hidden, options.teacher_vocab, 1, "teacher output")] if rest else [])
            limits = job_limit(shapes, dtypes)
            r.update(gflops_shares(limits["gflop_per_step"] / r["seconds"], limits), limit_gflops=limits["limit_gflops"])
            print(f"| {r['kind']} | {r['mode']} | {limits['gflop_per_step']:.1f} | {r['achieved_gflops']:,.0f} | "
                  + " | ".join(f"{limits['limit_gflops'][d]:,.0f} | {r[f'share_of_{d}_limit']:.0%}" for d in dtypes)
                  + " |", flush=True)
    shown = {k: v for k, v in info.items() if k != "limits"}  # (the limits: the tables above, and the JSON)
    print(f"\nMachine: {json.dumps(shown)}\nSettings: {json.dumps(vars(options))}")
    if options.output:
        with open(options.output, "w") as f:
            json.dump({"machine": info, "settings": vars(options), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
