"""Model cards for distilled students: written beside every saved student as README.md and pushed with it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Tags every distilled student carries on the Hub.
CARD_TAGS: tuple[str, ...] = ("distillation", "hf-distill")


@dataclass
class CardInfo:
    """What a student's model card says."""

    teacher: str
    student_source: str | None = None
    kept_layers: list[int] | None = None
    teacher_layers: int | None = None
    student_layers: int | None = None
    task: str | None = None
    dataset: str | None = None
    loss_weights: dict[str, float] = field(default_factory=dict)
    temperature: float | None = None
    logits_loss: str | None = None
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)  # metric -> {"teacher": v, "student": v}
    parameters: dict[str, int] = field(default_factory=dict)  # "teacher"/"student" -> count
    license: str | None = None
    labels: str | None = None  #: how the data's labels map to class ids, e.g. "'neg' -> 0, 'pos' -> 1"
    labels_note: str | None = None  #: why that mapping is an assumption (a teacher without label names)
    resumed_with: str | None = None  #: a resume with other settings: the checkpoint and each change
    method: str | None = None  #: how the targets were made (`describe_method`)
    training: dict[str, Any] = field(default_factory=dict)  #: steps, learning rate, batch, precision...
    versions: dict[str, str] = field(default_factory=dict)  #: library versions (`library_versions`)
    model_id: str | None = None  #: where users load the student from: its Hub id or folder
    chat: bool = False  #: a chat model: the usage example passes messages
    collapse: list[str] = field(default_factory=list)  #: where the run flagged the student's samples as degenerate


def describe_method(args: Any, cache_top_k: int | None = None, teacher_tokenizer: str | None = None) -> str:
    """How the soft targets were made, in words: off-policy (the dataset's completions, a top-k teacher cache),
    on-policy (`lmbda`, sampled tokens, temperature), sequence-level KD (`seq_kd`), across tokenizers; and the loss."""
    if args.lmbda > 0:
        share = "every" if args.lmbda >= 1 else f"a share {args.lmbda:g} of the"
        parts = [f"on-policy (lmbda={args.lmbda:g}: the student samples {share} completion, at most "
                 f"{args.max_new_tokens} new tokens at temperature {args.generation_temperature:g}; the teacher scores "
                 "them)"]
        if args.seq_kd and args.lmbda < 1:
            parts.append("the other completions sampled by the teacher (seq_kd)")
    elif args.seq_kd:
        parts = [f"sequence-level KD on the fly (seq_kd: the teacher samples every completion, at most "
                 f"{args.max_new_tokens} new tokens)"]
    else:
        parts = ["off-policy (the dataset's completions)"]
    if cache_top_k:
        parts.append(f"the teacher's top-{cache_top_k} log-probabilities from an offline cache (the tail's mass kept)")
    if teacher_tokenizer:
        parts.append(f"across tokenizers (the teacher's `{teacher_tokenizer}`; `{args.logits_loss}` on aligned spans)")
    elif getattr(args, "logits_weight", 0):
        parts.append(f"`{args.logits_loss}` at temperature {args.temperature:g}")
    return "; ".join(parts)


def training_record(args: Any, steps: int, processes: int = 1) -> dict[str, Any]:
    """What a reader needs to reproduce the training: optimizer steps, learning rate and schedule, the batch (per
    device x accumulation x processes), precision, seed."""
    per_device, accumulation = args.per_device_train_batch_size, args.gradient_accumulation_steps
    precision = "bf16 mixed" if args.bf16 else "fp16 mixed" if args.fp16 else "fp32"
    if getattr(args, "teacher_dtype", None):
        precision += f", teacher in {args.teacher_dtype}"
    scheduler, optimizer = (getattr(v, "value", v) for v in (args.lr_scheduler_type, args.optim))
    return {"optimizer steps": steps, "learning rate": f"{args.learning_rate:g} ({scheduler} schedule, {optimizer})",
            "batch": f"{per_device * accumulation * processes} sequences per step ({per_device} per device x "
                     f"{accumulation} accumulated x {processes} process{'es' if processes > 1 else ''})",
            "precision": precision, "seed": args.seed}


def library_versions(peft: bool = False) -> dict[str, str]:
    """The versions of the libraries that trained the student."""
    from importlib.metadata import PackageNotFoundError, version

    names = ["hf-distill", "transformers", "torch", "datasets", "accelerate"] + (["peft"] if peft else [])
    found = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def on_hub(name: str | None) -> bool:
    """Whether `name` reads as a Hub id (owner/name or name), not a local path or a packaged asset."""
    return bool(name) and not (name.startswith(("asset:", "/", ".", "~")) or Path(name).exists()
                               or Path(name).suffix in (".json", ".jsonl", ".csv", ".parquet", ".txt"))


