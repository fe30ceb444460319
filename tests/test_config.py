"""DistillationConfig validates every distillation field before anything runs."""

from __future__ import annotations

import pytest

from hf_distill import DistillationConfig


def make(tmp_path, **kwargs):
    return DistillationConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, **kwargs)


def test_defaults_are_valid_and_documented(tmp_path):
    args = make(tmp_path)
    assert args.temperature == 2.0 and args.logits_loss == "forward_kl"
    assert args.loss_weights == {"task_weight": 0.5, "logits_weight": 0.5, "hidden_weight": 0.0, "attention_weight": 0.0,
                                 "input_grad_weight": 0.0, "adversarial_grad_weight": 0.0, "feature_grad_weight": 0.0,
                                 "similarity_weight": 0.0}
    assert args.scale_by_temperature_squared and args.vocab_mismatch == "error"
    assert args.hidden_loss == "cosine" and args.layer_map == "auto" and args.hidden_projection == "auto"
    for name in ("temperature", "task_weight", "logits_weight", "logits_loss", "jsd_beta",
                 "scale_by_temperature_squared", "teacher_dtype", "vocab_mismatch", "hidden_weight", "hidden_loss",
                 "layer_map", "hidden_projection", "attention_weight", "input_grad_weight", "input_grad_key",
                 "adversarial_grad_weight", "discriminator_lr", "feature_grad_weight", "feature_layer",
                 "similarity_weight", "teacher_route", "route_steps", "ensemble"):
        assert name in DistillationConfig.__doc__
        assert DistillationConfig.__dataclass_fields__[name].metadata["help"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"temperature": -1.0}, "temperature must be > 0"),
        ({"task_weight": -0.1}, "task_weight"),
        ({"logits_weight": -2.0}, "logits_weight"),
        ({"task_weight": 0.0, "logits_weight": 0.0}, "All loss weights are zero"),
        ({"hidden_weight": -1.0}, "hidden_weight"),
        ({"attention_weight": -0.5}, "attention_weight"),
        ({"hidden_loss": "l1"}, "Unknown hidden_loss 'l1'"),
        ({"hidden_projection": "mlp"}, "Unknown hidden_projection"),
        ({"layer_map": "first"}, "Cannot read layer_map"),
        ({"layer_map": [[1, 2, 3]]}, r"not a \[student_index, teacher_index\] pair"),
        ({"layer_map": [[1, -2]]}, "not a"),
        ({"similarity_weight": -1.0}, "similarity_weight"),
        ({"input_grad_weight": -1.0}, "input_grad_weight"),
        ({"discriminator_lr": 0.0}, "discriminator_lr must be > 0"),
        ({"ensemble": "vote"}, "Unknown ensemble 'vote'"),
        ({"route_steps": [3]}, "teacher_route is not"),
        ({"teacher_route": ["a", "b"], "route_steps": [3, 5]}, "len\\(teacher_route\\) - 1 = 1"),
        ({"teacher_route": ["a", "b", "c"], "route_steps": [5, 3]}, "strictly"),
        ({"jsd_beta": 1.5}, r"jsd_beta must lie in \[0, 1\]"),
        ({"jsd_beta": -0.01}, r"jsd_beta must lie in \[0, 1\]"),
        ({"logits_loss": "kl"}, "Unknown logits_loss 'kl'; choose one of forward_kl"),
        ({"teacher_dtype": "fp8"}, "Unknown teacher_dtype"),
        ({"vocab_mismatch": "pad"}, "Unknown vocab_mismatch"),
    ],
)
def test_bad_values_raise_a_clear_error(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(tmp_path, **kwargs)


def test_one_weight_may_be_zero(tmp_path):
    assert make(tmp_path, task_weight=0.0).logits_weight == 0.5
    assert make(tmp_path, logits_weight=0.0).task_weight == 0.5


def test_zero_weights_other_than_hidden_are_fine(tmp_path):
    args = make(tmp_path, task_weight=0.0, logits_weight=0.0, hidden_weight=1.0)
    assert args.loss_weights["hidden_weight"] == 1.0


@pytest.mark.parametrize("spec", ["1:2,2:4", "[[1, 2], [2, 4]]", [[1, 2], [2, 4]]])
def test_layer_map_formats(spec):
    from hf_distill.signals.hidden import parse_layer_map

    assert parse_layer_map(spec) == [(1, 2), (2, 4)]
