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
(``"left"``); a row left with nothing counted is dropped, and the number dropped is logged. Packing (optional) joins
rows into rows of up to `max_length` tokens whose ``position_ids`` restart per conversation, so no conversation
attends to another (`pack_rows`, `check_packing_supported`).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from transformers.utils import logging

from ..checks.options import check_choice
from ..positions import IGNORE_INDEX
from .row_filters import drop_empty_answers
from .teacher_cache import CACHE_COLUMNS, MANIFEST_MARKER

logger = logging.get_logger(__name__)

DATA_FORMATS = ("text", "messages", "prompt_completion", "prompt_only")
ROLES = ("system", "user", "assistant", "tool")
#: A row's prompt rendered by a teacher of another tokenizer with its own template (`data.with_teacher_prompts`).
TEACHER_PROMPTS = "teacher_prompt_ids"


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


def detect_rows_format(dataset: Any, forced: str | None = None) -> str:
    """`detect_format` from the columns, then from the rows: `messages` whose every conversation ends with a user
    turn is prompt-only data (the input of generation or of on-policy sampling)."""
    found = detect_format(dataset.column_names, forced)
    if forced is None and found == "messages" and len(dataset) and all(
            turns and isinstance(turns[-1], dict) and turns[-1].get("role") == "user" for turns in dataset["messages"]):
        return "prompt_only"
    return found


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


def prompt_ids(tokenizer: Any, prompt: Any) -> list[int]:
    """The ids of a prompt as a model continues it: a string as is, turns rendered with the chat template and its
    generation prompt (the assistant header)."""
    if isinstance(prompt, str):
        return tokenizer(prompt, add_special_tokens=False)["input_ids"]
    check_chat_tokenizer(tokenizer)
    text = tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_row(row: dict[str, Any], tokenizer: Any, max_length: int | None = None) -> dict[str, list[Any]]:
    """A prompt-only row (`prompt`, or `messages` ending in a user turn) as a training row that counts nothing: the
    prompt to complete on-policy (its last `max_length` tokens: the end is what the model continues)."""
    prompt = row["prompt"] if "prompt" in row else row["messages"]
    if not isinstance(prompt, str) and (not prompt or prompt[-1]["role"] != "user"):
        raise ValueError("Prompt-only `messages` must end with a user turn (the model writes the answer).")
    ids = prompt_ids(tokenizer, prompt)
    a, b = _window(len(ids), max_length, "left")
    extra = {TEACHER_PROMPTS: list(row[TEACHER_PROMPTS])} if TEACHER_PROMPTS in row else {}
    return {"input_ids": ids[a:b], "attention_mask": [1] * (b - a), "labels": [IGNORE_INDEX] * (b - a), **extra}


def _window(length: int, max_length: int | None, side: str) -> tuple[int, int]:
    """The kept token range ``[a, b)`` of a row of `length` tokens: the first `max_length` ("right") or the last."""
    if max_length is None or length <= max_length:
        return 0, length
    return (length - max_length, length) if side == "left" else (0, max_length)


def stored_ids(row: dict[str, Any]) -> tuple[list[int], list[bool]] | None:
    """A generated row's own token ids (`hf-distill generate` stores them: re-tokenising the text could give other
    ids), prompt then completion, the completion counting; None for rows without them."""
    prompt, completion = row.get("prompt_ids"), row.get("completion_ids")
    if prompt is None or completion is None:
        return None
    return [*prompt, *completion], [False] * len(prompt) + [True] * len(completion)


