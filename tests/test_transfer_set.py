"""Transfer sets (Hinton et al. 2015): unlabelled rows beside labelled ones. The teacher's terms count every row, the
task loss only the labelled ones (label -100 elsewhere), exactly under accumulation; the command line adds the rows
and refuses runs where nothing could learn from them."""

from __future__ import annotations

import datasets
import pytest
import torch

from hf_distill import DistillationTrainer
from hf_distill.data.loading import DataArguments, add_transfer_set

from .conftest import classification_dataset, kl_rows, tiny_bert
from .test_accumulation import _one_step_update, _relative_difference
from .test_cli import WORDS, _rows, tiny_run, tokenizer  # noqa: F401 (fixtures)


def _with_unlabelled(data: datasets.Dataset, rows: list[int]) -> datasets.Dataset:
    labels = [-100 if i in rows else int(v) for i, v in enumerate(data["labels"])]
    return data.remove_columns("labels").add_column("labels", labels)


def test_task_loss_counts_labelled_rows_and_the_kl_every_row(make_args):
    teacher, student = tiny_bert(seed=1), tiny_bert(layers=1, seed=2)
    data = _with_unlabelled(classification_dataset(), rows=[1, 2, 4])
    trainer = DistillationTrainer(model=student, teacher_model=teacher, train_dataset=data,
                                  args=make_args(temperature=2.0, task_weight=0.4, logits_weight=0.6))
    batch = {k: torch.tensor(data[:6][k]) for k in data.column_names}
    loss = trainer.compute_loss(student, batch)
    with torch.no_grad():
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        zs, zt = student(**inputs).logits, teacher(**inputs).logits
    labelled = [0, 3, 5]
    ce = -torch.log_softmax(zs[labelled], -1)[torch.arange(3), batch["labels"][labelled]].mean()
    kl = kl_rows(torch.softmax(zt / 2, -1), torch.softmax(zs / 2, -1)).mean() * 4  # over all six rows
    torch.testing.assert_close(loss, 0.4 * ce + 0.6 * kl, rtol=1e-5, atol=1e-6)

    only_unlabelled = {k: v[[1, 2, 4]] for k, v in batch.items()}  # the model's own CE would be 0/0 here
    loss = trainer.compute_loss(student, only_unlabelled)
    expected = kl_rows(torch.softmax(zt[[1, 2, 4]] / 2, -1), torch.softmax(zs[[1, 2, 4]] / 2, -1)).mean() * 4
    torch.testing.assert_close(loss, 0.6 * expected, rtol=1e-5, atol=1e-6)


def test_accumulation_stays_exact_with_unlabelled_rows(make_args):
    """Micro-batches with 1 and 3 labelled rows: the task term divides by the step's 4 labelled rows, not per batch."""
    teacher, student = tiny_bert(seed=1), tiny_bert(layers=1, seed=2)
    data = _with_unlabelled(classification_dataset(n=8), rows=[0, 1, 2])
    kwargs = dict(task_weight=0.5, logits_weight=0.5, temperature=2.0)
    big, _ = _one_step_update(student, teacher, data, make_args, batch=8, accumulation=1, **kwargs)
    accumulated, _ = _one_step_update(student, teacher, data, make_args, batch=4, accumulation=2, **kwargs)
    assert big.norm() > 0
    assert _relative_difference(big, accumulated) < 1e-4


def test_add_transfer_set_tokenises_unlabelled_rows_like_the_labelled_ones(tokenizer):  # noqa: F811
    data = DataArguments(text_column="sentence", max_length=6, max_transfer_samples=3)
    labelled = datasets.Dataset.from_dict({"sentence": ["w1 w2", "w3"], "label": [0, 1]})
    labelled = labelled.map(lambda b: {**tokenizer(b["sentence"], truncation=True, max_length=6), "labels": b["label"]},
                            batched=True, remove_columns=["sentence", "label"])
    transfer = datasets.Dataset.from_dict({"sentence": ["w4 w5 w6 w7 w8 w9 w10", "", "w11", "w12", "w13"],
                                           "label": [1, 1, 1, 1, 1]})  # its labels are ignored
    combined = add_transfer_set(labelled, transfer, tokenizer, data)
    assert combined["labels"] == [0, 1, -100, -100]  # 3 rows kept, the empty one dropped
    assert combined[2]["input_ids"] == tokenizer("w4 w5 w6 w7 w8 w9 w10", truncation=True, max_length=6)["input_ids"]
    assert combined.column_names == labelled.column_names
    with pytest.raises(ValueError, match="text_column"):
        add_transfer_set(labelled, transfer.rename_column("sentence", "x"), tokenizer, data)


def test_distill_command_learns_from_a_transfer_set_and_refuses_useless_ones(tiny_run, tmp_path):  # noqa: F811
    from hf_distill.cli import parse_distill_args
    from hf_distill.cli.jobs import distill_main, train_teacher_main
    from hf_distill.cli.models import prepare_inputs

    texts, _ = _rows(30, seed=5)
    transfer = tmp_path / "unlabelled.jsonl"
    datasets.Dataset.from_dict({"sentence": texts}).to_json(str(transfer))
    argv = [*tiny_run, "--transfer_dataset", str(transfer), "--logits_weight", "1.0", "--max_steps", "2"]
    _, data = prepare_inputs(*parse_distill_args(argv))
    assert data.train["labels"].count(-100) == 30 and len(data.train) == 36 + 30  # 40 rows, 10% held out
    assert -100 not in data.eval["labels"]
    summary = distill_main(argv)
    assert summary["eval"]["eval_task_loss"] > 0 and summary["eval"]["eval_logits_loss"] > 0
    for extra, match in ((["--logits_weight", "0", "--hidden_weight", "0"], "only the teacher's terms"),
                         (["--task", "causal-lm"], "for classifiers")):
        with pytest.raises(ValueError, match=match):
            distill_main([*tiny_run, "--transfer_dataset", str(transfer), "--output_dir", str(tmp_path / "x"), *extra])
    with pytest.raises(ValueError, match="not to training the teacher"):
        train_teacher_main([*tiny_run, "--transfer_dataset", str(transfer), "--output_dir", str(tmp_path / "y")])
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
