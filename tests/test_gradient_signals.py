"""Input-gradient (Sobolev), adversarial (GREAT) and feature-gradient signals against formulas, autograd by hand and
finite differences; gradients reach the student, never the teacher; GREAT's discriminator learns and resumes."""

from __future__ import annotations

import copy

import datasets
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from hf_distill import DistillationTrainer

from .conftest import MLP, classification_dataset, tiny_bert


class Linear1(nn.Module):
    """y = w . x + b: input gradients have a closed form, 2 (y - target) w."""

    def __init__(self, inputs: int = 5, seed: int = 0, scale: float = 1.0):
        super().__init__()
        torch.manual_seed(seed)
        self.linear = nn.Linear(inputs, 1)
        with torch.no_grad():
            self.linear.weight.mul_(scale)

    def forward(self, x):
        return self.linear(x)


def regression_data(n: int = 24, inputs: int = 5, seed: int = 0) -> datasets.Dataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, inputs, generator=g)
    y = x @ torch.linspace(-1, 1, inputs) + 0.1 * torch.randn(n, generator=g)
    return datasets.Dataset.from_dict({"x": x.tolist(), "labels": y.tolist()})


def classification_rows(n: int = 24, inputs: int = 8, classes: int = 4, seed: int = 0) -> datasets.Dataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, inputs, generator=g)
    return datasets.Dataset.from_dict({"x": x.tolist(), "labels": torch.randint(0, classes, (n,), generator=g).tolist()})


def _batch(data: datasets.Dataset, n: int) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(data[:n][k]) for k in data.column_names}


def _only(make_args, **weights):
    return make_args(**{"task_weight": 0.0, "logits_weight": 0.0, **weights})


# ---- Sobolev: input gradients ---------------------------------------------------------------------------------------


def test_input_gradient_term_matches_the_closed_form_and_finite_differences(make_args):
    teacher, student = Linear1(seed=1, scale=3.0), Linear1(seed=2)
    data = regression_data()
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=_only(make_args, input_grad_weight=1.0),
                                  train_dataset=data)
    batch = _batch(data, 6)
    x, y = batch["x"], batch["labels"]

    def closed_form(w_s, b_s):
        dtype = w_s.dtype
        w_t, b_t = teacher.linear.weight[0].detach().to(dtype), teacher.linear.bias.detach().to(dtype)
        xx, yy = x.to(dtype), y.to(dtype)
        g_t = 2 * (xx @ w_t + b_t - yy)[:, None] * w_t  # d/dx (w.x + b - y)^2
        g_s = 2 * (xx @ w_s + b_s - yy)[:, None] * w_s
        return ((g_t - g_s) ** 2).mean()

    loss = trainer.compute_loss(student, batch)
    w_s, b_s = student.linear.weight[0].detach().clone(), student.linear.bias.detach().clone()
    torch.testing.assert_close(loss, closed_form(w_s, b_s), rtol=1e-5, atol=1e-6)

    # the term trains the student (double backward), and its gradient is the formula's: finite differences
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    eps = 1e-3
    for i in range(w_s.numel()):
        step = torch.zeros_like(w_s)
        step[i] = eps
        numeric = (closed_form(w_s.double() + step.double(), b_s.double())
                   - closed_form(w_s.double() - step.double(), b_s.double())) / (2 * eps)
        assert student.linear.weight.grad[0, i].item() == pytest.approx(numeric.item(), rel=1e-3, abs=1e-4)


def test_input_gradient_for_a_classifier_matches_autograd_by_hand_and_vanishes_for_a_copy(make_args):
    teacher, student = MLP(inputs=8, hidden=16, outputs=4, seed=1), MLP(inputs=8, hidden=6, outputs=4, seed=2)
    data = classification_rows()
    args = _only(make_args, input_grad_weight=1.0)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data)
    batch = _batch(data, 7)
    loss = trainer.compute_loss(student, batch)

    def gradient(model):
        x = batch["x"].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(x), batch["labels"], reduction="sum"), x)
        return g

    expected = ((gradient(teacher) - gradient(student)) ** 2).mean()
    assert expected > 0
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)

    twin = copy.deepcopy(teacher)
    trainer = DistillationTrainer(model=twin, teacher_model=teacher, args=args, train_dataset=data)
    assert trainer.compute_loss(twin, batch).item() == 0.0


