"""Command-line arguments shared by scripts/: every `DistillationConfig` field is a flag, plus `--config FILE.yaml`
whose values the flags override. The console script `hf-distill` dispatches to the commands."""

from __future__ import annotations

import json
import sys
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

from transformers import HfArgumentParser

from ..config import DistillationConfig
from ..data.loading import TASKS, DataArguments
from ..students import SHRINK_STRATEGIES


@dataclass
class ModelArguments:
    """Which teacher, which student, which task."""

    teacher: str | None = field(
        default=None,
        metadata={"help": "Teacher: a Hub id, a local folder, or asset:NAME (hf_distill.data.assets). Required."},
    )
    teacher_gguf_file: str | None = field(
        default=None, metadata={"help": "GGUF file inside --teacher to load (dequantised to float32)."}
    )
    teacher_tokenizer: str | None = field(
        default=None,
        metadata={"help": "The teacher's tokenizer (default: the teacher's own). When --student's tokenizer has another "
                          "vocabulary, the data is tokenised for the student and each batch aligned to the teacher's "
                          "tokens (cross-tokenizer distillation; --logits_loss hybrid or uld)."},
    )
    student: str | None = field(
        default=None, metadata={"help": "Student: a Hub id or local folder (else --student_layers shrinks the teacher)."}
    )
    student_layers: str | None = field(
        default=None, metadata={"help": "Cut a student out of the teacher (shrink_model): a number of layers (e.g. 10, "
                                        "chosen by --shrink_strategy) or the teacher layers to keep (e.g. 0,3,7,29)."}
    )
    teacher_cache: str | None = field(
        default=None,
        metadata={"help": "Distil from this offline teacher cache (made by `hf-distill cache-teacher` with the same data "
                          "flags) instead of running the teacher every step; the teacher is still loaded to cut the "
                          "student and for the closing comparison, but never runs during training."},
    )
    shrink_strategy: str = field(
        default="auto", metadata={"help": "Which teacher layers a --student_layers N cut keeps: auto (causal LMs: "
                                          "distilbert's bottom and top layers where they fit, else uniform, as "
                                          "measured in docs/results.md section 8; other tasks: every_other), or one "
                                          "of the strategies.", "choices": ["auto", *SHRINK_STRATEGIES]}
    )
    task: str = field(
        default="sequence-classification", metadata={"help": "What the models do.", "choices": list(TASKS)}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow models whose code lives on the Hub (off by default)."}
    )
    use_peft: bool = field(
        default=False,
        metadata={"help": "Train LoRA adapters on the student. Without --student/--student_layers the student is the "
                          "teacher model itself and its adapter-free base is the teacher (self-distillation)."},
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scaling = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA path."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Module names to adapt (default: all linear layers but the head)."}
    )
    fast_defaults: bool = field(
        default=True,
        metadata={"help": "Apply the speed recommendation (docs/performance.md, section 8), logged at start: where this "
                          "device multiplies bf16 fast, the task is causal-lm and no --teacher_dtype is given, the "
                          "frozen teacher runs in bfloat16; on CPU, freed memory is kept for reuse. The student's precision is yours "
                          "(--bf16 true is recommended on such hardware). --fast_defaults false: neither."},
    )
    merge_adapters: bool = field(
        default=False, metadata={"help": "Also save the student with its adapters merged, as a plain model, in "
                                         "<output_dir>/merged."}
    )

    def student_cut(self) -> tuple[int | None, list[int] | None, str]:
        """`--student_layers` read: (number of layers, the explicit teacher layers or None, the strategy that picks
        them: `students.pick_layers`), e.g. ``(3, None, "every_other")``, ``(3, None, "auto")`` for a causal LM, or
        ``(3, [0, 3, 7], "explicit")``; (None, None, ...) without it."""
        strategy = self.shrink_strategy
        if strategy == "auto" and self.task != "causal-lm":
            strategy = "every_other"
        value = None if self.student_layers is None else str(self.student_layers).strip()
        if value is None:
            return None, None, strategy
        parts = [p.strip() for p in value.split(",")]
        if not all(p.lstrip("-").isdigit() for p in parts):
            raise ValueError(f"--student_layers takes a number of layers (e.g. 10) or the teacher layers to keep "
                             f"(e.g. 0,3,7,29), got {value!r}.")
        if len(parts) == 1:
            return int(parts[0]), None, strategy
        layers = [int(p) for p in parts]
        if any(b <= a for a, b in zip(layers, layers[1:])) or layers[0] < 0:
            raise ValueError(f"--student_layers {value}: the teacher layers to keep must be distinct, increasing and "
                             ">= 0 (e.g. 0,3,7,29).")
        return len(layers), layers, "explicit"


