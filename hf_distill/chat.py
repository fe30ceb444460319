"""Chat and prompt-completion data for language-model distillation: which tokens count (labels -100 elsewhere).

Formats (TRL's dataset conventions), detected from the columns (`detect_format`) or forced:

- ``messages``: a list of ``{"role", "content"}`` turns, rendered with the tokenizer's chat template; each assistant
  turn's content tokens and the end-of-turn token that closes it count, role headers and every other turn do not.
  Templates with ``{% generation %}`` markers give the mask directly; others are read by rendering growing prefixes of
  the conversation and diffing: assistant turn i spans the text between ``render(turns[:i], add_generation_prompt)``
  and ``render(turns[:i + 1])``, surrounding whitespace excluded.
- ``prompt_completion``: ``prompt`` and ``completion``, both strings (the completion's tokens and an end-of-sequence
  token count) or both lists of turns (the completion's assistant turns count).
- ``prompt_only``: ``prompt`` (a string or turns), or ``messages`` ending in a user turn: the input of generation.
- ``text``: plain text, every token counts (the existing language-modelling path).

Truncation keeps the first `max_length` tokens (``truncation_side="right"``, the default) or the last ones
(``"left"``); a row left with nothing counted is dropped, and the number dropped is logged.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from transformers.utils import logging

from .options import check_choice

logger = logging.get_logger(__name__)

DATA_FORMATS = ("text", "messages", "prompt_completion", "prompt_only")
ROLES = ("system", "user", "assistant", "tool")
IGNORE_INDEX = -100


def detect_format(columns: Sequence[str], forced: str | None = None) -> str:
    """The data format of a dataset with these columns (see the module docstring), or `forced` once checked."""
    if forced is not None:
        check_choice("data_format", forced, DATA_FORMATS)
        return forced
    columns = set(columns)
    if "messages" in columns:
        return "messages"
    if {"prompt", "completion"} <= columns:
        return "prompt_completion"
    if "prompt" in columns:
        return "prompt_only"
    if "text" in columns:
        return "text"
    raise ValueError(
        f"Cannot tell the data format from the columns {sorted(columns)}: give `messages` (chat turns), `prompt` and "
        "`completion`, `prompt` alone, or `text`, or force one with data_format=..."
    )


def check_chat_tokenizer(tokenizer: Any) -> None:
    """Chat data needs a fast tokenizer (character offsets) with a chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"The tokenizer {type(tokenizer).__name__} has no chat template, so conversations cannot be rendered: "
            "use the instruct model's tokenizer, or set tokenizer.chat_template (a Jinja template) first."
        )
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("Chat data needs a fast tokenizer (character offsets): load it with use_fast=True.")


def _check_turns(turns: Any) -> list[dict[str, str]]:
    if not isinstance(turns, (list, tuple)) or not turns:
        raise ValueError(f"A conversation must be a non-empty list of {{'role', 'content'}} turns, got {turns!r}.")
    for turn in turns:
        role = turn.get("role") if isinstance(turn, dict) else None
        if role not in ROLES:
            raise ValueError(f"Unknown role {role!r} in turn {turn!r}; roles are {', '.join(ROLES)}.")
    return list(turns)


def _render(tokenizer: Any, turns: list[dict[str, str]], generation_prompt: bool = False) -> str:
    return _apply_template(tokenizer, turns, tokenize=False, add_generation_prompt=generation_prompt)


def _apply_template(tokenizer: Any, turns: list[dict[str, str]], **kwargs: Any) -> Any:
    """`apply_chat_template`, with a template's refusal of a conversation as one clear error."""
    try:
        return tokenizer.apply_chat_template(turns, **kwargs)
    except Exception as error:  # jinja2's TemplateError, or the template's own raise_exception(...)
        raise ValueError(
            f"The chat template refuses the conversation {[t['role'] for t in turns]} ({error}): fix the row (e.g. "
            "two assistant turns in a row, or a system turn where the template allows none) or drop it."
        ) from error


