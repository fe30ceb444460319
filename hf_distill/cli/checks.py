"""What a command-line job checks before its models load or its training starts: the model flags and the output
folder, the tokenizer the teacher reads, row lengths against both models' context, packing, transfer sets, and what a
teacher cache was made from (`hf_distill.data.provenance`). Each refusal is one message naming the problem and the fix."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from transformers import AutoConfig, AutoTokenizer

from ..config import DistillationConfig
from ..data.chat import PROBE, check_packing_supported, conversation_mask
from ..data.generate import is_generations
from ..data.loading import PreparedData
from ..data.provenance import (
    DATA_FIELDS,
    FOLDER_KINDS,
    SOURCE_FIELDS,
    content_fingerprint,
    differences,
    flags_for,
    folder_kind,
    id_batches,
    template_record,
)
from ..data.teacher_cache import cache_manifest, load_teacher_cache
from ..modeling import context_length, text_config, unwrap, weights_fingerprint
from ..signals import fields_where
from .arguments import ModelArguments
from .models import load_tokenizer, resolve_source, student_tokenizer_of


def check_packing_data(data: PreparedData, task: str) -> None:
    """`--packing` joins chat / prompt-completion rows only (refused before any model loads)."""
    if data.data_format not in ("messages", "prompt_completion"):
        raise ValueError(f"--packing joins chat or prompt-completion rows; this is {data.data_format or task} data "
                         "(plain text is cut into --block_size blocks already): drop --packing.")


def check_packing(signals: list, models: list[Any]) -> None:
    """Token-level signals (hidden states, attention maps) count every token of a batch without an attention mask,
    padding included, so they are refused with `--packing`; every model must keep packed conversations apart
    (`chat.check_packing_supported`)."""
    token_terms = sorted(signal.name for signal, _ in signals if signal.unit == "tokens")
    if token_terms:
        raise ValueError(f"--packing cannot count the tokens of {', '.join(token_terms)} (a packed batch has no "
                         "attention mask to tell padding apart): drop --packing or those terms.")
    for name, model in models:
        if model is not None:
            check_packing_supported(unwrap(model), name)


def check_transfer_set(task: str, args: DistillationConfig | None) -> None:
    """A transfer set (unlabelled rows, `--transfer_dataset`) teaches a classifier through the teacher's terms only;
    refused where nothing would learn from it (`args` None: a job without a teacher, `train-teacher`)."""
    if task != "sequence-classification":
        raise ValueError(f"--transfer_dataset is for classifiers (--task sequence-classification), not {task}: for "
                         "language models, have the teacher answer the unlabelled prompts (`hf-distill generate`) and "
                         "distil on its answers.")
    if args is None:
        raise ValueError("--transfer_dataset holds unlabelled rows, which only a teacher can label: it belongs to "
                         "`hf-distill distill`, not to training the teacher.")
    if not fields_where(args, needs_teacher=True):
        raise ValueError("--transfer_dataset rows have no labels, so only the teacher's terms learn from them, and none "
                         "is on: set --logits_weight (e.g. 0.5) or drop --transfer_dataset.")
    needing = sorted(fields_where(args, needs_labels=True))
    if needing:
        raise ValueError(f"{', '.join(needing)} differentiate the task loss, which the transfer set's unlabelled rows "
                         "lack: set them to 0 or drop --transfer_dataset.")


def check_model_folder(folder: str, flag: str, gguf: bool = False) -> None:
    """A local folder given as a model must hold one (``config.json``, a PEFT adapter, or a GGUF file with
    `--teacher_gguf_file`): another kind of folder is named, not left to a tokenizer's error (a Hub id passes)."""
    kind = folder_kind(folder)
    if gguf or not Path(folder).is_dir() or kind == "model":
        return
    raise ValueError(f"{flag} {folder!r} holds {FOLDER_KINDS.get(kind, 'no config.json')}, not a model: give the "
                     "model's folder (with config.json), a Hub id or asset:NAME.")


