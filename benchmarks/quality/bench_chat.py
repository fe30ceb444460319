"""Quality benchmark 5: sequence-level KD on chat data (Kim & Rush 2016): the teacher answers real users' questions,
the student learns its answers.

Teacher SmolLM2-135M-Instruct (the `smollm2-135m` asset, ChatML template), prompts the TREC questions as user turns
(shuffled once with seed 0, split into train / test prompts). The teacher answers every prompt greedily
(`generate_completions`, batched, left padding); the train answers twice, once plain and once with the top-k cache
written in the same pass (the answers are checked to be the same ids). Students: the teacher's `shrink_model` cut
(the same initialisation every run), trained at equal optimizer steps on the train prompts' answers, completion tokens
only, 3 seeds (data order):

- a_seq_kd: CE on the teacher's answers (sequence-level KD);
- b_seq_kd_live_kl: ``task_weight * CE + logits_weight * KL(p_t || p_s)`` to the live teacher on the same sequences;
- c_seq_kd_cached_kl: the same weights, the KL from the top-k cache of the generation pass (no teacher in training).

Reported on the test prompts' teacher answers (teacher-forced, completion tokens): KL(p_t || p_s) at T = 1 over the
full vocabulary, top-1 agreement with the teacher, and the CE of the teacher's tokens; wall times of generation,
generation with caching, and training.

    HF_DISTILL_ASSETS=... python benchmarks/quality/bench_chat.py --output docs/results/quality_chat.json \
        --quality_json docs/results/quality.json
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
import tempfile
import time

import datasets
import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import fmt, machine, mean_std, merge_quality, write_json  # noqa: E402

from hf_distill import DistillationConfig, DistillationTrainer, shrink_model  # noqa: E402
from hf_distill.data.assets import fetch  # noqa: E402
from hf_distill.data.chat import prepare_chat_dataset  # noqa: E402
from hf_distill.data.generate import GenerationArguments, generate_completions, load_generations  # noqa: E402


def prompts(count: int, skip: int = 0, seed: int = 0) -> list[list[dict[str, str]]]:
    """`count` TREC questions (de-duplicated, shuffled with `seed`, from position `skip`) as single user turns."""
    with open(fetch("trec"), newline="") as f:
        questions = list(dict.fromkeys(r["text"].strip() for r in csv.DictReader(f)))
    order = np.random.default_rng(seed).permutation(len(questions))[skip: skip + count]
    return [[{"role": "user", "content": questions[i]}] for i in order]


def answer(teacher, tokenizer, rows, folder: str, options, top_k: int = 0) -> tuple[datasets.Dataset, float]:
    settings = GenerationArguments(output_dir=folder, max_new_tokens=options.max_new_tokens, temperature=0.0,
                                   batch_size=options.generation_batch_size, shard_size=256, cache_top_k=top_k,
                                   cache_temperature=options.temperature)
    start = time.perf_counter()
    generate_completions(teacher, tokenizer, datasets.Dataset.from_dict({"prompt": rows}), folder, settings,
                         "smollm2-135m-instruct")
    return load_generations(folder), time.perf_counter() - start


def evaluate(student, teacher, tokenizer, test, collator, workdir: str, temperature: float) -> dict[str, float]:
    """Teacher-forced on the test answers: KL(p_t || p_s), top-1 agreement, CE of the teacher's tokens."""
    args = DistillationConfig(output_dir=os.path.join(workdir, "eval"), report_to=[], use_cpu=True,
                              per_device_eval_batch_size=8, task_weight=1.0, logits_weight=1.0,
                              temperature=temperature, disable_tqdm=True)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, eval_dataset=test,
                                  data_collator=collator, processing_class=tokenizer)
    metrics = trainer.evaluate()
    return {"kl": metrics["eval_logits_loss"] / temperature ** 2, "agreement": metrics["eval_teacher_agreement"],
            "ce": metrics["eval_task_loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train_prompts", type=int, default=480)
    parser.add_argument("--test_prompts", type=int, default=96)
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument("--generation_batch_size", type=int, default=16)
    parser.add_argument("--student_layers", type=int, default=10)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--learning_rate", type=float, default=3e-4)
    parser.add_argument("--top_k", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--task_weight", type=float, default=0.5)
    parser.add_argument("--logits_weight", type=float, default=0.5)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--output", default=None)
    parser.add_argument("--quality_json", default=None)
    options = parser.parse_args()
    started = time.perf_counter()
    workdir = tempfile.mkdtemp(prefix="bench_chat_")
    source = str(fetch("smollm2-135m"))
    tokenizer = AutoTokenizer.from_pretrained(source)
    teacher = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    test_rows, train_rows = prompts(options.test_prompts), prompts(options.train_prompts, skip=options.test_prompts)

    plain, t_generate = answer(teacher, tokenizer, train_rows, os.path.join(workdir, "gen"), options)
    cached, t_generate_cache = answer(teacher, tokenizer, train_rows, os.path.join(workdir, "gen_cache"), options,
                                      top_k=options.top_k)
    same = plain["completion_ids"] == cached["completion_ids"]
    test, t_test = answer(teacher, tokenizer, test_rows, os.path.join(workdir, "gen_test"), options)
    tokens = sum(len(c) for c in plain["completion_ids"])
    print(f"teacher answers: {len(plain)} train prompts, {tokens} tokens, {t_generate:.0f} s plain, "
          f"{t_generate_cache:.0f} s with the top-{options.top_k} cache; same answers: {same}", file=sys.stderr,
          flush=True)

    plain_rows, collator = prepare_chat_dataset(plain, tokenizer, options.max_length)
    cache_rows, _ = prepare_chat_dataset(cached, tokenizer, options.max_length)
    test_rows_tok, _ = prepare_chat_dataset(test, tokenizer, options.max_length)
    configs = {
        "a_seq_kd": ({"task_weight": 1.0, "logits_weight": 0.0}, plain_rows, None),
        "b_seq_kd_live_kl": ({"task_weight": options.task_weight, "logits_weight": options.logits_weight},
                             plain_rows, teacher),
        "c_seq_kd_cached_kl": ({"task_weight": options.task_weight, "logits_weight": options.logits_weight},
                               cache_rows, None),
    }
    torch.manual_seed(0)
    initial = shrink_model(teacher, num_layers=options.student_layers)
    baseline = evaluate(initial, teacher, tokenizer, test_rows_tok, collator, workdir, options.temperature)
    print(f"untrained student: {baseline}", file=sys.stderr, flush=True)
    runs: dict[str, list[dict]] = {}
    for name, (weights, rows, live) in configs.items():
        runs[name] = []
        for seed in range(options.seeds):
            torch.manual_seed(0)
            student = shrink_model(teacher, num_layers=options.student_layers)
            args = DistillationConfig(
                output_dir=os.path.join(workdir, name), report_to=[], use_cpu=True, seed=seed, max_steps=options.steps,
                per_device_train_batch_size=options.batch_size, learning_rate=options.learning_rate,
                lr_scheduler_type="constant", logging_steps=10, save_strategy="no", disable_tqdm=True,
                temperature=options.temperature, **weights)
            start = time.perf_counter()
            trainer = DistillationTrainer(model=student, teacher_model=live, args=args, train_dataset=rows,
                                          data_collator=collator, processing_class=tokenizer)
            trainer.train()
            seconds = time.perf_counter() - start
            result = {"seed": seed, "train_seconds": seconds,
                      **evaluate(student, teacher, tokenizer, test_rows_tok, collator, workdir, options.temperature)}
            runs[name].append(result)
            print(f"{name} seed {seed}: {result}", file=sys.stderr, flush=True)
    total = time.perf_counter() - started

    layers = options.student_layers
    lines = [f"\n### Chat: SmolLM2-135M-Instruct (30 layers) -> {layers}-layer student, {options.steps} steps of "
             f"{options.batch_size} conversations, {len(plain)} train / {len(test)} test prompts\n",
             "| student | test KL(p_t ‖ p_s) per token | test top-1 agreement % | test CE of the teacher's tokens | "
             "train time s |", "|---|---:|---:|---:|---:|",
             f"| untrained cut | {baseline['kl']:.4f} | {baseline['agreement'] * 100:.2f} | {baseline['ce']:.4f} | - |"]
    for name, results in runs.items():
        lines.append(f"| {name} | {fmt([r['kl'] for r in results], 1, 4)} | {fmt([r['agreement'] for r in results])} | "
                     f"{fmt([r['ce'] for r in results], 1, 4)} | "
                     f"{mean_std([r['train_seconds'] for r in results])[0]:.0f} |")
    lines.append(f"\nGeneration (greedy, batch {options.generation_batch_size}, at most {options.max_new_tokens} new "
                 f"tokens): train answers {t_generate:.0f} s plain ({tokens / t_generate:.1f} tokens/s), "
                 f"{t_generate_cache:.0f} s with the top-{options.top_k} cache in the same pass "
                 f"(caching costs {t_generate_cache - t_generate:+.0f} s); test answers {t_test:.0f} s. Same answers "
                 f"with and without the cache: {same}. Total {total / 60:.1f} min.")
    print("\n".join(lines))
    info = machine("cpu")
    print(f"\nMachine: {info}")
    if options.quality_json:
        means = {n: {k: mean_std([r[k] for r in rs])[0] for k in ("kl", "agreement", "ce")} for n, rs in runs.items()}
        merge_quality("chat", f"smollm2-135m-instruct_trec_{layers}_layers", {
            "untrained": baseline, "students": means, "steps": options.steps, "seeds": options.seeds,
            "generation_seconds": t_generate, "generation_with_cache_seconds": t_generate_cache}, options.quality_json)
    write_json(options.output, {"machine": info, "settings": vars(options), "baseline": baseline, "runs": runs,
                                "generation": {"train_tokens": tokens, "seconds": t_generate,
                                               "seconds_with_cache": t_generate_cache, "test_seconds": t_test,
                                               "same_answers": same}, "total_seconds": total})
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
