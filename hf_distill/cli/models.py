"""Models, tokenizers and data for the command-line jobs: where each comes from, checked before anything loads."""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    DataCollatorWithPadding,
    TrainingArguments,
)
from transformers.utils import logging

from ..data.generate import check_generations_tokenizer, is_generations
from ..data.labels import named_labels
from ..data.loading import (
    DataArguments,
    PreparedData,
    add_transfer_set,
    caches_outside,
    load_raw,
    prepare_datasets,
    split_dataset,
)
from ..signals.cross_vocab import CROSS_LOSSES
from .arguments import CacheArguments, ModelArguments

logger = logging.get_logger(__name__)


AUTO_CLASSES = {
    "sequence-classification": AutoModelForSequenceClassification,
    "regression": AutoModelForSequenceClassification,
    "causal-lm": AutoModelForCausalLM,
    "masked-lm": AutoModelForMaskedLM,
}


def resolve_source(source: str, flag: str = "--teacher") -> str:
    """``asset:NAME`` -> the local folder of a packaged asset (fetched when needed); a local folder -> itself; a Hub
    id (``name`` or ``owner/name``) unchanged. Something that can only be a path (``./x``, ``/x``, ``a/b/c``) and does
    not exist is refused naming `flag`."""
    if source.startswith("asset:"):
        from ..data.assets import fetch

        try:
            return str(fetch(source.split(":", 1)[1]))
        except KeyError as error:  # an unknown name
            raise ValueError(f"{flag} {source!r}: {error.args[0]} (`hf-distill assets list` describes them)") from error
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"{flag} {source!r} is a file: give the model's folder (with config.json), a "
                                     "Hub id or asset:NAME.")
        return str(path)
    if source.startswith((".", "/", "~")) or source.count("/") > 1 or os.sep != "/" and os.sep in source:
        raise FileNotFoundError(
            f"{flag} {source!r}: no such folder. Give an existing model folder (with config.json), a Hub id "
            "(owner/name) or asset:NAME (hf-distill assets list)."
        )
    return source


def load_model(source: str, task: str, data: PreparedData | None, gguf_file: str | None = None,
               trust_remote_code: bool = False, flag: str = "--teacher") -> torch.nn.Module:
    """A model for `task` from a Hub id / folder / asset (GGUF dequantised to float32); a classifier gets the data's
    label set (`data.id2label`: the teacher's own when it names its labels). `flag` names the source in errors."""
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if task == "regression":
        kwargs.update(num_labels=1, problem_type="regression")
    elif task == "sequence-classification" and data is not None and data.num_labels:
        kwargs.update(num_labels=data.num_labels, id2label=data.id2label,
                      label2id={v: k for k, v in data.id2label.items()})
    if gguf_file:
        kwargs.update(gguf_file=gguf_file, dtype=torch.float32)
    folder = resolve_source(source, flag)
    try:
        model = AUTO_CLASSES[task].from_pretrained(folder, **kwargs)
    except Exception as error:
        broken = unreadable_weights(folder) if Path(folder).is_dir() else None
        if broken:
            raise ValueError(
                f"{flag} {source!r}: the weights file {broken} cannot be read ({error}). It is truncated or corrupt: "
                "save or download the model again."
            ) from error
        if isinstance(error, OSError) and not Path(folder).is_dir():
            raise ValueError(f"{flag} {source!r}: cannot load it from the Hub ({' '.join(str(error).split())[:300]}). "
                             "Check the id, the network and your token, or give a local folder.") from error
        raise
    if gguf_file:  # a plain float model from here on (saves and reloads without the quantizer)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model


def unreadable_weights(folder: str) -> str | None:
    """The first ``*.safetensors`` file in `folder` that safetensors cannot open (truncated, corrupt), or None."""
    from safetensors import safe_open

    for file in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    handle.get_slice(key)
        except Exception as error:  # safetensors raises its own SafetensorError
            logger.debug("cannot open %s: %s", file, error)
            return str(file)
    return None


