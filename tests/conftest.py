"""Tiny, deterministic models and datasets shared by the tests (no downloads)."""

from __future__ import annotations

import os
import sys

import datasets
import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")
# torch.compile off in the tests and the processes they start: the command line's speed default would compile the
# output kernel in every causal-LM run (seconds each); tests/test_compiled_kernel.py turns it back on for its own.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

from hf_distill import DistillationConfig  # noqa: E402


def leave() -> None:
    """End a launched test process once its results are written and its process group is closed: straight to exit
    code 0, skipping the interpreter's teardown, where gloo's communication threads can still abort a finished process
    ("terminate called without an active exception", exit code -6; seen in CI)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def tiny_bert(num_labels: int = 3, layers: int = 2, hidden: int = 32, seed: int = 0, vocab: int = 60):
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=2 * hidden, max_position_embeddings=64, num_labels=num_labels,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config)


def tiny_llama(vocab: int = 64, layers: int = 2, hidden: int = 32, seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
        num_key_value_heads=2, intermediate_size=2 * hidden, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


class MLP(nn.Module):
    """A plain classifier/regressor: forward(x) -> tensor of logits (the classic KD setting)."""

    def __init__(self, inputs: int = 8, hidden: int = 16, outputs: int = 4, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(inputs, hidden), nn.Tanh(), nn.Linear(hidden, outputs))

    def forward(self, x):
        return self.net(x)


def classification_dataset(n: int = 32, seq: int = 8, vocab: int = 60, num_labels: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, seq), generator=g)
    lengths = torch.randint(3, seq + 1, (n,), generator=g)
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    labels = torch.randint(0, num_labels, (n,), generator=g)
    return datasets.Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "labels": labels.tolist()}
    )


def lm_dataset(n: int = 16, seq: int = 12, vocab: int = 64, seed: int = 2, ragged: bool = True):
    """Causal-LM rows whose numbers of supervised tokens differ a lot (right padding, -100 prompts)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, seq), generator=g)
    mask = torch.ones(n, seq, dtype=torch.long)
    labels = ids.clone()
    if ragged:
        for i in range(n):
            length = 3 + (i * 5) % (seq - 2)
            mask[i, length:] = 0
            labels[i, length:] = -100
            labels[i, : (i % 3)] = -100  # a prompt of 0-2 tokens
    return datasets.Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "labels": labels.tolist()}
    )


def tiny_lm_trainer(args):
    """A `DistillationTrainer` of a 1-layer tiny Llama student under a 2-layer, wider teacher, on `lm_dataset()`."""
    from hf_distill import DistillationTrainer

    teacher, student = tiny_llama(seed=1, hidden=64), tiny_llama(layers=1, seed=2)
    return DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=lm_dataset())


def loss_and_grad(trainer):
    """One training-mode `compute_loss` on the first 8 rows of `lm_dataset()` and its backward: (loss, flat grad)."""
    batch = {k: torch.tensor(v) for k, v in lm_dataset()[:8].items()}
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])


def next_token_counted(labels):
    """Hand-written causal-LM mask: position t counts when labels[t + 1] != -100."""
    counted = torch.zeros_like(labels, dtype=torch.bool)
    counted[:, :-1] = labels[:, 1:] != -100
    return counted


def kl_rows(p_t, p_s):
    """KL(p_t || p_s) per row, straight from the definition."""
    return (p_t * (p_t.log() - p_s.log())).sum(-1)


@pytest.fixture
def compiling(monkeypatch):
    """torch.compile on (this file turns it off for the rest of the suite), a compiler or skip."""
    from hf_distill.speed import performance

    monkeypatch.delenv("TORCHDYNAMO_DISABLE", raising=False)
    reason = performance.compile_obstacle("cpu")
    if reason:
        pytest.skip(reason)


@pytest.fixture
def make_args(tmp_path):
    def _make(**overrides):
        values = dict(
            output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, save_strategy="no", eval_strategy="no",
            per_device_train_batch_size=4, per_device_eval_batch_size=8, max_steps=3, logging_steps=1,
            disable_tqdm=True, seed=0, dataloader_num_workers=0,
        )
        values.update(overrides)
        return DistillationConfig(**values)

    return _make
