"""One on-policy distillation run (lmbda=1) of a tiny Llama pair on chat prompts, under whatever `accelerate launch`
set up; run by test_on_policy_processes.py.

- ``fixed``: the "generations" are a fixed function of each prompt (sampled ones depend on the process layout), one
  SGD step; each process saves its parameter update to OUTPUT_DIR/update_<rank>.pt. One process with batch 4 and two
  with batch 2 must update alike.
- ``sample``: real sampling for 2 steps (under DeepSpeed ZeRO-3 the student's partitioned parameters are gathered for
  generation); the main process writes OUTPUT_DIR/sample.json (engine, processes, losses, generated tokens).

Usage: python on_policy_step.py BATCH_SIZE OUTPUT_DIR fixed|sample
"""

from __future__ import annotations

import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_distill import DistillationConfig, DistillationTrainer  # noqa: E402
from hf_distill.data.chat import prepare_chat_dataset  # noqa: E402
from tests.conftest import leave, tiny_llama  # noqa: E402
from tests.test_chat_data import CHATML, chat_tokenizer  # noqa: E402
from tests.test_on_policy import VOCAB, chat_rows, fixed_completions  # noqa: E402


def main() -> None:
    batch_size, out, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    tokenizer = chat_tokenizer(CHATML, "<|im_end|>")
    rows, collator = prepare_chat_dataset(chat_rows(8), tokenizer)
    student, teacher = tiny_llama(vocab=VOCAB, layers=1, seed=2), tiny_llama(vocab=VOCAB, seed=1)
    args = DistillationConfig(
        output_dir=os.path.join(out, "run"), report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
        per_device_train_batch_size=batch_size, max_steps=1 if mode == "fixed" else 2, optim="sgd", learning_rate=1.0,
        lr_scheduler_type="constant", max_grad_norm=1.0, weight_decay=0.0, train_sampling_strategy="sequential",
        logging_steps=1, lmbda=1.0, max_new_tokens=6, logits_loss="jsd", jsd_beta=0.5, temperature=1.0,
        task_weight=0.5, logits_weight=1.0,
    )
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=rows,
                                  data_collator=collator, processing_class=tokenizer)
    if mode == "fixed":
        trainer.teacher_source.generate_fn = fixed_completions({})
        before = [p.detach().clone() for p in student.parameters()]
        trainer.train()
        update = torch.cat([(p.detach() - b).flatten() for p, b in zip(student.parameters(), before)])
        torch.save(update, os.path.join(out, f"update_{trainer.args.process_index}.pt"))
    else:
        trainer.train()
        logs = [log for log in trainer.state.log_history if "loss" in log]
        if trainer.accelerator.is_main_process:
            with open(os.path.join(out, "sample.json"), "w") as f:
                json.dump({"distributed_type": trainer.accelerator.distributed_type.value,
                           "processes": trainer.accelerator.num_processes,
                           "losses_finite": bool(logs) and all(math.isfinite(log["loss"]) for log in logs),
                           "generated_tokens": [log["generated_tokens"] for log in logs]}, f)
    trainer.accelerator.wait_for_everyone()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
    leave()