def check_model_arguments(model_args: ModelArguments, args: DistillationConfig) -> None:
    """The model flags that cannot work, refused before anything loads."""
    num_layers, _, _ = model_args.student_cut()
    if num_layers is not None and num_layers < 1:
        raise ValueError(
            f"--student_layers must be at least 1 (the number of teacher layers the student keeps), got "
            f"{model_args.student_layers}. For LoRA self-distillation without a smaller student, drop --student_layers "
            "and pass --use_peft true."
        )
    if model_args.student and model_args.student_layers:
        raise ValueError("Give either --student (a model to start from) or --student_layers (cut from the teacher), "
                         "not both.")
    for flag, source in (("--teacher", model_args.teacher), ("--student", model_args.student)):
        if source and not source.startswith("asset:"):
            check_model_folder(resolve_source(source, flag), flag, gguf=flag == "--teacher" and
                               bool(model_args.teacher_gguf_file))
    for anchor in args.teacher_route or []:
        resolve_source(anchor, "--teacher_route")
    sampling = getattr(args, "lmbda", 0) > 0 or getattr(args, "seq_kd", False)
    if sampling and model_args.teacher_cache:
        raise ValueError("--lmbda > 0 / --seq_kd sample new completions, which an offline --teacher_cache cannot score "
                         "(it holds only the sequences it was built on): drop --teacher_cache, or set --lmbda 0.")
    if sampling and model_args.task != "causal-lm":
        raise ValueError(f"--lmbda > 0 / --seq_kd sample completions, which only causal LMs write: use --task "
                         f"causal-lm (not {model_args.task}), or set --lmbda 0.")
    if args.teacher_route and model_args.teacher_cache:
        raise ValueError("--teacher_route and --teacher_cache are two different teachers: give one of them.")


def teacher_cache_for(path: str, tokenizer: Any, train: Any, data: dict[str, Any] | None = None) -> Any:
    """The offline teacher cache at `path` as the training set, refused where its targets are not this run's: made
    with another tokenizer or chat template, with other data flags (`data`: this run's `provenance.data_record`;
    each differing flag named with both values), or from other training rows. A generations folder made with
    ``--cache_top_k`` is its own cache: its training rows (`train`) carry the columns."""
    if is_generations(path):
        if cache_manifest(train) is None:
            raise ValueError(
                f"--teacher_cache {path} is a generations folder, and these training rows carry no teacher top-k: "
                "pass the folder as --dataset too, and generate with --cache_top_k K (or drop --teacher_cache to "
                "run the teacher live)."
            )
        return train
    cached = load_teacher_cache(path, tokenizer)
    manifest = cache_manifest(cached) or {}
    found = differences(manifest, template_record(tokenizer), ("chat_template", "end_of_turn"))
    if found:
        raise ValueError(f"--teacher_cache {path} was rendered with another chat template than this run's tokenizer "
                         f"({'; '.join(found)}): rebuild the cache with this tokenizer, or distil with the cache's "
                         "teacher tokenizer.")
    recorded = manifest.get("data") or {}
    if data is not None and recorded:
        changed = [name for name in DATA_FIELDS if name not in SOURCE_FIELDS and differences(recorded, data, (name,))]
        if changed:
            raise ValueError(
                f"--teacher_cache {path} was built with other data flags than this run's "
                f"({'; '.join(differences(recorded, data, changed))}): its targets belong to its own rows (other "
                f"lengths, packing or split). Run with the cache's flags "
                f"({flags_for([(n, recorded[n]) for n in changed])}), or rebuild the cache with this run's flags into "
                "a new --output_dir."
            )
    there, here = content_fingerprint(cached), content_fingerprint(train)
    if there and here and there != here:
        sources = differences(recorded, data or {}, SOURCE_FIELDS)
        raise ValueError(
            f"--teacher_cache {path} holds other training rows than these data flags give ({len(cached)} cached rows, "
            f"{len(train)} here; token fingerprints {there} and {here}"
            + (f"; {'; '.join(sources)}" if sources else ": the data file changed")
            + "): rebuild the cache from this data with the same flags and --seed into a new --output_dir."
        )
    return cached


