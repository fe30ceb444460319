"""Data parallelism is exact: two processes (gloo, CPU) with batch 2 update like one process with batch 4, student and
projections alike, although the processes count different numbers of tokens."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

SCRIPT = os.path.join(os.path.dirname(__file__), "distributed_step.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(command, cwd):
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.skipif(shutil.which("accelerate", path=os.path.dirname(sys.executable)) is None,
                    reason="accelerate's launcher is not installed next to this Python")
def test_two_processes_update_like_one_big_batch(tmp_path):
    root = os.path.dirname(os.path.dirname(SCRIPT))
    single, double = tmp_path / "single", tmp_path / "double"
    single.mkdir(), double.mkdir()
    _run([sys.executable, SCRIPT, "4", str(single)], root)
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    _run([launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
          "--dynamo_backend", "no", "--main_process_port", str(_free_port()), SCRIPT, "2", str(double)], root)
    big = torch.load(single / "update_0.pt")
    rank0, rank1 = torch.load(double / "update_0.pt"), torch.load(double / "update_1.pt")
    assert torch.equal(rank0, rank1)  # the processes stay in sync, projections included
    assert big.norm() > 0
    assert float((big - rank0).norm() / big.norm()) < 1e-4
