"""What the models write: collapse statistics against hand counts, the entropy meter against the model's softmax, the
collapse flag on a student forced to repeat a token (and not on a healthy student nor on the teacher), held-out
samples (teacher beside student) in the log, the integrations, the report and the card, and `generate`'s length-cap
warning."""

from __future__ import annotations

import logging
import math

import datasets
import pytest
import torch

from hf_distill import DistillationConfig, DistillationTrainer
from hf_distill.cli.report import Significant
from hf_distill.data.sampler import EntropyMeter, SamplingSettings, sample_completions
from hf_distill.data.samples import CollapseError, collapse_reasons, completion_stats, samples_history

from .conftest import tiny_llama
from .llm_workspace import llm_distill, llm_generate, make_llm_workspace
from .test_on_policy import VOCAB, setup, trainer_for

CONTENT = ["hello", "hi", "there", "how", "are", "you", "fine", "thanks", "be", "brief", "ok"]
EOS = 3  # the chat tokenizer's <|im_end|>


def test_completion_stats_match_a_hand_count():
    stats = completion_stats([[1, 2, 3, 4, 1, 2, 3, 4, EOS], [5, 6, 7]], [EOS], max_new_tokens=3)
    # the stop token is not text; the second answer reached the cap of 3 without one
    assert stats["distinct_1"] == pytest.approx(7 / 11) and stats["distinct_2"] == pytest.approx(6 / 9)
    assert stats["distinct_4"] == pytest.approx(4 / 5)  # (1234) twice among 5 four-grams, none in the short answer
    assert stats["repeated_4gram_share"] == pytest.approx(1 / 5)
    assert stats["mean_length"] == pytest.approx(6.0) and stats["capped_share"] == pytest.approx(0.5)
    # distinct-n pools groups of 8 answers: one answer repeated 16 times is as alike as 8 times
    same = completion_stats([[1, 2, 3]] * 16, [EOS], 10)
    assert same["distinct_2"] == pytest.approx(2 / 16)


def test_collapse_thresholds_flag_repetition_and_sameness_not_varied_text():
    varied = [[(7 * i + 3 * k) % 50 + 10 for k in range(12)] + [EOS] for i in range(8)]
    looping = [[5, 6] * 16 for _ in range(8)]
    healthy, collapsed = completion_stats(varied, [EOS], 32), completion_stats(looping, [EOS], 32)
    assert collapse_reasons(healthy) == [] and collapse_reasons(healthy, healthy) == []
    absolute, relative = collapse_reasons(collapsed), collapse_reasons(collapsed, healthy)
    assert any("4-grams repeat" in r for r in absolute) and any("distinct-2" in r for r in absolute)
    assert any("length cap" in r for r in relative) and any("the teacher" in r for r in relative)
    assert collapse_reasons(completion_stats([[EOS]] * 4, [EOS], 32)) == ["the answers are (nearly) empty: 1.0 "
                                                                          "tokens on average"]
    # running to the cap: half the answers more than the teacher and at least 3 answers more (4 samples: 1 vs 3 is
    # chance, 0 vs 4 is not)
    short, long = [[11, 12, 13, 14, EOS]], [[(7 * k) % 50 + 10 for k in range(32)]]
    teacher = completion_stats(short * 3 + long, [EOS], 32)
    assert not any("length cap" in r for r in collapse_reasons(completion_stats(short + long * 3, [EOS], 32), teacher))
    reasons = collapse_reasons(completion_stats(long * 4, [EOS], 32), completion_stats(short * 4, [EOS], 32))
    assert reasons == ["100% of the answers run to the length cap (the teacher: 0%)"]


