"""The chunked logits / cross-entropy path equals the plain full-logits path: values and gradients, every kind."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel

from hf_distill import DistillationTrainer
from hf_distill.kernels.chunked import OutputHead, OutputTerms, auto_chunk_size, chunked_head_losses
from hf_distill.signals.logits import LOGITS_LOSSES, TOKEN_LOSSES, LogitsSignal, logits_divergence

from .conftest import lm_dataset, tiny_bert, tiny_llama

KINDS = list(LOGITS_LOSSES)


def _batch(data, n):
    rows = data.select(range(n))
    return {k: torch.tensor(rows[k]) for k in rows.column_names}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_chunked_head_losses_equal_full_logits_values_and_gradients(kind, temperature):
    """Against autograd on the full ``[N, V]`` logits, with a bias, a softcap, CE labels and two teachers."""
    g = torch.Generator().manual_seed(0)
    n, h, v = 23, 8, 50
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(v, generator=g, dtype=torch.float64, requires_grad=True)
    teacher_hidden = [torch.randn(n, 6, generator=g, dtype=torch.float64) for _ in range(2)]
    teacher_heads = [OutputHead(torch.randn(v, 6, generator=g, dtype=torch.float64)) for _ in range(2)]
    labels = torch.randint(0, v, (n,), generator=g)
    cap = 5.0
    signal = LogitsSignal(kind, temperature, jsd_beta=0.3)
    mean_logits = lambda each: torch.stack(each).mean(0)  # noqa: E731

    # reference: full logits, plain autograd
    z = torch.tanh(F.linear(hidden, weight, bias) / cap) * cap
    zt = mean_logits([t @ head.weight.T for head, t in zip(teacher_heads, teacher_hidden)])
    ce = F.cross_entropy(z, labels, reduction="sum")
    tokens = labels if kind in TOKEN_LOSSES else None  # (sampled_token: the token that followed each row)
    div = logits_divergence(z, zt, kind, temperature, 0.3, tokens=tokens).sum()
    reference = 0.25 * ce + 0.75 * div
    expected_grads = torch.autograd.grad(reference, (hidden, weight, bias))

    terms = OutputTerms(labels=labels, signal=signal, teacher_heads=tuple(teacher_heads),
                        teacher_hidden=tuple(teacher_hidden), combine=mean_logits, tokens=tokens)
    for chunk in (1, 4, 7, n + 5):
        total, sums = chunked_head_losses(hidden, OutputHead(weight, bias, cap), terms,
                                          {"task": 0.25, "logits": 0.75}, chunk)
        grads = torch.autograd.grad(total, (hidden, weight, bias))
        torch.testing.assert_close(total.double(), reference, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(sums["task"].double(), ce, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(sums["logits"].double(), div, rtol=1e-6, atol=1e-8)
        for got, want in zip(grads, expected_grads):
            assert _relative(got, want) < 1e-6, (chunk, _relative(got, want))


def test_gradient_flows_through_an_outer_scale_and_only_where_asked():
    """The backward scales the stored gradient by the incoming one; a frozen head gets none."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(9, 4, generator=g, requires_grad=True)
    weight = torch.randn(11, 4, generator=g)  # frozen output layer
    labels = torch.randint(0, 11, (9,), generator=g)
    terms = OutputTerms(labels=labels)
    total, _ = chunked_head_losses(hidden, OutputHead(weight), terms, {"task": 1.0}, 4)
    (3.0 * total).backward()
    reference_hidden = hidden.detach().clone().requires_grad_(True)
    (3.0 * F.cross_entropy(reference_hidden @ weight.T, labels, reduction="sum")).backward()
    torch.testing.assert_close(hidden.grad, reference_hidden.grad, rtol=1e-5, atol=1e-6)
    assert weight.grad is None


def test_auto_chunk_size_bounds_one_chunk_to_64mb():
    assert auto_chunk_size(262_144) == 64
    assert auto_chunk_size(49_152) == 341
    assert auto_chunk_size(10**9) == 16


def _trainer(make_args, student, teacher, data, chunk, **overrides):
    kind = overrides.get("logits_loss")
    if kind in TOKEN_LOSSES:  # an on-policy estimator (refused with lmbda=0): both paths read the batch's own tokens
        overrides["logits_loss"] = "reverse_kl"
    args = make_args(logits_chunk_size=chunk, **overrides)
    args.logits_loss = kind or args.logits_loss
    return DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data)


def _loss_and_grads(trainer, model, batch):
    model.zero_grad()
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return loss.detach(), grads


@pytest.mark.parametrize("kind", KINDS)
def test_trainer_chunked_equals_plain_for_every_kind(make_args, kind):
    """Tiny Llamas, ragged masks (-100 prompts and padding): loss 1e-4 and every parameter gradient 1e-3 relative."""
    teacher, student = tiny_llama(seed=1), tiny_llama(layers=1, seed=2)
    data = lm_dataset()
    batch = _batch(data, 6)
    overrides = dict(temperature=2.0, task_weight=0.4, logits_weight=0.6, logits_loss=kind, jsd_beta=0.3)
    plain = _trainer(make_args, student, teacher, data, 0, **overrides)
    chunked = _trainer(make_args, student, teacher, data, 5, **overrides)
    assert plain.logits_chunk_size is None and chunked.logits_chunk_size == 5
    loss_plain, grads_plain = _loss_and_grads(plain, student, batch)
    loss_chunked, grads_chunked = _loss_and_grads(chunked, student, batch)
    assert abs(loss_chunked - loss_plain) <= 1e-4 * abs(loss_plain)
    assert grads_plain.keys() == grads_chunked.keys() and "lm_head.weight" in grads_plain
    for name, want in grads_plain.items():
        assert _relative(grads_chunked[name], want) < 1e-3, name


