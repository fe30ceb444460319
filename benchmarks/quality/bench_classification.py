"""Quality benchmark 1: do 3-layer students of a fine-tuned all-MiniLM-L6-v2 learn more with the teacher than without?

For each dataset (Rotten Tomatoes sentiment, TREC-6 question types; both packaged, see ../shared/ASSETS.md):

1. the teacher, all-MiniLM-L6-v2 (6 layers) with a fresh classification head, is fine-tuned once on the train split;
2. 3-layer students are cut from it (`shrink_model`, teacher layers 0, 2, 4: the same initialisation for all) and
   trained for the same epochs on the same data with
   (a) hard labels only (no teacher),
   (b) ``0.5 CE + 0.5 T^2 KL`` soft targets at T = 2 and at T = 4,
   (c) the better T of (b) on dev + hidden-state cosine (each student layer to the teacher layer it was cut from),
   (d) (c) + attention-map KL (MiniLM / TinyBERT);
   each with --seeds seeds (the student's data order and dropout; the teacher is fixed);
3. the best distilled configuration is chosen on the dev split (mean over seeds) and reported on the test split.

Reported: held-out accuracy mean +- std over seeds, agreement with the teacher's predictions, the teacher's accuracy.
Targets (issue 8): the distilled student keeps >= 97% of the teacher's accuracy and beats the hard-label student by
>= 1 point (means of 3 seeds).

    HF_DISTILL_ASSETS=... python benchmarks/quality/bench_classification.py [--datasets rotten_tomatoes trec]
        [--student_epochs teacher]   # students train as many epochs as the teacher instead of SIZES' epochs
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from classification import load_splits, train_student, train_teacher  # noqa: E402
from common import fmt, machine, mean_std, merge_quality, write_json  # noqa: E402

from hf_distill.data.assets import fetch  # noqa: E402

#: Per dataset: rows per split, truncation length, teacher and student epochs.
SIZES = {
    "rotten_tomatoes": {"train": 1500, "dev": 500, "test": 1000, "max_length": 48, "teacher_epochs": 3,
                        "student_epochs": 1},
    "trec": {"train": 1500, "dev": 500, "test": 1000, "max_length": 32, "teacher_epochs": 4, "student_epochs": 2},
}


def soft(temperature: float) -> dict[str, float]:
    return {"task_weight": 0.5, "logits_weight": 0.5, "temperature": temperature, "logits_loss": "forward_kl"}


def run_dataset(name: str, options, workdir: str) -> dict:
    """Teacher, then every student configuration and seed, on one dataset."""
    sizes = dict(SIZES[name])
    if options.student_epochs == "teacher":
        sizes["student_epochs"] = sizes["teacher_epochs"]
    elif options.student_epochs is not None:
        sizes["student_epochs"] = float(options.student_epochs)
    source = str(fetch("minilm-l6"))
    from transformers import AutoTokenizer

    splits = load_splits(name, AutoTokenizer.from_pretrained(source), sizes["train"], sizes["dev"], sizes["test"],
                         sizes["max_length"])
    teacher, tokenizer, teacher_result = train_teacher(source, splits, workdir, sizes["teacher_epochs"],
                                                       options.teacher_lr, options.batch_size)
    print(f"[{name}] teacher: dev {teacher_result['dev_accuracy']:.4f} test {teacher_result['test_accuracy']:.4f} "
          f"({teacher_result['train_seconds']:.0f} s)", file=sys.stderr, flush=True)
    runs: dict[str, list[dict]] = {}

    def run(config: str, weights: dict) -> None:
        runs[config] = []
        for seed in range(options.seeds):
            result = train_student(teacher, tokenizer, splits, teacher_result, weights, seed, options.student_layers,
                                   workdir, sizes["student_epochs"], options.student_lr, options.batch_size)
            result["weights"] = weights
            runs[config].append(result)
            print(f"[{name}] {config} seed {seed}: dev {result['dev_accuracy']:.4f} test {result['test_accuracy']:.4f}"
                  f" agreement {result['test_agreement']:.4f} ({result['train_seconds']:.0f} s)",
                  file=sys.stderr, flush=True)

    def dev_mean(config: str) -> float:
        return mean_std([r["dev_accuracy"] for r in runs[config]])[0]

    run("a_hard_labels", {"task_weight": 1.0, "logits_weight": 0.0})
    for temperature in (2.0, 4.0):
        run(f"b_kl_T{temperature:g}", soft(temperature))
    best_t = max((2.0, 4.0), key=lambda t: dev_mean(f"b_kl_T{t:g}"))
    hidden = {**soft(best_t), "hidden_weight": 1.0, "hidden_loss": "cosine"}
    run(f"c_kl_T{best_t:g}_hidden", hidden)
    run(f"d_kl_T{best_t:g}_hidden_attention", {**hidden, "attention_weight": 1.0})
    best = max((c for c in runs if c != "a_hard_labels"), key=dev_mean)
    teacher_result = {k: v for k, v in teacher_result.items() if not k.endswith("predictions")}
    return {"teacher": teacher_result, "runs": runs, "best_on_dev": best, "labels": splits.labels, "sizes": sizes}


def table(name: str, result: dict) -> list[str]:
    """Markdown rows of one dataset: every configuration's test (and dev) accuracy and agreement over seeds."""
    teacher = result["teacher"]["test_accuracy"]
    lines = [f"\n### {name}: teacher test accuracy {teacher:.4f} (dev {result['teacher']['dev_accuracy']:.4f})\n",
             "| student (3 layers) | dev accuracy % | test accuracy % | of teacher | test agreement % |",
             "|---|---:|---:|---:|---:|"]
    for config, runs in result["runs"].items():
        test = [r["test_accuracy"] for r in runs]
        mark = " **(best on dev)**" if config == result["best_on_dev"] else ""
        lines.append(f"| {config}{mark} | {fmt([r['dev_accuracy'] for r in runs])} | {fmt(test)} | "
                     f"{mean_std(test)[0] / teacher:.1%} | {fmt([r['test_agreement'] for r in runs])} |")
    return lines


