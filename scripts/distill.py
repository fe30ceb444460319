"""Distil a teacher into a student from the command line (also `hf-distill distill`).

    accelerate launch scripts/distill.py --teacher bert-base-uncased --student_layers 6 \
        --dataset imdb --task sequence-classification --output_dir runs/bert6
    python scripts/distill.py --config configs/quickstart.yaml --num_train_epochs 1

Every DistillationConfig / TrainingArguments field is a flag (see --help); `--config FILE.yaml` sets defaults that
flags override. Ends with a teacher-vs-student table; saves the student, its tokenizer, a model card (README.md) and a
report (`<output_dir>/_report/report.md` + report.png).
"""

from hf_distill.cli import clear_errors
from hf_distill.cli.jobs import distill_main

if __name__ == "__main__":
    with clear_errors("hf-distill distill"):
        distill_main()