def check_cache_teacher(cached: Any, teacher: Any, teacher_flag: str) -> None:
    """The teacher a cache was built from must be the `--teacher` of the run (it is the one the card names, the
    student is cut from and the report compares): its `provenance.weights_fingerprint` is compared with the cache's
    record (caches without one are checked by the teacher's name)."""
    manifest = cache_manifest(cached) or {}
    recorded = manifest.get("teacher_weights")
    if recorded is not None:
        mine = weights_fingerprint(teacher)
        if mine == recorded:
            return
        detail = f"weights {recorded} there, {mine} for --teacher {teacher_flag!r}"
    else:
        built_by = manifest.get("teacher_id")
        if not built_by or _same_source(built_by, teacher_flag):
            return
        detail = f"teacher {built_by!r} there, --teacher {teacher_flag!r} here"
    raise ValueError(
        f"The teacher cache was built from another teacher than --teacher ({detail}; cache teacher "
        f"{manifest.get('teacher_id')!r}): its soft targets are that model's. Pass --teacher "
        f"{manifest.get('teacher_id')}, or rebuild the cache from this teacher."
    )


def _same_source(a: str, b: str) -> bool:
    """Whether two model sources name the same model (local paths compared resolved)."""
    paths = [Path(x).expanduser() for x in (a, b)]
    if all(p.exists() for p in paths):
        return paths[0].resolve() == paths[1].resolve()
    return a == b


def model_config(model_args: ModelArguments, flag: str) -> Any:
    """The (text) config of `--teacher` or `--student` (`flag`), read without the weights; None without that flag or
    where it cannot be read (the model's own loading then says why: a Hub id offline, a folder without config.json)."""
    source = model_args.teacher if flag == "--teacher" else model_args.student
    if source is None:
        return None
    kwargs = {"gguf_file": model_args.teacher_gguf_file} if flag == "--teacher" and model_args.teacher_gguf_file \
        else {}
    try:
        config = AutoConfig.from_pretrained(resolve_source(source, flag), trust_remote_code=model_args.trust_remote_code,
                                            **kwargs)
    except (OSError, ValueError):
        return None
    return text_config(config)


def check_teacher_tokenizer(model_args: ModelArguments) -> None:
    """`--teacher_tokenizer` must belong to the teacher: no more tokens than the teacher's embedding has rows (fewer
    is normal: padded vocabularies), and, where the teacher's folder has a tokenizer of its own, the same ids for a
    probe text. Checked before any model loads."""
    if not model_args.teacher_tokenizer or not model_args.teacher:
        return
    config = model_config(model_args, "--teacher")
    if config is None:
        return
    kwargs = {"gguf_file": model_args.teacher_gguf_file} if model_args.teacher_gguf_file else {}
    source = resolve_source(model_args.teacher)
    tokenizer = load_tokenizer(model_args)
    rows = getattr(config, "vocab_size", None)
    if rows is not None and len(tokenizer) > rows:
        raise ValueError(
            f"--teacher_tokenizer {model_args.teacher_tokenizer!r} has {len(tokenizer)} tokens, more than the "
            f"teacher's {rows} embedding rows (config.vocab_size): it is not the teacher's tokenizer, and ids past "
            f"{rows - 1} have no embedding. Drop --teacher_tokenizer, or give the teacher's own."
        )
    try:
        own = AutoTokenizer.from_pretrained(source, trust_remote_code=model_args.trust_remote_code, **kwargs)
    except (OSError, ValueError, TypeError):
        return  # the teacher ships no tokenizer: --teacher_tokenizer is how it gets one
    ids = [t(PROBE_TEXT, add_special_tokens=False)["input_ids"] for t in (own, tokenizer)]
    if ids[0] != ids[1]:
        raise ValueError(
            f"--teacher_tokenizer {model_args.teacher_tokenizer!r} tokenises text differently from the tokenizer in "
            f"the teacher's folder ({len(ids[1])} vs {len(ids[0])} ids for the probe {PROBE_TEXT!r}, first "
            f"difference at token {next((i for i, (x, y) in enumerate(zip(*ids)) if x != y), min(map(len, ids)))}): "
            "the teacher would read its ids as other words. Drop --teacher_tokenizer (the teacher's own is used), "
            "or give one with the teacher's vocabulary."
        )


#: Text tokenised by both tokenizers in `check_teacher_tokenizer` (words, digits, punctuation, spaces, new lines).
PROBE_TEXT = "hello there how are you fine thanks\n 12345 Hello, World! user assistant system"


