"""The bookkeeping the quality benchmarks (benchmarks/quality/) rest on: disjoint, stable held-out splits, predictions
in the dataset's row order, and a headline file that keeps every benchmark's entries."""

from __future__ import annotations

import csv
import json
import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

QUALITY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "quality")
sys.path.insert(0, QUALITY)

classification = pytest.importorskip("classification")
common = pytest.importorskip("common")


class WordTokenizer:
    """A number's id is the number + 1, every other word's 1 (so a row's id names it); pads like a HF tokenizer."""

    pad_token_id = 0
    padding_side = "right"
    model_input_names = ["input_ids", "attention_mask"]

    def __call__(self, texts, truncation=True, max_length=8):
        ids = [[int(w) + 1 if w.isdigit() else 1 for w in t.split()][:max_length] for t in texts]
        return {"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids]}

    def pad(self, features, padding=True, max_length=None, pad_to_multiple_of=None, return_tensors="pt"):
        width = max(len(f["input_ids"]) for f in features)
        ids = [f["input_ids"] + [0] * (width - len(f["input_ids"])) for f in features]
        mask = [f["attention_mask"] + [0] * (width - len(f["attention_mask"])) for f in features]
        return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}


@pytest.fixture
def packaged_csv(tmp_path, monkeypatch):
    path = tmp_path / "data.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(60):
            writer.writerow([f"row {i} " + "word " * (i % 7), "pos" if i % 3 else "neg"])
    monkeypatch.setattr(classification, "fetch", lambda name: path)
    return path


def row_numbers(dataset) -> set[int]:
    return {ids[1] - 1 for ids in dataset["input_ids"]}


def test_splits_are_disjoint_sized_and_do_not_move_when_train_grows(packaged_csv):
    tokenizer = WordTokenizer()
    small = classification.load_splits("rotten_tomatoes", tokenizer, train=10, dev=8, test=12, max_length=16)
    large = classification.load_splits("rotten_tomatoes", tokenizer, train=30, dev=8, test=12, max_length=16)
    assert (len(small.train), len(small.dev), len(small.test)) == (10, 8, 12)
    assert small.labels == ["neg", "pos"]
    assert small.test["input_ids"] == large.test["input_ids"] and small.dev["input_ids"] == large.dev["input_ids"]
    train, dev, test = (row_numbers(split) for split in (large.train, large.dev, large.test))
    assert len(train | dev | test) == 50 and not (train & dev or train & test or dev & test)
    assert row_numbers(small.train) < train  # a larger train split only adds rows
    with pytest.raises(ValueError, match="has 60 rows"):
        classification.load_splits("rotten_tomatoes", tokenizer, train=50, dev=8, test=12, max_length=16)


class ParityModel(torch.nn.Module):
    """Class 1 for odd row numbers (the second token), 0 for even ones; padding-aware like a real classifier."""

    def forward(self, input_ids, attention_mask):
        assert attention_mask.shape == input_ids.shape
        odd = (input_ids[:, 1] - 1) % 2
        return SimpleNamespace(logits=torch.stack([0.5 - odd, odd - 0.5], dim=-1).float())


def test_predict_keeps_the_datasets_row_order(packaged_csv):
    splits = classification.load_splits("rotten_tomatoes", WordTokenizer(), train=40, dev=8, test=12, max_length=16)
    predicted = classification.predict(ParityModel(), WordTokenizer(), splits.train, batch_size=7)
    expected = [(ids[1] - 1) % 2 for ids in splits.train["input_ids"]]
    assert 0 < sum(expected) < len(expected)  # both classes: a reordering would show
    assert predicted.tolist() == expected
    labels = np.asarray(splits.train["labels"])
    assert classification.accuracy(predicted, splits.train) == pytest.approx(float((predicted == labels).mean()))


def test_merge_quality_keeps_the_other_benchmarks_entries(tmp_path):
    path = str(tmp_path / "results" / "quality.json")
    common.merge_quality("classification", "a", {"teacher_accuracy": 0.9}, path)
    common.merge_quality("causal_lm", "b", {"teacher_perplexity": 10.0}, path)
    common.merge_quality("classification", "a", {"teacher_accuracy": 0.8}, path)
    common.merge_quality("classification", "c", {"teacher_accuracy": 0.7}, path)
    with open(path) as f:
        data = json.load(f)
    assert data == {"classification": {"a": {"teacher_accuracy": 0.8}, "c": {"teacher_accuracy": 0.7}},
                    "causal_lm": {"b": {"teacher_perplexity": 10.0}}}
    assert not os.path.exists(path + ".tmp")
    assert common.mean_std([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))
    assert common.fmt([0.5, 0.7]) == "60.00 +- 14.14"
