"""Bad input gets a clear ValueError before the first step, and nothing already on disk is touched."""

from __future__ import annotations

import datasets
import pytest
import torch
from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerFast, TrainingArguments

from hf_distill import DistillationTrainer

from .conftest import MLP, classification_dataset, kl_rows, lm_dataset, next_token_counted, tiny_bert, tiny_llama


def test_classifier_output_sizes_differ(make_args):
    with pytest.raises(ValueError, match=r"teacher BertForSequenceClassification has 3 .*student .* has 2"):
        DistillationTrainer(model=tiny_bert(num_labels=2, layers=1), teacher_model=tiny_bert(num_labels=3),
                            args=make_args(), train_dataset=classification_dataset())


def test_language_model_vocabularies_differ(make_args):
    with pytest.raises(ValueError, match=r"has 72 \(vocabulary\).*has 64.*vocab_mismatch='truncate'"):
        DistillationTrainer(model=tiny_llama(vocab=64, layers=1), teacher_model=tiny_llama(vocab=72),
                            args=make_args(), train_dataset=lm_dataset())


def test_truncate_compares_the_shared_ids_only(make_args):
    teacher, student = tiny_llama(vocab=72, seed=1), tiny_llama(vocab=64, layers=1, seed=2)
    data = lm_dataset()
    args = make_args(vocab_mismatch="truncate", task_weight=0.0, logits_weight=1.0, temperature=1.0)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data)
    batch = {k: torch.tensor(data[:3][k]) for k in data.column_names}
    loss = trainer.compute_loss(student, batch)
    with torch.no_grad():
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        zs, zt = student(**inputs).logits, teacher(**inputs).logits[..., :64]
    counted = next_token_counted(batch["labels"])
    ps, pt = torch.softmax(zs[counted], -1), torch.softmax(zt[counted], -1)
    torch.testing.assert_close(loss, kl_rows(pt, ps).mean(), rtol=1e-5, atol=1e-6)
    trainer.train()


def test_truncate_is_refused_for_classifiers(make_args):
    with pytest.raises(ValueError, match="output sizes differ"):
        DistillationTrainer(model=tiny_bert(num_labels=2, layers=1), teacher_model=tiny_bert(num_labels=3),
                            args=make_args(vocab_mismatch="truncate"), train_dataset=classification_dataset())


def test_plain_modules_with_different_widths_fail_at_the_first_step_before_any_update(make_args):
    student, teacher = MLP(outputs=4, seed=2), MLP(outputs=5, seed=1)
    before = [p.detach().clone() for p in student.parameters()]
    data = datasets.Dataset.from_dict({"x": torch.randn(8, 8).tolist(), "labels": [0, 1, 2, 3] * 2})
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=make_args(), train_dataset=data)
    with pytest.raises(ValueError, match="the teacher MLP has 5 .*the student MLP has 4"):
        trainer.train()
    assert all(torch.equal(p, b) for p, b in zip(student.parameters(), before))


def test_task_loss_on_without_labels(make_args):
    data = classification_dataset().remove_columns("labels")
    with pytest.raises(ValueError, match=r"task_weight=0.5 need\(s\) labels.*no `labels`.*set these weights to 0"):
        DistillationTrainer(model=tiny_bert(layers=1), teacher_model=tiny_bert(), args=make_args(), train_dataset=data)
    with pytest.raises(ValueError, match=r"input_grad_weight=1.0 need\(s\) labels"):  # gradients of the task loss
        DistillationTrainer(model=tiny_bert(layers=1), teacher_model=tiny_bert(), train_dataset=data,
                            args=make_args(task_weight=0.0, input_grad_weight=1.0))
    # the same data is fine when only the teacher teaches
    DistillationTrainer(model=tiny_bert(layers=1), teacher_model=tiny_bert(), args=make_args(task_weight=0.0),
                        train_dataset=data)


def test_labels_made_by_the_collator_count(make_args, tmp_path):
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(64)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t1")),
                                        pad_token="t0", unk_token="t1")
    data = lm_dataset().remove_columns("labels")
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    rng_before = torch.get_rng_state()
    trainer = DistillationTrainer(model=tiny_llama(layers=1), teacher_model=tiny_llama(), args=make_args(),
                                  train_dataset=data, data_collator=collator)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the label check leaves the random state alone
    trainer.train()
    assert "task_loss" in trainer.state.log_history[0]


def test_missing_teacher(make_args):
    with pytest.raises(ValueError, match="needs a teacher"):
        DistillationTrainer(model=tiny_bert(layers=1), args=make_args(), train_dataset=classification_dataset())
    # without the teacher term, plain supervised training works
    DistillationTrainer(model=tiny_bert(layers=1), args=make_args(logits_weight=0.0),
                        train_dataset=classification_dataset())


def test_plain_training_arguments_are_refused(tmp_path):
    with pytest.raises(TypeError, match="needs a DistillationConfig"):
        DistillationTrainer(model=tiny_bert(layers=1), teacher_model=tiny_bert(),
                            args=TrainingArguments(output_dir=str(tmp_path), report_to=[]))


def test_kl_on_a_regression_head_is_refused(make_args):
    data = datasets.Dataset.from_dict({"x": torch.randn(8, 8).tolist(), "labels": torch.randn(8).tolist()})
    trainer = DistillationTrainer(model=MLP(outputs=1), teacher_model=MLP(outputs=1, seed=3), args=make_args(),
                                  train_dataset=data)
    with pytest.raises(ValueError, match="single output .* Use logits_loss='mse'"):
        trainer.train()


def test_errors_leave_existing_files_alone(make_args, tmp_path):
    args = make_args()
    out = tmp_path / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "checkpoint-7").mkdir()
    (out / "checkpoint-7" / "model.safetensors").write_bytes(b"precious")
    with pytest.raises(ValueError):
        DistillationTrainer(model=tiny_bert(num_labels=2, layers=1), teacher_model=tiny_bert(num_labels=3), args=args,
                            train_dataset=classification_dataset())
    assert (out / "checkpoint-7" / "model.safetensors").read_bytes() == b"precious"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-7"]
