"""End-to-end behaviour: the student learns, terms are logged, evaluation reports agreement, the student exports."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BertTokenizerFast, pipeline

from hf_distill import DistillationTrainer

from .conftest import MLP, classification_dataset, kl_rows, lm_dataset, next_token_counted, tiny_bert, tiny_llama


def test_thirty_steps_reduce_the_students_kl_to_the_teacher(make_args):
    teacher, student = tiny_llama(seed=1), tiny_llama(layers=1, seed=2)
    with torch.no_grad():  # a confident teacher, so there is something to learn
        teacher.lm_head.weight.mul_(8.0)
    data = lm_dataset(n=32, ragged=False)
    args = make_args(
        max_steps=30, learning_rate=3e-3, task_weight=0.0, logits_weight=1.0, temperature=1.0,
        per_device_train_batch_size=8, logging_steps=5, lr_scheduler_type="constant",
    )
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                                  eval_dataset=data)
    before = trainer.evaluate()["eval_logits_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_logits_loss"]
    logged = [entry["logits_loss"] for entry in trainer.state.log_history if "logits_loss" in entry]
    assert len(logged) == 6
    assert after < 0.7 * before, (before, after)
    assert logged[-1] < logged[0]


def test_every_active_term_is_logged_and_sums_to_the_loss(make_args):
    teacher, student = tiny_bert(seed=1), tiny_bert(layers=1, seed=2)
    args = make_args(max_steps=4, logging_steps=2, gradient_accumulation_steps=2, task_weight=0.3, logits_weight=0.7)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                  train_dataset=classification_dataset())
    trainer.train()
    entries = [e for e in trainer.state.log_history if "loss" in e]
    assert len(entries) == 2
    for entry in entries:
        assert {"task_loss", "logits_loss"} <= set(entry)
        assert entry["loss"] == pytest.approx(0.3 * entry["task_loss"] + 0.7 * entry["logits_loss"], rel=1e-5)


def test_a_term_that_is_off_is_not_logged_and_does_not_run_the_teacher(make_args):
    class CountingTeacher(MLP):
        calls = 0

        def forward(self, x):
            CountingTeacher.calls += 1
            return super().forward(x)

    g = torch.Generator().manual_seed(0)
    data = datasets.Dataset.from_dict({"x": torch.randn(16, 8, generator=g).tolist(),
                                       "labels": torch.randint(0, 4, (16,), generator=g).tolist()})
    args = make_args(task_weight=1.0, logits_weight=0.0, max_steps=2)
    trainer = DistillationTrainer(model=MLP(seed=2), teacher_model=CountingTeacher(seed=1), args=args,
                                  train_dataset=data)
    trainer.train()
    assert CountingTeacher.calls == 0
    assert all("logits_loss" not in e for e in trainer.state.log_history)
    assert any("task_loss" in e for e in trainer.state.log_history)


def test_evaluate_reports_logits_loss_and_teacher_agreement(make_args):
    teacher, student = tiny_llama(seed=1), tiny_llama(layers=1, seed=2)
    data = lm_dataset(n=10)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=make_args(per_device_eval_batch_size=3),
                                  eval_dataset=data, train_dataset=data)
    metrics = trainer.evaluate()
    batch = {k: torch.tensor(data[:][k]) for k in data.column_names}
    with torch.no_grad():
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        zs, zt = student(**inputs).logits, teacher(**inputs).logits
    counted = next_token_counted(batch["labels"])
    agreement = (zs[counted].argmax(-1) == zt[counted].argmax(-1)).float().mean().item()
    pt, ps = torch.softmax(zt[counted] / 2, -1), torch.softmax(zs[counted] / 2, -1)
    kl = (kl_rows(pt, ps) * 4).mean().item()
    assert metrics["eval_teacher_agreement"] == pytest.approx(agreement, abs=1e-9)
    assert metrics["eval_logits_loss"] == pytest.approx(kl, rel=1e-5)
    assert {"eval_loss", "eval_task_loss"} <= set(metrics)


def test_prediction_step_returns_student_logits_for_compute_metrics(make_args):
    teacher, student = tiny_bert(seed=1), tiny_bert(layers=1, seed=2)
    data = classification_dataset(n=10)

    def accuracy(prediction):
        return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}

    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=make_args(), eval_dataset=data,
                                  train_dataset=data, compute_metrics=accuracy)
    metrics = trainer.evaluate()
    with torch.no_grad():
        batch = {k: torch.tensor(data[:][k]) for k in ("input_ids", "attention_mask")}
        expected = float((student(**batch).logits.argmax(-1) == torch.tensor(data["labels"])).float().mean())
    assert metrics["eval_accuracy"] == pytest.approx(expected)
    output = trainer.predict(data)
    assert output.predictions.shape == (10, 3)


def test_predict_returns_the_students_logits_without_compute_metrics(make_args):
    """As with transformers.Trainer, predict() gives the logits even when no compute_metrics reads them."""
    teacher, student = tiny_bert(seed=1), tiny_bert(layers=1, seed=2)
    data = classification_dataset(n=10)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=make_args(), train_dataset=data)
    output = trainer.predict(data)
    with torch.no_grad():
        batch = {k: torch.tensor(data[:][k]) for k in ("input_ids", "attention_mask")}
        expected = student.eval()(**batch).logits
    assert torch.allclose(torch.as_tensor(output.predictions), expected, atol=1e-5)
    assert output.label_ids.tolist() == data["labels"] and "test_logits_loss" in output.metrics


def _tokenizer(tmp_path, vocab_size=60):
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(vocab_size - 5)]
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(words))
    return BertTokenizerFast(vocab_file=str(vocab))


def test_saved_student_is_a_plain_model_that_pipeline_loads(make_args, tmp_path):
    teacher, student = tiny_bert(seed=1), tiny_bert(layers=1, seed=2)
    tokenizer = _tokenizer(tmp_path)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=make_args(max_steps=2),
                                  train_dataset=classification_dataset(), processing_class=tokenizer)
    trainer.train()
    out = tmp_path / "student"
    trainer.save_model(str(out))

    weights = load_file(str(out / "model.safetensors"))
    assert set(weights) == set(student.state_dict())  # nothing of the teacher
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 1
    assert not any(key in config for key in ("temperature", "logits_weight", "teacher"))

    reloaded = AutoModelForSequenceClassification.from_pretrained(str(out))
    text = "w1 w2 w3 w7"
    encoded = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        expected = torch.softmax(student.eval()(**encoded).logits, -1)[0]
        torch.testing.assert_close(torch.softmax(reloaded(**encoded).logits, -1)[0], expected)
    classify = pipeline("text-classification", model=str(out), top_k=None, device="cpu")
    scores = {row["label"]: row["score"] for row in classify([text])[0]}
    assert scores["LABEL_0"] == pytest.approx(float(expected[0]), abs=1e-5)
    assert sum(scores.values()) == pytest.approx(1.0, abs=1e-5)


def test_saved_causal_student_reloads_with_identical_logits(make_args, tmp_path):
    teacher, student = tiny_llama(seed=1), tiny_llama(layers=1, seed=2)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=make_args(max_steps=2),
                                  train_dataset=lm_dataset())
    trainer.train()
    assert student.config.use_cache is False  # (the Trainer's training value, args.use_cache)
    trainer.save_model(str(tmp_path / "lm"))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "lm"))
    assert reloaded.config.use_cache is True and student.config.use_cache is False  # saved as loaded; training unchanged
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, student.eval()(ids).logits)


def test_teacher_dtype_casts_the_teacher(make_args):
    teacher, student = tiny_bert(seed=1), tiny_bert(layers=1, seed=2)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=make_args(teacher_dtype="bfloat16"),
                                  train_dataset=classification_dataset())
    assert next(trainer.teacher_model.parameters()).dtype == torch.bfloat16
    assert next(student.parameters()).dtype == torch.float32
    trainer.train()
    assert all("logits_loss" in e for e in trainer.state.log_history if "loss" in e)
