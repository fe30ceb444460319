"""Benchmark 3: distilling from an offline top-k teacher cache vs from the live teacher.

Teacher SmolLM2-135M (packaged asset), student its 15-layer shrink (`shrink_model`, same initialisation for both
runs), NewsArticles packed into blocks of --block_size tokens. Steps, batch, optimizer, seed and data order are the
same for both students; the loss is ``task_weight * CE + logits_weight * T^2 * KL`` over the teacher's full
distribution (live) or its top-k ids plus one tail bucket (cached).

Reported, side by side in one run: training throughput (tokens/s over the steps after --warmup), the cache's bytes
per counted token (the teacher columns alone, and the whole cache folder with the token ids), the one-off cost of
building the cache, and held-out perplexity (exp of the mean next-token CE on the held-out blocks) of both students
after the same steps, with the teacher's beside.

Targets (issue 6): >= 2x throughput, <= 200 bytes/token at k = 32, perplexity within 3% of the live-teacher student.

The ceiling (issue 21): a cache can at best remove the teacher's forward, so the cached run's speed-up is bounded by
``1 + t_teacher / t_student``, with ``t_teacher`` the teacher's forward over a step's batch (timed alone, no grad, its
logits included) and ``t_student = t_live - t_teacher`` (the live step without it). Printed: the ratio and its share of
that ceiling. --recommended runs both students in the recommended setting (docs/performance.md, section 8): what the
command line applies on the machine at hand (`hf_distill.speed.performance.apply_speed_defaults`: where bf16 is fast the teacher, which
builds the cache too, and the output layers in bf16, bf16 backward products, the compiled output kernel and decoder
layers; on a CPU without bf16 units float32 with the compiled kernels), and `keep_freed_memory`. The machine
section: the matmul limit at the live job's shapes (`machine_limits.py`) and each run's share of it.

--student takes a real student instead of the shrink (the same pretrained weights for both runs), for the pair where
the teacher's cost dominates (issue 21):

    HF_DISTILL_ASSETS=... python benchmarks/bench_teacher_cache.py [--steps 40 --batch_size 8 --block_size 128]
    HF_DISTILL_ASSETS=... python benchmarks/bench_teacher_cache.py --teacher asset:qwen-coder-1.5b \
        --student asset:qwen-coder-0.5b --steps 6 --warmup 1 --batch_size 4 --eval_blocks 16
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import sys
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, DataCollatorForLanguageModeling, TrainerCallback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_logits_loss import machine  # noqa: E402
from machine_limits import limits_table, machine_limits, share_cells, shares  # noqa: E402

from hf_distill import DistillationConfig, DistillationTrainer, shrink_model  # noqa: E402
from hf_distill.cli import ModelArguments  # noqa: E402
from hf_distill.cli.models import prepare_inputs, resolve_source  # noqa: E402
from hf_distill.data.loading import DataArguments  # noqa: E402
from hf_distill.data.teacher_cache import build_teacher_cache, cache_size, load_teacher_cache  # noqa: E402


class StepClock(TrainerCallback):
    """Wall time of the optimizer steps after the first `warmup` ones."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end, self.steps = warmup, None, None, 0

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.warmup:
            self.start = time.perf_counter()
        elif state.global_step > self.warmup:
            self.end, self.steps = time.perf_counter(), state.global_step - self.warmup


def perplexity(trainer: DistillationTrainer, dataset) -> float:
    """exp(mean next-token CE over the held-out blocks), from the trainer's exact per-term evaluation."""
    metrics = trainer.evaluate(eval_dataset=dataset)
    return math.exp(metrics["eval_task_loss"])


