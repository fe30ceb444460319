"""Cross-tokenizer alignment: the same text cut into tokens by two tokenizers, grouped into spans that cover the
same characters, and a map between the two vocabularies' tokens that spell the same string.

- Each token has a character span ``[start, end)`` in the text: the student's from decoding its ids
  (`decoded_offsets`, exact for any ids, sampled ones included), the teacher's from its tokenizer's offset mapping
  (`teacher_offsets`, fast tokenizers only). Tokens that cover no character (special tokens, role headers rendered
  as special tokens, BOS / EOS) are not content: they belong to no span.
- `align_spans`: a span closes at every character where a student token and a teacher token both end; each side's
  content tokens up to there form the span (one token on one side may face three on the other). Tokens after the
  last shared end belong to no span.
- `VocabularyMap`: teacher id -> student id for tokens whose decoded strings are equal (``Ġthe``, ``▁the`` and a
  word-initial WordPiece ``the`` all spell " the"), built once from the two tokenizers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

#: (start, end) character offsets of each token in its row's text; start == end: the token covers no text
Offsets = list[tuple[int, int]]


def check_fast(tokenizer: Any, who: str) -> None:
    """Offsets come from a fast (Rust) tokenizer's offset mapping: refuse a slow one, naming the fix."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"The {who} tokenizer ({type(tokenizer).__name__}) is a slow tokenizer without offset mappings, which "
            "cross-tokenizer alignment needs: load the fast one, AutoTokenizer.from_pretrained(..., use_fast=True) "
            "(or convert it: transformers.PreTrainedTokenizerFast(tokenizer_object=...))."
        )


def decoded_offsets(tokenizer: Any, ids: Sequence[int]) -> tuple[str, Offsets]:
    """The text of `ids` (decoded, special tokens skipped) and each token's character span in it.

    Token k ends where the decoded prefix ``ids[:k + 1]`` ends, when that prefix is a prefix of the text; the pieces
    of one character (byte-level pieces of an emoji) all span that character, so they end together. A special token
    covers no character.
    """
    ids = [int(i) for i in ids]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the Rust decoder directly (the Python wrapper converts every list element again)
        text = backend.decode(ids, skip_special_tokens=True)
        prefixes = backend.decode_batch([ids[: k + 1] for k in range(len(ids))], skip_special_tokens=True)
    else:
        options = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}
        text = tokenizer.decode(ids, **options)
        prefixes = tokenizer.batch_decode([ids[: k + 1] for k in range(len(ids))], **options)
    ends: list[int | None] = [len(p) if text.startswith(p) else None for p in prefixes]
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())
    offsets: Offsets = []
    start = 0  # where the last token that ended on a character boundary ended
    for k, token in enumerate(ids):
        if token in special:
            offsets.append((start, start))
            continue
        end = ends[k]
        resolved = end is not None
        if not resolved:  # inside a character: it ends with the first later token that ends on a boundary
            end = next((e for e in ends[k + 1:] if e is not None), len(text))
        end = max(end, start)
        offsets.append((start, end))
        if resolved:
            start = end
    return text, offsets


def teacher_offsets(tokenizer: Any, texts: Sequence[str],
                    add_special_tokens: bool = True) -> tuple[list[list[int]], list[Offsets]]:
    """The teacher's tokens of each text (with its special tokens, e.g. BOS, unless `add_special_tokens` is False)
    and their character offsets (special tokens: empty spans); refuses offsets that leave text uncovered
    (`check_coverage`)."""
    check_fast(tokenizer, "teacher")
    encoded = tokenizer(list(texts), add_special_tokens=add_special_tokens, return_offsets_mapping=True,
                        return_special_tokens_mask=True)
    rows, offsets = [], []
    for text, ids, spans, special in zip(texts, encoded["input_ids"], encoded["offset_mapping"],
                                         encoded["special_tokens_mask"]):
        spans = [(0, 0) if s else (int(a), int(b)) for (a, b), s in zip(spans, special)]
        for k in range(len(spans) - 2, -1, -1):  # tokens sharing a character (byte pieces) end together
            (a, b), (c, d) = spans[k], spans[k + 1]
            if b > a and d > c and c < b:
                spans[k] = (a, max(b, d))
        check_coverage(text, spans, "teacher")
        rows.append(list(ids))
        offsets.append(spans)
    return rows, offsets


def check_coverage(text: str, offsets: Offsets, who: str) -> None:
    """Every non-space character of `text` must lie in some token's span (normalising tokenizers, e.g. uncased
    WordPiece, are fine: their offsets point into the original text); else refuse, showing the first uncovered
    text."""
    covered = bytearray(len(text))
    for start, end in offsets:
        covered[start:end] = b"\x01" * max(0, min(end, len(text)) - start)
    for i, char in enumerate(text):
        if not covered[i] and not char.isspace():
            stop = i
            while stop < len(text) and not covered[stop]:
                stop += 1
            raise ValueError(
                f"The {who} tokenizer's offsets do not cover the text: no token covers {text[i:stop][:40]!r} (at "
                f"character {i} of {text[max(0, i - 20):i + 20]!r}). Cross-tokenizer alignment needs offsets into "
                "the original text: use a tokenizer whose normaliser keeps offsets (a fast tokenizer), or clean the "
                "text of what it drops."
            )


