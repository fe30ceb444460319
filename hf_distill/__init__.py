"""hf_distill: knowledge distillation for Hugging Face Transformers.

>>> from hf_distill import DistillationConfig, DistillationTrainer
>>> args = DistillationConfig(output_dir="out", temperature=2.0, task_weight=0.5, logits_weight=0.5)
>>> student = shrink_model(teacher, num_layers=6, strategy="distilbert")  # doctest: +SKIP
>>> trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=train)  # doctest: +SKIP

Extension points: `register_signal` (a `Signal` of your own), `TeacherSource` (a teacher of your own); see
docs/architecture.md.
"""

from .config import DistillationConfig
from .signals import LOGITS_LOSSES, Signal, logits_divergence, register_signal
from .students import shrink_model
from .teachers import TeacherSource
from .trainer import DistillationTrainer

__version__ = "0.1.0"

__all__ = [
    "LOGITS_LOSSES",
    "DistillationConfig",
    "DistillationTrainer",
    "Signal",
    "TeacherSource",
    "logits_divergence",
    "register_signal",
    "shrink_model",
    "__version__",
]
