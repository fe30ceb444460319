"""Evaluating students against their teacher (``hf-distill evaluate``): held-out token scores, greedy answers and
their statistics, the teacher's likelihood of them, and the student as a draft model for the teacher.

Held-out scores on the counted tokens (causal LM: the answer tokens, next-token; classification: one per row):

    CE_m = mean_t -log p_m(y_t),   KL_m = mean_t sum_v p_T(v) log(p_T(v) / p_m(v)),
    agreement_m = mean_t [argmax p_m = argmax p_T]

Speculative decoding with the student as a greedy draft of length k (Leviathan et al. 2023; DistillSpec, Zhou et al.
2024). From the teacher's greedy answer y_1..y_L and one teacher-forced student pass, m_t = [argmax p_S(. | y_<t) =
y_t]. A draft from position t is accepted while it matches, a_t = min(k, cap_t, run of m from t), and the teacher's
verifying forward adds one token of its own, so the process is exact, without sampling:

    t <- t + a_t + 1 per teacher forward,   tokens per forward = L / forwards

(``cap_t = max_new_tokens - t - 1``, as transformers' assisted generation caps its drafts.)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data.chat import IGNORE_INDEX, left_padded
from ..data.sampler import SamplingSettings, TokenTicker, packed_once, sample_completions

#: Most logits (rows x positions x classes) one scoring forward pass holds, ~0.5 GB in float32: batches are cut into
#: fewer rows to stay under it (with a 152k-token vocabulary, one row of up to 880 tokens per pass), so the batch size
#: that suits generation never runs the machine out of memory here.
LOGITS_BUDGET = 2 ** 27


def rows_per_pass(model: nn.Module, width: int, budget: int | None = None) -> int:
    """How many rows of `width` positions one forward pass of `model` may score within `budget` logits
    (`LOGITS_BUDGET`); the classes are the output head's rows (a language model's vocabulary) or ``num_labels``."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    classes = weight.shape[0] if weight is not None else getattr(getattr(model, "config", None), "num_labels", 2)
    return max(1, (LOGITS_BUDGET if budget is None else budget) // max(width * int(classes), 1))


@torch.no_grad()
def held_out_scores(models: dict[str, nn.Module], batches: Iterable[dict[str, torch.Tensor]], task: str,
                    reference: str | None = "teacher", desc: str = "Held-out scores") -> dict[str, dict[str, float]]:
    """The module docstring's CE (perplexity = exp CE for language models, accuracy for classification), KL to and
    top-1 agreement with `models[reference]` of every model, over the labelled `batches`."""
    totals: dict[str, dict[str, float]] = {name: {"ce": 0.0, "kl": 0.0, "agree": 0.0, "right": 0.0}
                                           for name in models}
    count = 0
    for model in models.values():
        model.eval()
    for whole in tqdm(batches, desc=desc, unit="batch", leave=False):
        device = next(iter(models.values())).device
        width = whole["labels"].shape[1] if whole["labels"].dim() > 1 else 1
        step = min(rows_per_pass(model, width) for model in models.values())
        for first in range(0, len(whole["labels"]), step):  # (rows within the logits budget)
            batch = {k: v[first: first + step] for k, v in whole.items() if torch.is_tensor(v)}
            inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
            labels = batch["labels"].to(device)
            logits = {name: model(**inputs).logits.float() for name, model in models.items()}
            if task == "causal-lm":
                logits = {name: value[:, :-1] for name, value in logits.items()}
                labels = labels[:, 1:]
            mask = labels != IGNORE_INDEX
            count += int(mask.sum())
            target = labels[mask]
            chosen = {name: value[mask] for name, value in logits.items()}
            del logits
            teacher = torch.log_softmax(chosen[reference], -1) if reference in chosen else None
            for name, value in chosen.items():
                log_p = torch.log_softmax(value, -1)
                totals[name]["ce"] -= float(log_p.gather(-1, target[:, None]).sum())
                totals[name]["right"] += float((value.argmax(-1) == target).sum())
                if teacher is not None:
                    totals[name]["kl"] += float((teacher.exp() * (teacher - log_p)).sum())
                    totals[name]["agree"] += float((value.argmax(-1) == chosen[reference].argmax(-1)).sum())
    if count == 0:  # (prompt-only rows: nothing to score)
        return {}
    results = {}
    for name, sums in totals.items():
        mean = {k: v / max(count, 1) for k, v in sums.items()}
        scores = {"ce": mean["ce"]}
        scores.update({"accuracy": mean["right"]} if task != "causal-lm" else
                      {"perplexity": float(torch.tensor(mean["ce"]).exp())})
        if reference in models:
            scores.update({"kl_to_teacher": mean["kl"], "teacher_agreement": mean["agree"]})
        results[name] = scores
    return results


def mcnemar_exact(gained: int, lost: int) -> float:
    """The exact (binomial) McNemar p-value of paired outcomes: `gained` items only the new model got right, `lost`
    only the old one: ``p = min(1, 2 * sum_{i <= min(b, c)} C(b + c, i) / 2^(b + c))``."""
    n = gained + lost
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(gained, lost) + 1)) / 2 ** n)


