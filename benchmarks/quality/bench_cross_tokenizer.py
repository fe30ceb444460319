"""Quality benchmark 7: cross-tokenizer distillation (a teacher with another vocabulary).

Teacher Gemma-3-270M (packaged asset, SentencePiece-style BPE, 262,144 tokens), student a `shrink_model` cut of
SmolLM2-135M (byte-level BPE, 49,152 tokens; --student_layers of its 30), NewsArticles in --block_size-token student
blocks. First both full models' held-out bits per byte (tokenizer-neutral), then, per seed, three students with the
same initialisation, data and steps (AdamW, constant learning rate; the seed orders the data):

- ce_only: CE on the next tokens (no teacher);
- uld: ``CE + logits_weight * ULD`` (sorted-probability distance per aligned span, Boizard et al. 2024);
- hybrid: ``CE + logits_weight * hybrid`` (GOLD-style: JSD on the tokens both vocabularies spell alike, ULD on the
  rest, span probabilities by the chain rule).

Each run is its own process (its peak RSS is its own). Reported: held-out student perplexity and bits per byte
(test blocks), training tokens/s (student tokens) and peak RSS. Target (issue 20): hybrid perplexity at least 5%
below CE only.

    python benchmarks/quality/bench_cross_tokenizer.py [--steps 50 --seeds 0 1 2] [--output X.json]
        [--quality_json docs/results/quality.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, mean_std, merge_quality, write_json  # noqa: E402

from hf_distill import DistillationConfig, DistillationTrainer, shrink_model  # noqa: E402
from hf_distill.cli import ModelArguments  # noqa: E402
from hf_distill.cli.models import prepare_inputs, resolve_source  # noqa: E402
from hf_distill.data.loading import DataArguments  # noqa: E402

ARMS = {"ce_only": {"task_weight": 1.0, "logits_weight": 0.0},
        "uld": {"task_weight": 1.0, "logits_loss": "uld"},
        "hybrid": {"task_weight": 1.0, "logits_loss": "hybrid"}}


def data(options):
    model_args = ModelArguments(teacher=options.student, task="causal-lm")
    data_args = DataArguments(dataset=options.dataset, block_size=options.block_size,
                              max_train_samples=options.steps * options.batch_size,
                              max_eval_samples=options.eval_offset + options.test_blocks)
    tokenizer, prepared = prepare_inputs(model_args, data_args, DistillationConfig(output_dir="unused", seed=0))
    start = options.eval_offset  # dev blocks for choosing settings: --eval_offset past the test blocks
    test = prepared.eval.select(range(start, min(len(prepared.eval), start + options.test_blocks)))
    return tokenizer, prepared.train, test


def predicted_bytes(tokenizer, rows) -> int:
    """UTF-8 bytes of the text each block's predicted tokens (all but its first) spell."""
    total = 0
    for ids in rows["input_ids"]:
        total += len(tokenizer.decode(ids).encode()) - len(tokenizer.decode(ids[:1]).encode())
    return total


def student_scores(model, tokenizer, test, options) -> dict:
    """Held-out perplexity (exp mean next-token CE) and bits per byte of a student on the test blocks."""
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    trainer = DistillationTrainer(model=model, args=DistillationConfig(
        output_dir=tempfile.mkdtemp(prefix="eval_"), report_to=[], use_cpu=True, task_weight=1.0, logits_weight=0.0,
        per_device_eval_batch_size=options.batch_size), data_collator=collator, processing_class=tokenizer)
    ce = trainer.evaluate(eval_dataset=test)["eval_task_loss"]
    tokens = sum(len(ids) - 1 for ids in test["input_ids"])
    return {"perplexity": math.exp(ce), "bits_per_byte": ce * tokens / math.log(2) / predicted_bytes(tokenizer, test)}


