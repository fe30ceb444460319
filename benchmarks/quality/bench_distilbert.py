"""Quality benchmark 2: the DistilBERT setting, on real weights.

Teacher all-mpnet-base-v2 (12 layers, 110M parameters; packaged asset) with a fresh head, fine-tuned on Rotten
Tomatoes; student its 6-layer cut (every other layer, DistilBERT's initialisation) trained with DistilBERT's
triple-style loss adapted to classification: ``task_weight * CE + logits_weight * T^2 KL(p_t || p_s) + hidden_weight
* (1 - cos)`` on the last hidden states (DistilBERT used 2 * MLM + 5 * KL + 1 * cos at T = 2; CE on the labels takes
the MLM term's place). Same data and splits as the teacher; the students train --student_epochs epochs (default: the
teacher's). Beside it, unless --no_hard_label, the same 6-layer cut trained on the labels alone for as long (no
teacher), so that the table shows what the teacher adds.

Reported: test (and dev) accuracy of each and the retention (student / teacher), parameters, and CPU latency of both
measured side by side in this process: median milliseconds per single review (batch 1) and reviews per second at
batch 32.

    HF_DISTILL_ASSETS=... python benchmarks/quality/bench_distilbert.py [--epochs 1 --student_epochs 3]
        [--output X.json --quality_json docs/results/quality.json]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch
from transformers import AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from classification import load_splits, train_student, train_teacher  # noqa: E402
from common import machine, merge_quality, write_json  # noqa: E402

from hf_distill.data.assets import fetch  # noqa: E402


def latency(model: torch.nn.Module, tokenizer, texts: list[str], batch_size: int, repeats: int) -> float:
    """Median seconds of one forward pass over `batch_size` of `texts` (padded to the longest), after a warm-up."""
    batch = tokenizer(texts[:batch_size], padding=True, truncation=True, max_length=48, return_tensors="pt")
    times = []
    with torch.inference_mode():
        model(**batch)
        for _ in range(repeats):
            start = time.perf_counter()
            model(**batch)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="mpnet-base", help="packaged asset name of the teacher backbone")
    parser.add_argument("--student_layers", type=int, default=6)
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--dev", type=int, default=500)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--max_length", type=int, default=48)
    parser.add_argument("--epochs", type=float, default=1.0, help="the teacher's fine-tuning epochs")
    parser.add_argument("--student_epochs", type=float, default=None, help="the students' epochs (default: --epochs)")
    parser.add_argument("--no_hard_label", action="store_true", help="skip the hard-label student")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--teacher_lr", type=float, default=3e-5)
    parser.add_argument("--student_lr", type=float, default=1e-4)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--task_weight", type=float, default=2.0)
    parser.add_argument("--logits_weight", type=float, default=5.0)
    parser.add_argument("--hidden_weight", type=float, default=1.0)
    parser.add_argument("--output", default=None, help="also write the results as JSON here")
    parser.add_argument("--quality_json", default=None, help="merge the headline numbers into this quality.json")
    options = parser.parse_args()
    student_epochs = options.student_epochs if options.student_epochs is not None else options.epochs
    started = time.perf_counter()
    workdir = tempfile.mkdtemp(prefix="bench_distilbert_")
    source = str(fetch(options.teacher))
    tokenizer = AutoTokenizer.from_pretrained(source)
    splits = load_splits("rotten_tomatoes", tokenizer, options.train, options.dev, options.test, options.max_length)
    teacher, tokenizer, teacher_result = train_teacher(source, splits, workdir, options.epochs, options.teacher_lr,
                                                       options.batch_size)
    print(f"teacher: test {teacher_result['test_accuracy']:.4f} ({teacher_result['train_seconds']:.0f} s)",
          file=sys.stderr, flush=True)
    weights = {"task_weight": options.task_weight, "logits_weight": options.logits_weight,
               "temperature": options.temperature, "hidden_weight": options.hidden_weight, "hidden_loss": "cosine",
               "layer_map": "last"}
    student_result = train_student(teacher, tokenizer, splits, teacher_result, weights, 0, options.student_layers,
                                   workdir, student_epochs, options.student_lr, options.batch_size)
    print(f"student: dev {student_result['dev_accuracy']:.4f} test {student_result['test_accuracy']:.4f} "
          f"({student_result['train_seconds']:.0f} s)", file=sys.stderr, flush=True)
    hard_result = None
    if not options.no_hard_label:
        hard_result = train_student(teacher, tokenizer, splits, teacher_result,
                                    {"task_weight": 1.0, "logits_weight": 0.0}, 0, options.student_layers, workdir,
                                    student_epochs, options.student_lr, options.batch_size)
        print(f"hard-label student: dev {hard_result['dev_accuracy']:.4f} test {hard_result['test_accuracy']:.4f} "
              f"({hard_result['train_seconds']:.0f} s)", file=sys.stderr, flush=True)
    from hf_distill import shrink_model  # the trained student lives in train_student; rebuild its shape for timing

    timed_student = shrink_model(teacher, num_layers=options.student_layers).eval()
    texts = tokenizer.batch_decode(splits.test["input_ids"][:32], skip_special_tokens=True)
    speed = {}
    for name, model in (("teacher", teacher.eval()), ("student", timed_student)):
        speed[name] = {"ms_batch_1": 1000 * latency(model, tokenizer, texts, 1, 30),
                       "reviews_per_s_batch_32": 32 / latency(model, tokenizer, texts, 32, 5),
                       "parameters": sum(p.numel() for p in model.parameters())}
    total = time.perf_counter() - started
    retention = student_result["test_accuracy"] / teacher_result["test_accuracy"]

    print(f"\n### The DistilBERT setting: all-mpnet-base-v2 (12 layers) -> {options.student_layers}-layer student, "
          f"Rotten Tomatoes\n")
    print("| model | layers | parameters | dev accuracy | test accuracy | CPU ms / review (batch 1) | "
          "CPU reviews/s (batch 32) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    rows = [("teacher", "teacher", 12, teacher_result), ("distilled student", "student", options.student_layers,
                                                         student_result)]
    if hard_result:
        rows.append(("hard-label student (no teacher)", "student", options.student_layers, hard_result))
    for label, name, layers, result in rows:
        s = speed[name]
        print(f"| {label} | {layers} | {s['parameters'] / 1e6:.1f}M | {result['dev_accuracy']:.4f} | "
              f"{result['test_accuracy']:.4f} | {s['ms_batch_1']:.1f} | {s['reviews_per_s_batch_32']:.1f} |")
    speedup_1 = speed["teacher"]["ms_batch_1"] / speed["student"]["ms_batch_1"]
    speedup_32 = speed["student"]["reviews_per_s_batch_32"] / speed["teacher"]["reviews_per_s_batch_32"]
    print(f"\nRetention: {retention:.1%} of the teacher's accuracy (DistilBERT: 97%); teacher agreement "
          f"{student_result['test_agreement']:.4f}; speed-up {speedup_1:.2f}x (batch 1), {speedup_32:.2f}x (batch 32). "
          f"Total {total / 60:.1f} min.")
    if hard_result:
        gain = (student_result["test_accuracy"] - hard_result["test_accuracy"]) * 100
        print(f"Distilled minus hard-label student: {gain:+.1f} points (test).")
    settings = {k: v for k, v in vars(options).items() if k not in ("output", "quality_json")}
    settings["student_epochs"] = student_epochs
    info = machine("cpu")
    info["torch_threads"] = torch.get_num_threads()
    print(f"\nMachine: {info}\nSettings: {settings}")
    teacher_result = {k: v for k, v in teacher_result.items() if not k.endswith("predictions")}
    write_json(options.output, {"machine": info, "settings": settings, "teacher": teacher_result,
                                "student": student_result, "hard_label_student": hard_result, "speed": speed,
                                "retention": retention, "total_seconds": total})
    if options.quality_json:
        entry = {"teacher_accuracy": teacher_result["test_accuracy"],
                 "student_distilled_accuracy": student_result["test_accuracy"], "retention": retention,
                 "student_layers": options.student_layers, "seeds": 1, "student_epochs": student_epochs}
        if hard_result:
            entry["student_hard_label_accuracy"] = hard_result["test_accuracy"]
        merge_quality("classification", "mpnet-base_rotten_tomatoes", entry, options.quality_json)
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
