"""Chat and prompt-completion data: which tokens count, checked against hand-made masks on tiny tokenizers."""

from __future__ import annotations

import logging

import datasets
import pytest
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from hf_distill import DistillationTrainer
from hf_distill.data.chat import conversation_mask, detect_format, prepare_chat_dataset, prompt_completion_mask

from .conftest import tiny_llama

WORDS = ["user", "assistant", "system", "hello", "hi", "there", "how", "are", "you", "fine", "thanks", "be", "brief",
         "ok", "\n", " "]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}{% generation %}"
          "{{ m['content'] }}<|im_end|>{% endgeneration %}{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA = ("<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
         "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant"
         "<|end_header_id|>\n\n{% endif %}")
SPECIAL = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
           "<|end_header_id|>", "<|eot_id|>"]
TWO_TURNS = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"},
             {"role": "user", "content": "how are you"}, {"role": "assistant", "content": "fine thanks"}]


def chat_tokenizer(template: str | None, eos: str) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    model = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Split(pattern=Regex(r"\n| "), behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, pad_token="<pad>", unk_token="<unk>", eos_token=eos,
                                        additional_special_tokens=[t for t in SPECIAL[2:] if t != eos])
    tokenizer.chat_template = template
    return tokenizer


def counted_tokens(tokenizer, ids, counted):
    return [tokenizer.convert_ids_to_tokens(i) for i, c in zip(ids, counted) if c]


def test_chatml_assistant_mask_by_markers_and_by_prefix_diff_equals_the_hand_made_one():
    tokenizer = chat_tokenizer(CHATML, "<|im_end|>")
    ids, by_markers = conversation_mask(tokenizer, TWO_TURNS)
    diff_ids, by_diff = conversation_mask(tokenizer, TWO_TURNS, use_markers=False)
    assert ids == diff_ids and by_markers == by_diff
    tokens = tokenizer.convert_ids_to_tokens(ids)
    # by hand: <|im_start|> assistant \n | hi ' ' there <|im_end|>  (the header never counts)
    hand = [False] * len(tokens)
    for start in [i for i, t in enumerate(tokens) if t == "assistant"]:
        end = tokens.index("<|im_end|>", start)
        for j in range(start + 2, end + 1):
            hand[j] = True
    assert by_diff == hand
    assert counted_tokens(tokenizer, ids, by_diff) == ["hi", " ", "there", "<|im_end|>", "fine", " ", "thanks",
                                                       "<|im_end|>"]


def test_llama_style_template_without_markers_counts_content_and_end_of_turn_only():
    tokenizer = chat_tokenizer(LLAMA, "<|eot_id|>")
    system = [{"role": "system", "content": "be brief"}, *TWO_TURNS]
    ids, counted = conversation_mask(tokenizer, system)
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens[:4] == ["<|begin_of_text|>", "<|start_header_id|>", "system", "<|end_header_id|>"]  # context kept
    assert counted_tokens(tokenizer, ids, counted) == ["hi", " ", "there", "<|eot_id|>", "fine", " ", "thanks",
                                                       "<|eot_id|>"]
    # by hand: every assistant header ("<|start_header_id|> assistant <|end_header_id|> \n \n") is uncounted
    for i, token in enumerate(tokens):
        if token == "assistant":
            assert not any(counted[i - 1: i + 4])


def test_prompt_completion_counts_the_completion_only():
    tokenizer = chat_tokenizer(CHATML, "<|im_end|>")
    ids, counted = prompt_completion_mask(tokenizer, "how are you", "fine thanks")
    assert counted_tokens(tokenizer, ids, counted) == ["fine", " ", "thanks", "<|im_end|>"]
    assert tokenizer.convert_ids_to_tokens(ids)[:5] == ["how", " ", "are", " ", "you"]
    prompt, completion = TWO_TURNS[:3], TWO_TURNS[3:]
    ids, counted = prompt_completion_mask(tokenizer, prompt, completion)
    assert counted_tokens(tokenizer, ids, counted) == ["fine", " ", "thanks", "<|im_end|>"]  # not the first answer