def check_row_lengths(data: PreparedData, model_args: ModelArguments) -> None:
    """No training or held-out row may be longer than the teacher's or the student's context
    (`modeling.context_length`, read from their configs before they load): positions past it are ones the model
    never learnt or has no embedding for (a GPT-2's position table raises `IndexError` mid-run)."""
    contexts = {}
    for name in ("teacher", "student"):
        length = context_length(model_config(model_args, f"--{name}"))
        if length is not None:
            contexts[name] = length
    if not contexts:
        return
    name, context = min(contexts.items(), key=lambda kv: kv[1])
    for split, rows in (("training", data.train), ("held-out", data.eval)):
        lengths = row_lengths(rows)
        if lengths is None or not len(lengths) or int(lengths.max()) <= context:
            continue
        over = int((lengths > context).sum())
        limit = "--block_size" if data.data_format == "text" else "--max_length"
        raise ValueError(
            f"{over} of {len(lengths)} {split} rows are longer than the {name}'s context of {context} positions (the "
            f"longest has {int(lengths.max())} tokens): it would train on positions the model cannot read. Pass "
            f"{limit} {context} (or less) to cut the rows"
            + (" (--truncation_side picks the end kept)" if limit == "--max_length" else "")
            + ", or use a model with a longer context."
        )


def row_lengths(rows: Any) -> Any:
    """The number of tokens of every row (``input_ids``) as a numpy array; None for data without them."""
    if not hasattr(rows, "__len__") or "input_ids" not in (getattr(rows, "column_names", None) or ()):
        return None
    return np.concatenate([lengths for lengths, _ in id_batches(rows)] or [np.zeros(0, dtype=np.int64)])


def check_writable(folder: str | None, flag: str = "--output_dir") -> None:
    """`folder` (made if missing) must be writable, checked before any model loads so a run never fails at its
    save after all the work: the nearest existing folder on its path takes a test file, which is removed again."""
    if not folder:
        return
    path = Path(folder).expanduser().absolute()
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{flag} {folder!r} cannot be created: {str(existing)!r} on its path is a file, not a "
                         "folder. Choose a folder path.")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".hf-distill-write-test-"):
            pass
    except OSError as error:
        raise ValueError(f"{flag} {folder!r} cannot be written ({error.strerror or error} in {str(existing)!r}): "
                         "nothing was loaded or trained. Choose a folder you can write to, or fix its "
                         "permissions.") from error


def check_same_vocabulary(tokenizer: Any, student_source: str, trust_remote_code: bool,
                          chat: bool = False) -> None:
    """A student with its own tokenizer must share the teacher's vocabulary (token -> id) and, for chat data
    (`chat`), render conversations to the same ids (`check_same_rendering`)."""
    student_tokenizer = student_tokenizer_of(student_source, trust_remote_code)
    if student_tokenizer is None:
        return  # the student ships no tokenizer: it is used with the teacher's
    if student_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError(
            f"The student {student_source!r} has a different vocabulary from the teacher's tokenizer: their logits "
            "would compare different tokens. Use a student that shares the teacher's tokenizer (or --student_layers)."
        )
    if chat:
        check_same_rendering(tokenizer, student_tokenizer)


def check_same_rendering(teacher_tokenizer: Any, student_tokenizer: Any) -> None:
    """Teacher and student must turn a conversation into the same ids (same tokenizer, same template), else their
    per-token distributions compare different tokens: refuse, showing both renderings' first difference."""
    ids = [conversation_mask(t, PROBE)[0] for t in (teacher_tokenizer, student_tokenizer)]
    if ids[0] == ids[1]:
        return
    at = next((i for i, (a, b) in enumerate(zip(*ids)) if a != b), min(map(len, ids)))
    shown = [repr(t.decode(i[at: at + 8])) for t, i in zip((teacher_tokenizer, student_tokenizer), ids)]
    raise ValueError(
        f"The teacher's and the student's chat templates render the same conversation to different tokens (first "
        f"difference at token {at}: teacher {shown[0]}, student {shown[1]}): their outputs would compare different "
        "positions. Use one tokenizer and template for both (cross-tokenizer distillation is not supported yet)."
    )
