"""Draws docs/architecture.png, the flow of one training batch (run: python docs/architecture_picture.py)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

BOXES = {  # name: (x, y, width, height, title, body, colour)
    "cli": (0.2, 8.6, 4.4, 1.1, "cli/  (hf-distill COMMAND)", "arguments · jobs · models · report\nbuilds config, models, data, trainer", "#e8e0f5"),
    "data": (5.2, 8.6, 4.2, 1.1, "data/  (public)", "load, split, tokenise, label mapping,\nchat rows, generations, teacher cache", "#e3f0e3"),
    "config": (10.0, 8.6, 4.6, 1.1, "config.py  DistillationConfig", "every field; checks iterate the\nsignal registry", "#f5efe0"),
    "trainer": (0.2, 6.5, 14.4, 1.3, "trainer.py  DistillationTrainer (HF hooks only)",
                "__init__ wiring · get_batch_samples · compute_loss · optimizer groups · _get_grad_norm (NonFiniteGuard)\n"
                "_save / checkpoints (signals/modules.py) · log (TermLog) · prediction_step / evaluation_loop (EvalTotals)",
                "#dde8f5"),
    "prepare": (0.2, 4.2, 3.3, 1.4, "1  source.prepare_batch", "teachers/: may rewrite the\nsequences (samples, generations)", "#fbe3d6"),
    "count": (3.9, 4.2, 3.3, 1.4, "2  accounting.count_step", "loss/accounting.py: what counts\nin the whole step (gathered)", "#fff3c4"),
    "batch": (7.6, 4.2, 7.0, 1.4, "3  BatchPath.terms  (loss/batch.py: the one path)",
              "measure → student forward → teacher source outputs →\noutput strategy → every other signal → BatchTerms\nloss = Σ_k w_k · S_k / N_k → the Trainer's backward and step", "#dde8f5"),
    "strategy": (7.6, 1.9, 3.3, 1.6, "output strategy", "loss/outputs.py: FullLogits or\nHeadChunks (kernels/), chosen\nonce; = loss/reference.py", "#e3f0e3"),
    "signals": (11.3, 1.9, 3.3, 1.6, "signals/  (registry)", "one class per signal, declares its\nweight field, options, needs;\nthe output term: OutputSignal", "#f5efe0"),
    "sources": (0.2, 1.9, 7.0, 1.6, "teachers/  TeacherSource", "LiveTeachers (one, ensemble) · RouteTeachers (RCO) · SelfDistillation\n"
                "(PEFT, adapters off) · CachedTeacher (top-k cache) · NoTeacher\nwrapping one: SampledCompletions · "
                "CrossTokenizerTeacher\nyour own: DistillationTrainer(teacher_source=...)", "#fbe3d6"),
}
ARROWS = [("cli", "trainer"), ("data", "trainer"), ("config", "trainer"), ("trainer", "prepare"), ("prepare", "count"),
          ("count", "batch"), ("batch", "strategy"), ("batch", "signals"), ("batch", "sources"), ("prepare", "sources")]


def centre(name: str, side: str) -> tuple[float, float]:
    x, y, w, h, *_ = BOXES[name]
    return {"top": (x + w / 2, y + h), "bottom": (x + w / 2, y), "left": (x, y + h / 2), "right": (x + w, y + h / 2)}[side]


def main() -> None:
    fig, ax = plt.subplots(figsize=(12, 8.2))
    ax.set_xlim(0, 14.8)
    ax.set_ylim(1.6, 10.2)
    ax.axis("off")
    for x, y, w, h, title, body, colour in BOXES.values():
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.04", fc=colour, ec="#445"))
        ax.text(x + 0.12, y + h - 0.12, title, va="top", ha="left", fontsize=9.5, weight="bold")
        ax.text(x + 0.12, y + h - 0.5, body, va="top", ha="left", fontsize=8.2)
    for a, b in ARROWS:
        ya, yb = BOXES[a][1], BOXES[b][1]
        start, end = (centre(a, "bottom"), centre(b, "top")) if ya > yb else (centre(a, "right"), centre(b, "left"))
        ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=12, color="#334", lw=1.1))
    ax.text(0.2, 10.05, "hf_distill: how one training batch flows (numbers: the order per optimizer step)",
            fontsize=12, weight="bold", va="top")
    fig.savefig(Path(__file__).with_name("architecture.png"), dpi=110, bbox_inches="tight")


if __name__ == "__main__":
    main()
