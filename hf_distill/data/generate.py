"""Sequence-level KD data (Kim & Rush 2016): the teacher answers every prompt, and its answers become a
prompt-completion dataset the student is then distilled on (`hf-distill generate`, then `hf-distill distill`).

Prompts are a string (`prompt`) or a list of turns (`prompt`, or `messages` ending in a user turn), rendered with the
chat template and its generation prompt. Generation is batched with left padding. It is written in shards: each shard
is saved whole and renamed into place, and a manifest (teacher, tokenizer hash, settings, shards) is rewritten after
each. A killed run resumes at the first missing shard, and every shard draws from its own seed ``seed + shard index``,
so a resumed run writes the same shards as an uninterrupted one. A folder holding another teacher's (or other
settings') shards is refused, never overwritten.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteriaList, set_seed
from transformers.utils import logging

from ..checks.options import SAMPLERS, check_choice
from ..modeling import context_length, unwrap, weights_fingerprint
from ..storage.files import PARTIAL_SUFFIX, atomic_path, atomic_write_bytes
from .chat import detect_rows_format, end_completion, left_padded, prompt_ids, stop_ids
from .provenance import folder_kind, template_record
from .sampler import TokenTicker, decode, packed_once, uses_decode
from .samples import CAPPED_WARN, check_collapse, completion_stats
from .teacher_cache import (
    CACHE_COLUMNS,
    CACHE_FEATURES,
    MANIFEST_MARKER,
    cache_settings,
    tokenizer_hash,
    topk_targets,
)

logger = logging.get_logger(__name__)

MANIFEST_FILE = "manifest.json"
KIND = "hf_distill.generations"


@dataclass
class GenerationArguments:
    """How the teacher answers the prompts (`hf-distill generate`)."""

    output_dir: str | None = field(default=None, metadata={"help": "Folder of the generated dataset (created; a "
                                                                   "run there with the same settings is resumed)."})
    max_new_tokens: int = field(default=256, metadata={"help": "Most tokens generated per answer."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature; 0 for greedy decoding."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling: keep the smallest set of tokens of this "
                                                        "probability mass (1.0: all)."})
    num_return_sequences: int = field(default=1, metadata={"help": "Answers per prompt."})
    batch_size: int = field(default=8, metadata={"help": "Prompts per generate() call."})
    shard_size: int = field(default=256, metadata={"help": "Prompts per shard (the unit of resuming)."})
    seed: int = field(default=42, metadata={"help": "Shard k samples with seed + k."})
    device: str | None = field(default=None, metadata={"help": "Where the teacher runs (default: cuda if available)."})
    sampler: str = field(default="auto", metadata={"help": "What draws the answers: 'decode' (our loop, data.sampler), "
                                                           "'generate', 'auto' (decode on a CPU; the same distribution).",
                                                   "choices": list(SAMPLERS)})
    cache_top_k: int = field(default=0, metadata={"help": "Also store the teacher's top-k log-probabilities at every "
                                                          "generated token, from its raw logits (the teacher-cache "
                                                          "format; 0: off). Distil with --teacher_cache on the folder."})
    cache_temperature: float = field(default=1.0, metadata={"help": "The distillation temperature of those "
                                                                    "log-probabilities: log softmax(z / T)."})

    def __post_init__(self) -> None:
        check_choice("sampler", self.sampler, SAMPLERS)
        for name in ("max_new_tokens", "num_return_sequences", "batch_size", "shard_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be a positive number, got {getattr(self, name)}.")
        if self.cache_top_k < 0 or not self.cache_temperature > 0:
            raise ValueError(f"--cache_top_k must be >= 0 (0: off) and --cache_temperature > 0, got {self.cache_top_k} "
                             f"and {self.cache_temperature}.")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"--temperature must be >= 0 and --top_p in (0, 1], got {self.temperature} and "
                             f"{self.top_p}.")

    def settings(self) -> dict[str, Any]:
        """What decides the shards (compared when resuming)."""
        return {k: v for k, v in asdict(self).items() if k not in ("output_dir", "device", "batch_size", "sampler")}


def _draw(model: Any, ids: torch.Tensor, mask: torch.Tensor, settings: GenerationArguments, stops: list[int],
          pad: int, bar: Any) -> tuple[list[list[int]], Any]:
    """The new tokens of each answer and, with `cache_top_k`, each step's raw logits ``[rows, V]``: by the decode
    loop (`sampler.decode`; `generate_completions` packs the linear layers once for the pass) where
    `sampler.uses_decode` says so, else `generate`
    (which applies the model's own top-k when it sets one: the decode loop does too)."""
    ticker = TokenTicker(bar, settings.max_new_tokens) if bar is not None else None
    sampling = settings.temperature > 0
    if uses_decode(model, settings.sampler, ids.device):
        steps: list[torch.Tensor] = []
        keep = (lambda seq, logits: steps.append(logits)) if settings.cache_top_k else None
        top_k = (getattr(unwrap(model).generation_config, "top_k", None) or 0) if sampling else 0
        new = decode(model, ids, mask, settings.max_new_tokens, tuple(stops), pad, settings.temperature, top_k,
                     settings.top_p, settings.num_return_sequences, observe=keep, stopping=ticker)
        return new.tolist(), steps
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=settings.max_new_tokens, do_sample=sampling,
        temperature=settings.temperature if sampling else None, top_p=settings.top_p if sampling else None,
        num_return_sequences=settings.num_return_sequences, eos_token_id=stops, pad_token_id=pad,
        return_dict_in_generate=True, output_logits=settings.cache_top_k > 0,
        stopping_criteria=StoppingCriteriaList([ticker]) if ticker is not None else None,
    )
    return out.sequences[:, ids.shape[1]:].tolist(), out.logits


