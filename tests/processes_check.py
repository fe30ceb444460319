"""Run by test_nonfinite_and_precision.py under `accelerate launch --multi_gpu --num_processes 2` on CPU.

Usage: python processes_check.py MODE OUTPUT_DIR
  no_use_cpu     TrainingArguments without use_cpu: transformers keeps each process alone; the trainer must refuse.
  nan_on_rank_1  one real run over gloo whose teacher turns NaN on process 1 at step 2: both processes must stop.
"""

from __future__ import annotations

import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_distill import DistillationConfig, DistillationTrainer  # noqa: E402
from hf_distill.checks.safety import NonFiniteLossError  # noqa: E402
from tests.conftest import classification_dataset, tiny_bert  # noqa: E402


def say(text: str) -> None:
    """One line in one `write` (atomic on a pipe below 4 KiB): `print(a, b)` writes its pieces apart, and the two
    processes' lines interleave ("REFUSED:REFUSED: ...")."""
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), (text + "\n").encode())


def main() -> None:
    mode, out = sys.argv[1], sys.argv[2]
    args = DistillationConfig(
        output_dir=os.path.join(out, "run"), report_to=[], use_cpu=mode != "no_use_cpu", save_strategy="no",
        disable_tqdm=True, per_device_train_batch_size=2, max_steps=3, logging_steps=1,
    )
    teacher = tiny_bert()
    if mode == "nan_on_rank_1" and args.process_index == 1:
        original, calls = teacher.forward, {"n": 0}

        def forward(**kwargs):
            calls["n"] += 1
            outputs = original(**kwargs)
            if calls["n"] >= 2:
                outputs.logits = torch.full_like(outputs.logits, math.nan)
            return outputs

        teacher.forward = forward
    try:
        trainer = DistillationTrainer(model=tiny_bert(layers=1), teacher_model=teacher, args=args,
                                      train_dataset=classification_dataset())
    except ValueError as error:
        say(f"REFUSED: {error}")
        raise SystemExit(3)
    try:
        trainer.train()
    except NonFiniteLossError as error:
        say(f"STOPPED: {error}")
        raise SystemExit(4)
    say("FINISHED")


if __name__ == "__main__":
    main()
