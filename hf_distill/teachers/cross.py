"""A teacher with another tokenizer (cross-tokenizer distillation): `CrossTokenizerTeacher` wraps a live source and,
for each batch of student tokens, decodes every row to its text, tokenises that text for the teacher, aligns the two
token sequences into spans that cover the same characters (`hf_distill.data.alignment`), runs the teacher on its own
tokens, and hands the output term the counted spans (`signals.cross_vocab.AlignedSpans`).

- Works for every batch of student tokens: the dataset's, and the student's own samples on-policy (decoded and
  re-tokenised for the teacher, as any row).
- Counting follows the student: a span counts when every student token in it is counted; the output term is summed
  over counted spans and divided, like every output term, by the counted student positions of the step (exact under
  gradient accumulation and DDP). Counted positions in no span (special tokens, a row's first token) carry only
  the task loss.
- The teacher returns its final hidden states at the predicting positions; its logits are made a chunk of spans at a
  time (`logits_chunk_size`; "auto": `auto_chunk_size(V_t)` rows), so no ``[tokens, V_t]`` tensor of the batch exists.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from transformers.utils import logging

from ..data.alignment import Offsets, VocabularyMap, align_spans, check_fast, decoded_offsets, teacher_offsets
from ..data.chat import TEACHER_PROMPTS
from ..kernels.chunked import auto_chunk_size, chunking_obstacle, output_head
from ..positions import PositionUnit, infer_position_unit
from ..signals.cross_vocab import CROSS_LOSSES, AlignedSpans, SpanPooling, SpanSide, describe_vocab
from ..signals.registry import registered_signals
from .base import TeacherHeads, TeacherLogits, TeacherOutputs, TeacherRequest, TeacherSource

logger = logging.get_logger(__name__)


def _long(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


def _side(rows: list[int], tokens: list[int], sizes: list[int], device: torch.device) -> SpanSide:
    starts = [0]
    for size in sizes:
        starts.append(starts[-1] + size)
    group = [g for g, size in enumerate(sizes) for _ in range(size)]
    return SpanSide(_long(rows, device), _long(tokens, device), _long(group, device), _long(starts, device))


def _pooling(spans: list[tuple[list[int], list[tuple[int, int]]]], teacher_width: int,
             device: torch.device) -> SpanPooling:
    """`SpanPooling` of every aligned span: student flat positions, teacher (row, position) pairs."""
    s_index = [i for s, _ in spans for i in s]
    s_group = [g for g, (s, _) in enumerate(spans) for _ in s]
    t_index = [b * teacher_width + i for _, t in spans for b, i in t]
    t_group = [g for g, (_, t) in enumerate(spans) for _ in t]
    return SpanPooling(_long(s_index, device), _long(s_group, device), _long(t_index, device),
                       _long(t_group, device), len(spans))


class CrossTokenizerTeacher(TeacherSource):
    """Live teacher(s) with their own tokenizer (module docstring). `inner`: the live source; the tokenizers must be
    fast (offset mappings)."""

    aligns_tokens = True

    def __init__(self, inner: TeacherSource, student_tokenizer: Any, teacher_tokenizer: Any) -> None:
        check_fast(student_tokenizer, "student")
        check_fast(teacher_tokenizer, "teacher")
        self.inner = inner
        self.student_tokenizer, self.teacher_tokenizer = student_tokenizer, teacher_tokenizer
        self.vocab: VocabularyMap | None = None
        self.chunk_setting: Any = "auto"
        self.accelerator = None
        self._stats = [0, 0]  # spans, counted student positions of training batches since the last log
        self._training = False  # whether the next batch is a training micro-batch (`on_step` comes before each)

    @property
    def models(self) -> list[nn.Module]:
        return self.inner.models

    def prepare(self, accelerator: Any, args: Any, signals: list, on_new_models: Callable[[], None]) -> None:
        self.inner.prepare(accelerator, args, signals, on_new_models)
        self.accelerator = accelerator
        self.chunk_setting = args.logits_chunk_size
        self.precision = accelerator.autocast
        widths = [output_head(m).vocab_size for m in self.models if chunking_obstacle(m) is None]
        self.vocab = VocabularyMap.build(self.student_tokenizer, self.teacher_tokenizer,
                                         teacher_size=max(widths) if widths else None)
        if args.align_tokenizers == "always" and self.vocab.identity:
            logger.info("Cross-tokenizer path on one tokenizer (align_tokenizers='always').")
        logger.info("Teacher with another tokenizer: spans aligned on the text; %s.", describe_vocab(self.vocab))

    def check_run(self, args: Any, active: dict[str, float], processing_class: Any = None) -> None:
        if active.get("hidden_weight", 0) > 0 and args.hidden_span_pooling != "mean":
            raise ValueError(
                f"hidden_weight={active['hidden_weight']} matches hidden states token by token, but the teacher has "
                "another tokenizer, so their tokens do not correspond: set hidden_span_pooling='mean' (each aligned "
                "span's mean hidden state on both sides), or hidden_weight=0."
            )
        across = {cls.weight_field for cls in registered_signals() if cls.works_across_tokenizers}
        others = sorted(name for name in active if name not in across)
        if others:
            raise ValueError(
                f"{', '.join(f'{n}={active[n]}' for n in others)} compares the models token by token, but the teacher "
                "has another tokenizer, so their tokens do not correspond (no span-pooling option exists for them): "
                "set them to 0; logits_weight (logits_loss='uld' or 'hybrid') and hidden_weight (with "
                "hidden_span_pooling='mean') work across tokenizers."
            )
        if args.logits_weight > 0 and args.logits_loss not in CROSS_LOSSES:
            raise ValueError(
                f"logits_loss={args.logits_loss!r} compares the two distributions token by token, which needs one "
                f"vocabulary; the teacher has another tokenizer: use logits_loss='hybrid' (GOLD) or 'uld'."
            )
        if getattr(args, "seq_kd", False):
            raise ValueError("seq_kd=True trains on the teacher's generations, which are teacher tokens; with a teacher "
                             "of another tokenizer generate them first (hf-distill generate) and train on the text.")
        if isinstance(self.chunk_setting, int) and self.chunk_setting < 0:
            raise ValueError(f"logits_chunk_size={self.chunk_setting} must be >= 0 or 'auto'.")
        self.inner.check_run(args, active, processing_class)

    def outputs(self, inputs: Any, request: TeacherRequest) -> TeacherOutputs | None:
        ids, attention = inputs["input_ids"], inputs.get("attention_mask")
        device, width = ids.device, ids.shape[1]
        counted, id_rows = request.mask.tolist(), ids.tolist()
        pool = bool(request.forward_options.get("output_hidden_states"))  # (a hidden-state signal is on)
        teacher_ids, s_rows, s_tokens, s_sizes, t_positions, t_tokens, t_sizes = [], [], [], [], [], [], []
        pooled: list[tuple[list[int], list[tuple[int, int]]]] = []  # every span's token positions (hidden states)
        for b, (row_ids, t_prompt) in enumerate(zip(id_rows, inputs.get(TEACHER_PROMPTS) or [None] * len(id_rows))):
            keep = attention[b].bool() if torch.is_tensor(attention) else torch.ones_like(ids[b], dtype=torch.bool)
            positions = keep.nonzero().flatten().tolist()
            t_ids, s_off, t_off = self._row(positions, row_ids, counted[b], t_prompt)
            teacher_ids.append(t_ids)
            for s_idx, t_idx in align_spans(s_off, t_off):
                if pool:
                    pooled.append(([b * width + positions[i] for i in s_idx], [(b, i) for i in t_idx]))
                if s_idx[0] == 0 or t_idx[0] == 0:
                    continue  # nothing predicts a row's first token
                predictors = [positions[i] - 1 for i in s_idx]
                if not all(counted[b][p] for p in predictors):
                    continue
                s_rows += [b * width + p for p in predictors]
                s_tokens += [id_rows[b][positions[i]] for i in s_idx]
                s_sizes.append(len(s_idx))
                t_positions += [(b, i - 1) for i in t_idx]
                t_tokens += [t_ids[i] for i in t_idx]
                t_sizes.append(len(t_idx))
        if self._training:
            self._stats[0] += len(s_sizes)
            self._stats[1] += int(request.mask.sum())
            self._training = False
        teacher_inputs, needed = self._teacher_batch(teacher_ids, t_positions, device)
        head_only = all(chunking_obstacle(m) is None for m in self.models)
        inner_request = TeacherRequest(needed, forward_options=request.forward_options, head_only=head_only,
                                       soft=request.soft)
        result = self.inner.outputs(teacher_inputs, inner_request)
        if result is None:
            return None
        pooling = _pooling(pooled, teacher_inputs["input_ids"].shape[1], device) if pool else None
        aligned = AlignedSpans(
            _side(s_rows, s_tokens, s_sizes, device), _side(list(range(len(t_tokens))), t_tokens, t_sizes, device),
            self._teacher_logits(result, needed, head_only), self.vocab, self._chunk_rows(), pooling,
        )
        return TeacherOutputs(aligned, outputs=result.outputs, model=self.first_model)

    def _row(self, positions: list[int], row_ids: list[int], counted: list[bool],
             teacher_prompt: list[int] | None) -> tuple[list[int], Offsets, Offsets]:
        """One row for the teacher: its ids and both sides' character offsets. Plain rows: the whole decoded text,
        tokenised by the teacher. Chat rows with the teacher's own rendering of their prompt: that prompt (covering
        no text) followed by the teacher's tokens of the answer's text; the student's prompt covers no text either,
        so only the answer is aligned."""
        ids = [row_ids[p] for p in positions]
        if teacher_prompt is None:
            text, s_off = decoded_offsets(self.student_tokenizer, ids)
            (t_row,), (t_off,) = teacher_offsets(self.teacher_tokenizer, [text])
            return t_row, s_off, t_off
        start = next((k + 1 for k, p in enumerate(positions[:-1]) if counted[p]), len(ids))  # the first answer token
        text, s_off = decoded_offsets(self.student_tokenizer, ids[start:])
        (t_answer,), (t_off,) = teacher_offsets(self.teacher_tokenizer, [text], add_special_tokens=False)
        return (list(teacher_prompt) + t_answer, [(0, 0)] * start + s_off,
                [(0, 0)] * len(teacher_prompt) + t_off)

    def _teacher_batch(self, teacher_ids: list[list[int]], positions: list[tuple[int, int]],
                       device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The teacher's rows right-padded, and the mask of the positions that predict a counted span's token."""
        pad = self.teacher_tokenizer.pad_token_id
        pad = pad if pad is not None else (self.teacher_tokenizer.eos_token_id or 0)
        length = max(map(len, teacher_ids))
        input_ids = torch.full((len(teacher_ids), length), pad, dtype=torch.long, device=device)
        attention = torch.zeros_like(input_ids)
        for b, row in enumerate(teacher_ids):
            input_ids[b, : len(row)] = torch.tensor(row, dtype=torch.long, device=device)
            attention[b, : len(row)] = 1
        needed = torch.zeros_like(input_ids, dtype=torch.bool)
        if positions:
            where = torch.tensor(positions, dtype=torch.long, device=device)
            needed[where[:, 0], where[:, 1]] = True
        return {"input_ids": input_ids, "attention_mask": attention}, needed

    def _teacher_logits(self, result: TeacherOutputs, needed: torch.Tensor,
                        head_only: bool) -> Callable[[slice], torch.Tensor]:
        """Teacher logits of any of the needed rows (in span order), from its output layer chunk by chunk."""
        if not head_only:
            logits = result.form(TeacherLogits).logits[needed]
            logger.info_once("The teacher's full logits are kept for the batch (its output layer cannot be chunked).")
            return lambda rows: logits[rows].float()
        layers = result.form(TeacherHeads)

        def rows_logits(rows: slice) -> torch.Tensor:
            with torch.no_grad(), self.precision():
                each = [head.logits(h[rows]).float() for head, h in zip(layers.heads, layers.hidden)]
            return layers.combine(each) if layers.combine is not None else each[0]

        return rows_logits

    def _chunk_rows(self) -> int:
        if self.chunk_setting == "auto":
            return auto_chunk_size(self.vocab.teacher_size) if self.vocab is not None else 0
        return int(self.chunk_setting)

    def log_values(self) -> dict[str, float]:
        """Since the last log (summed over processes): ``aligned_spans`` and ``span_share`` (counted spans per
        counted student position)."""
        values = dict(self.inner.log_values())
        stats = torch.tensor(self._stats, dtype=torch.float64)
        if self.accelerator is not None and self.accelerator.num_processes > 1:
            device = self.accelerator.device
            stats = self.accelerator.gather(stats.float().to(device).reshape(1, -1)).sum(dim=0).double().cpu()
        spans, positions = stats.tolist()
        values.update({"aligned_spans": spans, "span_share": spans / positions if positions else 0.0})
        self._stats = [0, 0]
        return values

    def input_columns(self) -> list[str]:
        return [*self.inner.input_columns(), TEACHER_PROMPTS]

    def batch_only_keys(self) -> tuple[str, ...]:
        return (*self.inner.batch_only_keys(), TEACHER_PROMPTS)

    def on_step(self, state: Any) -> None:
        self._training = True
        self.inner.on_step(state)

    def prepare_batch(self, batch: Any, student: nn.Module, step: tuple[int, int] = (0, 0)) -> Any:
        return self.inner.prepare_batch(batch, student, step)

    def prepare_batches(self, batches: list[Any], student: nn.Module, step: int) -> list[Any]:
        return self.inner.prepare_batches(batches, student, step)

    def wrap_collator(self, collator: Callable) -> Callable:
        return self.inner.wrap_collator(collator)