@dataclass
class CacheArguments:
    """Where the offline teacher cache goes and what it keeps (`hf-distill cache-teacher`)."""

    output_dir: str | None = field(
        default=None, metadata={"help": "Folder of the cache (created; a cache there with the same settings is "
                                        "resumed). Required."}
    )
    top_k: int = field(default=32, metadata={"help": "Teacher tokens kept per position (6k + 4 bytes each)."})
    temperature: float = field(
        default=1.0, metadata={"help": "The cache stores log softmax(z / temperature): distil at the same one."}
    )
    batch_size: int = field(default=8, metadata={"help": "Examples per teacher forward pass."})
    shard_size: int = field(default=1024, metadata={"help": "Examples per shard (the unit of resuming)."})
    seed: int = field(
        default=42, metadata={"help": "The --seed of the distillation run: it draws the held-out split, so the "
                                      "cached training rows are the ones distill trains on."}
    )
    device: str | None = field(default=None, metadata={"help": "Where the teacher runs (default: cuda if available)."})
    teacher_dtype: str | None = field(
        default=None, metadata={"help": "The teacher's weights while caching: float32, bfloat16 or float16 (default: "
                                        "bfloat16 where this device multiplies it fast and --fast_defaults is on, "
                                        "else the teacher's own)."}
    )


def _option_names(dataclass_types: Sequence[type]) -> dict[str, str]:
    """Every option's name (and alias, e.g. ``beta``) -> its declared type, as text (e.g. ``"bool"``,
    ``"IntervalStrategy | str"``), or ``"text"`` for a union-valued option that takes one word (`_text_unions`)."""
    unions = _text_union_defaults(dataclass_types)
    known = {}
    for f in (f for cls in dataclass_types for f in fields(cls) if f.init):
        kind = "text" if f.name in unions else getattr(f.type, "__name__", str(f.type))
        for name in (f.name, *(alias.lstrip("-") for alias in f.metadata.get("aliases", ()))):
            known[name] = kind
    return known


def _is_boolean(type_text: str) -> bool:
    return type_text.replace(" ", "") in ("bool", "bool|None", "Optional[bool]")


