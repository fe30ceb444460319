"""A non-finite step stops the run (or is skipped) before the optimizer moves the student, naming the term; a NaN
student is never written; the chunked output path runs in the precision autocast uses and agrees with the plain
path there; hidden-state signals alone work under the default chunking; processes that are not one run are refused."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from transformers import TrainerCallback

from hf_distill import DistillationTrainer
from hf_distill.checks.safety import NonFiniteLossError
from hf_distill.kernels.chunked import OutputHead, check_head_reproduces_logits, chunked_head_losses

from .conftest import MLP, classification_dataset, lm_dataset, tiny_bert, tiny_llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class NaNAt(torch.nn.Module):
    """A teacher that answers NaN at the forward calls numbered in `calls` (1 = the first)."""

    def __init__(self, teacher: torch.nn.Module, calls: set[int]) -> None:
        super().__init__()
        self.teacher, self.nan_calls, self.calls = teacher, calls, 0
        self.config = teacher.config

    def forward(self, **kwargs):
        self.calls += 1
        outputs = self.teacher(**kwargs)
        if self.calls in self.nan_calls:
            outputs.logits = torch.full_like(outputs.logits, math.nan)
        return outputs


class Snapshots(TrainerCallback):
    def __init__(self, model):
        self.model, self.after_step = model, {}

    def on_step_end(self, args, state, control, **kwargs):
        self.after_step[state.global_step] = [p.detach().clone() for p in self.model.parameters()]


def _trainer(make_args, teacher, **overrides):
    student = tiny_bert(layers=1, seed=3)
    args = make_args(max_steps=3, per_device_train_batch_size=4, **overrides)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                  train_dataset=classification_dataset())
    snapshots = Snapshots(student)
    trainer.add_callback(snapshots)
    return trainer, student, snapshots


def test_a_nan_term_stops_the_run_at_that_step_before_the_update(make_args, tmp_path):
    teacher = NaNAt(tiny_bert(), calls={2, 3})
    trainer, student, snapshots = _trainer(make_args, teacher, output_dir=str(tmp_path / "run"))
    with pytest.raises(NonFiniteLossError, match=r"Training step 2: the term\(s\) logits went non-finite.*did not "
                                                 r"apply this step.*on_nonfinite='skip_step'"):
        trainer.train()
    assert list(snapshots.after_step) == [1]
    assert all(torch.equal(p, s) for p, s in zip(student.parameters(), snapshots.after_step[1]))  # not updated
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_skip_step_drops_the_update_and_trains_on(make_args):
    trainer, student, snapshots = _trainer(make_args, NaNAt(tiny_bert(), calls={2}), on_nonfinite="skip_step")
    trainer.train()
    assert all(torch.equal(p, s) for p, s in zip(snapshots.after_step[2], snapshots.after_step[1]))  # skipped
    assert not all(torch.equal(p, s) for p, s in zip(snapshots.after_step[3], snapshots.after_step[2]))  # trained on
    assert all(torch.isfinite(p).all() for p in student.parameters())
    logged = [row for row in trainer.state.log_history if "skipped_steps" in row]
    assert logged and logged[-1]["skipped_steps"] == 1


def test_an_infinite_gradient_with_finite_terms_is_named(make_args):
    student, teacher = MLP(seed=2), MLP(seed=1)
    student.net[0].weight.register_hook(lambda grad: torch.full_like(grad, math.inf))
    import datasets

    data = datasets.Dataset.from_dict({"x": torch.randn(8, 8).tolist(), "labels": [0, 1, 2, 3] * 2})
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=make_args(), train_dataset=data)
    with pytest.raises(NonFiniteLossError, match=r"step 1: the gradient norm \(every loss term was finite\)"):
        trainer.train()


def test_a_student_with_nan_weights_is_never_written(make_args, tmp_path):
    student = tiny_bert(layers=1)
    with torch.no_grad():
        student.classifier.weight[0, 0] = math.nan
    trainer = DistillationTrainer(model=student, teacher_model=tiny_bert(), args=make_args(),
                                  train_dataset=classification_dataset())
    with pytest.raises(NonFiniteLossError, match=r"Not saving the student .*classifier.weight"):
        trainer.save_model(str(tmp_path / "student"))
    assert not (tmp_path / "student" / "model.safetensors").exists()


# ---- precision and the chunked output path ----------------------------------------------------------------------


def _lm_trainer(make_args, **overrides):
    teacher, student = tiny_llama(seed=1, hidden=64), tiny_llama(layers=1, seed=2)
    return DistillationTrainer(model=student, teacher_model=teacher, args=make_args(**overrides),
                               train_dataset=lm_dataset())


def test_bf16_autocast_runs_the_chunked_path_and_agrees_with_full_logits(make_args):
    chunked = _lm_trainer(make_args, bf16=True, logits_chunk_size=8)
    plain = _lm_trainer(make_args, bf16=True, logits_chunk_size=0)
    assert chunked.accelerator.mixed_precision == "bf16" and chunked.logits_chunk_size == 8
    batch = {k: torch.tensor(v) for k, v in lm_dataset()[:4].items()}
    losses = []
    for trainer in (chunked, plain):
        model = trainer.accelerator.prepare_model(trainer.model)  # the student's forward under autocast, as in train
        losses.append(trainer.compute_loss(model, batch))
    torch.testing.assert_close(losses[0], losses[1], rtol=2e-2, atol=1e-3)  # bf16: 8 bits of mantissa
    chunked.train()
    assert all(math.isfinite(row["loss"]) for row in chunked.state.log_history if "loss" in row)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_head_check_and_the_chunked_terms_follow_autocast(dtype):
    torch.manual_seed(0)
    hidden, weight = torch.randn(2, 5, 32), torch.randn(64, 32)
    head = OutputHead(weight)

    def autocast():
        return torch.autocast("cpu", dtype=dtype)

    with autocast():
        logits = torch.nn.functional.linear(hidden, weight).float()  # what the model returns under autocast
    check_head_reproduces_logits(head, hidden, logits, "student", precision=autocast)  # within that precision
    with pytest.raises(ValueError, match="differ from the model's own logits"):
        check_head_reproduces_logits(head, hidden, logits + 0.05 * logits.abs().max(), "student", precision=autocast)

    labels = torch.randint(0, 64, (10,))
    rows = hidden.reshape(10, 32)
    terms = lambda z, start, end: {"task": torch.nn.functional.cross_entropy(z, labels[start:end], reduction="sum")}
    total, sums = chunked_head_losses(rows, head, terms, {"task": 1.0}, 3, precision=autocast)
    expected = torch.nn.functional.cross_entropy(logits.reshape(10, 64), labels, reduction="sum")  # hand formula
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-5)


def test_hidden_states_alone_train_under_the_default_chunking(make_args):
    settings = dict(task_weight=0.0, logits_weight=0.0, hidden_weight=1.0, hidden_loss="mse")
    auto, plain = _lm_trainer(make_args, **settings), _lm_trainer(make_args, logits_chunk_size=0, **settings)
    assert auto.logits_chunk_size is not None
    batch = {k: torch.tensor(v) for k, v in lm_dataset()[:4].items()}
    torch.testing.assert_close(auto.compute_loss(auto.model, batch), plain.compute_loss(plain.model, batch))
    auto.train()
    assert "hidden_loss" in auto.state.log_history[0]


# ---- processes -----------------------------------------------------------------------------------------------------


def _launch(mode: str, tmp_path) -> subprocess.CompletedProcess:
    from .test_distributed import _free_port

    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    if not os.path.exists(launcher):
        pytest.skip("accelerate's launcher is not installed next to this Python")
    command = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
               "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
               os.path.join(ROOT, "tests", "processes_check.py"), mode, str(tmp_path)]
    return subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_two_processes_that_are_not_one_run_are_refused(tmp_path):
    result = _launch("no_use_cpu", tmp_path)
    assert result.returncode != 0
    assert result.stdout.count("REFUSED: 2 processes were launched, but the training arguments see only this one") == 2


def test_one_process_going_nan_stops_both(tmp_path):
    result = _launch("nan_on_rank_1", tmp_path)
    assert result.returncode != 0
    assert result.stdout.count("STOPPED:") == 2, result.stdout[-2000:] + result.stderr[-2000:]  # neither hangs
    assert result.stdout.count("Training step 2: the term(s) logits went non-finite (NaN or inf) on process(es) "
                               "[1].") == 2
