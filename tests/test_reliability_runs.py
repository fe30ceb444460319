"""Runs that used to end "successfully" with a wrong student or lost work, now right: labels in the teacher's order,
unlabelled transfer data, earlier runs moved aside (never deleted), resume from the last checkpoint, the push last and
once, the command line's one-line errors, the teacher route from the command line and `--help` grouped."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys

import datasets
import pytest
from transformers import AutoModelForSequenceClassification, pipeline

from .test_reliability import ROOT, _texts, base_argv, save_teacher


@pytest.fixture
def ws(tmp_path):
    return tmp_path


def _run(argv):
    from hf_distill.cli.jobs import distill_main

    return distill_main(argv)


def test_labels_map_to_the_teachers_own_ids(ws):
    """A teacher labelled {0: pos, 1: neu, 2: neg} scores 1.0 on data labelled by its own pipeline; the sorted order of
    the data's names (neg, neu, pos) would swap pos and neg and report far less."""
    texts = _texts(60, 3)
    teacher = save_teacher(ws / "teacher", 3, {0: "pos", 1: "neu", 2: "neg"}, seed=5, spread_over=texts)
    classify = pipeline("text-classification", model=str(teacher), device="cpu")
    labels = [row["label"] for row in classify(texts)]
    assert {"pos", "neg"} <= set(labels)  # the order matters for this teacher
    datasets.Dataset.from_dict({"sentence": texts, "label": labels}).to_csv(str(ws / "data.csv"), index=False)
    summary = _run(base_argv(ws, "s", teacher=str(teacher), dataset=str(ws / "data.csv"), eval_fraction="0.5"))
    assert summary["teacher"]["accuracy"] == 1.0
    student = AutoModelForSequenceClassification.from_pretrained(ws / "out-s")
    assert student.config.id2label == {0: "pos", 1: "neu", 2: "neg"}
    assert "- labels: 'pos' -> 0, 'neu' -> 1, 'neg' -> 2" in (ws / "out-s" / "README.md").read_text()


def test_a_teacher_without_label_names_gets_the_sorted_labels_with_a_warning(ws, caplog):
    save_teacher(ws / "teacher")
    texts = _texts(40, 0)
    datasets.Dataset.from_dict({"sentence": texts, "label": ["good" if i % 2 else "bad" for i in range(40)]}).to_csv(
        str(ws / "data.csv"), index=False)
    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            _run(base_argv(ws, "s", teacher=str(ws / "teacher"), dataset=str(ws / "data.csv")))
    finally:
        hf_logging.disable_propagation()
    assert "labels have no names (LABEL_0, LABEL_1, ...)" in caplog.text and "'bad' -> 0, 'good' -> 1" in caplog.text
    card = (ws / "out-s" / "README.md").read_text()
    assert "- labels: 'bad' -> 0, 'good' -> 1 (assumed: The teacher's labels have no names" in card


def test_unlabelled_transfer_data_distils_with_the_task_loss_off(ws):
    save_teacher(ws / "teacher")
    datasets.Dataset.from_dict({"sentence": _texts(40, 1)}).to_csv(str(ws / "plain.csv"), index=False)
    summary = _run(base_argv(ws, "s", teacher=str(ws / "teacher"), dataset=str(ws / "plain.csv"), task_weight="0"))
    names = [name for name, _, _ in summary["rows"]]
    assert "teacher agreement" in names and not any(name.startswith("held-out") for name in names)
    assert 0.0 <= summary["eval"]["eval_teacher_agreement"] <= 1.0
    assert (ws / "out-s" / "model.safetensors").is_file()


