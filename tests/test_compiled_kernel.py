"""`output_kernel="compiled"`: the chunk's closed form through `torch.compile` equals autograd and our eager chunked
loss; a failed compile falls back to the same numbers; it is refused where it cannot run; the command line's default.

One compile serves the file (the same kind, temperature, beta, vocabulary and dtypes in each test: seconds, once)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_distill.kernels import compiled
from hf_distill.loss import outputs
from hf_distill.signals.logits import logits_divergence
from hf_distill.speed import performance

from .conftest import loss_and_grad, tiny_lm_trainer

SETTINGS = dict(logits_loss="jsd", jsd_beta=0.3, temperature=2.0, task_weight=0.4, logits_weight=0.6,
                logits_chunk_size=5, teacher_dtype="bfloat16", output_layer_dtype="bfloat16")


def _compiled_graphs() -> int:
    """How many compiled graphs of `chunk_terms` dynamo holds (0 when torch.compile ran it eagerly)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    return len(_debug_get_cache_entry_list(compiled.chunk_terms.__code__))


def _reference(z, teacher, labels, c_task, c_logits, temperature, beta):
    """``c_task * sum CE + c_logits * T^2 * sum JSD`` and its gradient by autograd on float32 copies."""
    z = z.float().detach().requires_grad_()
    loss = c_task * F.cross_entropy(z, labels, reduction="sum") + c_logits * logits_divergence(
        z, teacher.float(), "jsd", temperature, beta, True).sum()
    (grad,) = torch.autograd.grad(loss, z)
    return loss.detach(), grad


def test_compiled_chunk_terms_equal_autograd_on_bf16_logits(compiling):
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(23, 64, generator=g) * 3).bfloat16()
    teacher = (torch.randn(23, 64, generator=g) * 3).bfloat16()
    labels = torch.randint(0, 64, (23,), generator=g)
    labels[[2, 9]] = -100  # (ignored rows count zero)
    kernel = compiled.CompiledKernel()
    for rows in (23, 11):  # a second chunk size: the row count is dynamic, no failure, no fallback
        task, logits, grad = kernel(z[:rows], teacher[:rows], labels[:rows], torch.tensor(0.4), torch.tensor(0.6),
                                    "jsd", 2.0, 0.3, 4.0, torch.bfloat16)
        loss, expected = _reference(z[:rows], teacher[:rows], labels[:rows], 0.4, 0.6, 2.0, 0.3)
        assert not kernel.failed and grad.dtype == torch.bfloat16
        torch.testing.assert_close(0.4 * task + 0.6 * logits, loss, rtol=1e-5, atol=1e-5)
        assert (grad.float() - expected).norm() <= 4e-3 * expected.norm()  # (the gradient is rounded to bf16)
        assert grad[2].abs().sum() > 0  # an ignored row still has its divergence gradient
    assert _compiled_graphs() >= 1  # (dynamo did compile it: not an eager run)


def test_eager_chunk_terms_equal_autograd_for_each_kind():
    g = torch.Generator().manual_seed(1)
    z, teacher = torch.randn(7, 40, generator=g), torch.randn(7, 40, generator=g)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        _, logits, grad = compiled.chunk_terms(z, teacher, None, torch.tensor(0.0), torch.tensor(1.5), kind, 1.5,
                                               0.5, 1.5**2, torch.float32)
        x = z.clone().requires_grad_()
        loss = 1.5 * logits_divergence(x, teacher, kind, 1.5, 0.5, True).sum()
        loss.backward()
        torch.testing.assert_close(1.5 * logits, loss.detach())
        torch.testing.assert_close(grad, x.grad)


def _trainer(make_args, **overrides):
    return tiny_lm_trainer(make_args(**{**SETTINGS, **overrides}))