def plot(results: dict, path: str) -> None:
    """Bar chart: test accuracy (mean +- std over seeds) of every configuration, the teacher as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (name, result) in zip(axes[0], results.items()):
        configs = list(result["runs"])
        stats = [mean_std([r["test_accuracy"] for r in result["runs"][c]]) for c in configs]
        ax.bar(range(len(configs)), [m for m, _ in stats], yerr=[s for _, s in stats], capsize=4,
               color=["grey"] + ["tab:blue"] * (len(configs) - 1))
        ax.axhline(result["teacher"]["test_accuracy"], color="tab:red", linestyle="--", label="teacher (6 layers)")
        ax.set_xticks(range(len(configs)), [c.split("_", 1)[1] for c in configs], rotation=30, ha="right",
                      fontsize=8)
        low = min(m - s for m, s in stats + [(result["teacher"]["test_accuracy"], 0)])
        ax.set_ylim(max(0, low - 0.03), 1.0)
        ax.set_title(f"{name}: 3-layer students, test accuracy")
        ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--student_layers", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--teacher_lr", type=float, default=5e-5)
    parser.add_argument("--student_lr", type=float, default=1e-4)
    parser.add_argument("--student_epochs", default=None,
                        help="override the students' epochs of SIZES: a number, or 'teacher' for the teacher's epochs")
    parser.add_argument("--output", default=None, help="also write the results as JSON here")
    parser.add_argument("--plot", default=None, help="also draw the test accuracies into this PNG")
    parser.add_argument("--quality_json", default=None, help="merge the headline numbers into this quality.json")
    parser.add_argument("--replot", default=None, metavar="JSON",
                        help="only redraw --plot from the JSON an earlier run wrote with --output; trains nothing")
    options = parser.parse_args()
    if options.replot:
        import json

        with open(options.replot) as f:
            plot(json.load(f)["results"], options.plot or os.path.splitext(options.replot)[0] + ".png")
        return
    started = time.perf_counter()
    torch.manual_seed(0)
    workdir = tempfile.mkdtemp(prefix="bench_cls_")
    results = {name: run_dataset(name, options, workdir) for name in options.datasets}
    total = time.perf_counter() - started

    lines = []
    for name, result in results.items():
        lines += table(name, result)
        hard = mean_std([r["test_accuracy"] for r in result["runs"]["a_hard_labels"]])[0]
        best = mean_std([r["test_accuracy"] for r in result["runs"][result["best_on_dev"]]])[0]
        teacher = result["teacher"]["test_accuracy"]
        lines.append(f"\nBest on dev: {result['best_on_dev']}: test {best:.2%} = {best / teacher:.1%} of the teacher "
                     f"(target >= 97%: {'met' if best >= 0.97 * teacher - 1e-9 else 'missed'}), "
                     f"{(best - hard) * 100:+.2f} points over hard labels "
                     f"(target >= +1: {'met' if best - hard >= 0.01 - 1e-9 else 'missed'}).")
        if options.quality_json:
            merge_quality("classification", f"minilm-l6_{name}", {
                "teacher_accuracy": teacher, "student_hard_label_accuracy": hard,
                "student_distilled_accuracy": best, "best_distilled": result["best_on_dev"],
                "student_layers": options.student_layers, "seeds": options.seeds}, options.quality_json)
    lines.append(f"\nTotal {total / 60:.1f} min.")  # (accuracies are counts / split size: 1e-9 absorbs rounding)
    print("\n".join(lines))
    settings = {k: v for k, v in vars(options).items() if k not in ("output", "plot", "quality_json", "replot")}
    settings["sizes"] = {name: result["sizes"] for name, result in results.items()}
    info = machine("cpu")
    print(f"\nMachine: {info}\nSettings: {settings}")
    write_json(options.output, {"machine": info, "settings": settings, "results": results, "total_seconds": total})
    if options.plot:
        plot(results, options.plot)
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
