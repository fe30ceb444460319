"""On-policy distillation (GKD, Agarwal et al. 2024; MiniLLM; the on-policy distillation of Qwen3 and Thinking
Machines 2025): `SampledCompletions` wraps a teacher source and, on the micro-batches it picks, replaces each row's
completion with one sampled from the current student (or, `seq_kd`, from the teacher) before anything is counted; the
wrapped source then scores the same sequences, and every term reads them as it reads any batch.

- The prompt of a row is its tokens before its first counted label (prompt-completion and chat rows from
  `chat.prepare_chat_dataset`; prompt-only rows count nothing, so all of them is the prompt).
- A micro-batch is sampled when ``u < lmbda`` with u drawn from (seed, global step, micro-batch): the same on every
  process and in a resumed run. All micro-batches of an optimizer step that the student completes are drawn in one
  generation (`prepare_batches`; the teacher's seq_kd ones in another): the weights do not change within a step, and
  one pass over them per token serves every row. The completions are drawn inside a forked RNG seeded with (seed,
  step, the first of those micro-batches, process), so the training RNG (dropout, data order) is untouched and a
  resumed run samples what the uninterrupted one did.
- A completion counts up to and including the stop token that ends it (end of turn / end of sequence); the padding
  after it never counts, whatever its id (many tokenizers pad with their end-of-sequence token).
- The student generates in eval mode without gradients, with its adapters on (PEFT); under DeepSpeed ZeRO-3 its
  parameters are gathered for generation and released after.
"""

from __future__ import annotations

import random
import time
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..data.chat import TEACHER_PROMPTS, stop_ids
from ..data.sampler import SamplingSettings, gathered_for_generation, sample_completions, uses_decode, writer
from ..data.samples import CompletionLog
from ..modeling import context_length, unwrap
from ..positions import IGNORE_INDEX
from .base import TeacherSource

__all__ = ["SampledCompletions", "SamplingSettings", "sample_completions", "on_policy_source", "prompt_rows"]

#: How many training rows `check_sampling_data` reads before training.
CHECKED_ROWS = 10_000

#: generate_fn(model, prompts, settings, seed) -> completions (token ids); the default is `sample_completions`.
GenerateFn = Callable[[nn.Module, list[list[int]], "SamplingSettings", int], list[list[int]]]


def seeded_rng(seed: int, *where: int) -> random.Random:
    """A generator seeded by `seed` and a position (step, micro-batch, ...): the same draws on every process and in a
    resumed run."""
    return random.Random(hash((seed, *where)) & 0xFFFFFFFF)


def prompt_rows(batch: Mapping[str, Any], label_name: str = "labels") -> list[list[int]]:
    """Each row's prompt: its tokens (attention mask 1) before the first counted label; a row counting nothing is all
    prompt."""
    ids, labels = batch["input_ids"], batch[label_name]
    mask = batch.get("attention_mask")
    prompts = []
    for i in range(ids.shape[0]):
        keep = mask[i].bool() if torch.is_tensor(mask) else torch.ones_like(ids[i], dtype=torch.bool)
        row, counted = ids[i][keep].tolist(), (labels[i][keep] != IGNORE_INDEX).tolist()
        first = counted.index(True) if True in counted else len(row)
        if first == 0:
            raise ValueError(
                "A row of this batch counts its first token, so it has no prompt to sample a completion from: "
                "on-policy distillation (lmbda > 0, seq_kd) needs prompt-completion, chat or prompt-only rows "
                "(chat.prepare_chat_dataset), whose prompt tokens have the label -100."
            )
        prompts.append(row[:first])
    return prompts


