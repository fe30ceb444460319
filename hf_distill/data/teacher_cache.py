"""The offline teacher cache: the tokenised training set plus, for every counted position, the teacher's top-k
log-probabilities and the log of the mass outside them, so a student can be distilled without the teacher in memory.

Layout: shards ``output_dir/shard-00000/`` ... (each a `datasets.Dataset` saved with ``save_to_disk``: the rows of
the training set, every original column kept, plus `CACHE_COLUMNS`) and ``output_dir/manifest.json`` (the settings,
the shards written so far, whether the cache is complete). Per example, over its n counted positions (the trainer's
`position_mask`, in increasing order) the cache columns are flat lists: ``n * k`` int32 ids (top-k, most probable
first, position-major), ``n * k`` float16 ``log softmax(z / T)`` at those ids, and ``n`` float32 tail log-masses, i.e.
``6k + 4`` bytes per counted token (196 B at k = 32) plus Arrow's per-row offsets.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import datasets
import numpy as np
import pyarrow as pa
import torch
from torch import nn

from ..modeling import (
    accepts_input,
    declared_output_size,
    model_inputs,
    output_logits,
    unwrap,
    weights_fingerprint,
)
from ..positions import infer_position_unit, position_mask
from ..storage.files import PARTIAL_SUFFIX, atomic_path, atomic_write_bytes

#: The columns a cache adds to each row: top-k ids, their log-probabilities, the log of the remaining mass.
CACHE_COLUMNS: tuple[str, str, str] = ("teacher_topk_ids", "teacher_topk_logprobs", "teacher_tail_logprob")
CACHE_FORMAT_VERSION = 1
#: Prefix of the manifest JSON in a loaded cache's ``info.description`` (read back by `cache_manifest`).
MANIFEST_MARKER = "hf_distill.teacher_cache:"
MANIFEST_FILE = "manifest.json"
CACHE_FEATURES = datasets.Features({
    CACHE_COLUMNS[0]: datasets.Sequence(datasets.Value("int32")),
    CACHE_COLUMNS[1]: datasets.Sequence(datasets.Value("float16")),
    CACHE_COLUMNS[2]: datasets.Sequence(datasets.Value("float32")),
})
#: Manifest entries that must be equal for a build to continue an existing cache.
SETTINGS: tuple[str, ...] = ("format_version", "teacher_id", "tokenizer_hash", "vocab_size", "top_k", "temperature",
                             "dataset_fingerprint", "num_examples", "shard_size", "teacher_weights")
#: Elements of one ``[rows, vocab]`` float32 block of log-probabilities (256 MB): rows = 2**26 // vocab.
BLOCK_ELEMENTS = 2**26


def tokenizer_hash(tokenizer: Any) -> str:
    """``sha256(json.dumps(tokenizer.get_vocab(), sort_keys=True))`` as hex: equal for tokenizers mapping the same
    tokens to the same ids, whatever their class (slow / fast)."""
    vocab = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(vocab.encode("utf-8")).hexdigest()


def cache_settings(teacher_id: str | None, tokenizer_digest: str | None, vocab_size: int, top_k: int,
                   temperature: float) -> dict[str, Any]:
    """What a cache's targets mean, as its manifest records it (and `teachers.CachedTeacher` checks): the format, the
    teacher, its tokenizer's hash, its number of outputs, k and the temperature of ``log softmax(z / T)``."""
    return {"format_version": CACHE_FORMAT_VERSION, "teacher_id": teacher_id, "tokenizer_hash": tokenizer_digest,
            "vocab_size": vocab_size, "top_k": top_k, "temperature": float(temperature)}


