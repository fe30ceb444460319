"""Datasets for the command line: load a Hub dataset or a local file, split it, and tokenise it for the task."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import datasets
from transformers.utils import logging

from ..checks.options import check_choice
from .chat import (
    DATA_FORMATS,
    IGNORE_INDEX,
    TEACHER_PROMPTS,
    detect_format,
    detect_rows_format,
    prepare_chat_dataset,
    prompt_ids,
)
from .generate import is_generations, load_generations
from .labels import LabelPlan, check_label_values, label_plan
from .provenance import FOLDER_KINDS, folder_kind
from .row_filters import drop_empty_answers

logger = logging.get_logger(__name__)

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
    text_column_2: str | None = field(
        default=None, metadata={"help": "Second text column: sentence pairs; for --task causal-lm, the completion of a "
                                        "plain prompt-completion dataset (prompt in --text_column)."})
    prompt_column: str | None = field(
        default=None, metadata={"help": "Causal LMs: a plain text column that is the user turn of a conversation "
                                        "(rendered with the chat template): prompts for `generate` and on-policy runs, "
                                        "or with --completion_column the prompt of prompt-completion rows."})
    completion_column: str | None = field(
        default=None, metadata={"help": "With --prompt_column: the plain text column of the assistant's answers."})
    system_prompt: str | None = field(
        default=None, metadata={"help": "With --prompt_column: a system turn put before every user turn."})
    data_format: str = field(
        default="auto", metadata={"help": "Causal LMs: text (packed blocks), messages (chat turns), prompt_completion, "
                                          "or auto (from the columns).", "choices": ["auto", *DATA_FORMATS]})
    truncation_side: str = field(
        default="right", metadata={"help": "Chat / prompt-completion rows longer than --max_length: keep the start "
                                           "('right' cuts the end) or the end ('left').", "choices": ["right", "left"]})
    packing: bool = field(
        default=False, metadata={"help": "Chat / prompt-completion rows: pack them into rows of --max_length tokens "
                                         "(attention kept within each conversation) instead of padding each batch."})
    label_column: str = field(default="label", metadata={"help": "Column holding the label (classification/regression)."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: str | None = field(
        default=None, metadata={"help": "Split to evaluate on; without it, --eval_fraction of the training split."}
    )
    eval_fraction: float = field(default=0.1, metadata={"help": "Held-out fraction when there is no --eval_split."})
    max_length: int = field(default=128, metadata={"help": "Truncation length (classification, regression, MLM, chat)."})
    block_size: int = field(default=128, metadata={"help": "Causal-LM text is packed into blocks of this length."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only this many training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only this many evaluation rows."})
    transfer_dataset: str | None = field(
        default=None, metadata={"help": "Classification: unlabelled rows (a local file or Hub dataset with the same "
                                        "text column(s)) trained on beside the labelled ones, with the teacher's soft "
                                        "targets only (Hinton's transfer set); the task loss counts labelled rows."})
    transfer_split: str = field(default="train", metadata={"help": "Split of --transfer_dataset to use."})
    max_transfer_samples: int | None = field(default=None, metadata={"help": "Keep only this many transfer rows."})

    def __post_init__(self) -> None:
        """Refuse sizes that cannot mean what they say (``max_length 0`` would silently disable truncation)."""
        for name in ("max_length", "block_size", "max_train_samples", "max_eval_samples", "max_transfer_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(
                    f"--{name} must be a positive number, got {value}"
                    + (" (omit it to keep every row)." if name.startswith("max_") and "samples" in name
                       else " (tokens per example; e.g. 128).")
                )
        check_choice("data_format", self.data_format, ("auto", *DATA_FORMATS))
        check_choice("truncation_side", self.truncation_side, ("right", "left"))
        if self.eval_split is None and not 0 < self.eval_fraction < 1:
            raise ValueError(f"--eval_fraction must lie in (0, 1), got {self.eval_fraction} (or give --eval_split).")
        if (self.completion_column or self.system_prompt is not None) and not self.prompt_column:
            raise ValueError("--completion_column and --system_prompt go with --prompt_column (the column of user "
                             "turns): give it too.")
        if self.prompt_column and self.text_column_2:
            raise ValueError("--prompt_column makes chat turns of plain columns, --text_column_2 plain "
                             "prompt-completion text: give one of them (for chat rows, --completion_column).")


def load_raw(dataset: str, dataset_config: str | None = None) -> datasets.DatasetDict:
    """A `DatasetDict` from a local file (by suffix; a folder loads like the Hub) or a Hub dataset name."""
    path = Path(dataset)
    if is_generations(path):  # a folder `hf-distill generate` wrote
        return datasets.DatasetDict({"train": load_generations(path)})
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
            problem = json_problem(path) if builder == "json" else None
            cause = " ".join(str(error.__cause__ or error).split())[:300]
            raise ValueError(f"Cannot read {path} as {builder}: {problem or cause}. Fix that row (or drop it) and run "
                             "again.") from error
        return loaded
    if path.exists() and path.is_dir():
        kind = folder_kind(path)
        if kind not in (None, "dataset"):
            hint = " (pass it as --teacher_cache, with the --dataset it was built from)" if kind == "teacher_cache" \
                else ""
            raise ValueError(f"Dataset folder {dataset!r} holds {FOLDER_KINDS[kind]}, not a dataset{hint}.")
        try:
            return datasets.load_from_disk(str(path))
        except Exception:
            return datasets.load_dataset(str(path), dataset_config)
    if path.suffix.lower() in LOCAL_FORMATS or str(dataset).startswith((".", "/")):
        raise FileNotFoundError(f"Dataset file {dataset!r} does not exist.")
    return datasets.load_dataset(dataset, dataset_config)


def json_problem(path: Path) -> str | None:
    """Where a JSON / JSON-lines file breaks: ``line N: <what>`` for the first line that does not parse, or whose
    object names a key twice (Arrow refuses both, naming only its own row count); None when every line parses."""
    import json

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:
            raise ValueError(f"the key(s) {twice} appear twice in one object")
        return dict(pairs)

    text = path.read_text(encoding="utf-8", errors="replace")
    whole = path.suffix.lower() == ".json" and text.lstrip().startswith("[")
    chunks = [(1, text)] if whole else [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    for number, chunk in chunks:
        try:
            json.loads(chunk, object_pairs_hook=no_duplicates)
        except json.JSONDecodeError as error:
            return f"line {number + error.lineno - 1}: {error.msg} (column {error.colno})"
        except ValueError as error:
            return f"line {number}: {error}"
    return None


@contextlib.contextmanager
def caches_outside(source: str | None) -> Iterator[None]:
    """`datasets` writes what `map`, `filter` and splits make beside the data's own Arrow files: into the user's
    folder for data saved on disk (a generations folder, a `save_to_disk` dataset), where a read-only folder fails
    and a writable one fills up. For such data caching is off inside (the results go to a temporary folder that
    `datasets` removes)."""
    if not source or not Path(source).is_dir() or not datasets.is_caching_enabled():
        yield
        return
    datasets.disable_caching()
    try:
        yield
    finally:
        datasets.enable_caching()


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


def _require_columns(dataset: datasets.Dataset, columns: list[str], flags: dict[str, str],
                     what: str = "the dataset") -> None:
    for column in columns:
        if column not in dataset.column_names:
            flag = flags.get(column, "--text_column")
            hint = (" (unlabelled data: set --task_weight 0 to learn from the teacher alone)"
                    if flag == "--label_column" else "")
            raise ValueError(
                f"Column {column!r} is not in {what} (columns: {dataset.column_names}); point {flag} at the "
                f"right one{hint}."
            )


@dataclass
class PreparedData:
    """Tokenised splits plus what the models need to know about the labels."""

    train: datasets.Dataset
    eval: datasets.Dataset
    num_labels: int | None = None
    id2label: dict[int, str] | None = None
    labels: "LabelPlan | None" = None  #: how the label values became class ids (classification)
    collator: Any = None  #: the collator the data needs (chat / prompt-completion rows); None: the task's default
    data_format: str | None = None  #: causal LMs: the format the rows were read as (`chat.DATA_FORMATS`)


def _text_columns(data: DataArguments) -> list[str]:
    """The text column, and the second of a pair when there is one."""
    return [data.text_column] + ([data.text_column_2] if data.text_column_2 else [])


def prepare_datasets(
    task: str, train: datasets.Dataset, held_out: datasets.Dataset, tokenizer: Any, data: DataArguments,
    teacher_labels: dict[int, str] | None = None, teacher_num_labels: int | None = None,
    require_labels: bool = True, prompts: bool = False, teacher_tokenizer: Any = None,
) -> PreparedData:
    """Tokenise both splits for `task` with the teacher's tokenizer.

    Classification labels become the teacher's class ids (`label_plan`: by name where the teacher names its labels
    (`teacher_labels`), integers by value, else the sorted names); without `require_labels` a split may have no label
    column (unlabelled transfer data); regression labels become floats; causal-LM text is concatenated and cut into `block_size` blocks (the collator makes labels);
    masked-LM text is truncated (the MLM collator masks and makes labels). `prompts`: prompt-only data is accepted
    (rows that count nothing, completed on-policy). `teacher_tokenizer` (a teacher of another tokenizer): chat rows
    also carry their prompt in the teacher's template (`with_teacher_prompts`).
    """
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; choose one of {', '.join(TASKS)}.")
    text_columns = _text_columns(data)
    flags = {data.text_column: "--text_column", data.label_column: "--label_column"}
    if data.text_column_2:
        flags[data.text_column_2] = "--text_column_2"
    labelled = task in ("sequence-classification", "regression") and require_labels
    if data.text_column_2 and task == "masked-lm":
        raise ValueError(
            f"--text_column_2 {data.text_column_2!r} pairs two texts for classification and regression; a {task} run "
            "would train on --text_column alone and silently drop it. For masked LMs put all the text in --text_column."
        )
    if task == "causal-lm":
        train, held_out = (as_turns(split, data) for split in (train, held_out))
        data_format = _lm_format(train, data)
        if data_format != "text":
            if teacher_tokenizer is not None:
                train, held_out = (with_teacher_prompts(split, teacher_tokenizer) for split in (train, held_out))
            return _chat_splits(train, held_out, tokenizer, data, data_format, prompts)
        text_columns = [data.text_column]
    for split in (train, held_out):
        _require_columns(split, text_columns + ([data.label_column] if labelled else []), flags)

    if task in ("causal-lm", "masked-lm"):
        return _language_model_splits(task, train, held_out, tokenizer, data)
    return _labelled_splits(task, train, held_out, tokenizer, data, text_columns, teacher_labels, teacher_num_labels)


def _language_model_splits(task: str, train: datasets.Dataset, held_out: datasets.Dataset, tokenizer: Any,
                           data: DataArguments) -> PreparedData:
    """Plain-text LM splits: causal-LM text concatenated and cut into `block_size` blocks, masked-LM text truncated
    (the collators make the labels); blank rows dropped."""
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
    return PreparedData(out[0], out[1], data_format="text" if task == "causal-lm" else None)


def _labelled_splits(task: str, train: datasets.Dataset, held_out: datasets.Dataset, tokenizer: Any,
                     data: DataArguments, text_columns: list[str], teacher_labels: dict[int, str] | None,
                     teacher_num_labels: int | None) -> PreparedData:
    """Classification and regression splits: one text or a pair, labels as the teacher's class ids (`label_plan`) or
    floats; a split without labels (unlabelled transfer data) keeps the teacher's label names."""
    num_labels, id2label, plan = None, None, None
    has_labels = data.label_column in train.column_names
    for name, split in (("training", train), ("held-out", held_out)):
        if data.label_column in split.column_names:
            check_label_values(split[data.label_column], data.label_column, task, name)
    if task == "regression":
        num_labels = 1
    elif has_labels:
        plan = label_plan(train, data.label_column, teacher_labels, teacher_num_labels)
        id2label, num_labels = plan.id2label, len(plan.id2label)
    elif teacher_labels is not None or teacher_num_labels:
        id2label = teacher_labels or {i: f"LABEL_{i}" for i in range(teacher_num_labels)}
        num_labels = len(id2label)

    def encode(batch):
        texts = [batch[c] for c in text_columns]
        encoded = tokenizer(*texts, truncation=True, max_length=data.max_length)
        if data.label_column not in batch:
            return encoded
        labels = batch[data.label_column]
        if task == "regression":
            encoded["labels"] = [float(v) for v in labels]
        else:
            encoded["labels"] = plan.ids(labels)
        return encoded

    prepared = [split.map(encode, batched=True, remove_columns=split.column_names) for split in (train, held_out)]
    return PreparedData(prepared[0], prepared[1], num_labels, id2label, plan)


