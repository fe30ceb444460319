"""shrink_model: every listed family keeps the chosen layers' weights, reloads, and shares nothing with the teacher."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    BertConfig,
    DistilBertConfig,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    MPNetConfig,
    Qwen2Config,
    RobertaConfig,
    T5Config,
    T5ForConditionalGeneration,
)

from hf_distill import shrink_model
from hf_distill.students import find_layer_stack, select_layers

COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64)
FAMILIES = {
    "bert": (lambda: BertConfig(**COMMON, max_position_embeddings=64), AutoModelForMaskedLM),
    "roberta": (lambda: RobertaConfig(**COMMON, max_position_embeddings=70, pad_token_id=1),
                AutoModelForSequenceClassification),
    "mpnet": (lambda: MPNetConfig(**COMMON, max_position_embeddings=70), AutoModelForMaskedLM),
    "distilbert": (lambda: DistilBertConfig(vocab_size=64, dim=32, n_layers=4, n_heads=2, hidden_dim=64,
                                            max_position_embeddings=64), AutoModelForSequenceClassification),
    "llama": (lambda: LlamaConfig(**COMMON, num_key_value_heads=1, max_position_embeddings=64), AutoModelForCausalLM),
    "qwen2": (lambda: Qwen2Config(**COMMON, num_key_value_heads=1, max_position_embeddings=64, use_sliding_window=True,
                                  sliding_window=4, max_window_layers=2), AutoModelForCausalLM),
    "gemma3": (lambda: Gemma3TextConfig(**COMMON, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
                                        sliding_window=4, layer_types=["sliding_attention", "full_attention"] * 2),
               AutoModelForCausalLM),
    "gpt2": (lambda: GPT2Config(vocab_size=64, n_embd=32, n_layer=4, n_head=2, n_positions=64, bos_token_id=0,
                                eos_token_id=0), AutoModelForCausalLM),
}
IDS = torch.randint(3, 64, (2, 10), generator=torch.Generator().manual_seed(0))
MASK = torch.tensor([[1] * 10, [1] * 6 + [0] * 4])


def _teacher(family: str):
    make_config, auto = FAMILIES[family]
    torch.manual_seed(0)
    return auto.from_config(make_config()).eval(), auto


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK).logits


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_keeping_every_layer_reproduces_the_teacher_exactly(family):
    teacher, _ = _teacher(family)
    student = shrink_model(teacher, layers=[0, 1, 2, 3]).eval()
    assert type(student) is type(teacher)
    assert torch.equal(_logits(student), _logits(teacher))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_shrunk_student_keeps_the_chosen_layers_shares_nothing_and_reloads(family, tmp_path):
    teacher, auto = _teacher(family)
    student = shrink_model(teacher).eval()  # default: half the depth, every other layer
    assert student.config.distilled_from_layers == [0, 2]
    assert student.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 4

    # the kept layers carry the teacher's weights, and everything outside the stack is copied
    stack_name, teacher_stack = find_layer_stack(teacher)
    student_stack = student.get_submodule(stack_name)
    for new, old in enumerate([0, 2]):
        for (name, a), (_, b) in zip(student_stack[new].state_dict().items(), teacher_stack[old].state_dict().items()):
            assert torch.equal(a, b), name
    teacher_state = teacher.state_dict()
    for key, value in student.state_dict().items():
        if not key.startswith(stack_name + "."):
            assert torch.equal(value, teacher_state[key]), key

    # no storage is shared: training the student cannot touch the teacher
    teacher_storage = {t.untyped_storage().data_ptr() for t in teacher.state_dict().values()}
    assert not any(t.untyped_storage().data_ptr() in teacher_storage for t in student.state_dict().values())
    reference = _logits(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    assert torch.equal(_logits(teacher), reference)
    with torch.no_grad():
        for p in student.parameters():
            p.sub_(1.0)

    student.save_pretrained(tmp_path)
    reloaded = auto.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(student)
    assert reloaded.config.distilled_from_layers == [0, 2]
    torch.testing.assert_close(_logits(reloaded), _logits(student), rtol=0, atol=0)


def test_per_layer_config_lists_follow_the_kept_layers():
    gemma, _ = _teacher("gemma3")
    student = shrink_model(gemma, layers=[1, 2, 3])
    assert student.config.layer_types == ["full_attention", "sliding_attention", "full_attention"]
    assert student.config.num_hidden_layers == 3

    qwen, _ = _teacher("qwen2")
    assert qwen.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    student = shrink_model(qwen, layers=[1, 3])
    assert student.config.layer_types == ["full_attention", "sliding_attention"]
    assert student.config.max_window_layers == 1  # one of the kept layers was among the first two

    gpt2, _ = _teacher("gpt2")
    assert shrink_model(gpt2, num_layers=3, strategy="uniform").config.n_layer == 3
    distilbert, _ = _teacher("distilbert")
    assert shrink_model(distilbert, num_layers=1).config.n_layers == 1


def test_config_overrides_reach_the_student():
    teacher, _ = _teacher("bert")
    student = shrink_model(teacher, config_overrides={"attention_probs_dropout_prob": 0.0})
    assert student.config.attention_probs_dropout_prob == 0.0
    assert teacher.config.attention_probs_dropout_prob == 0.1


@pytest.mark.parametrize(
    "depth, n, strategy, expected",
    [
        (12, 6, "every_other", [0, 2, 4, 6, 8, 10]),
        (12, 6, "distilbert", [0, 2, 4, 7, 9, 11]),  # DistilBERT's actual extraction
        (12, 6, "uniform", [0, 2, 4, 7, 9, 11]),
        (12, 4, "uniform", [0, 4, 7, 11]),
        (12, 4, "distilbert", [0, 2, 9, 11]),
        (6, 3, "distilbert", [0, 2, 5]),
        (4, 3, "distilbert", [0, 2, 3]),
        (30, 15, "every_other", list(range(0, 30, 2))),
        (6, 1, "uniform", [0]),
        (5, 5, "uniform", [0, 1, 2, 3, 4]),
    ],
)
def test_strategies(depth, n, strategy, expected):
    assert select_layers(depth, n, strategy) == expected


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_layers": 3, "strategy": "every_other"}, "every_other.*has only 2"),
        ({"num_layers": 4, "strategy": "distilbert"}, "distilbert.*do not fit"),
        ({"num_layers": 5}, "cannot be cut from a 4-layer teacher"),
        ({"num_layers": 2, "strategy": "top"}, "Unknown strategy 'top'"),
        ({"layers": [2, 1]}, "strictly increasing"),
        ({"layers": [0, 4]}, "outside the teacher's 0..3"),
        ({"layers": [0, 1], "num_layers": 3}, "disagrees"),
    ],
)
def test_bad_selections_raise_clear_errors(kwargs, match):
    teacher, _ = _teacher("bert")
    with pytest.raises(ValueError, match=match):
        shrink_model(teacher, **kwargs)


def test_unsupported_models_are_named_with_what_was_looked_for():
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=32, d_model=16, d_ff=32, num_layers=2, num_heads=2, d_kv=8))
    with pytest.raises(ValueError, match="more than one nn.ModuleList has 2 layers.*encoder.block.*decoder.block"):
        shrink_model(t5)
    with pytest.raises(TypeError, match="needs a transformers PreTrainedModel"):
        shrink_model(nn.Linear(2, 2))


# ---- the command line's cut: an explicit list, and the causal-LM default ----------------------------------------


def test_student_layers_takes_a_number_or_the_teacher_layers_to_keep():
    from hf_distill.cli.arguments import ModelArguments
    from hf_distill.students import pick_layers

    assert ModelArguments(student_layers="3", task="causal-lm").student_cut() == (3, None, "auto")
    assert ModelArguments(student_layers="3").student_cut() == (3, None, "every_other")  # classifiers: as before
    assert ModelArguments(student_layers="3", shrink_strategy="distilbert").student_cut() == (3, None, "distilbert")
    assert ModelArguments(student_layers="0, 3,7").student_cut() == (3, [0, 3, 7], "explicit")
    assert ModelArguments().student_cut()[:2] == (None, None)
    for bad in ("3,1", "a,b", "0,0", "ten"):
        with pytest.raises(ValueError, match="--student_layers"):
            ModelArguments(student_layers=bad).student_cut()
    # auto (causal LMs): distilbert's bottom and top layers where they fit (the measured best), else uniform
    assert pick_layers(30, 10, "auto") == ([0, 2, 4, 6, 8, 21, 23, 25, 27, 29], "distilbert")
    assert pick_layers(30, 20, "auto") == (select_layers(30, 20, "uniform"), "uniform")
    assert pick_layers(30, 10, "every_other") == (list(range(0, 20, 2)), "every_other")


def test_the_command_line_cuts_the_listed_layers_and_logs_them(tmp_path, caplog):
    import logging

    import datasets
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from .llm_workspace import llm_distill, save_chat_teacher
    from .test_chat_data import TWO_TURNS

    save_chat_teacher(tmp_path / "chat-teacher", layers=4)
    datasets.Dataset.from_dict({"messages": [TWO_TURNS] * 12}).to_json(str(tmp_path / "chat.jsonl"))
    hf_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            llm_distill(tmp_path, "auto", student_layers="2")  # a causal LM: the bottom and the top, not 0, 2
            llm_distill(tmp_path, "listed", student_layers="1,2")
    finally:
        hf_logging.disable_propagation()
    kept = {name: AutoModelForCausalLM.from_pretrained(tmp_path / f"out-{name}").config.distilled_from_layers
            for name in ("auto", "listed")}
    assert kept == {"auto": [0, 3], "listed": [1, 2]}
    assert "Student: 2 of the teacher's 4 layers, keeping teacher layers [0, 3] (--shrink_strategy distilbert)" in \
        caplog.text
    assert "keeping teacher layers [1, 2] (--student_layers)" in caplog.text