def test_formats_are_detected_and_bad_input_is_refused():
    assert detect_format(["messages"]) == "messages"
    assert detect_format(["prompt", "completion"]) == "prompt_completion"
    assert detect_format(["prompt"]) == "prompt_only"
    assert detect_format(["text", "id"]) == "text"
    with pytest.raises(ValueError, match="Cannot tell the data format"):
        detect_format(["question"])
    with pytest.raises(ValueError, match="Unknown data_format"):
        detect_format(["messages"], "chat")
    with pytest.raises(ValueError, match="has no chat template"):
        conversation_mask(chat_tokenizer(None, "<|im_end|>"), TWO_TURNS)
    with pytest.raises(ValueError, match="Unknown role 'bot'"):
        conversation_mask(chat_tokenizer(CHATML, "<|im_end|>"), [{"role": "bot", "content": "hi"}])
    strict = chat_tokenizer("{% for m in messages %}{% if loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]"
                            "['role'] %}{{ raise_exception('roles must alternate') }}{% endif %}{{ m['content'] }}"
                            "<|im_end|>{% endfor %}", "<|im_end|>")
    with pytest.raises(ValueError, match=r"chat template refuses the conversation \['user', 'assistant', "
                                         r"'assistant'\] .*roles must alternate"):
        conversation_mask(strict, [*TWO_TURNS[:2], {"role": "assistant", "content": "ok"}])
    with pytest.raises(ValueError, match=r"1 of 1 rows \(100%\) have an empty answer"):
        prepare_chat_dataset(datasets.Dataset.from_dict({"prompt": ["hello"], "completion": [" "]}),
                             chat_tokenizer(CHATML, "<|im_end|>"))
    with pytest.raises(ValueError, match=r"messages data needs the column\(s\) \['messages'\]"):
        prepare_chat_dataset(datasets.Dataset.from_dict({"text": ["hello"]}), chat_tokenizer(CHATML, "<|im_end|>"),
                             data_format="messages")
    with pytest.raises(ValueError, match="prompt-only data is the input of generation"):
        prepare_chat_dataset(datasets.Dataset.from_dict({"prompt": ["hello"]}), chat_tokenizer(CHATML, "<|im_end|>"))


def test_truncation_keeps_the_start_and_rows_with_nothing_counted_are_dropped(caplog):
    tokenizer = chat_tokenizer(LLAMA, "<|eot_id|>")
    rows = {"messages": [TWO_TURNS, TWO_TURNS[:1] + [{"role": "assistant", "content": "ok"}], TWO_TURNS[:1]]}
    with caplog.at_level(logging.WARNING):
        full, _ = prepare_chat_dataset(datasets.Dataset.from_dict(rows), tokenizer)
    assert len(full) == 2  # the user-only row has nothing to learn
    ids, counted = conversation_mask(tokenizer, TWO_TURNS)
    assert full[0]["labels"] == [i if c else -100 for i, c in zip(ids, counted)]
    cut = 14  # inside the first answer: "hi" is kept, the rest of the conversation is cut
    short, collator = prepare_chat_dataset(datasets.Dataset.from_dict(rows), tokenizer, max_length=cut)
    assert [len(r) for r in short["input_ids"]] == [cut, cut]
    assert counted_tokens(tokenizer, short[0]["input_ids"], [x != -100 for x in short[0]["labels"]]) == ["hi"]
    assert short[0]["input_ids"] == ids[:cut]
    kept = prepare_chat_dataset(datasets.Dataset.from_dict(rows), tokenizer, max_length=cut, truncation_side="left")[0]
    assert kept[0]["input_ids"] == ids[-cut:]
    with pytest.raises(ValueError, match="No row has a token to learn from"):  # every answer truncated away
        prepare_chat_dataset(datasets.Dataset.from_dict({"messages": [TWO_TURNS]}), tokenizer, max_length=4)
    with pytest.raises(ValueError, match="this is prompt_only data"):  # conversations that all end with a user turn
        prepare_chat_dataset(datasets.Dataset.from_dict({"messages": [TWO_TURNS[:1]]}), tokenizer)
    batch = collator([short[0], short[1]])
    assert batch["labels"].shape == batch["input_ids"].shape and (batch["labels"][batch["attention_mask"] == 0] == -100).all()


def test_a_student_distils_on_chat_data_counting_assistant_tokens_only(make_args):
    tokenizer = chat_tokenizer(CHATML, "<|im_end|>")
    rows = {"messages": [TWO_TURNS, TWO_TURNS[:2], [{"role": "system", "content": "be brief"}, *TWO_TURNS]] * 2}
    train, collator = prepare_chat_dataset(datasets.Dataset.from_dict(rows), tokenizer)
    vocab = len(tokenizer)
    teacher, student = tiny_llama(vocab=vocab, seed=0), tiny_llama(vocab=vocab, seed=1)
    args = make_args(max_steps=1, per_device_train_batch_size=6, task_weight=0.5, logits_weight=0.5)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=train,
                                  data_collator=collator)
    trainer.train()
    labels = torch.tensor([r + [-100] * (40 - len(r)) for r in train["labels"]])
    expected = int((labels[:, 1:] != -100).sum())  # causal LM: position t predicts the counted token t + 1
    assert int(trainer.accounting.step_counts["positions"]) == expected
    assert expected == 2 * (8 + 4 + 8)  # assistant content + end-of-turn tokens of the six rows
    assert torch.isfinite(torch.tensor(trainer.state.log_history[0]["loss"]))