def topk_targets(logits: torch.Tensor, top_k: int, temperature: float) -> tuple[torch.Tensor, ...]:
    """For rows of logits ``z`` ``[N, V]``: ids of the k largest ``p = softmax(z / T)`` (most probable first),
    ``log p`` at them, and the tail ``log sum_{j not in top k} p_j = logsumexp_{j not in top k} log p_j``.

    Returns int32 ``[N, k]``, float32 ``[N, k]``, float32 ``[N]`` (on the logits' device), in blocks of rows so no
    more than `BLOCK_ELEMENTS` float32 log-probabilities exist at once.
    """
    rows = max(1, BLOCK_ELEMENTS // max(int(logits.shape[-1]), 1))
    ids, values, tails = [], [], []
    for start in range(0, logits.shape[0], rows):
        log_probs = torch.log_softmax(logits[start: start + rows].float() / temperature, dim=-1)
        top_values, top_ids = log_probs.topk(top_k, dim=-1, sorted=True)
        tail = log_probs.scatter_(-1, top_ids, float("-inf")).logsumexp(dim=-1)
        ids.append(top_ids.to(torch.int32))
        values.append(top_values)
        tails.append(tail)
    if not ids:
        empty = logits.new_zeros((0, top_k), dtype=torch.float32)
        return empty.to(torch.int32), empty, logits.new_zeros(0, dtype=torch.float32)
    return torch.cat(ids), torch.cat(values), torch.cat(tails)


def _teacher_id(teacher_model: nn.Module, teacher_id: str | None) -> str | None:
    return teacher_id or getattr(getattr(unwrap(teacher_model), "config", None), "_name_or_path", None) or None


def _collatable(teacher_model: nn.Module, label_name: str) -> Callable[[Mapping[str, Any]], dict[str, Any]]:
    """What of a row goes to the collator: like the Trainer's `remove_unused_columns`, the teacher's forward
    arguments and the labels (every column when the forward takes ``**kwargs``)."""
    keep = {label_name: True, "label": True, "label_ids": True}

    def select(row: Mapping[str, Any]) -> dict[str, Any]:
        for key in row:
            if key not in keep:
                keep[key] = accepts_input(teacher_model, key)
        return {k: v for k, v in row.items() if keep[k]}

    return select


def _device_of(model: nn.Module) -> torch.device:
    parameter = next(iter(model.parameters()), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@torch.no_grad()
def _batch_targets(teacher_model: nn.Module, batch: Mapping[str, Any], label_name: str, top_k: int,
                   temperature: float, device: torch.device
                   ) -> tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example counted-position numbers and the top-k targets (log-probabilities in float16, as stored) of one
    collated batch, rows in ``logits[mask]`` order (example by example, positions increasing)."""
    unit = infer_position_unit(teacher_model, batch, label_name)
    mask = position_mask(batch, unit, label_name)
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    logits = output_logits(teacher_model(**model_inputs(teacher_model, inputs, drop=("labels", label_name))))
    mask = mask.to(logits.device)
    if logits.shape[: mask.dim()] != mask.shape:
        raise ValueError(
            f"The teacher's logits {tuple(logits.shape)} do not line up with the counted positions "
            f"{tuple(mask.shape)} ({unit.value} unit): cache a model whose outputs have one row per position."
        )
    counts = mask.reshape(mask.shape[0], -1).sum(dim=1).tolist()
    ids, log_probs, tail = topk_targets(logits[mask], top_k, temperature)
    return counts, ids.cpu(), log_probs.to(torch.float16).cpu(), tail.cpu()  # (stored as float16)


def _output_width(teacher_model: nn.Module, first_batch: Mapping[str, Any], label_name: str,
                  device: torch.device) -> int:
    """The teacher's number of outputs: as its config declares, else from one forward pass."""
    unit = infer_position_unit(teacher_model, first_batch, label_name)
    declared = declared_output_size(teacher_model, unit)
    if declared is not None:
        return declared
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in first_batch.items()}
    with torch.no_grad():
        logits = output_logits(teacher_model(**model_inputs(teacher_model, inputs, drop=("labels", label_name))))
    return int(logits.shape[-1])


def _list_column(values: np.ndarray, lengths: Sequence[int], arrow_type: pa.DataType) -> pa.Array:
    offsets = np.concatenate([[0], np.cumsum(np.asarray(lengths, dtype=np.int64))])
    if offsets[-1] >= 2**31:
        raise ValueError(f"A shard holds {offsets[-1]} cache values, over Arrow's 2**31 per list column: lower "
                         "shard_size.")
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, type=arrow_type))


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No `datasets` progress bars inside (the build shows its own)."""
    from datasets.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    was_enabled = not are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            enable_progress_bars()


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write `payload` to `path` atomically (`atomic_path`)."""
    atomic_write_bytes(path, json.dumps(payload, indent=2).encode())


