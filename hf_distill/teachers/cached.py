"""The offline teacher: top-k output distributions stored with the training set (`hf-distill cache-teacher`)."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from transformers.utils import logging

from ..data.teacher_cache import CACHE_COLUMNS, tokenizer_hash
from ..signals import fields_where
from ..signals.logits import check_cacheable
from ..signals.output import CachedTargets
from .base import TeacherOutputs, TeacherRequest, TeacherSource

logger = logging.get_logger(__name__)


class CachedTeacher(TeacherSource):
    """Teacher targets read from the batch (the cache columns, collated by `TeacherCacheCollator`): no teacher
    model runs. Serves the signals that declare `works_from_cache` (the soft output term), at the cache's
    temperature and for the tokenizer it was made with."""

    def __init__(self, manifest: dict[str, Any]) -> None:
        self.manifest = manifest

    def outputs(self, inputs: Mapping[str, Any], request: TeacherRequest) -> TeacherOutputs | None:
        if CACHE_COLUMNS[0] not in inputs:
            return None  # an evaluation batch without the cache: no teacher terms
        ids, log_probs, tail = (inputs[name] for name in CACHE_COLUMNS)
        counted = int(request.mask.sum())
        if ids.shape[0] != counted:
            raise ValueError(
                f"The teacher cache holds {ids.shape[0]} positions for this batch, but the batch counts {counted}: the "
                "cache was built from other data, labels or collation. Rebuild it with `hf-distill cache-teacher` on "
                "the training data as tokenised for this run."
            )
        return TeacherOutputs(CachedTargets(ids.long(), log_probs, tail))

    def input_columns(self) -> list[str]:
        return list(CACHE_COLUMNS)

    def batch_only_keys(self) -> tuple[str, ...]:
        return CACHE_COLUMNS

    def wrap_collator(self, collator: Callable) -> Callable:
        return TeacherCacheCollator(collator)

    def declared_vocab_size(self) -> int | None:
        return self.manifest.get("vocab_size")

    def check_run(self, args: Any, active: dict[str, float], processing_class: Any = None) -> None:
        """A cache serves the output-distribution term only, at the temperature and for the tokenizer it was made
        for (the same vocabulary hash: its token ids must mean the student's tokens)."""
        others = fields_where(args, needs_teacher=True, works_from_cache=False)
        if others:
            raise ValueError(
                f"The training set is an offline teacher cache, which holds the teacher's top-k output distributions "
                f"only; {', '.join(f'{k}={v}' for k, v in others.items())} need(s) the live teacher's internals. Pass "
                "teacher_model=... (and the plain tokenised dataset), or set these weights to 0."
            )
        if getattr(args, "logits_weight", 0) > 0:
            check_cacheable(args.logits_loss)
        made_at = float(self.manifest.get("temperature", 1.0))
        if abs(made_at - args.temperature) > 1e-9:
            raise ValueError(
                f"The teacher cache holds log-probabilities at temperature {made_at}, but temperature="
                f"{args.temperature}: set temperature={made_at}, or rebuild the cache with --temperature "
                f"{args.temperature}."
            )
        expected = self.manifest.get("tokenizer_hash")
        if processing_class is not None and expected and hasattr(processing_class, "get_vocab"):
            if tokenizer_hash(processing_class) != expected:
                raise ValueError(
                    f"The teacher cache was made for another tokenizer (teacher {self.manifest.get('teacher_id')!r}): "
                    "its token ids mean other tokens for this student. Rebuild the cache with the student's tokenizer "
                    "(`hf-distill cache-teacher`), or distil from the live teacher."
                )
        elif processing_class is None:
            logger.warning(
                "Training from a teacher cache without processing_class: the cache's tokenizer cannot be checked "
                "against the student's. Pass processing_class=tokenizer to check it."
            )


class TeacherCacheCollator:
    """Collates cache rows: `base_collator` on the rest of each row, plus the cache columns of the batch concatenated
    in example order, ``teacher_topk_ids`` long ``[N, k]``, ``teacher_topk_logprobs`` float32 ``[N, k]`` and
    ``teacher_tail_logprob`` float32 ``[N]`` (N = the batch's counted positions). Rows without them pass through."""

    def __init__(self, base_collator: Callable[[list[dict[str, Any]]], Any]):
        self.base_collator = base_collator

    def __call__(self, features: list[dict[str, Any]]) -> Any:
        if not features or CACHE_COLUMNS[0] not in features[0]:
            return self.base_collator(features)
        rest = [{k: v for k, v in feature.items() if k not in CACHE_COLUMNS} for feature in features]
        batch = self.base_collator(rest)
        ids = [torch.as_tensor(f[CACHE_COLUMNS[0]], dtype=torch.long).reshape(-1) for f in features]
        log_probs = [torch.as_tensor(f[CACHE_COLUMNS[1]], dtype=torch.float32).reshape(-1) for f in features]
        tails = [torch.as_tensor(f[CACHE_COLUMNS[2]], dtype=torch.float32).reshape(-1) for f in features]
        total = sum(len(t) for t in tails)
        k = sum(len(i) for i in ids) // total if total else 0
        for i, (a, b, c) in enumerate(zip(ids, log_probs, tails)):
            if len(a) != k * len(c) or len(b) != len(a):
                raise ValueError(
                    f"Teacher-cache row {i} of the batch holds {len(a)} ids and {len(b)} log-probabilities for "
                    f"{len(c)} positions (expected {k} each): the cache is damaged; rebuild it."
                )
        batch[CACHE_COLUMNS[0]] = torch.cat(ids).reshape(total, k)
        batch[CACHE_COLUMNS[1]] = torch.cat(log_probs).reshape(total, k)
        batch[CACHE_COLUMNS[2]] = torch.cat(tails)
        return batch