def test_input_gradient_of_a_token_model_uses_shared_embeddings_and_counted_tokens(make_args):
    teacher, student = tiny_bert(layers=2, seed=1), tiny_bert(layers=1, seed=2)
    data = classification_dataset()
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=_only(make_args, input_grad_weight=1.0),
                                  train_dataset=data)
    assert len(trainer.signal_modules) == 0  # equal widths: no projection
    batch = _batch(data, 5)
    loss = trainer.compute_loss(student, batch)

    embeddings = teacher.bert.embeddings.word_embeddings(batch["input_ids"]).detach()
    mask = batch["attention_mask"].bool()

    def gradient(model):
        e = embeddings.clone().requires_grad_(True)
        logits = model(inputs_embeds=e, attention_mask=batch["attention_mask"]).logits
        (g,) = torch.autograd.grad(F.cross_entropy(logits, batch["labels"], reduction="sum"), e)
        return g[mask]

    expected = ((gradient(teacher) - gradient(student)) ** 2).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-9)

    narrow = tiny_bert(layers=1, hidden=16, seed=2)
    trainer = DistillationTrainer(model=narrow, teacher_model=teacher, args=_only(make_args, input_grad_weight=1.0),
                                  train_dataset=data)
    projection = trainer.signal_modules["input_grad__embedding_projection"]
    assert (projection.in_features, projection.out_features) == (32, 16)
    trainer.compute_loss(narrow, batch).backward()
    assert projection.weight.grad is not None and projection.weight.grad.abs().sum() > 0


def test_input_gradient_needs_one_float_input_or_a_key(make_args):
    teacher, student = Linear1(seed=1), Linear1(seed=2)
    data = regression_data().add_column("weight", [1.0] * 24)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=_only(make_args, input_grad_weight=1.0),
                                  train_dataset=data)
    with pytest.raises(ValueError, match="Name it with input_grad_key"):
        trainer.compute_loss(student, _batch(data, 4))
    trainer = DistillationTrainer(model=student, teacher_model=teacher,
                                  args=_only(make_args, input_grad_weight=1.0, input_grad_key="x"), train_dataset=data)
    assert trainer.compute_loss(student, _batch(data, 4)) > 0


# ---- GREAT ----------------------------------------------------------------------------------------------------------


def _great_args(make_args, **overrides):
    return _only(make_args, adversarial_grad_weight=1.0, discriminator_lr=1e-2, **overrides)


def test_great_student_term_is_minus_log_d_of_student_gradients(make_args):
    teacher, student = Linear1(seed=1, scale=3.0), Linear1(seed=2)
    data = regression_data()
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=_great_args(make_args),
                                  train_dataset=data)
    batch = _batch(data, 6)
    signal = next(s for s, _ in trainer.signals if s.name == "adversarial_grad")
    loss = trainer.compute_loss(student, batch)
    x = batch["x"].clone().requires_grad_(True)
    (g_s,) = torch.autograd.grad(((student(x).squeeze(-1) - batch["labels"]) ** 2).sum(), x)
    expected = -torch.log(torch.sigmoid(signal.discriminator(g_s))).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert student.linear.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert not any(p is q for p in signal.discriminator.parameters() for q in trainer.signal_modules.parameters())


