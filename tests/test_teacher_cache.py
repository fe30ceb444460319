"""The offline top-k teacher cache: stored values against an independent computation, the trainer's counted positions,
6k + 4 bytes per position, resume after an interruption, refusals with the fix named, the collator, the command line."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import shutil
from pathlib import Path

import datasets
import pytest
import torch
from transformers import BertTokenizer, LlamaConfig, LlamaForCausalLM

from hf_distill.data.teacher_cache import (
    CACHE_COLUMNS,
    MANIFEST_MARKER,
    build_teacher_cache,
    cache_manifest,
    load_teacher_cache,
    read_cache_manifest,
    tokenizer_hash,
)
from hf_distill.positions import infer_position_unit, position_mask
from hf_distill.teachers.cached import TeacherCacheCollator

from .conftest import next_token_counted

VOCAB = 64
TOP_K = 5
TEMPERATURE = 2.0
#: Per example: (length, prompt tokens labelled -100, supervised tokens at the end labelled -100).
SHAPES = [(5, 0, 0), (9, 2, 0), (3, 1, 1), (12, 4, 2), (7, 0, 0), (2, 2, 0), (10, 3, 0)]


def tiny_teacher(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=32, max_position_embeddings=32)
    teacher = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # spread-out logits: a peaked distribution and no near-ties in the top k
        teacher.lm_head.weight.normal_(0.0, 1.0)
    return teacher


def ragged_dataset() -> datasets.Dataset:
    g = torch.Generator().manual_seed(3)
    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    for length, prompt, end in SHAPES:
        ids = torch.randint(1, VOCAB, (length,), generator=g).tolist()
        labels = [-100] * prompt + ids[prompt: length - end] + [-100] * end
        rows["input_ids"].append(ids), rows["attention_mask"].append([1] * length), rows["labels"].append(labels)
    return datasets.Dataset.from_dict(rows)


def pad_collator(features: list[dict]) -> dict[str, torch.Tensor]:
    """Right padding: ids 0, attention 0, labels -100 (the padding never counts)."""
    width = max(len(f["input_ids"]) for f in features)
    batch = {}
    for key, fill in (("input_ids", 0), ("attention_mask", 0), ("labels", -100)):
        batch[key] = torch.tensor([list(f[key]) + [fill] * (width - len(f[key])) for f in features])
    return batch


def build(teacher, dataset, path, **kwargs):
    settings = dict(top_k=TOP_K, temperature=TEMPERATURE, batch_size=3, shard_size=4, data_collator=pad_collator,
                    progress=False)
    return build_teacher_cache(teacher, dataset, path, **{**settings, **kwargs})


@contextlib.contextmanager
def failing_forward(model, at_call: int):
    """`model` raises on its `at_call`-th forward (a killed job); counts the calls in ``calls[0]``."""
    original, calls = model.forward, [0]

    @functools.wraps(original)
    def forward(*args, **kwargs):
        calls[0] += 1
        if calls[0] == at_call:
            raise RuntimeError("killed")
        return original(*args, **kwargs)

    model.forward = forward
    try:
        yield calls
    finally:
        del model.forward


@pytest.fixture(scope="module")
def teacher():
    return tiny_teacher()


@pytest.fixture(scope="module")
def dataset():
    return ragged_dataset()


@pytest.fixture(scope="module")
def cache(teacher, dataset, tmp_path_factory):
    return load_teacher_cache(build(teacher, dataset, tmp_path_factory.mktemp("cache") / "c"))


def _tokenizer(folder, words):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]))
    return BertTokenizer(str(folder / "vocab.txt"))


# ---- the values ---------------------------------------------------------------------------------------------------


def test_stored_targets_equal_an_independent_computation(teacher, dataset, cache):
    assert cache.column_names == [*dataset.column_names, *CACHE_COLUMNS]
    for i in range(len(dataset)):
        row = cache[i]
        for column in dataset.column_names:
            assert row[column] == dataset[i][column]
        ids_in = torch.tensor([row["input_ids"]])
        counted = next_token_counted(torch.tensor([row["labels"]]))[0]
        with torch.no_grad():  # the example alone, unpadded
            logits = teacher(input_ids=ids_in).logits[0].double()
        log_p = torch.log_softmax(logits / TEMPERATURE, dim=-1)[counted]
        expected_log_p, expected_ids = log_p.topk(TOP_K, dim=-1)
        outside = torch.ones_like(log_p, dtype=torch.bool).scatter_(-1, expected_ids, False)
        expected_tail = (log_p.exp() * outside).sum(-1).log()  # the probabilities of the other ids, in float64

        n = int(counted.sum())
        assert len(row["teacher_tail_logprob"]) == n and len(row["teacher_topk_ids"]) == n * TOP_K
        ids = torch.tensor(row["teacher_topk_ids"]).reshape(n, TOP_K)
        assert torch.equal(ids, expected_ids)
        stored = torch.tensor(row["teacher_topk_logprobs"], dtype=torch.float64).reshape(n, TOP_K)
        torch.testing.assert_close(stored, expected_log_p, atol=2e-3, rtol=1e-3)  # float16
        torch.testing.assert_close(torch.tensor(row["teacher_tail_logprob"], dtype=torch.float64), expected_tail,
                                   atol=1e-5, rtol=1e-5)
    assert len(cache[5]["teacher_tail_logprob"]) == 0  # an example with no supervised next token


def test_counts_follow_the_trainers_position_mask(teacher, dataset, cache):
    batch = pad_collator([dataset[i] for i in range(len(dataset))])
    mask = position_mask(batch, infer_position_unit(teacher, batch))
    assert [len(tail) for tail in cache["teacher_tail_logprob"]] == mask.sum(dim=1).tolist()
    manifest = cache_manifest(cache)
    assert manifest["counted_positions"] == int(mask.sum()) == sum(s["num_positions"] for s in manifest["shards"])
    assert manifest["complete"] and manifest["num_examples"] == len(dataset) and manifest["vocab_size"] == VOCAB
    assert [s["name"] for s in manifest["shards"]] == ["shard-00000", "shard-00001"]


def test_the_cache_costs_6k_plus_4_bytes_per_counted_position(cache):
    table = cache.data.table
    positions = cache_manifest(cache)["counted_positions"]
    types = {name: str(table.schema.field(name).type) for name in CACHE_COLUMNS}
    assert types == {"teacher_topk_ids": "list<item: int32>", "teacher_topk_logprobs": "list<item: halffloat>",
                     "teacher_tail_logprob": "list<item: float>"}
    total = offsets = 0
    for name in CACHE_COLUMNS:
        for chunk in table.column(name).chunks:
            assert chunk.offset == 0 and chunk.null_count == 0
            total += sum(buffer.size for buffer in chunk.buffers() if buffer is not None)  # offsets + values
            offsets += 4 * (len(chunk) + 1)  # int32 offsets, one per row (+1 per shard); no validity bitmap
    assert total == (6 * TOP_K + 4) * positions + offsets


def test_the_manifest_rides_along_select_shuffle_and_remove_columns(cache):
    manifest = read_cache_manifest(cache.cache_files[0]["filename"].rsplit("/shard-", 1)[0])
    for derived in (cache.select([3, 1]), cache.shuffle(seed=0), cache.remove_columns(["labels"]),
                    cache.with_format("torch")):
        assert cache_manifest(derived) == manifest
    assert cache.info.description.startswith(MANIFEST_MARKER)
    assert cache_manifest(datasets.Dataset.from_dict({"x": [1]})) is None and cache_manifest(None) is None


# ---- interruption and resume ----------------------------------------------------------------------------------------


def test_an_interrupted_build_resumes_to_the_same_cache(teacher, dataset, tmp_path):
    path = tmp_path / "resumed"
    with failing_forward(teacher, at_call=3), pytest.raises(RuntimeError, match="killed"):
        build(teacher, dataset, path, batch_size=2)  # shard 0 = calls 1-2, shard 1 dies on its first batch
    manifest = read_cache_manifest(path)
    assert not manifest["complete"] and [s["name"] for s in manifest["shards"]] == ["shard-00000"]
    assert {p.name for p in path.iterdir() if p.name.startswith("shard-")} <= {"shard-00000", "shard-00001.partial"}
    assert len(datasets.load_from_disk(str(path / "shard-00000"))) == 4
    with pytest.raises(ValueError, match="incomplete \\(4 of 7 examples\\).*rerun cache-teacher with the same argum"):
        load_teacher_cache(path)
    (path / "shard-00001.partial").mkdir(exist_ok=True)  # as if killed while saving
    (path / "shard-00001.partial" / "junk.arrow").write_bytes(b"half")
    (path / "manifest.json.partial").write_text("{")

    with failing_forward(teacher, at_call=0) as calls:
        build(teacher, dataset, path, batch_size=2)
    assert calls[0] == 2  # shard 0 is not recomputed
    assert not any(p.name.endswith(".partial") for p in path.iterdir())
    resumed = load_teacher_cache(path)
    in_one_go = load_teacher_cache(build(teacher, dataset, tmp_path / "one-go", batch_size=2))
    assert len(resumed) == len(in_one_go) == len(dataset)
    for i in range(len(dataset)):
        assert resumed[i] == in_one_go[i]
    assert cache_manifest(resumed) == cache_manifest(in_one_go)
    with failing_forward(teacher, at_call=1):  # a complete cache returns without running the teacher
        assert build(teacher, dataset, path, batch_size=2) == str(path)


def test_batching_does_not_change_the_cache(teacher, dataset, cache, tmp_path):
    rebatched = load_teacher_cache(build(teacher, dataset, tmp_path / "b", batch_size=7, shard_size=7))
    for i in range(len(dataset)):
        assert rebatched[i]["teacher_topk_ids"] == cache[i]["teacher_topk_ids"]
        torch.testing.assert_close(torch.tensor(rebatched[i]["teacher_tail_logprob"]),
                                   torch.tensor(cache[i]["teacher_tail_logprob"]), atol=1e-5, rtol=1e-5)


# ---- refusals --------------------------------------------------------------------------------------------------------


def test_refusals_name_the_fix(teacher, dataset, tmp_path):
    words = [f"w{i}" for i in range(55)]
    tokenizer = _tokenizer(tmp_path / "tok-a", words)
    other = _tokenizer(tmp_path / "tok-b", list(reversed(words)))
    assert tokenizer_hash(tokenizer) == tokenizer_hash(_tokenizer(tmp_path / "tok-a2", words))
    assert tokenizer_hash(tokenizer) != tokenizer_hash(other)

    path = tmp_path / "made"
    build(teacher, dataset, path, tokenizer=tokenizer)
    assert len(load_teacher_cache(path, tokenizer)) == len(dataset)
    with pytest.raises(ValueError, match="(?i)made for another tokenizer.*rebuild the cache with the student's tok"):
        load_teacher_cache(path, other)

    before = (path / "manifest.json").read_text()
    with pytest.raises(ValueError, match="other settings \\(top_k: cache 5, this run 8\\).*another output_dir"):
        build(teacher, dataset, path, tokenizer=tokenizer, top_k=8)
    with pytest.raises(ValueError, match="tokenizer_hash.*another output_dir"):
        build(teacher, dataset, path, tokenizer=other)
    assert (path / "manifest.json").read_text() == before and len(load_teacher_cache(path)) == len(dataset)

    unfinished = tmp_path / "unfinished"
    with failing_forward(teacher, at_call=1), pytest.raises(RuntimeError):
        build(teacher, dataset, unfinished)
    with pytest.raises(ValueError, match="incomplete.*rerun cache-teacher with the same arguments"):
        load_teacher_cache(unfinished)

    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="no manifest.json.*pass a new or empty output_dir"):
        build(teacher, dataset, occupied)
    assert os.listdir(occupied) == ["notes.txt"]

    for top_k, message in ((0, "top_k must be a positive integer"), (VOCAB, "smaller than the teacher's 64 outputs")):
        with pytest.raises(ValueError, match=message + ".*pass"):
            build(teacher, dataset, tmp_path / f"k{top_k}", top_k=top_k)
    for temperature in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature must be > 0.*pass the distillation temperature"):
            build(teacher, dataset, tmp_path / "t", temperature=temperature)
    with pytest.raises(FileNotFoundError, match="no teacher cache.*hf-distill cache-teacher"):
        load_teacher_cache(tmp_path / "nowhere")


# ---- the collator ----------------------------------------------------------------------------------------------------


def test_collator_concatenates_the_targets_in_example_order(teacher, cache):
    order = [3, 5, 0, 6]  # includes the example with no counted position
    features = [cache[i] for i in order]
    batch = TeacherCacheCollator(pad_collator)(features)
    assert all(set(CACHE_COLUMNS) <= set(f) for f in features)  # the rows are not mutated
    n = sum(len(cache[i]["teacher_tail_logprob"]) for i in order)
    ids, log_probs, tail = (batch[name] for name in CACHE_COLUMNS)
    assert ids.shape == (n, TOP_K) and ids.dtype == torch.long
    assert log_probs.shape == (n, TOP_K) and log_probs.dtype == torch.float32
    assert tail.shape == (n,) and tail.dtype == torch.float32
    assert n == int(position_mask(batch, infer_position_unit(teacher, batch)).sum())  # the trainer's count
    assert ids.reshape(-1).tolist() == [t for i in order for t in cache[i]["teacher_topk_ids"]]
    assert log_probs.reshape(-1).tolist() == [v for i in order for v in cache[i]["teacher_topk_logprobs"]]
    assert tail.tolist() == pytest.approx([v for i in order for v in cache[i]["teacher_tail_logprob"]])
    assert torch.equal(batch["input_ids"], pad_collator(features)["input_ids"])

    plain = [{k: v for k, v in f.items() if k not in CACHE_COLUMNS} for f in features]
    out = TeacherCacheCollator(pad_collator)(plain)
    assert set(out) == {"input_ids", "attention_mask", "labels"}
    assert all(torch.equal(out[k], pad_collator(plain)[k]) for k in out)


# ---- the command line ------------------------------------------------------------------------------------------------


def _command_line_inputs(tmp_path):
    """A tiny teacher folder (model + tokenizer) and a text file, as the command line reads them."""
    words = [f"w{i}" for i in range(55)]
    tokenizer = _tokenizer(tmp_path / "teacher", words)
    teacher = tiny_teacher()
    teacher.resize_token_embeddings(len(tokenizer.get_vocab()))
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(f"w{int(i)}" for i in torch.randint(0, 55, (int(k),), generator=g))
             for k in torch.randint(3, 12, (30,), generator=g)]
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    return tokenizer, ["--teacher", str(tmp_path / "teacher"), "--task", "causal-lm", "--dataset",
                       str(tmp_path / "train.txt"), "--block_size", "8"]


def test_cache_teacher_command_writes_a_loadable_cache(tmp_path, capsys):
    from hf_distill.cli import main
    from hf_distill.cli.jobs import cache_teacher_main
    from hf_distill.data.loading import DataArguments, load_raw, prepare_datasets, split_dataset

    tokenizer, common = _command_line_inputs(tmp_path)
    argv = [*common, "--top_k", "4", "--temperature", "2.0", "--batch_size", "4", "--shard_size", "5",
            "--output_dir", str(tmp_path / "cache"), "--device", "cpu"]

    summary = cache_teacher_main(argv)
    printed = capsys.readouterr().out
    assert f"teacher cache in {tmp_path / 'cache'}" in printed and "B per counted token" in printed
    cache = load_teacher_cache(summary["path"], tokenizer)
    manifest = cache_manifest(cache)
    assert manifest["complete"] and manifest["top_k"] == 4 and manifest["temperature"] == 2.0
    assert manifest["teacher_id"] == str(tmp_path / "teacher")
    assert manifest["tokenizer_hash"] == tokenizer_hash(tokenizer)
    # the rows distill trains on with the same flags (and its default seed), 7 counted positions per 8-token block
    train, held_out = split_dataset(load_raw(str(tmp_path / "train.txt")), DataArguments(), seed=42)
    expected = prepare_datasets("causal-lm", train, held_out, tokenizer, DataArguments(block_size=8)).train
    assert cache["input_ids"] == expected["input_ids"] and len(cache) >= 5
    assert manifest["counted_positions"] == summary["counted_positions"] == 7 * len(cache)
    assert summary["teacher_bytes_per_position"] == pytest.approx(6 * 4 + 4, abs=12 * (len(cache) + 2) / 7)

    shutil.rmtree(tmp_path / "cache" / manifest["shards"][-1]["name"])  # lose the last shard; the CLI redoes it
    manifest_file = tmp_path / "cache" / "manifest.json"
    stale = json.loads(manifest_file.read_text())
    stale["shards"], stale["complete"] = stale["shards"][:-1], False
    stale["counted_positions"] -= manifest["shards"][-1]["num_positions"]
    manifest_file.write_text(json.dumps(stale))
    main(["cache-teacher", *argv])  # the console script; resumes (same dataset fingerprint in a new tokenisation)
    assert load_teacher_cache(tmp_path / "cache")[:] == cache[:]


def test_distill_command_trains_from_the_cache_without_running_the_teacher(tmp_path, monkeypatch):
    import hf_distill.cli.jobs as pipeline

    tokenizer, common = _command_line_inputs(tmp_path)
    pipeline.cache_teacher_main([*common, "--top_k", "4", "--temperature", "2.0", "--output_dir",
                                 str(tmp_path / "cache"), "--device", "cpu"])
    trainers = []

    class Recorded(pipeline.DistillationTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            trainers.append(self)

    monkeypatch.setattr(pipeline, "DistillationTrainer", Recorded)
    summary = pipeline.distill_main([
        *common, "--teacher_cache", str(tmp_path / "cache"), "--student_layers", "1", "--temperature", "2.0",
        "--output_dir", str(tmp_path / "student"), "--max_steps", "3", "--per_device_train_batch_size", "2",
        "--logging_steps", "1", "--report_to", "none", "--use_cpu", "true", "--save_strategy", "no",
    ])
    (trainer,) = trainers
    assert trainer.teacher_model is None and trainer.teacher_source.manifest["top_k"] == 4
    assert trainer.train_dataset[:] == load_teacher_cache(tmp_path / "cache")[:]
    logged = [row for row in trainer.state.log_history if "logits_loss" in row]
    assert len(logged) == 3 and all(math.isfinite(row["logits_loss"]) and row["logits_loss"] > 0 for row in logged)
    assert math.isfinite(summary["teacher"]["perplexity"]) and math.isfinite(summary["student"]["perplexity"])
    assert (tmp_path / "student" / "model.safetensors").is_file()

    with pytest.raises(ValueError, match="temperature"):  # the cache's refusals reach the command line
        pipeline.distill_main([*common, "--teacher_cache", str(tmp_path / "cache"), "--student_layers", "1",
                               "--temperature", "1.0", "--output_dir", str(tmp_path / "other"), "--use_cpu", "true"])


# ---- distilling from the cache ---------------------------------------------------------------------------------------


def _coarsened_kl(student_logits, teacher_logits, k: int, temperature: float) -> torch.Tensor:
    """Hand-written, float64: KL(P_t || P_s) per row over the teacher's top-k ids plus one tail bucket, times T^2."""
    p_t = torch.softmax(teacher_logits.double() / temperature, dim=-1)
    p_s = torch.softmax(student_logits.double() / temperature, dim=-1)
    ids = p_t.topk(k, dim=-1).indices
    buckets_t, buckets_s = p_t.gather(-1, ids), p_s.gather(-1, ids)
    buckets_t = torch.cat([buckets_t, 1 - buckets_t.sum(-1, keepdim=True)], dim=-1)
    buckets_s = torch.cat([buckets_s, 1 - buckets_s.sum(-1, keepdim=True)], dim=-1)
    return (buckets_t * (buckets_t / buckets_s).log()).sum(-1) * temperature**2


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_bucket_divergence_is_a_proper_divergence_of_the_coarsened_distributions(temperature):
    from hf_distill.signals.cross_vocab import CROSS_LOSSES
    from hf_distill.signals.logits import SOFT_LOSSES, TOKEN_LOSSES, bucket_divergence

    g = torch.Generator().manual_seed(0)
    teacher_logits = torch.randn(6, 40, generator=g, dtype=torch.float64) * 3
    log_p = torch.log_softmax(teacher_logits / temperature, dim=-1)
    top = log_p.topk(TOP_K, dim=-1)
    tail = torch.log1p(-top.values.exp().sum(-1))

    def divergence(student_logits, kind):
        return bucket_divergence(student_logits, top.indices, top.values, tail, kind, temperature)

    for kind in sorted(SOFT_LOSSES - TOKEN_LOSSES - CROSS_LOSSES):  # (the kinds a cache serves)
        assert divergence(teacher_logits, kind).abs().max() < 1e-6 * max(1.0, temperature**2), kind  # the student matches: zero
        # Zero too when the student differs only inside the tail (the cache cannot see there) ...
        inside_tail = teacher_logits.clone()
        for row, ids in enumerate(top.indices):
            rest = torch.ones(40, dtype=torch.bool)
            rest[ids] = False
            tail_ids = rest.nonzero().squeeze(-1)
            mass = log_p[row, tail_ids].exp()
            shuffled = mass[torch.randperm(len(mass), generator=g)]  # same tail mass, other shape
            inside_tail[row, tail_ids] = shuffled.log() * temperature
            inside_tail[row, ids] = log_p[row, ids] * temperature
        assert divergence(inside_tail, kind).abs().max() < 1e-6 * max(1.0, temperature**2), kind
        # ... and positive when it differs on the buckets.
        other = teacher_logits + torch.randn(6, 40, generator=g, dtype=torch.float64)
        assert (divergence(other, kind) > 1e-6).all(), kind

    other = teacher_logits + torch.randn(6, 40, generator=g, dtype=torch.float64)
    torch.testing.assert_close(divergence(other, "forward_kl"), _coarsened_kl(other, teacher_logits, TOP_K, temperature))


