"""The speed work (docs/performance.md, section 8): the FLOP count against a hand count, the closed-form output
gradients against autograd in float64, bf16 / fp16 runs within a stated tolerance of fp32, the empty
`logits_to_keep` after the first batch, and the command line's speed defaults."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from hf_distill import DistillationTrainer
from hf_distill.kernels.chunked import OutputHead, OutputTerms, chunked_head_losses
from hf_distill.signals.closed_form import cross_entropy_and_grad, divergence_and_grad
from hf_distill.signals.logits import LogitsSignal, logits_divergence
from hf_distill.speed import performance
from hf_distill.speed.flops import distillation_flops_per_token, forward_flops_per_token, matmul_shapes

from .conftest import lm_dataset, tiny_llama

# ---- FLOPs -----------------------------------------------------------------------------------------------------------


def test_flop_count_of_a_tiny_llama_equals_the_hand_count():
    from transformers import LlamaConfig, LlamaForCausalLM

    H, I, L, heads, kv, V, T = 32, 80, 3, 4, 2, 96, 10
    model = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=L,
                                         num_attention_heads=heads, num_key_value_heads=kv,
                                         tie_word_embeddings=False))
    d = H // heads
    # by hand, per token and layer: q and o (H x H each), k and v (H x kv*d each), gate, up and down (H x I each)
    per_layer = 2 * (H * H + 2 * H * kv * d + H * H + 3 * H * I)
    attention = 2 * 2 * heads * d * (T + 1) / 2 * L  # Q K^T and A V over (T + 1) / 2 keys on average
    counted = forward_flops_per_token(model, T)
    assert counted.layers == L * per_layer
    assert counted.output == 2 * H * V
    assert counted.attention == pytest.approx(attention)
    student = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=1,
                                           num_attention_heads=heads, num_key_value_heads=kv))
    step = distillation_flops_per_token(model, student, T)
    student_forward = per_layer + 2 * H * V + 2 * 2 * heads * d * (T + 1) / 2
    assert step.total == pytest.approx(counted.total + 3 * student_forward)
    # the products of one step add up to the same count (forward; and backward = 2 x forward)
    batch = 3
    for backward, factor in ((False, 1), (True, 3)):
        shapes = matmul_shapes(student, batch * T, T, batch, chunk=7, backward=backward)
        assert sum(s.flops for s in shapes) == pytest.approx(factor * student_forward * batch * T)
        assert {(s.rows, s.inner, s.cols) for s in shapes if s.part == "output"} >= {(7, H, V), (2, H, V)}


# ---- closed-form gradients --------------------------------------------------------------------------------------------

KINDS = [("forward_kl", 0.5, 1.0), ("forward_kl", 0.5, 2.0), ("reverse_kl", 0.5, 1.0), ("reverse_kl", 0.5, 3.0),
         ("jsd", 0.5, 1.0), ("jsd", 0.1, 2.0), ("jsd", 0.9, 0.7), ("jsd", 0.0, 1.0), ("jsd", 1.0, 2.0)]


@pytest.mark.parametrize("kind,beta,temperature", KINDS)
def test_closed_form_value_and_gradient_equal_autograd_in_float64(kind, beta, temperature):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(6, 40, generator=g, dtype=torch.float64) * 4
    teacher = torch.randn(6, 40, generator=g, dtype=torch.float64) * 4
    # a teacher that rules tokens out (0 log 0 = 0); reverse KL (JSD at beta 1) is infinite there: tiny probabilities
    teacher[0, :5] = -80.0 if kind == "reverse_kl" or (kind == "jsd" and beta == 1) else -float("inf")
    teacher[1] = teacher[1] * 30  # a very peaked teacher
    student.requires_grad_(True)
    reference = logits_divergence(student, teacher, kind, temperature, beta, scale_by_temperature_squared=False)
    (grad,) = torch.autograd.grad(reference.sum(), student)
    value, closed = divergence_and_grad(student.detach().double(), teacher, kind, temperature, beta)
    torch.testing.assert_close(value.double(), reference.detach(), rtol=1e-5, atol=1e-6)
    # The closed form runs in float32: each log-probability log p_i = z_i / T - lse carries an absolute error of a few
    # eps32 * L, L = the row's largest |z| / T (about 180 for the peaked row), and the gradient p_i (r_i - D) / T takes
    # it times p_i (q_i for forward KL). How large that rounding comes out depends on the CPU's vector exp / log
    # (AVX2 vs AVX-512 builds of the same kernels: 3.6e-6 on an AMD EPYC, under 1e-6 on a Xeon), so the bound says
    # it; a wrong formula misses by O(p_i).
    eps = torch.finfo(torch.float32).eps
    scale = (student.detach().abs() + teacher.clamp(min=-100).abs()).amax(-1, keepdim=True) / temperature
    p = torch.softmax(student.detach() / temperature, dim=-1)
    q = torch.softmax(teacher / temperature, dim=-1)  # (forward KL's gradient p - q carries q's rounding too)
    bound = 1e-6 + 1e-5 * grad.abs() + 4 * eps * scale * torch.maximum(p, q)
    assert ((closed.double() - grad).abs() <= bound).all(), float(((closed.double() - grad).abs() - bound).max())


def test_closed_form_cross_entropy_skips_ignored_rows_as_torch_does():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(7, 30, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 30, (7,), generator=g)
    labels[3] = -100
    reference = F.cross_entropy(z, labels, reduction="sum")
    (grad,) = torch.autograd.grad(reference, z)
    value, closed = cross_entropy_and_grad(z.detach(), labels)
    torch.testing.assert_close(value.double(), reference.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(closed.double(), grad, rtol=1e-5, atol=1e-6)
    assert closed[3].abs().max() == 0


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_chunked_terms_by_formula_give_the_autograd_gradients_with_softcap_and_temperature(softcap):
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(11, 16, generator=g, dtype=torch.float64, requires_grad=True)
    weight = (torch.randn(50, 16, generator=g, dtype=torch.float64) * 0.5).requires_grad_(True)
    teacher_hidden, teacher_weight = torch.randn(11, 16, generator=g, dtype=torch.float64), torch.randn(50, 16, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 50, (11,), generator=g)
    signal = LogitsSignal("jsd", temperature=2.0, jsd_beta=0.3)
    terms = OutputTerms(labels=labels, signal=signal, teacher_heads=(OutputHead(teacher_weight),),
                        teacher_hidden=(teacher_hidden,))
    assert terms.closed_form(torch.zeros(11, 50, dtype=torch.float64), 0, 11, {"task": 1.0, "logits": 1.0}) is not None
    total, _ = chunked_head_losses(hidden, OutputHead(weight, softcap=softcap), terms, {"task": 0.4, "logits": 0.6}, 4)
    total.backward()
    got = hidden.grad.clone(), weight.grad.clone()

    hidden.grad = weight.grad = None
    z = hidden @ weight.T
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    expected = 0.4 * F.cross_entropy(z, labels, reduction="sum") + 0.6 * logits_divergence(
        z, teacher_hidden @ teacher_weight.T, "jsd", 2.0, 0.3).sum()
    expected.backward()
    # the chunked path works in float32 (its log-sum-exp and accumulation): float32 tolerances against float64 autograd
    torch.testing.assert_close(total.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[0], hidden.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], weight.grad, rtol=1e-5, atol=1e-6)


# ---- reduced precision against fp32 (tiny models) ---------------------------------------------------------------------


def _lm_trainer(make_args, **overrides):
    teacher, student = tiny_llama(seed=1, hidden=64), tiny_llama(layers=1, seed=2)
    return DistillationTrainer(model=student, teacher_model=teacher, args=make_args(logits_loss="jsd", **overrides),
                               train_dataset=lm_dataset())


def _first_losses(trainer):
    batch = {k: torch.tensor(v) for k, v in lm_dataset()[:8].items()}
    model = trainer.accelerator.prepare_model(trainer.model)  # (the forward under autocast when it is on)
    with trainer.compute_loss_context_manager():
        loss = trainer.compute_loss(model, batch)
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])
    return loss.detach().float(), grad


#: Tolerances, relative to fp32: a 16-bit teacher changes the targets by its rounding (bf16: 8 bits of mantissa,
#: fp16: 11), CPU bf16 autocast rounds the student's products as well, `output_layer_dtype` only the output layers'.
PRECISIONS = [({"teacher_dtype": "bfloat16"}, 2e-2, 0.1), ({"teacher_dtype": "float16"}, 5e-3, 0.05),
              ({"bf16": True}, 3e-2, 0.15), ({"bf16": True, "teacher_dtype": "bfloat16"}, 3e-2, 0.15),
              ({"output_layer_dtype": "bfloat16"}, 2e-2, 0.1),
              ({"output_layer_dtype": "bfloat16", "teacher_dtype": "bfloat16"}, 2e-2, 0.1)]


@pytest.mark.parametrize("settings,loss_tolerance,grad_tolerance", PRECISIONS)
def test_reduced_precision_losses_and_gradients_stay_near_fp32(make_args, settings, loss_tolerance, grad_tolerance):
    reference_loss, reference_grad = _first_losses(_lm_trainer(make_args, task_weight=0.5, logits_weight=0.5))
    trainer = _lm_trainer(make_args, task_weight=0.5, logits_weight=0.5, **settings)
    if "teacher_dtype" in settings:
        assert next(trainer.teacher_model.parameters()).dtype == getattr(torch, settings["teacher_dtype"])
    loss, grad = _first_losses(trainer)
    assert not torch.equal(grad, reference_grad)  # the reduced precision did take effect
    assert abs(loss - reference_loss) <= loss_tolerance * abs(reference_loss)
    assert ((grad - reference_grad).norm() / reference_grad.norm()) <= grad_tolerance
    trainer.train()  # and a short run stays finite
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in trainer.state.log_history if "loss" in row)


def test_after_the_first_batch_the_models_compute_no_output_layer_logits(make_args):
    trainer = _lm_trainer(make_args)
    seen = []
    for model in (trainer.model, trainer.teacher_model):
        model.register_forward_hook(lambda module, args, output: seen.append(tuple(output.logits.shape)))
    batch = {k: torch.tensor(v) for k, v in lm_dataset()[:4].items()}
    first = trainer.compute_loss(trainer.model, batch)
    second = trainer.compute_loss(trainer.model, batch)
    torch.testing.assert_close(first, second)
    assert [shape[1] for shape in seen] == [1, 1, 0, 0]  # the check's last position, then none


# ---- the command line's speed defaults ---------------------------------------------------------------------------------


def test_speed_defaults_pick_a_bf16_teacher_only_where_bf16_is_fast_and_nothing_was_chosen(make_args, monkeypatch):
    monkeypatch.setattr(performance, "fast_bf16", lambda device_type="cpu": True)
    args = make_args()
    lines = performance.apply_speed_defaults(args, "cpu")
    assert args.teacher_dtype == "bfloat16" and any("bf16" in line for line in lines)
    chosen = make_args(teacher_dtype="float32")
    performance.apply_speed_defaults(chosen, "cpu")
    assert chosen.teacher_dtype == "float32"  # the user's choice stands
    gradients = make_args(input_grad_weight=1.0)
    performance.apply_speed_defaults(gradients, "cpu")
    assert gradients.teacher_dtype is None  # a signal differentiates through the teacher
    classifier = make_args()
    performance.apply_speed_defaults(classifier, "cpu", "sequence-classification")
    assert classifier.teacher_dtype is None  # the bf16 teacher is a causal-LM default
    monkeypatch.setattr(performance, "fast_bf16", lambda device_type="cpu": False)
    slow = make_args()
    performance.apply_speed_defaults(slow, "cpu")
    assert slow.teacher_dtype is None and slow.output_layer_dtype is None


def test_speed_defaults_put_the_chunked_output_layers_in_bf16_only_where_safe(make_args, monkeypatch):
    monkeypatch.setattr(performance, "fast_bf16", lambda device_type="cpu": True)
    args = make_args()
    lines = performance.apply_speed_defaults(args, "cpu")
    assert args.output_layer_dtype == "bfloat16" and any("output layers" in line for line in lines)
    kept = {  # each a reason to leave the output layers as they are
        "chosen": make_args(output_layer_dtype="float16"),
        "full logits": make_args(logits_chunk_size=0),
        "gradient signal": make_args(input_grad_weight=1.0),
    }
    for name, chosen in kept.items():
        before = chosen.output_layer_dtype
        performance.apply_speed_defaults(chosen, "cpu")
        assert chosen.output_layer_dtype == before, name
    classifier = make_args()
    performance.apply_speed_defaults(classifier, "cpu", "sequence-classification")
    assert classifier.output_layer_dtype is None
    autocast = make_args()
    autocast.bf16 = True  # mixed precision already sets the output layers' dtype
    performance.apply_speed_defaults(autocast, "cpu")
    assert autocast.output_layer_dtype is None


def test_speed_defaults_take_the_linear_layers_backward_in_bf16_only_where_safe(make_args, monkeypatch):
    monkeypatch.setattr(performance, "fast_bf16", lambda device_type="cpu": True)
    args = make_args()
    lines = performance.apply_speed_defaults(args, "cpu")
    assert args.linear_backward_dtype == "bfloat16" and any("backward products in bf16" in line for line in lines)
    full_logits = make_args(logits_chunk_size=0)  # (independent of the output path)
    performance.apply_speed_defaults(full_logits, "cpu")
    assert full_logits.linear_backward_dtype == "bfloat16"
    for name, kept in {"gradient signal": make_args(input_grad_weight=1.0), "autocast": make_args()}.items():
        kept.bf16 = name == "autocast"
        performance.apply_speed_defaults(kept, "cpu")
        assert kept.linear_backward_dtype is None, name
    classifier = make_args()
    performance.apply_speed_defaults(classifier, "cpu", "sequence-classification")
    assert classifier.linear_backward_dtype is None
    sharded = make_args()
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # launched under FSDP: sharded weights, left as is
    performance.apply_speed_defaults(sharded, "cpu")
    assert sharded.linear_backward_dtype is None
    monkeypatch.setattr(performance, "fast_bf16", lambda device_type="cpu": False)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    slow = make_args()
    performance.apply_speed_defaults(slow, "cpu")
    assert slow.linear_backward_dtype is None


def test_fast_bf16_reads_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(performance, "_cpu_flags", lambda: {"avx512f", "amx_bf16"})
    assert performance.fast_bf16("cpu")
    monkeypatch.setattr(performance, "_cpu_flags", lambda: {"avx2", "fma"})
    assert not performance.fast_bf16("cpu")
    assert not performance.fast_bf16("mps")


def test_half_precision_on_a_cpu_without_bf16_units_is_warned_when_the_trainer_is_built(make_args, monkeypatch, caplog):
    """bf16 matmuls ran at 1.2 GFLOP/s against 128 in float32 on a 2-core AMD EPYC without AVX512-BF16: each setting
    that asks for them there is named in one warning before training; none where bf16 is fast, none on GPUs."""
    import logging

    monkeypatch.setattr(performance, "fast_bf16", lambda device_type="cpu": False)
    args = make_args(teacher_dtype="bfloat16", output_layer_dtype="bfloat16", bf16=True)
    assert performance.slow_half_precision(args, "cpu") == ["teacher_dtype='bfloat16'",
                                                            "output_layer_dtype='bfloat16'", "--bf16"]
    assert performance.slow_half_precision(make_args(teacher_dtype="float16"), "cpu") == ["teacher_dtype='float16'"]
    assert performance.slow_half_precision(make_args(teacher_dtype="float32"), "cpu") == []
    assert performance.slow_half_precision(args, "cuda") == []
    with caplog.at_level(logging.WARNING):
        _lm_trainer(make_args, teacher_dtype="bfloat16")
    assert "teacher_dtype='bfloat16': this CPU has no bf16 matrix units" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _lm_trainer(make_args)
    assert "no bf16 matrix units" not in caplog.text  # float32: nothing to say
    monkeypatch.setattr(performance, "fast_bf16", lambda device_type="cpu": True)
    assert performance.slow_half_precision(args, "cpu") == []
    with caplog.at_level(logging.WARNING):
        _lm_trainer(make_args, teacher_dtype="bfloat16")
    assert "no bf16 matrix units" not in caplog.text


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_takes_effect_on_glibc():
    """A freed 64 MB tensor's memory is reused by the next one: re-allocating and filling it page-faults almost nothing
    (without the setting glibc unmaps it on free, and filling the next one faults in all of its 16384 4-KB pages)."""
    import platform
    import resource

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    assert performance.keep_freed_memory() is True
    faults = []
    # (most rounds reuse the freed block; after other tests' allocations the first few can be a few bytes short of the
    # next 64-byte-aligned request until freed neighbours coalesce: seen 4 of 8 rounds on an AMD EPYC, so 16 rounds and
    # still more than half of them near zero)
    for _ in range(16):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        y = torch.ones(2**24)  # (64 MB)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        assert float(y.sum()) == 2**24
        del y
    assert sorted(faults)[8] < 2**24 * 4 // 4096 // 4, f"page faults re-allocating a freed 64 MB tensor: {faults}"


def test_the_command_line_parses_the_speed_flags():
    from hf_distill.cli.arguments import parse_distill_args

    model_args, _, args = parse_distill_args(["--teacher", "t", "--output_dir", "/tmp/x", "--fast_defaults", "false"])
    assert model_args.fast_defaults is False and args.teacher_dtype is None
    model_args, _, _ = parse_distill_args(["--teacher", "t", "--output_dir", "/tmp/x"])
    assert model_args.fast_defaults is True


def test_throughput_times_a_slow_pass_once_and_a_quick_one_three_times(monkeypatch):
    from hf_distill.cli import report

    clock = {"now": 0.0}
    monkeypatch.setattr(report.time, "perf_counter", lambda: clock["now"])

    class Timed(torch.nn.Module):  # each pass advances the fake clock by `seconds`
        def __init__(self, seconds: float) -> None:
            super().__init__()
            self.seconds, self.calls = seconds, 0

        def forward(self, input_ids):
            self.calls += 1
            clock["now"] += self.seconds
            return input_ids

    batch = {"input_ids": torch.zeros(8, 4)}
    quick, slow = Timed(0.5), Timed(10.0)
    assert report.throughput(quick, batch) == pytest.approx(8 / 0.5) and quick.calls == 4  # warm-up + 3
    assert report.throughput(slow, batch) == pytest.approx(8 / 10.0) and slow.calls == 2  # warm-up + 1
