"""The command-line jobs: fine-tune a teacher, distil it into a student, evaluate both, report, push."""

from __future__ import annotations

import logging as logging_module
import os
from typing import Any, Sequence

import torch
from transformers import (
    Trainer,
    set_seed,
)
from transformers.utils import logging

from ..checks.options import check_choice
from ..checks.safety import check_one_run
from ..config import TEACHER_DTYPES, DistillationConfig
from ..data.chat import chat_generation_config
from ..data.generate import GenerationArguments, check_not_a_cache, generate_completions, holds_teacher_cache
from ..data.loading import (
    DataArguments,
    as_turns,
    caches_outside,
    load_raw,
)
from ..data.provenance import data_record, template_record
from ..data.samples import samples_history
from ..data.teacher_cache import (
    build_teacher_cache,
    cache_manifest,
    cache_size,
    check_not_generations,
    load_teacher_cache,
)
from ..modeling import config_use_cache, unwrap
from ..signals import label_weights
from ..speed.performance import apply_speed_defaults, keep_freed_memory, recommended_precision
from ..storage.hub import CardInfo, describe_method, hub_errors, library_versions, training_record
from ..storage.output_dir import check_output_dir, move_aside_on_main
from ..students import model_depth, pick_layers, shrink_model
from ..trainer import DistillationTrainer
from .arguments import CacheArguments, ModelArguments, parse_distill_args
from .checks import (
    check_cache_teacher,
    check_model_arguments,
    check_packing,
    check_packing_data,
    check_row_lengths,
    check_same_vocabulary,
    check_teacher_tokenizer,
    check_transfer_set,
    check_writable,
    teacher_cache_for,
)
from .models import (
    collator_for,
    cross_tokenizers,
    dataset_path,
    load_model,
    load_tokenizer,
    lora_config,
    prepare_inputs,
    resolve_source,
    resume_checkpoint,
)
from .report import (
    SIGNIFICANT,
    Row,
    accuracy_metrics,
    displayed,
    evaluate_model,
    folder_size,
    parameters,
    regression_metrics,
    throughput,
    weights_dtype,
    write_report,
)

logger = logging.get_logger(__name__)


