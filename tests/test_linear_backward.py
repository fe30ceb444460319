"""`linear_backward_dtype="bfloat16"`: the student's linear layers keep their float32 forward and take bf16 backward
products, checked against a float64 hand computation, float32 autograd and a training run; what it cannot serve is
refused before training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, TaskType
from transformers import TrainerCallback

from hf_distill import DistillationConfig, DistillationTrainer
from hf_distill.kernels.linear_backward import (
    LowPrecisionBackwardLinear,
    eligible_linears,
    low_precision_backward,
    restore_linears,
)

from .conftest import lm_dataset, tiny_llama


def _bf16(t: torch.Tensor) -> torch.Tensor:
    """`t` rounded to bf16, held in float64."""
    return t.bfloat16().double()


def test_backward_products_are_bf16_operands_with_float32_accumulation():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 48, requires_grad=True)
    weight = torch.randn(24, 48, requires_grad=True)
    bias = torch.randn(24, requires_grad=True)
    g = torch.randn(3, 5, 24)
    y = LowPrecisionBackwardLinear.apply(x, weight, bias, torch.bfloat16)
    assert torch.equal(y, F.linear(x, weight, bias))  # the forward is the plain float32 layer's, bit for bit
    y.backward(g)
    # by hand in float64 from the bf16-rounded operands; the kernel accumulates in float32 and rounds once to bf16
    gx = _bf16(g) @ _bf16(weight.detach())
    gw = _bf16(g).reshape(-1, 24).t() @ _bf16(x.detach()).reshape(-1, 48)
    for ours, hand in ((x.grad, gx), (weight.grad, gw)):
        assert ours.dtype == torch.float32
        assert ((ours.double() - hand).abs() <= 2**-8 * hand.abs() + 1e-6).all()
    torch.testing.assert_close(bias.grad, g.reshape(-1, 24).sum(0))  # dL/db stays float32

    # against float32 autograd: about bf16's precision apart, and not the same numbers (the option takes effect)
    x32, w32 = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    F.linear(x32, w32, bias.detach()).backward(g)
    for ours, exact in ((x.grad, x32.grad), (weight.grad, w32.grad)):
        relative = float((ours - exact).norm() / exact.norm())
        assert 1e-4 < relative < 1e-2


def test_the_backward_is_refused_when_differentiated_again():
    x = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(3, 8, requires_grad=True)
    y = LowPrecisionBackwardLinear.apply(x, weight, None, torch.bfloat16)
    (gx,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable"):
        gx.sum().backward()


def test_patching_keeps_the_forward_and_the_output_layer_and_is_undone():
    model = tiny_llama(layers=2, seed=3)
    ids = torch.randint(0, 64, (2, 7))
    before = model(input_ids=ids).logits
    layers = eligible_linears(model)
    assert model.lm_head not in layers and len(layers) == 2 * 7  # q k v o gate up down per layer
    assert low_precision_backward(model) == 14
    assert torch.equal(model(input_ids=ids).logits, before)
    assert "forward" not in model.lm_head.__dict__
    assert restore_linears(model) == 14
    assert all("forward" not in layer.__dict__ for layer in layers)
    with pytest.raises(ValueError, match="float16"):
        low_precision_backward(model, "float16")


def _gradient(make_args, **settings):
    args = make_args(task_weight=0.5, logits_weight=0.5, logits_chunk_size=5, max_steps=1, learning_rate=1e-9,
                     max_grad_norm=0.0, lr_scheduler_type="constant", train_sampling_strategy="sequential",
                     per_device_train_batch_size=8, **settings)
    grads = {}

    class Grab(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

    trainer = DistillationTrainer(model=tiny_llama(layers=2, seed=2, hidden=64), args=args, callbacks=[Grab()],
                                  teacher_model=tiny_llama(layers=2, seed=1, hidden=64), train_dataset=lm_dataset())
    trainer.train()
    return trainer, torch.cat([grads[n].flatten() for n in sorted(grads)])


def test_a_training_step_with_bf16_backward_products_is_close_to_float32(make_args):
    _, exact = _gradient(make_args)
    trainer, low = _gradient(make_args, linear_backward_dtype="bfloat16")
    relative = float((low - exact).norm() / exact.norm())
    assert 1e-5 < relative < 0.02, relative  # changed, and by about bf16's precision
    assert all("forward" not in m.__dict__ for m in trainer.model.modules())  # the user's model is plain again
    _, checkpointed = _gradient(make_args, linear_backward_dtype="bfloat16", gradient_checkpointing=True)
    torch.testing.assert_close(checkpointed, low, rtol=1e-5, atol=1e-7)  # recomputation saves the same bf16 copies


def test_a_lora_student_trains_with_bf16_backward_products(make_args):
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                      task_type=TaskType.CAUSAL_LM)
    args = make_args(task_weight=0.5, logits_weight=0.5, max_steps=2, linear_backward_dtype="bfloat16")
    trainer = DistillationTrainer(model=tiny_llama(seed=2), teacher_model=tiny_llama(seed=1), args=args,
                                  train_dataset=lm_dataset(), peft_config=lora)
    before = {n: p.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(after[n], p) for n, p in before.items() if "lora_B" in n)
    assert all(torch.isfinite(p).all() for p in after.values())


def test_mixed_precision_and_twice_differentiating_signals_are_refused_before_training(make_args, tmp_path):
    with pytest.raises(ValueError, match="linear_backward_dtype.*--bf16"):
        DistillationConfig(output_dir=str(tmp_path), use_cpu=True, bf16=True, linear_backward_dtype="bfloat16")
    with pytest.raises(ValueError, match="Unknown linear_backward_dtype"):
        DistillationConfig(output_dir=str(tmp_path), use_cpu=True, linear_backward_dtype="float8")
    args = make_args(task_weight=0.5, input_grad_weight=1.0, linear_backward_dtype="bfloat16")
    with pytest.raises(ValueError, match="input_grad.*not differentiable"):
        DistillationTrainer(model=tiny_llama(seed=2), teacher_model=tiny_llama(seed=1), args=args,
                            train_dataset=lm_dataset())