def assistant_char_spans(tokenizer: Any, turns: list[dict[str, str]], first: int = 0) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of every assistant turn from index `first` on (content and
    end-of-turn marker, without surrounding whitespace), found by rendering growing prefixes."""
    text = _render(tokenizer, turns)
    spans = []
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant" or i < first:
            continue
        before, after = _render(tokenizer, turns[:i], generation_prompt=True) if i else "", _render(tokenizer, turns[: i + 1])
        if not (after.startswith(before) and text.startswith(after)):
            raise ValueError(
                "The chat template does not render a conversation by appending turns (a prefix renders differently "
                "from the start of the whole), so assistant turns cannot be located: give the template "
                "{% generation %} markers."
            )
        start, end = len(before), len(after)
        segment = text[start:end]
        start += len(segment) - len(segment.lstrip())
        end = start + len(text[start:end].rstrip())
        if end > start:
            spans.append((start, end))
    return text, spans


def _overlapping(offsets: Sequence[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """Whether each token's character range overlaps one of the spans."""
    return [any(b > s and a < e for s, e in spans) and b > a for a, b in offsets]


def conversation_mask(tokenizer: Any, turns: list[dict[str, str]], first: int = 0,
                      use_markers: bool | None = None) -> tuple[list[int], list[bool]]:
    """Token ids of a rendered conversation and which of them count (assistant turns from index `first` on). With
    `use_markers` (default: when the template has ``{% generation %}``) the template's own assistant mask is used."""
    check_chat_tokenizer(tokenizer)
    turns = _check_turns(turns)
    if use_markers is None:
        use_markers = "{% generation %}" in tokenizer.chat_template or "{%- generation %}" in tokenizer.chat_template
    if use_markers and first == 0:
        out = _apply_template(tokenizer, turns, return_dict=True, return_assistant_tokens_mask=True)
        return list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]
    text, spans = assistant_char_spans(tokenizer, turns, first)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(encoded["input_ids"]), _overlapping(encoded["offset_mapping"], spans)


def prompt_completion_mask(tokenizer: Any, prompt: Any, completion: Any) -> tuple[list[int], list[bool]]:
    """Ids and counted tokens of a prompt-completion row: plain strings are tokenised apart and joined (the
    completion's tokens and an end-of-sequence token count); lists of turns are rendered together and the completion's
    assistant turns count."""
    if isinstance(prompt, str) and isinstance(completion, str):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            completion_ids = [*completion_ids, tokenizer.eos_token_id]
        return [*prompt_ids, *completion_ids], [False] * len(prompt_ids) + [True] * len(completion_ids)
    if isinstance(prompt, (list, tuple)) and isinstance(completion, (list, tuple)):
        return conversation_mask(tokenizer, [*prompt, *completion], first=len(prompt))
    raise ValueError(
        "prompt and completion must both be strings or both be lists of {'role', 'content'} turns, got "
        f"{type(prompt).__name__} and {type(completion).__name__}."
    )


def _truncate(ids: list[int], counted: list[bool], max_length: int | None, side: str) -> tuple[list[int], list[bool]]:
    if max_length is None or len(ids) <= max_length:
        return ids, counted
    if side == "left":
        return ids[-max_length:], counted[-max_length:]
    return ids[:max_length], counted[:max_length]


def tokenize_row(row: dict[str, Any], tokenizer: Any, data_format: str, max_length: int | None = None,
                 truncation_side: str = "right") -> dict[str, list[int]]:
    """One row as ``input_ids``, ``attention_mask`` and ``labels`` (the id where the token counts, else -100)."""
    check_choice("truncation_side", truncation_side, ("right", "left"))
    if data_format == "messages":
        ids, counted = conversation_mask(tokenizer, row["messages"])
    elif data_format == "prompt_completion":
        ids, counted = prompt_completion_mask(tokenizer, row["prompt"], row["completion"])
    else:
        raise ValueError(f"tokenize_row makes training rows from messages or prompt-completion data, not {data_format}.")
    ids, counted = _truncate(ids, counted, max_length, truncation_side)
    return {"input_ids": ids, "attention_mask": [1] * len(ids),
            "labels": [i if c else IGNORE_INDEX for i, c in zip(ids, counted)]}