def cross_tokenizer_source(args: Any, source: TeacherSource, student: nn.Module, processing_class: Any,
                           teacher_processing_class: Any) -> TeacherSource:
    """`source` wrapped for a teacher with another tokenizer (`teacher_processing_class` with another vocabulary, or
    any with ``align_tokenizers="always"``); `source` itself otherwise."""
    if teacher_processing_class is None:
        if args.align_tokenizers == "always":
            raise ValueError("align_tokenizers='always' aligns with the teacher's tokenizer: pass "
                             "teacher_processing_class=... as well.")
        return source
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    teacher_tokenizer = getattr(teacher_processing_class, "tokenizer", teacher_processing_class)
    if tokenizer is None:
        raise ValueError("teacher_processing_class is aligned with the student's tokenizer: pass "
                         "processing_class=<the student's tokenizer> as well.")
    if args.align_tokenizers == "auto" and tokenizer.get_vocab() == teacher_tokenizer.get_vocab():
        return source
    if not source.models:
        raise ValueError(
            "A teacher with another tokenizer must run live (teacher_model=...): an offline teacher cache or a run "
            "without a teacher cannot be aligned to the student's tokens."
        )
    if infer_position_unit(student) is not PositionUnit.NEXT_TOKEN:
        raise ValueError("Cross-tokenizer distillation aligns next-token predictions: the student must be a causal "
                         "LM (AutoModelForCausalLM).")
    return CrossTokenizerTeacher(source, tokenizer, teacher_tokenizer)
