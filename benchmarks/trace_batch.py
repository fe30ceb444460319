"""Which files and functions of the package one causal-LM training micro-batch goes through, from
`DistillationTrainer.compute_loss` to the summed loss (the default chunked output path, a live teacher, task + KL).

    python benchmarks/trace_batch.py            # the table: file, functions entered, calls

A tiny Llama pair built from a config (offline, a second); the count is what a reader follows to understand a step.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections import defaultdict

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import hf_distill
from hf_distill import DistillationConfig, DistillationTrainer

PACKAGE = os.path.dirname(hf_distill.__file__)


def tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logits_chunk_size", default="auto", help="'auto' (the default chunked path) or 0 (full)")
    opts = parser.parse_args()
    import datasets

    ids = torch.randint(1, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    data = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(),
                                       "labels": ids.tolist()})
    with tempfile.TemporaryDirectory() as out:
        args = DistillationConfig(output_dir=out, report_to=[], use_cpu=True, save_strategy="no", max_steps=1,
                                  per_device_train_batch_size=4, disable_tqdm=True, task_weight=0.5,
                                  logits_weight=0.5, temperature=2.0, logits_chunk_size=opts.logits_chunk_size)
        trainer = DistillationTrainer(model=tiny_llama(1), teacher_model=tiny_llama(0), args=args, train_dataset=data)
        batch = next(iter(trainer.get_train_dataloader()))
        model = trainer.model.train()
        trainer.compute_loss(model, batch)  # (a first call compiles what the speed defaults compile)
        calls: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))

        def profile(frame, event, arg):
            if event == "call" and frame.f_code.co_filename.startswith(PACKAGE):
                name = os.path.relpath(frame.f_code.co_filename, os.path.dirname(PACKAGE))
                calls[name][frame.f_code.co_qualname] += 1

        sys.setprofile(profile)
        try:
            trainer.compute_loss(model, batch)
        finally:
            sys.setprofile(None)
    print("| file | functions entered | calls |\n|---|---|---:|")
    for name, functions in sorted(calls.items(), key=lambda item: -sum(item[1].values())):
        print(f"| {name} | {', '.join(sorted(functions))} | {sum(functions.values())} |")
    print(f"\n{len(calls)} files, {sum(len(f) for f in calls.values())} functions, "
          f"{sum(sum(f.values()) for f in calls.values())} calls (path: {trainer.output_strategy.__class__.__name__})")


if __name__ == "__main__":
    main()
