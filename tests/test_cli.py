"""The command line: argument parsing and YAML precedence, local datasets of every format, clear errors, the model
card, an end-to-end tiny run whose student loads with from_pretrained and pipeline, and the Hub upload intercepted."""

from __future__ import annotations

import fnmatch
import json
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import datasets
import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertTokenizer, pipeline

from hf_distill import DistillationConfig
from hf_distill.cli import ModelArguments, parse_distill_args
from hf_distill.data.loading import DataArguments, load_raw, prepare_datasets, split_dataset
from hf_distill.storage.hub import CardInfo, model_card

from .conftest import tiny_bert

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(55)]


@pytest.fixture
def tokenizer(tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join(WORDS))
    return BertTokenizer(str(tmp_path / "vocab.txt"))


def _rows(n: int = 40, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(0, 55, (int(k),), generator=g))
             for k in torch.randint(3, 10, (n,), generator=g)]
    labels = ["good" if int(t.split()[0][1:]) % 2 else "bad" for t in texts]  # both classes in every split
    return texts, labels


# ---- arguments -------------------------------------------------------------------------------------------------


def test_flags_override_the_yaml_recipe(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("teacher: some/teacher\nstudent_layers: 3\ntemperature: 4.0\nhidden_weight: 1.0\n"
                      "layer_map: [[1, 2], [2, 4]]\nteacher_route: null\noutput_dir: from-yaml\nreport_to: none\n")
    model, data, args = parse_distill_args(["--config", str(recipe), "--temperature", "2.5", "--dataset", "x.csv",
                                            "--use_cpu", "true"])
    assert isinstance(args, DistillationConfig) and isinstance(model, ModelArguments) and isinstance(data, DataArguments)
    assert model.teacher == "some/teacher" and model.student_cut()[0] == 3 and data.dataset == "x.csv"
    assert args.temperature == 2.5  # the flag wins
    assert args.hidden_weight == 1.0 and args.output_dir == "from-yaml"
    assert json.loads(args.layer_map) == [[1, 2], [2, 4]]



def test_union_valued_options_and_trl_names_parse(tmp_path):
    """A union-valued option takes its word ("auto") or its number from a flag, and pairs from a recipe; TRL's
    `beta` is the JSD interpolation, as a flag and as a recipe key."""
    base = ["--teacher", "t", "--output_dir", str(tmp_path / "o"), "--use_cpu", "true"]
    *_, args = parse_distill_args(base + ["--logits_chunk_size", "512", "--beta", "0.3"])
    assert args.logits_chunk_size == 512 and isinstance(args.logits_chunk_size, int) and args.jsd_beta == 0.3
    *_, args = parse_distill_args(base)  # the defaults survive the union handling
    assert args.logits_chunk_size == "auto" and args.layer_map == "auto" and args.jsd_beta == 0.5
    *_, args = parse_distill_args(base + ["--layer_map", "1:2,2:4"])
    assert args.layer_map == "1:2,2:4"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("teacher: t\nbeta: 0.2\nlogits_chunk_size: 0\nuse_cpu: true\n"
                      f"output_dir: {tmp_path / 'o'}\n")
    *_, args = parse_distill_args(["--config", str(recipe)])
    assert args.jsd_beta == 0.2 and args.logits_chunk_size == 0

def test_bad_recipes_and_flags_raise_clear_errors(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("teacher: t\ntemprature: 2.0\n")
    with pytest.raises(ValueError, match="Unknown option\\(s\\) in .*temprature"):
        parse_distill_args(["--config", str(recipe)])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        parse_distill_args(["--config", str(tmp_path / "missing.yaml")])
    with pytest.raises(SystemExit):  # argparse: invalid choice
        parse_distill_args(["--task", "translation", "--output_dir", str(tmp_path)])


def test_help_lists_every_field():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "distill.py"), "--help"], capture_output=True,
                            text=True, cwd=ROOT, env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    for cls in (ModelArguments, DataArguments, DistillationConfig):
        for f in fields(cls):
            if f.init and not f.name.startswith("_"):
                assert f"--{f.name}" in result.stdout, f.name
    assert "--config" in result.stdout


# ---- data -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".json", ".jsonl", ".parquet", ".txt"])
def test_local_files_of_every_format_load(tmp_path, suffix):
    texts, labels = _rows(6)
    table = datasets.Dataset.from_dict({"text": texts, "label": labels})
    path = tmp_path / f"data{suffix}"
    if suffix == ".csv":
        table.to_csv(str(path), index=False)
    elif suffix == ".tsv":
        table.to_csv(str(path), index=False, sep="\t")
    elif suffix in (".json", ".jsonl"):
        table.to_json(str(path))
    elif suffix == ".parquet":
        table.to_parquet(str(path))
    else:
        path.write_text("\n".join(texts) + "\n")
    loaded = load_raw(str(path))["train"]
    assert loaded["text"] == texts
    if suffix != ".txt":
        assert loaded["label"] == labels