def teacher_step_seconds(teacher, dataset, collator, options, batches: int = 6) -> float:
    """Median wall time of the teacher's forward (no grad, logits included) over one training batch."""
    times = []
    with torch.no_grad():
        for i in range(batches + 1):
            rows = [dataset[j % len(dataset)] for j in range(i * options.batch_size, (i + 1) * options.batch_size)]
            batch = collator(rows)
            start = time.perf_counter()
            teacher(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
            if i:  # (the first is a warm-up)
                times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="asset:smollm2-135m")
    parser.add_argument("--dataset", default="asset:news-articles")
    parser.add_argument("--student_layers", type=int, default=15)
    parser.add_argument("--student", default=None, help="a student model (asset:NAME, folder or Hub id) instead of "
                        "the teacher's --student_layers cut")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--eval_blocks", type=int, default=64)
    parser.add_argument("--top_k", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--task_weight", type=float, default=0.5)
    parser.add_argument("--logits_weight", type=float, default=0.5)
    parser.add_argument("--learning_rate", type=float, default=3e-4)
    parser.add_argument("--recommended", action="store_true",
                        help="what the command line applies here (apply_speed_defaults), keep_freed_memory")
    parser.add_argument("--no_machine", action="store_true", help="skip the matmul-limit measurement")
    parser.add_argument("--cache_dir", default=None, help="where the cache goes (default: a temporary folder)")
    parser.add_argument("--output", default=None, help="also write the results as JSON here")
    options = parser.parse_args()
    torch.manual_seed(0)

    workdir = tempfile.mkdtemp(prefix="bench_cache_")
    model_args = ModelArguments(teacher=options.teacher, task="causal-lm")
    data_args = DataArguments(dataset=options.dataset, block_size=options.block_size,
                              max_train_samples=options.steps * options.batch_size, max_eval_samples=options.eval_blocks)
    base = DistillationConfig(output_dir=workdir, report_to=[], use_cpu=True, seed=0)
    tokenizer, data = prepare_inputs(model_args, data_args, base)
    train = data.train.select(range(min(len(data.train), options.steps * options.batch_size)))
    held_out = data.eval.select(range(min(len(data.eval), options.eval_blocks)))
    teacher_dtype = None
    if options.recommended:
        from hf_distill.speed.performance import keep_freed_memory, recommended_precision

        keep_freed_memory()
        teacher_dtype = recommended_precision("cpu", None).teacher_dtype
    # the student is cut from the fp32 teacher (loaded only for that); the teacher that teaches (live, cache builder,
    # its own perplexity) in teacher_dtype, loaded in it (no fp32 copy to cast)
    teacher = None if options.student else AutoModelForCausalLM.from_pretrained(
        resolve_source(options.teacher), dtype=torch.float32).eval()
    teaching = teacher if teacher_dtype is None and teacher is not None else AutoModelForCausalLM.from_pretrained(
        resolve_source(options.teacher), dtype=getattr(torch, teacher_dtype or "float32")).eval()
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)

    cache_dir = options.cache_dir or os.path.join(workdir, "cache")
    start = time.perf_counter()
    build_teacher_cache(teaching, train, cache_dir, tokenizer=tokenizer, top_k=options.top_k,
                        temperature=options.temperature, batch_size=options.batch_size, data_collator=collator)
    build_seconds = time.perf_counter() - start
    cached = load_teacher_cache(cache_dir, tokenizer=tokenizer)
    sizes = cache_size(cache_dir, cached)
    counted = sizes["counted_positions"]

    applied: dict[str, list[str]] = {}

    def run(name: str, teacher_model, dataset) -> dict:
        torch.manual_seed(0)
        student = (AutoModelForCausalLM.from_pretrained(resolve_source(options.student), dtype=torch.float32)
                   if options.student else shrink_model(teacher, num_layers=options.student_layers))
        args = DistillationConfig(
            output_dir=os.path.join(workdir, name), report_to=[], use_cpu=True, seed=0, max_steps=options.steps,
            per_device_train_batch_size=options.batch_size, per_device_eval_batch_size=options.batch_size,
            learning_rate=options.learning_rate, lr_scheduler_type="constant", logging_steps=options.steps,
            save_strategy="no", eval_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
            temperature=options.temperature, task_weight=options.task_weight, logits_weight=options.logits_weight,
        )
        if options.recommended:
            from hf_distill.speed.performance import apply_speed_defaults

            applied[name] = apply_speed_defaults(args, "cpu", "causal-lm")
        clock = StepClock(options.warmup)
        trainer = DistillationTrainer(model=student, teacher_model=teacher_model, args=args, train_dataset=dataset,
                                      data_collator=collator, processing_class=tokenizer, callbacks=[clock])
        trainer.train()
        tokens = clock.steps * options.batch_size * options.block_size
        last_log = next(log for log in reversed(trainer.state.log_history) if "logits_loss" in log)
        result = {"tokens_per_second": tokens / (clock.end - clock.start), "final_logits_loss": last_log["logits_loss"],
                  "perplexity": perplexity(trainer, held_out)}
        print(f"  {name}: {result}", file=sys.stderr, flush=True)
        return result

    live = run("live", teaching, train)
    gc.collect()  # (the first student and its optimizer state go before the second is built: 10 GB for a 0.5B)
    from_cache = run("cached", None, cached)
    gc.collect()
    teacher_seconds = teacher_step_seconds(teaching, train, collator, options)
    teacher_trainer = DistillationTrainer(
        model=teaching, args=DistillationConfig(output_dir=os.path.join(workdir, "teacher"), report_to=[],
                                               use_cpu=True, task_weight=1.0, logits_weight=0.0,
                                               per_device_eval_batch_size=options.batch_size),
        data_collator=collator, processing_class=tokenizer)
    teacher_ppl = perplexity(teacher_trainer, held_out)

    results = {
        "live": live, "cached": from_cache, "teacher_perplexity": teacher_ppl,
        "cache": {"build_seconds": build_seconds, "counted_tokens": counted,
                  "teacher_bytes_per_token": sizes["teacher_bytes"] / counted,
                  "folder_bytes_per_token": sizes["bytes_on_disk"] / counted, "top_k": options.top_k},
    }
    speed = from_cache["tokens_per_second"] / live["tokens_per_second"]
    live_step = options.batch_size * options.block_size / live["tokens_per_second"]
    ceiling = 1 + teacher_seconds / max(live_step - teacher_seconds, 1e-9)
    results["ceiling"] = {"teacher_forward_seconds_per_step": teacher_seconds, "live_seconds_per_step": live_step,
                          "ceiling": ceiling, "share_of_ceiling": speed / ceiling}
    results["settings_precision"] = (f"apply_speed_defaults, teacher {teacher_dtype or 'float32'}"
                                     if options.recommended else "fp32")
    results["speed_defaults"] = applied
    gap = from_cache["perplexity"] / live["perplexity"] - 1
    pair = f"{options.teacher} -> " + (options.student or f"its {options.student_layers}-layer cut")
    print(f"\n### Cached vs live teacher ({pair}, {options.batch_size} x {options.block_size} tokens a step)\n")
    print("| teacher | tokens/s | ratio | held-out perplexity | vs live |")
    print("|---|---:|---:|---:|---:|")
    print(f"| live | {live['tokens_per_second']:.0f} | 1.00 | {live['perplexity']:.2f} | |")
    print(f"| cached (top-{options.top_k} + tail) | {from_cache['tokens_per_second']:.0f} | {speed:.2f} "
          f"| {from_cache['perplexity']:.2f} | {gap:+.1%} |")
    print(f"| (the teacher itself) | | | {teacher_ppl:.2f} | |")
    print(f"\nCeiling 1 + t_teacher / t_student: teacher forward {teacher_seconds:.2f} s of a {live_step:.2f} s live "
          f"step -> {ceiling:.2f}x; the cache reaches {speed:.2f}x = {speed / ceiling:.0%} of it "
          f"({results['settings_precision']}).")
    cache = results["cache"]
    print(f"\nCache: {cache['counted_tokens']:,} counted tokens, {cache['teacher_bytes_per_token']:.1f} bytes/token for "
          f"the teacher's targets, {cache['folder_bytes_per_token']:.1f} bytes/token for the whole folder (with the "
          f"token ids), built in {build_seconds:.0f} s (one teacher pass).")
    settings = {k: v for k, v in vars(options).items() if k not in ("output", "cache_dir")}
    info = machine("cpu")
    if not options.no_machine:
        from hf_distill.kernels.chunked import auto_chunk_size

        student_spec = str(resolve_source(options.student)) if options.student else options.student_layers
        limits = machine_limits(resolve_source(options.teacher), student_spec, options.batch_size,
                                options.block_size, auto_chunk_size(teaching.config.vocab_size))
        info["limits"] = limits
        student_share = 3 * limits["flops_per_token"]["student_forward"] / limits["flops_per_token"]["total"]
        for name, row in (("live", live), ("cached", from_cache)):
            factor = 1.0 if name == "live" else student_share  # the cached step runs no teacher
            row.update({k: v * factor for k, v in shares(row["tokens_per_second"], limits).items()})
            print(f"{name}: {share_cells(row)}")
        print(f"\n### Machine: the matmul limit at the live job's shapes\n\n{limits_table(limits)}")
    shown = {k: v for k, v in info.items() if k != "limits"}  # (the limits: the tables above, and the JSON)
    print(f"\nMachine: {json.dumps(shown)}\nSettings: {json.dumps(settings)}")
    if options.output:
        os.makedirs(os.path.dirname(options.output) or ".", exist_ok=True)
        with open(options.output, "w") as f:
            json.dump({"machine": info, "settings": settings, "results": results}, f, indent=1)
    if options.cache_dir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