# ---- the command line ------------------------------------------------------------------------------------------


def _chat_teacher(tmp_path, template=CHATML, eos="<|im_end|>", name="teacher"):
    tokenizer = chat_tokenizer(template, eos)
    folder = tmp_path / name
    model = tiny_llama(vocab=len(tokenizer), layers=2, seed=0)
    model.config.eos_token_id, model.config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, tokenizer


def _argv(tmp_path, teacher, data, *extra):
    return ["--teacher", str(teacher), "--task", "causal-lm", "--dataset", str(data), "--output_dir",
            str(tmp_path / "student"), "--max_steps", "2", "--per_device_train_batch_size", "4", "--report_to", "none",
            "--save_strategy", "no", "--use_cpu", "true", "--disable_tqdm", "true", "--eval_fraction", "0.25", *extra]


def test_distill_command_on_conversations_saves_a_student_that_answers_messages(tmp_path):
    from transformers import AutoModelForCausalLM, GenerationConfig, pipeline

    from hf_distill.cli.jobs import distill_main

    teacher, tokenizer = _chat_teacher(tmp_path)
    data = tmp_path / "chat.jsonl"
    datasets.Dataset.from_dict({"messages": [TWO_TURNS, TWO_TURNS[:2]] * 8}).to_json(str(data))
    distill_main(_argv(tmp_path, teacher, data, "--student_layers", "1"))
    out = tmp_path / "student"
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert GenerationConfig.from_pretrained(out).eos_token_id == end_of_turn
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 1
    chat = pipeline("text-generation", model=str(out), device="cpu")
    answer = chat(TWO_TURNS[:1], max_new_tokens=3, do_sample=False)[0]["generated_text"]
    assert answer[:1] == TWO_TURNS[:1] and answer[-1]["role"] == "assistant"


def test_text_column_2_is_the_completion_of_a_plain_prompt_completion_dataset(tmp_path):
    from hf_distill.cli.arguments import parse_distill_args
    from hf_distill.cli.models import prepare_inputs

    teacher, tokenizer = _chat_teacher(tmp_path)
    data = tmp_path / "pairs.csv"
    datasets.Dataset.from_dict({"question": ["how are you"] * 8, "answer": ["fine thanks"] * 8}).to_csv(str(data))
    model_args, data_args, args = parse_distill_args(
        _argv(tmp_path, teacher, data, "--text_column", "question", "--text_column_2", "answer"))
    _, prepared = prepare_inputs(model_args, data_args, args)
    row = prepared.train[0]
    assert counted_tokens(tokenizer, row["input_ids"], [x != -100 for x in row["labels"]]) == [
        "fine", " ", "thanks", "<|im_end|>"]
    assert prepared.data_format == "prompt_completion" and prepared.collator is not None


def test_a_student_whose_template_renders_otherwise_is_refused_before_training(tmp_path):
    from hf_distill.cli.jobs import distill_main

    teacher, _ = _chat_teacher(tmp_path)
    student, _ = _chat_teacher(tmp_path, template=CHATML.replace("\n", " "), name="student-model")
    data = tmp_path / "chat.jsonl"
    datasets.Dataset.from_dict({"messages": [TWO_TURNS] * 8}).to_json(str(data))
    with pytest.raises(ValueError, match="render the same conversation to different tokens.*teacher .*student "):
        distill_main(_argv(tmp_path, teacher, data, "--student", str(student)))
    assert not (tmp_path / "student").exists()


# ---- sequence-level KD: the teacher's answers --------------------------------------------------------------------

PROMPTS = [[{"role": "user", "content": w}] for w in ("hello", "how are you", "hi", "ok", "fine", "thanks", "be brief")]


def _generation_settings(folder, **overrides):
    from hf_distill.data.generate import GenerationArguments

    values = dict(output_dir=str(folder), max_new_tokens=3, temperature=1.0, batch_size=2, shard_size=3, seed=7)
    values.update(overrides)
    return GenerationArguments(**values)


