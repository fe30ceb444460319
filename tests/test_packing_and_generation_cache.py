"""Packing of chat rows (no conversation attends to another) and the teacher's top-k written in the generation pass
(from its raw logits, checked against a separate teacher forward), then distilled from without the live teacher."""

from __future__ import annotations

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_distill.data.chat import (
    CompletionCollator,
    PackedCollator,
    check_packing_supported,
    prepare_chat_dataset,
    tokenize_row,
)
from hf_distill.data.teacher_cache import CACHE_COLUMNS, cache_manifest

from .conftest import tiny_llama
from .test_chat_data import (
    CHATML,
    PROMPTS,
    TWO_TURNS,
    _argv,
    _chat_teacher,
    _generation_settings,
    chat_tokenizer,
    generate_cli,
)


def test_packed_conversations_give_each_conversation_its_own_logits_and_labels():
    tokenizer = chat_tokenizer(CHATML, "<|im_end|>")
    rows = datasets.Dataset.from_dict({"messages": [TWO_TURNS, TWO_TURNS[:2], TWO_TURNS[2:], TWO_TURNS[:2]]})
    padded, pad_collate = prepare_chat_dataset(rows, tokenizer, max_length=40)
    packed, pack_collate = prepare_chat_dataset(rows, tokenizer, max_length=40, packing=True)
    assert isinstance(pad_collate, CompletionCollator) and isinstance(pack_collate, PackedCollator)
    lengths = [len(r) for r in padded["input_ids"]]
    assert len(packed) < len(padded) and all(len(r) <= 40 for r in packed["input_ids"])
    model = tiny_llama(vocab=len(tokenizer), layers=2, seed=3).eval()
    check_packing_supported(model)
    with torch.no_grad():
        apart = [model(input_ids=torch.tensor([ids])).logits[0] for ids in padded["input_ids"]]
        inputs = {k: v for k, v in pack_collate(list(packed)).items() if k != "labels"}
        together = model(**inputs, use_cache=False).logits  # (training never has a KV cache; with one, no packing)
    batch = pack_collate(list(packed))
    # walk the packs: every conversation's logits (and counted labels) equal those it has alone
    row, start, seen = 0, 0, 0
    for i, n in enumerate(lengths):
        if start + n > batch["input_ids"].shape[1] or (start and batch["position_ids"][row, start] != 0):
            row, start = row + 1, 0
        assert batch["position_ids"][row, start: start + n].tolist() == list(range(n))
        torch.testing.assert_close(together[row, start: start + n], apart[i], rtol=1e-4, atol=1e-5)
        labels = batch["labels"][row, start: start + n].tolist()
        assert labels[0] == -100 and labels[1:] == padded[i]["labels"][1:]
        start, seen = start + n, seen + 1
    assert seen == len(rows)
    assert (batch["labels"][batch["input_ids"] == tokenizer.pad_token_id] == -100).all()


def test_a_model_that_lets_packed_rows_attend_to_each_other_is_refused():
    class Leaky(torch.nn.Module):  # a running mean over all earlier tokens: ignores position_ids
        config = type("C", (), {"vocab_size": 16})()

        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(16, 4)

        def forward(self, input_ids, position_ids=None, use_cache=None):
            hidden = self.embed(input_ids).cumsum(1)
            return type("O", (), {"logits": hidden})()

    with pytest.raises(ValueError, match="attend to each other.*without --packing"):
        check_packing_supported(Leaky(), "student")


def test_packing_from_the_command_line_and_its_refusals(tmp_path):
    from hf_distill.cli.jobs import distill_main

    teacher, _ = _chat_teacher(tmp_path)
    data = tmp_path / "chat.jsonl"
    datasets.Dataset.from_dict({"messages": [TWO_TURNS, TWO_TURNS[:2]] * 8}).to_json(str(data))
    summary = distill_main(_argv(tmp_path, teacher, data, "--student_layers", "1", "--packing", "true",
                                 "--max_length", "48", "--logits_weight", "1.0"))
    assert summary["eval"]["eval_logits_loss"] > 0
    with pytest.raises(ValueError, match="cannot count the tokens of hidden"):
        distill_main(_argv(tmp_path, teacher, data, "--student_layers", "1", "--packing", "true", "--hidden_weight",
                           "1.0", "--max_length", "48", "--output_dir", str(tmp_path / "x")))


