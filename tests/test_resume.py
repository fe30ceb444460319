"""Exact resume with every stateful piece at once: hidden-state projections, the input-gradient projection, GREAT's
discriminator and its optimizer, and a teacher route. A run killed at step 3 and resumed ends where the uninterrupted
run ends, with the same logged losses."""

from __future__ import annotations

import copy

import torch
from transformers import BertForSequenceClassification, TrainerCallback

from hf_distill import DistillationTrainer
from hf_distill.data.teacher_cache import load_teacher_cache

from .conftest import classification_dataset, tiny_bert


def test_resume_with_every_stateful_signal_matches_an_uninterrupted_run(make_args, tmp_path):
    anchors = []
    for k in range(2):
        path = tmp_path / f"anchor-{k}"
        tiny_bert(layers=2, hidden=32, seed=10 + k).save_pretrained(path)
        anchors.append(str(path))
    student = tiny_bert(layers=1, hidden=16, seed=2)
    data = classification_dataset(n=24)
    common = dict(max_steps=6, per_device_train_batch_size=4, save_strategy="steps", save_steps=3,
                  train_sampling_strategy="sequential", teacher_route=anchors, hidden_weight=1.0,
                  input_grad_weight=1.0, adversarial_grad_weight=0.5, discriminator_lr=1e-2, learning_rate=1e-2)

    def run(name, resume=None):
        trainer = DistillationTrainer(model=copy.deepcopy(student), args=make_args(output_dir=str(tmp_path / name),
                                                                                   **common),
                                      train_dataset=data, route_loader=BertForSequenceClassification.from_pretrained)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run("full")
    assert set(full.signal_modules.keys()) == {"hidden__hidden_projections", "input_grad__embedding_projection"}
    resumed = run("resumed", resume=str(tmp_path / "full" / "checkpoint-3"))

    def state(trainer):
        signal = next(s for s, _ in trainer.signals if s.name == "adversarial_grad")
        return [*trainer.model.parameters(), *trainer.signal_modules.parameters(), *signal.discriminator.parameters()]

    for a, b in zip(state(full), state(resumed)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    def logged(trainer):  # the per-step logs, by step (a resumed run also carries the checkpoint's first rows)
        keep = ("teacher_anchor", "discriminator_accuracy")
        return {row["step"]: {k: v for k, v in row.items() if k.endswith("_loss") or k in keep}
                for row in trainer.state.log_history if "loss" in row}

    full_logs, resumed_logs = logged(full), logged(resumed)
    assert [full_logs[step]["teacher_anchor"] for step in range(1, 7)] == [0, 0, 0, 1, 1, 1]
    for step in (4, 5, 6):
        a, b = full_logs[step], resumed_logs[step]
        assert a.keys() == b.keys() and {"hidden_loss", "input_grad_loss", "adversarial_grad_loss"} <= a.keys()
        for key in a:
            assert abs(a[key] - b[key]) <= 1e-6 * max(1.0, abs(a[key])), (step, key, a[key], b[key])


class _Kill(TrainerCallback):
    """Raises at the end of step `at` (after the checkpoints before it were written): a job killed mid-training."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            raise KeyboardInterrupt("killed")


def test_resume_from_a_teacher_cache_continues_at_the_same_cache_position(make_args, tmp_path):
    """Shuffled batches from an offline teacher cache, 3 epochs of 4 steps: killed inside epoch 2, resumed from the
    last checkpoint, the run reads the same cached targets in the same order and ends where the uninterrupted one
    ends (parameters and every logged loss to 1e-6)."""
    from .test_teacher_cache import build, pad_collator, ragged_dataset, tiny_teacher

    cache = load_teacher_cache(build(tiny_teacher(), ragged_dataset(), tmp_path / "cache"))
    student = tiny_teacher(seed=1)
    common = dict(max_steps=12, per_device_train_batch_size=2, save_strategy="steps", save_steps=3,
                  temperature=2.0, task_weight=0.5, logits_weight=0.5, learning_rate=1e-2, logging_steps=1)
    seen: dict[str, list] = {}

    def run(name, resume=None, kill_at=None):
        callbacks = [_Kill(kill_at)] if kill_at else []
        trainer = DistillationTrainer(model=copy.deepcopy(student), teacher_model=None,
                                      args=make_args(output_dir=str(tmp_path / name), **common), train_dataset=cache,
                                      data_collator=pad_collator, callbacks=callbacks)
        collate = trainer.data_collator
        trainer.data_collator = lambda features: seen.setdefault(name, []).append(
            [f["teacher_tail_logprob"] for f in features]) or collate(features)
        try:
            trainer.train(resume_from_checkpoint=resume)
        except KeyboardInterrupt:
            pass
        return trainer

    full = run("full")
    killed = run("killed", kill_at=8)
    assert killed.state.global_step == 8 and (tmp_path / "killed" / "checkpoint-6").is_dir()
    resumed = run("resumed", resume=str(tmp_path / "killed" / "checkpoint-6"))

    assert seen["resumed"] == seen["full"][6:]  # the cache position: same examples, same order, from step 7 on
    assert seen["full"][:4] != seen["full"][4:8]  # (batches are shuffled per epoch: the order is not trivial)
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)

    def logged(trainer):
        return {row["step"]: {k: v for k, v in row.items() if k.endswith("loss")}
                for row in trainer.state.log_history if "loss" in row}

    full_logs, resumed_logs = logged(full), logged(resumed)
    for step in range(7, 13):
        a, b = full_logs[step], resumed_logs[step]
        assert a.keys() == b.keys() and {"loss", "task_loss", "logits_loss"} <= a.keys()
        for key in a:
            assert abs(a[key] - b[key]) <= 1e-6 * max(1.0, abs(a[key])), (step, key, a[key], b[key])