def test_trainer_distils_from_the_cache_without_a_teacher(teacher, dataset, tmp_path, make_args):
    """The step loss from the cache equals the hand-written coarsened KL + CE on the live teacher's logits (up to the
    float16 storage), plain and chunked paths agree, and training moves the student towards the teacher."""
    from hf_distill import DistillationTrainer

    words = [f"w{i}" for i in range(VOCAB - 5)]
    tokenizer = _tokenizer(tmp_path / "tok", words)
    cache = load_teacher_cache(build(teacher, dataset, tmp_path / "c", tokenizer=tokenizer), tokenizer)
    student = tiny_teacher(seed=1).train()

    def trainer(chunk, **overrides):
        args = make_args(temperature=TEMPERATURE, task_weight=0.5, logits_weight=0.5, logits_chunk_size=chunk,
                         per_device_train_batch_size=len(SHAPES), **overrides)
        return DistillationTrainer(model=student, teacher_model=None, args=args, train_dataset=cache,
                                   data_collator=pad_collator, processing_class=tokenizer)

    plain, chunked = trainer(0), trainer(4)
    assert plain.teacher_source.manifest is not None and not plain.teacher_source.models
    batch = plain.data_collator([cache[i] for i in range(len(cache))])
    loss_plain = plain.compute_loss(student, dict(batch)).detach()
    loss_chunked = chunked.compute_loss(student, dict(batch)).detach()

    with torch.no_grad():
        raw = pad_collator([dataset[i] for i in range(len(dataset))])
        z_s = student(input_ids=raw["input_ids"], attention_mask=raw["attention_mask"]).logits[:, :-1]
        z_t = teacher(input_ids=raw["input_ids"], attention_mask=raw["attention_mask"]).logits[:, :-1]
        targets = raw["labels"][:, 1:]
        counted = targets != -100
        ce = torch.nn.functional.cross_entropy(z_s[counted].double(), targets[counted])
        kl = _coarsened_kl(z_s[counted], z_t[counted], TOP_K, TEMPERATURE).mean()
    expected = 0.5 * ce + 0.5 * kl
    assert float(loss_plain) == pytest.approx(float(expected), rel=5e-4)  # float16 log-probabilities in the cache
    assert float(loss_chunked) == pytest.approx(float(loss_plain), rel=1e-5)

    before = kl.item()
    first = trainer(0, max_steps=30, learning_rate=3e-3)
    first.train()
    with torch.no_grad():
        z_s = student(input_ids=raw["input_ids"], attention_mask=raw["attention_mask"]).logits[:, :-1]
        after = _coarsened_kl(z_s[counted], z_t[counted], TOP_K, TEMPERATURE).mean().item()
    assert after < 0.8 * before
    logged = [entry for entry in first.state.log_history if "logits_loss" in entry]
    assert logged and all(math.isfinite(entry["logits_loss"]) for entry in logged)


def test_a_truncated_shard_is_named_with_the_fix(teacher, dataset, tmp_path):
    copy = Path(build(teacher, dataset, tmp_path / "cache"))
    shard = sorted(copy.glob("*/*.arrow"))[0]
    with open(shard, "r+b") as handle:
        handle.truncate(shard.stat().st_size // 2)
    with pytest.raises(ValueError, match=f"shard {shard}.*truncated or corrupt.*hf-distill cache-teacher"):
        load_teacher_cache(copy)
