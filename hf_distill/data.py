"""Datasets for the command line: load a Hub dataset or a local file, split it, and tokenise it for the task."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

#: The tasks of the command line.
TASKS: tuple[str, ...] = ("sequence-classification", "regression", "causal-lm", "masked-lm")
#: Local file suffix -> `datasets` builder.
LOCAL_FORMATS: dict[str, str] = {
    ".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text",
}


@dataclass
class DataArguments:
    """Where the data comes from and how it becomes model inputs."""

    dataset: str | None = field(
        default=None, metadata={"help": "Hub dataset name, or a local csv / tsv / json / jsonl / parquet / txt file."}
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    text_column: str = field(default="text", metadata={"help": "Column holding the text (the first of a pair)."})
    text_column_2: str | None = field(default=None, metadata={"help": "Second text column, for sentence pairs."})
    label_column: str = field(default="label", metadata={"help": "Column holding the label (classification/regression)."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: str | None = field(
        default=None, metadata={"help": "Split to evaluate on; without it, --eval_fraction of the training split."}
    )
    eval_fraction: float = field(default=0.1, metadata={"help": "Held-out fraction when there is no --eval_split."})
    max_length: int = field(default=128, metadata={"help": "Truncation length (classification, regression, MLM)."})
    block_size: int = field(default=128, metadata={"help": "Causal-LM text is packed into blocks of this length."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only this many training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only this many evaluation rows."})


def load_raw(dataset: str, dataset_config: str | None = None) -> datasets.DatasetDict:
    """A `DatasetDict` from a local file (by suffix; a folder loads like the Hub) or a Hub dataset name."""
    path = Path(dataset)
    if path.is_file():
        builder = LOCAL_FORMATS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(
                f"Cannot read {path}: unknown file type {path.suffix!r}. Use one of "
                f"{', '.join(sorted(LOCAL_FORMATS))} (or a Hub dataset name)."
            )
        kwargs = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
        try:
            loaded = datasets.load_dataset(builder, data_files={"train": str(path)}, **kwargs)
        except Exception as error:
            raise ValueError(f"Cannot read {path} as {builder}: {error}") from error
        return loaded
    if path.exists() and path.is_dir():
        try:
            return datasets.load_from_disk(str(path))
        except Exception:
            return datasets.load_dataset(str(path), dataset_config)
    if path.suffix.lower() in LOCAL_FORMATS or str(dataset).startswith((".", "/")):
        raise FileNotFoundError(f"Dataset file {dataset!r} does not exist.")
    return datasets.load_dataset(dataset, dataset_config)


def split_dataset(raw: datasets.DatasetDict, data: DataArguments, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, eval): the named splits, or a seeded held-out fraction of the training split."""
    if data.train_split not in raw:
        raise ValueError(f"The dataset has no split {data.train_split!r} (splits: {list(raw)}); set --train_split.")
    train = raw[data.train_split]
    if data.eval_split is not None:
        if data.eval_split not in raw:
            raise ValueError(f"The dataset has no split {data.eval_split!r} (splits: {list(raw)}); set --eval_split.")
        held_out = raw[data.eval_split]
    else:
        if not 0 < data.eval_fraction < 1:
            raise ValueError(f"eval_fraction must lie in (0, 1), got {data.eval_fraction}.")
        parts = train.train_test_split(test_size=data.eval_fraction, seed=seed)
        train, held_out = parts["train"], parts["test"]
    if data.max_train_samples is not None:
        train = train.select(range(min(data.max_train_samples, len(train))))
    if data.max_eval_samples is not None:
        held_out = held_out.select(range(min(data.max_eval_samples, len(held_out))))
    return train, held_out


def _require_columns(dataset: datasets.Dataset, columns: list[str], flags: dict[str, str]) -> None:
    for column in columns:
        if column not in dataset.column_names:
            flag = flags.get(column, "--text_column")
            raise ValueError(
                f"Column {column!r} is not in the dataset (columns: {dataset.column_names}); point {flag} at the "
                "right one."
            )