def test_compiled_kernel_gives_our_chunked_loss_and_gradient_in_training(make_args, compiling, monkeypatch):
    calls = []
    real = compiled.COMPILED_KERNEL.__call__
    monkeypatch.setattr(compiled.CompiledKernel, "__call__", lambda self, *a: calls.append(1) or real(*a))
    reference_loss, reference_grad = loss_and_grad(_trainer(make_args))
    assert not calls  # (the default is the eager closed form)
    trainer = _trainer(make_args, output_kernel="compiled")
    assert isinstance(trainer.output_strategy, outputs.CompiledHead)
    loss, grad = loss_and_grad(trainer)
    assert calls and not compiled.COMPILED_KERNEL.failed  # the compiled kernel computed it
    assert _compiled_graphs() >= 1
    torch.testing.assert_close(loss, reference_loss, rtol=1e-5, atol=1e-6)
    assert (grad - reference_grad).norm() <= 5e-3 * reference_grad.norm()  # (bf16 rounding of dL/dz, either order)
    trainer.args.max_steps = 2
    trainer.train()
    rows = [row for row in trainer.state.log_history if "loss" in row]
    assert rows and all("task_loss" in row and "logits_loss" in row for row in rows)


def test_a_failed_compile_falls_back_to_the_same_numbers(monkeypatch):
    def broken(fn, **kwargs):
        def run(*args):
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")
        return run

    warnings = []
    monkeypatch.setattr(compiled.torch, "compile", broken)
    monkeypatch.setattr(compiled.logger, "warning", lambda *a: warnings.append(a[0] % a[1:]))
    kernel = compiled.CompiledKernel()
    z, teacher = torch.randn(6, 30), torch.randn(6, 30)
    labels = torch.randint(0, 30, (6,))
    args = (torch.tensor(0.5), torch.tensor(0.5), "reverse_kl", 1.0, 0.5, 1.0, torch.float32)
    got = kernel(z, teacher, labels, *args)
    assert kernel.failed and len(warnings) == 1 and "InvalidCxxCompiler" in warnings[0]
    for a, b in zip(got, compiled.chunk_terms(z, teacher, labels, *args)):
        torch.testing.assert_close(a, b)
    kernel(z, teacher, labels, *args)
    assert len(warnings) == 1  # (warned once)


def test_compiled_kernel_is_refused_before_training_where_it_cannot_run(make_args, monkeypatch):
    monkeypatch.setattr(outputs, "compile_obstacle", lambda device: "torch.compile found no C++ compiler (test)")
    with pytest.raises(ValueError, match="output_kernel='compiled' cannot run here: torch.compile found no C"):
        _trainer(make_args, output_kernel="compiled")


def test_compiled_kernel_behaves_as_chunked_where_the_chunked_path_does_not_apply(make_args, monkeypatch):
    monkeypatch.setattr(outputs, "compile_obstacle", lambda device: None)
    trainer = _trainer(make_args, output_kernel="compiled", logits_chunk_size=0)
    assert isinstance(trainer.output_strategy, outputs.FullLogits)


def test_speed_defaults_turn_on_the_compiled_kernel_only_where_it_applies(make_args, monkeypatch):
    monkeypatch.setattr(performance, "compile_obstacle", lambda device_type: None)
    args = make_args()
    lines = performance.apply_speed_defaults(args, "cpu")
    assert args.output_kernel == "compiled" and any("torch.compile" in line for line in lines)
    kept_by = {"liger": make_args(output_kernel="liger"), "full logits": make_args(logits_chunk_size=0)}
    for name, kept in kept_by.items():
        before = kept.output_kernel
        performance.apply_speed_defaults(kept, "cpu")
        assert kept.output_kernel == before, name
    classifier = make_args()
    performance.apply_speed_defaults(classifier, "cpu", "sequence-classification")
    assert classifier.output_kernel == "chunked"
    monkeypatch.setattr(performance, "compile_obstacle", lambda device_type: "no C++ compiler")
    nowhere = make_args()
    performance.apply_speed_defaults(nowhere, "cpu")
    assert nowhere.output_kernel == "chunked"


def test_compile_obstacle_reads_the_process_and_the_device(monkeypatch):
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")
    assert "TORCHDYNAMO_DISABLE" in performance.compile_obstacle("cpu")
    monkeypatch.delenv("TORCHDYNAMO_DISABLE")
    assert "not offered" in performance.compile_obstacle("mps")
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert "not on PATH" in performance.compile_obstacle("cpu")