def add_transfer_set(train: datasets.Dataset, transfer: datasets.Dataset, tokenizer: Any,
                     data: DataArguments) -> datasets.Dataset:
    """The tokenised training rows followed by the transfer set's rows, tokenised the same way with the label -100
    (unlabelled: the teacher's terms count them, the task loss does not; `accounting.labelled_mask`). Any label column
    of the transfer set is dropped: its rows are unlabelled by definition."""
    text_columns = _text_columns(data)
    flags = {c: "--text_column" if c == data.text_column else "--text_column_2" for c in text_columns}
    _require_columns(transfer, text_columns, flags, "the --transfer_dataset")
    if data.max_transfer_samples is not None:
        transfer = transfer.select(range(min(data.max_transfer_samples, len(transfer))))
    transfer = transfer.filter(lambda row: all(row[c] is not None and str(row[c]).strip() for c in text_columns))
    if not len(transfer):
        raise ValueError(f"--transfer_dataset has no row with text in {text_columns}: nothing to learn from.")

    def encode(batch):
        encoded = tokenizer(*[batch[c] for c in text_columns], truncation=True, max_length=data.max_length)
        encoded["labels"] = [IGNORE_INDEX] * len(batch[text_columns[0]])
        return encoded

    rows = transfer.map(encode, batched=True, remove_columns=transfer.column_names, desc="Tokenising transfer set")
    rows = rows.select_columns(train.column_names).cast(train.features)
    logger.warning("Transfer set: %d unlabelled rows beside %d labelled ones (soft targets only on them).", len(rows),
                   len(train))
    return datasets.concatenate_datasets([train, rows])