@dataclass
class PreparedData:
    """Tokenised splits plus what the models need to know about the labels."""

    train: datasets.Dataset
    eval: datasets.Dataset
    num_labels: int | None = None
    id2label: dict[int, str] | None = None


def prepare_datasets(
    task: str, train: datasets.Dataset, held_out: datasets.Dataset, tokenizer: Any, data: DataArguments
) -> PreparedData:
    """Tokenise both splits for `task` with the teacher's tokenizer.

    Classification labels that are strings become ids (sorted names of the training split); regression labels
    become floats; causal-LM text is concatenated and cut into `block_size` blocks (the collator makes labels);
    masked-LM text is truncated (the MLM collator masks and makes labels).
    """
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; choose one of {', '.join(TASKS)}.")
    text_columns = [data.text_column] + ([data.text_column_2] if data.text_column_2 else [])
    flags = {data.text_column: "--text_column", data.label_column: "--label_column"}
    if data.text_column_2:
        flags[data.text_column_2] = "--text_column_2"
    labelled = task in ("sequence-classification", "regression")
    for split in (train, held_out):
        _require_columns(split, text_columns + ([data.label_column] if labelled else []), flags)

    if task in ("causal-lm", "masked-lm"):
        def tokenize(batch):
            return tokenizer(batch[data.text_column], truncation=task == "masked-lm", max_length=data.max_length)

        def pack(batch):
            ids = [token for row in batch["input_ids"] for token in row]
            usable = len(ids) // data.block_size * data.block_size
            blocks = [ids[i: i + data.block_size] for i in range(0, usable, data.block_size)]
            return {"input_ids": blocks, "attention_mask": [[1] * data.block_size for _ in blocks]}

        out = []
        for split in (train, held_out):
            split = split.filter(lambda row: bool(row[data.text_column] and str(row[data.text_column]).strip()))
            tokenized = split.map(tokenize, batched=True, remove_columns=split.column_names)
            if task == "causal-lm":
                tokenized = tokenized.map(pack, batched=True, remove_columns=tokenized.column_names)
            out.append(tokenized)
        if task == "causal-lm" and (len(out[0]) == 0 or len(out[1]) == 0):
            raise ValueError(
                f"Packing into --block_size {data.block_size} left no block in a split: lower --block_size or add text."
            )
        return PreparedData(out[0], out[1])

    num_labels, id2label, mapping = None, None, None
    if task == "regression":
        num_labels = 1
    else:
        feature = train.features[data.label_column]
        if isinstance(feature, datasets.ClassLabel):
            id2label = dict(enumerate(feature.names))
        elif getattr(feature, "dtype", None) in ("string", "large_string") or isinstance(train[0][data.label_column], str):
            names = sorted(set(train[data.label_column]))
            mapping = {name: i for i, name in enumerate(names)}
            id2label = dict(enumerate(names))
        else:
            values = sorted({int(v) for v in train[data.label_column]})
            id2label = {i: str(i) for i in range(max(values) + 1)}
        num_labels = len(id2label)

    def encode(batch):
        texts = [batch[c] for c in text_columns]
        encoded = tokenizer(*texts, truncation=True, max_length=data.max_length)
        labels = batch[data.label_column]
        if task == "regression":
            encoded["labels"] = [float(v) for v in labels]
        elif mapping is not None:
            unknown = sorted({v for v in labels if v not in mapping})
            if unknown:
                raise ValueError(f"Evaluation labels {unknown} never occur in the training split.")
            encoded["labels"] = [mapping[v] for v in labels]
        else:
            encoded["labels"] = [int(v) for v in labels]
        return encoded

    prepared = [split.map(encode, batched=True, remove_columns=split.column_names) for split in (train, held_out)]
    return PreparedData(prepared[0], prepared[1], num_labels, id2label)