def teacher_bits_per_byte(teacher, teacher_tokenizer, tokenizer, test) -> float:
    """The teacher on the same text (its own tokens, from its BOS): total bits over all bytes."""
    nats, size = 0.0, 0
    for ids in test["input_ids"]:
        text = tokenizer.decode(ids)
        encoded = torch.tensor([teacher_tokenizer(text)["input_ids"]])
        with torch.no_grad():
            log_p = torch.log_softmax(teacher(encoded).logits[0].float(), dim=-1)
        nats -= float(log_p[:-1].gather(-1, encoded[0, 1:, None]).sum())
        size += len(text.encode())
    return nats / math.log(2) / size


def run_one(options) -> None:
    """One student (--run ARM --seed S): train, score, write its JSON line to --result."""
    torch.set_num_threads(options.threads)
    tokenizer, train, test = data(options)
    full = AutoModelForCausalLM.from_pretrained(resolve_source(options.student), dtype=torch.float32)
    student = shrink_model(full, num_layers=options.student_layers)
    del full
    arm = dict(ARMS[options.run])
    teacher, teacher_tokenizer = None, None
    if arm.get("logits_weight", options.logits_weight) > 0:
        teacher = AutoModelForCausalLM.from_pretrained(resolve_source(options.teacher), dtype=torch.float32).eval()
        teacher_tokenizer = AutoTokenizer.from_pretrained(resolve_source(options.teacher))
        arm.setdefault("logits_weight", options.logits_weight)
        arm.update(jsd_beta=options.jsd_beta, hybrid_matched_weight=options.hybrid_matched_weight)
    args = DistillationConfig(
        output_dir=tempfile.mkdtemp(prefix=f"cross_{options.run}_"), report_to=[], use_cpu=True, seed=options.seed,
        max_steps=options.steps, per_device_train_batch_size=options.batch_size, learning_rate=options.learning_rate,
        lr_scheduler_type="constant", logging_steps=10, save_strategy="no", eval_strategy="no", disable_tqdm=True,
        temperature=1.0, **arm)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=train,
                                  data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
                                  processing_class=tokenizer, teacher_processing_class=teacher_tokenizer)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    scores = student_scores(trainer.model, tokenizer, test, options)
    logs = [log for log in trainer.state.log_history if "loss" in log]
    result = {"arm": options.run, "seed": options.seed, **scores, "train_seconds": seconds,
              "tokens_per_second": options.steps * options.batch_size * options.block_size / seconds,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "log": logs}
    with open(options.result, "w") as f:
        json.dump(result, f)
    print(f"  {options.run} seed {options.seed}: perplexity {scores['perplexity']:.2f}, bpb "
          f"{scores['bits_per_byte']:.4f}, {seconds:.0f} s", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="asset:gemma3-270m")
    parser.add_argument("--student", default="asset:smollm2-135m")
    parser.add_argument("--dataset", default="asset:news-articles")
    parser.add_argument("--student_layers", type=int, default=15)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--test_blocks", type=int, default=128)
    parser.add_argument("--logits_weight", type=float, default=1.0)
    parser.add_argument("--learning_rate", type=float, default=3e-4)
    parser.add_argument("--jsd_beta", type=float, default=0.5, help="hybrid: the matched tokens' JSD beta")
    parser.add_argument("--hybrid_matched_weight", type=float, default=None,
                        help="hybrid: the matched tokens' weight (default: matched / V_t, as GOLD)")
    parser.add_argument("--eval_offset", type=int, default=0, help="score blocks from here (dev: past the test)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=None)
    parser.add_argument("--quality_json", default=None)
    parser.add_argument("--run", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.run:
        return run_one(options)
    started = time.perf_counter()
    torch.set_num_threads(options.threads)
    tokenizer, _, test = data(options)
    full = AutoModelForCausalLM.from_pretrained(resolve_source(options.student), dtype=torch.float32).eval()
    teacher = AutoModelForCausalLM.from_pretrained(resolve_source(options.teacher), dtype=torch.float32).eval()
    teacher_tokenizer = AutoTokenizer.from_pretrained(resolve_source(options.teacher))
    reference = {"teacher_bits_per_byte": teacher_bits_per_byte(teacher, teacher_tokenizer, tokenizer, test),
                 **{f"full_student_{k}": v for k, v in student_scores(full, tokenizer, test, options).items()}}
    del full, teacher
    print(f"  teacher bpb {reference['teacher_bits_per_byte']:.4f}; full SmolLM2-135M bpb "
          f"{reference['full_student_bits_per_byte']:.4f} (perplexity {reference['full_student_perplexity']:.2f})",
          file=sys.stderr, flush=True)
    workdir = tempfile.mkdtemp(prefix="bench_cross_")
    runs = []
    for seed in options.seeds:
        for arm in options.arms:
            path = os.path.join(workdir, f"{arm}_{seed}.json")
            argv = []
            for key in ("teacher", "student", "dataset", "student_layers", "steps", "batch_size", "block_size",
                        "test_blocks", "logits_weight", "learning_rate", "threads", "jsd_beta", "eval_offset"):
                argv += [f"--{key}", str(getattr(options, key))]
            if options.hybrid_matched_weight is not None:
                argv += ["--hybrid_matched_weight", str(options.hybrid_matched_weight)]
            subprocess.run([sys.executable, __file__, *argv, "--run", arm, "--seed", str(seed), "--result", path],
                           check=True)
            with open(path) as f:
                runs.append(json.load(f))
    table = {}
    for arm in options.arms:
        mine = [r for r in runs if r["arm"] == arm]
        table[arm] = {key: mean_std([r[key] for r in mine]) for key in
                      ("perplexity", "bits_per_byte", "tokens_per_second", "peak_rss_mb")}
    ratio = table["hybrid"]["perplexity"][0] / table["ce_only"]["perplexity"][0]
    total = time.perf_counter() - started
    print(f"\n### Cross-tokenizer: Gemma-3-270M -> {options.student_layers}-layer SmolLM2-135M cut, {options.steps} "
          f"steps of {options.batch_size} x {options.block_size} student tokens, seeds {options.seeds}\n")
    print("| student | test perplexity | bits per byte | vs CE only | tokens/s | peak RSS MB |")
    print("|---|---:|---:|---:|---:|---:|")
    for arm, row in table.items():
        (ppl, ppl_sd), (bpb, bpb_sd) = row["perplexity"], row["bits_per_byte"]
        print(f"| {arm} | {ppl:.2f} +- {ppl_sd:.2f} | {bpb:.4f} +- {bpb_sd:.4f} | "
              f"{ppl / table['ce_only']['perplexity'][0]:.3f}x | {row['tokens_per_second'][0]:.0f} | "
              f"{row['peak_rss_mb'][0]:.0f} |")
    print(f"| (teacher, full model) | | {reference['teacher_bits_per_byte']:.4f} | | | |")
    print(f"| (full SmolLM2-135M) | {reference['full_student_perplexity']:.2f} | "
          f"{reference['full_student_bits_per_byte']:.4f} | | | |")
    print(f"\nhybrid perplexity {ratio:.3f}x CE only (target <= 0.95x: {'met' if ratio <= 0.95 else 'missed'}). "
          f"Total {total / 60:.1f} min.")
    settings = {k: v for k, v in vars(options).items() if k not in ("output", "quality_json", "run", "seed", "result")}
    info = machine("cpu")
    print(f"\nMachine: {info}\nSettings: {settings}")
    summary = {"machine": info, "settings": settings, "reference": reference, "table": table, "runs": runs,
               "hybrid_vs_ce_perplexity": ratio, "total_seconds": total}
    write_json(options.output, summary)
    if options.quality_json:
        merge_quality("cross_tokenizer", "gemma3-270m_to_smollm2-cut_news-articles", {
            "teacher_bits_per_byte": reference["teacher_bits_per_byte"],
            "full_student_bits_per_byte": reference["full_student_bits_per_byte"],
            **{f"{arm}_perplexity": row["perplexity"][0] for arm, row in table.items()},
            **{f"{arm}_bits_per_byte": row["bits_per_byte"][0] for arm, row in table.items()},
            "hybrid_vs_ce_perplexity": ratio, "steps": options.steps, "seeds": options.seeds,
            "student_layers": options.student_layers}, options.quality_json)
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
