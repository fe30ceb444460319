"""One tiny distillation under whatever engine `accelerate launch` set up (DDP, FSDP2, DeepSpeed ZeRO-2/3): run by
`benchmarks/gpu_check.sh` once per engine. Teacher and student are tiny Llamas of different widths, so the run has the
task, logits and hidden-state terms with a learned projection.

Checks, written to OUTPUT_DIR/<engine>.json by the main process (and printed):
- training runs, every logged loss is finite;
- the teacher is never optimised: none of its parameters is in the optimizer, and its weights are unchanged;
- the projection trains with the student (it is in the optimizer and moved);
- the saved student reloads with `AutoModelForCausalLM.from_pretrained` and runs, and holds the student's weights only
  (no projection);
- only the main process wrote the output folder's files (one model card, one weights file).

Usage: accelerate launch --config_file configs/accelerate/fsdp2.yaml benchmarks/engine_check.py OUTPUT_DIR ENGINE
"""

from __future__ import annotations

import json
import math
import os
import sys

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_distill import DistillationConfig, DistillationTrainer  # noqa: E402
from hf_distill.storage.hub import CardInfo  # noqa: E402
from tests.conftest import lm_dataset  # noqa: E402


def llama(hidden: int, layers: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=2 * hidden, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def local_checksum(module: torch.nn.Module) -> float:
    total = 0.0
    for p in module.parameters():
        # this process's part: an FSDP2 DTensor's local shard, a ZeRO-3 parameter's partition (its `data` is empty
        # or gathered depending on when it is read), else the whole tensor
        p = p.to_local() if hasattr(p, "to_local") else getattr(p, "ds_tensor", p)
        total += float(p.detach().float().abs().sum()) if p.numel() else 0.0
    return total


def main() -> None:
    out, engine = sys.argv[1], sys.argv[2]
    teacher, student = llama(64, 4, seed=1), llama(32, 2, seed=2)
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    args = DistillationConfig(
        output_dir=os.path.join(out, engine), report_to=[], use_cpu=not torch.cuda.is_available(), save_strategy="no", eval_strategy="no", max_steps=4,
        per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1, disable_tqdm=True, bf16=bf16,
        temperature=2.0, task_weight=0.5, logits_weight=0.5, hidden_weight=1.0, hidden_loss="mse", layer_map="last",
    )
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=lm_dataset(n=32))
    trainer.card_info = CardInfo(teacher="tiny-llama-teacher", task="causal-lm")
    teacher_sum = local_checksum(trainer.teacher_model)
    projection_before = [p.detach().clone() for p in trainer.signal_modules.parameters()]
    trainer.train()

    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    # DeepSpeed's ZeRO optimizers hold flat partitions in param_groups, the model's parameters in their 16-bit groups
    groups = getattr(optimizer, "bit16_groups", None) or getattr(optimizer, "fp16_groups", None)
    groups = groups if groups is not None else [group["params"] for group in optimizer.param_groups]
    optimised = {id(p) for group in groups for p in group}
    teacher_ids = {id(p) for p in trainer.teacher_model.parameters()}
    projection_ids = {id(p) for p in trainer.signal_modules.parameters()}
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    report = {
        "engine": engine,
        "distributed_type": trainer.accelerator.distributed_type.value,
        "processes": trainer.accelerator.num_processes,
        "chunked_logits": trainer.logits_chunk_size,
        "losses_finite": bool(losses) and all(math.isfinite(x) for x in losses),
        "losses": losses,
        "teacher_params_in_optimizer": len(teacher_ids & optimised),
        "teacher_unchanged": abs(local_checksum(trainer.teacher_model) - teacher_sum) <= 1e-6 * max(teacher_sum, 1.0),
        "projection_in_optimizer": projection_ids <= optimised if projection_ids else None,
        "projection_moved": any(not torch.equal(b, p.detach()) for b, p in
                                zip(projection_before, trainer.signal_modules.parameters())),
    }
    trainer.save_model()
    trainer.accelerator.wait_for_everyone()
    if trainer.accelerator.is_main_process:
        folder = args.output_dir
        # a plain load, as a user would do it (not a ZeRO-3 partitioned init on this process alone)
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        reloaded = AutoModelForCausalLM.from_pretrained(folder)
        with torch.no_grad():
            logits = reloaded(input_ids=torch.tensor([[1, 2, 3, 4]])).logits
        report["reloaded"] = bool(torch.isfinite(logits).all())
        report["files"] = sorted(os.listdir(folder))
        from safetensors import safe_open

        with safe_open(os.path.join(folder, "model.safetensors"), "pt") as weights:
            saved = set(weights.keys())
        report["saved_keys_are_the_students"] = saved == set(reloaded.state_dict()) - {"lm_head.weight"} or saved == set(
            reloaded.state_dict())
        report["ok"] = bool(
            report["losses_finite"] and report["teacher_params_in_optimizer"] == 0 and report["teacher_unchanged"]
            and report["projection_in_optimizer"] in (True, None) and report["reloaded"]
            and report["saved_keys_are_the_students"]
        )
        with open(os.path.join(out, f"{engine}.json"), "w") as f:
            json.dump(report, f, indent=1)
        print(json.dumps(report))
    # Every process waits for the main one's checks, then leaves the process group: a process that exits with the
    # group still open can abort in its communication threads at interpreter exit ("terminate called ...").
    trainer.accelerator.wait_for_everyone()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
