"""Reliability II: the LLM modes never end "successfully" with a wrong result. The refusals are cases of
`test_reliability.CASES` (and rows of docs/reliability.md); here, what still runs does the right thing: the fixes the
refusals name work, rows with an empty answer are dropped and counted, the richest data format wins, a resume with
changes needs the flag, nothing is written into the user's data folders, and the records the checks compare are
right (weights fingerprints across dtypes, contexts of every family, the rows' own fingerprint)."""

from __future__ import annotations

import json
import logging

import datasets
import pytest
import torch

from hf_distill.data.provenance import content_fingerprint, differences
from hf_distill.modeling import context_length, weights_fingerprint

from .conftest import tiny_llama
from .llm_workspace import llm_argv, llm_cache, llm_distill, llm_generate, save_chat_teacher
from .test_chat_data import PROMPTS, TWO_TURNS
from .test_reliability import fingerprint


@pytest.fixture
def ws(tmp_path):
    save_chat_teacher(tmp_path / "chat-teacher")
    save_chat_teacher(tmp_path / "chat-teacher-24", positions=24)
    datasets.Dataset.from_dict({"messages": [TWO_TURNS, TWO_TURNS[:2], TWO_TURNS * 2] * 8}).to_json(
        str(tmp_path / "chat.jsonl"))
    datasets.Dataset.from_dict({"messages": PROMPTS * 2}).to_json(str(tmp_path / "prompts.jsonl"))
    return tmp_path


@pytest.fixture
def warnings(caplog):
    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            yield caplog
    finally:
        hf_logging.disable_propagation()


def test_the_fix_a_context_refusal_names_trains_within_the_context(ws):
    with pytest.raises(ValueError, match="Pass --max_length 24"):
        llm_distill(ws, "a", teacher=str(ws / "chat-teacher-24"))
    llm_distill(ws, "b", teacher=str(ws / "chat-teacher-24"), max_length="24")
    assert (ws / "out-b" / "model.safetensors").is_file()


def test_generate_within_the_context_writes_rows_that_fit(ws):
    with pytest.raises(ValueError, match="lower --max_new_tokens to at most 12"):
        llm_generate(ws, "g", teacher=str(ws / "chat-teacher-24"), max_new_tokens="60")
    assert not (ws / "g").exists()
    llm_generate(ws, "g", teacher=str(ws / "chat-teacher-24"), max_new_tokens="12")
    from hf_distill.data.generate import load_generations

    rows = load_generations(ws / "g")
    assert max(len(r["prompt_ids"]) + len(r["completion_ids"]) for r in rows) <= 24


def test_context_length_reads_each_family_and_none_where_unstated():
    from transformers import BertConfig, GPT2Config, LlamaConfig

    assert context_length(GPT2Config(n_positions=32)) == 32
    assert context_length(LlamaConfig(max_position_embeddings=24)) == 24
    assert context_length(BertConfig(max_position_embeddings=40)) == 40
    assert context_length(tiny_llama()) == 64
    assert context_length(torch.nn.Linear(2, 2)) is None


def test_a_few_empty_answers_are_dropped_with_a_count_and_missing_content_is_empty(ws, warnings):
    from hf_distill.cli.arguments import parse_distill_args
    from hf_distill.cli.models import prepare_inputs

    rows = [TWO_TURNS, TWO_TURNS[:2]] * 20 + [TWO_TURNS[:1] + [{"role": "assistant"}]]  # 1 of 41: content missing
    with open(ws / "one-empty.jsonl", "w") as handle:
        for row in rows:
            handle.write(json.dumps({"messages": row}) + "\n")
    _, data = prepare_inputs(*parse_distill_args(llm_argv(ws, "x", dataset=str(ws / "one-empty.jsonl"))))
    assert len(data.train) + len(data.eval) == 40
    assert "Dropped 1 of 41 rows" in warnings.text and "with an empty answer" in warnings.text
    assert "messages data; " in warnings.text and "training and" in warnings.text  # the format and counts, logged
    # prompt-completion rows with an empty completion, over the share: refused
    datasets.Dataset.from_dict({"prompt": ["hello"] * 10, "completion": ["hi there"] * 9 + [" "]}).to_json(
        str(ws / "pc.jsonl"))
    with pytest.raises(ValueError, match=r"1 of 10 rows \(10%\) have an empty answer"):
        prepare_inputs(*parse_distill_args(llm_argv(ws, "x", dataset=str(ws / "pc.jsonl"))))


def test_messages_win_over_a_text_column_and_the_choice_is_logged(ws, warnings):
    from hf_distill.cli.arguments import parse_distill_args
    from hf_distill.cli.models import prepare_inputs

    datasets.Dataset.from_dict({"messages": [TWO_TURNS] * 12, "text": ["hello there"] * 12}).to_json(
        str(ws / "both.jsonl"))
    _, data = prepare_inputs(*parse_distill_args(llm_argv(ws, "x", dataset=str(ws / "both.jsonl"))))
    assert data.data_format == "messages"
    assert "both a 'text' column and `messages`: training on the messages rows" in warnings.text
    _, text = prepare_inputs(*parse_distill_args(llm_argv(ws, "x", dataset=str(ws / "both.jsonl"),
                                                         data_format="text", block_size="4")))
    assert text.data_format == "text"


