"""`output_kernel="liger"`: the output terms through Liger's fused linear JSD equal our chunked loss (CPU, eager)."""

from __future__ import annotations

import pytest
import torch

from hf_distill import DistillationTrainer
from hf_distill.loss import outputs

from .conftest import lm_dataset, loss_and_grad, tiny_llama, tiny_lm_trainer

pytest.importorskip("liger_kernel.chunked_loss")


def _trainer(make_args, **overrides):
    return tiny_lm_trainer(make_args(task_weight=0.5, logits_weight=0.5, logits_chunk_size=5, **overrides))


@pytest.mark.parametrize("settings", [{"logits_loss": "jsd", "jsd_beta": 0.5},
                                      {"logits_loss": "jsd", "jsd_beta": 0.2, "temperature": 2.0},
                                      {"logits_loss": "forward_kl", "temperature": 2.0},
                                      {"logits_loss": "reverse_kl"},
                                      {"logits_loss": "jsd", "teacher_dtype": "bfloat16"}])
def test_liger_kernel_gives_our_chunked_loss_and_gradient(make_args, monkeypatch, settings):
    calls = []
    real = outputs.liger_head_losses
    monkeypatch.setattr(outputs, "liger_head_losses", lambda *a, **k: calls.append(1) or real(*a, **k))
    reference_loss, reference_grad = loss_and_grad(_trainer(make_args, **settings))
    assert not calls  # (the default is ours)
    loss, grad = loss_and_grad(_trainer(make_args, output_kernel="liger", **settings))
    assert calls  # the Liger kernel did compute it
    torch.testing.assert_close(loss, reference_loss, rtol=1e-5, atol=1e-6)
    assert (grad - reference_grad).norm() <= 1e-4 * reference_grad.norm()


def test_liger_kernel_trains_and_logs_each_term(make_args):
    trainer = _trainer(make_args, output_kernel="liger", logits_loss="jsd", max_steps=3, logging_steps=1)
    trainer.train()
    rows = [row for row in trainer.state.log_history if "loss" in row]
    assert rows and all(torch.isfinite(torch.tensor(row["loss"])) for row in rows)
    assert all("task_loss" in row and "logits_loss" in row for row in rows)


@pytest.mark.parametrize("settings,words", [({"logits_loss": "tvd"}, "tvd"),
                                            ({"logits_chunk_size": 0}, "logits_chunk_size=0")])
def test_liger_kernel_refuses_what_it_cannot_compute_before_training(make_args, settings, words):
    teacher, student = tiny_llama(seed=1, hidden=64), tiny_llama(layers=1, seed=2)
    args = make_args(task_weight=0.5, logits_weight=0.5, output_kernel="liger", **settings)
    with pytest.raises(ValueError, match=words):
        DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=lm_dataset())


def test_liger_kernel_refuses_a_softcapped_output_layer_before_training(make_args):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    def gemma(seed, layers):
        torch.manual_seed(seed)
        return Gemma3ForCausalLM(Gemma3TextConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, max_position_embeddings=64, final_logit_softcapping=3.0,
            sliding_window=8, layer_types=["full_attention"] * layers))

    args = make_args(task_weight=0.5, logits_weight=0.5, output_kernel="liger", logits_loss="jsd")
    with pytest.raises(ValueError, match="softcap"):
        DistillationTrainer(model=gemma(2, 1), teacher_model=gemma(1, 2), args=args, train_dataset=lm_dataset())