def prompts_of(dataset: datasets.Dataset) -> list[Any]:
    """The prompts of a dataset, its format detected as `distill` detects it (`chat.detect_rows_format`): prompt-only
    data (`prompt`, strings or turns, or `messages` whose every conversation ends with a user turn), or the prompts of
    prompt-completion rows (their completions are not used: the teacher writes new ones)."""
    try:
        found = detect_rows_format(dataset)
    except ValueError:
        found = None
    if found == "prompt_completion":
        logger.warning("The data has prompts and completions: the teacher answers the prompts; the %d completions "
                       "there are not used.", len(dataset))
    if found in ("prompt_only", "prompt_completion"):
        return list(dataset["prompt" if "prompt" in dataset.column_names else "messages"])
    if found == "messages":
        raise ValueError("Prompt-only `messages` must end with a user turn (the teacher writes the answer); these "
                         "conversations hold answers already: distil on them directly, or drop their last answers.")
    raise ValueError(f"Generation needs prompts: a `prompt` column or `messages` ending in a user turn; the dataset "
                     f"has {dataset.column_names} (for a plain text column of questions: --prompt_column NAME, "
                     "optionally with --system_prompt).")


@torch.no_grad()
def _answer(model: Any, tokenizer: Any, prompts: list[Any], settings: GenerationArguments, stops: list[int],
            pad: int, bar: Any = None) -> tuple[list[dict[str, Any]], int]:
    """The teacher's answers to `prompts` (num_return_sequences each, in order) and the tokens it generated. Each
    answer: its text, the prompt's and the completion's token ids (the completion ends with the stop token when one was
    generated) and, with `cache_top_k`, the teacher-cache columns of its completion tokens: the top-k
    ``log softmax(z / T)`` of the raw logits that chose each token (before any temperature / top-p warping)."""
    device = next(model.parameters()).device
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    ids, mask = left_padded(encoded, pad, device)
    rows, logits = _draw(model, ids, mask, settings, stops, pad, bar)
    answers, generated = [], 0
    for index, row in enumerate(rows):
        completion = end_completion(row, stops)
        generated += len(completion)
        ended = bool(completion) and completion[-1] in stops
        answer = {"text": tokenizer.decode(completion[:-1] if ended else completion, skip_special_tokens=True).strip(),
                  "prompt_ids": encoded[index // settings.num_return_sequences], "completion_ids": completion}
        if settings.cache_top_k:
            raw = torch.stack([step[index] for step in logits[: len(completion)]])  # [n, V]: step s chose token s
            top_ids, top_logprobs, tails = topk_targets(raw, settings.cache_top_k, settings.cache_temperature)
            answer.update({CACHE_COLUMNS[0]: top_ids.reshape(-1).tolist(),
                           CACHE_COLUMNS[1]: top_logprobs.reshape(-1).tolist(), CACHE_COLUMNS[2]: tails.tolist()})
        answers.append(answer)
    return answers, generated


def _check_manifest(manifest: dict[str, Any], expected: dict[str, Any], folder: Path) -> None:
    different = [k for k in ("teacher", "tokenizer_hash", "settings", "num_prompts", "prompts_fingerprint")
                 if manifest.get(k) != expected[k]]
    if manifest.get("kind") != KIND or different:
        raise ValueError(
            f"{folder} already holds generations of another run (different: {', '.join(different) or 'kind'}): "
            "give a new --output_dir, or delete that folder to regenerate."
        )


def check_not_a_cache(folder: str | Path) -> None:
    """`generate` writes into a new folder or one of its own runs: a teacher cache's folder is named as such."""
    if folder_kind(folder) == "teacher_cache":
        raise ValueError(f"--output_dir {folder} holds a teacher cache (written by `hf-distill cache-teacher`), not "
                         "generations: give `generate` a new --output_dir.")


def generate_completions(model: Any, tokenizer: Any, prompts_dataset: datasets.Dataset, output_dir: str,
                         settings: GenerationArguments, teacher_id: str | None = None) -> Path:
    """Answer every prompt with `model` and write a prompt-completion dataset to `output_dir` (see the module
    docstring); returns the folder. Conversational prompts get ``[{"role": "assistant", "content": answer}]``
    completions, string prompts string completions."""
    prompts = prompts_of(prompts_dataset)
    conversational = not isinstance(prompts[0], str)
    folder = Path(output_dir)
    manifest = _open_generations(model, tokenizer, prompts, folder, settings, teacher_id, conversational)
    manifest_file = folder / MANIFEST_FILE
    stops, pad = stop_ids(tokenizer, conversational), tokenizer.pad_token_id
    pad = pad if pad is not None else stops[0]
    model.eval()
    done = sum(s["num_prompts"] for s in manifest["shards"])
    start_time, tokens, written = time.perf_counter(), 0, []
    rows_per_call = settings.batch_size * settings.num_return_sequences
    with tqdm(total=len(prompts), initial=done, desc="Generating", unit="prompt") as bar, \
            packed_once(model, rows_per_call, settings.sampler):
        while done < len(prompts):
            index, end = len(manifest["shards"]), min(done + settings.shard_size, len(prompts))
            set_seed(settings.seed + index)
            rows: dict[str, list[Any]] = {}
            for batch_start in range(done, end, settings.batch_size):
                batch = prompts[batch_start: min(batch_start + settings.batch_size, end)]
                answers, generated = _answer(model, tokenizer, batch, settings, stops, pad, bar)
                tokens += generated
                written += [a["completion_ids"] for a in answers]
                for i, answer in enumerate(answers):
                    text = answer.pop("text")
                    answer["prompt"] = batch[i // settings.num_return_sequences]
                    answer["completion"] = [{"role": "assistant", "content": text}] if conversational else text
                    for key, value in answer.items():
                        rows.setdefault(key, []).append(value)
                bar.rate = f", {tokens / max(time.perf_counter() - start_time, 1e-9):.1f} tokens/s"
                bar.update(len(batch))
            name = f"shard-{index:05d}"
            with atomic_path(folder / name) as partial:
                datasets.Dataset.from_dict(rows, features=_features(rows, settings)).save_to_disk(partial)
            manifest["shards"].append({"name": name, "num_prompts": end - done, "num_rows": len(rows["prompt"])})
            done = end
            manifest["complete"] = done == len(prompts)
            atomic_write_bytes(manifest_file, json.dumps(manifest, indent=2).encode())
    seconds = time.perf_counter() - start_time
    logger.warning("Generated answers to %d prompts: %d new tokens in %.1f s (%.1f tokens/s); written to %s.",
                   len(prompts), tokens, seconds, tokens / max(seconds, 1e-9), folder)
    if written:
        check_answers(written, stops, settings.max_new_tokens)
    return folder


def _open_generations(model: Any, tokenizer: Any, prompts: list[Any], folder: Path, settings: GenerationArguments,
                      teacher_id: str | None, conversational: bool) -> dict[str, Any]:
    """The manifest of the generations in `folder`: an earlier run's, checked to be the same teacher, tokenizer,
    template, settings and prompts (its whole shards are kept, half-written ones removed), or a new one for an empty
    folder; a non-empty folder without generations is refused."""
    expected = {
        "kind": KIND, "teacher": teacher_id or getattr(model.config, "_name_or_path", None),
        "tokenizer_hash": tokenizer_hash(tokenizer), "settings": settings.settings(), "num_prompts": len(prompts),
        "prompts_fingerprint": hashlib.sha256(json.dumps(prompts, sort_keys=True).encode()).hexdigest(),
        "shards": [], "complete": False,
    }
    if conversational:  # the rows are rendered with this template; a run with another one is refused
        expected.update(template_record(tokenizer))
    if settings.cache_top_k:
        expected["vocab_size"] = _vocab_size(model)
        expected["teacher_weights"] = weights_fingerprint(model)
        if settings.cache_top_k >= expected["vocab_size"]:
            raise ValueError(f"--cache_top_k {settings.cache_top_k} must be smaller than the teacher's "
                             f"{expected['vocab_size']} outputs (the tail is the mass outside the top k).")
    check_fits_context(model, tokenizer, prompts, settings.max_new_tokens)
    manifest_file = folder / MANIFEST_FILE
    check_not_a_cache(folder)
    if manifest_file.is_file():
        manifest = json.loads(manifest_file.read_text())
        _check_manifest(manifest, expected, folder)
    elif folder.exists() and any(folder.iterdir()):
        raise ValueError(f"{folder} is not empty and holds no generations: give a new --output_dir.")
    else:
        manifest = expected
    folder.mkdir(parents=True, exist_ok=True)
    for leftover in folder.glob(f"*{PARTIAL_SUFFIX}"):
        shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()  # a shard a killed run left half-written
    return manifest


def check_answers(answers: list[list[int]], stops: list[int], max_new_tokens: int) -> dict[str, float]:
    """Logs what the teacher wrote (`samples.completion_stats` of this run's answers) and warns when more than
    `samples.CAPPED_WARN` of them hit `max_new_tokens` without a stop token (cut mid-answer: the student learns to stop
    nowhere) or when they degenerate (`samples.collapse_reasons`, absolute thresholds)."""
    stats = completion_stats(answers, stops, max_new_tokens)
    logger.warning("The answers: %.1f tokens on average, %.0f%% stopped by --max_new_tokens %d without a stop token, "
                   "distinct-2 %.2f, repeated 4-grams %.0f%%.", stats["mean_length"], 100 * stats["capped_share"],
                   max_new_tokens, stats["distinct_2"], 100 * stats["repeated_4gram_share"])
    if stats["capped_share"] > CAPPED_WARN:
        logger.warning("%d of %d answers (%.0f%%) hit --max_new_tokens %d without a stop token: they end mid-answer, "
                       "and a student distilled on them learns answers that do not end. Raise --max_new_tokens (or "
                       "ask for shorter answers in the prompt or --system_prompt).", round(stats["capped_share"] *
                       len(answers)), len(answers), 100 * stats["capped_share"], max_new_tokens)
    check_collapse(stats, None, "warn", "the teacher's answers", "A student distilled on them learns them: check the "
                   "prompts, the chat template and --temperature, or use a stronger teacher.")
    return stats


def check_fits_context(model: Any, tokenizer: Any, prompts: list[Any], max_new_tokens: int) -> None:
    """Every prompt plus `max_new_tokens` must fit the teacher's context (`modeling.context_length`): positions past
    it are ones the model never learnt (or has no embedding for), and the rows would train a student on them."""
    context = context_length(model)
    if context is None:
        return
    lengths = [len(prompt_ids(tokenizer, p)) for p in prompts]
    longest = max(lengths, default=0)
    if longest + max_new_tokens > context:
        over = sum(n + max_new_tokens > context for n in lengths)
        raise ValueError(
            f"{over} of {len(prompts)} prompts plus --max_new_tokens {max_new_tokens} exceed the teacher's context of "
            f"{context} positions (the longest prompt has {longest} tokens): lower --max_new_tokens to at most "
            f"{max(context - longest, 0)}, or drop the longer prompts (--max_train_samples, or filter the data)."
        )


def _vocab_size(model: Any) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


def _features(rows: dict[str, list[Any]], settings: GenerationArguments) -> datasets.Features:
    """The shard's column types: inferred, with the token ids as int32 and the cache columns as the teacher cache
    stores them (`teacher_cache.CACHE_FEATURES`)."""
    inferred = datasets.Dataset.from_dict({k: v[:1] for k, v in rows.items()}).features
    features = {**inferred, "prompt_ids": datasets.Sequence(datasets.Value("int32")),
                "completion_ids": datasets.Sequence(datasets.Value("int32"))}
    if settings.cache_top_k:
        features.update(CACHE_FEATURES)
    return datasets.Features(features)


def generations_cache_manifest(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The teacher-cache manifest of a generations folder made with `cache_top_k` (None without): what
    `teachers.CachedTeacher` checks (temperature, tokenizer, vocabulary size)."""
    settings = manifest.get("settings", {})
    if not settings.get("cache_top_k"):
        return None
    return {**cache_settings(manifest.get("teacher"), manifest.get("tokenizer_hash"), manifest.get("vocab_size"),
                             settings["cache_top_k"], settings["cache_temperature"]),
            "dataset_fingerprint": None, "complete": True, "made_by": KIND,
            **{k: manifest[k] for k in ("teacher_weights", "chat_template", "end_of_turn") if k in manifest}}


def read_generations_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a generations folder."""
    return json.loads((Path(path) / MANIFEST_FILE).read_text())


def holds_teacher_cache(path: str | Path) -> bool:
    """Whether `path` is a generations folder written with the teacher's top-k (`cache_top_k`)."""
    return is_generations(path) and generations_cache_manifest(read_generations_manifest(path)) is not None


def is_generations(path: str | Path) -> bool:
    """Whether `path` is a folder written by `generate_completions`."""
    file = Path(path) / MANIFEST_FILE
    return file.is_file() and json.loads(file.read_text()).get("kind") == KIND


def load_generations(path: str | Path) -> datasets.Dataset:
    """The prompt-completion dataset in a generations folder (its shards in order); refuses an unfinished one."""
    folder = Path(path)
    manifest = read_generations_manifest(folder)
    if not manifest.get("complete"):
        raise ValueError(f"{folder} holds an unfinished generation run: run `hf-distill generate` again with the "
                         "same settings to finish it.")
    dataset = datasets.concatenate_datasets([datasets.load_from_disk(str(folder / s["name"])) for s in manifest["shards"]])
    cache = generations_cache_manifest(manifest)
    if cache is not None:  # read by `teacher_cache.cache_manifest` once the rows are tokenised (`chat.tokenize_row`)
        dataset.info.description = MANIFEST_MARKER + json.dumps(cache)
    return dataset


def check_generations_tokenizer(path: str | Path, tokenizer: Any) -> None:
    """Generations store token ids: they mean the same tokens only to the tokenizer that wrote them, and
    conversational rows were rendered with its chat template, ending each answer with its end-of-turn token (which
    the student is saved to stop at: `chat.chat_generation_config`)."""
    manifest = read_generations_manifest(path)
    if manifest.get("tokenizer_hash") not in (None, tokenizer_hash(tokenizer)):
        raise ValueError(f"The generations in {path} were written with another tokenizer (teacher "
                         f"{manifest.get('teacher')!r}): their token ids mean other tokens. Distil with the teacher's "
                         "tokenizer (same vocabulary), or generate again with this one.")
    if manifest.get("chat_template") is None:
        return
    mine = template_record(tokenizer)
    if mine["chat_template"] != manifest["chat_template"]:
        raise ValueError(
            f"The generations in {path} were rendered with another chat template (teacher {manifest.get('teacher')!r}: "
            f"template {manifest['chat_template']}, end of turn {manifest.get('end_of_turn')!r}) than this run's "
            f"tokenizer (template {mine['chat_template']}, end of turn {mine['end_of_turn']!r}): the student would "
            "learn one end of turn and be saved to stop at the other. Distil with the tokenizer that wrote them "
            f"(--teacher_tokenizer {manifest.get('teacher')}), or generate again with this teacher."
        )