@torch.no_grad()
def answer_log_probs(model: nn.Module, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]],
                     pad_id: int, batch_size: int = 4, desc: str = "Teacher forcing"
                     ) -> tuple[list[list[float]], list[list[int]]]:
    """Teacher forcing of ``prompt + answer``: each answer token's log-probability under `model` and `model`'s argmax
    at that position (what it would have written there), per row. Rows per pass stay within `LOGITS_BUDGET`."""
    model.eval()
    device = next(model.parameters()).device
    log_probs, argmaxes = [], []
    width = max((len(p) + len(a) for p, a in zip(prompts, answers)), default=1)
    batch_size = min(batch_size, rows_per_pass(model, width))
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch", leave=False):
        rows = [list(p) + list(a) for p, a in zip(prompts[start: start + batch_size], answers[start: start + batch_size])]
        ids, mask = left_padded(rows, pad_id, device)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        for i, answer in enumerate(answers[start: start + batch_size]):
            if not answer:
                log_probs.append([]), argmaxes.append([])
                continue
            # the positions that predict the answer's tokens (left padding: the answer ends the row)
            log_softmax = torch.log_softmax(logits[i, ids.shape[1] - 1 - len(answer): ids.shape[1] - 1].float(), -1)
            tokens = torch.tensor(list(answer), device=device)
            log_probs.append(log_softmax.gather(-1, tokens[:, None])[:, 0].tolist())
            argmaxes.append(log_softmax.argmax(-1).tolist())
    return log_probs, argmaxes


def teacher_nll(teacher: nn.Module, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]],
                pad_id: int) -> float:
    """The teacher's mean per-token NLL of `answers` (e.g. a student's greedy answers): ``mean -log p_T(y_t)``."""
    log_probs, _ = answer_log_probs(teacher, prompts, answers, pad_id, desc="The teacher's NLL of the answers")
    values = [v for row in log_probs for v in row]
    return -sum(values) / max(len(values), 1)


def speculative_forwards(matches: Sequence[bool], k: int, max_new_tokens: int | None = None) -> tuple[int, int]:
    """(teacher forwards, accepted draft tokens) for greedy speculative decoding of one answer of ``len(matches)``
    tokens with draft length `k`, where ``matches[t]`` says the draft's argmax equals the teacher's token t."""
    length, t, forwards, accepted = len(matches), 0, 0, 0
    while t < length:
        cap = k if max_new_tokens is None else max(min(k, max_new_tokens - t - 1), 0)
        run = 0
        while run < cap and t + run < length and matches[t + run]:
            run += 1
        forwards, accepted, t = forwards + 1, accepted + run, t + run + 1
    return forwards, accepted


@dataclass
class DraftAcceptance:
    """The student as a greedy draft for the teacher's greedy answers, per draft length."""

    tokens: int  #: answer tokens in all
    forwards: dict[int, int]  #: draft length k -> teacher forwards
    accepted: dict[int, int]  #: draft length k -> accepted draft tokens
    match_rate: float  #: the share of answer tokens where the student's argmax is the teacher's

    def tokens_per_forward(self, k: int) -> float:
        return self.tokens / max(self.forwards[k], 1)


def draft_acceptance(student: nn.Module, prompts: Sequence[Sequence[int]], teacher_answers: Sequence[Sequence[int]],
                     pad_id: int, ks: Sequence[int] = (4,), max_new_tokens: int | None = None) -> DraftAcceptance:
    """The module docstring's exact acceptance from one teacher-forced student pass over the teacher's answers."""
    _, argmaxes = answer_log_probs(student, prompts, teacher_answers, pad_id, desc="The student drafting")
    matches = [[a == y for a, y in zip(row, answer)] for row, answer in zip(argmaxes, teacher_answers)]
    forwards = {k: 0 for k in ks}
    accepted = {k: 0 for k in ks}
    for row in matches:
        for k in ks:
            f, a = speculative_forwards(row, k, max_new_tokens)
            forwards[k], accepted[k] = forwards[k] + f, accepted[k] + a
    tokens = sum(map(len, matches))
    return DraftAcceptance(tokens, forwards, accepted, sum(map(sum, matches)) / max(tokens, 1))