def align_spans(student: Offsets, teacher: Offsets) -> list[tuple[list[int], list[int]]]:
    """Spans of the same text: ``[(student token indices, teacher token indices), ...]`` in text order.

    A span ends at each character where both a student and a teacher content token end; every content token
    (non-empty span) joins the first span ending at or after its end. Tokens after the last shared end, and tokens
    covering no text, belong to no span.
    """
    s_ends = {end for start, end in student if end > start}
    t_ends = {end for start, end in teacher if end > start}
    shared = sorted(s_ends & t_ends)
    if not shared:
        return []
    groups: list[tuple[list[int], list[int]]] = [([], []) for _ in shared]
    for side, offsets in ((0, student), (1, teacher)):
        g = 0
        for index, (start, end) in enumerate(offsets):
            if end <= start:
                continue
            while g < len(shared) and shared[g] < end:
                g += 1
            if g == len(shared):
                break
            groups[g][side].append(index)
    return [(s, t) for s, t in groups if s and t]


def piece_strings(tokenizer: Any) -> list[str | None]:
    """What each id spells in running text, with its leading space (``Ġthe``, ``▁the`` and a word-initial WordPiece
    ``the`` -> " the"; ``##ing`` -> "ing"), decoded after an anchor token so that decoders that strip a first
    token's space keep it; None for special tokens and pieces that are not whole characters (a byte of an emoji)."""
    size = len(tokenizer)
    anchor = next((i for i in tokenizer.convert_tokens_to_ids(["a", "▁a", "Ġa"]) if i is not None
                   and i != tokenizer.unk_token_id), None)
    if anchor is None:
        anchor = tokenizer("a", add_special_tokens=False)["input_ids"][0]
    options = {"skip_special_tokens": False, "clean_up_tokenization_spaces": False}
    base = tokenizer.decode([anchor], **options)
    decoded = tokenizer.batch_decode([[anchor, i] for i in range(size)], **options)
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())
    strings: list[str | None] = []
    for i, text in enumerate(decoded):
        piece = text[len(base):] if text.startswith(base) else None
        if i in special or not piece or "\ufffd" in piece:
            piece = None
        strings.append(piece)
    return strings


@dataclass
class VocabularyMap:
    """Teacher ids and the student ids that spell the same string (`teacher_ids[i]` <-> `student_ids[i]`), and the
    vocabulary sizes; `identity` when both tokenizers share one vocabulary (every id maps to itself)."""

    teacher_ids: torch.Tensor
    student_ids: torch.Tensor
    teacher_size: int
    student_size: int
    identity: bool = False

    @classmethod
    def build(cls, student_tokenizer: Any, teacher_tokenizer: Any, student_size: int | None = None,
              teacher_size: int | None = None) -> "VocabularyMap":
        """The map of two tokenizers (sizes: the models' output widths, at least the tokenizers' lengths); the
        identity when their vocabularies are equal. Each string maps once (its lowest id on each side)."""
        student_size = max(student_size or 0, len(student_tokenizer))
        teacher_size = max(teacher_size or 0, len(teacher_tokenizer))
        if student_tokenizer.get_vocab() == teacher_tokenizer.get_vocab():
            ids = torch.arange(min(student_size, teacher_size))
            return cls(ids, ids.clone(), teacher_size, student_size, identity=True)
        student = {}
        for i, piece in enumerate(piece_strings(student_tokenizer)):
            if piece is not None:
                student.setdefault(piece, i)
        pairs, seen = [], set()
        for i, piece in enumerate(piece_strings(teacher_tokenizer)):
            if piece is not None and piece in student and piece not in seen:
                seen.add(piece)
                pairs.append((i, student[piece]))
        teacher_ids = torch.tensor([t for t, _ in pairs], dtype=torch.long)
        student_ids = torch.tensor([s for _, s in pairs], dtype=torch.long)
        return cls(teacher_ids, student_ids, teacher_size, student_size)

    def __len__(self) -> int:
        return int(self.teacher_ids.numel())

    def masks(self, student_width: int, teacher_width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Bool masks of the mapped ids over the models' output widths: ``[student_width]``, ``[teacher_width]``."""
        student = torch.zeros(student_width, dtype=torch.bool, device=device)
        teacher = torch.zeros(teacher_width, dtype=torch.bool, device=device)
        student[self.student_ids.to(device)] = True
        teacher[self.teacher_ids.to(device)] = True
        return student, teacher
