"""The fast sampler (`data.sampler`): the decode loop and packed linear layers draw what `model.generate` draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from transformers import StoppingCriteria
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from hf_distill.data import sampler
from hf_distill.data.sampler import SamplingSettings, packed_linears, sample_completions, warp

from .conftest import MLP, tiny_llama

PROMPTS = [[5, 9, 11, 2], [7, 3], [12, 30, 31, 8, 6, 4], [40]]  # ragged: left padding of 5, 2, 0 and 5 columns


def settings(stops=(1,), sampler_name="decode", temperature=0.0, top_k=0, top_p=1.0, generations=1, new=12):
    return SamplingSettings(1.0, False, new, temperature, top_p, top_k, generations, 0, 0, tuple(stops),
                            sampler_name)


def both(model, prompts, kwargs, seed=3, **extra):
    """The completions of the decode loop and of `generate` for the same settings and seed."""
    decoded = sample_completions(model, prompts, settings(sampler_name="decode", **kwargs), seed, **extra)
    generated = sample_completions(model, prompts, settings(sampler_name="generate", **kwargs), seed, **extra)
    return decoded, generated


@pytest.fixture
def pack_everything(monkeypatch):
    monkeypatch.setattr(sampler, "PACK_MIN_WEIGHTS", 0)  # (a tiny model's layers are below the real threshold)


@pytest.mark.parametrize("packed", [False, True])
def test_greedy_completions_equal_generate_token_for_token(packed, request):
    """Ragged prompts, two stop ids that end some rows early (the padding after them cut), the rest at the cap: the
    decode loop writes exactly what `model.generate` writes, packed or not."""
    if packed:
        request.getfixturevalue("pack_everything")
    model = tiny_llama(vocab=48, layers=2, seed=5).eval()
    free = sample_completions(model, PROMPTS, settings(stops=(47,), sampler_name="generate"), 0)
    stops = (free[0][3], free[2][5])  # tokens these rows write: they stop there
    decoded, generated = both(model, PROMPTS, {"stops": stops})
    assert decoded == generated
    lengths = [len(c) for c in decoded]
    assert min(lengths) <= 6 and max(lengths) == 12 and all(c[-1] in stops for c in decoded if len(c) < 12)


def test_sampled_completions_repeat_under_a_seed_and_stop_like_generate():
    """Temperature, top-k and top-p, three completions per prompt: the same seed draws the same completions (a resumed
    run samples what the uninterrupted one did), another seed others; rows end at their stop token, padding cut."""
    model = tiny_llama(vocab=48, layers=2, seed=6).eval()
    for kwargs in ({"temperature": 1.0}, {"temperature": 0.7, "top_k": 7}, {"temperature": 1.3, "top_p": 0.8},
                   {"temperature": 0.9, "top_k": 20, "top_p": 0.9, "generations": 3}):
        chosen = settings(stops=(1, 2, 3), **kwargs)
        first = sample_completions(model, PROMPTS, chosen, 11)
        assert first == sample_completions(model, PROMPTS, chosen, 11)
        assert first != sample_completions(model, PROMPTS, chosen, 12)
        assert len(first) == len(PROMPTS) * kwargs.get("generations", 1)
        assert all(len(c) == 12 or c[-1] in (1, 2, 3) for c in first)
        assert all(t not in (1, 2, 3) for c in first for t in c[:-1])


def test_draw_inverts_the_cumulative_distribution():
    """`draw` on a fixed distribution with zeros: 20,000 draws match it (chi-square, p > 1e-3), never a zero."""
    p = torch.tensor([0.0, 0.05, 0.3, 0.0, 0.15, 0.5, 0.0])
    torch.manual_seed(0)
    tokens = sampler.draw(p.expand(20_000, -1).contiguous())
    counts = np.bincount(tokens.numpy(), minlength=7)
    assert counts[p.numpy() == 0].sum() == 0
    support = p.numpy() > 0
    assert chisquare(counts[support], 20_000 * p.numpy()[support]).pvalue > 1e-3


def reference_distribution(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """softmax(z / T) restricted to the top-k, then to the smallest most-likely set of mass >= top_p, renormalised:
    written with numpy from the definitions, token by token."""
    p = np.exp((logits.double().numpy() - logits.double().numpy().max()) / temperature)
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = np.zeros_like(p, dtype=bool)
    keep[order[: top_k or len(p)]] = True
    p = np.where(keep, p, 0.0) / p[keep].sum()
    mass, nucleus = 0.0, np.zeros_like(keep)
    for token in order:
        if not keep[token] or mass >= top_p:
            break
        nucleus[token], mass = True, mass + p[token]
    p = np.where(nucleus, p, 0.0)
    return p / p.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.6, 5, 1.0), (1.4, 0, 0.7), (1.0, 8, 0.85)])
def test_sampled_next_token_follows_the_warped_softmax(pack_everything, temperature, top_k, top_p):
    """4,000 draws of the first new token at one context (packed layers on): a chi-square test against the model's
    softmax warped by hand (p > 1e-3), and no draw outside the kept set."""
    model = tiny_llama(vocab=24, layers=1, hidden=16, seed=7).eval()
    prompt = [5, 9, 11]
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1]
    p = reference_distribution(logits, temperature, top_k, top_p)
    draws = sample_completions(model, [prompt] * 4000, settings(stops=(23,), temperature=temperature, top_k=top_k,
                                                                top_p=top_p, new=1), seed=5)
    counts = np.bincount([d[0] for d in draws], minlength=len(p))
    assert counts[p == 0].sum() == 0
    support = p > 0
    assert support.sum() >= 3
    assert chisquare(counts[support], 4000 * p[support]).pvalue > 1e-3


def test_warp_equals_transformers_warpers():
    """`warp` against transformers' own TopK / TopP warpers (after the temperature) on random logits with ties."""
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    logits[:, 10] = logits[:, 11]  # a tie
    for temperature, top_k, top_p in ((1.0, 5, 1.0), (0.7, 0, 0.9), (1.5, 12, 0.6), (1.0, 0, 0.05)):
        expected = logits / temperature
        if top_k:
            expected = TopKLogitsWarper(top_k)(None, expected)
        if top_p < 1:
            expected = TopPLogitsWarper(top_p)(None, expected)
        assert torch.equal(warp(logits, temperature, top_k, top_p), expected)