def test_unreadable_and_missing_files_raise_clear_errors(tmp_path):
    (tmp_path / "data.xlsx").write_text("not a spreadsheet")
    with pytest.raises(ValueError, match="unknown file type '.xlsx'"):
        load_raw(str(tmp_path / "data.xlsx"))
    (tmp_path / "broken.parquet").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="Cannot read .*broken.parquet as parquet"):
        load_raw(str(tmp_path / "broken.parquet"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_raw(str(tmp_path / "nope.csv"))


def test_preparation_maps_labels_packs_text_and_names_missing_columns(tokenizer):
    texts, labels = _rows(30)
    raw = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts, "label": labels})})
    train, held_out = split_dataset(raw, DataArguments(eval_fraction=0.2), seed=0)
    assert len(train) == 24 and len(held_out) == 6
    prepared = prepare_datasets("sequence-classification", train, held_out, tokenizer, DataArguments())
    assert prepared.id2label == {0: "bad", 1: "good"} and prepared.num_labels == 2
    assert set(prepared.train["labels"]) <= {0, 1} and "input_ids" in prepared.train.column_names

    packed = prepare_datasets("causal-lm", train, held_out, tokenizer, DataArguments(block_size=8))
    assert all(len(ids) == 8 for ids in packed.train["input_ids"])
    total = sum(len(tokenizer(t)["input_ids"]) for t in train["text"])
    assert len(packed.train) == total // 8  # every full block of the concatenated text, the remainder dropped

    with pytest.raises(ValueError, match="Column 'review' is not in the dataset.*--text_column"):
        prepare_datasets("sequence-classification", train, held_out, tokenizer, DataArguments(text_column="review"))
    with pytest.raises(ValueError, match="Column 'stars' is not in the dataset.*--label_column"):
        prepare_datasets("regression", train, held_out, tokenizer, DataArguments(label_column="stars"))
    with pytest.raises(ValueError, match="Unknown task 'translation'"):
        prepare_datasets("translation", train, held_out, tokenizer, DataArguments())


# ---- the model card -----------------------------------------------------------------------------------------------


def test_model_card_names_teacher_layers_losses_data_and_metrics():
    info = CardInfo(teacher="bert-base-uncased", kept_layers=[0, 2, 4, 7, 9, 11], teacher_layers=12,
                    task="sequence-classification", dataset="imdb",
                    loss_weights={"task_weight": 0.5, "logits_weight": 0.5, "hidden_weight": 1.0,
                                  "attention_weight": 0.0},
                    temperature=2.0, logits_loss="forward_kl",
                    metrics={"accuracy": {"teacher": 0.93, "student": 0.91}})
    card = model_card(info)
    front = card.split("---")[1]
    assert "base_model: bert-base-uncased" in front and "- distillation" in front and "- hf-distill" in front
    assert "- imdb" in front and "pipeline_tag: text-classification" in front
    assert "[0, 2, 4, 7, 9, 11]" in card and "(12 layers)" in card
    assert "0.5 * task + 0.5 * logits + 1 * hidden" in card and "attention" not in card.split("## Evaluation")[0]
    assert "`forward_kl` at temperature 2" in card
    assert "| accuracy | 0.9300 | 0.9100 |" in card
    local = model_card(CardInfo(teacher="/tmp/my-teacher"))
    assert "base_model" not in local  # local folders are not Hub ids


# ---- end to end, and the upload -----------------------------------------------------------------------------------


@pytest.fixture
def tiny_run(tmp_path, tokenizer):
    teacher_dir = tmp_path / "teacher"
    teacher = tiny_bert(num_labels=2, layers=4, seed=1)
    teacher.config.vocab_size = len(WORDS)
    teacher.save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    texts, labels = _rows(40)
    csv = tmp_path / "train.csv"
    datasets.Dataset.from_dict({"sentence": texts, "label": labels}).to_csv(str(csv), index=False)
    return [
        "--teacher", str(teacher_dir), "--student_layers", "2", "--dataset", str(csv), "--text_column", "sentence",
        "--output_dir", str(tmp_path / "student"), "--max_steps", "3", "--per_device_train_batch_size", "8",
        "--report_to", "none", "--save_strategy", "no", "--use_cpu", "true", "--logging_steps", "1",
        "--hidden_weight", "1.0", "--disable_tqdm", "true",
    ]