def completion_batch(prompts: list[list[int]], completions: list[list[int]], num_generations: int, pad_id: int,
                     device: torch.device, label_name: str = "labels") -> dict[str, torch.Tensor]:
    """The batch trained on: row r is ``prompts[r // num_generations] + completions[r]``, padded on the right; its
    labels are the completion tokens (the prompt and the padding -100)."""
    rows = [(prompts[r // num_generations], c) for r, c in enumerate(completions)]
    width = max(len(p) + len(c) for p, c in rows)
    ids, mask, labels = [], [], []
    for prompt, completion in rows:
        n, fill = len(prompt) + len(completion), width - len(prompt) - len(completion)
        ids.append([*prompt, *completion] + [pad_id] * fill)
        mask.append([1] * n + [0] * fill)
        labels.append([IGNORE_INDEX] * len(prompt) + list(completion) + [IGNORE_INDEX] * fill)
    return {"input_ids": torch.tensor(ids, device=device), "attention_mask": torch.tensor(mask, device=device),
            label_name: torch.tensor(labels, device=device)}


class SampledCompletions(TeacherSource):
    """A teacher source whose picked micro-batches are completed by the student (`lmbda`) or the teacher (`seq_kd`)
    before counting; everything else is the wrapped source's (`inner`). `generate_fn` replaces the sampler (tests:
    fixed generations)."""

    def __init__(self, inner: TeacherSource, settings: SamplingSettings, generate_fn: GenerateFn | None = None,
                 label_name: str = "labels", on_collapse: str = "warn") -> None:
        self.inner = inner
        self.settings = settings
        self.generate_fn = generate_fn or sample_completions
        self.label_name = label_name
        self.accelerator: Any = None
        #: the student's samples since the last log: their collapse statistics (`samples.completion_stats`)
        self.completion_log = CompletionLog(settings.stop_ids, settings.max_new_tokens, on_collapse)
        self._step = 0
        self._stats = torch.zeros(5, dtype=torch.float64)  # tokens, completions, sampled batches, batches, seconds
        self._steps: set[int] = set()

    # ---- the wrapped source ----------------------------------------------------------------------------------------

    @property
    def has_teacher(self) -> bool:  # type: ignore[override]
        return self.inner.has_teacher

    @property
    def aligns_tokens(self) -> bool:  # type: ignore[override]
        return self.inner.aligns_tokens

    @property
    def models(self) -> list[nn.Module]:
        return self.inner.models

    @property
    def first_model(self) -> nn.Module | None:
        return self.inner.first_model

    def prepare(self, accelerator: Any, args: Any, signals: list, on_new_models: Callable[[], None]) -> None:
        if accelerator.distributed_type.value == "FSDP":
            # FSDP gathers parameters inside every forward: processes whose completions end at different steps would
            # wait for each other forever. (DDP generates alone; DeepSpeed ZeRO-3 gathers once, `gathered_for_generation`.)
            raise ValueError("On-policy sampling (lmbda > 0, seq_kd) is not supported under FSDP yet: use DDP, or "
                             "DeepSpeed ZeRO-3 for a student that must be sharded.")
        self.accelerator = accelerator
        self.inner.prepare(accelerator, args, signals, on_new_models)

    def outputs(self, inputs, request):
        return self.inner.outputs(inputs, request)

    def on_step(self, state: Any) -> None:
        self.inner.on_step(state)

    def input_columns(self) -> list[str]:
        return self.inner.input_columns()

    def batch_only_keys(self) -> tuple[str, ...]:
        return self.inner.batch_only_keys()

    def wrap_collator(self, collator: Callable) -> Callable:
        return self.inner.wrap_collator(collator)

    def check_run(self, args: Any, active: dict[str, float], processing_class: Any = None) -> None:
        self.inner.check_run(args, active, processing_class)

    def declared_vocab_size(self) -> int | None:
        return self.inner.declared_vocab_size()

    # ---- sampling --------------------------------------------------------------------------------------------------

    def samples_student(self, step: int, micro: int) -> bool:
        """Whether micro-batch `micro` of optimizer step `step` is completed by the student (``u < lmbda``)."""
        return seeded_rng(self.settings.seed, step, micro).random() < self.settings.lmbda

    def teacher_generator(self) -> nn.Module:
        """The model that writes seq_kd completions: the (first) teacher, unwrapped from its engine."""
        teacher = self.inner.first_model
        if teacher is None:
            raise ValueError("seq_kd samples completions from the teacher, but this run's teacher source has no model.")
        return writer(teacher)

    def prepare_batch(self, batch: Mapping[str, Any], student: nn.Module,
                      step: tuple[int, int] = (0, 0)) -> Mapping[str, Any]:
        return self._prepare([batch], student, step[0], step[1])[0]

    def prepare_batches(self, batches: list[Mapping[str, Any]], student: nn.Module, step: int) -> list[Any]:
        """Every micro-batch of optimizer step `step`: those the student completes in one generation (their rows
        together: one pass over the weights per token for all of them), those the teacher completes (seq_kd) in
        another; the weights do not change within the step, so this draws from the same distribution as one
        generation per micro-batch."""
        return self._prepare(batches, student, step, 0)

    def _prepare(self, batches: list[Mapping[str, Any]], student: nn.Module, step: int, first: int) -> list[Any]:
        batches = [self.inner.prepare_batch(batch, student, (step, first + i)) for i, batch in enumerate(batches)]
        self._stats[3] += len(batches)
        self._steps.add(step)
        writers: list[nn.Module | None] = []
        for i in range(len(batches)):
            if self.samples_student(step, first + i):
                writers.append(student)
                self._stats[2] += 1
            else:
                writers.append(self.teacher_generator() if self.settings.seq_kd else None)
        out: list[Any] = list(batches)
        for model in {id(w): w for w in writers if w is not None}.values():
            picked = [i for i, w in enumerate(writers) if w is model]
            prompts = [prompt_rows(batches[i], self.label_name) for i in picked]
            completions = self._sample(model, student, [p for rows in prompts for p in rows], step, first + picked[0])
            at = 0
            for i, rows in zip(picked, prompts):
                count = len(rows) * self.settings.num_generations
                out[i] = self._completed(batches[i], rows, completions[at: at + count])
                at += count
        self._step = step
        return out

    def _sample(self, model: nn.Module, student: nn.Module, prompts: list[list[int]], step: int,
                micro: int) -> list[list[int]]:
        """`num_generations` completions per prompt from `model`, seeded by (seed, step, micro-batch, process)."""
        process = self.accelerator.process_index if self.accelerator is not None else 0
        seed = seeded_rng(self.settings.seed, step, micro, process).getrandbits(63)
        start, entropies = time.perf_counter(), []
        measured = model is student and self.generate_fn is sample_completions  # (the student's own distribution)
        with gathered_for_generation(model, self.accelerator):
            completions = (sample_completions(model, prompts, self.settings, seed, entropies) if measured
                           else self.generate_fn(model, prompts, self.settings, seed))
        self._stats[4] += time.perf_counter() - start
        if model is student:
            self.completion_log.add(completions, entropies)
        self._stats[0] += sum(map(len, completions))
        self._stats[1] += len(completions)
        return completions

    def _completed(self, batch: Mapping[str, Any], prompts: list[list[int]],
                   completions: list[list[int]]) -> dict[str, Any]:
        out = completion_batch(prompts, completions, self.settings.num_generations, self.settings.pad_id,
                               batch["input_ids"].device, self.label_name)
        if TEACHER_PROMPTS in batch:  # (a teacher of another tokenizer reads each row's prompt in its own template)
            out[TEACHER_PROMPTS] = [batch[TEACHER_PROMPTS][r // self.settings.num_generations]
                                    for r in range(len(completions))]
        return out

    def log_values(self) -> dict[str, float]:
        """Since the last log, over all processes: ``generated_tokens``, ``completion_length`` (mean tokens per
        sampled completion), ``sampled_share`` (of micro-batches the student completed),
        ``generation_seconds_per_step`` (the slowest process's) and the collapse statistics of the student's samples
        (`samples.CompletionLog`: ``completion_distinct_2``, ``completion_repeated_4gram_share``, ...; a warning, or
        with ``on_collapse="error"`` a stop, when they degenerate)."""
        values = dict(self.inner.log_values())
        stats = self._stats.clone()
        seconds = stats[4].clone()
        if self.accelerator is not None and self.accelerator.num_processes > 1:
            device = self.accelerator.device
            stats = self.accelerator.gather(stats[:4].float().to(device).reshape(1, -1)).sum(dim=0).double().cpu()
            seconds = self.accelerator.gather(seconds.float().to(device).reshape(1)).max().double().cpu()
        tokens, completions, sampled, batches = stats[:4].tolist()
        values.update({
            "generated_tokens": tokens,
            "completion_length": tokens / completions if completions else 0.0,
            "sampled_share": sampled / batches if batches else 0.0,
            "generation_seconds_per_step": float(seconds) / max(len(self._steps), 1),
        })
        self._stats.zero_()
        self._steps.clear()
        values.update(self.completion_log.flush(self.accelerator, self._step + 1))
        return values


def check_sampling_data(dataset: Any, args: Any, context: int | None, label_name: str = "labels") -> None:
    """The training rows must hold prompts (labels -100 before the first counted token); prompt-only rows need every
    micro-batch sampled (lmbda = 1 or seq_kd); packed rows cannot be completed; the longest prompt plus
    `max_new_tokens` must fit the model's context. Read on the first `CHECKED_ROWS` rows (a batch without prompts
    further on is refused when it comes, by `prompt_rows`)."""
    if dataset is None or not hasattr(dataset, "column_names"):
        return  # (an iterable dataset: checked batch by batch in `prompt_rows`)
    columns = dataset.column_names
    if "position_ids" in columns:
        raise ValueError("Packed rows (--packing) hold several conversations per row, so a row has no one prompt to "
                         "complete: train on-policy (lmbda > 0, seq_kd) without packing.")
    if label_name not in columns or "input_ids" not in columns:
        raise ValueError(
            f"On-policy distillation (lmbda={args.lmbda}, seq_kd={args.seq_kd}) completes each row's prompt, but the "
            f"training rows have no `{label_name}` saying where the prompt ends (columns: {columns}). Tokenise "
            "prompt-only, prompt-completion or chat data with chat.prepare_chat_dataset (the command line does)."
        )
    longest, prompt_only = 0, True
    rows = dataset.select(range(min(len(dataset), CHECKED_ROWS))) if len(dataset) > CHECKED_ROWS else dataset
    for row, labels in enumerate(rows[label_name]):
        counted = [label != IGNORE_INDEX for label in labels]
        first = counted.index(True) if True in counted else len(labels)
        if first == 0:
            raise ValueError(
                f"Training row {row} counts its first token, so it has no prompt: on-policy distillation needs "
                "prompt-only, prompt-completion or chat rows whose prompt tokens have the label -100 (plain text has "
                "no prompt)."
            )
        longest, prompt_only = max(longest, first), prompt_only and first == len(labels)
    if prompt_only and args.lmbda < 1 and not args.seq_kd:
        raise ValueError(
            f"The training rows are prompts alone, but lmbda={args.lmbda} leaves some micro-batches to the dataset's "
            "completions, which it does not have: set lmbda=1 (the student answers every prompt) or seq_kd=True (the "
            "teacher answers the others)."
        )
    if context is not None and longest + args.max_new_tokens > context:
        raise ValueError(
            f"max_new_tokens={args.max_new_tokens} plus the longest prompt ({longest} tokens) exceeds the model's "
            f"context of {context} positions: lower max_new_tokens to at most {context - longest}, or truncate the "
            "prompts (max_length with truncation_side='left')."
        )


def on_policy_source(args: Any, source: TeacherSource, student: nn.Module, processing_class: Any,
                     train_dataset: Any, label_name: str = "labels") -> TeacherSource:
    """`source` wrapped in `SampledCompletions` when the run samples (lmbda > 0 or seq_kd), after refusing what
    cannot work: a student that is not a causal LM, a teacher that cannot score new sequences (an offline cache, no
    teacher), a missing tokenizer or pad token, data without prompts, completions that overflow the context."""
    from ..positions import PositionUnit, infer_position_unit

    sampling = args.lmbda > 0 or args.seq_kd
    if args.logits_loss == "sampled_token" and args.logits_weight > 0 and (
            infer_position_unit(student) is not PositionUnit.NEXT_TOKEN):
        raise ValueError("logits_loss='sampled_token' scores the tokens a causal LM samples; this student is not a "
                         "causal LM: use forward_kl / reverse_kl / jsd.")
    if not sampling:
        return source
    what = f"lmbda={args.lmbda}" if args.lmbda > 0 else "seq_kd=True"
    if infer_position_unit(student) is not PositionUnit.NEXT_TOKEN:
        raise ValueError(f"{what} samples completions, which only a causal LM writes; this student "
                         f"({type(unwrap(student)).__name__}) is not one: set lmbda=0 and seq_kd=False.")
    if not source.has_teacher or not source.models:
        kind = "an offline teacher cache" if source.has_teacher else "no teacher"
        raise ValueError(f"{what} needs a live teacher to score the newly sampled sequences, and this run has {kind} "
                         "(a cache holds only the sequences it was built on): pass teacher_model=..., or set lmbda=0 "
                         "and seq_kd=False.")
    if processing_class is None or not hasattr(processing_class, "eos_token_id"):
        raise ValueError(f"{what} samples completions and needs the tokenizer (its pad and end tokens): pass "
                         "processing_class=tokenizer.")
    if processing_class.pad_token_id is None:
        raise ValueError(f"{what} pads sampled completions, but the tokenizer has no pad token: set one, e.g. "
                         "tokenizer.pad_token = tokenizer.eos_token (padding never counts, whatever its id).")
    stops = tuple(stop_ids(processing_class, conversational=bool(getattr(processing_class, "chat_template", None))))
    if not stops:
        raise ValueError(f"{what}: the tokenizer has no end-of-sequence token (nor a chat template's end of turn) to "
                         "end completions with: set tokenizer.eos_token.")
    check_sampling_data(train_dataset, args, context_length(student), label_name)
    if getattr(args, "sampler", "auto") == "decode":  # (refused here rather than at the first sampled step)
        writers = [student] + ([writer(source.first_model)] if args.seq_kd else [])
        for model in writers:
            uses_decode(model, "decode", torch.device("cpu"))
    if isinstance(source, SampledCompletions):
        return source
    return SampledCompletions(source, SamplingSettings.from_args(args, processing_class.pad_token_id, stops),
                              label_name=label_name, on_collapse=args.on_collapse)
