"""The reference micro-batch (`hf_distill.loss.reference.reference_loss`, full logits in one short function) against a
hand formula, and every fast path of the trainer against it: the loss and the student's gradient of one micro-batch
on the full-logits path, the chunked output layer, its compiled kernel, Liger's fused kernel and a top-k teacher cache
kept at full width (k = V - 1, so the tail bucket is one token and the coarsened distributions are the exact ones)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from hf_distill import DistillationConfig, DistillationTrainer
from hf_distill.data.teacher_cache import load_teacher_cache
from hf_distill.loss.reference import reference_loss

from .test_teacher_cache import (
    SHAPES,
    TEMPERATURE,
    VOCAB,
    _tokenizer,
    build,
    pad_collator,
    ragged_dataset,
    tiny_teacher,
)

WEIGHTS = {"task_weight": 0.3, "logits_weight": 0.7}


def _args(tmp_path, **overrides) -> DistillationConfig:
    values = dict(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, save_strategy="no", max_steps=1,
                  per_device_train_batch_size=len(SHAPES), disable_tqdm=True, seed=0, temperature=TEMPERATURE,
                  **WEIGHTS)
    values.update(overrides)
    return DistillationConfig(**values)


def _batch() -> dict[str, torch.Tensor]:
    return pad_collator([ragged_dataset()[i] for i in range(len(SHAPES))])


def _loss_and_grad(loss_of, student) -> tuple[float, torch.Tensor]:
    student.zero_grad()
    loss = loss_of()
    loss.backward()
    grads = torch.cat([p.grad.reshape(-1) for p in student.parameters() if p.grad is not None])
    return loss.item(), grads


@pytest.mark.parametrize("logits_loss", ["forward_kl", "reverse_kl", "jsd"])
def test_the_reference_is_the_hand_formula(tmp_path, logits_loss):
    teacher, student = tiny_teacher(seed=0), tiny_teacher(seed=1)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, train_dataset=ragged_dataset(),
                                  args=_args(tmp_path, logits_loss=logits_loss, jsd_beta=0.3),
                                  data_collator=pad_collator)
    output = next(signal for signal, _ in trainer.signals if signal.is_output_term)
    batch = _batch()
    loss, terms = reference_loss(student, teacher, batch, output, WEIGHTS["task_weight"], WEIGHTS["logits_weight"])
    with torch.no_grad():
        z_s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].double()
        z_t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].double()
    counted = batch["labels"][:, 1:] != -100
    z_s, z_t, y = z_s[counted], z_t[counted], batch["labels"][:, 1:][counted]
    p_s, p_t = torch.softmax(z_s / TEMPERATURE, -1), torch.softmax(z_t / TEMPERATURE, -1)

    def kl(p, q):  # KL(p || q) per row
        return (p * (p.log() - q.log())).sum(-1)

    mixture = 0.3 * p_t + 0.7 * p_s  # TRL's generalized JSD: beta * KL(p_t || m) + (1 - beta) * KL(p_s || m)
    divergence = {"forward_kl": kl(p_t, p_s), "reverse_kl": kl(p_s, p_t),
                  "jsd": 0.3 * kl(p_t, mixture) + 0.7 * kl(p_s, mixture)}[logits_loss]
    by_hand_output = TEMPERATURE**2 * divergence.mean().item()
    by_hand_task = F.cross_entropy(z_s, y).item()
    assert terms["logits_loss"].item() == pytest.approx(by_hand_output, rel=1e-5)
    assert terms["task_loss"].item() == pytest.approx(by_hand_task, rel=1e-5)
    assert loss.item() == pytest.approx(0.3 * by_hand_task + 0.7 * by_hand_output, rel=1e-5)


PATHS = {
    "full-logits": dict(logits_chunk_size=0),
    "chunked": dict(logits_chunk_size=4, output_kernel="chunked"),
    "compiled": dict(logits_chunk_size=4, output_kernel="compiled"),
    "liger": dict(logits_chunk_size="auto", output_kernel="liger", logits_loss="jsd", jsd_beta=0.5),
}


@pytest.mark.parametrize("path", list(PATHS))
def test_every_live_fast_path_gives_the_reference_loss_and_gradient(tmp_path, path, request):
    if path == "liger":
        pytest.importorskip("liger_kernel")
    if path == "compiled":
        request.getfixturevalue("compiling")  # (torch.compile on for this test, or a skip naming why it cannot run)
    teacher, student = tiny_teacher(seed=0), tiny_teacher(seed=1).train()
    reference_student = copy.deepcopy(student)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, train_dataset=ragged_dataset(),
                                  args=_args(tmp_path, **PATHS[path]), data_collator=pad_collator)
    strategies = {"full-logits": "FullLogits", "chunked": "ChunkedHead", "compiled": "CompiledHead",
                  "liger": "LigerHead"}
    assert type(trainer.output_strategy).__name__ == strategies[path]
    output = next(signal for signal, _ in trainer.signals if signal.is_output_term)
    batch = _batch()
    loss, grad = _loss_and_grad(lambda: trainer.compute_loss(student, dict(batch)), student)
    ref_loss, ref_grad = _loss_and_grad(lambda: reference_loss(
        reference_student, teacher, batch, output, WEIGHTS["task_weight"], WEIGHTS["logits_weight"])[0],
        reference_student)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)


def test_a_full_width_teacher_cache_gives_the_reference_loss_and_gradient(tmp_path):
    teacher, student = tiny_teacher(seed=0), tiny_teacher(seed=1).train()
    reference_student = copy.deepcopy(student)
    tokenizer = _tokenizer(tmp_path / "tok", [f"w{i}" for i in range(VOCAB - 5)])
    cache = load_teacher_cache(build(teacher, ragged_dataset(), tmp_path / "cache", tokenizer=tokenizer,
                                     top_k=VOCAB - 1), tokenizer)
    trainer = DistillationTrainer(model=student, teacher_model=None, train_dataset=cache, data_collator=pad_collator,
                                  args=_args(tmp_path, logits_chunk_size=4), processing_class=tokenizer)
    assert not trainer.teacher_source.models  # (no teacher runs: the targets come from the cache)
    output = next(signal for signal, _ in trainer.signals if signal.is_output_term)
    batch = trainer.data_collator([cache[i] for i in range(len(cache))])
    plain = {key: batch[key] for key in ("input_ids", "attention_mask", "labels")}
    loss, grad = _loss_and_grad(lambda: trainer.compute_loss(student, dict(batch)), student)
    ref_loss, ref_grad = _loss_and_grad(lambda: reference_loss(
        reference_student, teacher, plain, output, WEIGHTS["task_weight"], WEIGHTS["logits_weight"])[0],
        reference_student)
    assert loss == pytest.approx(ref_loss, rel=1e-3)  # (the cache stores float16 log-probabilities)
    torch.testing.assert_close(grad, ref_grad, rtol=2e-2, atol=1e-4)