def test_distill_command_end_to_end(tiny_run, tmp_path):
    from hf_distill.cli.jobs import distill_main

    summary = distill_main(tiny_run)
    out = tmp_path / "student"
    assert {"config.json", "model.safetensors", "README.md", "tokenizer_config.json"} <= set(os.listdir(out))
    assert (out / "_report" / "report.md").is_file() and (out / "_report" / "report.png").is_file()
    report = (out / "_report" / "report.md").read_text()
    assert "hidden_loss" in report and "held-out accuracy" in report
    card = (out / "README.md").read_text()
    assert "keeping teacher layers [0, 2]" in card and "- hf-distill" in card
    assert summary["student"]["accuracy"] == pytest.approx(
        next(float(s) for n, t, s in summary["rows"] if n == "held-out accuracy"), abs=1e-4)

    reloaded = AutoModelForSequenceClassification.from_pretrained(out)
    assert reloaded.config.distilled_from_layers == [0, 2] and reloaded.config.id2label == {0: "bad", 1: "good"}
    classify = pipeline("text-classification", model=str(out), device="cpu")
    assert classify("w1 w2 w3")[0]["label"] in {"bad", "good"}

    # `hf-distill evaluate` on the quickstart's kind of student: the same held-out accuracy by its own computation
    from hf_distill.cli.evaluate import evaluate_main

    data = tiny_run[tiny_run.index("--dataset") + 1]
    scores = evaluate_main(["--task", "sequence-classification", "--student", str(out), "--teacher",
                            tiny_run[tiny_run.index("--teacher") + 1], "--dataset", data, "--text_column", "sentence",
                            "--output_dir", str(tmp_path / "evaluation")])["scores"]
    assert scores["student"]["accuracy"] == pytest.approx(summary["student"]["accuracy"])
    assert scores["teacher"]["accuracy"] == pytest.approx(summary["teacher"]["accuracy"])
    assert 0 <= scores["student"]["teacher_agreement"] <= 1 and scores["student"]["examples_per_second"] > 0
    assert "type: accuracy" in (out / "README.md").read_text()


def test_push_to_hub_uploads_the_student_and_its_card_only(tiny_run, tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import RepoUrl

    from hf_distill.cli.jobs import distill_main

    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = repo_id
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, ignore_patterns=(), **kwargs):
        files = [str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file()]
        kept = [f for f in files if not any(fnmatch.fnmatch(f, pattern) or fnmatch.fnmatch(f.split("/")[0], pattern)
                                            for pattern in ignore_patterns)]
        calls["upload"] = (repo_id, sorted(kept), (Path(folder_path) / "README.md").read_text())

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    distill_main([*tiny_run, "--push_to_hub", "true", "--hub_model_id", "me/tiny-student", "--hub_token", "hf_x"])
    repo, uploaded, card = calls["upload"]
    assert calls["create_repo"] == "me/tiny-student" and repo == "me/tiny-student"
    assert {"config.json", "model.safetensors", "README.md"} <= set(uploaded)
    assert not any(f.startswith(("_report", "checkpoint-")) for f in uploaded)  # the report stays local
    assert "- distillation" in card and "keeping teacher layers [0, 2]" in card and "| accuracy |" in card


def test_distill_script_runs_as_two_processes(tiny_run, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2 scripts/distill.py ...` on CPU (gloo): one student, one report,
    held-out metrics over the whole evaluation set."""
    from .test_distributed import _free_port

    launcher = Path(sys.executable).parent / "accelerate"
    if not launcher.exists():
        pytest.skip("accelerate's launcher is not installed next to this Python")
    command = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
               str(ROOT / "scripts" / "distill.py"), *tiny_run]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = tmp_path / "student"
    assert (out / "model.safetensors").is_file() and (out / "_report" / "report.md").is_file()
    assert result.stdout.count("| held-out accuracy") == 1  # only the main process prints and writes
    log = result.stdout + result.stderr
    assert log.count("Method: off-policy") == 1 and log.count("Student: 2 of the teacher's 4 layers") == 1  # once
    assert "find_unused_parameters" not in log  # (a cut of the teacher uses every parameter: DDP is told so)
    eval_accuracy = float(result.stdout.split("'eval_accuracy': '")[1].split("'")[0])
    student_row = next(line for line in result.stdout.splitlines() if line.startswith("| held-out accuracy"))
    assert float(student_row.split("|")[3]) == pytest.approx(eval_accuracy, abs=1e-3)  # gathered over both processes


def test_lora_self_distillation_from_the_command_line(tiny_run, tmp_path):
    from hf_distill.cli.jobs import distill_main

    argv = [a for a in tiny_run]
    i = argv.index("--student_layers")
    del argv[i: i + 2]
    argv[argv.index("--hidden_weight") + 1] = "0.0"
    summary = distill_main([*argv, "--use_peft", "true", "--lora_r", "4", "--lora_target_modules", "query", "value",
                            "--merge_adapters", "true"])
    out = tmp_path / "student"
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(os.listdir(out))
    merged = AutoModelForSequenceClassification.from_pretrained(summary["merged"])
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert merged.config.use_cache is True  # (as the student was loaded, not the Trainer's training value False)
    assert next(float(t) for n, t, s in summary["rows"] if n == "held-out accuracy") >= 0