def as_turns(dataset: datasets.Dataset, data: DataArguments) -> datasets.Dataset:
    """With `--prompt_column`: plain text columns as chat turns, ``prompt`` = the system turn (`--system_prompt`)
    and a user turn with the column's text, and with `--completion_column` ``completion`` = the assistant's turn;
    the rows then read as prompt-only or prompt-completion data. Unchanged without the flag."""
    if not data.prompt_column:
        return dataset
    columns = [data.prompt_column] + ([data.completion_column] if data.completion_column else [])
    _require_columns(dataset, columns, {data.prompt_column: "--prompt_column",
                                        data.completion_column: "--completion_column"})
    system = [{"role": "system", "content": data.system_prompt}] if data.system_prompt is not None else []

    def turns(row: dict[str, Any]) -> dict[str, Any]:
        out = {"prompt": [*system, {"role": "user", "content": row[data.prompt_column]}]}
        if data.completion_column:
            out["completion"] = [{"role": "assistant", "content": row[data.completion_column]}]
        return out

    return dataset.map(turns, remove_columns=dataset.column_names, desc="Making chat turns")


def _lm_format(train: datasets.Dataset, data: DataArguments) -> str:
    """The format of causal-LM data: `--text_column_2` makes plain prompt-completion rows; else `--data_format`, or
    (auto) plain text when the text column is there, else what the columns say (`chat.detect_format`)."""
    if data.text_column_2:
        return "prompt_completion"
    if data.data_format != "auto":
        return data.data_format
    columns = train.column_names
    richer = "messages" in columns or {"prompt", "completion"} <= set(columns)
    if data.text_column in columns and richer:
        found = detect_rows_format(train)
        logger.warning("The data has both a %r column and %s: training on the %s rows (they say which tokens are "
                       "the answers); pass --data_format text to train on %r instead.", data.text_column,
                       "`messages`" if found == "messages" else "`prompt` / `completion`", found, data.text_column)
        return found
    return "text" if data.text_column in columns else detect_rows_format(train)


