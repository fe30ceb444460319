"""Quality benchmark 1b: a transfer set (Hinton et al. 2015) for the classification students of benchmark 1.

Benchmark 1's second attempt (students train as many epochs as the teacher) is rerun for its hard-label arm and its
dev-chosen configuration only; the distilled student also sees up to `--transfer` of the dataset's unused training
rows with their labels removed (soft targets and hidden states of the teacher only; the task loss counts the labelled
rows), for the same number of epochs over labelled + transfer rows. Same teacher (fine-tuned with seed 0), same
splits, same seeds as benchmark 1.

    HF_DISTILL_ASSETS=... python benchmarks/quality/bench_transfer.py --output docs/results/quality_transfer.json \
        --quality_json docs/results/quality.json
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_classification import SIZES, soft  # noqa: E402
from classification import Splits, load_splits, load_transfer, train_student, train_teacher  # noqa: E402
from common import fmt, machine, mean_std, merge_quality, write_json  # noqa: E402

from hf_distill.data.assets import fetch  # noqa: E402

#: The configuration benchmark 1 chose on dev (attempt 2, docs/results.md) per dataset.
CHOSEN = {"rotten_tomatoes": ("c_kl_T4_hidden", 4.0), "trec": ("c_kl_T2_hidden", 2.0)}


def run_dataset(name: str, options, workdir: str) -> dict:
    from transformers import AutoTokenizer

    sizes = dict(SIZES[name], student_epochs=SIZES[name]["teacher_epochs"])
    source = str(fetch("minilm-l6"))
    tokenizer = AutoTokenizer.from_pretrained(source)
    splits = load_splits(name, tokenizer, sizes["train"], sizes["dev"], sizes["test"], sizes["max_length"])
    transfer = load_transfer(name, tokenizer, sizes["train"] + sizes["dev"] + sizes["test"], options.transfer,
                             sizes["max_length"])
    teacher, tokenizer, teacher_result = train_teacher(source, splits, workdir, sizes["teacher_epochs"],
                                                       options.teacher_lr, options.batch_size)
    print(f"[{name}] teacher: dev {teacher_result['dev_accuracy']:.4f} test {teacher_result['test_accuracy']:.4f}; "
          f"transfer rows {len(transfer)}", file=sys.stderr, flush=True)
    with_transfer = Splits(datasets.concatenate_datasets([splits.train, transfer.cast(splits.train.features)]),
                           splits.dev, splits.test, splits.labels)
    config, temperature = CHOSEN[name]
    arms = {f"{config}_transfer": ({**soft(temperature), "hidden_weight": 1.0, "hidden_loss": "cosine"},
                                   with_transfer),  # first: the new path fails early if it fails
            "a_hard_labels": ({"task_weight": 1.0, "logits_weight": 0.0}, splits)}
    runs: dict[str, list[dict]] = {}
    for arm, (weights, data) in arms.items():
        runs[arm] = []
        for seed in range(options.seeds):
            result = train_student(teacher, tokenizer, data, teacher_result, weights, seed, 3, workdir,
                                   sizes["student_epochs"], options.student_lr, options.batch_size)
            result.update(weights=weights, train_rows=len(data.train),
                          steps=-(-len(data.train) // options.batch_size) * int(sizes["student_epochs"]))
            runs[arm].append(result)
            print(f"[{name}] {arm} seed {seed}: dev {result['dev_accuracy']:.4f} test {result['test_accuracy']:.4f} "
                  f"({result['train_seconds']:.0f} s)", file=sys.stderr, flush=True)
    teacher_result = {k: v for k, v in teacher_result.items() if not k.endswith("predictions")}
    return {"teacher": teacher_result, "runs": runs, "transfer_rows": len(transfer), "sizes": sizes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(CHOSEN), choices=list(CHOSEN))
    parser.add_argument("--transfer", type=int, default=3000, help="most unlabelled rows per dataset")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--teacher_lr", type=float, default=5e-5)
    parser.add_argument("--student_lr", type=float, default=1e-4)
    parser.add_argument("--output", default=None)
    parser.add_argument("--quality_json", default=None)
    options = parser.parse_args()
    started = time.perf_counter()
    torch.manual_seed(0)
    workdir = tempfile.mkdtemp(prefix="bench_transfer_")
    results = {name: run_dataset(name, options, workdir) for name in options.datasets}
    lines = []
    for name, result in results.items():
        teacher = result["teacher"]["test_accuracy"]
        lines += [f"\n### {name}: teacher test accuracy {teacher:.4f}; transfer set {result['transfer_rows']} rows\n",
                  "| student (3 layers) | train rows | optimizer steps | train time s | dev accuracy % | "
                  "test accuracy % | test agreement % |", "|---|---:|---:|---:|---:|---:|---:|"]
        for arm, runs in result["runs"].items():
            lines.append(f"| {arm} | {runs[0]['train_rows']} | {runs[0]['steps']} | "
                         f"{mean_std([r['train_seconds'] for r in runs])[0]:.0f} | "
                         f"{fmt([r['dev_accuracy'] for r in runs])} | {fmt([r['test_accuracy'] for r in runs])} | "
                         f"{fmt([r['test_agreement'] for r in runs])} |")
        arm = next(a for a in result["runs"] if a != "a_hard_labels")
        hard, best = (mean_std([r["test_accuracy"] for r in result["runs"][a]])[0] for a in ("a_hard_labels", arm))
        lines.append(f"\nTransfer-set student {(best - hard) * 100:+.2f} points over hard labels (target >= +1: "
                     f"{'met' if best - hard >= 0.01 - 1e-9 else 'missed'}).")
        if options.quality_json:
            merge_quality("classification_transfer", f"minilm-l6_{name}", {
                "teacher_accuracy": teacher, "student_hard_label_accuracy": hard,
                "student_transfer_accuracy": best, "transfer_rows": result["transfer_rows"],
                "configuration": arm, "seeds": options.seeds}, options.quality_json)
    total = time.perf_counter() - started
    lines.append(f"\nTotal {total / 60:.1f} min.")
    print("\n".join(lines))
    info = machine("cpu")
    print(f"\nMachine: {info}")
    write_json(options.output, {"machine": info, "settings": vars(options), "results": results,
                                "total_seconds": total})
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