def test_entropy_meter_records_the_entropy_of_the_raw_softmax():
    model = tiny_llama(vocab=VOCAB, layers=1, seed=3).eval()
    prompts = [[2, 5, 6], [2, 7]]
    meter = EntropyMeter()  # (at temperature 0.7: the meter reads the distribution before the warping)
    ids = torch.tensor([[0, 2, 5, 6], [0, 0, 2, 7]])
    model.generate(input_ids=ids, attention_mask=(ids != 0).long(), max_new_tokens=1, do_sample=True, temperature=0.7,
                   pad_token_id=0, logits_processor=[meter])
    with torch.no_grad():
        for row, prompt in enumerate(prompts):
            p = torch.softmax(model(torch.tensor([prompt])).logits[0, -1].float(), -1)
            assert float(meter.steps[0][row]) == pytest.approx(float(-(p * p.log()).sum()), rel=1e-4)
    meter.steps = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0]), torch.tensor([5.0, 6.0])]
    assert meter.per_completion([3, 1]) == [pytest.approx(3.0), pytest.approx(2.0)]  # own tokens only
    entropies: list[float] = []
    settings = SamplingSettings(1.0, False, 3, 1.0, 1.0, 0, 1, 0, 0, (EOS,))
    completions = sample_completions(model, prompts, settings, seed=1, entropies=entropies)
    assert len(entropies) == len(completions) == 2 and all(0 < e <= math.log(VOCAB) + 1e-6 for e in entropies)


def force_token(model: torch.nn.Module, token: int, boost: float = 30.0) -> torch.nn.Module:
    """A student that writes `token` again and again (its output layer's logit for it raised by `boost`)."""
    bump = torch.zeros(model.config.vocab_size)
    bump[token] = boost
    model.lm_head.register_forward_hook(lambda module, inputs, output: output + bump.to(output.dtype))
    return model


def varied_writer(model: torch.nn.Module, tokenizer, length: int = 5) -> torch.nn.Module:
    """A model whose greedy answer depends on its prompt and never repeats a word: `length` content words, each prompt
    its own stride through them (a healthy writer), then the end of turn."""
    words = tokenizer.convert_tokens_to_ids(CONTENT)
    state = {"seeds": [], "k": 0}

    def hook(module, args, kwargs, output):
        ids, mask = kwargs["input_ids"], kwargs.get("attention_mask")
        if ids.shape[1] > 1:  # a prompt batch (or a training forward)
            state["seeds"], state["k"] = (ids * (mask if mask is not None else 1)).sum(-1).tolist(), 0
        else:
            state["k"] += 1
        k = state["k"]
        targets = [EOS if k >= length else words[(s + (1 + s % 10) * k) % len(words)] for s in state["seeds"]]
        output.logits[torch.arange(len(targets)), -1, torch.tensor(targets)] += 1e4
        return output

    model.register_forward_hook(hook, with_kwargs=True)
    return model


def test_on_policy_samples_of_a_student_forced_to_repeat_are_flagged_and_a_healthy_ones_are_not(tmp_path, caplog):
    tokenizer, rows, collator = setup()
    ok = tokenizer.convert_tokens_to_ids("ok")
    with caplog.at_level(logging.WARNING):
        healthy = trainer_for(tmp_path / "healthy", tokenizer, rows, collator, max_new_tokens=12, learning_rate=1e-3)
        healthy.train()
    logs = [row for row in healthy.state.log_history if "completion_collapse" in row]
    assert len(logs) == 2 and all(row["completion_collapse"] == 0.0 for row in logs)
    assert all(row["completion_distinct_2"] > 0.5 and 0 < row["completion_entropy"] for row in logs)
    assert "Collapse" not in caplog.text
    repeating = force_token(tiny_llama(vocab=VOCAB, layers=1, seed=2), ok)
    with caplog.at_level(logging.WARNING):
        trainer = trainer_for(tmp_path / "repeat", tokenizer, rows, collator, student=repeating, max_new_tokens=12,
                              learning_rate=1e-3, logits_chunk_size=0)  # (the hook changes the logits)
        trainer.train()
    logs = [row for row in trainer.state.log_history if "completion_collapse" in row]
    assert len(logs) == 2 and all(row["completion_collapse"] == 1.0 and row["completion_repeated_4gram_share"] > 0.8
               for row in logs)
    assert "Collapse: the student's samples of steps up to 1 look degenerate" in caplog.text
    stopping = trainer_for(tmp_path / "error", tokenizer, rows, collator, max_new_tokens=12, learning_rate=1e-3,
                           student=force_token(tiny_llama(vocab=VOCAB, layers=1, seed=2), ok), on_collapse="error",
                           logits_chunk_size=0)
    with pytest.raises(CollapseError, match="on_collapse='error' stops here"):
        stopping.train()
    assert stopping.state.global_step == 1  # stopped at the first log


class _Board:
    """Stands in for TensorBoard's callback: records what is written to its writer."""

    def __init__(self) -> None:
        self.texts: list[tuple[str, str, int]] = []
        self.tb_writer = self

    def add_text(self, tag: str, text: str, step: int) -> None:
        self.texts.append((tag, text, step))

    def __getattr__(self, name):  # the callback events: nothing to do
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)