def distill_main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``scripts/distill.py`` / ``hf-distill distill``: distil, evaluate teacher and student, report, save, push."""
    model_args, data_args, args = parse_distill_args(argv)
    return run_distillation(model_args, data_args, args)


def start_training_job(model_args: ModelArguments, data_args: DataArguments, args: DistillationConfig,
                       distilling: bool) -> tuple[str | None, bool]:
    """The checks of a training job before anything loads (one run per process group, the model flags, a transfer
    set's use, the output folder), then the seed; returns the checkpoint to resume from and whether an earlier run's
    folder is to be moved aside."""
    check_one_run(args)
    if args.process_index > 0:  # each message once, from the main process (errors still from every one)
        logging_module.getLogger("hf_distill").setLevel(logging_module.ERROR)
    check_model_arguments(model_args, args)
    if data_args.transfer_dataset:
        check_transfer_set(model_args.task, args if distilling else None)
    resume = resume_checkpoint(args)
    move_earlier = check_output_dir(args.output_dir, resuming=resume is not None, overwrite=args.overwrite_output_dir)
    check_writable(args.output_dir)
    check_teacher_tokenizer(model_args)
    set_seed(args.seed)
    return resume, move_earlier


def run_distillation(model_args: ModelArguments, data_args: DataArguments, args: DistillationConfig) -> dict[str, Any]:
    """The whole job. Every check that can run before a model loads does (flags, output folder, processes), and the
    order of the end is: save the student and its card, write the report, merge adapters, push last."""
    resume, move_earlier = start_training_job(model_args, data_args, args, distilling=True)
    if model_args.fast_defaults:
        for line in apply_speed_defaults(args, args.device.type, model_args.task):
            logger.warning(f"Speed default (--fast_defaults false to turn off): {line}.")
    pair = cross_tokenizers(model_args, args)  # a student with another tokenizer: (its tokenizer, the teacher's)
    tokenizer, data = prepare_inputs(model_args, data_args, args, require_labels=bool(label_weights(args)),
                                     tokenizer=pair[0] if pair else None, teacher_tokenizer=pair[1] if pair else None)
    if data_args.packing:
        check_packing_data(data, model_args.task)
    cached = teacher_cache_for(model_args.teacher_cache, tokenizer, data.train, data_record(data_args, args.seed)) \
        if model_args.teacher_cache else None
    check_row_lengths(data, model_args)
    teacher = load_model(model_args.teacher, model_args.task, data, model_args.teacher_gguf_file,
                         model_args.trust_remote_code)
    if cached is not None:
        check_cache_teacher(cached, teacher, model_args.teacher)
    peft_config = lora_config(model_args) if model_args.use_peft else None
    student, teacher = load_student(model_args, teacher, tokenizer, data, same_tokenizer=pair is None)
    if args.ddp_find_unused_parameters is None and (model_args.task == "causal-lm" or not model_args.student):
        args.ddp_find_unused_parameters = False  # (a causal LM or a cut of the teacher uses every parameter)
    cache_top_k = (cache_manifest(cached) or {}).get("top_k") if cached is not None else None
    method = describe_method(args, cache_top_k, (model_args.teacher_tokenizer or model_args.teacher) if pair else None)
    logger.warning("Method: %s.", method)
    if move_earlier:
        move_aside_on_main(args)
    live = cached is None and not args.teacher_route  # (else the teacher runs only for the final comparison)
    trainer = build_trainer(model_args, args, student, teacher if live else None, cached, pair, tokenizer, data,
                            peft_config)
    if data_args.packing:
        check_packing(trainer.signals, [("student", trainer.model), ("teacher", trainer.teacher_model)])
    teacher = trainer.teacher_model if live else teacher
    trainer.card_info = card_info(model_args, data_args, args, trainer.model, teacher, data, method, peft_config)
    trainer.train(resume_from_checkpoint=resume)
    trainer.card_info.training = training_record(args, trainer.state.global_step, trainer.accelerator.num_processes)
    trainer.card_info.collapse = collapse_record(trainer)
    scores = held_out_comparison(trainer, teacher, data, model_args.task, same_tokenizer=pair is None, live=live)
    chat = data.data_format == "messages" or (data.data_format in ("prompt_only", "prompt_completion")
                                              and getattr(tokenizer, "chat_template", None))
    if chat:  # the student answers a conversation and stops at the end of its turn
        chat_generation_config(unwrap(trainer.model), tokenizer)
    trainer.card_info.chat = bool(chat)
    trainer.card_info.model_id = ((trainer.hub_model_id or args.hub_model_id) if args.push_to_hub else None) \
        or os.path.abspath(args.output_dir)
    trainer.save_model(args.output_dir, _internal_call=True)  # the push comes last, once
    summary = report_table(trainer, teacher, model_args, args, scores, same_tokenizer=pair is None)
    if model_args.merge_adapters and hasattr(trainer.model, "merge_and_unload") and trainer.is_world_process_zero():
        summary["merged"] = save_merged(trainer, tokenizer, os.path.join(args.output_dir, "merged"))
    if args.push_to_hub:
        with hub_errors(args, pushing=True):
            trainer.push_to_hub()
    return summary


def load_student(model_args: ModelArguments, teacher: torch.nn.Module, tokenizer: Any, data: Any,
                 same_tokenizer: bool) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """The student and the teacher the trainer gets: a model of its own (`--student`), a cut of the teacher's layers
    (`--student_layers`), or the teacher itself under LoRA (`--use_peft` alone: its adapter-free base teaches, so the
    returned teacher is None)."""
    if model_args.student:
        student = load_model(model_args.student, model_args.task, data, trust_remote_code=model_args.trust_remote_code,
                             flag="--student")
        if same_tokenizer:
            check_same_vocabulary(tokenizer, model_args.student, model_args.trust_remote_code,
                                  chat=data.data_format == "messages")
        return student, teacher
    if model_args.student_layers:
        num_layers, layers, strategy = model_args.student_cut()
        if layers is None:
            layers, strategy = pick_layers(model_depth(teacher.config), num_layers, strategy)
        logger.warning("Student: %d of the teacher's %d layers, keeping teacher layers %s (%s).", num_layers,
                       model_depth(teacher.config), layers,
                       "--student_layers" if strategy == "explicit" else f"--shrink_strategy {strategy}")
        return shrink_model(teacher, layers=layers), teacher
    if model_args.use_peft:  # self-distillation: LoRA on the teacher, whose adapter-free base teaches
        return teacher, None
    raise ValueError("Give the student: --student (Hub id / folder), --student_layers N (cut from the teacher), "
                     "or --use_peft alone (LoRA self-distillation).")


def build_trainer(model_args: ModelArguments, args: DistillationConfig, student: torch.nn.Module,
                  teacher: torch.nn.Module | None, cached: Any, pair: tuple | None, tokenizer: Any, data: Any,
                  peft_config: Any) -> DistillationTrainer:
    """The `DistillationTrainer` of the job: a live `teacher` (None for a cache, a route or self-distillation), the
    cached training set in place of the tokenised one, and held-out metrics where the held-out rows have labels."""
    task = model_args.task
    with hub_errors(args):
        return DistillationTrainer(
            model=student, teacher_model=teacher, args=args, peft_config=peft_config,
            train_dataset=data.train if cached is None else cached, eval_dataset=data.eval,
            processing_class=tokenizer, data_collator=collator_for(task, tokenizer, args.seed, data),
            teacher_processing_class=pair[1] if pair else None,
            route_loader=(lambda path: load_model(path, task, data, trust_remote_code=model_args.trust_remote_code,
                                                  flag="--teacher_route")) if args.teacher_route else None,
            compute_metrics={"sequence-classification": accuracy_metrics,
                             "regression": regression_metrics}.get(task) if evaluates_labels(data, task) else None,
        )


def evaluates_labels(data: Any, task: str) -> bool:
    """Whether the held-out rows have answers to score (prompt-only data, on-policy, has none: the report then shows
    sizes and speed only)."""
    return ("labels" in data.eval.column_names or task in ("causal-lm", "masked-lm")) \
        and data.data_format != "prompt_only"


def card_info(model_args: ModelArguments, data_args: DataArguments, args: DistillationConfig,
              student: torch.nn.Module, teacher: torch.nn.Module, data: Any, method: str,
              peft_config: Any) -> CardInfo:
    """What the model card says of the run before it trains: models, data, loss weights, method, versions."""
    return CardInfo(
        teacher=model_args.teacher, student_source=model_args.student,
        kept_layers=getattr(student.config, "distilled_from_layers", None) if not model_args.student else None,
        teacher_layers=model_depth(teacher.config), student_layers=model_depth(student.config), task=model_args.task,
        dataset=data_args.dataset, loss_weights=args.loss_weights, temperature=args.temperature,
        logits_loss=args.logits_loss, parameters={"teacher": parameters(teacher), "student": parameters(student)},
        labels=data.labels.described if data.labels is not None else None,
        labels_note=data.labels.warning if data.labels is not None else None, method=method,
        versions=library_versions(peft_config is not None),
    )


def held_out_comparison(trainer: DistillationTrainer, teacher: torch.nn.Module, data: Any, task: str,
                        same_tokenizer: bool, live: bool) -> dict[str, dict]:
    """The trained student's held-out distillation terms (`trainer.evaluate`) and the task metrics of student and
    teacher (into the card); across tokenizers the held-out tokens are the student's, so the teacher is not scored."""
    prompts_only = data.data_format == "prompt_only"
    if not prompts_only:
        logger.warning("Evaluating the student's distillation terms and teacher agreement on %d held-out rows.",
                       len(data.eval))
    student_eval = trainer.evaluate() if not prompts_only else {}
    if not live:  # the teacher only now runs: for the comparison
        teacher.to(trainer.args.device).eval()
    labelled = evaluates_labels(data, task)
    student_scores = evaluate_model(trainer.model, trainer, task, "student") if labelled else {}
    teacher_scores = (evaluate_model(teacher, trainer, task, "teacher") if same_tokenizer
                      else dict.fromkeys(student_scores)) if labelled else {}
    trainer.card_info.metrics = {k: {"teacher": teacher_scores[k], "student": student_scores[k]} for k in teacher_scores}
    if "eval_teacher_agreement" in student_eval:
        trainer.card_info.metrics["teacher agreement"] = {"teacher": 1.0,
                                                          "student": student_eval["eval_teacher_agreement"]}
    return {"teacher": teacher_scores, "student": student_scores, "eval": student_eval}


def report_table(trainer: DistillationTrainer, teacher: torch.nn.Module, model_args: ModelArguments,
                 args: DistillationConfig, scores: dict[str, dict], same_tokenizer: bool) -> dict[str, Any]:
    """The teacher-against-student table (sizes, held-out scores, agreement, dtype, speed), printed and written to
    the run's ``_report`` folder (which the Hub upload skips) by the main process; returns the job's summary."""
    student = trainer.model
    batch = next(iter(trainer.get_eval_dataloader()))
    batch = {k: v.to(args.device) for k, v in batch.items() if k != "labels" and torch.is_tensor(v)}
    speed = {"teacher": throughput(teacher, batch) if same_tokenizer else None, "student": throughput(student, batch)}
    teacher_size = folder_size(resolve_source(model_args.teacher) if not model_args.teacher_gguf_file else None)
    megabytes = {k: v / 1e6 if v else None for k, v in (("teacher", teacher_size),
                                                           ("student", folder_size(args.output_dir)))}
    teacher_scores, student_scores, student_eval = scores["teacher"], scores["student"], scores["eval"]
    rows: list[Row] = [
        ("layers", model_depth(teacher.config), model_depth(student.config), "{:d}"),
        ("parameters", parameters(teacher) / 1e6, parameters(student) / 1e6, "{:.1f}M"),
        ("size on disk", megabytes["teacher"], megabytes["student"], "{:.1f}MB"),
        *[(f"held-out {k}", teacher_scores[k], student_scores[k], "{:.4f}") for k in teacher_scores],
    ]
    if "eval_teacher_agreement" in student_eval:
        rows.append(("teacher agreement", 1.0, student_eval["eval_teacher_agreement"], "{:.4f}"))
    rows.append(("weights dtype", weights_dtype(teacher), weights_dtype(student), "{}"))
    rows.append((f"{args.device.type.upper()} examples/s (batch {len(next(iter(batch.values())))})",
                 speed["teacher"], speed["student"], SIGNIFICANT))
    shown = displayed(rows)
    summary = {"rows": shown, "teacher": teacher_scores, "student": student_scores, "eval": student_eval}
    if trainer.is_world_process_zero():
        table = ["", f"| {'':<30} | {'teacher':>10} | {'student':>10} |", f"|{'-' * 32}|{'-' * 12}|{'-' * 12}|"]
        table += [f"| {n:<30} | {t:>10} | {s:>10} |" for n, t, s in shown]
        print("\n".join(table))
        summary["report"] = write_report(os.path.join(args.output_dir, "_report"), rows, trainer.state.log_history,
                                         samples_history(trainer))
        print(f"\nstudent, tokenizer and model card in {args.output_dir}; report in {summary['report'][0]}")
    return summary


def save_merged(trainer: DistillationTrainer, tokenizer: Any, merged_dir: str) -> str:
    """The LoRA student with its adapters merged into the weights, saved as a plain model beside the adapters."""
    merged = trainer.model.merge_and_unload()
    with config_use_cache(merged, trainer.student_use_cache):
        merged.save_pretrained(merged_dir)
    tokenizer.save_pretrained(merged_dir)
    print(f"student with merged adapters (a plain model) in {merged_dir}")
    return merged_dir


def collapse_record(trainer: DistillationTrainer) -> list[str]:
    """Where the run flagged the student's samples (`samples`): on-policy logs and held-out samples, for the card."""
    collapsed = [row["step"] for row in trainer.state.log_history if row.get("completion_collapse")]
    found = [f"its on-policy samples at the logs of steps {collapsed}"] if collapsed else []
    return found + [f"its held-out samples at step {entry['step']}: " + "; ".join(entry["student_flags"])
                    for entry in samples_history(trainer) if entry.get("student_flags")]


def train_teacher_main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """``scripts/train_teacher.py`` / ``hf-distill train-teacher``: fine-tune `--teacher` (a backbone) on the task
    with the plain Trainer; saves model and tokenizer to `--output_dir`."""
    # DistillationConfig is a TrainingArguments: the recipes of `distill` work here too (their distillation fields are
    # simply unused by the plain Trainer)
    model_args, data_args, args = parse_distill_args(argv, prog="hf-distill train-teacher")
    resume, move_earlier = start_training_job(model_args, data_args, args, distilling=False)
    tokenizer, data = prepare_inputs(model_args, data_args, args, teacher_head_trained=False)
    model = load_model(model_args.teacher, model_args.task, data, model_args.teacher_gguf_file,
                       model_args.trust_remote_code)
    if move_earlier:
        move_aside_on_main(args)
    with hub_errors(args):
        trainer = Trainer(
            model=model, args=args, train_dataset=data.train, eval_dataset=data.eval, processing_class=tokenizer,
            data_collator=collator_for(model_args.task, tokenizer, args.seed, data),
            compute_metrics={"sequence-classification": accuracy_metrics,
                             "regression": regression_metrics}.get(model_args.task),
        )
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(args.output_dir, _internal_call=True)
    metrics = evaluate_model(model, trainer, model_args.task)
    if trainer.is_world_process_zero():
        print(f"teacher saved to {args.output_dir}; held-out " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    if args.push_to_hub:
        with hub_errors(args, pushing=True):
            trainer.push_to_hub()
    return metrics


def cache_teacher_main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``scripts/cache_teacher.py`` / ``hf-distill cache-teacher``: the teacher's top-k log-probabilities on the
    training split, tokenised and collated as `distill` does with the same flags (see `build_teacher_cache`); prints
    where the cache is, its size on disk and bytes per counted token."""
    model_args, data_args, cache_args = parse_distill_args(argv, (ModelArguments, DataArguments, CacheArguments),
                                                           prog="hf-distill cache-teacher")
    if cache_args.output_dir is None:
        raise ValueError("--output_dir is required: the folder the cache goes to.")
    check_not_generations(cache_args.output_dir)
    check_writable(cache_args.output_dir)
    check_teacher_tokenizer(model_args)
    if model_args.task == "masked-lm":
        raise ValueError("--task masked-lm cannot be cached: its collator masks other tokens every time, so the "
                         "counted positions change between caching and training. Use a live teacher.")
    if data_args.dataset and holds_teacher_cache(data_args.dataset):
        raise ValueError(f"{data_args.dataset} already holds the teacher's top-k (generated with --cache_top_k): "
                         f"distil from it directly with --teacher_cache {data_args.dataset}.")
    check_choice("teacher_dtype", cache_args.teacher_dtype, TEACHER_DTYPES, allow_none=True)
    device = torch.device(cache_args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = cache_args.teacher_dtype
    if model_args.fast_defaults:
        keep_freed_memory()
        advice = recommended_precision(device.type, dtype, task=model_args.task)
        dtype = advice.teacher_dtype
        logger.warning(f"Speed default (--fast_defaults false to turn off): {advice.reason}.")
    tokenizer, data = prepare_inputs(model_args, data_args, cache_args)
    teacher = load_model(model_args.teacher, model_args.task, data, model_args.teacher_gguf_file,
                         model_args.trust_remote_code)
    teacher.to(device)
    if dtype not in (None, "auto"):
        teacher.to(getattr(torch, dtype))
    path = build_teacher_cache(
        teacher, data.train, cache_args.output_dir, tokenizer=tokenizer, top_k=cache_args.top_k,
        temperature=cache_args.temperature, batch_size=cache_args.batch_size, shard_size=cache_args.shard_size,
        data_collator=collator_for(model_args.task, tokenizer, cache_args.seed, data),
        teacher_id=model_args.teacher,
        provenance={"data": data_record(data_args, cache_args.seed), **template_record(tokenizer)},
    )
    cache = load_teacher_cache(path, tokenizer)
    sizes = cache_size(path, cache)
    positions, on_disk, teacher_bytes = sizes["counted_positions"], sizes["bytes_on_disk"], sizes["teacher_bytes"]
    summary = {"path": path, "examples": len(cache), "counted_positions": positions, "bytes_on_disk": on_disk,
               "bytes_per_position": on_disk / max(positions, 1),
               "teacher_bytes_per_position": teacher_bytes / max(positions, 1)}
    size = f"{on_disk / 1e6:.1f} MB" if on_disk >= 1e6 else f"{on_disk / 1e3:.1f} kB"
    print(f"teacher cache in {path}: {len(cache)} examples, {positions} counted tokens, {size} on disk = "
          f"{summary['bytes_per_position']:.0f} B per counted token (teacher columns "
          f"{summary['teacher_bytes_per_position']:.0f} B at top_k={cache_args.top_k})")
    return summary


def generate_main(argv: Sequence[str] | None = None) -> str:
    """``hf-distill generate``: the teacher answers every prompt of the training split (`--dataset`, prompt-only:
    `prompt`, or `messages` ending in a user turn) and writes a prompt-completion dataset to distil on
    (`generate.generate_completions`); returns its folder."""
    model_args, data_args, settings = parse_distill_args(argv, (ModelArguments, DataArguments, GenerationArguments),
                                                         prog="hf-distill generate")
    if settings.output_dir is None:
        raise ValueError("--output_dir is required: the folder the generated dataset goes to.")
    if model_args.teacher is None:
        raise ValueError("--teacher is required: the model that answers the prompts.")
    if data_args.dataset is None:
        raise ValueError("--dataset is required: the prompts (a `prompt` column, or `messages` ending in a user turn).")
    check_not_a_cache(settings.output_dir)
    check_writable(settings.output_dir)
    check_teacher_tokenizer(model_args)
    raw = load_raw(dataset_path(data_args.dataset), data_args.dataset_config)
    if data_args.train_split not in raw:
        raise ValueError(f"The dataset has no split {data_args.train_split!r} (splits: {list(raw)}); set --train_split.")
    prompts = raw[data_args.train_split]
    if data_args.max_train_samples is not None:
        prompts = prompts.select(range(min(data_args.max_train_samples, len(prompts))))
    with caches_outside(data_args.dataset):
        prompts = as_turns(prompts, data_args)
    tokenizer = load_tokenizer(model_args)
    teacher = load_model(model_args.teacher, "causal-lm", None, model_args.teacher_gguf_file,
                         model_args.trust_remote_code)
    teacher.to(settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    folder = generate_completions(teacher, tokenizer, prompts, settings.output_dir, settings, model_args.teacher)
    print(f"generations in {folder}: distil on them with `hf-distill distill --dataset {folder} --task causal-lm`")
    return str(folder)