def test_great_discriminator_learns_checkpoints_resumes_and_stays_out_of_the_export(make_args, tmp_path):
    teacher, student = Linear1(seed=1, scale=5.0), Linear1(seed=2, scale=0.2)  # clearly different gradients
    data = regression_data(n=48)
    common = dict(max_steps=30, per_device_train_batch_size=8, learning_rate=0.0, logging_steps=5,
                  save_strategy="steps", save_steps=15, train_sampling_strategy="sequential")
    trainer = DistillationTrainer(model=copy.deepcopy(student), teacher_model=teacher,
                                  args=_great_args(make_args, output_dir=str(tmp_path / "run"), **common),
                                  train_dataset=data)
    trainer.train()
    accuracy = [row["discriminator_accuracy"] for row in trainer.state.log_history if "discriminator_accuracy" in row]
    assert len(accuracy) == 6
    assert accuracy[-1] > 0.9, accuracy  # chance is 0.5
    signal = next(s for s, _ in trainer.signals if s.name == "adversarial_grad")
    final = {k: v.clone() for k, v in signal.discriminator.state_dict().items()}

    checkpoint = tmp_path / "run" / "checkpoint-15"
    saved = torch.load(checkpoint / "hf_distill_signal_state.pt", weights_only=True)
    assert set(saved["adversarial_grad"]) == {"discriminator", "optimizer"}

    trainer.save_model(str(tmp_path / "export"))
    assert set(load_file(tmp_path / "export" / "model.safetensors")) == set(student.state_dict())

    resumed = DistillationTrainer(model=copy.deepcopy(student), teacher_model=teacher,
                                  args=_great_args(make_args, output_dir=str(tmp_path / "resumed"), **common),
                                  train_dataset=data)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    resumed_signal = next(s for s, _ in resumed.signals if s.name == "adversarial_grad")
    for key, value in resumed_signal.discriminator.state_dict().items():
        torch.testing.assert_close(value, final[key], rtol=0, atol=1e-6)
    # without the saved state the discriminator would start afresh at step 15 and end elsewhere
    fresh = DistillationTrainer(model=copy.deepcopy(student), teacher_model=teacher,
                                args=_great_args(make_args, output_dir=str(tmp_path / "fresh"),
                                                 **{**common, "max_steps": 15}), train_dataset=data)
    fresh.train()
    fresh_signal = next(s for s, _ in fresh.signals if s.name == "adversarial_grad")
    assert not torch.allclose(fresh_signal.discriminator[0].weight, final["0.weight"])


# ---- feature gradients ----------------------------------------------------------------------------------------------


def test_feature_gradient_matches_autograd_by_hand_with_a_projection(make_args):
    teacher, student = MLP(inputs=8, hidden=16, outputs=4, seed=1), MLP(inputs=8, hidden=6, outputs=4, seed=2)
    data = classification_rows()
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=_only(make_args, feature_grad_weight=1.0),
                                  train_dataset=data)
    projection = trainer.signal_modules["feature_grad__gradient_projection"]
    assert (projection.in_features, projection.out_features) == (6, 16)
    batch = _batch(data, 7)
    loss = trainer.compute_loss(student, batch)

    def head_input_gradient(model):
        h = model.net[1](model.net[0](batch["x"])).detach().requires_grad_(True)  # the input of the last Linear
        (g,) = torch.autograd.grad(F.cross_entropy(model.net[2](h), batch["labels"], reduction="sum"), h)
        return g

    expected = ((head_input_gradient(teacher) - projection(head_input_gradient(student))) ** 2).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
    loss.backward()
    assert student.net[0].weight.grad.abs().sum() > 0 and projection.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_feature_gradient_vanishes_for_a_copy_and_runs_on_transformers(make_args):
    teacher = tiny_bert(layers=2, seed=1)
    data = classification_dataset()
    twin = copy.deepcopy(teacher)
    trainer = DistillationTrainer(model=twin, teacher_model=teacher, args=_only(make_args, feature_grad_weight=1.0),
                                  train_dataset=data)
    assert trainer.compute_loss(twin, _batch(data, 4)).item() == 0.0
    student = tiny_bert(layers=1, seed=3)
    trainer = DistillationTrainer(model=student, teacher_model=teacher,
                                  args=_only(make_args, feature_grad_weight=1.0, feature_layer="bert.pooler.dense"),
                                  train_dataset=data)
    loss = trainer.compute_loss(student, _batch(data, 4))
    assert loss > 0
    loss.backward()
    assert student.bert.pooler.dense.weight.grad.abs().sum() > 0
