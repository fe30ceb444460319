"""Gradient accumulation is exact: GA=2 with batch b updates like one step with batch 2b (rel. diff < 1e-4)."""

from __future__ import annotations

import copy

import pytest
import torch

from hf_distill import DistillationTrainer

from .conftest import classification_dataset, lm_dataset, tiny_bert, tiny_llama


def _one_step_update(student, teacher, data, make_args, batch, accumulation, **overrides):
    student = copy.deepcopy(student)
    before = [p.detach().clone() for p in student.parameters()]
    args = make_args(
        per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation, max_steps=1,
        optim="sgd", learning_rate=1.0, lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0,
        train_sampling_strategy="sequential", **overrides,
    )
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data)
    trainer.train()
    return torch.cat([(p.detach() - b).flatten() for p, b in zip(student.parameters(), before)]), trainer


def _relative_difference(a, b):
    return float((a - b).norm() / a.norm())


@pytest.mark.parametrize("task_weight, logits_weight", [(0.5, 0.5), (0.0, 1.0), (1.0, 0.0)])
def test_causal_lm_with_ragged_token_counts(make_args, task_weight, logits_weight):
    teacher, student = tiny_llama(seed=1), tiny_llama(layers=1, seed=2)
    data = lm_dataset(n=4)
    counts = [(torch.tensor(row["labels"][1:]) != -100).sum().item() for row in data]
    assert max(counts) >= 3 * min(counts)  # rows really count very different numbers of tokens
    kwargs = dict(task_weight=task_weight, logits_weight=logits_weight, temperature=2.0)
    big, _ = _one_step_update(student, teacher, data, make_args, batch=4, accumulation=1, **kwargs)
    accumulated, trainer = _one_step_update(student, teacher, data, make_args, batch=2, accumulation=2, **kwargs)
    assert big.norm() > 0
    assert _relative_difference(big, accumulated) < 1e-4
    # the logged loss of the accumulated step is the loss of the big batch
    _, big_trainer = _one_step_update(student, teacher, data, make_args, batch=4, accumulation=1, **kwargs)
    torch.testing.assert_close(
        trainer.state.log_history[0]["loss"], big_trainer.state.log_history[0]["loss"], rtol=1e-5, atol=1e-7
    )


def test_causal_lm_naive_per_micro_batch_mean_would_differ(make_args):
    """Sensitivity check: the ragged data makes a per-micro-batch mean measurably wrong, so the test above can fail."""
    teacher, student = tiny_llama(seed=1), tiny_llama(layers=1, seed=2)
    data = lm_dataset(n=4)
    big, _ = _one_step_update(student, teacher, data, make_args, batch=4, accumulation=1, task_weight=1.0,
                              logits_weight=0.0)
    # by hand: average of the two micro-batch means
    model = copy.deepcopy(student)
    for half in (slice(0, 2), slice(2, 4)):
        batch = {k: torch.tensor(data[half][k]) for k in data.column_names}
        (model(**batch).loss / 2).backward()
    naive = torch.cat([-p.grad.flatten() for p in model.parameters()])
    assert _relative_difference(big, naive) > 1e-2


def test_sequence_classification_with_an_uneven_last_micro_batch(make_args):
    teacher, student = tiny_bert(seed=1), tiny_bert(layers=1, seed=2)
    data = classification_dataset(n=5)
    big, _ = _one_step_update(student, teacher, data, make_args, batch=5, accumulation=1)
    accumulated, _ = _one_step_update(student, teacher, data, make_args, batch=3, accumulation=2)
    assert _relative_difference(big, accumulated) < 1e-4