@pytest.mark.parametrize("student_kind", ["repeating", "healthy"])
def test_held_out_samples_put_the_teacher_beside_the_student_and_flag_only_a_collapsed_student(tmp_path, caplog,
                                                                                              student_kind):
    tokenizer, rows, collator = setup()
    teacher = varied_writer(tiny_llama(vocab=VOCAB, seed=1), tokenizer)
    student = tiny_llama(vocab=VOCAB, layers=1, seed=2)
    student = (force_token(student, tokenizer.convert_tokens_to_ids("ok")) if student_kind == "repeating"
               else varied_writer(student, tokenizer))
    args = DistillationConfig(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, save_strategy="no",
                              per_device_train_batch_size=4, max_steps=2, logging_steps=1, disable_tqdm=True,
                              eval_strategy="steps", eval_steps=2, sample_prompts=3, sample_max_new_tokens=8,
                              logits_chunk_size=0)  # (the hooks change the logits)
    board = _Board()
    with caplog.at_level(logging.WARNING):
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=rows,
                                      eval_dataset=rows.select(range(4, 8)), data_collator=collator,
                                      processing_class=tokenizer, callbacks=[board])
        trainer.train()
    history = samples_history(trainer)
    assert [entry["step"] for entry in history] == [2]  # the evaluation at step 2; the end adds no second copy
    entry = history[0]
    assert entry["columns"] == ["prompt", "teacher", "student"] and len(entry["rows"]) == 3
    assert entry["teacher_flags"] == []  # the teacher's own samples are healthy
    assert "Held-out samples at step 2" in caplog.text and "| prompt | teacher | student |" in caplog.text
    assert board.texts and board.texts[0][0] == "samples" and "| prompt | teacher | student |" in board.texts[0][1]
    logged = next(row for row in trainer.state.log_history if "eval_samples_distinct_2" in row)
    if student_kind == "repeating":
        assert all(row[2].startswith("ok ok ok") for row in entry["rows"])
        assert entry["student_flags"] and "Collapse: the student's held-out samples at step 2" in caplog.text
        assert logged["eval_samples_repeated_4gram_share"] == pytest.approx(4 / 5)  # 8 x "ok": 4 of 5 4-grams
    else:
        assert entry["student_flags"] == [] and "Collapse" not in caplog.text


def test_the_command_line_report_and_card_show_samples_method_and_training(tmp_path):
    ws = make_llm_workspace(tmp_path / "ws")
    llm_distill(ws, "chat", learning_rate="3e-4", gradient_accumulation_steps="2", logging_steps="1")
    out = ws / "out-chat"
    report = (out / "_report" / "report.md").read_text()
    assert "## Held-out samples at step 2 (greedy)" in report and "| prompt | teacher | student |" in report
    assert "tokens_per_second" in report
    card = (out / "README.md").read_text()
    front = card.split("---")[1]
    assert "datasets:" not in front  # a local file is not a Hub dataset
    assert "- method: off-policy (the dataset's completions); `forward_kl` at temperature 2" in card
    assert "- optimizer steps: 2" in card and "- learning rate: 0.0003 (linear schedule, adamw_torch" in card
    assert "- batch: 8 sequences per step (4 per device x 2 accumulated x 1 process)" in card
    assert "- precision: fp32" in card and "transformers " in card and "torch " in card
    assert f'model="{out.absolute()}"' in card and '"role": "user"' in card  # the real folder, a chat example

    # prompt-only on-policy: no held-out answers to score, but the samples are there
    llm_distill(ws, "prompts", dataset=str(ws / "prompts.jsonl"), lmbda="1", max_new_tokens="4",
                logits_loss="reverse_kl", temperature="1", logging_steps="1")
    report = (ws / "out-prompts" / "_report" / "report.md").read_text()
    assert "## Held-out samples" in report and "completion_distinct_2" in report
    card = (ws / "out-prompts" / "README.md").read_text()
    assert "**Warning: the run flagged this student's samples as degenerate**" in card  # (tiny random students loop)
    assert "- its held-out samples at step 2: " in card
    assert "- method: on-policy (lmbda=1: the student samples every completion, at most 4 new tokens" in card

    # a cached teacher writes nothing: the reference column holds the rows' own completions (the cache: top-4, T=1)
    llm_distill(ws, "cached", teacher_cache=str(ws / "cache"), temperature="1")
    report = (ws / "out-cached" / "_report" / "report.md").read_text()
    assert "| prompt | reference (data) | student |" in report
    assert "the teacher's top-4 log-probabilities from an offline cache" in (ws / "out-cached" / "README.md").read_text()


