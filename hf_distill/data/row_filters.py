"""Rows that would teach the wrong thing, dropped with a count or, past a share that says the data is broken,
refused: answers that are empty (a blank, null or missing assistant turn or completion teaches "end the answer at
once")."""

from __future__ import annotations

from typing import Any, Sequence

from transformers.utils import logging

logger = logging.get_logger(__name__)


#: The largest share of rows with an empty answer that is dropped (with a count); more is refused.
MAX_EMPTY_SHARE = 0.05


def _blank(content: Any) -> bool:
    return content is None or (isinstance(content, str) and not content.strip())


def empty_answer(value: Any) -> bool:
    """Whether a row's answer is empty: a completion string that is blank, or a conversation / completion turns with
    an assistant turn whose content is blank, null or missing (or no turn at all)."""
    if value is None or isinstance(value, str):
        return _blank(value)
    if not isinstance(value, (list, tuple)) or not value:
        return True
    return any(isinstance(t, dict) and t.get("role") == "assistant" and _blank(t.get("content")) for t in value)


def drop_empty_answers(splits: Sequence[Any], data_format: str, names: Sequence[str] = ("training", "held-out")
                       ) -> list[Any]:
    """The splits without rows whose answer is empty (`empty_answer`; for generated rows, also at most one token
    written): such rows teach "end the answer at once".
    Their number is logged; more than `MAX_EMPTY_SHARE` of all rows is refused (the data is broken)."""
    column = {"messages": "messages", "prompt_completion": "completion"}.get(data_format)
    if column is None or not all(column in split.column_names for split in splits):
        return list(splits)
    empty = []
    for split in splits:  # a generated row (`completion_ids`) is empty when the teacher wrote at most its stop token
        ids = split["completion_ids"] if "completion_ids" in split.column_names else None
        empty.append([i for i, value in enumerate(split[column])
                      if empty_answer(value) and (ids is None or len(ids[i]) <= 1)])
    total, dropped = sum(len(split) for split in splits), sum(map(len, empty))
    if not dropped:
        return list(splits)
    where = ", ".join(f"{len(e)} {n}".strip() for e, n in zip(empty, names) if e)
    if dropped > MAX_EMPTY_SHARE * total:
        index = next(i for i, e in enumerate(empty) if e)
        raise ValueError(
            f"{dropped} of {total} rows ({100 * dropped / total:.0f}%) have an empty answer (an assistant turn or "
            f"completion that is blank, null or missing; e.g. rows {empty[index][:5]}"
            f"{f' of the {names[index]} split' if names[index] else ''}), over the {100 * MAX_EMPTY_SHARE:.0f}% "
            "that are dropped with a count: they would teach the student to end its answer at once. Fix or remove "
            "them (is the answer under another key than `content`?)."
        )
    logger.warning("Dropped %d of %d rows (%s) with an empty answer (blank, null or missing assistant content): they "
                   "would teach the student to end its answer at once.", dropped, total, where)
    out = []
    for split, bad in zip(splits, empty):
        if bad:
            description = split.info.description
            skip = set(bad)
            split = split.select([i for i in range(len(split)) if i not in skip], keep_in_memory=True)
            split.info.description = description
        out.append(split)
    return out
