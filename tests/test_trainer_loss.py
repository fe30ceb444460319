"""compute_loss against hand computations: the weighted sum, masking, the causal shift, regression, plain modules."""

from __future__ import annotations

import datasets
import pytest
import torch
import torch.nn.functional as F

from hf_distill import DistillationTrainer

from .conftest import MLP, classification_dataset, kl_rows, lm_dataset, tiny_bert, tiny_llama


def _batch(dataset, n):
    return {k: torch.tensor(dataset[:n][k]) for k in dataset.column_names}


def test_classification_loss_is_weighted_ce_plus_t2kl_rows(make_args):
    teacher, student = tiny_bert(seed=1), tiny_bert(layers=1, seed=2)
    data = classification_dataset()
    args = make_args(temperature=3.0, task_weight=0.3, logits_weight=0.7)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data)
    batch = _batch(data, 6)
    loss = trainer.compute_loss(student, batch)

    with torch.no_grad():
        zs = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        zt = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ce = -torch.log_softmax(zs, -1)[torch.arange(6), batch["labels"]].mean()
    kl = kl_rows(torch.softmax(zt / 3.0, -1), torch.softmax(zs / 3.0, -1)).mean() * 9.0
    torch.testing.assert_close(loss, 0.3 * ce + 0.7 * kl, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "tvd"])
def test_causal_lm_loss_counts_shifted_supervised_tokens_only(make_args, kind):
    teacher, student = tiny_llama(seed=1), tiny_llama(layers=1, seed=2)
    data = lm_dataset()
    args = make_args(temperature=2.0, task_weight=0.5, logits_weight=0.5, logits_loss=kind)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data)
    batch = _batch(data, 5)
    loss = trainer.compute_loss(student, batch)

    with torch.no_grad():
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        zs, zt = student(**inputs).logits, teacher(**inputs).logits
    ce_terms, kd_terms = [], []
    labels = batch["labels"]
    for row in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            target = int(labels[row, t + 1])
            if target == -100:
                continue
            ce_terms.append(-torch.log_softmax(zs[row, t], -1)[target])
            ps, pt = torch.softmax(zs[row, t] / 2, -1), torch.softmax(zt[row, t] / 2, -1)
            if kind == "forward_kl":
                kd_terms.append(kl_rows(pt, ps) * 4)
            elif kind == "reverse_kl":
                kd_terms.append(kl_rows(ps, pt) * 4)
            else:
                kd_terms.append(0.5 * (pt - ps).abs().sum() * 4)
    expected = 0.5 * torch.stack(ce_terms).mean() + 0.5 * torch.stack(kd_terms).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_without_labels_the_attention_mask_counts(make_args):
    teacher, student = tiny_llama(seed=1), tiny_llama(layers=1, seed=2)
    data = lm_dataset().remove_columns("labels")
    args = make_args(task_weight=0.0, logits_weight=1.0, temperature=1.0)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data)
    batch = _batch(data, 4)
    loss = trainer.compute_loss(student, batch)
    with torch.no_grad():
        zs, zt = student(**batch).logits, teacher(**batch).logits
    keep = batch["attention_mask"].bool()
    expected = kl_rows(torch.softmax(zt[keep], -1), torch.softmax(zs[keep], -1)).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_regression_student_plain_modules_alpha_mse_beta_teacher_mse(make_args):
    """alpha * MSE(y) + beta * MSE(y_teacher) for plain nn.Modules returning a tensor."""
    teacher, student = MLP(outputs=1, seed=1), MLP(outputs=1, hidden=4, seed=2)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 8, generator=g), torch.randn(20, generator=g)
    data = datasets.Dataset.from_dict({"x": x.tolist(), "labels": y.tolist()})
    args = make_args(task_weight=0.25, logits_weight=0.75, logits_loss="mse")
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data)
    batch = {"x": x[:7], "labels": y[:7]}
    loss = trainer.compute_loss(student, batch)
    with torch.no_grad():
        ys, yt = student(x[:7]).squeeze(-1), teacher(x[:7]).squeeze(-1)
    expected = 0.25 * ((ys - y[:7]) ** 2).mean() + 0.75 * ((ys - yt) ** 2).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_plain_module_classifier_with_dict_outputs_and_other_input_names(make_args):
    class DictModel(MLP):
        def forward(self, features):
            return {"logits": self.net(features)}

    teacher, student = DictModel(seed=1), DictModel(hidden=4, seed=2)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
    data = datasets.Dataset.from_dict({"features": x.tolist(), "labels": y.tolist()})
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=make_args(temperature=1.0), train_dataset=data
    )
    loss = trainer.compute_loss(student, {"features": x, "labels": y})
    with torch.no_grad():
        zs, zt = student(x)["logits"], teacher(x)["logits"]
    expected = 0.5 * F.cross_entropy(zs, y) + 0.5 * kl_rows(torch.softmax(zt, -1), torch.softmax(zs, -1)).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_return_outputs_gives_the_student_outputs(make_args):
    student, teacher = tiny_bert(layers=1, seed=2), tiny_bert(seed=1)
    data = classification_dataset()
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=make_args(), train_dataset=data)
    loss, outputs = trainer.compute_loss(student, _batch(data, 4), return_outputs=True)
    assert loss.dim() == 0 and outputs.logits.shape == (4, 3)


def test_gradients_reach_the_student_and_never_the_teacher(make_args):
    student, teacher = tiny_bert(layers=1, seed=2), tiny_bert(seed=1)
    data = classification_dataset()
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=make_args(), train_dataset=data)
    trainer.compute_loss(student, _batch(data, 4)).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())
    assert sum(float(p.grad.abs().sum()) for p in student.parameters() if p.grad is not None) > 0
    assert not teacher.training
