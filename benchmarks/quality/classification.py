"""Text-classification helpers of the quality benchmarks: real packaged data split three ways, a fine-tuned teacher,
students cut from it and trained with or without the teacher, accuracy and teacher agreement on dev and test."""

from __future__ import annotations

import csv
import os
import time
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer

from hf_distill import DistillationConfig, DistillationTrainer, shrink_model
from hf_distill.data.assets import fetch

#: Dataset name -> packaged asset (a ``text,label`` CSV; TREC's label is its coarse class).
DATASETS = {"rotten_tomatoes": "rotten-tomatoes", "trec": "trec"}


@dataclass
class Splits:
    """Tokenised train / dev / test splits and the label names (ids are their sorted order)."""

    train: datasets.Dataset
    dev: datasets.Dataset
    test: datasets.Dataset
    labels: list[str]


def load_splits(name: str, tokenizer: Any, train: int, dev: int, test: int, max_length: int, seed: int = 0) -> Splits:
    """`train` / `dev` / `test` disjoint rows of a packaged dataset, shuffled with `seed`, tokenised (no padding:
    the collator pads each batch). Test and dev are taken first, so changing `train` never moves them."""
    with open(fetch(DATASETS[name]), newline="") as f:
        rows = [(r["text"], r["label"]) for r in csv.DictReader(f)]
    labels = sorted({label for _, label in rows})
    order = np.random.default_rng(seed).permutation(len(rows))
    if test + dev + train > len(rows):
        raise ValueError(f"{name} has {len(rows)} rows; asked for {train} + {dev} + {test}.")
    parts = {"test": order[:test], "dev": order[test:test + dev], "train": order[test + dev:test + dev + train]}

    def build(indices) -> datasets.Dataset:
        table = {"text": [rows[i][0] for i in indices], "labels": [labels.index(rows[i][1]) for i in indices]}
        encoded = tokenizer(table["text"], truncation=True, max_length=max_length)
        return datasets.Dataset.from_dict({"input_ids": encoded["input_ids"],
                                           "attention_mask": encoded["attention_mask"], "labels": table["labels"]})

    return Splits(**{k: build(v) for k, v in parts.items()}, labels=labels)


def load_transfer(name: str, tokenizer: Any, skip: int, count: int, max_length: int, seed: int = 0) -> datasets.Dataset:
    """Up to `count` rows of a packaged dataset that `load_splits` with the same `seed` never uses (the shuffled order
    from position `skip` = test + dev + train on), tokenised the same way, their labels removed (-100)."""
    with open(fetch(DATASETS[name]), newline="") as f:
        texts = [r["text"] for r in csv.DictReader(f)]
    order = np.random.default_rng(seed).permutation(len(texts))[skip:skip + count]
    encoded = tokenizer([texts[i] for i in order], truncation=True, max_length=max_length)
    return datasets.Dataset.from_dict({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
                                       "labels": [-100] * len(order)})


def predict(model: torch.nn.Module, tokenizer: Any, dataset: datasets.Dataset, batch_size: int = 128) -> np.ndarray:
    """Predicted class ids of `model` on `dataset`, in the dataset's order. (Not `Trainer.predict`: with
    ``train_sampling_strategy="group_by_length"`` transformers also reorders the evaluation set, so its predictions
    line up with its own `label_ids` but not with the dataset's rows.)"""
    collate = DataCollatorWithPadding(tokenizer)
    model.eval()
    predicted = []
    with torch.inference_mode():
        for start in range(0, len(dataset), batch_size):
            rows = dataset.select(range(start, min(start + batch_size, len(dataset))))
            batch = collate([{k: row[k] for k in ("input_ids", "attention_mask")} for row in rows])
            predicted.append(model(**batch).logits.argmax(-1).numpy())
    return np.concatenate(predicted)


def accuracy(predicted: np.ndarray, dataset: datasets.Dataset) -> float:
    return float((predicted == np.asarray(dataset["labels"])).mean())


def common_args(output_dir: str, seed: int, epochs: float, learning_rate: float, batch_size: int) -> dict[str, Any]:
    """TrainingArguments shared by teachers and students (CPU, no checkpoints, no reports)."""
    return dict(output_dir=output_dir, seed=seed, num_train_epochs=epochs, learning_rate=learning_rate,
                per_device_train_batch_size=batch_size, per_device_eval_batch_size=128, warmup_steps=0.06,
                weight_decay=0.01, train_sampling_strategy="group_by_length", logging_steps=50, save_strategy="no",
                eval_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True)


def train_teacher(source: str, splits: Splits, workdir: str, epochs: float, learning_rate: float,
                  batch_size: int) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """Fine-tune `source` (a backbone folder) with a fresh head on the train split; returns the model, its tokenizer
    and its dev / test predictions and accuracies."""
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForSequenceClassification.from_pretrained(
        source, num_labels=len(splits.labels), id2label=dict(enumerate(splits.labels)),
        label2id={label: i for i, label in enumerate(splits.labels)})
    start = time.perf_counter()
    args = DistillationConfig(**common_args(os.path.join(workdir, "teacher"), 0, epochs, learning_rate, batch_size))
    trainer = Trainer(model=model, args=args, train_dataset=splits.train, processing_class=tokenizer,
                      data_collator=DataCollatorWithPadding(tokenizer))
    trainer.train()
    result: dict[str, Any] = {"train_seconds": time.perf_counter() - start}
    for split in ("dev", "test"):
        result[f"{split}_predictions"] = predict(model, tokenizer, getattr(splits, split))
        result[f"{split}_accuracy"] = accuracy(result[f"{split}_predictions"], getattr(splits, split))
    return model.eval(), tokenizer, result


def train_student(teacher: torch.nn.Module, tokenizer: Any, splits: Splits, teacher_result: dict[str, Any],
                  weights: dict[str, Any], seed: int, layers: int, workdir: str, epochs: float, learning_rate: float,
                  batch_size: int, strategy: str = "every_other") -> dict[str, Any]:
    """A `layers`-layer student cut from `teacher` (its weights, attention dropout off in every configuration so
    the configurations differ only in their losses), trained with `weights` (the DistillationConfig loss fields);
    the teacher is not run when no term needs it. Returns dev / test accuracy and agreement with the teacher."""
    torch.manual_seed(seed)
    student = shrink_model(teacher, num_layers=layers, strategy=strategy,
                           config_overrides={"attention_probs_dropout_prob": 0.0})
    needs_teacher = any(weights.get(k, 0) > 0 for k in ("logits_weight", "hidden_weight", "attention_weight"))
    args = DistillationConfig(**common_args(os.path.join(workdir, f"student-{seed}"), seed, epochs, learning_rate,
                                            batch_size), **weights)
    start = time.perf_counter()
    trainer = DistillationTrainer(model=student, teacher_model=teacher if needs_teacher else None, args=args,
                                  train_dataset=splits.train, processing_class=tokenizer,
                                  data_collator=DataCollatorWithPadding(tokenizer))
    trainer.train()
    result: dict[str, Any] = {"seed": seed, "train_seconds": time.perf_counter() - start,
                              "parameters": sum(p.numel() for p in student.parameters())}
    for split in ("dev", "test"):
        predicted = predict(trainer.model, tokenizer, getattr(splits, split))
        result[f"{split}_accuracy"] = accuracy(predicted, getattr(splits, split))
        result[f"{split}_agreement"] = float((predicted == teacher_result[f"{split}_predictions"]).mean())
    return result
