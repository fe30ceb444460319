"""Throughput of `hf-distill generate` (`generate_completions`) against plain `model.generate` in a loop, side by side.

The same prompts (TREC questions as user turns, SmolLM2-135M-Instruct's chat template), greedy decoding, at most
--max_new_tokens new tokens per answer; tokens = the answers' tokens up to and including the end-of-turn token (what
is written). Rows, each after one warm-up call, in this order:

- plain loop: ``model.generate`` on one prompt at a time (batch 1), the usual script;
- ours, batch 1 and batch --batch_size: shards, manifest and stored ids included;
- ours with the top-k cache written in the same pass (--top_k), at batch --batch_size.

Machine section (off with --no_machine): each row's GFLOP/s and its share of the matmul limit at one decoding step's
products at that row's batch (a batch-1 step is matrix-vector products, bound by memory, not by the matmul units).

    HF_DISTILL_ASSETS=... python benchmarks/bench_generate.py [--prompts 32 --max_new_tokens 32 --batch_size 16]
        [--output docs/results/bench_generate.json]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import datasets
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks", "quality"))
from bench_chat import prompts  # noqa: E402
from bench_logits_loss import machine  # noqa: E402
from common import write_json  # noqa: E402

from hf_distill.data.assets import fetch  # noqa: E402
from hf_distill.data.chat import end_of_turn_id  # noqa: E402
from hf_distill.data.generate import GenerationArguments, generate_completions, load_generations  # noqa: E402


@torch.no_grad()
def plain_loop(model, tokenizer, rows, max_new_tokens: int) -> int:
    """One ``model.generate`` per prompt; returns the answer tokens (up to and including the stop token)."""
    stop = end_of_turn_id(tokenizer)
    tokens = 0
    for turns in rows:
        ids = tokenizer.apply_chat_template(turns, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop,
                             pad_token_id=tokenizer.pad_token_id)
        answer = out[0, ids["input_ids"].shape[1]:].tolist()
        tokens += next((i + 1 for i, t in enumerate(answer) if t == stop), len(answer))
    return tokens


def ours(model, tokenizer, rows, max_new_tokens: int, batch_size: int, top_k: int, folder: str) -> int:
    settings = GenerationArguments(output_dir=folder, max_new_tokens=max_new_tokens, temperature=0.0,
                                   batch_size=batch_size, shard_size=len(rows), cache_top_k=top_k)
    generate_completions(model, tokenizer, datasets.Dataset.from_dict({"prompt": rows}), folder, settings, "teacher")
    tokens = sum(len(c) for c in load_generations(folder)["completion_ids"])
    shutil.rmtree(folder)
    return tokens


def machine_section(model, results: dict, batch_size: int) -> dict:
    """Each row's GFLOP/s (answer tokens/s x the forward FLOPs of one token, `hf_distill.speed.flops.forward_flops_per_token`
    without attention; prompts' prefill not counted, so this is a lower bound) and its share of the matmul limit at one
    decoding step's products at the row's batch (`machine_limits.decode_shapes`: ``[batch, in] @ [in, out]``)."""
    from machine_limits import DTYPES_BY_DEVICE, decode_shapes, gflops_shares, job_limit

    from hf_distill.speed.flops import forward_flops_per_token

    flops = forward_flops_per_token(model, 1)
    per_token = flops.layers + flops.output
    dtypes = DTYPES_BY_DEVICE["cpu"]
    print(f"\n### Machine: {per_token / 1e6:,.0f} MFLOP per answer token (every linear layer, the output layer "
          "included); the limit at one decoding step's products\n")
    print("| run | GFLOP/s | " + " | ".join(f"{d} limit | share" for d in dtypes) + " |")
    print("|---|---:|" + "---:|---:|" * len(dtypes))
    out, by_batch = {"mflop_per_token": per_token / 1e6, "rows": {}}, {}
    for name, r in results.items():
        batch = batch_size if f"batch {batch_size}" in name else 1
        if batch not in by_batch:  # (measured once per batch size)
            by_batch[batch] = job_limit(decode_shapes(model, batch), dtypes)
        limits = by_batch[batch]
        found = gflops_shares(r["tokens_per_s"] * per_token / 1e9, limits)
        print(f"| {name} | {found['achieved_gflops']:,.1f} | "
              + " | ".join(f"{limits['limit_gflops'][d]:,.0f} | {found[f'share_of_{d}_limit']:.0%}" for d in dtypes)
              + " |", flush=True)
        out["rows"][name] = {"batch": batch, "limit_gflops": limits["limit_gflops"], **found}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--top_k", type=int, default=32)
    parser.add_argument("--output", default=None)
    parser.add_argument("--no_machine", action="store_true", help="skip the matmul-limit measurement")
    options = parser.parse_args()
    source = str(fetch("smollm2-135m"))
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    rows = prompts(options.prompts, skip=5000)  # questions outside the chat benchmark's splits
    workdir = tempfile.mkdtemp(prefix="bench_generate_")
    runs = {
        "plain model.generate loop, batch 1": lambda: plain_loop(model, tokenizer, rows, options.max_new_tokens),
        "hf-distill generate, batch 1": lambda: ours(model, tokenizer, rows, options.max_new_tokens, 1, 0,
                                                     os.path.join(workdir, "b1")),
        f"hf-distill generate, batch {options.batch_size}": lambda: ours(
            model, tokenizer, rows, options.max_new_tokens, options.batch_size, 0, os.path.join(workdir, "bn")),
        f"hf-distill generate, batch {options.batch_size}, top-{options.top_k} cache": lambda: ours(
            model, tokenizer, rows, options.max_new_tokens, options.batch_size, options.top_k,
            os.path.join(workdir, "bc")),
    }
    plain_loop(model, tokenizer, rows[:2], 4)  # warm-up
    results = {}
    for name, run in runs.items():
        start = time.perf_counter()
        tokens = run()
        seconds = time.perf_counter() - start
        results[name] = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}
        print(f"{name}: {tokens} tokens in {seconds:.1f} s", file=sys.stderr, flush=True)
    base = next(iter(results.values()))["tokens_per_s"]
    lines = [f"\n{options.prompts} prompts, greedy, at most {options.max_new_tokens} new tokens, SmolLM2-135M-Instruct "
             "fp32 on CPU\n", "| run | answer tokens | seconds | tokens/s | vs plain loop |", "|---|---:|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['tokens']} | {r['seconds']:.1f} | {r['tokens_per_s']:.1f} | "
                     f"{r['tokens_per_s'] / base:.2f}x |")
    print("\n".join(lines))
    info = machine("cpu")
    if not options.no_machine:
        info["limits"] = machine_section(model, results, options.batch_size)
    print(f"\nMachine: { {k: v for k, v in info.items() if k != 'limits'} }")  # (the limits: above, and the JSON)
    write_json(options.output, {"machine": info, "settings": vars(options), "results": results})
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