def collator_for(task: str, tokenizer: Any, seed: int, data: PreparedData | None = None):
    """The collator of a job: the one the data needs (chat / prompt-completion), else the task's."""
    if data is not None and data.collator is not None:
        return data.collator
    if task == "causal-lm":
        return DataCollatorForLanguageModeling(tokenizer, mlm=False)
    if task == "masked-lm":
        return DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15, seed=seed)
    return DataCollatorWithPadding(tokenizer)


def load_tokenizer(model_args: ModelArguments, source: str | None = None) -> Any:
    """The teacher's tokenizer (from its folder, Hub id or GGUF file; `--teacher_tokenizer` when given), or the one at
    `source`, with its end-of-sequence token as the pad token when it has none."""
    kwargs = {}
    if source is None:
        source = model_args.teacher_tokenizer or model_args.teacher
        if model_args.teacher_gguf_file and not model_args.teacher_tokenizer:
            kwargs = {"gguf_file": model_args.teacher_gguf_file}
    tokenizer = AutoTokenizer.from_pretrained(resolve_source(source), trust_remote_code=model_args.trust_remote_code,
                                              **kwargs)
    return with_pad_token(tokenizer)


def with_pad_token(tokenizer: Any) -> Any:
    """`tokenizer` padding with its end-of-sequence token when it has no pad token (logged)."""
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        logger.warning("The tokenizer has no pad token: padding with its end-of-sequence token %r (padding never "
                       "counts).", tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def dataset_path(name: str, flag: str = "--dataset") -> str:
    """A dataset flag as `load_raw` reads it: ``asset:NAME`` becomes the packaged file, anything else stays."""
    return resolve_source(name, flag) if name.startswith("asset:") else name


def prepare_inputs(model_args: ModelArguments, data_args: DataArguments, args: TrainingArguments | CacheArguments,
                   teacher_head_trained: bool = True, require_labels: bool = True, tokenizer: Any = None,
                   teacher_tokenizer: Any = None, prompts: bool = False):
    """Tokenizer and tokenised splits for a job (the teacher's tokenizer); `args` gives the seed of the held-out
    split (and, for training jobs, `main_process_first`). Classification labels become the teacher's class ids
    (`hf_distill.data.loading.label_plan`); `teacher_head_trained`: the teacher's number of classes bounds the labels (not
    for `train-teacher`, which trains the head); `prompts`: prompt-only rows are welcome (evaluation, on-policy)."""
    if model_args.teacher is None:
        raise ValueError("--teacher is required: a Hub id, a local folder, or asset:NAME.")
    if data_args.dataset is None:
        raise ValueError("--dataset is required: a Hub dataset name or a local csv/json/jsonl/parquet/txt file.")
    teacher_source = resolve_source(model_args.teacher)
    tokenizer_kwargs = {"gguf_file": model_args.teacher_gguf_file} if model_args.teacher_gguf_file else {}
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_args)
    teacher_labels, teacher_classes = None, None
    if model_args.task == "sequence-classification":
        config = AutoConfig.from_pretrained(teacher_source, trust_remote_code=model_args.trust_remote_code,
                                            **tokenizer_kwargs)
        teacher_labels = named_labels(config)
        teacher_classes = int(config.num_labels) if teacher_head_trained else None
    raw = load_raw(dataset_path(data_args.dataset), data_args.dataset_config)
    if is_generations(data_args.dataset):
        check_generations_tokenizer(data_args.dataset, tokenizer)
    first = args.main_process_first(desc="tokenising") if hasattr(args, "main_process_first") else nullcontext()
    transfer = None
    if data_args.transfer_dataset:
        transfer = load_raw(dataset_path(data_args.transfer_dataset, "--transfer_dataset"))
        if data_args.transfer_split not in transfer:
            raise ValueError(f"--transfer_dataset has no split {data_args.transfer_split!r} (splits: {list(transfer)}); "
                             "set --transfer_split.")
    # nothing is written into the user's data folders (`caches_outside`)
    with first, caches_outside(data_args.dataset), caches_outside(data_args.transfer_dataset):
        train, held_out = split_dataset(raw, data_args, args.seed)
        read = len(train), len(held_out)
        # on-policy runs that sample every micro-batch (lmbda=1, seq_kd) can train on prompts alone
        prompts = prompts or getattr(args, "lmbda", 0) >= 1 or getattr(args, "seq_kd", False)
        prepared = prepare_datasets(model_args.task, train, held_out, tokenizer, data_args, teacher_labels,
                                    teacher_classes, require_labels, prompts=prompts,
                                    teacher_tokenizer=teacher_tokenizer)
        if transfer is not None:
            prepared.train = add_transfer_set(prepared.train, transfer[data_args.transfer_split], tokenizer, data_args)
    unit = "blocks of --block_size tokens" if prepared.data_format == "text" else "rows"
    logger.warning("Data %s: %s data; %d training and %d held-out %s kept (of %d and %d rows read).",
                   data_args.dataset, prepared.data_format or model_args.task, len(prepared.train),
                   len(prepared.eval), unit, *read)
    if prepared.labels is not None and prepared.labels.warning and teacher_head_trained:
        logger.warning(prepared.labels.warning)
    return tokenizer, prepared