def _yaml_list(values: list[str]) -> str:
    return "".join(f"\n- {v}" for v in values)


def model_card(info: CardInfo) -> str:
    """The README.md of a distilled student: Hub metadata (base_model, tags, datasets, pipeline tag) and a body with
    the teacher, kept layers, loss weights and temperature, data and metrics against the teacher."""
    pipeline_tag = {
        "sequence-classification": "text-classification", "regression": "text-classification",
        "causal-lm": "text-generation", "masked-lm": "fill-mask",
    }.get(info.task or "")
    # base_model and datasets link Hub pages: only for Hub ids (not local folders, files or packaged assets)
    metadata = ([f"base_model: {info.teacher}"] if on_hub(info.teacher) else []) + [
        "library_name: transformers", f"tags:{_yaml_list(list(CARD_TAGS))}"]
    if on_hub(info.dataset):
        metadata.append(f"datasets:{_yaml_list([info.dataset])}")
    if pipeline_tag:
        metadata.append(f"pipeline_tag: {pipeline_tag}")
    if info.license:
        metadata.append(f"license: {info.license}")
    header = "---\n" + "\n".join(metadata) + "\n---\n"

    lines = [f"# Student distilled from `{info.teacher}`", ""]
    if info.collapse:
        lines += ["**Warning: the run flagged this student's samples as degenerate** (`hf_distill.data.samples`; "
                  "read them in the run's `_report/report.md` before using it):", "",
                  *[f"- {c}" for c in info.collapse], ""]
    lines.append(
        "Trained with hf_distill's `DistillationTrainer`: the student learns from the teacher's "
        "outputs (and, where listed, its hidden states or gradients) as well as from the labels."
    )
    lines += ["", "## Distillation", "", *_distillation_lines(info)]
    if info.training:
        lines += ["", "## Training", ""] + [f"- {k}: {v}" for k, v in info.training.items()]
    if info.versions:
        lines.append("- libraries: " + ", ".join(f"{k} {v}" for k, v in info.versions.items()))
    if info.metrics:
        lines += ["", "## Evaluation", "", "| metric | teacher | student |", "|---|---|---|"]
        for name, values in info.metrics.items():
            lines.append(f"| {name} | {_fmt(values.get('teacher'))} | {_fmt(values.get('student'))} |")
    where = info.model_id or "path/or/hub-id"
    lines += ["", "## Use", "", "```python", "from transformers import pipeline", "",
              f'pipe = pipeline("{pipeline_tag or "text-classification"}", model="{where}")']
    if info.chat:
        lines += ['messages = [{"role": "user", "content": "What is distillation?"}]',
                  'print(pipe(messages, max_new_tokens=64)[0]["generated_text"][-1]["content"])']
    elif pipeline_tag == "text-generation":
        lines.append('print(pipe("Distillation is", max_new_tokens=32)[0]["generated_text"])')
    lines += ["```", ""]
    return header + "\n" + "\n".join(lines)


def _distillation_lines(info: CardInfo) -> list[str]:
    """The card's "Distillation" list: teacher, student, task, data, labels, loss, method, resume, parameters."""
    lines = [f"- teacher: `{info.teacher}`" + (f" ({info.teacher_layers} layers)" if info.teacher_layers else "")]
    if info.kept_layers is not None:
        plural = "s" if len(info.kept_layers) != 1 else ""
        lines.append(f"- student: {len(info.kept_layers)} layer{plural} cut from the teacher, keeping teacher layers "
                     f"{info.kept_layers} (`config.distilled_from_layers`)")
    elif info.student_source:
        lines.append(f"- student: initialised from `{info.student_source}`"
                     + (f" ({info.student_layers} layers)" if info.student_layers else ""))
    if info.task:
        lines.append(f"- task: {info.task}")
    if info.dataset:
        lines.append(f"- data: `{info.dataset}`")
    if info.labels:
        lines.append(f"- labels: {info.labels}" + (f" (assumed: {info.labels_note})" if info.labels_note else ""))
    active = {k: v for k, v in info.loss_weights.items() if v}
    if active:
        terms = " + ".join(f"{v:g} * {k.removesuffix('_weight')}" for k, v in active.items())
        lines.append(f"- loss: `{terms}`")
    if info.method:
        lines.append(f"- method: {info.method}")
    elif info.temperature is not None and info.loss_weights.get("logits_weight"):
        lines.append(f"- soft targets: `{info.logits_loss}` at temperature {info.temperature:g}")
    if info.resumed_with:
        lines.append(f"- resumed from {info.resumed_with} (the steps before it trained with the checkpoint's "
                     "settings)")
    if info.parameters:
        lines.append("- parameters: " + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in info.parameters.items()))
    return lines


