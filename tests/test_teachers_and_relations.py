"""Similarity-preserving KD against its formula; ensembles of teachers; route-constrained optimisation (RCO)."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from transformers import BertForSequenceClassification

from hf_distill import DistillationTrainer
from hf_distill.signals.relational import similarity_loss
from hf_distill.teachers import anchor_at, route_boundaries

from .conftest import MLP, classification_dataset, kl_rows, tiny_bert
from .test_gradient_signals import classification_rows


def _batch(data, n):
    return {k: torch.tensor(data[:n][k]) for k in data.column_names}


# ---- similarity-preserving KD -----------------------------------------------------------------------------------


def test_similarity_loss_matches_tung_and_moris_formula_by_hand():
    g = torch.Generator().manual_seed(0)
    fs, ft = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 7, generator=g, dtype=torch.float64)
    b = 4

    def normalised_gram(features):
        gram = [[float(features[i] @ features[j]) for j in range(b)] for i in range(b)]
        return [[v / sum(w * w for w in row) ** 0.5 for v in row] for row in gram]

    gs, gt = normalised_gram(fs), normalised_gram(ft)
    expected = sum((gs[i][j] - gt[i][j]) ** 2 for i in range(b) for j in range(b)) / b**2
    assert similarity_loss(fs, ft).item() == pytest.approx(expected, rel=1e-12)
    assert similarity_loss(fs, 2.0 * fs).item() == pytest.approx(0.0, abs=1e-12)  # scale-free, any width


def test_similarity_term_on_plain_modules_uses_the_head_input(make_args):
    teacher, student = MLP(inputs=8, hidden=16, outputs=4, seed=1), MLP(inputs=8, hidden=6, outputs=4, seed=2)
    data = classification_rows()
    args = make_args(task_weight=0.0, logits_weight=0.0, similarity_weight=1.0)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data)
    batch = _batch(data, 6)
    loss = trainer.compute_loss(student, batch)
    features = [m.net[1](m.net[0](batch["x"])).detach() for m in (student, teacher)]
    torch.testing.assert_close(loss, similarity_loss(*features).float(), rtol=1e-5, atol=1e-7)
    loss.backward()
    assert student.net[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    twin = copy.deepcopy(teacher)
    trainer = DistillationTrainer(model=twin, teacher_model=teacher, args=args, train_dataset=data)
    assert trainer.compute_loss(twin, batch).item() == pytest.approx(0.0, abs=1e-7)


def test_similarity_term_on_token_models_averages_counted_tokens(make_args):
    teacher, student = tiny_bert(layers=2, hidden=32, seed=1), tiny_bert(layers=1, hidden=16, seed=2)
    data = classification_dataset()
    args = make_args(task_weight=0.0, logits_weight=0.0, similarity_weight=1.0)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data)
    batch = _batch(data, 6)
    loss = trainer.compute_loss(student, batch)
    mask = batch["attention_mask"]

    def features(model):
        with torch.no_grad():
            last = model(input_ids=batch["input_ids"], attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        return torch.stack([last[i][mask[i].bool()].mean(0) for i in range(6)])

    torch.testing.assert_close(loss, similarity_loss(features(student), features(teacher)), rtol=1e-5, atol=1e-7)


# ---- ensembles ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["mean_probs", "mean_logits"])
def test_two_identical_teachers_give_the_single_teachers_loss(make_args, mode):
    teacher, student = tiny_bert(layers=2, seed=1), tiny_bert(layers=1, seed=2)
    data = classification_dataset()
    batch = _batch(data, 6)
    args = make_args(temperature=3.0, ensemble=mode, hidden_weight=0.5)
    single = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data)
    pair = DistillationTrainer(model=student, teacher_model=[teacher, copy.deepcopy(teacher)], args=args,
                               train_dataset=data)
    torch.testing.assert_close(pair.compute_loss(student, batch), single.compute_loss(student, batch),
                               rtol=1e-6, atol=1e-7)


def test_ensemble_soft_targets_are_mean_probabilities_or_mean_logits(make_args):
    teachers = [tiny_bert(layers=2, seed=1), tiny_bert(layers=2, seed=5)]
    student = tiny_bert(layers=1, seed=2)
    data = classification_dataset()
    batch = _batch(data, 6)
    with torch.no_grad():
        z = [m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
             for m in [*teachers, student]]  # (the reference in float64: a KL this small cancels in float32)
    t = 2.0
    expected = {
        "mean_probs": kl_rows((F.softmax(z[0] / t, -1) + F.softmax(z[1] / t, -1)) / 2, F.softmax(z[2] / t, -1)),
        "mean_logits": kl_rows(F.softmax((z[0] + z[1]) / 2 / t, -1), F.softmax(z[2] / t, -1)),
    }
    for mode, rows in expected.items():
        args = make_args(temperature=t, ensemble=mode, task_weight=0.0, logits_weight=1.0)
        trainer = DistillationTrainer(model=student, teacher_model=teachers, args=args, train_dataset=data)
        torch.testing.assert_close(trainer.compute_loss(student, batch).double(), rows.mean() * t * t, rtol=1e-5,
                                   atol=1e-7)
    # regression-style MSE always compares with the mean output
    args = make_args(task_weight=0.0, logits_weight=1.0, logits_loss="mse")
    trainer = DistillationTrainer(model=student, teacher_model=teachers, args=args, train_dataset=data)
    expected_mse = ((z[2] - (z[0] + z[1]) / 2) ** 2).mean()
    torch.testing.assert_close(trainer.compute_loss(student, batch).double(), expected_mse, rtol=1e-5, atol=1e-7)


def test_other_signals_read_the_first_teacher(make_args):
    first, second, student = tiny_bert(layers=2, seed=1), tiny_bert(layers=2, seed=5), tiny_bert(layers=1, seed=2)
    data = classification_dataset()
    batch = _batch(data, 6)
    args = make_args(task_weight=0.0, logits_weight=0.0, hidden_weight=1.0)
    alone = DistillationTrainer(model=student, teacher_model=first, args=args, train_dataset=data)
    both = DistillationTrainer(model=student, teacher_model=[first, second], args=args, train_dataset=data)
    torch.testing.assert_close(both.compute_loss(student, batch), alone.compute_loss(student, batch))


def test_bad_teacher_lists_raise(make_args):
    with pytest.raises(TypeError, match="nn.Module or a list of them"):
        DistillationTrainer(model=tiny_bert(), teacher_model=[tiny_bert(), "bert-base"], args=make_args())
    with pytest.raises(ValueError, match="Teacher and student output sizes differ"):
        DistillationTrainer(model=tiny_bert(num_labels=3), teacher_model=[tiny_bert(num_labels=3), tiny_bert(num_labels=5)],
                            args=make_args())


# ---- route-constrained optimisation --------------------------------------------------------------------------------


def test_route_boundaries():
    assert route_boundaries(3, 6) == [0, 2, 4]
    assert route_boundaries(3, 6, [1, 5]) == [0, 1, 5]
    assert [anchor_at(step, [0, 2, 4]) for step in range(6)] == [0, 0, 1, 1, 2, 2]


@pytest.fixture
def anchors(tmp_path):
    paths = []
    for k in range(3):
        path = tmp_path / f"anchor-{k}"
        tiny_bert(layers=2, seed=10 + k).save_pretrained(path)
        paths.append(str(path))
    return paths


class CountingLoader:
    """Loads anchors and keeps weak references, to check that one teacher at a time stays in memory."""

    def __init__(self):
        self.loaded, self.alive = [], []

    def __call__(self, path):
        model = BertForSequenceClassification.from_pretrained(path)
        self.loaded.append(path)
        self.alive.append(weakref.ref(model))
        return model

    def live(self):
        gc.collect()
        return sum(ref() is not None for ref in self.alive)


def _anchors_logged(trainer):
    return [row["teacher_anchor"] for row in trainer.state.log_history if "teacher_anchor" in row]


def test_route_switches_anchors_on_schedule_with_one_teacher_loaded(make_args, anchors):
    data = classification_dataset()
    loader = CountingLoader()
    args = make_args(max_steps=6, teacher_route=anchors)
    trainer = DistillationTrainer(model=tiny_bert(layers=1, seed=2), args=args, train_dataset=data,
                                  route_loader=loader)
    live_counts = []

    class Watch:
        def __getattr__(self, name):
            return lambda *a, **k: None

        def on_step_end(self, *a, **k):
            live_counts.append(loader.live())

    trainer.add_callback(Watch())
    trainer.train()
    assert _anchors_logged(trainer) == [0, 0, 1, 1, 2, 2]
    assert loader.loaded == anchors and max(live_counts) == 1

    loader = CountingLoader()
    args = make_args(max_steps=6, teacher_route=anchors, route_steps=[1, 5])
    trainer = DistillationTrainer(model=tiny_bert(layers=1, seed=2), args=args, train_dataset=data,
                                  route_loader=loader)
    trainer.train()
    assert _anchors_logged(trainer) == [0, 1, 1, 1, 1, 2]


def test_route_anchor_teaches_like_that_teacher_and_resume_picks_the_right_one(make_args, anchors, tmp_path):
    data = classification_dataset()
    batch = _batch(data, 6)
    student = tiny_bert(layers=1, seed=2)
    routed = DistillationTrainer(model=student, args=make_args(teacher_route=anchors), train_dataset=data)
    direct = DistillationTrainer(model=student, teacher_model=BertForSequenceClassification.from_pretrained(anchors[0]),
                                 args=make_args(), train_dataset=data)
    torch.testing.assert_close(routed.compute_loss(student, batch), direct.compute_loss(student, batch))

    common = dict(max_steps=6, teacher_route=anchors, save_strategy="steps", save_steps=3,
                  train_sampling_strategy="sequential")
    full = DistillationTrainer(model=copy.deepcopy(student), args=make_args(output_dir=str(tmp_path / "a"), **common),
                               train_dataset=data)
    full.train()
    loader = CountingLoader()
    resumed = DistillationTrainer(model=copy.deepcopy(student), args=make_args(output_dir=str(tmp_path / "b"), **common),
                                  train_dataset=data, route_loader=loader)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    assert _anchors_logged(resumed)[-3:] == [1, 2, 2]  # step 4 is anchor 1's, as in the uninterrupted run
    assert loader.loaded == [anchors[0], anchors[1], anchors[2]]  # init loads anchor 0, then the route resumes at 1
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_route_and_teacher_model_are_exclusive(make_args, anchors):
    with pytest.raises(ValueError, match="pass teacher_model=None"):
        DistillationTrainer(model=tiny_bert(), teacher_model=tiny_bert(), args=make_args(teacher_route=anchors))