def generate_cli(tmp_path, teacher, columns, folder, *flags):
    """`hf-distill generate` on prompts written to a jsonl file (returned), at most 4 new tokens, into tmp_path/folder."""
    from hf_distill.cli import main

    prompts = tmp_path / "prompts.jsonl"
    datasets.Dataset.from_dict(columns).to_json(str(prompts))
    main(["generate", "--teacher", str(teacher), "--dataset", str(prompts), "--output_dir", str(tmp_path / folder),
          "--max_new_tokens", "4", *flags])
    return prompts


def _shards(folder):
    from hf_distill.data.generate import load_generations

    return load_generations(folder).to_dict()


def test_generate_writes_shards_that_a_killed_run_resumes_to_exactly(tmp_path, monkeypatch):
    import hf_distill.data.generate as generate

    teacher_dir, tokenizer = _chat_teacher(tmp_path)
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    prompts = datasets.Dataset.from_dict({"messages": PROMPTS})
    straight = generate.generate_completions(teacher, tokenizer, prompts, str(tmp_path / "a"),
                                             _generation_settings(tmp_path / "a"), "t")
    calls, real = [], generate._answer

    def dies_in_the_second_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(generate, "_answer", dies_in_the_second_shard)
    with pytest.raises(KeyboardInterrupt):
        generate.generate_completions(teacher, tokenizer, prompts, str(tmp_path / "b"),
                                      _generation_settings(tmp_path / "b"), "t")
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["manifest.json", "shard-00000"]
    with pytest.raises(ValueError, match="unfinished generation run"):
        _shards(tmp_path / "b")
    monkeypatch.setattr(generate, "_answer", real)
    generate.generate_completions(teacher, tokenizer, prompts, str(tmp_path / "b"), _generation_settings(tmp_path / "b"),
                                  "t")
    rows = _shards(straight)
    assert rows == _shards(tmp_path / "b") and len(rows["prompt"]) == len(PROMPTS)
    assert rows["prompt"] == PROMPTS and all(c[0]["role"] == "assistant" for c in rows["completion"])
    # another teacher's (or other settings') shards are refused, and left as they were
    before = (tmp_path / "b" / "manifest.json").read_text()
    with pytest.raises(ValueError, match="already holds generations of another run .*settings"):
        generate.generate_completions(teacher, tokenizer, prompts, str(tmp_path / "b"),
                                      _generation_settings(tmp_path / "b", temperature=0.5), "t")
    with pytest.raises(ValueError, match="teacher"):
        generate.generate_completions(teacher, tokenizer, prompts, str(tmp_path / "b"),
                                      _generation_settings(tmp_path / "b"), "another")
    assert (tmp_path / "b" / "manifest.json").read_text() == before
    with pytest.raises(ValueError, match="--max_new_tokens must be a positive number"):
        _generation_settings(tmp_path / "c", max_new_tokens=0)


def test_generate_then_distill_on_the_teachers_answers(tmp_path):
    from hf_distill.cli.jobs import distill_main

    teacher, _ = _chat_teacher(tmp_path)
    prompts = generate_cli(tmp_path, teacher, {"prompt": PROMPTS * 2}, "gen", "--temperature", "0", "--shard_size", "5")
    rows = _shards(tmp_path / "gen")
    assert len(rows["prompt"]) == 14 and rows["prompt"][:7] == PROMPTS
    summary = distill_main(_argv(tmp_path, teacher, tmp_path / "gen", "--student_layers", "1"))
    assert (tmp_path / "student" / "model.safetensors").is_file() and summary["rows"]
    with pytest.raises(ValueError, match="prompt-only data is the input of generation.*hf-distill generate"):
        distill_main(_argv(tmp_path, teacher, prompts, "--student_layers", "1", "--output_dir", str(tmp_path / "x")))


def test_the_teachers_answers_cached_then_distilled_without_the_live_teacher(tmp_path):
    from hf_distill.cli import main
    from hf_distill.cli.jobs import distill_main

    teacher, _ = _chat_teacher(tmp_path)
    generate_cli(tmp_path, teacher, {"prompt": PROMPTS * 2}, "gen", "--temperature", "0")
    common = ["--teacher", str(teacher), "--task", "causal-lm", "--dataset", str(tmp_path / "gen"), "--eval_fraction",
              "0.25"]
    main(["cache-teacher", *common, "--output_dir", str(tmp_path / "cache"), "--top_k", "4", "--temperature", "2.0"])
    argv = _argv(tmp_path, teacher, tmp_path / "gen", "--student_layers", "1", "--teacher_cache",
                 str(tmp_path / "cache"), "--temperature", "2.0", "--logging_steps", "1")
    summary = distill_main(argv)
    assert (tmp_path / "student" / "model.safetensors").is_file() and summary["rows"]
