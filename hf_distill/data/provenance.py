"""What made a thing on disk, recorded and compared: the teacher's weights, the chat template, the data settings and
the rows themselves, for teacher caches, generations folders and checkpoints.

A teacher cache or a generations folder is only right for a run that would have made the same targets; a checkpoint
is only resumed by the run that wrote it. Each of them records what decides that (`modeling.weights_fingerprint`,
`template_record`, `data_record`, `content_fingerprint`), and the run that reads it compares (`differences`) and
refuses a mismatch before training, naming each field with both values.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from transformers import TrainerCallback
from transformers.utils import logging

from ..modeling import text_config, unwrap

logger = logging.get_logger(__name__)

#: The file a checkpoint's run record is saved in (`RunRecordCallback`).
RUN_RECORD_FILE = "hf_distill_run.json"
#: The data flags that decide which rows a run trains on and how they are tokenised.
DATA_FIELDS: tuple[str, ...] = (
    "dataset", "dataset_config", "data_format", "text_column", "text_column_2", "label_column", "train_split",
    "eval_split", "eval_fraction", "max_train_samples", "max_length", "block_size", "truncation_side", "packing",
    "transfer_dataset", "max_transfer_samples", "seed",
)
#: Of those, where the rows come from: compared through the rows themselves (`content_fingerprint`), so a data file
#: that moved, or a relative path given absolute, is the same data.
SOURCE_FIELDS: tuple[str, ...] = ("dataset", "dataset_config", "transfer_dataset")
#: Config entries that give a student's shape.
SHAPE_FIELDS: tuple[str, ...] = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size",
                                 "num_attention_heads", "num_key_value_heads", "vocab_size", "num_labels")


def template_record(tokenizer: Any) -> dict[str, str | None]:
    """The chat template (``sha256`` of its text, 16 hex characters) and the token that ends an assistant turn with it:
    what rendered conversational rows depend on beyond the vocabulary. None for a tokenizer without a template."""
    from .chat import end_of_turn_id

    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or not template:
        return {"chat_template": None, "end_of_turn": None}
    try:
        end = end_of_turn_id(tokenizer)
    except ValueError:  # a template that cannot render the probe conversation
        end = None
    return {"chat_template": hashlib.sha256(template.encode()).hexdigest()[:16],
            "end_of_turn": tokenizer.convert_ids_to_tokens(end) if end is not None else None}


def data_record(data_args: Any, seed: int) -> dict[str, Any]:
    """The data flags of `DATA_FIELDS` (`data_args`: `DataArguments`), the seed that draws the held-out split among
    them; `eval_fraction` only counts without an `eval_split`."""
    record = {name: getattr(data_args, name, None) for name in DATA_FIELDS if name != "seed"}
    record["seed"] = seed
    if record.get("eval_split") is not None:
        record["eval_fraction"] = None
    return record


#: Rows read at a time by `id_batches` (so a large dataset is never materialised whole).
BATCH_ROWS = 8192


def id_batches(dataset: Any, column: str = "input_ids") -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The rows of a list column in order, `BATCH_ROWS` at a time, as (row lengths, all their values as int64):
    read through Arrow, following any indices mapping (`select`, `shuffle`)."""
    import pyarrow as pa

    arrow = dataset.with_format("arrow")
    for start in range(0, len(dataset), BATCH_ROWS):
        values = arrow[start: start + BATCH_ROWS][column]
        values = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
        yield np.diff(np.asarray(values.offsets, dtype=np.int64)), np.asarray(values.flatten(), dtype=np.int64)


def content_fingerprint(dataset: Any, column: str = "input_ids") -> str | None:
    """``sha256`` of the rows' token ids in order (each row's ids as int64 and the row lengths): equal for the same
    rows whatever their integer type or storage; None for data without `column` or that is not a `datasets.Dataset`."""
    if not hasattr(dataset, "__len__") or column not in (getattr(dataset, "column_names", None) or ()):
        return None  # (a streamed or torch dataset: not fingerprinted)
    lengths_digest, values_digest = hashlib.sha256(str(len(dataset)).encode()), hashlib.sha256()
    for lengths, values in id_batches(dataset, column):  # two streams: the same digest however the rows are read
        lengths_digest.update(lengths.tobytes())
        values_digest.update(values.tobytes())
    return hashlib.sha256(lengths_digest.digest() + values_digest.digest()).hexdigest()[:16]


#: The kinds of folder `folder_kind` tells apart, in words for messages.
FOLDER_KINDS: dict[str, str] = {
    "generations": "generations (written by `hf-distill generate`)",
    "teacher_cache": "a teacher cache (written by `hf-distill cache-teacher`)",
    "model": "a model",
    "checkpoints": "a training run's checkpoints",
    "dataset": "a saved dataset",
}


def folder_kind(path: str | os.PathLike) -> str | None:
    """What a local folder holds, from its marker files: a key of `FOLDER_KINDS` (generations, a teacher cache, a
    model, a training run's checkpoints, a saved dataset), or None for anything else (or no folder)."""
    folder = Path(path)
    if not folder.is_dir():
        return None
    manifest = folder / "manifest.json"
    if manifest.is_file():
        kind = json.loads(manifest.read_text()).get("kind")
        if kind == "hf_distill.generations":
            return "generations"
        if kind is None:
            return "teacher_cache"
    if (folder / "config.json").is_file() or (folder / "adapter_config.json").is_file():
        return "model"
    if any(folder.glob("checkpoint-*")):
        return "checkpoints"
    if (folder / "dataset_dict.json").is_file() or (folder / "dataset_info.json").is_file():
        return "dataset"
    return None