def read_cache_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of the cache in folder `path` (``path/manifest.json``)."""
    file = Path(path) / MANIFEST_FILE
    if not file.is_file():
        raise FileNotFoundError(
            f"{path} is no teacher cache (it has no {MANIFEST_FILE}): build one with `hf-distill cache-teacher`."
        )
    return json.loads(file.read_text())


def check_not_generations(folder: str | os.PathLike) -> None:
    """A cache is built into a new folder or its own: a generations folder (`hf-distill generate`) is named as such."""
    file = Path(folder) / MANIFEST_FILE
    if file.is_file() and json.loads(file.read_text()).get("kind") is not None:
        raise ValueError(f"--output_dir {folder} holds generations (written by `hf-distill generate`), not a teacher "
                         "cache: give cache-teacher a new --output_dir.")


def _check_same_settings(existing: dict[str, Any], wanted: dict[str, Any], output_dir: Path) -> None:
    differing = [f"{key}: cache {existing.get(key)!r}, this run {wanted[key]!r}"
                 for key in SETTINGS if existing.get(key) != wanted[key]]
    if differing:
        raise ValueError(
            f"{output_dir} holds a teacher cache made with other settings ({'; '.join(differing)}). Build this one "
            "into another output_dir (the existing cache is left untouched), or rerun with the cache's settings to "
            "finish it."
        )


def build_teacher_cache(
    teacher_model: nn.Module,
    dataset: datasets.Dataset,
    output_dir: str | os.PathLike,
    *,
    tokenizer: Any = None,
    top_k: int = 32,
    temperature: float = 1.0,
    batch_size: int = 8,
    shard_size: int = 1024,
    data_collator: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None,
    teacher_id: str | None = None,
    label_name: str = "labels",
    progress: bool = True,
    provenance: dict[str, Any] | None = None,
) -> str:
    """Run the teacher over `dataset` (in order) and store, per counted position, the top-k ``log softmax(z / T)``
    and the tail ``log sum_{j not in top k} softmax(z / T)_j``; returns `output_dir`.

    Positions are counted as the trainer does (the collator's batch, `infer_position_unit`, `position_mask`), so the
    cache lines up with training on the same rows and collator. Written shard by shard (`shard_size` rows each, saved
    as ``shard-NNNNN.partial`` and renamed when whole) with the manifest rewritten after each: an interrupted build
    resumes from the next shard when rerun with the same settings; a complete cache is returned at once. The
    manifest records the teacher's `modeling.weights_fingerprint` and, with `provenance`, what else made the
    targets (the command line's data flags and chat template), which the run that reads the cache compares.
    """
    from tqdm.auto import tqdm

    _check_cache_settings(top_k, temperature, batch_size, shard_size, len(dataset))
    output = Path(output_dir)
    device = _device_of(teacher_model)
    collate = _row_collator(dataset, data_collator, tokenizer, _collatable(teacher_model, label_name))
    vocab_size = _output_width(teacher_model, collate(0, min(batch_size, len(dataset))), label_name, device)
    manifest = _new_manifest(teacher_model, teacher_id, tokenizer, dataset, vocab_size, top_k, temperature, shard_size,
                             provenance)
    if _resume_or_start(output, manifest):
        return str(output)

    done = sum(int(shard["num_examples"]) for shard in manifest["shards"])
    teacher_was_training = teacher_model.training
    teacher_model.eval()
    bar = tqdm(total=len(dataset), initial=done, disable=not progress, desc="caching teacher", unit="ex")
    try:
        while done < len(dataset):
            start, end = done, min(done + shard_size, len(dataset))
            counts, columns = [], ([], [], [])  # (per row: counted positions; per batch: ids, log-probs, tails)
            for batch_start in range(start, end, batch_size):
                batch_end = min(batch_start + batch_size, end)
                c, *targets = _batch_targets(teacher_model, collate(batch_start, batch_end), label_name, top_k,
                                             temperature, device)
                counts += c
                for column, values in zip(columns, targets):
                    column.append(values.reshape(-1).numpy())
                bar.update(batch_end - batch_start)
            name = f"shard-{len(manifest['shards']):05d}"
            _save_shard(dataset, start, end, columns, counts, top_k, output / name)
            manifest["shards"].append({"name": name, "num_examples": end - start, "num_positions": sum(counts)})
            manifest["counted_positions"] += sum(counts)
            done = end
            manifest["complete"] = done == len(dataset)
            _write_json(output / MANIFEST_FILE, manifest)
    finally:
        bar.close()
        teacher_model.train(teacher_was_training)
    return str(output)


def _row_collator(dataset: datasets.Dataset, data_collator: Callable | None, tokenizer: Any,
                  select: Callable[[Mapping[str, Any]], dict[str, Any]]) -> Callable[[int, int], dict[str, Any]]:
    """``collate(start, end)``: rows ``start:end`` of `dataset` as the Trainer's dataloader gives them (python rows,
    the model's columns), through `data_collator` (default: causal-LM padding with `tokenizer`, else stacking)."""
    from transformers import DataCollatorForLanguageModeling, default_data_collator

    if data_collator is None:
        data_collator = (DataCollatorForLanguageModeling(tokenizer, mlm=False) if tokenizer is not None
                         else default_data_collator)
    rows = dataset.with_format(None)

    def collate(start: int, end: int) -> dict[str, Any]:
        columns = rows[start:end]
        return data_collator([select(dict(zip(columns, values))) for values in zip(*columns.values())])

    return collate


def _new_manifest(teacher_model: nn.Module, teacher_id: str | None, tokenizer: Any, dataset: datasets.Dataset,
                  vocab_size: int, top_k: int, temperature: float, shard_size: int,
                  provenance: dict[str, Any] | None) -> dict[str, Any]:
    """The manifest of a cache about to be built (no shard yet); `top_k` checked against the teacher's width."""
    if top_k >= vocab_size:
        raise ValueError(
            f"top_k={top_k} must be smaller than the teacher's {vocab_size} outputs (the tail is the mass outside the "
            f"top k): pass a smaller top_k, e.g. {min(32, max(1, vocab_size - 1))}."
        )
    return {
        **cache_settings(_teacher_id(teacher_model, teacher_id),
                         tokenizer_hash(tokenizer) if tokenizer is not None else None, vocab_size, top_k, temperature),
        "dataset_fingerprint": getattr(dataset, "_fingerprint", None),
        "teacher_weights": weights_fingerprint(teacher_model),
        **(provenance or {}),
        "num_examples": len(dataset),
        "shard_size": shard_size,
        "shards": [],
        "complete": False,
        "counted_positions": 0,
    }


def _check_cache_settings(top_k: int, temperature: float, batch_size: int, shard_size: int, rows: int) -> None:
    """The settings of `build_teacher_cache`, checked before the teacher runs."""
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}: pass e.g. top_k=32.")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}: pass the distillation temperature, e.g. 1.0.")
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size} and {shard_size}.")
    if rows == 0:
        raise ValueError("The dataset is empty: there is nothing to cache.")