def test_overwrite_moves_the_earlier_run_aside_and_leaves_no_stale_file(ws):
    save_teacher(ws / "teacher")
    datasets.Dataset.from_dict({"sentence": _texts(40, 0), "label": ["a", "b"] * 20}).to_csv(str(ws / "d.csv"),
                                                                                           index=False)
    out = ws / "out-s"
    (out / "checkpoint-3").mkdir(parents=True)
    (out / "checkpoint-3" / "model.safetensors").write_bytes(b"earlier")
    (out / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    _run(base_argv(ws, "s", teacher=str(ws / "teacher"), dataset=str(ws / "d.csv"), overwrite_output_dir="true"))
    aside = [p for p in ws.iterdir() if p.name.startswith("out-s.before-")]
    assert len(aside) == 1
    assert (aside[0] / "checkpoint-3" / "model.safetensors").read_bytes() == b"earlier"
    assert (aside[0] / "adapter_config.json").is_file() and not (out / "adapter_config.json").exists()
    student = AutoModelForSequenceClassification.from_pretrained(out)
    assert not any("lora" in name for name, _ in student.named_parameters())


def test_make_demo_recipes_move_an_earlier_run_aside():
    from hf_distill.cli import parse_distill_args

    for recipe in ("quickstart-teacher.yaml", "quickstart.yaml"):
        _, _, args = parse_distill_args(["--config", str(ROOT / "configs" / recipe)])
        assert args.overwrite_output_dir is True and args.save_strategy == "no"


def test_resume_true_picks_the_last_checkpoint(ws):
    from hf_distill import DistillationConfig
    from hf_distill.cli.models import resume_checkpoint

    for step in (2, 10, 4):
        (ws / "run" / f"checkpoint-{step}").mkdir(parents=True)
    args = DistillationConfig(output_dir=str(ws / "run"), resume_from_checkpoint="true", report_to=[], use_cpu=True)
    assert resume_checkpoint(args) == str(ws / "run" / "checkpoint-10")
    args.resume_from_checkpoint = "false"
    assert resume_checkpoint(args) is None


def test_yaml_unquoted_no_means_the_choice_no(ws):
    from hf_distill.cli import parse_distill_args

    (ws / "r.yaml").write_text("save_strategy: no\neval_strategy: no\nbf16: no\n")
    _, _, args = parse_distill_args(["--config", str(ws / "r.yaml"), "--output_dir", str(ws / "o"), "--use_cpu",
                                     "true"])
    assert args.save_strategy == "no" and args.eval_strategy == "no" and args.bf16 is False


def test_help_puts_the_distillation_options_first_and_names_the_command():
    from hf_distill.cli import parse_distill_args

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        parse_distill_args(["--help"])
    text = out.getvalue()
    assert text.startswith("usage: hf-distill distill [--config FILE.yaml]")
    distillation, training = text.index("distillation (DistillationConfig):"), text.index(
        "training (transformers.TrainingArguments):")
    assert distillation < text.index("--temperature") < text.index("--on_nonfinite") < training
    assert training < text.index("--learning_rate") and training < text.index("--per_device_train_batch_size")


def test_the_push_comes_last_once_and_a_failed_push_keeps_everything(ws, monkeypatch):
    import huggingface_hub
    from huggingface_hub import RepoUrl

    save_teacher(ws / "teacher")
    datasets.Dataset.from_dict({"sentence": _texts(40, 0), "label": ["a", "b"] * 20}).to_csv(str(ws / "d.csv"),
                                                                                           index=False)
    uploads = []

    def upload_folder(self, *, folder_path, **kwargs):
        uploads.append(sorted(os.listdir(folder_path)))
        if len(uploads) > 1:
            raise ConnectionError("503 Service Unavailable")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                        lambda self, repo_id, **kw: RepoUrl(f"https://huggingface.co/{repo_id}"))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    argv = base_argv(ws, "s", teacher=str(ws / "teacher"), dataset=str(ws / "d.csv"), push_to_hub="true",
                     hub_model_id="me/s")
    _run(argv)
    assert len(uploads) == 1 and "_report" in uploads[0] and "README.md" in uploads[0]  # written before the push
    with pytest.raises(ValueError, match=r"uploading to 'me/s' failed \(503.*Everything is on disk in .*out-t"):
        _run(base_argv(ws, "t", teacher=str(ws / "teacher"), dataset=str(ws / "d.csv"), push_to_hub="true",
                       hub_model_id="me/s"))
    assert (ws / "out-t" / "_report" / "report.md").is_file() and (ws / "out-t" / "model.safetensors").is_file()


def test_teacher_route_works_from_the_command_line(ws, monkeypatch):
    import hf_distill.cli.jobs as pipeline_module
    from hf_distill import DistillationTrainer

    made = []

    class Recording(DistillationTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(pipeline_module, "DistillationTrainer", Recording)
    early, late = save_teacher(ws / "early", seed=3), save_teacher(ws / "late", seed=4)
    datasets.Dataset.from_dict({"sentence": _texts(40, 0), "label": ["a", "b"] * 20}).to_csv(str(ws / "d.csv"),
                                                                                           index=False)
    summary = _run(base_argv(ws, "s", teacher=str(late), dataset=str(ws / "d.csv"), teacher_route=f"{early},{late}",
                             max_steps="4", logging_steps="1"))
    anchors = [row["teacher_anchor"] for row in made[0].state.log_history if "teacher_anchor" in row]
    assert anchors == [0, 0, 1, 1]
    assert made[0].teacher_source.route.paths == [str(early), str(late)] and "accuracy" in summary["teacher"]


def test_command_line_errors_are_one_line_with_exit_code_2(ws):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "distill.py"), "--teacher", str(ws / "nowhere"),
                             "--dataset", "x.csv", "--output_dir", str(ws / "o"), "--temperature", "inf"],
                            capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if "error:" in line or "Traceback" in line]
    assert lines == ["hf-distill distill: error: temperature=inf: settings must be finite numbers (NaN or infinity "
                     "make every loss and weight of the student NaN, or silently drop a term). Give finite values."]
    assert not (ws / "o").exists()


def test_the_label_check_reads_the_rows_the_dataset_holds(make_args):
    """A label outside [0, num_labels) in a row that `select` dropped is not the training set's: accepted; one that
    remains is refused."""
    from hf_distill import DistillationTrainer

    from .conftest import classification_dataset, tiny_bert

    data = classification_dataset(n=8).remove_columns("labels").add_column("labels", [0, 1, 2, 9, 1, 0, 2, 1])
    DistillationTrainer(model=tiny_bert(layers=1), teacher_model=tiny_bert(), args=make_args(),
                        train_dataset=data.select([0, 1, 2, 4, 5]))
    with pytest.raises(ValueError, match=r"labels \[9\] outside \[0, 3\)"):
        DistillationTrainer(model=tiny_bert(layers=1), teacher_model=tiny_bert(), args=make_args(),
                            train_dataset=data.select([0, 3]))
