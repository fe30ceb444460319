"""An output term defined in this file (a divergence that is none of the built-in kinds), registered through the public
extension point: it trains on the full-logits, chunked and cached paths with the loss a hand computation gives, and a
path that cannot serve it refuses it before training."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from hf_distill import DistillationConfig, DistillationTrainer
from hf_distill.data.teacher_cache import load_teacher_cache
from hf_distill.signals import register_signal, unregister_signal
from hf_distill.signals.output import OutputSignal

from .test_teacher_cache import (
    SHAPES,
    TEMPERATURE,
    TOP_K,
    VOCAB,
    _tokenizer,
    build,
    pad_collator,
    ragged_dataset,
    tiny_teacher,
)

PACKAGE = Path(__file__).resolve().parents[1] / "hf_distill"
ALPHA = 0.1


class SkewKLSignal(OutputSignal):
    """Skew KL (DistiLLM, Ko et al. 2024): ``KL(p_t || a p_t + (1 - a) p_s)`` per row, a = 0.1, at temperature T."""

    name = "skew_kl"
    weight_field = "skew_kl_weight"
    works_from_cache = True

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature

    @classmethod
    def from_config(cls, context):
        return cls(context.args.temperature)

    def divergence(self, student, teacher, tokens=None, vocab=None):
        mixed = torch.logaddexp(teacher + math.log(ALPHA), student + math.log(1 - ALPHA))
        return (teacher.exp() * (teacher - mixed)).sum(dim=-1)


@dataclass
class SkewConfig(DistillationConfig):
    skew_kl_weight: float = field(default=0.0, metadata={"help": "Weight of the test's skew-KL output term."})


@pytest.fixture
def registered():
    register_signal(SkewKLSignal)
    yield SkewKLSignal
    unregister_signal(SkewKLSignal)


def _skew(p_s: torch.Tensor, p_t: torch.Tensor) -> torch.Tensor:
    """The skew KL per row straight from its definition, on probabilities (float64)."""
    mixed = ALPHA * p_t + (1 - ALPHA) * p_s
    return (p_t * (p_t.log() - mixed.log())).sum(dim=-1)


def _args(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, save_strategy="no", eval_strategy="no",
                  per_device_train_batch_size=len(SHAPES), max_steps=1, logging_steps=1, disable_tqdm=True, seed=0,
                  learning_rate=1e-3, task_weight=0.0, logits_weight=0.0, skew_kl_weight=0.7, temperature=TEMPERATURE)
    values.update(overrides)
    return SkewConfig(**values)


def _hand(student, teacher, top_k: int | None = None) -> float:
    """The weighted loss by hand: 0.7 * T^2 * mean over counted positions of the skew KL of softmax(z / T) (of the
    distributions coarsened to the teacher's top k plus a tail bucket with `top_k`)."""
    raw = pad_collator([ragged_dataset()[i] for i in range(len(SHAPES))])
    with torch.no_grad():
        z_s = student(input_ids=raw["input_ids"], attention_mask=raw["attention_mask"]).logits[:, :-1].double()
        z_t = teacher(input_ids=raw["input_ids"], attention_mask=raw["attention_mask"]).logits[:, :-1].double()
    counted = raw["labels"][:, 1:] != -100
    p_s, p_t = (torch.softmax(z[counted] / TEMPERATURE, dim=-1) for z in (z_s, z_t))
    if top_k is not None:
        ids = p_t.topk(top_k, dim=-1).indices
        p_s, p_t = (torch.cat([p.gather(-1, ids), 1 - p.gather(-1, ids).sum(-1, keepdim=True)], dim=-1)
                    for p in (p_s, p_t))
    return 0.7 * TEMPERATURE**2 * _skew(p_s, p_t).mean().item()


@pytest.mark.parametrize("chunk", [0, 4], ids=["full-logits", "chunked"])
def test_an_output_signal_of_your_own_trains_on_the_live_paths_with_the_hand_loss(tmp_path, registered, chunk):
    teacher, student = tiny_teacher(seed=0), tiny_teacher(seed=1).train()
    expected = _hand(student, teacher)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=_args(tmp_path, logits_chunk_size=chunk),
                                  train_dataset=ragged_dataset(), data_collator=pad_collator)
    assert [signal.name for signal, _ in trainer.signals] == ["skew_kl"]
    assert type(trainer.output_strategy).__name__ == ("FullLogits" if chunk == 0 else "ChunkedHead")
    trainer.train()
    logged = next(entry for entry in trainer.state.log_history if "skew_kl_loss" in entry)
    assert logged["skew_kl_loss"] == pytest.approx(expected / 0.7, rel=1e-5)
    assert logged["loss"] == pytest.approx(expected, rel=1e-5)


def test_an_output_signal_of_your_own_trains_from_a_teacher_cache(tmp_path, registered):
    teacher, student = tiny_teacher(seed=0), tiny_teacher(seed=1).train()
    tokenizer = _tokenizer(tmp_path / "tok", [f"w{i}" for i in range(VOCAB - 5)])
    cache = load_teacher_cache(build(teacher, ragged_dataset(), tmp_path / "cache", tokenizer=tokenizer), tokenizer)
    expected = _hand(student, teacher, top_k=TOP_K)
    for chunk in (0, 4):
        trainer = DistillationTrainer(model=student, teacher_model=None, train_dataset=cache, data_collator=pad_collator,
                                      args=_args(tmp_path / str(chunk), logits_chunk_size=chunk),
                                      processing_class=tokenizer)
        assert not trainer.teacher_source.models  # (the cache alone: no teacher runs)
        batch = trainer.data_collator([cache[i] for i in range(len(cache))])
        loss = trainer.compute_loss(student, dict(batch)).item()
        assert loss == pytest.approx(expected, rel=5e-4)  # (float16 log-probabilities in the cache)


def test_a_path_that_cannot_serve_it_refuses_it_before_training_and_no_package_file_names_it(tmp_path, registered):
    teacher, student = tiny_teacher(seed=0), tiny_teacher(seed=1)
    with pytest.raises(ValueError, match="output_kernel='liger' cannot run this job: the skew_kl term has no Liger"):
        DistillationTrainer(model=student, teacher_model=teacher, args=_args(tmp_path, output_kernel="liger"),
                            train_dataset=ragged_dataset(), data_collator=pad_collator)
    with pytest.raises(ValueError, match="logits_weight > 0 and skew_kl_weight > 0 turn on two output terms"):
        DistillationTrainer(model=student, teacher_model=teacher, args=_args(tmp_path, logits_weight=0.5),
                            train_dataset=ragged_dataset(), data_collator=pad_collator)
    for path in PACKAGE.rglob("*.py"):
        assert "skew_kl" not in path.read_text(), path