#: Where `hf-distill evaluate` writes its section of a card (replaced on the next evaluation, nothing else touched).
EVALUATION_START, EVALUATION_END = "<!-- hf-distill evaluate: start -->", "<!-- hf-distill evaluate: end -->"


def model_index_yaml(name: str, entries: list[dict[str, Any]]) -> str:
    """The Hub's ``model-index`` metadata for `entries` (each: ``dataset``, optional ``name`` and ``type``, and
    ``metrics`` {metric: value})."""
    lines = ["model-index:", f"- name: {name}", "  results:"]
    for entry in entries:
        lines += ["  - task:", "      type: text-generation", "    dataset:",
                  f"      name: {entry.get('name', entry['dataset'])}", f"      type: {entry.get('type', entry['dataset'])}",
                  "    metrics:"]
        for metric, value in entry["metrics"].items():
            lines += [f"    - type: {metric}", f"      value: {value:.6g}", f"      name: {metric}"]
    return "\n".join(lines)


def update_card_evaluation(folder: str, entries: list[dict[str, Any]]) -> str:
    """Put `entries` into ``folder/README.md``: the front matter's ``model-index`` (replaced) and a section between
    `EVALUATION_START` and `EVALUATION_END` (replaced); every other line stays as it was. Returns the new text."""
    path = Path(folder) / "README.md"
    text = path.read_text() if path.exists() else ""
    front, body = "", text
    if text.startswith("---\n") and "\n---\n" in text[4:]:
        end = text.index("\n---\n", 4)
        front, body = text[4:end], text[end + 5:]
    kept, skipping = [], False
    for line in front.splitlines():
        if line.startswith("model-index:"):
            skipping = True
            continue
        if skipping and (line.startswith(" ") or line.startswith("-")):
            continue
        skipping = False
        kept.append(line)
    name = Path(folder).resolve().name
    front = "\n".join([*kept, model_index_yaml(name, entries)]) if entries else "\n".join(kept)
    if EVALUATION_START in body and EVALUATION_END in body:
        before, rest = body.split(EVALUATION_START, 1)
        body = before.rstrip("\n") + "\n" + rest.split(EVALUATION_END, 1)[1].lstrip("\n")
    section = [EVALUATION_START, "## Evaluation (`hf-distill evaluate`)", ""]
    for entry in entries:
        section += [f"- {entry.get('name', entry['dataset'])}: " + ", ".join(
            f"{metric} {value:.4g}" for metric, value in entry["metrics"].items())]
    section.append(EVALUATION_END)
    new = f"---\n{front}\n---\n" + body.rstrip("\n") + "\n\n" + "\n".join(section) + "\n"
    path.write_text(new)
    return new


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def write_model_card(folder: str, info: CardInfo) -> str:
    """Write the card as ``folder/README.md``; returns its text."""
    import os

    text = model_card(info)
    with open(os.path.join(folder, "README.md"), "w") as handle:
        handle.write(text)
    return text


class hub_errors:
    """Context manager around the Hub calls of a run (`pushing=False`: creating the repo when the Trainer starts;
    `True`: the final upload): a failure becomes one `ValueError` that says what to check and, for the upload, that
    the run's files are all on disk."""

    def __init__(self, args: Any, pushing: bool = False) -> None:
        self.args, self.pushing = args, pushing

    def __enter__(self) -> "hub_errors":
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        if error is None or not getattr(self.args, "push_to_hub", False) or not _is_hub_error(error):
            return False
        repo = getattr(self.args, "hub_model_id", None) or Path(self.args.output_dir).absolute().name
        reason = " ".join(str(error).split())[:300] or type(error).__name__
        check = ("Check the network, your token (HF_TOKEN, `hf auth login` or --hub_token), --hub_model_id and "
                 "that HF_HUB_OFFLINE is not set")
        if self.pushing:
            raise ValueError(
                f"--push_to_hub: uploading to {repo!r} failed ({reason}). Everything is on disk in "
                f"{self.args.output_dir} (student, tokenizer, model card, _report/): push it later with `hf upload "
                f"{repo} {self.args.output_dir}`. {check}."
            ) from error
        raise ValueError(f"--push_to_hub: cannot create the Hub repo {repo!r} ({reason}). {check}; or drop "
                         "--push_to_hub. Nothing was trained.") from error


def _is_hub_error(error: BaseException) -> bool:
    """Whether `error` came from talking to the Hub (network, auth, offline mode), not from our code."""
    module = type(error).__module__ or ""
    return (module.startswith(("huggingface_hub", "requests", "httpx", "urllib3", "httpcore"))
            or isinstance(error, (ConnectionError, TimeoutError)))