def test_conversations_ending_with_a_user_turn_are_prompts_on_policy(ws):
    """`messages` whose every conversation ends with a user turn are prompt-only data: the student answers them
    (lmbda=1); before, they were read as conversations without answers and every row was dropped."""
    from hf_distill.cli.arguments import parse_distill_args
    from hf_distill.cli.models import prepare_inputs

    _, data = prepare_inputs(*parse_distill_args(llm_argv(ws, "x", dataset=str(ws / "prompts.jsonl"), lmbda="1")))
    assert data.data_format == "prompt_only" and len(data.train) + len(data.eval) == 14
    assert all(all(label == -100 for label in row["labels"]) for row in data.train)  # prompts count nothing
    llm_distill(ws, "o", dataset=str(ws / "prompts.jsonl"), lmbda="1", max_new_tokens="4")
    assert (ws / "out-o" / "model.safetensors").is_file()


def test_resume_with_changes_needs_the_flag_and_then_logs_them(ws, warnings):
    llm_distill(ws, "r", save_strategy="steps", save_steps="2")
    record = json.loads((ws / "out-r" / "checkpoint-2" / "hf_distill_run.json").read_text())
    assert record["settings"]["temperature"] == 2.0 and record["student"]["num_hidden_layers"] == 1
    with pytest.raises(ValueError, match="temperature: 2.0 there, 3.0 in this run"):
        llm_distill(ws, "r", resume_from_checkpoint="true", temperature="3", max_steps="3")
    llm_distill(ws, "r", resume_from_checkpoint="true", temperature="3", max_steps="3", resume_with_changes="true",
                save_strategy="steps", save_steps="1")
    assert "Resuming" in warnings.text and "with changes (resume_with_changes): temperature: 2.0 there" in warnings.text
    card = (ws / "out-r" / "README.md").read_text()
    assert "- resumed from `checkpoint-2` with changes: temperature: 2.0 there, 3.0 in this run" in card
    # its checkpoint records the new settings: the same settings resume from it without a word
    assert json.loads((ws / "out-r" / "checkpoint-3" / "hf_distill_run.json").read_text())["settings"][
        "temperature"] == 3.0
    llm_distill(ws, "r", resume_from_checkpoint="true", temperature="3", max_steps="4")


def test_distilling_from_generations_and_a_cache_writes_nothing_into_their_folders(ws, monkeypatch):
    llm_generate(ws, "gen")
    llm_cache(ws, "cache")
    before = {name: fingerprint(ws / name) for name in ("gen", "cache")}
    llm_distill(ws, "a", dataset=str(ws / "gen"), teacher_cache=str(ws / "gen"), temperature="1")
    monkeypatch.chdir(ws)  # the same rows and flags as the cache, the data named by a relative path: accepted
    llm_distill(ws, "b", teacher_cache=str(ws / "cache"), temperature="1", dataset="chat.jsonl")
    assert {name: fingerprint(ws / name) for name in ("gen", "cache")} == before
    assert (ws / "out-a" / "model.safetensors").is_file() and (ws / "out-b" / "model.safetensors").is_file()


def test_a_cache_records_what_made_it(ws):
    llm_cache(ws, "cache", max_length="40")
    manifest = json.loads((ws / "cache" / "manifest.json").read_text())
    assert manifest["data"]["max_length"] == 40 and manifest["data"]["packing"] is False
    assert manifest["data"]["seed"] == 42 and manifest["end_of_turn"] == "<|im_end|>"
    from transformers import AutoModelForCausalLM

    assert manifest["teacher_weights"] == weights_fingerprint(AutoModelForCausalLM.from_pretrained(ws / "chat-teacher"))


def test_weights_fingerprint_is_the_same_in_bfloat16_and_differs_for_other_weights():
    model = tiny_llama(seed=0)
    same = tiny_llama(seed=0).to(torch.bfloat16)
    other = tiny_llama(seed=0)
    with torch.no_grad():
        other.model.layers[1].mlp.down_proj.weight[3, 5] += 0.5  # every value is sampled (2,048 < 4,096)
    assert weights_fingerprint(model) == weights_fingerprint(same)
    assert weights_fingerprint(model) != weights_fingerprint(other)
    assert weights_fingerprint(model) != weights_fingerprint(tiny_llama(seed=1))


def test_content_fingerprint_sees_the_ids_not_their_storage(monkeypatch):
    a = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5]]})
    int32 = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))})
    b = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5]]}, features=int32)
    moved = datasets.Dataset.from_dict({"input_ids": [[1, 2], [3, 4, 5]]})  # the same ids, other rows
    shuffled = datasets.Dataset.from_dict({"input_ids": [[4, 5], [1, 2, 3]]})
    assert content_fingerprint(a) == content_fingerprint(b)
    assert len({content_fingerprint(x) for x in (a, moved, shuffled)}) == 3
    assert content_fingerprint(shuffled.select([1, 0])) == content_fingerprint(a)  # an indices mapping is followed
    assert content_fingerprint(a.to_iterable_dataset()) is None  # streamed data is not fingerprinted
    import hf_distill.data.provenance as provenance

    whole = content_fingerprint(a)
    monkeypatch.setattr(provenance, "BATCH_ROWS", 1)  # read a row at a time: the same fingerprint
    assert content_fingerprint(a) == whole and content_fingerprint(moved) != whole
    assert differences({"a": 1, "b": [1, 2]}, {"a": 1.0, "b": (1, 2), "c": 3}) == []
    assert differences({"a": 1}, {"a": 2}) == ["a: 1 there, 2 in this run"]