def test_packed_linears_compute_the_linear_layer_and_restore_it(pack_everything):
    """Inside: ``x W^T + b`` (within float32 rounding) through the packed copy, hooks still run; after: the plain
    layer again, and weights updated meanwhile are read by the next packing."""
    if not sampler.packing_available():
        pytest.skip("this torch has no oneDNN packed linear")
    layer = torch.nn.Linear(64, 96)
    seen = []
    layer.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    x = torch.randn(2, 3, 64)
    with packed_linears(layer, rows=6) as count:
        assert count == 1 and "forward" in vars(layer)
        inside = layer(x)
    torch.testing.assert_close(inside, x @ layer.weight.T + layer.bias, rtol=1e-5, atol=1e-5)
    assert "forward" not in vars(layer) and seen == [(2, 3, 96)]
    with torch.no_grad():
        layer.weight.mul_(2)
    with packed_linears(layer, rows=6):
        torch.testing.assert_close(layer(x), x @ layer.weight.T + layer.bias, rtol=1e-5, atol=1e-5)
    half = torch.nn.Linear(64, 96).to(torch.bfloat16)
    with packed_linears(half, rows=6) as count:
        assert count == 0  # (float32 only)


def test_entropies_and_stopping_criteria_match_generate():
    """The entropy meter sees the same raw logits, and a stopping criterion ends the same rows at the same step."""

    class AfterThree(StoppingCriteria):
        def __init__(self, width):
            self.width = width

        def __call__(self, input_ids, scores, **kwargs):
            done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
            done[1] = input_ids.shape[1] - self.width >= 3
            return done

    model = tiny_llama(vocab=48, layers=2, seed=8).eval()
    entropies = {"decode": [], "generate": []}
    out = {name: sample_completions(model, PROMPTS, settings(sampler_name=name), 4,
                                    entropies=entropies[name], stopping=AfterThree)
           for name in ("decode", "generate")}
    assert out["decode"] == out["generate"]
    assert out["decode"][1][3:] == [0] * 9 and 0 not in out["decode"][1][:3]  # row 1 padded after its third token
    assert entropies["decode"] == pytest.approx(entropies["generate"], rel=1e-6)


def test_decode_refuses_a_model_it_cannot_serve_and_auto_falls_back():
    """sampler='decode' on a module that is not a generating transformers model: an error naming it and the fix;
    'auto' leaves it to generate, and keeps generate on a GPU; 'generate' never uses the loop."""
    with pytest.raises(ValueError, match="sampler='decode' cannot sample from this model: MLP is not a transformers"):
        sampler.uses_decode(MLP(), "decode", torch.device("cpu"))
    assert not sampler.uses_decode(MLP(), "auto", torch.device("cpu"))
    assert sampler.uses_decode(tiny_llama(), "auto", torch.device("cpu"))
    assert not sampler.uses_decode(tiny_llama(), "auto", torch.device("cuda"))
    assert not sampler.uses_decode(tiny_llama(), "generate", torch.device("cpu"))


def test_a_model_whose_generation_config_changes_the_logits_samples_with_generate():
    """transformers applies a model's own repetition penalty (and the like) on top of an explicit config: the decode
    loop, which does not, leaves such a model to `generate` ('auto') or refuses it ('decode'), naming the setting."""
    model = tiny_llama(vocab=48, seed=5).eval()
    model.generation_config.repetition_penalty = 1.3
    assert not sampler.uses_decode(model, "auto", torch.device("cpu"))
    with pytest.raises(ValueError, match="repetition_penalty=1.3"):
        sampler.uses_decode(model, "decode", torch.device("cpu"))
    penalised = sample_completions(model, PROMPTS, settings(sampler_name="auto"), 0)
    assert penalised == sample_completions(model, PROMPTS, settings(sampler_name="generate"), 0)
    model.generation_config.repetition_penalty = 1.0
    assert sampler.uses_decode(model, "auto", torch.device("cpu"))
    assert sample_completions(model, PROMPTS, settings(sampler_name="auto"), 0) != penalised


def test_packed_once_serves_every_call_inside_it(pack_everything):
    """A model that does not change across calls (generate, evaluation) is packed once: the calls inside pack
    nothing more, answer as unpacked, and the model is plain again after."""
    if not sampler.packing_available():
        pytest.skip("this torch has no oneDNN packed linear")
    model = tiny_llama(vocab=48, layers=2, seed=5).eval()
    plain = sample_completions(model, PROMPTS, settings(stops=(47,), sampler_name="generate"), 0)
    with sampler.packed_once(model, rows=4):
        linears = [m for m in model.modules() if "forward" in vars(m)]
        assert len(linears) == 2 * 7 + 1  # (every layer of the tiny model, with the threshold at 0)
        with packed_linears(model, rows=4) as inner:
            assert inner == 0
        assert sample_completions(model, PROMPTS, settings(stops=(47,)), 0) == plain
    assert not any("forward" in vars(m) for m in model.modules())
    with sampler.packed_once(model, rows=4, sampler="generate"):
        assert not any("forward" in vars(m) for m in model.modules())