def _cached_columns(row: dict[str, Any], prompt_length: int, window: tuple[int, int]) -> dict[str, list[Any]]:
    """The teacher-cache columns of a generated row, kept for the completion tokens that still count after
    truncation: completion token j (absolute index P + j) counts at position P + j - 1, so it stays when
    ``a + 1 <= P + j < b``."""
    if CACHE_COLUMNS[0] not in row:
        return {}
    n = len(row[CACHE_COLUMNS[2]])
    k = len(row[CACHE_COLUMNS[0]]) // max(n, 1)
    first, last = max(0, window[0] + 1 - prompt_length), min(n, window[1] - prompt_length)
    last = max(first, last)
    return {CACHE_COLUMNS[0]: row[CACHE_COLUMNS[0]][first * k: last * k],
            CACHE_COLUMNS[1]: row[CACHE_COLUMNS[1]][first * k: last * k],
            CACHE_COLUMNS[2]: row[CACHE_COLUMNS[2]][first:last]}


def tokenize_row(row: dict[str, Any], tokenizer: Any, data_format: str, max_length: int | None = None,
                 truncation_side: str = "right") -> dict[str, list[Any]]:
    """One row as ``input_ids``, ``attention_mask`` and ``labels`` (the id where the token counts, else -100); a
    generated row keeps its stored ids (`stored_ids`) and its teacher-cache columns for the counted tokens."""
    check_choice("truncation_side", truncation_side, ("right", "left"))
    stored = stored_ids(row) if data_format == "prompt_completion" else None
    if stored is not None:
        ids, counted = stored
    elif data_format == "messages":
        ids, counted = conversation_mask(tokenizer, row["messages"])
    elif data_format == "prompt_completion":
        ids, counted = prompt_completion_mask(tokenizer, row["prompt"], row["completion"])
    else:
        raise ValueError(f"tokenize_row makes training rows from messages or prompt-completion data, not {data_format}.")
    a, b = _window(len(ids), max_length, truncation_side)
    if stored is not None and a > 0 and CACHE_COLUMNS[0] in row:
        raise ValueError(
            f"A generated row with the teacher's top-k has {len(ids)} tokens, over --max_length {max_length}, and "
            "--truncation_side left would cut the start of its prompt: its cached targets were computed on context "
            f"the student would not see. Raise --max_length to at least {len(ids)}, or use --truncation_side right "
            "(the targets of the tokens kept stay right)."
        )
    out = {"input_ids": ids[a:b], "attention_mask": [1] * (b - a),
           "labels": [i if c else IGNORE_INDEX for i, c in zip(ids[a:b], counted[a:b])]}
    if stored is not None:
        out.update(_cached_columns(row, len(row["prompt_ids"]), (a, b)))
    if TEACHER_PROMPTS in row:
        out[TEACHER_PROMPTS] = list(row[TEACHER_PROMPTS])
    return out


