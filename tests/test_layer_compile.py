"""`compile_student_layers`: the student's decoder layers through `torch.compile` give the eager loss and gradient (also
under gradient checkpointing), one graph serves every layer, evaluation stays eager, a failed compile falls back to
the same numbers, it is refused where it cannot serve, and the command line's speed default."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_distill import DistillationTrainer
from hf_distill.speed import layer_compile, performance

from .conftest import lm_dataset, loss_and_grad, tiny_llama


def _trainer(make_args, **overrides):
    """A 2-layer tiny Llama student under a wider 2-layer teacher (fp32, full logits: the layers are what differs)."""
    args = make_args(task_weight=0.5, logits_weight=0.5, temperature=2.0, **overrides)
    return DistillationTrainer(model=tiny_llama(layers=2, seed=2), teacher_model=tiny_llama(seed=1, hidden=64),
                               args=args, train_dataset=lm_dataset())


def _graphs(layer: nn.Module) -> int:
    """How many compiled graphs dynamo holds for the layer class's forward (0: it ran eagerly)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    return len(_debug_get_cache_entry_list(type(layer).forward.__code__))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_layers_give_the_eager_loss_and_gradient(make_args, compiling, checkpointing):
    trainer = _trainer(make_args, gradient_checkpointing=checkpointing)
    if checkpointing:
        trainer.model.gradient_checkpointing_enable({"use_reentrant": False})
    layers = layer_compile.decoder_layers(trainer.model)
    assert len(layers) == 2 and all(type(m).__name__ == "LlamaDecoderLayer" for m in layers)
    eager_loss, eager_grad = loss_and_grad(trainer)
    trainer.model.zero_grad(set_to_none=True)
    state = layer_compile.CompileState()
    assert layer_compile.compile_layers(trainer.model, state) == 2
    before = _graphs(layers[0])
    loss, grad = loss_and_grad(trainer)
    assert not state.failed and _graphs(layers[0]) > before  # (dynamo compiled the layers: not an eager run)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, eager_grad, rtol=1e-4, atol=1e-6)
    compiled = _graphs(layers[0])
    assert compiled - before <= 1  # one graph serves both layers (their parameters are the graph's inputs)
    trainer.model.eval()
    with torch.no_grad():  # evaluation and generation: the plain layers, no new compile
        trainer.model(input_ids=torch.tensor(lm_dataset()[:2]["input_ids"]))
    assert _graphs(layers[0]) == compiled
    assert layer_compile.uncompile_layers(trainer.model) == 2
    assert all("forward" not in m.__dict__ for m in layers)


def test_training_compiles_the_layers_and_leaves_the_student_plain(make_args, compiling, tmp_path):
    trainer = _trainer(make_args, compile_student_layers=True, max_steps=2)
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, layer_compile.StudentLayerCompile))
    layer = layer_compile.decoder_layers(trainer.model)[0]
    before = _graphs(layer)
    trainer.train()
    assert callback.layers == 2 and not callback.state.failed and _graphs(layer) >= before
    rows = [row for row in trainer.state.log_history if "loss" in row]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(row["loss"])) for row in rows)
    assert all("forward" not in m.__dict__ for m in layer_compile.decoder_layers(trainer.model))
    trainer.save_model(str(tmp_path / "student"))
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "student"))
    for (name, a), b in zip(trainer.model.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_a_failed_compile_falls_back_to_the_same_numbers(make_args, monkeypatch):
    def broken(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")
        return run

    warnings = []
    monkeypatch.setattr(layer_compile.torch, "compile", broken)
    monkeypatch.setattr(layer_compile, "_COMPILED", {})
    monkeypatch.setattr(layer_compile.logger, "warning", lambda *a: warnings.append(a[0] % a[1:]))
    trainer = _trainer(make_args)
    eager_loss, eager_grad = loss_and_grad(trainer)
    trainer.model.zero_grad(set_to_none=True)
    state = layer_compile.CompileState()
    layer_compile.compile_layers(trainer.model, state)
    loss, grad = loss_and_grad(trainer)
    assert state.failed and len(warnings) == 1 and "InvalidCxxCompiler" in warnings[0]  # (warned once, 2 layers)
    torch.testing.assert_close(loss, eager_loss)
    torch.testing.assert_close(grad, eager_grad)


def test_compiled_layers_are_refused_before_training_where_they_cannot_serve(make_args, monkeypatch):
    monkeypatch.setattr(layer_compile, "compile_obstacle", lambda device: "torch.compile found no C++ compiler (test)")
    with pytest.raises(ValueError, match="cannot run here: torch.compile found no C.*compile_student_layers=False"):
        _trainer(make_args, compile_student_layers=True)
    monkeypatch.setattr(layer_compile, "compile_obstacle", lambda device: None)
    with pytest.raises(ValueError, match="compiles the student twice"):
        _trainer(make_args, compile_student_layers=True, torch_compile=True)
    with pytest.raises(ValueError, match="input_grad.*differentiate the student's gradient again"):
        _trainer(make_args, compile_student_layers=True, input_grad_weight=1.0)
    args = make_args(compile_student_layers=True)
    with pytest.raises(ValueError, match="not supported under FSDP"):
        layer_compile.check_compile_layers(tiny_llama(), args, [], "cpu", "FSDP")
    with pytest.raises(ValueError, match="found no decoder layers.*torch_compile=True"):
        layer_compile.check_compile_layers(nn.Sequential(nn.Linear(4, 4)), args, [], "cpu", "NO")


def test_speed_defaults_compile_the_layers_only_where_they_can_serve(make_args, monkeypatch):
    monkeypatch.setattr(performance, "compile_obstacle", lambda device_type: None)
    args = make_args()
    lines = performance.apply_speed_defaults(args, "cpu")
    assert args.compile_student_layers and any("decoder layers" in line for line in lines)
    kept_by = {"torch_compile": make_args(torch_compile=True), "teacher gradients": make_args(input_grad_weight=1.0)}
    for name, kept in kept_by.items():
        performance.apply_speed_defaults(kept, "cpu")
        assert not kept.compile_student_layers, name
    classifier = make_args()
    performance.apply_speed_defaults(classifier, "cpu", "sequence-classification")
    assert not classifier.compile_student_layers
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    sharded = make_args()
    performance.apply_speed_defaults(sharded, "cpu")
    assert not sharded.compile_student_layers
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setattr(performance, "compile_obstacle", lambda device_type: "no C++ compiler")
    nowhere = make_args()
    performance.apply_speed_defaults(nowhere, "cpu")
    assert not nowhere.compile_student_layers