def config_file_arguments(path: str, known: dict[str, str]) -> list[str]:
    """The flags a YAML (or JSON) recipe stands for: ``key: value`` -> ``--key value`` (lists -> several values;
    a union-valued option's pairs (`layer_map`) and dicts -> JSON). YAML reads an unquoted ``no`` / ``off`` as false:
    for an option that is not a boolean (``save_strategy: no``) that means the choice "no"; an unquoted ``yes`` /
    ``on`` there is refused."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"Config file {path!r} does not exist.")
    with open(file) as handle:
        values = yaml.safe_load(handle) or {}
    if not isinstance(values, dict):
        raise ValueError(f"Config file {path} must hold a mapping of option: value, got {type(values).__name__}.")
    unknown = sorted(set(values) - known.keys())
    if unknown:
        raise ValueError(f"Unknown option(s) in {path}: {', '.join(unknown)}. See --help for the options.")
    argv: list[str] = []
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool) and not _is_boolean(known[key]):
            if value:
                raise ValueError(
                    f"{path}: {key}: YAML reads an unquoted yes/on/true as the boolean true, but {key} takes a word. "
                    f"Quote the value, e.g. {key}: \"yes\"."
                )
            value = "no"  # `save_strategy: no` unquoted: YAML's false
        if isinstance(value, dict) or (isinstance(value, (list, tuple)) and known[key] == "text"):
            argv += [f"--{key}", json.dumps(value)]
        elif isinstance(value, (list, tuple)):
            argv += [f"--{key}", *[str(v) for v in value]]
        elif isinstance(value, bool):
            argv += [f"--{key}", str(value).lower()]
        else:
            argv += [f"--{key}", str(value)]
    return argv


#: The heading of each options group in ``--help``, in this order; the `TrainingArguments` ones come last.
HELP_GROUPS = {
    ModelArguments: "models (teacher, student, task)",
    DataArguments: "data",
    CacheArguments: "teacher cache",
    DistillationConfig: "distillation (DistillationConfig)",
}


def _union_with_text(annotation: Any) -> bool:
    """Whether a field's type is a union of text and another kind that is not just optional (``int | str``: "auto"
    or a count; ``str | list[list[int]]``: a name or pairs)."""
    members = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else ()
    return str in members and len([m for m in members if m not in (str, type(None))]) > 0


def _text_union_defaults(dataclass_types: Sequence[type]) -> dict[str, Any]:
    """The union-valued options (`_union_with_text`) -> their defaults (each class's type hints read once)."""
    found = {}
    for cls in dataclass_types:
        hints = typing.get_type_hints(cls)
        found.update({f.name: f.default for f in fields(cls) if f.init and _union_with_text(hints[f.name])})
    return found


def _text_unions(parser: HfArgumentParser, dataclass_types: Sequence[type]) -> None:
    """A union-valued option takes one word on the command line, which its dataclass's validation reads
    (`HfArgumentParser` would keep only the non-text member: ``--logits_chunk_size auto`` would fail as an int)."""
    defaults = _text_union_defaults(dataclass_types)
    for action in parser._actions:
        if action.dest in defaults:  # (its list member would also have dropped the default)
            action.type, action.nargs, action.default = str, None, defaults[action.dest]


def _group_help(parser: HfArgumentParser, dataclass_types: Sequence[type]) -> None:
    """Put each dataclass's options under its own heading in ``--help``: models, data, then the distillation fields
    and, last, the inherited `transformers.TrainingArguments` ones (argparse would list them all as one group)."""
    from transformers import TrainingArguments

    inherited = {f.name for f in fields(TrainingArguments) if f.init}
    groups = []
    for cls in dataclass_types:
        names = {f.name for f in fields(cls) if f.init}
        if issubclass(cls, TrainingArguments):
            groups.append((HELP_GROUPS.get(cls, cls.__name__), names - inherited))
            groups.append(("training (transformers.TrainingArguments)", names & inherited))
        else:
            groups.append((HELP_GROUPS.get(cls, cls.__name__), names))
    for title, names in groups:
        group = parser.add_argument_group(title)
        for action in list(parser._optionals._group_actions):
            if action.dest in names:
                parser._optionals._group_actions.remove(action)
                group._group_actions.append(action)


def parse_distill_args(
    argv: Sequence[str] | None = None,
    dataclass_types: Sequence[type] = (ModelArguments, DataArguments, DistillationConfig),
    prog: str = "hf-distill distill",
) -> tuple[Any, ...]:
    """Parse ``--config FILE`` (if any) and the flags into the dataclasses; flags win over the file. `prog` names the
    command in ``--help``'s usage line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    config_path = None
    for i, token in enumerate(argv):
        if token == "--config":
            if i + 1 >= len(argv):
                raise ValueError("--config needs a file path.")
            config_path = argv[i + 1]
            del argv[i: i + 2]
            break
        if token.startswith("--config="):
            config_path = token.split("=", 1)[1]
            del argv[i]
            break
    file_argv = config_file_arguments(config_path, _option_names(dataclass_types)) if config_path else []
    parser = HfArgumentParser(tuple(dataclass_types), prog=prog,
                              usage=f"{prog} [--config FILE.yaml] [--OPTION VALUE ...]")
    parser.add_argument("--config", default=None, help="YAML recipe; flags override it.")
    _text_unions(parser, dataclass_types)
    _group_help(parser, dataclass_types)
    parsed = parser.parse_args_into_dataclasses(args=file_argv + argv)
    return tuple(parsed[: len(dataclass_types)])  # the last item is the namespace holding --config

