"""Fine-tune a teacher on the task first, with the plain Trainer (also `hf-distill train-teacher`).

    python scripts/train_teacher.py --teacher asset:minilm-l6 --dataset asset:rotten-tomatoes \
        --task sequence-classification --output_dir runs/teacher --num_train_epochs 1

Takes the same --config / data / model flags as scripts/distill.py, and every TrainingArguments field.
"""

from hf_distill.cli import clear_errors
from hf_distill.cli.jobs import train_teacher_main

if __name__ == "__main__":
    with clear_errors("hf-distill train-teacher"):
        train_teacher_main()