def _resume_or_start(output: Path, manifest: dict[str, Any]) -> bool:
    """Open the cache folder: an earlier build with the same settings lends its whole shards to `manifest` (its
    half-written or unrecorded shards are removed), a foreign non-empty folder is refused, a new one is made; the
    manifest is written. Returns whether the cache is already complete."""
    manifest_file = output / MANIFEST_FILE
    if manifest_file.is_file():
        check_not_generations(output)
        existing = read_cache_manifest(output)
        _check_same_settings(existing, manifest, output)
        manifest["shards"] = existing.get("shards", [])
        for shard in manifest["shards"]:
            if not (output / shard["name"]).is_dir():
                raise ValueError(
                    f"{output} lists shard {shard['name']} in its manifest but the folder is gone: the cache is "
                    "damaged; build it again into a new output_dir."
                )
        if existing.get("complete"):
            return True
        listed = {shard["name"] for shard in manifest["shards"]}
        for leftover in output.iterdir():  # half-written shards, and whole ones the manifest did not record yet
            if leftover.name.endswith(PARTIAL_SUFFIX) or (leftover.name.startswith("shard-") and
                                                            leftover.name not in listed):
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    elif output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ValueError(
            f"{output} exists and is not an (empty) teacher-cache folder (no {MANIFEST_FILE}); refusing to write "
            "into it: pass a new or empty output_dir."
        )
    output.mkdir(parents=True, exist_ok=True)
    manifest["counted_positions"] = sum(int(shard["num_positions"]) for shard in manifest["shards"])
    _write_json(manifest_file, manifest)
    return False


