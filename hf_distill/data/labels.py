"""Classification labels: how a dataset's label values become the teacher's class ids (by name, by value, or sorted
with a warning), and the checks that every row has a label to learn from."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import datasets

#: The names transformers gives labels nobody named (``LABEL_0``, ``LABEL_1``, ...): nothing to match by.
GENERIC_LABEL = re.compile(r"^LABEL_\d+$")


def named_labels(config: Any) -> dict[int, str] | None:
    """A classifier config's ``id2label`` when it names its labels, None when the names are transformers' generic
    ``LABEL_i`` (or there is no label set)."""
    id2label = getattr(config, "id2label", None) or {}
    if not id2label or all(GENERIC_LABEL.match(str(name)) for name in id2label.values()):
        return None
    return {int(k): str(v) for k, v in id2label.items()}


@dataclass
class LabelPlan:
    """How a dataset's label values become the model's class ids: ``value -> id`` (`mapping`, or by value for
    integers when None), the label set the models get (`id2label`), how it was decided (`by`: "name", "value" or
    "sorted"), and, where the mapping was guessed, the warning that says so."""

    id2label: dict[int, str]
    by: str
    mapping: dict[Any, int] | None = None
    warning: str | None = None

    def ids(self, values: list[Any]) -> list[int]:
        """The class ids of `values` (a `ValueError` names the ones outside the label set)."""
        if self.mapping is not None:
            unknown = sorted({str(v) for v in values if v not in self.mapping})
            if unknown:
                raise ValueError(
                    f"Labels {unknown} are not in the label set {sorted(map(str, self.mapping))}: they never occur in "
                    "the training split, or the teacher does not know them."
                )
            return [self.mapping[v] for v in values]
        ids = [_integral(v) for v in values]
        unknown = sorted({v for v in ids if not 0 <= v < len(self.id2label)})
        if unknown:
            raise ValueError(f"Labels {unknown} lie outside the {len(self.id2label)} classes 0..{len(self.id2label) - 1}.")
        return ids

    @property
    def described(self) -> str:
        """The mapping in words, e.g. ``'neg' -> 0, 'pos' -> 1``."""
        if self.mapping is None:
            return ", ".join(f"{i} -> {i} ({name})" for i, name in self.id2label.items())
        return ", ".join(f"{value!r} -> {i}" for value, i in sorted(self.mapping.items(), key=lambda kv: kv[1]))


def check_label_values(values: list[Any], column: str, task: str, split: str = "training") -> None:
    """Labels must be there: no empty, blank or missing (None) label, and for regression finite numbers (a NaN
    target makes the loss NaN). A `ValueError` names the column, how many rows and the first of them."""
    def bad(value: Any) -> bool:
        if value is None or (isinstance(value, str) and not value.strip()):
            return True
        if task != "regression":
            return False
        try:
            return not math.isfinite(float(value))
        except (TypeError, ValueError):
            return True

    rows = [i for i, value in enumerate(values) if bad(value)]
    if rows:
        kind = "blank or missing" if task != "regression" else "blank, missing or non-numeric / non-finite (NaN, inf)"
        examples = ", ".join(repr(values[i]) for i in rows[:3])
        raise ValueError(
            f"{len(rows)} of {len(values)} {split} rows have a {kind} label in column {column!r} (e.g. {examples}): "
            "fill them in or drop those rows" + (" (regression targets must be finite numbers)."
                                                 if task == "regression" else ".")
        )


def _integral(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
        raise ValueError(
            f"Classification labels must be class names or integer ids, got {value!r}. For numeric targets use "
            "--task regression."
        )
    return int(value)


def label_plan(train: datasets.Dataset, column: str, teacher_labels: dict[int, str] | None = None,
               teacher_num_labels: int | None = None) -> LabelPlan:
    """How the labels of `column` map to class ids, given the teacher's named labels (`teacher_labels`) and, for a
    teacher with a trained head, its number of classes (`teacher_num_labels`).

    Names map to the teacher's ids by name; integers are ids by value; a teacher without names (``LABEL_i``) gets the
    sorted names (or a `ClassLabel`'s order) as ids 0..n-1, with a warning that the order is assumed. Labels the
    teacher does not know are refused.
    """
    feature = train.features[column]
    values = train[column]
    if isinstance(feature, datasets.ClassLabel):
        names, ordered = list(feature.names), True
    elif getattr(feature, "dtype", None) in ("string", "large_string") or (values and isinstance(values[0], str)):
        names, ordered = sorted(set(values)), False
    else:
        ids = sorted({_integral(v) for v in values})
        size = teacher_num_labels or (len(teacher_labels) if teacher_labels else None)
        if size is not None and (ids[0] < 0 or ids[-1] >= size):
            raise ValueError(
                f"Labels {[v for v in ids if not 0 <= v < size]} in column {column!r} are not among the teacher's "
                f"{size} classes (ids 0..{size - 1}"
                + (f": {teacher_labels}" if teacher_labels else "") + "). Use a teacher trained on this label set."
            )
        if ids[0] < 0:
            raise ValueError(f"Labels {[v for v in ids if v < 0]} in column {column!r} are negative: class ids are 0, "
                             "1, 2, ...")
        id2label = teacher_labels or {i: str(i) for i in range(size or ids[-1] + 1)}
        return LabelPlan(id2label, "value")
    if teacher_labels is not None:
        by_name = {name: i for i, name in teacher_labels.items()}
        folded = {name.casefold(): i for name, i in by_name.items()}
        mapping = {}
        for name in names:
            i = by_name.get(name, folded.get(str(name).casefold()) if len(folded) == len(by_name) else None)
            if i is not None:
                mapping[name] = i
        unknown = [name for name in names if name not in mapping]
        if unknown:
            raise ValueError(
                f"Labels {unknown} in column {column!r} are not in the teacher's label set "
                f"{sorted(teacher_labels.values())} (its config.id2label): the teacher cannot teach them. Use a "
                "teacher trained on these labels, or rename them to the teacher's names."
            )
        return LabelPlan(dict(teacher_labels), "name", mapping)
    if teacher_num_labels is not None and len(names) > teacher_num_labels:
        raise ValueError(
            f"The data has {len(names)} labels {names} in column {column!r}, the teacher only {teacher_num_labels} "
            "classes: it cannot teach the others. Use a teacher trained on this label set."
        )
    mapping = {name: i for i, name in enumerate(names)}
    plan = LabelPlan(dict(enumerate(names)), "sorted", mapping)
    if teacher_num_labels is not None:
        order = "in the dataset's ClassLabel order" if ordered else "in sorted order"
        plan.warning = (
            f"The teacher's labels have no names (LABEL_0, LABEL_1, ...), so the data's labels are assumed to be its "
            f"classes {order}: {plan.described}. If the teacher was trained with another order, its soft targets "
            "teach the wrong classes: give the teacher's config an id2label with the names."
        )
    return plan