def resume_checkpoint(args: TrainingArguments) -> str | None:
    """The checkpoint `--resume_from_checkpoint` names: a folder, or ``true`` for the last ``checkpoint-*`` in
    `output_dir` (as the HF example scripts do); ``false`` / unset: None."""
    value = args.resume_from_checkpoint
    if value is None or str(value).strip().lower() in ("", "false", "no", "none"):
        return None
    if str(value).strip().lower() in ("true", "yes", "last"):
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
        if last is None:
            raise ValueError(
                f"--resume_from_checkpoint true: output_dir {args.output_dir!r} holds no checkpoint-* folder to resume. "
                "Start a fresh run (drop the flag) or name a checkpoint folder."
            )
        return last
    if not os.path.isdir(value):
        raise FileNotFoundError(f"--resume_from_checkpoint {value!r}: no such checkpoint folder.")
    return str(value)


def lora_config(model_args: ModelArguments):
    """The LoRA config of `--use_peft`: rank, alpha, dropout and target modules ("all-linear" by default)."""
    from peft import LoraConfig, TaskType

    task_type = {"sequence-classification": TaskType.SEQ_CLS, "regression": TaskType.SEQ_CLS,
                 "causal-lm": TaskType.CAUSAL_LM}.get(model_args.task)
    return LoraConfig(r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
                      target_modules=model_args.lora_target_modules or "all-linear", task_type=task_type)


def student_tokenizer_of(student_source: str, trust_remote_code: bool) -> Any:
    """The tokenizer `--student` ships, or None when it ships none (it then uses the teacher's)."""
    try:
        return AutoTokenizer.from_pretrained(resolve_source(student_source), trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None


def cross_tokenizers(model_args: ModelArguments, args: Any) -> tuple[Any, Any] | None:
    """(student tokenizer, teacher tokenizer) when `--student` has another vocabulary than the teacher's tokenizer
    (`--teacher_tokenizer` or its own): a cross-tokenizer run, whose data is tokenised for the student. None: one
    tokenizer. Settings a cross-tokenizer run cannot serve are refused here, before any model loads."""
    if not model_args.student:
        return None
    student = student_tokenizer_of(model_args.student, model_args.trust_remote_code)
    if student is None:
        return None
    teacher = load_tokenizer(model_args)
    if student.get_vocab() == teacher.get_vocab():
        return None
    problems = []
    if model_args.task != "causal-lm":
        problems.append(f"--task {model_args.task} (it aligns next-token predictions: --task causal-lm)")
    if model_args.teacher_cache:
        problems.append("--teacher_cache (an offline cache holds teacher tokens of the teacher's own tokenisation: "
                        "run the teacher live)")
    if args.logits_weight > 0 and args.logits_loss not in CROSS_LOSSES:
        problems.append(f"--logits_loss {args.logits_loss} (it compares ids token by token: use hybrid or uld)")
    if problems:
        raise ValueError(f"The student {model_args.student!r} has another tokenizer than the teacher's, so this is a "
                         f"cross-tokenizer run, which cannot use: {'; '.join(problems)}.")
    logger.info("The student %r has its own tokenizer: the data is tokenised for it and aligned to the teacher's "
                "tokens.", model_args.student)
    return with_pad_token(student), teacher