@pytest.mark.parametrize("temperature", [0.7, 4.0])
def test_trainer_chunked_equals_plain_with_ensemble_truncation_and_hidden_signal(make_args, temperature):
    """Two teachers (mean_probs), a student with a larger (padded) vocabulary, and a hidden-state term beside."""
    teachers = [tiny_llama(seed=1), tiny_llama(seed=3)]
    student = tiny_llama(vocab=70, layers=1, seed=2)
    data = lm_dataset()
    batch = _batch(data, 5)
    overrides = dict(temperature=temperature, task_weight=0.3, logits_weight=0.7, hidden_weight=0.5,
                     vocab_mismatch="truncate", layer_map="last")
    plain = _trainer(make_args, student, teachers, data, 0, **overrides)
    chunked = _trainer(make_args, student, teachers, data, 3, **overrides)
    loss_plain, grads_plain = _loss_and_grads(plain, student, batch)
    loss_chunked, grads_chunked = _loss_and_grads(chunked, student, batch)
    assert abs(loss_chunked - loss_plain) <= 1e-4 * abs(loss_plain)
    for name, want in grads_plain.items():
        assert _relative(grads_chunked[name], want) < 1e-3, name


def test_gemma3_softcapping_and_gpt2_chunked_equal_plain(make_args):
    def gemma(seed, layers):
        torch.manual_seed(seed)
        config = Gemma3TextConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, max_position_embeddings=64, final_logit_softcapping=3.0,
            sliding_window=8, layer_types=["full_attention"] * layers,
        )
        return Gemma3ForCausalLM(config)

    def gpt2(seed, layers):
        torch.manual_seed(seed)
        config = GPT2Config(vocab_size=64, n_embd=32, n_layer=layers, n_head=2, n_positions=64,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return GPT2LMHeadModel(config)

    data = lm_dataset()
    batch = _batch(data, 4)
    for build in (gemma, gpt2):
        teacher, student = build(1, 2), build(2, 1)
        overrides = dict(temperature=2.0, task_weight=0.5, logits_weight=0.5)
        loss_plain, grads_plain = _loss_and_grads(_trainer(make_args, student, teacher, data, 0, **overrides),
                                                  student, batch)
        loss_chunked, grads_chunked = _loss_and_grads(_trainer(make_args, student, teacher, data, 4, **overrides),
                                                      student, batch)
        assert abs(loss_chunked - loss_plain) <= 1e-4 * abs(loss_plain), build.__name__
        for name, want in grads_plain.items():
            assert _relative(grads_chunked[name], want) < 1e-3, (build.__name__, name)


def test_training_and_evaluation_match_the_plain_path(make_args):
    """Three optimizer steps (accumulation 2) end with the same student; eval terms and agreement agree."""
    data = lm_dataset(n=24)
    finals, metrics = [], []
    for chunk in (0, 4):
        teacher, student = tiny_llama(seed=1), tiny_llama(layers=1, seed=2)
        trainer = _trainer(make_args, student, teacher, data, chunk, temperature=2.0, task_weight=0.5,
                           logits_weight=0.5, gradient_accumulation_steps=2, learning_rate=1e-2)
        trainer.eval_dataset = data
        trainer.train()
        finals.append(torch.cat([p.detach().reshape(-1) for p in student.parameters()]))
        metrics.append(trainer.evaluate())
    assert _relative(finals[1], finals[0]) < 1e-4
    for key in ("eval_loss", "eval_task_loss", "eval_logits_loss", "eval_teacher_agreement"):
        assert metrics[1][key] == pytest.approx(metrics[0][key], rel=1e-4), key


def test_auto_chunks_causal_lms_only_and_an_explicit_size_says_why_not(make_args):
    data = lm_dataset()
    trainer = _trainer(make_args, tiny_llama(layers=1, seed=2), tiny_llama(seed=1), data, "auto")
    assert trainer.logits_chunk_size == auto_chunk_size(64)
    classifier = DistillationTrainer(model=tiny_bert(), teacher_model=tiny_bert(seed=1), args=make_args())
    assert classifier.logits_chunk_size is None  # auto falls back
    with pytest.raises(ValueError, match="not a causal LM.*logits_chunk_size=0"):
        DistillationTrainer(model=tiny_bert(), teacher_model=tiny_bert(seed=1), args=make_args(logits_chunk_size=8))
    with pytest.raises(ValueError, match="logits_chunk_size must be"):
        make_args(logits_chunk_size=-1)


def test_a_model_that_changes_its_logits_is_caught(make_args):
    """A causal LM whose forward rescales its logits after the output layer cannot be chunked silently."""

    class ScaledLlamaForCausalLM(type(tiny_llama())):
        def forward(self, *args, **kwargs):
            outputs = super().forward(*args, **kwargs)
            outputs.logits = outputs.logits * 2.0
            return outputs

    torch.manual_seed(2)
    student = ScaledLlamaForCausalLM(tiny_llama().config)
    data = lm_dataset()
    trainer = _trainer(make_args, student, tiny_llama(seed=1), data, 4)
    with pytest.raises(ValueError, match="differ from the model's own logits.*logits_chunk_size=0"):
        trainer.compute_loss(student, _batch(data, 3))
