"""The frozen teacher under Accelerate's engines: FSDP2 sharding over gloo on CPU (two processes), DeepSpeed's
inference config, DDP and DeepSpeed ZeRO-2/3 end to end on CPU (two processes over gloo). (FSDP through the Trainer
needs GPUs: Accelerate turns FSDP on only for GPU-class devices; on CPU the same launch gives DDP.
`benchmarks/gpu_check.sh` runs the engines end to end where a GPU is lent.)"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

from hf_distill.engines import deepspeed_inference_config

from .test_distributed import _free_port

SCRIPT = os.path.join(os.path.dirname(__file__), "fsdp_teacher.py")


@pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None,
                    reason="torchrun is not installed next to this Python")
def test_fsdp2_sharded_teacher_over_gloo_matches_the_whole_teacher(tmp_path):
    launcher = os.path.join(os.path.dirname(sys.executable), "torchrun")
    result = subprocess.run(
        [launcher, "--nproc_per_node", "2", "--master_port", str(_free_port()), SCRIPT, str(tmp_path)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report["same_logits"]
        assert report["local_block_params"] * 2 == report["full_block_params"]  # each process holds half
        for plain_teacher, sharded_teacher in report["losses"].values():
            assert sharded_teacher == pytest.approx(plain_teacher, rel=1e-6)
        assert report["teacher_grads"] == 0


def test_deepspeed_teacher_config_drops_training_blocks_and_keeps_zero3_partitioning():
    training = {
        "train_micro_batch_size_per_gpu": 2,
        "optimizer": {"type": "AdamW"}, "scheduler": {"type": "WarmupLR"},
        "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
    }
    stage2 = deepspeed_inference_config(training, hidden_size=64)
    assert "optimizer" not in stage2 and "scheduler" not in stage2
    assert stage2["zero_optimization"] == {"stage": 0}
    assert training["zero_optimization"]["stage"] == 2 and "optimizer" in training  # the student's config is untouched
    stage3 = deepspeed_inference_config({**training, "zero_optimization": {"stage": 3}}, hidden_size=64)
    assert stage3["zero_optimization"]["stage"] == 3
    assert stage3["zero_optimization"]["stage3_param_persistence_threshold"] == 640
    assert stage3["zero_optimization"]["reduce_bucket_size"] == 64 * 64


def _launch_engine_check(config: str, engine: str, out) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    result = subprocess.run(
        [launcher, "launch", "--config_file", config, "--num_processes", "2", "--main_process_port", str(_free_port()),
         os.path.join(root, "benchmarks", "engine_check.py"), str(out), engine],
        capture_output=True, text=True, timeout=300, cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((out / f"{engine}.json").read_text())


def _cpu_config(name: str, folder) -> str:
    """configs/accelerate/<name>.yaml with mixed precision off (no bf16 autocast on this CPU)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = open(os.path.join(root, "configs", "accelerate", f"{name}.yaml")).read()
    path = folder / f"{name}.yaml"
    path.write_text(text.replace("mixed_precision: bf16", 'mixed_precision: "no"'))
    return str(path)


_HAS_ACCELERATE = shutil.which("accelerate", path=os.path.dirname(sys.executable)) is not None


@pytest.mark.skipif(not _HAS_ACCELERATE, reason="accelerate's launcher is not installed next to this Python")
def test_ddp_cpu_recipe_launches_two_processes_and_the_engine_check_passes(tmp_path):
    """configs/accelerate/ddp-cpu.yaml + benchmarks/engine_check.py (the per-engine check of gpu_check.sh) on CPU."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    report = _launch_engine_check(os.path.join(root, "configs", "accelerate", "ddp-cpu.yaml"), "ddp-cpu", tmp_path)
    assert report["processes"] == 2 and report["distributed_type"] == "MULTI_CPU"
    assert report["ok"] and report["projection_moved"] and report["teacher_params_in_optimizer"] == 0
    assert {"model.safetensors", "README.md", "config.json"} <= set(report["files"])
    assert report["saved_keys_are_the_students"]


@pytest.mark.skipif(not _HAS_ACCELERATE or importlib.util.find_spec("deepspeed") is None,
                    reason="needs accelerate's launcher and deepspeed (pip install deepspeed)")
def test_deepspeed_zero2_and_zero3_on_cpu_train_projections_and_match_ddp(tmp_path):
    """DeepSpeed runs on CPU over gloo: the configs/accelerate ZeRO-2 and ZeRO-3 recipes (bf16 off) train the
    student and the hidden-state projection (attached to the student, so the engine optimises, reduces and clips it),
    never optimise the frozen teacher (an inference engine; partitioned under ZeRO-3), save a student without the
    projection, and log the same losses as the same run under DDP."""
    ddp = _launch_engine_check(_cpu_config("ddp-cpu", tmp_path), "ddp-cpu", tmp_path)
    for engine in ("deepspeed-zero2", "deepspeed-zero3"):
        report = _launch_engine_check(_cpu_config(engine, tmp_path), engine, tmp_path)
        assert report["distributed_type"] == "DEEPSPEED" and report["processes"] == 2, engine
        assert report["teacher_params_in_optimizer"] == 0 and report["teacher_unchanged"], engine
        assert report["projection_in_optimizer"] and report["projection_moved"], engine
        assert report["saved_keys_are_the_students"] and report["reloaded"] and report["ok"], engine
        assert report["losses"] == pytest.approx(ddp["losses"], rel=1e-4), engine