def differences(recorded: Mapping[str, Any], current: Mapping[str, Any], fields: Any = None) -> list[str]:
    """``"field: recorded A, this run B"`` for every field of `fields` (default: those of `current`) both record and
    whose values differ; a field the older record lacks is not compared."""
    out = []
    for name in fields if fields is not None else current:
        if name in recorded and name in current and _plain(recorded[name]) != _plain(current[name]):
            out.append(f"{name}: {recorded[name]!r} there, {current[name]!r} in this run")
    return out


def _plain(value: Any) -> Any:
    """JSON's view of a value (tuples are lists, ints in floats compare equal): how a record reads back."""
    return json.loads(json.dumps(value, default=str))


def flags_for(fields_and_values: list[tuple[str, Any]]) -> str:
    """The command-line flags that set these data fields to the recorded values, e.g. ``--max_length 20`` (``without
    --max_train_samples`` for a value that was not set)."""
    shown = []
    for name, value in fields_and_values:
        if value is None:
            shown.append(f"without --{name}")
        else:
            shown.append(f"--{name} {str(value).lower() if isinstance(value, bool) else value}")
    return " ".join(shown)


# ---- checkpoints: what a resumed run must share with the run that wrote them ------------------------------------


def student_shape(model: torch.nn.Module) -> dict[str, Any]:
    """The student's shape: `SHAPE_FIELDS` of its config (those it has) and its number of parameters."""
    model = unwrap(model)
    text = text_config(model)
    shape = {k: getattr(text, k, None) for k in SHAPE_FIELDS if getattr(text, k, None) is not None}
    shape["parameters"] = sum(p.numel() for p in model.parameters())
    return shape


def run_record(trainer: Any) -> dict[str, Any]:
    """What gives a run its meaning (`trainer`: a `DistillationTrainer`): the loss and its settings, every weight,
    the on-policy share, the training rows (`content_fingerprint`) and the student's shape."""
    args = trainer.args
    settings = {name: getattr(args, name) for name in ("logits_loss", "temperature", "jsd_beta", "lmbda", "seq_kd",
                                                       "layer_map", "hidden_loss", "ensemble")
                if hasattr(args, name)}
    return {"settings": {**settings, **args.loss_weights}, "data": content_fingerprint(trainer.train_dataset),
            "student": student_shape(trainer.model)}


class RunRecordCallback(TrainerCallback):
    """Writes `run_record` into every checkpoint folder (`RUN_RECORD_FILE`), read back by `check_resume`."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.record: dict[str, Any] | None = None

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not args.should_save:
            return
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if folder.is_dir():
            (folder / RUN_RECORD_FILE).write_text(json.dumps(_current_record(self.trainer), indent=2, default=str))


def _current_record(trainer: Any) -> dict[str, Any]:
    """`run_record` of `trainer`, kept by its `RunRecordCallback` so the training rows are read once (at a resume
    and for every checkpoint)."""
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, RunRecordCallback):
            callback.record = callback.record or run_record(trainer)
            return callback.record
    return run_record(trainer)


def check_resume(trainer: Any, checkpoint: str | bool | None) -> None:
    """A resumed run must be the run its checkpoint came from: the loss, temperature, weights, training rows and
    student shape recorded in the checkpoint (`RUN_RECORD_FILE`) are compared with this run's, and any difference is
    refused before training, each named with both values, unless ``args.resume_with_changes`` (then logged)."""
    if not checkpoint:
        return
    if checkpoint is True:
        from transformers.trainer_utils import get_last_checkpoint

        checkpoint = get_last_checkpoint(trainer.args.output_dir) if os.path.isdir(trainer.args.output_dir) else None
        if checkpoint is None:
            return  # the Trainer says there is nothing to resume
    file = Path(checkpoint) / RUN_RECORD_FILE
    if not file.is_file():
        logger.warning("Checkpoint %s has no %s (written by an older hf_distill or another trainer): its settings "
                       "cannot be compared with this run's.", checkpoint, RUN_RECORD_FILE)
        return
    recorded, current = json.loads(file.read_text()), _current_record(trainer)
    found = differences(recorded.get("settings", {}), current["settings"])
    if recorded.get("data") and current["data"] and recorded["data"] != current["data"]:
        found.append(f"training rows: other rows there (fingerprint {recorded['data']}) than in this run "
                     f"({current['data']})")
    found += [f"student {d}" for d in differences(recorded.get("student", {}), current["student"])]
    if not found:
        return
    if getattr(trainer.args, "resume_with_changes", False):
        logger.warning("Resuming %s with changes (resume_with_changes): %s.", checkpoint, "; ".join(found))
        if getattr(trainer, "card_info", None) is not None:  # the card says so, not only the new settings
            trainer.card_info.resumed_with = f"`{Path(checkpoint).name}` with changes: {'; '.join(found)}"
        return
    shape = any(item.startswith("student ") for item in found)
    raise ValueError(
        f"Resuming {checkpoint} with other settings than the run that wrote it: {'; '.join(found)}. "
        + ("A student of another shape cannot take the checkpoint's weights: resume with the same student. "
           if shape else "")
        + "Resume with the checkpoint's settings, start a new run in another output_dir, or pass "
        "--resume_with_changes true (DistillationConfig(resume_with_changes=True)) to continue with the changes."
    )
