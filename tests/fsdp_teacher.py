"""FSDP2 over gloo on CPU (run by test_engines.py with torchrun, 2 processes): a teacher sharded with
`fully_shard_teacher` holds 1/world of its block parameters per process, computes the same logits, and gives the same
distillation loss (plain and chunked paths) as the unsharded teacher.

Usage: torchrun --nproc_per_node 2 fsdp_teacher.py OUTPUT_DIR
"""

from __future__ import annotations

import copy
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_distill import DistillationConfig, DistillationTrainer  # noqa: E402
from hf_distill.engines import fully_shard_teacher  # noqa: E402
from tests.conftest import leave, lm_dataset, tiny_llama  # noqa: E402


def main() -> None:
    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    teacher, student = tiny_llama(seed=1), tiny_llama(layers=1, seed=2)
    teacher.eval().requires_grad_(False)
    sharded = fully_shard_teacher(copy.deepcopy(teacher))
    data = lm_dataset(n=4, seed=3 + rank)
    batch = {k: torch.tensor(data[k]) for k in data.column_names}
    with torch.no_grad():
        same_logits = torch.equal(sharded(input_ids=batch["input_ids"]).logits, teacher(input_ids=batch["input_ids"]).logits)
    local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in sharded.model.layers.parameters())
    full = sum(p.numel() for p in teacher.model.layers.parameters())
    losses = {}
    for chunk in (0, 4):
        args = DistillationConfig(output_dir=os.path.join(out, "run"), report_to=[], use_cpu=True, save_strategy="no",
                                  temperature=2.0, logits_chunk_size=chunk)
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args)
        plain_teacher = trainer.compute_loss(student, dict(batch)).item()
        trainer.teacher_source.models[:] = [sharded]
        losses[chunk] = (plain_teacher, trainer.compute_loss(student, dict(batch)).item())
    grads = [p.grad for p in sharded.parameters() if p.grad is not None]
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"same_logits": same_logits, "local_block_params": local, "full_block_params": full,
                   "losses": losses, "teacher_grads": len(grads)}, f)
    dist.barrier()  # (no rank leaves while another still talks to it)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    leave()
