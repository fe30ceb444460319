"""On-policy distillation across processes: two CPU processes (gloo) with fixed generations update like one process
with twice the batch, and real sampling runs under DeepSpeed ZeRO-3 (the student's parameters gathered for
generation)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from .test_distributed import _free_port, _run
from .test_engines import _cpu_config

SCRIPT = os.path.join(os.path.dirname(__file__), "on_policy_step.py")
ROOT = os.path.dirname(os.path.dirname(SCRIPT))
LAUNCHER = os.path.join(os.path.dirname(sys.executable), "accelerate")
HAS_LAUNCHER = shutil.which("accelerate", path=os.path.dirname(sys.executable)) is not None


@pytest.mark.skipif(not HAS_LAUNCHER, reason="accelerate's launcher is not installed next to this Python")
def test_two_processes_completing_their_own_prompts_update_like_one(tmp_path):
    single, double = tmp_path / "single", tmp_path / "double"
    single.mkdir(), double.mkdir()
    _run([sys.executable, SCRIPT, "4", str(single), "fixed"], ROOT)
    _run([LAUNCHER, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
          "--dynamo_backend", "no", "--main_process_port", str(_free_port()), SCRIPT, "2", str(double), "fixed"], ROOT)
    big = torch.load(single / "update_0.pt")
    rank0, rank1 = torch.load(double / "update_0.pt"), torch.load(double / "update_1.pt")
    assert torch.equal(rank0, rank1) and big.norm() > 0
    assert float((big - rank0).norm() / big.norm()) < 1e-5


@pytest.mark.skipif(not HAS_LAUNCHER or importlib.util.find_spec("deepspeed") is None,
                    reason="needs accelerate's launcher and deepspeed")
def test_sampling_runs_under_deepspeed_zero3_with_gathered_parameters(tmp_path):
    config = _cpu_config("deepspeed-zero3", tmp_path)
    result = subprocess.run(
        [LAUNCHER, "launch", "--config_file", config, "--num_processes", "2", "--main_process_port", str(_free_port()),
         SCRIPT, "2", str(tmp_path), "sample"], capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "sample.json").read_text())
    assert report["distributed_type"] == "DEEPSPEED" and report["processes"] == 2
    assert report["losses_finite"] and all(tokens > 0 for tokens in report["generated_tokens"])
