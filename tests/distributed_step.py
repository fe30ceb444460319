"""One SGD step of a causal-LM distillation with logits + hidden (projected) signals; run by test_distributed.py both
as one process with batch 4 and, under `accelerate launch --multi_gpu --num_processes 2`, as two processes with batch 2.

Usage: python distributed_step.py BATCH_SIZE OUTPUT_DIR
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_distill import DistillationConfig, DistillationTrainer  # noqa: E402
from tests.conftest import leave, lm_dataset, tiny_llama  # noqa: E402


def main() -> None:
    batch_size, out = int(sys.argv[1]), sys.argv[2]
    teacher, student = tiny_llama(seed=1, hidden=32, layers=2), tiny_llama(layers=1, hidden=16, seed=2)
    args = DistillationConfig(
        output_dir=os.path.join(out, "run"), report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
        per_device_train_batch_size=batch_size, max_steps=1, optim="sgd", learning_rate=1.0,
        lr_scheduler_type="constant", max_grad_norm=1.0, weight_decay=0.0, train_sampling_strategy="sequential",
        logging_steps=1, temperature=2.0, hidden_weight=1.0, hidden_loss="mse",
    )
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=lm_dataset(n=4))
    params = [*student.parameters(), *trainer.signal_modules.parameters()]
    before = [p.detach().clone() for p in params]
    trainer.train()
    update = torch.cat([(p.detach() - b).flatten() for p, b in zip(params, before)])
    torch.save(update, os.path.join(out, f"update_{trainer.args.process_index}.pt"))
    # Leave the process group before exiting: a process that exits with it open can abort in its communication
    # threads at interpreter exit ("terminate called without an active exception", exit code -6).
    trainer.accelerator.wait_for_everyone()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
    leave()