class _Counter:
    def __init__(self, module: nn.Module) -> None:
        self.calls = 0
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, *args: Any) -> None:
        self.calls += 1


@torch.no_grad()
def assisted_generation(teacher: nn.Module, student: nn.Module, prompts: Sequence[Sequence[int]], k: int,
                        max_new_tokens: int, stops: Sequence[int] = (), tie: float = 1e-4) -> dict[str, Any]:
    """Transformers' assisted generation (``assistant_model=student``, a constant draft of `k` tokens, no
    confidence cut-off) against the teacher alone, greedy, one prompt at a time: wall-clock seconds of each, teacher
    forwards, whether the outputs are identical, and where not, whether the teacher's top-2 logits at the first
    difference are within `tie` (a numerical tie, counted apart)."""
    teacher.eval(), student.eval()
    device = next(teacher.parameters()).device
    config = student.generation_config
    saved = {name: getattr(config, name, None) for name in
             ("num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold",
              "eos_token_id")}
    config.num_assistant_tokens, config.num_assistant_tokens_schedule = k, "constant"
    config.assistant_confidence_threshold = 0.0
    config.eos_token_id = list(stops) or None  # (a draft ends where the teacher's answer would, nowhere else)
    settings = dict(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=list(stops) or None,
                    pad_token_id=(list(stops) or [0])[0], temperature=None, top_p=None, top_k=None)
    out = {"seconds_alone": 0.0, "seconds_assisted": 0.0, "forwards_alone": 0, "forwards_assisted": 0,
           "identical": 0, "ties": 0, "different": 0, "tokens": 0}
    counter = _Counter(teacher)
    try:
        for prompt in tqdm(prompts, desc="Assisted generation (student drafts for the teacher)", leave=False):
            ids = torch.tensor([list(prompt)], device=device)
            for mode in ("alone", "assisted"):
                counter.calls = 0
                start = time.perf_counter()
                generated = teacher.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                             assistant_model=student if mode == "assisted" else None, **settings)
                out[f"seconds_{mode}"] += time.perf_counter() - start
                out[f"forwards_{mode}"] += counter.calls
                if mode == "alone":
                    alone = generated[0, ids.shape[1]:].tolist()
                else:
                    assisted = generated[0, ids.shape[1]:].tolist()
            out["tokens"] += len(alone)
            if alone == assisted:
                out["identical"] += 1
                continue
            first = next((i for i, (a, b) in enumerate(zip(alone, assisted)) if a != b), min(len(alone), len(assisted)))
            logits = teacher(input_ids=torch.tensor([list(prompt) + alone[:first]], device=device)).logits[0, -1]
            top = logits.float().topk(2).values
            out["ties" if float(top[0] - top[1]) <= tie else "different"] += 1
    finally:
        counter.handle.remove()
        for name, value in saved.items():
            setattr(config, name, value)
    out["speedup"] = out["seconds_alone"] / max(out["seconds_assisted"], 1e-9)
    return out


@torch.no_grad()
def greedy_answers(model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int, pad_id: int,
                   stops: Sequence[int], batch_size: int = 8, stopping: Any = None,
                   desc: str = "Greedy answers") -> tuple[list[list[int]], float]:
    """Greedy answers of `model` in batches of prompts of similar length (less padding; `samples.sample_completions`),
    in the order of `prompts`, and the seconds they took."""
    settings = SamplingSettings(0.0, False, max_new_tokens, 0.0, 1.0, 0, 1, 0, pad_id, tuple(stops))
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[list[int]] = [[] for _ in prompts]
    start = time.perf_counter()
    bar = tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False)
    ticking = lambda width: TokenTicker(bar, max_new_tokens, stopping(width) if stopping else None)  # noqa: E731
    with packed_once(model, batch_size):
        for first in bar:
            chunk = order[first: first + batch_size]
            for i, answer in zip(chunk, sample_completions(model, [list(prompts[i]) for i in chunk], settings, 0,
                                                           stopping=ticking)):
                answers[i] = answer
    return answers, time.perf_counter() - start