def with_teacher_prompts(dataset: datasets.Dataset, teacher_tokenizer: Any) -> datasets.Dataset:
    """Conversational rows with `chat.TEACHER_PROMPTS`: each row's prompt (the turns before its assistant answer)
    rendered with the teacher's tokenizer and chat template, for a teacher of another tokenizer, which then reads the
    conversation in its own format while the answer's text is aligned; other rows unchanged. A conversation with
    more than one assistant turn is refused (only the last answer could be aligned)."""
    data_format = detect_format(dataset.column_names)
    first = dataset[0] if len(dataset) else {}
    if data_format not in ("messages", "prompt_completion", "prompt_only") or isinstance(
            first.get("prompt", first.get("messages")), str):
        return dataset

    def render(row: dict[str, Any]) -> dict[str, list[int]]:
        turns = row["messages"] if "messages" in row else row["prompt"]
        answers = [i for i, turn in enumerate(turns) if turn["role"] == "assistant"]
        if len(answers) > 1:
            raise ValueError(f"A conversation with {len(answers)} assistant turns cannot be aligned to a teacher of "
                             "another tokenizer (each turn would need its own alignment): split it into one row per "
                             "answer, each with the turns before it as its prompt.")
        return {TEACHER_PROMPTS: prompt_ids(teacher_tokenizer, turns[: answers[0]] if answers else turns)}

    return dataset.map(render, desc="Rendering prompts for the teacher")