def test_generate_reports_answers_cut_by_max_new_tokens(tmp_path, caplog):
    ws = make_llm_workspace(tmp_path / "ws")
    with caplog.at_level(logging.WARNING):
        llm_generate(ws, "cut", max_new_tokens="2")
    assert "hit --max_new_tokens 2 without a stop token" in caplog.text
    assert "stopped by --max_new_tokens 2" in caplog.text


def test_the_summary_prints_two_significant_figures():
    fmt = Significant(2)
    assert [fmt.format(v) for v in (0.5234, 13.4, 1180.0, 0.0, 2.0)] == ["0.52", "13", "1,200", "0", "2.0"]


def test_without_a_teacher_or_answers_the_samples_stand_alone_on_absolute_thresholds(tmp_path):
    """Task-only training (no teacher) with prompt-only held-out rows: no reference column, the student's samples
    judged on the absolute thresholds."""
    from hf_distill.data.chat import prepare_chat_dataset

    from .test_on_policy import QUESTIONS

    tokenizer, rows, collator = setup()
    held_out, _ = prepare_chat_dataset(datasets.Dataset.from_dict(
        {"prompt": [[{"role": "user", "content": q}] for q in QUESTIONS[:3]]}), tokenizer, prompts=True)
    student = force_token(tiny_llama(vocab=VOCAB, layers=1, seed=2), tokenizer.convert_tokens_to_ids("ok"))
    args = DistillationConfig(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, save_strategy="no",
                              per_device_train_batch_size=4, max_steps=1, disable_tqdm=True, task_weight=1.0,
                              logits_weight=0.0, sample_max_new_tokens=8, logits_chunk_size=0)
    trainer = DistillationTrainer(model=student, args=args, train_dataset=rows, eval_dataset=held_out,
                                  data_collator=collator, processing_class=tokenizer)
    trainer.train()
    entry = samples_history(trainer)[0]
    assert entry["columns"] == ["prompt", "student"] and entry["teacher_stats"] is None
    assert any("4-grams repeat" in flag and "flag at 50%" in flag for flag in entry["student_flags"])


def test_report_png_puts_counters_on_their_own_axes_draws_the_eval_curve_and_shows_the_teacher(tmp_path, monkeypatch):
    pyplot = pytest.importorskip("matplotlib.pyplot")
    from hf_distill.cli.report import write_report

    figures = []
    monkeypatch.setattr(pyplot, "close", lambda figure=None: figures.append(figure))
    rows = [("held-out perplexity", 2.26, 2888.0, "{:.4f}"), ("teacher agreement", 1.0, 0.16, "{:.4f}")]
    history = [{"step": 1, "loss": 5.0, "logits_loss": 4.0, "aligned_spans": 3000.0, "span_share": 0.9,
                "tokens_per_second": 120.0}, {"step": 2, "eval_loss": 4.5},
               {"step": 2, "loss": 4.0, "logits_loss": 3.5, "aligned_spans": 3100.0, "span_share": 0.8,
                "tokens_per_second": 130.0}]
    write_report(str(tmp_path), rows, history)
    axes = {axis.get_title(): axis for axis in figures[0].axes}
    losses = [line.get_label() for line in axes["training loss components"].lines]
    assert losses == ["loss", "logits_loss", "eval_loss"]  # the counters are not on the loss axis
    assert {line.get_label() for line in axes["counters"].lines} == {"aligned_spans", "tokens_per_second"}
    assert [line.get_label() for line in axes["shares and sample statistics"].lines] == ["span_share"]
    perplexity = axes["held-out perplexity"]
    assert perplexity.get_yscale() == "log" and perplexity.get_ylim()[0] < 2.26  # the teacher's bar shows
    assert axes["teacher agreement"].get_yscale() == "linear"
    report = (tmp_path / "report.md").read_text()
    assert "## Evaluation" in report and "| 2 | 4.5000 |" in report
