"""The language-model part of the reliability workspace: chat teachers (a 24-position one, one of another template,
one of other weights, a GPT-2 of 32 positions), chat data (long rows, empty answers, broken JSON lines), a
generations folder with the teacher's top-k, a teacher cache, a run with a checkpoint to resume, and tokenizers that do
not belong to the teacher. Everything is tiny and built offline in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
from transformers import GPT2Config, GPT2LMHeadModel

from .conftest import tiny_llama
from .test_chat_data import CHATML, LLAMA, PROMPTS, SPECIAL, TWO_TURNS, WORDS, chat_tokenizer


def save_chat_teacher(folder: Path, template: str = CHATML, eos: str = "<|im_end|>", positions: int = 64,
                      seed: int = 0, layers: int = 2) -> Path:
    """A tiny Llama with the chat tokenizer (`template`), `positions` positions."""
    tokenizer = chat_tokenizer(template, eos)
    model = tiny_llama(vocab=len(tokenizer), layers=layers, seed=seed)
    model.config.max_position_embeddings = positions
    model.config.eos_token_id, model.config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_tokenizer_of_other_words(folder: Path, extra: int = 0) -> Path:
    """A chat tokenizer whose words sit at other ids (`extra` tokens more than the teacher's)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SPECIAL + list(reversed(WORDS)) + [f"extra{i}" for i in range(extra)]
    model = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Split(pattern=Regex(r"\n| "), behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, pad_token="<pad>", unk_token="<unk>",
                                        eos_token="<|im_end|>",
                                        additional_special_tokens=[t for t in SPECIAL[2:] if t != "<|im_end|>"])
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(folder)
    return folder


def llm_argv(ws: Path, name: str, **changes: str | None) -> list[str]:
    """A tiny, valid causal-LM `distill` command on the workspace's chat data; `changes` set (None: drop) flags."""
    flags = {
        "teacher": str(ws / "chat-teacher"), "student_layers": "1", "task": "causal-lm",
        "dataset": str(ws / "chat.jsonl"), "output_dir": str(ws / f"out-{name}"), "max_steps": "2",
        "per_device_train_batch_size": "4", "report_to": "none", "save_strategy": "no", "use_cpu": "true",
        "disable_tqdm": "true", "eval_fraction": "0.25",
    }
    flags.update(changes)
    return [part for key, value in flags.items() if value is not None for part in (f"--{key}", *value.split(" "))]


def llm_distill(ws: Path, name: str, **changes: str | None) -> dict:
    from hf_distill.cli.jobs import distill_main

    return distill_main(llm_argv(ws, name, **changes))


def llm_cache(ws: Path, name: str, **changes: str | None) -> dict:
    """`hf-distill cache-teacher` on the chat data (top-k 4)."""
    from hf_distill.cli.jobs import cache_teacher_main

    flags = {"teacher": str(ws / "chat-teacher"), "task": "causal-lm", "dataset": str(ws / "chat.jsonl"),
             "output_dir": str(ws / name), "top_k": "4", "eval_fraction": "0.25"}
    flags.update(changes)
    return cache_teacher_main([p for k, v in flags.items() if v is not None for p in (f"--{k}", *v.split(" "))])


def llm_generate(ws: Path, name: str, **changes: str | None) -> str:
    """`hf-distill generate` on the workspace's prompts (4 new tokens, top-k 4 of the teacher kept)."""
    from hf_distill.cli.jobs import generate_main

    flags = {"teacher": str(ws / "chat-teacher"), "dataset": str(ws / "prompts.jsonl"), "output_dir": str(ws / name),
             "max_new_tokens": "4", "cache_top_k": "4", "temperature": "0"}
    flags.update(changes)
    return generate_main([p for k, v in flags.items() if v is not None for p in (f"--{k}", *v.split(" "))])


def make_llm_workspace(root: Path) -> Path:
    save_chat_teacher(root / "chat-teacher")
    save_chat_teacher(root / "chat-teacher-24", positions=24)
    save_chat_teacher(root / "chat-teacher-other-weights", seed=5)
    save_chat_teacher(root / "llama-template-teacher", template=LLAMA, eos="<|im_end|>")
    tokenizer = chat_tokenizer(CHATML, "<|im_end|>")
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                      bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id))
    gpt2.save_pretrained(root / "gpt2-32")
    tokenizer.save_pretrained(root / "gpt2-32")
    save_tokenizer_of_other_words(root / "tokenizer-too-big", extra=6)
    save_tokenizer_of_other_words(root / "tokenizer-other-words")
    long = TWO_TURNS * 2  # 4 exchanges: about 56 tokens
    datasets.Dataset.from_dict({"messages": [TWO_TURNS, TWO_TURNS[:2], long, TWO_TURNS[2:]] * 6}).to_json(
        str(root / "chat.jsonl"))
    other = [TWO_TURNS[2:], TWO_TURNS[:2]] * 12  # the same format, other conversations
    datasets.Dataset.from_dict({"messages": other}).to_json(str(root / "chat-other.jsonl"))
    empty = [TWO_TURNS[:1] + [{"role": "assistant", "content": ""}], TWO_TURNS[:2]]
    datasets.Dataset.from_dict({"messages": empty * 12}).to_json(str(root / "empty-answers.jsonl"))
    lines = [json.dumps({"messages": TWO_TURNS})] * 5
    (root / "broken.jsonl").write_text("\n".join(lines[:3] + ['{"messages": [{"role": "user"'] + lines[3:]) + "\n")
    (root / "duplicate-keys.jsonl").write_text(
        "\n".join(lines[:2] + ['{"messages": [], "messages": []}'] + lines[2:]) + "\n")
    datasets.Dataset.from_dict({"messages": PROMPTS * 2}).to_json(str(root / "prompts.jsonl"))
    llm_generate(root, "generations")
    llm_cache(root, "cache")
    resumable = llm_argv(root, "resumable", save_strategy="steps", save_steps="2")
    from hf_distill.cli.jobs import distill_main

    distill_main(resumable)
    return root