def _chat_splits(train: datasets.Dataset, held_out: datasets.Dataset, tokenizer: Any, data: DataArguments,
                 data_format: str, prompts: bool = False) -> PreparedData:
    """Both splits tokenised with completion-only labels (`chat.prepare_chat_dataset`), rows with an empty answer
    dropped (counted over both splits: `row_filters.drop_empty_answers`)."""
    named = []
    for split in (train, held_out):
        if data.text_column_2:  # plain prompt-completion in two named columns
            _require_columns(split, [data.text_column, data.text_column_2],
                             {data.text_column: "--text_column", data.text_column_2: "--text_column_2"})
            kind = split.features[data.text_column_2]
            if getattr(kind, "dtype", "string") not in ("string", "large_string"):
                raise ValueError(
                    f"--text_column_2 {data.text_column_2!r} is the completion of a causal-lm run, but it holds "
                    f"{getattr(kind, 'dtype', kind)} values, not text: point it at the column of completions."
                )
            split = split.select_columns([data.text_column, data.text_column_2]).rename_columns(
                {data.text_column: "prompt", data.text_column_2: "completion"})
        named.append(split)
    named = drop_empty_answers(named, data_format)
    splits = [prepare_chat_dataset(split, tokenizer, data.max_length, data_format, data.truncation_side,
                                   packing=data.packing, prompts=prompts, drop_empty=False) for split in named]
    (train_rows, collator), (eval_rows, _) = splits
    return PreparedData(train_rows, eval_rows, collator=collator, data_format=data_format)