#: The conversation rendered to find a template's end-of-turn token and to compare two tokenizers' renderings.
PROBE = [{"role": "system", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]


def end_of_turn_id(tokenizer: Any) -> int | None:
    """The token that closes an assistant turn in the chat template: the last counted token of a rendered turn."""
    ids, counted = conversation_mask(tokenizer, PROBE)
    last = max((i for i, c in enumerate(counted) if c), default=None)
    return None if last is None else ids[last]


def chat_generation_config(model: Any, tokenizer: Any) -> None:
    """Make `model.generation_config` stop at the template's end-of-turn token (and the tokenizer's end of
    sequence) and pad with the tokenizer's pad token, so ``pipeline("text-generation")`` answers a `messages` list
    with one assistant turn."""
    stops = [t for t in dict.fromkeys([end_of_turn_id(tokenizer), tokenizer.eos_token_id]) if t is not None]
    config = model.generation_config
    config.eos_token_id = stops[0] if len(stops) == 1 else stops
    config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]


def check_same_rendering(teacher_tokenizer: Any, student_tokenizer: Any) -> None:
    """Teacher and student must turn a conversation into the same ids (same tokenizer, same template), else their
    per-token distributions compare different tokens: refuse, showing both renderings' first difference."""
    ids = [conversation_mask(t, PROBE)[0] for t in (teacher_tokenizer, student_tokenizer)]
    if ids[0] == ids[1]:
        return
    at = next((i for i, (a, b) in enumerate(zip(*ids)) if a != b), min(map(len, ids)))
    shown = [repr(t.decode(i[at: at + 8])) for t, i in zip((teacher_tokenizer, student_tokenizer), ids)]
    raise ValueError(
        f"The teacher's and the student's chat templates render the same conversation to different tokens (first "
        f"difference at token {at}: teacher {shown[0]}, student {shown[1]}): their outputs would compare different "
        "positions. Use one tokenizer and template for both (cross-tokenizer distillation is not supported yet)."
    )


class CompletionCollator:
    """Pads a batch of tokenised rows on the right: ``input_ids`` with the pad id, ``attention_mask`` with 0,
    ``labels`` with -100 (padding never counts)."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        batch = {}
        for key, fill in (("input_ids", self.pad_token_id), ("attention_mask", 0), ("labels", IGNORE_INDEX)):
            batch[key] = torch.tensor([list(f[key]) + [fill] * (width - len(f[key])) for f in features])
        return batch


def prepare_chat_dataset(dataset: Any, tokenizer: Any, max_length: int | None = None, data_format: str | None = None,
                         truncation_side: str = "right") -> tuple[Any, CompletionCollator]:
    """A `datasets.Dataset` of conversations or prompt-completion rows, tokenised with completion-only labels, and
    the collator to train on it with; rows left with nothing counted (after truncation) are dropped and counted in
    the log."""
    data_format = detect_format(dataset.column_names, data_format)
    needed = {"messages": ["messages"], "prompt_completion": ["prompt", "completion"]}.get(data_format, [])
    missing = [c for c in needed if c not in dataset.column_names]
    if missing:
        raise ValueError(f"{data_format} data needs the column(s) {missing}; the dataset has {dataset.column_names}.")
    if data_format not in ("messages", "prompt_completion"):
        raise ValueError(
            f"Training needs messages or prompt-completion data; this is {data_format} data (prompt-only data is the "
            "input of generation: answer the prompts with the teacher first, `hf-distill generate`, and distil on "
            "its output; text data goes through the plain language-modelling path)."
        )
    if data_format == "messages" or not isinstance(dataset[0]["prompt"], str):
        check_chat_tokenizer(tokenizer)
    elif not any(str(text or "").strip() for text in dataset["completion"]):
        raise ValueError("The completion column is empty in every row: there is nothing to learn from. Point it at "
                         "the column of answers (or generate them with the teacher).")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("The tokenizer has neither a pad token nor an end-of-sequence token to pad batches with.")
    tokenised = dataset.map(lambda row: tokenize_row(row, tokenizer, data_format, max_length, truncation_side),
                            remove_columns=dataset.column_names, desc="Tokenising")
    kept = tokenised.filter(lambda row: any(label != IGNORE_INDEX for label in row["labels"]), desc="Dropping")
    dropped = len(tokenised) - len(kept)
    if dropped:
        logger.warning("%d of %d rows have no counted token (no assistant turn, or truncated to max_length=%s): "
                       "dropped.", dropped, len(tokenised), max_length)
    if not len(kept):
        raise ValueError("No row has a token to learn from (every completion is empty or truncated away).")
    return kept, CompletionCollator(pad)