def _save_shard(dataset: datasets.Dataset, start: int, end: int, columns: tuple[list, list, list], counts: list[int],
                top_k: int, path: Path) -> None:
    """Rows ``start:end`` of `dataset` with their top-k ids, log-probabilities and tails (flat per batch, `counts`
    positions a row), saved whole under `path` (written beside, then renamed)."""
    table = dataset.with_format("arrow")[start:end]
    lengths = [n * top_k for n in counts]
    for column, values, sizes, arrow_type in (
        (CACHE_COLUMNS[0], columns[0], lengths, pa.int32()), (CACHE_COLUMNS[1], columns[1], lengths, pa.float16()),
        (CACHE_COLUMNS[2], columns[2], counts, pa.float32()),
    ):
        table = table.append_column(column, _list_column(np.concatenate(values), sizes, arrow_type))
    features = datasets.Features({**dataset.features, **CACHE_FEATURES})
    shard = datasets.Dataset(datasets.table.InMemoryTable(table), info=datasets.DatasetInfo(features=features))
    with _quiet_datasets(), atomic_path(path) as partial:
        shard.save_to_disk(partial)


def load_teacher_cache(path: str | os.PathLike, tokenizer: Any = None) -> datasets.Dataset:
    """The cache in folder `path` as one memory-mapped `datasets.Dataset` (the shards concatenated, nothing copied),
    its manifest kept in ``info.description`` (see `cache_manifest`). With `tokenizer`, checks it is the cache's."""
    manifest = read_cache_manifest(path)
    if manifest.get("format_version") != CACHE_FORMAT_VERSION:
        raise ValueError(
            f"{path} is a teacher cache of format {manifest.get('format_version')}, this hf_distill reads format "
            f"{CACHE_FORMAT_VERSION}: rebuild it with this version's `hf-distill cache-teacher`."
        )
    if not manifest.get("complete"):
        written = sum(int(shard["num_examples"]) for shard in manifest.get("shards", []))
        raise ValueError(
            f"The teacher cache in {path} is incomplete ({written} of {manifest.get('num_examples')} examples): "
            "rerun cache-teacher with the same arguments to finish it."
        )
    if tokenizer is not None and manifest.get("tokenizer_hash") not in (None, tokenizer_hash(tokenizer)):
        raise ValueError(
            f"The teacher cache in {path} was made for another tokenizer (teacher {manifest.get('teacher_id')!r}): "
            "its token ids would mean other tokens. Rebuild the cache with the student's tokenizer."
        )
    shards = [_load_shard(Path(path) / shard["name"]) for shard in manifest["shards"]]
    dataset = shards[0] if len(shards) == 1 else datasets.concatenate_datasets(shards)
    dataset.info.description = MANIFEST_MARKER + json.dumps(manifest)
    return dataset


def _load_shard(folder: Path) -> datasets.Dataset:
    """One shard of the cache (a truncated or corrupt file is named, not left to a raw Arrow error)."""
    try:
        shard = datasets.load_from_disk(str(folder))
        shard.data.table.validate()
        return shard
    except Exception as error:
        files = sorted(str(f) for f in folder.glob("*.arrow")) or [str(folder)]
        raise ValueError(
            f"The teacher cache shard {', '.join(files)} cannot be read ({' '.join(str(error).split())[:200]}): it is "
            "truncated or corrupt. Rebuild the cache with `hf-distill cache-teacher` into a new --output_dir."
        ) from error


def cache_size(path: str | os.PathLike, dataset: datasets.Dataset | None = None) -> dict[str, int]:
    """What the cache in folder `path` costs: ``bytes_on_disk`` (every file), ``teacher_bytes`` (the arrow buffers of
    the `CACHE_COLUMNS`, values and row offsets; ``ListArray.nbytes`` undercounts the offsets) and
    ``counted_positions``. `dataset`: the loaded cache, to avoid loading it again."""
    dataset = load_teacher_cache(path) if dataset is None else dataset
    teacher_bytes = sum(buffer.size for name in CACHE_COLUMNS for chunk in dataset.data.table.column(name).chunks
                        for buffer in chunk.buffers() if buffer is not None)
    return {
        "bytes_on_disk": sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()),
        "teacher_bytes": teacher_bytes,
        "counted_positions": int(read_cache_manifest(path)["counted_positions"]),
    }


def cache_manifest(dataset: Any) -> dict[str, Any] | None:
    """The manifest a loaded teacher cache carries in ``info.description``; None for any other dataset."""
    description = getattr(getattr(dataset, "info", None), "description", None)
    if not isinstance(description, str) or not description.startswith(MANIFEST_MARKER):
        return None
    return json.loads(description[len(MANIFEST_MARKER):])

