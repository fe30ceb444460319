"""PEFT students: LoRA adapters train (the base does not), save as adapters, merge into a plain model; with no teacher
the teacher is the student's own base with its adapters disabled (one copy in memory)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, TaskType
from transformers import AutoModelForSequenceClassification

from hf_distill import DistillationTrainer

from .conftest import classification_dataset, kl_rows, tiny_bert


def _batch(data, n):
    return {k: torch.tensor(data[:n][k]) for k in data.column_names}


def _lora():
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["query", "value"],
                      task_type=TaskType.SEQ_CLS)


def test_lora_student_trains_adapters_only_saves_them_and_merges(make_args, tmp_path):
    teacher, student = tiny_bert(layers=2, seed=1), tiny_bert(layers=2, seed=2)
    base = {k: v.clone() for k, v in student.state_dict().items()}
    data = classification_dataset()
    args = make_args(max_steps=4, learning_rate=5e-2, output_dir=str(tmp_path / "out"))
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                                  peft_config=_lora())
    peft_model = trainer.model
    assert hasattr(peft_model, "disable_adapter")
    trainer.train()
    lora = {n: p for n, p in peft_model.named_parameters() if "lora_B" in n}
    assert lora and all(p.abs().sum() > 0 for p in lora.values())  # lora_B starts at zero: it trained
    for name, value in peft_model.get_base_model().state_dict().items():
        key = name.replace("base_layer.", "")
        if "lora_" not in name and "classifier" not in name and key in base:
            assert torch.equal(value, base[key]), name  # the frozen base did not move

    trainer.save_model(str(tmp_path / "adapter"))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path / "adapter"))

    batch = _batch(data, 4)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    peft_model.eval()
    with torch.no_grad():
        adapted = peft_model(**inputs).logits
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, adapted, rtol=1e-4, atol=1e-5)


def test_self_distillation_teaches_with_the_adapter_free_base(make_args):
    student = tiny_bert(layers=2, seed=2)
    data = classification_dataset()
    batch = _batch(data, 6)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        base_logits = student.eval()(**inputs).logits
    args = make_args(task_weight=1.0, logits_weight=1.0, temperature=2.0, max_steps=5, learning_rate=5e-2)
    trainer = DistillationTrainer(model=student, args=args, train_dataset=data, peft_config=_lora())
    teacher = trainer.teacher_model
    assert teacher.student is trainer.model  # one copy: the teacher is the student with its adapters off
    assert not list(teacher.parameters())  # and owns no weights of its own
    trainer.model.train()
    assert trainer.compute_loss(trainer.model, batch) > 0
    assert trainer.model.training  # the teacher's pass does not leave the student in eval mode

    trainer.train()
    trainer.model.eval()
    with torch.no_grad():
        teacher_logits = teacher(**inputs).logits
        student_logits = trainer.model(**inputs).logits
    torch.testing.assert_close(teacher_logits, base_logits)  # adapters off: the untouched base model
    assert not torch.allclose(student_logits, base_logits)  # the adapters moved the student
    loss = trainer.compute_loss(trainer.model, batch)
    ce = F.cross_entropy(student_logits, batch["labels"])
    kl = kl_rows(F.softmax(base_logits / 2, -1), F.softmax(student_logits / 2, -1)).mean() * 4
    torch.testing.assert_close(loss, ce + kl, rtol=1e-5, atol=1e-6)


def test_self_distillation_refuses_gradient_signals(make_args):
    with pytest.raises(ValueError, match="input_grad_weight need a separate teacher_model"):
        DistillationTrainer(model=tiny_bert(layers=1), args=make_args(input_grad_weight=1.0),
                            train_dataset=classification_dataset(), peft_config=_lora())
