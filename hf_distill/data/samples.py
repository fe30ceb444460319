"""What the models write: sampled completions, their collapse statistics, and held-out samples beside the teacher's.

A student can reach a low loss by writing one string to every prompt (an on-policy student that samples its own
targets is prone to it): the logged losses then look healthy. The statistics here look at the text itself, on token
ids, for any set of completions (on-policy samples per logging interval, `hf-distill generate`'s answers, the held-out
samples):

- distinct-n (Li et al. 2016), n = 1..4: distinct n-grams / all n-grams, pooled over groups of `GROUP` consecutive
  completions and averaged over the groups (one answer written to every prompt scores low; pooling a bounded group
  keeps the value of healthy text from falling as the number of completions grows);
- repeated 4-gram share (rep-n, Welleck et al. 2020): ``sum_c (|g(c)| - |set g(c)|) / sum_c |g(c)|`` with g(c) the
  4-grams of completion c (a completion looping on a phrase scores near 1);
- mean length (tokens, the stop token included), capped share (completions that reached the length cap without a stop
  token), and the writer's mean token entropy ``-sum_v p_v log p_v`` of its raw next-token distribution, averaged over
  the generated tokens (logged; not a trigger on its own: a confident model is low too).

Collapse is flagged (`collapse_reasons`) by the thresholds below: absolute ones when there is nothing to compare with,
relative to the teacher's samples on the same prompts where those exist.
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import nn
from transformers import TrainerCallback
from transformers.utils import logging

from ..positions import IGNORE_INDEX
from .chat import pad_id, stop_ids
from .sampler import SamplingSettings, gathered_for_generation, sample_completions, writer

logger = logging.get_logger(__name__)

#: Completions pooled per distinct-n group.
GROUP = 8
#: Absolute thresholds (no reference): a flag when the repeated 4-gram share is at least `REPEATED_MAX`, distinct-2 at
#: most `DISTINCT_MIN`, or the mean length below `EMPTY_LENGTH` tokens.
REPEATED_MAX, DISTINCT_MIN, EMPTY_LENGTH = 0.5, 0.25, 2.0
#: Relative to a reference (the teacher on the same prompts): repeated 4-gram share above the reference's by
#: `REPEATED_MARGIN`, distinct-2 below `DISTINCT_RATIO` x the reference's, mean length below `SHORT_RATIO` x the
#: reference's, capped share above the reference's by `CAPPED_MARGIN` and by at least `CAPPED_EXCESS` answers (on the
#: 4 default samples, one answer more or less is chance: an SFT code student writing fuller bodies than the teacher
#: had 3 of 4 answers capped against the teacher's 1, sound code; docs/results/issue39/arm-a.log).
REPEATED_MARGIN, DISTINCT_RATIO, SHORT_RATIO, CAPPED_MARGIN, CAPPED_EXCESS = 0.25, 0.5, 0.25, 0.5, 3
#: `hf-distill generate` warns when more than this share of its answers hit --max_new_tokens without a stop.
CAPPED_WARN = 0.25
#: What a flagged collapse does (`DistillationConfig.on_collapse`).
COLLAPSE_MODES = ("warn", "error")


class CollapseError(RuntimeError):
    """Raised with ``on_collapse="error"`` when sampled completions degenerate."""


# ---- statistics -------------------------------------------------------------------------------------------------


def _ngrams(tokens: Sequence[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(tokens[i: i + n]) for i in range(len(tokens) - n + 1)]


def completion_stats(completions: Sequence[Sequence[int]], stops: Sequence[int], max_new_tokens: int,
                     entropies: Sequence[float] | None = None) -> dict[str, float]:
    """The module docstring's statistics of `completions` (token ids, each ending with its stop token when it has
    one): ``distinct_1`` .. ``distinct_4``, ``repeated_4gram_share``, ``mean_length``, ``capped_share``, ``count``
    and, with `entropies`, ``entropy``."""
    stops = set(stops)
    texts = [list(c[:-1]) if c and c[-1] in stops else list(c) for c in completions]
    stats: dict[str, float] = {"count": float(len(completions))}
    for n in range(1, 5):
        shares = []
        for start in range(0, len(texts), GROUP):
            grams = [g for t in texts[start: start + GROUP] for g in _ngrams(t, n)]
            if grams:
                shares.append(len(set(grams)) / len(grams))
        stats[f"distinct_{n}"] = sum(shares) / len(shares) if shares else 0.0
    total = repeated = 0
    for text in texts:
        grams = _ngrams(text, 4)
        total, repeated = total + len(grams), repeated + len(grams) - len(set(grams))
    stats["repeated_4gram_share"] = repeated / total if total else 0.0
    stats["mean_length"] = sum(map(len, completions)) / max(len(completions), 1)
    capped = sum(len(c) >= max_new_tokens and (not c or c[-1] not in stops) for c in completions)
    stats["capped_share"] = capped / max(len(completions), 1)
    if entropies:
        stats["entropy"] = sum(entropies) / len(entropies)
    return stats


def collapse_reasons(stats: dict[str, float], reference: dict[str, float] | None = None) -> list[str]:
    """Why `stats` look degenerate (empty: they do not), by the module's thresholds: absolute without a `reference`,
    relative to it (the teacher's samples on the same prompts) with one."""
    reasons = []
    length, repeated, distinct = stats["mean_length"], stats["repeated_4gram_share"], stats["distinct_2"]
    if reference is None:
        if length < EMPTY_LENGTH:
            return [f"the answers are (nearly) empty: {length:.1f} tokens on average"]
        if repeated >= REPEATED_MAX:
            reasons.append(f"{repeated:.0%} of the 4-grams repeat earlier ones in their answer (flag at "
                           f"{REPEATED_MAX:.0%})")
        if distinct <= DISTINCT_MIN:
            reasons.append(f"distinct-2 is {distinct:.2f} (the answers are alike; flag at {DISTINCT_MIN})")
        return reasons
    if reference["mean_length"] >= EMPTY_LENGTH and length < SHORT_RATIO * reference["mean_length"]:
        return [f"the answers are {length:.1f} tokens long on average, the teacher's {reference['mean_length']:.1f}"]
    if repeated >= reference["repeated_4gram_share"] + REPEATED_MARGIN:
        reasons.append(f"{repeated:.0%} of the 4-grams repeat earlier ones in their answer (the teacher: "
                       f"{reference['repeated_4gram_share']:.0%})")
    if distinct < DISTINCT_RATIO * reference["distinct_2"]:
        reasons.append(f"distinct-2 is {distinct:.2f} (the teacher: {reference['distinct_2']:.2f})")
    excess = round((stats["capped_share"] - reference["capped_share"]) * stats.get("count", 0))
    if stats["capped_share"] >= reference["capped_share"] + CAPPED_MARGIN and excess >= CAPPED_EXCESS:
        reasons.append(f"{stats['capped_share']:.0%} of the answers run to the length cap (the teacher: "
                       f"{reference['capped_share']:.0%})")
    return reasons


#: What a flagged student's run can change.
STUDENT_ADVICE = ("Read the samples: a student writing one string to every prompt can reach a low loss. Lower the "
                  "learning rate, start from a better student, or mix in off-policy data (lmbda < 1).")


def check_collapse(stats: dict[str, float], reference: dict[str, float] | None, on_collapse: str,
                   where: str, advice: str = STUDENT_ADVICE) -> list[str]:
    """Warn (or, ``on_collapse="error"``, raise `CollapseError`) when `collapse_reasons` finds any; returns them."""
    reasons = collapse_reasons(stats, reference)
    if reasons:
        message = f"Collapse: {where} look degenerate: " + "; ".join(reasons) + ". " + advice
        if on_collapse == "error":
            raise CollapseError(message + " (on_collapse='error' stops here; the last checkpoint is kept.)")
        logger.warning(message)
    return reasons


class CompletionLog:
    """The completions a run sampled since the last log, summarised per interval (`flush`): `completion_stats` under
    the ``completion_`` prefix, gathered over all processes, and ``completion_collapse`` (1.0: flagged)."""

    def __init__(self, stops: Sequence[int], max_new_tokens: int, on_collapse: str = "warn") -> None:
        self.stops, self.max_new_tokens, self.on_collapse = tuple(stops), max_new_tokens, on_collapse
        self.completions: list[list[int]] = []
        self.entropies: list[float] = []

    def add(self, completions: list[list[int]], entropies: Sequence[float] = ()) -> None:
        self.completions.extend(completions)
        self.entropies.extend(entropies)

    def flush(self, accelerator: Any = None, step: int | None = None) -> dict[str, float]:
        completions, entropies = self.completions, self.entropies
        if accelerator is not None and accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            completions, entropies = gather_object(completions), gather_object(entropies)
        self.completions, self.entropies = [], []
        if not completions:
            return {}
        stats = completion_stats(completions, self.stops, self.max_new_tokens, entropies)
        where = f"the student's samples of steps up to {step}" if step is not None else "the student's samples"
        flagged = check_collapse(stats, None, self.on_collapse, where)
        logs = {f"completion_{k}": v for k, v in stats.items() if k not in ("count", "mean_length")}
        return {**logs, "completion_collapse": float(bool(flagged))}


# ---- held-out samples -------------------------------------------------------------------------------------------


def held_out_prompts(dataset: Any, count: int, plain_prompt: int = 16) -> list[tuple[list[int], list[int]]]:
    """(prompt, reference) token ids of the first `count` rows of `dataset`: the prompt is a row's tokens before its
    first counted label (prompt-only rows: all of it), the reference the counted tokens after; rows of plain text
    (no prompt) are cut after `plain_prompt` tokens (or half the row)."""
    if dataset is None or not hasattr(dataset, "column_names") or "input_ids" not in dataset.column_names:
        return []
    rows = dataset.select(range(min(count, len(dataset))))
    labels = rows["labels"] if "labels" in rows.column_names else [None] * len(rows)
    pairs = []
    for ids, row_labels in zip(rows["input_ids"], labels):
        ids = list(ids)
        counted = [label != IGNORE_INDEX for label in row_labels] if row_labels is not None else [True] * len(ids)
        first = counted.index(True) if True in counted else len(ids)
        if first == 0:
            first = min(plain_prompt, max(len(ids) // 2, 1))
        pairs.append((ids[:first], ids[first:]))
    return pairs


class SamplesCallback(TrainerCallback):
    """At each evaluation and at the end of training: greedy completions of `count` fixed held-out prompts by the
    teacher and the student, side by side in the log, the reporting integrations (a table where they have one) and
    `history` (the command line's report). The student's samples are checked for collapse against the teacher's
    (``on_collapse``); their statistics are logged as ``eval_samples_<stat>``."""

    def __init__(self, trainer: Any, count: int, max_new_tokens: int) -> None:
        self.trainer = trainer
        self.tokenizer = trainer.processing_class
        conversational = bool(getattr(self.tokenizer, "chat_template", None))
        stops = tuple(stop_ids(self.tokenizer, conversational))
        self.settings = SamplingSettings(1.0, False, max_new_tokens, 0.0, 1.0, 0, 1, trainer.args.seed,
                                         pad_id(self.tokenizer, stops), stops)
        self.pairs = held_out_prompts(trainer.eval_dataset, count)
        self.history: list[dict[str, Any]] = []
        self._teacher: tuple[list[list[int]], str] | None = None

    def teacher_answers(self) -> tuple[list[list[int]] | None, str]:
        """The live teacher's greedy answers (computed once: it is frozen), or the data's own completions where no
        teacher generates in the student's tokens (a cache, another tokenizer, a route); None where neither exists
        (prompt-only rows and no live teacher)."""
        if self._teacher is None:
            source = self.trainer.teacher_source
            teacher = source.first_model
            if teacher is not None and not source.aligns_tokens and not self.trainer.args.teacher_route:
                self._teacher = (self.generate(writer(teacher)), "teacher")
            elif any(r for _, r in self.pairs):
                self._teacher = ([list(r) for _, r in self.pairs], "reference (data)")
            else:
                self._teacher = (None, "")
        return self._teacher

    def generate(self, model: nn.Module) -> list[list[int]]:
        with gathered_for_generation(model, self.trainer.accelerator):
            return sample_completions(model, [p for p, _ in self.pairs], self.settings, self.settings.seed)

    def text(self, tokens: Sequence[int], limit: int = 300) -> str:
        words = self.tokenizer.decode(list(tokens), skip_special_tokens=True).strip().replace("\n", "\\n")
        return words if len(words) <= limit else "…" + words[-limit:]

    def sample(self, step: int) -> dict[str, Any] | None:
        if not self.pairs or any(entry["step"] == step for entry in self.history):
            return None
        reference, teacher_name = self.teacher_answers()
        student = self.generate(self.trainer.model)
        stops, cap = self.settings.stop_ids, self.settings.max_new_tokens
        teacher_stats = completion_stats(reference, stops, cap) if reference is not None else None
        student_stats = completion_stats(student, stops, cap)
        on_collapse = self.trainer.args.on_collapse
        entry = {
            "step": step, "columns": ["prompt", teacher_name, "student"] if reference else ["prompt", "student"],
            "rows": [[self.text(p, 120), *([self.text(reference[i])] if reference else []), self.text(s)]
                     for i, ((p, _), s) in enumerate(zip(self.pairs, student))],
            "teacher_stats": teacher_stats, "student_stats": student_stats,
            # (the teacher's own samples: absolute thresholds, nothing to compare them with)
            "teacher_flags": collapse_reasons(teacher_stats) if teacher_stats else [],
            "student_flags": collapse_reasons(student_stats, teacher_stats),
        }
        self.history.append(entry)
        if self.trainer.is_world_process_zero():
            logger.warning("Held-out samples at step %d (greedy, at most %d new tokens):\n%s", step, cap,
                           samples_markdown(entry))
            self.to_integrations(entry)
        self.trainer.log({f"eval_samples_{k}": v for k, v in student_stats.items() if k != "count"})
        check_collapse(student_stats, teacher_stats, on_collapse, f"the student's held-out samples at step {step}")
        return entry

    def to_integrations(self, entry: dict[str, Any]) -> None:
        """The samples as a table in Weights & Biases, as markdown text in TensorBoard and MLflow."""
        report_to = self.trainer.args.report_to or []
        if "wandb" in report_to:
            import wandb

            if wandb.run is not None:
                wandb.log({"samples": wandb.Table(columns=["step", *entry["columns"]],
                                                  data=[[entry["step"], *row] for row in entry["rows"]])})
        for callback in self.trainer.callback_handler.callbacks:
            if getattr(callback, "tb_writer", None) is not None:
                callback.tb_writer.add_text("samples", samples_markdown(entry), entry["step"])
        if "mlflow" in report_to:
            import mlflow

            if mlflow.active_run() is not None:
                mlflow.log_text(samples_markdown(entry), f"samples/step-{entry['step']}.md")

    def on_evaluate(self, args, state, control, **kwargs):
        self.sample(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self.sample(state.global_step)


def samples_markdown(entry: dict[str, Any]) -> str:
    """One sampling's table (prompt | teacher | student) and its statistics, as markdown."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(entry["columns"]) + " |", "|---" * len(entry["columns"]) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in entry["rows"]]
    stats = [("teacher" if entry["columns"][1] == "teacher" else "reference", entry["teacher_stats"],
              entry.get("teacher_flags", [])), ("student", entry["student_stats"], entry.get("student_flags", []))]
    stats = [row for row in stats if row[1] is not None]
    lines += ["", "| | distinct-2 | repeated 4-grams | mean length | at the cap | collapse |", "|---" * 6 + "|"]
    for name, values, flags in stats:
        lines.append(f"| {name} | {values['distinct_2']:.2f} | {values['repeated_4gram_share']:.0%} | "
                     f"{values['mean_length']:.1f} | {values['capped_share']:.0%} | "
                     f"{'; '.join(flags) if flags else 'no'} |")
    return "\n".join(lines)


def samples_callbacks(trainer: Any) -> list[TrainerCallback]:
    """The held-out samples of a causal-LM run with a tokenizer and an evaluation set (`args.sample_prompts` > 0)."""
    from ..positions import PositionUnit, infer_position_unit

    args, tokenizer = trainer.args, trainer.processing_class
    if (args.sample_prompts <= 0 or tokenizer is None or not hasattr(tokenizer, "decode")
            or infer_position_unit(trainer.model) is not PositionUnit.NEXT_TOKEN
            or not held_out_prompts(trainer.eval_dataset, 1)
            or not stop_ids(tokenizer, bool(getattr(tokenizer, "chat_template", None)))):
        return []
    return [SamplesCallback(trainer, args.sample_prompts, args.sample_max_new_tokens)]


def samples_history(trainer: Any) -> list[dict[str, Any]]:
    """Every held-out sampling of `trainer`'s run so far (`SamplesCallback.history`; empty without samples)."""
    return next((c.history for c in trainer.callback_handler.callbacks if isinstance(c, SamplesCallback)), [])
