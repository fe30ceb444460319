"""The sampler alone: `model.generate` against our decode loop (`sampler="decode"`, packed linear layers on a CPU) on
the on-policy job's shapes: SmolLM2-135M-Instruct's 15-layer cut (the student of docs/performance.md section 6), the
first TREC questions as ChatML user turns, `--max_new_tokens` sampled tokens at temperature 1 (top-k / top-p off).

    python benchmarks/bench_sampler.py --rows 4 --max_new_tokens 64 --rounds 3
    python benchmarks/bench_sampler.py --rows 4 --max_new_tokens 256 --rounds 2

Rounds alternate the two samplers (one warm-up call each first); each call draws with the same seed, and the greedy
answers of both are compared token for token. Prints a markdown table and the machine.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_logits_loss import machine  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--student_layers", type=int, default=15, help="the student: a cut of the asset to this many "
                                                                         "layers (0: the asset's model whole)")
    parser.add_argument("--asset", default="smollm2-135m", help="the model (an asset name, `hf-distill assets`)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="also: where one call of each spends its time (the "
                                                                "operators of torch.profiler, ms per sampled token)")
    opts = parser.parse_args()
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_distill.data.assets import fetch
    from hf_distill.data.sampler import SamplingSettings, sample_completions
    from hf_distill.students import shrink_model

    if opts.threads:
        torch.set_num_threads(opts.threads)
    model_dir = str(fetch(opts.asset))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    transformers.set_seed(0)
    teacher = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    student = (shrink_model(teacher, num_layers=opts.student_layers) if opts.student_layers else teacher).eval()
    del teacher
    with open(fetch("trec"), newline="") as f:
        questions = list(dict.fromkeys(r["text"].strip() for r in csv.DictReader(f)))[: opts.rows]
    prompts = [list(tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=True)["input_ids"]) for q in questions]
    stops = tuple({tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id} - {None})

    def run(sampler: str, temperature: float) -> tuple[float, list[list[int]]]:
        settings = SamplingSettings(1.0, False, opts.max_new_tokens, temperature, 1.0, 0, 1, 0,
                                    tokenizer.pad_token_id or stops[-1], stops, sampler)
        start = time.perf_counter()
        out = sample_completions(student, prompts, settings, seed=7)
        return time.perf_counter() - start, out

    greedy = {name: run(name, 0.0)[1] for name in ("generate", "decode")}  # (also the warm-up)
    seconds: dict[str, list[float]] = {"generate": [], "decode": []}
    tokens: dict[str, list[int]] = {"generate": [], "decode": []}
    for _ in range(opts.rounds):
        for name in ("generate", "decode"):
            took, out = run(name, 1.0)
            seconds[name].append(took)
            tokens[name].append(sum(map(len, out)))
    print(f"{machine('cpu')}; torch {torch.__version__}, {torch.get_num_threads()} threads; {opts.rows} prompts x "
          f"{opts.max_new_tokens} new tokens, {opts.rounds} rounds (median)\n")
    print("| sampler | seconds per call | sampled tokens per call | tokens/s | vs generate |\n|---|---:|---:|---:|---:|")
    base = None
    for name in ("generate", "decode"):
        s = statistics.median(seconds[name])
        rate = statistics.median(t / x for t, x in zip(tokens[name], seconds[name]))
        base = base or rate
        print(f"| {name} | {s:.2f} | {statistics.median(tokens[name]):.0f} | {rate:.1f} | {rate / base:.2f}x |")
    same = sum(a == b for a, b in zip(greedy["generate"], greedy["decode"]))
    print(f"\ngreedy answers equal to generate's token for token: {same}/{len(prompts)}")
    if opts.profile:
        profile(run, opts.max_new_tokens)


def profile(run, steps: int, top: int = 8) -> None:
    """One sampled call of each sampler under torch.profiler: its top operators by own CPU time, in ms per step."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for name in ("generate", "decode"):
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            took, _ = run(name, 1.0)
        events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in events)
        print(f"\n{name}: {took:.2f} s under the profiler, {total / 1e3 / steps:.1f} ms of operator time per step\n")
        print("| operator | ms per step | share | calls per step |\n|---|---:|---:|---:|")
        for e in events[:top]:
            print(f"| {e.key} | {e.self_cpu_time_total / 1e3 / steps:.2f} | {e.self_cpu_time_total / total:.0%} | "
                  f"{e.count / steps:.0f} |")


if __name__ == "__main__":
    main()
