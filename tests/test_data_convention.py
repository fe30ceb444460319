"""One data convention for every command: `generate` and `distill` read the same file the same way, a plain text
column becomes the user turn (`--prompt_column`, `--system_prompt`, `--completion_column`), and `asset:NAME` works
for every data flag of every command."""

from __future__ import annotations

import datasets
import pytest

from .llm_workspace import llm_argv, llm_generate, save_chat_teacher
from .test_chat_data import CHATML, TWO_TURNS, chat_tokenizer, counted_tokens

QUESTIONS = ["how are you", "hello", "be brief", "how are you there", "hi", "fine thanks", "ok", "hello there"]


@pytest.fixture
def ws(tmp_path):
    save_chat_teacher(tmp_path / "chat-teacher")
    datasets.Dataset.from_dict({"question": QUESTIONS, "answer": ["fine thanks"] * len(QUESTIONS)}).to_csv(
        str(tmp_path / "questions.csv"), index=False)
    return tmp_path


def _prepared(ws, **flags):
    from hf_distill.cli.arguments import parse_distill_args
    from hf_distill.cli.models import prepare_inputs

    return prepare_inputs(*parse_distill_args(llm_argv(ws, "x", **flags)))[1]


def test_a_question_column_is_the_user_turn_for_distill_and_generate(ws):
    tokenizer = chat_tokenizer(CHATML, "<|im_end|>")
    flags = dict(dataset=str(ws / "questions.csv"), prompt_column="question", system_prompt="brief")
    data = _prepared(ws, lmbda="1", **flags)
    assert data.data_format == "prompt_only"
    rendered = [tokenizer.apply_chat_template([{"role": "system", "content": "brief"}, {"role": "user", "content": q}],
                                              tokenize=False, add_generation_prompt=True) for q in QUESTIONS]
    assert rendered[0] == ("<|im_start|>system\nbrief<|im_end|><|im_start|>user\nhow are you<|im_end|>"
                           "<|im_start|>assistant\n")  # the system turn first, then the question as the user's
    expected = {tuple(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in rendered}
    rows = [*data.train["input_ids"], *data.eval["input_ids"]]
    assert {tuple(r) for r in rows} == expected and len(rows) == len(QUESTIONS)
    # the same prompts, rendered the same way, are what `generate` answers
    llm_generate(ws, "gen", dataset=str(ws / "questions.csv"), cache_top_k="0", prompt_column="question",
                 system_prompt="brief")
    from hf_distill.data.generate import load_generations

    assert {tuple(r) for r in load_generations(ws / "gen")["prompt_ids"]} == expected


def test_a_completion_column_makes_chat_prompt_completion_rows(ws):
    tokenizer = chat_tokenizer(CHATML, "<|im_end|>")
    data = _prepared(ws, dataset=str(ws / "questions.csv"), prompt_column="question", completion_column="answer")
    assert data.data_format == "prompt_completion"
    row = data.train[0]
    assert counted_tokens(tokenizer, row["input_ids"], [x != -100 for x in row["labels"]]) == [
        "fine", " ", "thanks", "<|im_end|>"]
    with pytest.raises(ValueError, match="--completion_column and --system_prompt go with --prompt_column"):
        _prepared(ws, dataset=str(ws / "questions.csv"), completion_column="answer")
    with pytest.raises(ValueError, match="Column 'query' is not in the dataset.*--prompt_column"):
        _prepared(ws, dataset=str(ws / "questions.csv"), prompt_column="query")


def test_generate_and_distill_read_the_same_file_the_same_way(ws):
    from hf_distill.data.generate import prompts_of

    prompts = datasets.Dataset.from_dict({"messages": [TWO_TURNS[:1], TWO_TURNS[:3]]})
    prompts.to_json(str(ws / "prompts.jsonl"))
    assert _prepared(ws, dataset=str(ws / "prompts.jsonl"), lmbda="1").data_format == "prompt_only"
    assert prompts_of(prompts) == [TWO_TURNS[:1], TWO_TURNS[:3]]
    pairs = datasets.Dataset.from_dict({"prompt": [TWO_TURNS[:1]] * 8, "completion": [TWO_TURNS[1:2]] * 8})
    pairs.to_json(str(ws / "pairs.jsonl"))
    assert _prepared(ws, dataset=str(ws / "pairs.jsonl")).data_format == "prompt_completion"
    assert prompts_of(pairs) == [TWO_TURNS[:1]] * 8  # the teacher answers the prompts anew
    answered = datasets.Dataset.from_dict({"messages": [TWO_TURNS] * 8})
    with pytest.raises(ValueError, match="hold answers already"):
        prompts_of(answered)
    with pytest.raises(ValueError, match="--prompt_column NAME"):
        prompts_of(datasets.Dataset.from_dict({"question": QUESTIONS}))


def test_asset_names_work_for_every_data_flag_of_every_command(ws, monkeypatch):
    import hf_distill.data.assets as assets

    files = {"questions": ws / "questions.csv", "reviews": ws / "reviews.csv"}
    datasets.Dataset.from_dict({"sentence": ["hello there", "fine thanks"] * 10, "label": ["a", "b"] * 10}).to_csv(
        str(files["reviews"]), index=False)
    asked = []
    monkeypatch.setattr(assets, "fetch", lambda name, *a, **k: asked.append(name) or files[name])
    llm_generate(ws, "gen", dataset="asset:questions", cache_top_k="0", prompt_column="question")  # generate
    assert (ws / "gen" / "manifest.json").is_file()
    assert _prepared(ws, dataset="asset:questions", prompt_column="question", lmbda="1").data_format == "prompt_only"
    from hf_distill.cli.jobs import cache_teacher_main

    cache_teacher_main(["--teacher", str(ws / "chat-teacher"), "--task", "causal-lm", "--dataset", "asset:questions",
                        "--prompt_column", "question", "--completion_column", "answer", "--output_dir",
                        str(ws / "cache"), "--top_k", "4"])
    assert (ws / "cache" / "manifest.json").is_file()
    from .test_reliability import save_teacher

    save_teacher(ws / "classifier")
    from hf_distill.cli.arguments import parse_distill_args
    from hf_distill.cli.models import prepare_inputs

    argv = ["--teacher", str(ws / "classifier"), "--dataset", "asset:reviews", "--transfer_dataset", "asset:reviews",
            "--text_column", "sentence", "--output_dir", str(ws / "c")]
    _, data = prepare_inputs(*parse_distill_args(argv))
    assert len(data.train) == 18 + 20  # the labelled training rows and the transfer set's
    assert asked.count("questions") == 3 and asked.count("reviews") == 2
