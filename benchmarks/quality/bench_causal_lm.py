"""Quality benchmark 3: does a causal-LM student learn more from the teacher than from the text alone?

Teacher SmolLM2-135M (packaged asset, 30 layers), students its 15-layer `shrink_model` cut (teacher layers 0, 2, ...,
28, the same initialisation for every run), NewsArticles packed into --block_size-token blocks. Every student takes the
same --steps optimizer steps on the same batches in the same order (AdamW, constant learning rate, seed 0):

- ce_only: ``CE`` on the next tokens (no teacher);
- kl: ``task_weight * CE + logits_weight * T^2 * KL(p_t || p_s)`` over the teacher's full distribution;
- kl_hidden: kl + ``hidden_weight * (1 - cos)`` between each student layer and the teacher layer it was cut from.

The held-out blocks are split in two: dev (chooses the best distilled configuration) and test (reports it). Perplexity
is exp of the mean next-token CE over the blocks, computed by the trainer's exact per-term evaluation; the teacher's
is beside. Target (issue 8): distilled perplexity <= 0.9x the CE-only student's at equal steps.

    HF_DISTILL_ASSETS=... python benchmarks/quality/bench_causal_lm.py [--steps 40 --batch_size 8 --block_size 128]
        [--output X.json --plot X.png --quality_json docs/results/quality.json]
    python benchmarks/quality/bench_causal_lm.py --replot X.json [--plot X.png]   # redraw the plot only
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, DataCollatorForLanguageModeling

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, merge_quality, perplexity, teacher_perplexity, write_json  # noqa: E402

from hf_distill import DistillationConfig, DistillationTrainer, shrink_model  # noqa: E402
from hf_distill.cli import ModelArguments  # noqa: E402
from hf_distill.cli.models import prepare_inputs, resolve_source  # noqa: E402
from hf_distill.data.loading import DataArguments  # noqa: E402


def plot(result: dict, path: str) -> None:
    """Two panels: each student's training CE over the steps (the logged task term), and test perplexities."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, bars) = plt.subplots(1, 2, figsize=(11, 4))
    for name, run in result["results"].items():
        logs = [log for log in run["log"] if "task_loss" in log]
        curves.plot([log["step"] for log in logs], [log["task_loss"] for log in logs], marker="o", label=name)
    curves.set_xlabel("optimizer step")
    curves.set_ylabel("training next-token CE")
    curves.set_title("students' CE on their training batches")
    curves.legend()
    names = list(result["results"])
    bars.bar(range(len(names)), [result["results"][n]["test_perplexity"] for n in names],
             color=["grey"] + ["tab:blue"] * (len(names) - 1))
    bars.axhline(result["teacher_perplexity"]["test"], color="tab:red", linestyle="--", label="teacher (30 layers)")
    bars.set_xticks(range(len(names)), names)
    bars.set_ylabel("test perplexity")
    bars.set_title(f"{result['settings']['student_layers']}-layer students after {result['settings']['steps']} steps")
    bars.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="asset:smollm2-135m")
    parser.add_argument("--dataset", default="asset:news-articles")
    parser.add_argument("--student_layers", type=int, default=15)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--dev_blocks", type=int, default=32)
    parser.add_argument("--test_blocks", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--task_weight", type=float, default=0.5, help="CE weight of the distilled runs")
    parser.add_argument("--logits_weight", type=float, default=0.5)
    parser.add_argument("--hidden_weight", type=float, default=1.0)
    parser.add_argument("--learning_rate", type=float, default=3e-4)
    parser.add_argument("--output", default=None, help="also write the results as JSON here")
    parser.add_argument("--quality_json", default=None, help="merge the headline numbers into this quality.json")
    parser.add_argument("--plot", default=None, help="also draw the training curves and perplexities into this PNG")
    parser.add_argument("--replot", default=None, metavar="JSON",
                        help="only redraw --plot from the JSON an earlier run wrote with --output; trains nothing")
    options = parser.parse_args()
    if options.replot:
        import json

        with open(options.replot) as f:
            plot(json.load(f), options.plot or os.path.splitext(options.replot)[0] + ".png")
        return
    started = time.perf_counter()

    workdir = tempfile.mkdtemp(prefix="bench_causal_")
    model_args = ModelArguments(teacher=options.teacher, task="causal-lm")
    data_args = DataArguments(dataset=options.dataset, block_size=options.block_size,
                              max_train_samples=options.steps * options.batch_size,
                              max_eval_samples=options.dev_blocks + options.test_blocks)
    base = DistillationConfig(output_dir=workdir, report_to=[], use_cpu=True, seed=0)
    tokenizer, data = prepare_inputs(model_args, data_args, base)
    train = data.train.select(range(min(len(data.train), options.steps * options.batch_size)))
    dev = data.eval.select(range(options.dev_blocks))
    test = data.eval.select(range(options.dev_blocks, min(len(data.eval), options.dev_blocks + options.test_blocks)))
    teacher = AutoModelForCausalLM.from_pretrained(resolve_source(options.teacher), dtype=torch.float32).eval()
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)

    configs = {
        "ce_only": {"task_weight": 1.0, "logits_weight": 0.0},
        "kl": {"task_weight": options.task_weight, "logits_weight": options.logits_weight},
        "kl_hidden": {"task_weight": options.task_weight, "logits_weight": options.logits_weight,
                      "hidden_weight": options.hidden_weight, "hidden_loss": "cosine"},
    }
    results = {}
    for name, weights in configs.items():
        torch.manual_seed(0)
        student = shrink_model(teacher, num_layers=options.student_layers)
        args = DistillationConfig(
            output_dir=os.path.join(workdir, name), report_to=[], use_cpu=True, seed=0, max_steps=options.steps,
            per_device_train_batch_size=options.batch_size, per_device_eval_batch_size=options.batch_size,
            learning_rate=options.learning_rate, lr_scheduler_type="constant", logging_steps=10,
            save_strategy="no", eval_strategy="no", disable_tqdm=True, temperature=options.temperature, **weights,
        )
        start = time.perf_counter()
        needs_teacher = weights["logits_weight"] > 0 or weights.get("hidden_weight", 0) > 0
        trainer = DistillationTrainer(model=student, teacher_model=teacher if needs_teacher else None, args=args,
                                      train_dataset=train, data_collator=collator, processing_class=tokenizer)
        trainer.train()
        seconds = time.perf_counter() - start
        results[name] = {"dev_perplexity": perplexity(trainer, dev), "test_perplexity": perplexity(trainer, test),
                         "train_seconds": seconds, "weights": weights,
                         "log": [log for log in trainer.state.log_history if "loss" in log]}
        print(f"  {name}: dev {results[name]['dev_perplexity']:.2f}, test {results[name]['test_perplexity']:.2f}, "
              f"{seconds:.0f} s", file=sys.stderr, flush=True)
        del trainer, student

    teacher_ppl = teacher_perplexity(teacher, tokenizer, collator, os.path.join(workdir, "teacher"),
                                     options.batch_size, {"dev": dev, "test": test})
    best = min(("kl", "kl_hidden"), key=lambda n: results[n]["dev_perplexity"])
    ratio = results[best]["test_perplexity"] / results["ce_only"]["test_perplexity"]
    total = time.perf_counter() - started

    print(f"\n### Causal LM: SmolLM2-135M -> {options.student_layers}-layer student, {options.steps} steps of "
          f"{options.batch_size} x {options.block_size} tokens\n")
    print("| student | dev perplexity | test perplexity | vs CE-only (test) | train s |")
    print("|---|---:|---:|---:|---:|")
    for name, result in results.items():
        vs = result["test_perplexity"] / results["ce_only"]["test_perplexity"]
        mark = " (best on dev)" if name == best else ""
        print(f"| {name}{mark} | {result['dev_perplexity']:.2f} | {result['test_perplexity']:.2f} | {vs:.3f}x "
              f"| {result['train_seconds']:.0f} |")
    print(f"| (the teacher) | {teacher_ppl['dev']:.2f} | {teacher_ppl['test']:.2f} | | |")
    print(f"\nBest distilled configuration on dev: {best}; test perplexity {ratio:.3f}x the CE-only student's "
          f"(target <= 0.9x: {'met' if ratio <= 0.9 else 'missed'}). Total {total / 60:.1f} min.")
    settings = {k: v for k, v in vars(options).items() if k not in ("output", "quality_json", "plot", "replot")}
    info = machine("cpu")
    print(f"\nMachine: {info}\nSettings: {settings}")
    summary = {"machine": info, "settings": settings, "results": results, "teacher_perplexity": teacher_ppl,
               "best_on_dev": best, "total_seconds": total}
    write_json(options.output, summary)
    if options.plot:
        plot(summary, options.plot)
    if options.quality_json:
        merge_quality("causal_lm", "smollm2-135m_news-articles", {
            "teacher_perplexity": teacher_ppl["test"],
            "student_ce_only_perplexity": results["ce_only"]["test_perplexity"],
            "student_distilled_perplexity": results[best]["test_perplexity"], "best_distilled": best,
            "steps": options.steps, "student_layers": options.student_layers}, options.quality_json)
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