def test_tokenize_row_keeps_the_cache_entries_of_the_tokens_that_still_count():
    row = {"prompt": "p", "completion": "c", "prompt_ids": [1, 2, 3], "completion_ids": [4, 5, 6],
           CACHE_COLUMNS[0]: [40, 50, 60], CACHE_COLUMNS[1]: [-0.4, -0.5, -0.6], CACHE_COLUMNS[2]: [-4.0, -5.0, -6.0]}
    whole = tokenize_row(row, None, "prompt_completion")
    assert whole["input_ids"] == [1, 2, 3, 4, 5, 6] and whole["labels"] == [-100, -100, -100, 4, 5, 6]
    assert whole[CACHE_COLUMNS[0]] == [40, 50, 60]
    right = tokenize_row(row, None, "prompt_completion", max_length=5)  # tokens 4, 5 still predicted
    assert right["input_ids"] == [1, 2, 3, 4, 5] and right[CACHE_COLUMNS[0]] == [40, 50]
    # cutting the prompt's start would leave targets computed on context the student does not see: refused
    with pytest.raises(ValueError, match="--truncation_side left would cut the start of its prompt"):
        tokenize_row(row, None, "prompt_completion", max_length=3, truncation_side="left")
    plain = {k: v for k, v in row.items() if k not in CACHE_COLUMNS}  # without a cache, left truncation is fine
    assert tokenize_row(plain, None, "prompt_completion", max_length=3, truncation_side="left")["input_ids"] == [4, 5, 6]


def test_generation_pass_caches_top_k_of_the_raw_logits_at_every_generated_token(tmp_path):
    from hf_distill.data.generate import generate_completions, load_generations

    teacher_dir, tokenizer = _chat_teacher(tmp_path)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    prompts = datasets.Dataset.from_dict({"messages": PROMPTS})
    # sampling warps the scores (temperature 1.5, top-p 0.8); the cache must hold log softmax(z / 2) of the raw z
    settings = _generation_settings(tmp_path / "g", max_new_tokens=5, temperature=1.5, top_p=0.8, cache_top_k=4,
                                    cache_temperature=2.0)
    generate_completions(teacher, tokenizer, prompts, str(tmp_path / "g"), settings, "t")
    rows = load_generations(tmp_path / "g")
    assert cache_manifest(rows)["top_k"] == 4 and cache_manifest(rows)["temperature"] == 2.0
    for row, prompt in zip(rows, PROMPTS):
        rendered = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        assert row["prompt_ids"] == tokenizer(rendered, add_special_tokens=False)["input_ids"]
        p, c = len(row["prompt_ids"]), len(row["completion_ids"])
        with torch.no_grad():
            z = teacher(input_ids=torch.tensor([row["prompt_ids"] + row["completion_ids"]])).logits[0, p - 1: p + c - 1]
        log_p = torch.log_softmax(z / 2.0, -1)
        top = log_p.topk(4, dim=-1)
        assert torch.tensor(row[CACHE_COLUMNS[0]]).reshape(c, 4).tolist() == top.indices.tolist()
        torch.testing.assert_close(torch.tensor(row[CACHE_COLUMNS[1]]).reshape(c, 4), top.values, atol=2e-3, rtol=1e-3)
        tail = torch.log1p(-top.values.exp().sum(-1))
        torch.testing.assert_close(torch.tensor(row[CACHE_COLUMNS[2]]), tail, atol=1e-4, rtol=1e-4)
        stops = {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id}
        assert c == 5 or row["completion_ids"][-1] in stops


def test_distil_from_the_generation_pass_cache_without_the_live_teacher(tmp_path):
    from hf_distill.cli.arguments import parse_distill_args
    from hf_distill.cli.jobs import cache_teacher_main, distill_main
    from hf_distill.cli.models import prepare_inputs

    teacher, _ = _chat_teacher(tmp_path)
    # greedy: the random teacher then writes no empty answer (sampled, it may stop at once; such rows are dropped)
    generate_cli(tmp_path, teacher, {"messages": PROMPTS * 2}, "gen", "--cache_top_k", "4", "--cache_temperature", "2.0",
                 "--temperature", "0")
    generate_cli(tmp_path, teacher, {"messages": PROMPTS * 2}, "plain", "--temperature", "0")
    argv = _argv(tmp_path, teacher, tmp_path / "gen", "--student_layers", "1", "--teacher_cache", str(tmp_path / "gen"),
                 "--temperature", "2.0", "--logging_steps", "1")
    _, data = prepare_inputs(*parse_distill_args(argv))
    manifest = cache_manifest(data.train)
    assert manifest["top_k"] == 4 and manifest["temperature"] == 2.0
    counted = sum(sum(label != -100 for label in row["labels"][1:]) for row in data.train)
    assert sum(len(row[CACHE_COLUMNS[2]]) for row in data.train) == counted
    summary = distill_main(argv)
    assert summary["rows"] and (tmp_path / "student" / "model.safetensors").is_file()
    with pytest.raises(ValueError, match="carry no teacher top-k.*--cache_top_k"):
        distill_main(_argv(tmp_path, teacher, tmp_path / "plain", "--student_layers", "1", "--teacher_cache",
                           str(tmp_path / "plain"), "--output_dir", str(tmp_path / "x")))
    with pytest.raises(ValueError, match="already holds the teacher's top-k.*--teacher_cache"):
        cache_teacher_main(["--teacher", str(teacher), "--task", "causal-lm", "--dataset", str(tmp_path / "gen"),
                            "--output_dir", str(tmp_path / "cache")])
    assert not (tmp_path / "cache").exists()
    with pytest.raises(ValueError, match="temperature 2.0"):
        distill_main([*argv, "--temperature", "1.0", "--output_dir", str(tmp_path / "y")])
