"""Bad input, tried as a new user would: every case gets a clear error that names the problem and the fix, before
training, and leaves everything on disk as it was (the whole workspace is fingerprinted before and after).

`CASES` is the list `docs/reliability.md` is made from: ``python -m tests.test_reliability`` runs every case and
writes the table with the messages the user really sees; `test_bad_input_is_refused_and_nothing_changes` checks each
case's message against its row, so the table cannot drift from the code.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # (before huggingface_hub is imported: `python -m tests.test_reliability`)

import contextlib
import hashlib
import io
import math
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import datasets
import pytest
import torch

from hf_distill import DistillationConfig, DistillationTrainer

from .conftest import classification_dataset, tiny_bert, tiny_llama
from .llm_workspace import llm_cache, llm_distill, llm_generate, make_llm_workspace
from .tokenizer_kinds import byte_bpe

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "reliability.md"
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(55)]


# ---- the workspace: what a user has on disk ------------------------------------------------------------------------


def _texts(n: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(f"w{int(i)}" for i in torch.randint(0, 55, (int(k),), generator=g))
            for k in torch.randint(3, 10, (n,), generator=g)]


def save_teacher(folder: Path, num_labels: int = 2, id2label: dict[int, str] | None = None, seed: int = 1,
                 spread_over: list[str] | None = None) -> Path:
    """A tiny BERT classifier with its tokenizer; `spread_over`: texts whose mean logits the head's bias cancels, so
    that its predictions on them spread over the classes (a random head predicts one class for everything)."""
    from transformers import BertTokenizer

    teacher = tiny_bert(num_labels=num_labels, layers=4, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(WORDS))
    tokenizer = BertTokenizer(str(folder / "vocab.txt"))
    if spread_over:
        with torch.no_grad():
            logits = teacher.eval()(**tokenizer(spread_over, padding=True, return_tensors="pt")).logits
            teacher.classifier.bias.sub_(logits.mean(0))
            teacher.classifier.weight.mul_(10.0 / max(float(logits.std(0).mean()), 1e-6))
            teacher.classifier.bias.mul_(10.0 / max(float(logits.std(0).mean()), 1e-6))
    teacher.config.vocab_size = len(WORDS)
    if id2label:
        teacher.config.id2label, teacher.config.label2id = id2label, {v: k for k, v in id2label.items()}
    teacher.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_workspace(root: Path) -> Path:
    """Teachers (generic labels, named labels, a truncated one), data files, an earlier run, a file, recipes."""
    root.mkdir(parents=True, exist_ok=True)
    save_teacher(root / "teacher")
    save_teacher(root / "teacher-named", 3, {0: "pos", 1: "neu", 2: "neg"})
    shutil.copytree(root / "teacher", root / "teacher-broken")
    weights = root / "teacher-broken" / "model.safetensors"
    with open(weights, "r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)
    texts = _texts(40, 0)
    table = {
        "train.csv": ["good" if i % 2 else "bad" for i in range(40)],
        "three.csv": [["pos", "neu", "neg", "meh"][i % 4] for i in range(40)],
        "ints.csv": [[0, 1, 7][i % 3] for i in range(40)],
        "floats.csv": [[0.5, 1.0, 0.0][i % 3] for i in range(40)],
    }
    for name, labels in table.items():
        datasets.Dataset.from_dict({"sentence": texts, "label": labels}).to_csv(str(root / name), index=False)
    earlier = root / "earlier-run"
    (earlier / "checkpoint-7").mkdir(parents=True)
    (earlier / "checkpoint-7" / "model.safetensors").write_bytes(b"precious weights")
    (earlier / "adapter_config.json").write_text("{}")
    (root / "a-file.txt").write_text("not a folder")
    (root / "recipe-yes.yaml").write_text("save_strategy: yes\n")
    (root / "recipe-typo.yaml").write_text("temprature: 2.0\n")
    other = byte_bpe()  # a student of another tokenizer than the teachers' (cross-tokenizer cases)
    tiny_llama(vocab=len(other), layers=1).save_pretrained(root / "student-other-tokenizer")
    other.save_pretrained(root / "student-other-tokenizer")
    datasets.Dataset.from_dict({"sentence": texts[:6], "label": ["good", " ", "bad", "", "good", "bad"]}).to_json(
        str(root / "blank-labels.jsonl"))
    (root / "nan-targets.csv").write_text("sentence,label\n" + "".join(
        f"{t},{v}\n" for t, v in zip(texts[:6], ["0.5", "nan", "1.0", "0.2", "0.1", "0.9"])))
    datasets.Dataset.from_dict({"review": texts[:8]}).to_csv(str(root / "transfer-other-column.csv"), index=False)
    return make_llm_workspace(root)


def fingerprint(root: Path) -> dict[str, str]:
    """Every file and folder under `root` with its content hash: any change, addition or removal shows."""
    out = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        out[key] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return out


def base_argv(ws: Path, name: str, **changes: str | None) -> list[str]:
    """A tiny, valid `distill` command in the workspace; `changes` set (or, with None, drop) flags."""
    flags = {
        "teacher": str(ws / "teacher"), "student_layers": "2", "dataset": str(ws / "train.csv"),
        "text_column": "sentence", "output_dir": str(ws / f"out-{name}"), "max_steps": "2",
        "per_device_train_batch_size": "8", "report_to": "none", "save_strategy": "no", "use_cpu": "true",
        "disable_tqdm": "true",
    }
    flags.update(changes)
    argv = []
    for key, value in flags.items():
        if value is not None:
            argv += [f"--{key}", *value.split(" ")] if key != "teacher_route" else [f"--{key}", *value.split(",")]
    return argv


def distill(ws: Path, name: str, **changes: str | None) -> None:
    from hf_distill.cli.jobs import distill_main

    distill_main(base_argv(ws, name, **changes))


def train_teacher(ws: Path, name: str, **changes: str | None) -> None:
    from hf_distill.cli.jobs import train_teacher_main

    train_teacher_main(base_argv(ws, name, **{"student_layers": None, **changes}))


def api_trainer(ws: Path, name: str, data=None, model=None, **args) -> None:
    settings = dict(output_dir=str(ws / f"out-{name}"), report_to=[], use_cpu=True, save_strategy="no", max_steps=2,
                    per_device_train_batch_size=4, disable_tqdm=True)
    settings.update(args)
    trainer = DistillationTrainer(model=model or tiny_bert(layers=1), teacher_model=tiny_bert(),
                                  args=DistillationConfig(**settings),
                                  train_dataset=data if data is not None else classification_dataset())
    trainer.train()


def offline(run: Callable[[], None]) -> None:
    """`run` with the Hub in offline mode, as on a machine without network (HF_HUB_OFFLINE=1)."""
    import huggingface_hub.constants as constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        run()
    finally:
        constants.HF_HUB_OFFLINE = saved


def _labels(values) -> datasets.Dataset:
    data = classification_dataset(n=8)
    return data.remove_columns("labels").add_column("labels", values)


@dataclass(frozen=True)
class Case:
    """One bad input: its name, the issue item it belongs to, what the user did, how to do it, and a pattern the
    message must match."""

    name: str
    item: str
    what: str
    run: Callable[[Path], None]
    expect: str


CASES: list[Case] = [
    # 1. labels
    Case("label-unknown-to-the-teacher", "labels", "data label `meh`; the teacher's labels are pos / neu / neg",
          lambda ws: distill(ws, "l1", teacher=str(ws / "teacher-named"), dataset=str(ws / "three.csv")),
          r"Labels \['meh'\] .* not in the teacher's label set \['neg', 'neu', 'pos'\]"),
    Case("label-id-outside-the-teacher", "labels", "integer label 7 with a 3-class teacher",
          lambda ws: distill(ws, "l2", teacher=str(ws / "teacher-named"), dataset=str(ws / "ints.csv")),
          r"Labels \[7\] .* not among the teacher's 3 classes"),
    Case("more-labels-than-an-unnamed-teacher", "labels", "4 label names, an unnamed (LABEL_i) 2-class teacher",
          lambda ws: distill(ws, "l3", dataset=str(ws / "three.csv")),
          r"4 labels .* the teacher only 2 classes"),
    Case("float-labels-on-the-command-line", "labels", "labels 0.5 / 1.0 for sequence-classification",
          lambda ws: distill(ws, "l4", dataset=str(ws / "floats.csv")),
          r"class names or integer ids, got 0.5.*--task regression"),
    Case("api-label-outside-num-labels", "labels", "Python API: label 5 for a 3-class student",
          lambda ws: api_trainer(ws, "l5", data=_labels([0, 1, 5, 2, 1, 0, 2, 1])),
          r"labels \[5\] outside \[0, 3\)"),
    Case("api-float-labels", "labels", "Python API: float labels for a classifier",
          lambda ws: api_trainer(ws, "l6", data=_labels([0.0, 1.5, 2.0, 1.0, 0.0, 2.0, 1.0, 0.0])),
          r"holds floats .*\(floats would be truncated\)"),
    # 2. non-finite settings
    Case("temperature-inf", "non-finite", "`--temperature inf`",
          lambda ws: distill(ws, "n1", temperature="inf"), r"temperature=inf: settings must be finite"),
    Case("hidden-weight-inf", "non-finite", "`--hidden_weight inf`",
          lambda ws: distill(ws, "n2", hidden_weight="inf"), r"hidden_weight=inf: settings must be finite"),
    Case("logits-weight-nan", "non-finite", "`--logits_weight nan`",
          lambda ws: distill(ws, "n3", logits_weight="nan"), r"logits_weight=nan: settings must be finite"),
    Case("learning-rate-nan", "non-finite", "`--learning_rate nan`",
          lambda ws: distill(ws, "n4", learning_rate="nan"), r"learning_rate=nan: settings must be finite"),
    Case("api-temperature-inf", "non-finite", "Python API: `DistillationConfig(temperature=math.inf)`",
          lambda ws: api_trainer(ws, "n5", temperature=math.inf), r"temperature=inf: settings must be finite"),
    Case("temperature-zero", "non-finite", "`--temperature 0`",
          lambda ws: distill(ws, "n6", temperature="0"), r"temperature must be > 0"),
    Case("negative-weight", "settings", "`--logits_weight -1`",
          lambda ws: distill(ws, "n7", logits_weight="-1"), r"Loss weights must be >= 0"),
    Case("all-weights-zero", "settings", "`--task_weight 0 --logits_weight 0`",
          lambda ws: distill(ws, "n8", task_weight="0", logits_weight="0"), r"All loss weights are zero"),
    Case("jsd-beta-outside", "settings", "`--jsd_beta 2`",
          lambda ws: distill(ws, "n9", jsd_beta="2"), r"jsd_beta must lie in \[0, 1\]"),
    # 3. text silently dropped
    Case("text-column-2-causal-lm", "dropped text", "`--task causal-lm --text_column_2 completion` (the completion "
         "column of prompt-completion data) on data without it",
          lambda ws: distill(ws, "t1", task="causal-lm", text_column_2="completion"),
          r"Column 'completion' is not in the dataset .*point --text_column_2 at the right one"),
    Case("text-column-2-masked-lm", "dropped text", "`--task masked-lm --text_column_2 ...`",
          lambda ws: distill(ws, "t2", task="masked-lm", text_column_2="label"),
          r"masked-lm run would train on --text_column alone"),
    # 7. output folders
    Case("output-dir-holds-an-earlier-run", "output folder", "`--output_dir` with an earlier run's checkpoints",
          lambda ws: distill(ws, "o1", output_dir=str(ws / "earlier-run")),
          r"already holds an earlier run \(adapter_config.json, checkpoint-7\).*--overwrite_output_dir true"),
    Case("train-teacher-into-an-earlier-run", "output folder", "`train-teacher --output_dir` with an earlier run",
          lambda ws: train_teacher(ws, "o2", output_dir=str(ws / "earlier-run")),
          r"already holds an earlier run .*--resume_from_checkpoint true"),
    Case("api-train-into-checkpoints", "output folder",
          "Python API: `trainer.train()` into a folder with `checkpoint-*` folders",
          lambda ws: api_trainer(ws, "o3", output_dir=str(ws / "earlier-run")),
          r"already holds an earlier run \(checkpoint-7\).*train\(resume_from_checkpoint=True\).*overwrite_output_dir=True"),
    Case("output-dir-is-a-file", "output folder", "`--output_dir` naming an existing file",
          lambda ws: distill(ws, "o4", output_dir=str(ws / "a-file.txt")), r"is a file, not a folder"),
    Case("resume-true-without-checkpoints", "output folder", "`--resume_from_checkpoint true`, nothing to resume",
          lambda ws: distill(ws, "o5", resume_from_checkpoint="true"), r"holds no checkpoint-\* folder to resume"),
    Case("resume-from-a-missing-folder", "output folder", "`--resume_from_checkpoint ./nowhere`",
          lambda ws: distill(ws, "o6", resume_from_checkpoint=str(ws / "nowhere")), r"no such checkpoint folder"),
    # 8. the Hub
    Case("push-without-network", "hub", "`--push_to_hub true` with no network (HF_HUB_OFFLINE=1)",
          lambda ws: offline(lambda: distill(ws, "h1", push_to_hub="true", hub_model_id="me/student")),
          r"cannot create the Hub repo 'me/student' .*Check the network, your token.*Nothing was trained"),
    # 9. flags and messages
    Case("teacher-folder-missing", "flags", "`--teacher runs/nowhere/teacher` (a typo in the path)",
          lambda ws: distill(ws, "f1", teacher=str(ws / "runs" / "nowhere")), r"--teacher '.*nowhere': no such folder"),
    Case("teacher-is-a-file", "flags", "`--teacher` naming a file",
          lambda ws: distill(ws, "f2", teacher=str(ws / "a-file.txt")), r"--teacher '.*a-file.txt' is a file"),
    Case("student-folder-missing", "flags", "`--student ./nowhere`",
          lambda ws: distill(ws, "f3", student_layers=None, student=str(ws / "nowhere")),
          r"--student '.*nowhere': no such folder"),
    Case("student-layers-zero", "flags", "`--student_layers 0`",
          lambda ws: distill(ws, "f4", student_layers="0"), r"--student_layers must be at least 1"),
    Case("student-and-student-layers", "flags", "`--student X --student_layers 2`",
          lambda ws: distill(ws, "f5", student=str(ws / "teacher")), r"either --student .* or --student_layers"),
    Case("truncated-teacher-weights", "flags", "a truncated `model.safetensors` in the teacher folder",
          lambda ws: distill(ws, "f6", teacher=str(ws / "teacher-broken")),
          r"weights file .*teacher-broken/model.safetensors cannot be read .*truncated or corrupt"),
    Case("max-length-negative", "flags", "`--max_length -1`",
          lambda ws: distill(ws, "f7", max_length="-1"), r"--max_length must be a positive number, got -1"),
    Case("max-length-zero", "flags", "`--max_length 0`",
          lambda ws: distill(ws, "f8", max_length="0"), r"--max_length must be a positive number, got 0"),
    Case("block-size-zero", "flags", "`--block_size 0`",
          lambda ws: distill(ws, "f9", block_size="0"), r"--block_size must be a positive number"),
    Case("max-train-samples-zero", "flags", "`--max_train_samples 0`",
          lambda ws: distill(ws, "f10", max_train_samples="0"), r"--max_train_samples must be a positive number"),
    Case("eval-fraction-one", "flags", "`--eval_fraction 1`",
          lambda ws: distill(ws, "f11", eval_fraction="1"), r"--eval_fraction must lie in \(0, 1\)"),
    Case("yaml-unquoted-yes", "flags", "a recipe with `save_strategy: yes` (YAML's true)",
          lambda ws: distill(ws, "f12", config=str(ws / "recipe-yes.yaml")), r"save_strategy: YAML reads an unquoted"),
    Case("yaml-unknown-option", "flags", "a recipe with a typo (`temprature: 2.0`)",
          lambda ws: distill(ws, "f13", config=str(ws / "recipe-typo.yaml")), r"Unknown option\(s\) in .*temprature"),
    Case("yaml-missing", "flags", "`--config` naming a missing file",
          lambda ws: distill(ws, "f14", config=str(ws / "nowhere.yaml")), r"Config file .* does not exist"),
    Case("route-anchor-missing", "flags", "`--teacher_route` with a missing checkpoint folder",
          lambda ws: distill(ws, "f15", teacher_route=f"{ws / 'teacher'},{ws / 'nowhere' / 'ckpt'}"),
          r"--teacher_route '.*nowhere/ckpt': no such folder"),
    Case("route-and-cache", "flags", "`--teacher_route` together with `--teacher_cache`",
          lambda ws: distill(ws, "f16", teacher_route=str(ws / "teacher"), teacher_cache=str(ws / "teacher")),
          r"--teacher_route and --teacher_cache are two different teachers"),
    Case("no-teacher", "flags", "no `--teacher`",
          lambda ws: distill(ws, "f17", teacher=None), r"--teacher is required"),
    Case("dataset-file-missing", "data", "`--dataset ./nowhere.csv`",
          lambda ws: distill(ws, "d1", dataset=str(ws / "nowhere.csv")), r"Dataset file .*nowhere.csv' does not exist"),
    Case("text-column-missing", "data", "`--text_column review` (not in the data)",
          lambda ws: distill(ws, "d2", text_column="review"), r"Column 'review' is not in the dataset.*--text_column"),
    Case("label-column-missing-with-task-loss", "data", "no label column, task loss on",
          lambda ws: distill(ws, "d3", label_column="stars"), r"Column 'stars' is not in the dataset.*--label_column"),
    Case("transfer-set-without-a-teacher-term", "data", "`--transfer_dataset` (unlabelled rows) with only the task "
         "loss on", lambda ws: distill(ws, "d4", transfer_dataset=str(ws / "train.csv"), logits_weight="0"),
          r"only the teacher's terms learn from them, and none is on: set --logits_weight"),
    Case("transfer-set-for-a-language-model", "data", "`--task causal-lm --transfer_dataset ...`",
          lambda ws: distill(ws, "d5", task="causal-lm", transfer_dataset=str(ws / "train.csv")),
          r"--transfer_dataset is for classifiers .*hf-distill generate"),
    Case("transfer-set-for-train-teacher", "data", "`train-teacher --transfer_dataset ...`",
          lambda ws: train_teacher(ws, "d6", transfer_dataset=str(ws / "train.csv")),
          r"only a teacher can label: it belongs to `hf-distill distill`"),
    Case("packing-classification-data", "data", "`--packing true` on classification data",
          lambda ws: distill(ws, "d7", packing="true"), r"--packing joins chat or prompt-completion rows"),
    Case("lmbda-outside", "on-policy", "`--lmbda 1.5`",
          lambda ws: distill(ws, "p1", lmbda="1.5"), r"lmbda must lie in \[0, 1\]"),
    Case("on-policy-classifier", "on-policy", "`--lmbda 1` with a sequence classifier",
          lambda ws: distill(ws, "p2", lmbda="1"), r"only causal LMs write: use --task causal-lm"),
    Case("on-policy-teacher-cache", "on-policy", "`--lmbda 0.5 --teacher_cache cache/`",
          lambda ws: distill(ws, "p3", task="causal-lm", lmbda="0.5", teacher_cache=str(ws / "cache")),
          r"teacher_cache cannot score .*set --lmbda 0"),
    Case("api-on-policy-without-prompts", "on-policy", "Python API: `lmbda=1` on a classifier (no prompts, no "
         "tokenizer)", lambda ws: api_trainer(ws, "p4", lmbda=1.0), r"only a causal LM writes"),
    Case("cross-tokenizer-classifier", "cross-tokenizer", "`--student S` whose tokenizer differs from the teacher's, "
         "on a classification task", lambda ws: distill(ws, "x1", student_layers=None,
                                                       student=str(ws / "student-other-tokenizer")),
         r"another tokenizer than the teacher's, so this is a cross-tokenizer run, which cannot use: --task "
         r"sequence-classification"),
    Case("cross-tokenizer-token-loss", "cross-tokenizer", "`--student S` of another tokenizer, `--task causal-lm` "
         "with the default `--logits_loss forward_kl`",
         lambda ws: distill(ws, "x2", student_layers=None, task="causal-lm",
                            student=str(ws / "student-other-tokenizer")),
         r"cannot use: --logits_loss forward_kl \(it compares ids token by token: use hybrid or uld\)"),
    # LLM modes (Reliability II): rows past the context
    Case("generate-past-the-context", "context", "`generate` with a teacher of 24 positions and `--max_new_tokens 60`",
         lambda ws: llm_generate(ws, "g1", teacher=str(ws / "chat-teacher-24"), max_new_tokens="60"),
         r"prompts plus --max_new_tokens 60 exceed the teacher's context of 24 positions .*lower --max_new_tokens"),
    Case("rows-past-the-context", "context", "`distill` chat rows of up to 56 tokens with a teacher of 24 positions",
         lambda ws: llm_distill(ws, "c1", teacher=str(ws / "chat-teacher-24")),
         r"training rows are longer than the teacher's context of 24 positions .*Pass --max_length 24"),
    Case("rows-past-a-gpt2-context", "context", "`distill` with a GPT-2 teacher of 32 positions (`n_positions`)",
         lambda ws: llm_distill(ws, "c2", teacher=str(ws / "gpt2-32")),
         r"longer than the teacher's context of 32 positions"),
    # what made a cache or generations
    Case("generations-of-another-template", "manifests", "generations written with a ChatML template, `distill` with a "
         "teacher of the same vocabulary and a Llama-3 template",
         lambda ws: llm_distill(ws, "m1", teacher=str(ws / "llama-template-teacher"), dataset=str(ws / "generations")),
         r"rendered with another chat template .*--teacher_tokenizer"),
    Case("cache-of-another-teacher", "manifests", "`--teacher_cache` built from one teacher, `--teacher` naming "
         "another",
         lambda ws: llm_distill(ws, "m2", temperature="1", teacher=str(ws / "chat-teacher-other-weights"),
                                teacher_cache=str(ws / "cache")),
         r"cache was built from another teacher than --teacher \(weights \w+ there"),
    Case("cache-of-another-max-length", "manifests", "cache built with `--max_length 128`, `distill --max_length 20`",
         lambda ws: llm_distill(ws, "m3", temperature="1", teacher_cache=str(ws / "cache"), max_length="20"),
         r"other data flags than this run's \(max_length: 128 there, 20 in this run\).*--max_length 128"),
    Case("cache-of-another-seed", "manifests", "cache built with `--seed 42`, `distill --seed 7`",
         lambda ws: llm_distill(ws, "m4", temperature="1", teacher_cache=str(ws / "cache"), seed="7"),
         r"seed: 42 there, 7 in this run"),
    Case("cache-without-packing", "manifests", "cache built without `--packing`, `distill --packing true`",
         lambda ws: llm_distill(ws, "m5", temperature="1", teacher_cache=str(ws / "cache"), packing="true"),
         r"packing: False there, True in this run.*--packing false"),
    Case("cache-of-another-eval-split", "manifests", "cache built with `--eval_fraction 0.25`, `distill "
         "--eval_fraction 0.5`", lambda ws: llm_distill(ws, "m6", temperature="1", teacher_cache=str(ws / "cache"),
                                                       eval_fraction="0.5"),
         r"eval_fraction: 0.25 there, 0.5 in this run"),
    Case("cache-of-another-data-file", "manifests", "cache built from `chat.jsonl`, `distill --dataset "
         "chat-other.jsonl`", lambda ws: llm_distill(ws, "m8", temperature="1", teacher_cache=str(ws / "cache"),
                                                    dataset=str(ws / "chat-other.jsonl")),
         r"holds other training rows than these data flags give .*dataset: '.*chat.jsonl' there"),
    Case("generations-cache-cut-on-the-left", "manifests", "a generation-pass cache read with `--truncation_side left "
         "--max_length 6`", lambda ws: llm_distill(ws, "m7", temperature="1", dataset=str(ws / "generations"),
                                                   teacher_cache=str(ws / "generations"), truncation_side="left",
                                                   max_length="6"),
         r"--truncation_side left would cut the start of its prompt"),
    # the teacher's tokenizer
    Case("teacher-tokenizer-larger-than-the-teacher", "tokenizer", "`--teacher_tokenizer` with 30 tokens for a "
         "teacher of 24 embedding rows",
         lambda ws: llm_distill(ws, "t1", teacher_tokenizer=str(ws / "tokenizer-too-big")),
         r"has 30 tokens, more than the teacher's 24 embedding rows"),
    Case("teacher-tokenizer-of-other-words", "tokenizer", "`--teacher_tokenizer` of the same size, its words at other "
         "ids", lambda ws: llm_distill(ws, "t2", teacher_tokenizer=str(ws / "tokenizer-other-words")),
         r"tokenises text differently from the tokenizer in the teacher's folder"),
    # on-policy estimator without samples
    Case("sampled-token-without-samples", "on-policy", "`--logits_loss sampled_token` with `--lmbda 0`, no `--seq_kd`",
         lambda ws: llm_distill(ws, "s1", logits_loss="sampled_token", temperature="1"),
         r"sampled_token' is an on-policy estimator .*Set --lmbda"),
    # chat rows
    Case("empty-assistant-answers", "chat rows", "conversations half of whose assistant turns are empty",
         lambda ws: llm_distill(ws, "e1", dataset=str(ws / "empty-answers.jsonl")),
         r"12 of 24 rows \(50%\) have an empty answer"),
    Case("jsonl-broken-line", "data", "a jsonl whose 4th line is cut off",
         lambda ws: llm_distill(ws, "e2", dataset=str(ws / "broken.jsonl")), r"broken.jsonl as json: line 4: "),
    Case("jsonl-duplicate-keys", "data", "a jsonl line naming `messages` twice",
         lambda ws: llm_distill(ws, "e3", dataset=str(ws / "duplicate-keys.jsonl")),
         r"line 3: the key\(s\) \['messages'\] appear twice"),
    Case("blank-string-labels", "labels", "classification labels `' '` and `''` in a jsonl",
         lambda ws: distill(ws, "e4", dataset=str(ws / "blank-labels.jsonl")),
         r"\d of \d+ training rows have a blank or missing label in column 'label'"),
    Case("nan-regression-labels", "labels", "`--task regression` with a `nan` target",
         lambda ws: distill(ws, "e5", task="regression", dataset=str(ws / "nan-targets.csv")),
         r"non-finite \(NaN, inf\) label in column 'label'"),
    Case("transfer-set-without-the-text-column", "data", "`--transfer_dataset` whose text is in another column",
         lambda ws: distill(ws, "e6", transfer_dataset=str(ws / "transfer-other-column.csv")),
         r"Column 'sentence' is not in the --transfer_dataset"),
    Case("cache-teacher-into-generations", "folders", "`cache-teacher --output_dir` naming a generations folder",
         lambda ws: llm_cache(ws, "generations"), r"holds generations \(written by `hf-distill generate`\), not a"),
    Case("generate-into-a-cache", "folders", "`generate --output_dir` naming a teacher cache",
         lambda ws: llm_generate(ws, "cache"), r"holds a teacher cache \(written by `hf-distill cache-teacher`\)"),
    Case("asset-name-unknown", "data", "`--dataset asset:nope`",
         lambda ws: llm_distill(ws, "k1", dataset="asset:nope"), r"--dataset 'asset:nope': Unknown asset 'nope'"),
    Case("dataset-is-a-teacher-cache", "folders", "`--dataset` naming a teacher cache folder",
         lambda ws: llm_distill(ws, "k2", dataset=str(ws / "cache")),
         r"holds a teacher cache .*not a dataset \(pass it as --teacher_cache"),
    Case("teacher-is-a-generations-folder", "folders", "`--teacher` naming a generations folder",
         lambda ws: llm_distill(ws, "k3", teacher=str(ws / "generations")),
         r"--teacher '.*generations' holds generations .*not a model"),
    Case("prompt-only-conversations-off-policy", "chat rows", "conversations that all end with a user turn, "
         "`--lmbda 0`", lambda ws: llm_distill(ws, "k4", dataset=str(ws / "prompts.jsonl")),
         r"this is prompt_only data .*hf-distill generate.*lmbda=1"),
    # resuming
    Case("resume-with-another-temperature", "resume", "`--resume_from_checkpoint true` with `--temperature 3`",
         lambda ws: llm_distill(ws, "resumable", resume_from_checkpoint="true", temperature="3"),
         r"other settings than the run that wrote it: temperature: 2.0 there, 3.0 in this run.*--resume_with_changes"),
    Case("resume-with-another-student", "resume", "`--resume_from_checkpoint true` with `--student_layers 2` (was 1)",
         lambda ws: llm_distill(ws, "resumable", resume_from_checkpoint="true", student_layers="2",
                                shrink_strategy="uniform"),
         r"student num_hidden_layers: 1 there, 2 in this run.*resume with the same student"),
    Case("resume-with-other-data", "resume", "`--resume_from_checkpoint true` with `--max_train_samples 10`",
         lambda ws: llm_distill(ws, "resumable", resume_from_checkpoint="true", max_train_samples="10"),
         r"training rows: other rows there"),
    # output folders that cannot be written
    Case("distill-into-an-unwritable-folder", "output folder", "`distill --output_dir a-file.txt/out`",
         lambda ws: llm_distill(ws, "w1", output_dir=str(ws / "a-file.txt" / "out")),
         r"--output_dir '.*a-file.txt/out' cannot be created: .* is a file"),
    Case("train-teacher-into-an-unwritable-folder", "output folder", "`train-teacher --output_dir a-file.txt/out`",
         lambda ws: train_teacher(ws, "w2", output_dir=str(ws / "a-file.txt" / "out")), r"cannot be created"),
    Case("cache-teacher-into-an-unwritable-folder", "output folder", "`cache-teacher --output_dir a-file.txt/out`",
         lambda ws: llm_cache(ws, "a-file.txt/out"), r"cannot be created"),
    Case("generate-into-an-unwritable-folder", "output folder", "`generate --output_dir a-file.txt/out`",
         lambda ws: llm_generate(ws, "a-file.txt/out"), r"cannot be created"),
    Case("unknown-task", "flags", "`--task translation`",
          lambda ws: distill(ws, "a1", task="translation"), r"argument --task: invalid choice: 'translation'"),
    Case("unknown-on-nonfinite", "flags", "`--on_nonfinite ignore`",
          lambda ws: distill(ws, "a2", on_nonfinite="ignore"), r"argument --on_nonfinite/--on-nonfinite: invalid choice"),
    Case("unknown-logits-loss", "flags", "`--logits_loss kl`",
          lambda ws: distill(ws, "a3", logits_loss="kl"), r"argument --logits_loss/--logits-loss: invalid choice: 'kl'"),
]


def run_case(case: Case, ws: Path) -> str:
    """Run a case; the message the user sees (argparse's for its own refusals), with the workspace path as <ws>."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            case.run(ws)
    except SystemExit:
        message = stderr.getvalue().strip().splitlines()[-1]
    except Exception as error:  # noqa: BLE001 - what the user sees is the point
        message = str(error)
    else:
        raise AssertionError(f"{case.name}: no error")
    return " ".join(message.replace(str(ws), "<ws>").split())


def table(messages: dict[str, str]) -> str:
    """docs/reliability.md: one row per case, in `CASES` order."""
    rows = ["# Reliability: bad input and what the user sees", "",
            "Generated by `python -m tests.test_reliability` from the test suite's own list of cases "
            "(`tests/test_reliability.py::CASES`); `test_bad_input_is_refused_and_nothing_changes` runs every case, "
            "checks that the message below is the one the user sees and that nothing on disk changed (every file "
            "and folder of the workspace hashed before and after). `<ws>` stands for the workspace folder. The "
            "command line shows each message as one line, `hf-distill distill: error: <message>`, exit code 2 "
            "(argparse's own refusals: its usage line and the message).", "",
            f"{len(CASES)} cases.", "",
            "| case | item | bad input | what the user sees | on disk |", "|---|---|---|---|---|"]
    for case in CASES:
        message = messages[case.name].replace("|", "\\|")
        rows.append(f"| `{case.name}` | {case.item} | {case.what} | {message} | unchanged |")
    return "\n".join(rows) + "\n"


def documented() -> dict[str, str]:
    rows = {}
    for line in DOC.read_text().splitlines() if DOC.exists() else []:
        found = re.match(r"\| `([^`]+)` \| [^|]* \| .*? \| (.*) \| unchanged \|$", line)
        if found:
            rows[found.group(1)] = found.group(2).replace("\\|", "|")
    return rows


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("reliability") / "ws")


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_is_refused_and_nothing_changes(case, workspace):
    before = fingerprint(workspace)
    message = run_case(case, workspace)
    assert re.search(case.expect, message), message
    assert fingerprint(workspace) == before
    assert documented().get(case.name) == message, (
        f"docs/reliability.md is out of date for {case.name}: run `python -m tests.test_reliability`")


def test_the_table_lists_every_case_and_no_other():
    assert len(CASES) >= 40 and len({case.name for case in CASES}) == len(CASES)
    assert list(documented()) == [case.name for case in CASES]


def main() -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        ws = make_workspace(Path(folder) / "ws")
        messages = {case.name: run_case(case, ws) for case in CASES}
    DOC.write_text(table(messages))
    print(f"wrote {DOC} ({len(CASES)} cases)", file=sys.stderr)


if __name__ == "__main__":
    main()