#: The conversation rendered to find a template's end-of-turn token and to compare two tokenizers' renderings.
PROBE = [{"role": "system", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]


def end_of_turn_id(tokenizer: Any) -> int | None:
    """The token that closes an assistant turn in the chat template: the last counted token of a rendered turn."""
    ids, counted = conversation_mask(tokenizer, PROBE)
    last = max((i for i, c in enumerate(counted) if c), default=None)
    return None if last is None else ids[last]


def stop_ids(tokenizer: Any, conversational: bool) -> list[int]:
    """What ends a generated completion: the chat template's end-of-turn token (for conversational prompts) and the
    tokenizer's end of sequence."""
    stops = [end_of_turn_id(tokenizer) if conversational else None, tokenizer.eos_token_id]
    return [t for t in dict.fromkeys(stops) if t is not None]


def pad_id(tokenizer: Any, stops: Sequence[int] = ()) -> int:
    """The id batches are padded with (its value never counts: the mask hides it): the tokenizer's pad token, else the
    first of `stops` (what ends a completion), else its end-of-sequence token."""
    pad = next((t for t in (tokenizer.pad_token_id, *stops, tokenizer.eos_token_id) if t is not None), None)
    if pad is None:
        raise ValueError("The tokenizer has neither a pad token nor an end-of-sequence token to pad batches with: set "
                         "tokenizer.pad_token (e.g. to its end-of-text token).")
    return pad


def left_padded(prompts: list[list[int]], pad: int, device: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts as one batch padded on the left (generation continues every row at the same column): ids and mask."""
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


def end_completion(tokens: list[int], stops: Sequence[int]) -> list[int]:
    """A generated row cut after its first stop token (kept: it counts); the rest is padding."""
    end = next((i for i, t in enumerate(tokens) if t in stops), None)
    return tokens if end is None else tokens[: end + 1]


def chat_generation_config(model: Any, tokenizer: Any) -> None:
    """Make `model.generation_config` stop at the template's end-of-turn token (and the tokenizer's end of
    sequence) and pad with the tokenizer's pad token, so ``pipeline("text-generation")`` answers a `messages` list
    with one assistant turn."""
    stops = [t for t in dict.fromkeys([end_of_turn_id(tokenizer), tokenizer.eos_token_id]) if t is not None]
    config = model.generation_config
    config.eos_token_id = stops[0] if len(stops) == 1 else stops
    config.pad_token_id = pad_id(tokenizer, stops)


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
        if TEACHER_PROMPTS in features[0]:  # ragged: kept as lists
            batch[TEACHER_PROMPTS] = [list(f[TEACHER_PROMPTS]) for f in features]
        return batch


class PackedCollator:
    """Pads a batch of packed rows (`pack_rows`) on the right and gives ``input_ids``, ``labels`` and
    ``position_ids`` (restarting at 0 for every conversation, and for the padding) and no ``attention_mask``: from
    those, transformers' attention masks (`masking_utils`) keep every token to its own conversation. Padding never
    counts (labels -100)."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        batch = {}
        for key, fill in (("input_ids", self.pad_token_id), ("labels", IGNORE_INDEX)):
            batch[key] = torch.tensor([list(f[key]) + [fill] * (width - len(f[key])) for f in features])
        batch["position_ids"] = torch.tensor([list(f["position_ids"]) + list(range(width - len(f["position_ids"])))
                                              for f in features])
        return batch


def pack_rows(dataset: Any, max_length: int) -> Any:
    """Tokenised rows (`tokenize_row`) packed in order into rows of at most `max_length` tokens: a row joins the
    current pack while it fits, else starts the next. Each pack's ``position_ids`` restart at 0 at every row's first
    token, whose label is -100 (no conversation predicts the next one's first token); per-row teacher-cache columns
    are concatenated in order, like the counted positions."""
    cached = [c for c in CACHE_COLUMNS if c in dataset.column_names]
    keys = ["input_ids", "labels", *cached]

    def pack(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {k: [] for k in (*keys, "position_ids")}
        current: dict[str, list[Any]] = {k: [] for k in (*keys, "position_ids")}

        def close() -> None:
            if current["input_ids"]:
                for k in out:
                    out[k].append(current[k])
                    current[k] = []

        for i, ids in enumerate(batch["input_ids"]):
            if len(current["input_ids"]) + len(ids) > max_length:
                close()
            current["input_ids"] += ids
            current["labels"] += [IGNORE_INDEX, *batch["labels"][i][1:]]
            current["position_ids"] += list(range(len(ids)))
            for c in cached:
                current[c] += batch[c][i]
        close()
        return out

    packed = dataset.map(pack, batched=True, batch_size=1000, remove_columns=dataset.column_names, desc="Packing")
    packed.info.description = dataset.info.description
    logger.warning("Packed %d rows into %d rows of at most %d tokens.", len(dataset), len(packed), max_length)
    return packed


def check_packing_supported(model: Any, name: str = "model") -> None:
    """Packing needs a model whose attention keeps packed conversations apart (transformers' `masking_utils` masks,
    built from ``position_ids`` when there is no ``attention_mask`` and no KV cache): checked on a short sequence
    packed after another one, which must give the logits of the sequence alone."""
    parameter = next(model.parameters())
    vocab = int(model.config.vocab_size)
    first = (torch.arange(3, device=parameter.device) * 7 + 5) % vocab
    ids = torch.arange(1, 5, device=parameter.device) % vocab
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            alone = model(input_ids=ids[None], use_cache=False).logits[0]
            positions = torch.cat([torch.arange(3), torch.arange(4)]).to(ids.device)[None]
            packed = model(input_ids=torch.cat([first, ids])[None], position_ids=positions,
                           use_cache=False).logits[0, 3:]
    finally:
        model.train(was_training)
    if not torch.allclose(alone.float(), packed.float(), atol=1e-3, rtol=1e-3):
        raise ValueError(
            f"The {name} ({type(model).__name__}) lets packed conversations attend to each other (its attention does "
            "not restart at position_ids 0): train without --packing (rows are padded per batch instead)."
        )



def prepare_chat_dataset(dataset: Any, tokenizer: Any, max_length: int | None = None, data_format: str | None = None,
                         truncation_side: str = "right", packing: bool = False, prompts: bool = False,
                         drop_empty: bool = True) -> tuple[Any, Any]:
    """A `datasets.Dataset` of conversations or prompt-completion rows, tokenised with completion-only labels, and
    the collator to train on it with; rows left with nothing counted (after truncation) are dropped and counted in
    the log. With `packing` the rows are packed into rows of at most `max_length` tokens (`pack_rows`, with
    `PackedCollator`); otherwise each batch is padded (`CompletionCollator`). `prompts`: prompt-only data is accepted
    (rows that count nothing, for on-policy distillation to complete; `prompt_row`). Rows with an empty answer are
    dropped or refused (`row_filters.drop_empty_answers`; `drop_empty=False`: the caller did it already)."""
    data_format = detect_rows_format(dataset, data_format)
    needed = {"messages": ["messages"], "prompt_completion": ["prompt", "completion"]}.get(data_format, [])
    missing = [c for c in needed if c not in dataset.column_names]
    if missing:
        raise ValueError(f"{data_format} data needs the column(s) {missing}; the dataset has {dataset.column_names}.")
    if data_format == "prompt_only" and prompts:
        rows = dataset.map(lambda row: prompt_row(row, tokenizer, max_length), remove_columns=dataset.column_names,
                           desc="Tokenising prompts")
        return rows, CompletionCollator(pad_id(tokenizer))
    if data_format not in ("messages", "prompt_completion"):
        raise ValueError(
            f"Training needs messages or prompt-completion data; this is {data_format} data (prompt-only data is the "
            "input of generation: answer the prompts with the teacher first, `hf-distill generate`, and distil on "
            "its output, or let the student answer them on-policy, lmbda=1; text data goes through the plain "
            "language-modelling path)."
        )
    if drop_empty:
        (dataset,) = drop_empty_answers([dataset], data_format, ("",))
    if data_format == "messages" or not isinstance(dataset[0]["prompt"], str):
        check_chat_tokenizer(tokenizer)
    pad = pad_id(tokenizer)
    tokenised = dataset.map(lambda row: tokenize_row(row, tokenizer, data_format, max_length, truncation_side),
                            remove_columns=dataset.column_names, desc="Tokenising")
    kept = tokenised.filter(lambda row: any(label != IGNORE_INDEX for label in row["labels"][1:]), desc="Dropping")
    dropped = len(tokenised) - len(kept)
    if dropped:
        logger.warning("%d of %d rows have no counted token (no assistant turn, or cut to --max_length %s: raise it, "
                       "or --truncation_side left keeps the ends): dropped.", dropped, len(tokenised), max_length)
    if not len(kept):
        raise ValueError(f"No row has a token to learn from (every answer is empty or cut away by --max_length "
                         f"{max_length}: raise it, or --truncation_side left keeps the ends of the rows).")
    description = getattr(dataset.info, "description", None) or ""
    if CACHE_COLUMNS[0] in kept.column_names and description.startswith(MANIFEST_MARKER):
        kept.info.description = description  # a generations folder with top-k: the rows are a teacher cache
    if packing:
        if max_length is None:
            raise ValueError("Packing needs max_length: the length of the packed rows.")
        return pack_rows(kept, max_length), PackedCollator(pad)
    return kept, CompletionCollator(pad)
