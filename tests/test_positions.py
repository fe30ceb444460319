"""Which positions count: examples, tokens, and the causal shift."""

from __future__ import annotations

import torch

from hf_distill.positions import PositionUnit, align_labels, count_positions, infer_position_unit, position_mask

from .conftest import MLP, tiny_bert, tiny_llama


def test_causal_shift_aligns_position_t_with_label_t_plus_1():
    labels = torch.tensor([[-100, 5, 6, -100], [1, 2, 3, 4]])
    mask = position_mask({"labels": labels}, PositionUnit.NEXT_TOKEN)
    assert mask.tolist() == [[True, True, False, False], [True, True, True, False]]
    assert align_labels(labels, PositionUnit.NEXT_TOKEN).tolist() == [[5, 6, -100, -100], [2, 3, 4, -100]]
    # the same count transformers uses for causal LMs: labels[..., 1:] != -100
    assert int(count_positions({"labels": labels}, PositionUnit.NEXT_TOKEN)) == int((labels[:, 1:] != -100).sum())


def test_tokens_without_labels_use_the_attention_mask():
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 0], [1, 0, 0]])}
    assert position_mask(batch, PositionUnit.NEXT_TOKEN).tolist() == [[True, True, False], [True, False, False]]
    assert int(count_positions(batch, PositionUnit.TOKEN)) == 3
    assert int(count_positions({"input_ids": torch.ones(2, 3)}, PositionUnit.TOKEN)) == 6


def test_examples_count_rows():
    assert int(count_positions({"x": torch.zeros(5, 8), "labels": torch.zeros(5)}, PositionUnit.EXAMPLE)) == 5
    assert int(count_positions({"input_ids": torch.zeros(3, 8)}, PositionUnit.EXAMPLE)) == 3


def test_masked_lm_labels_count_unshifted():
    labels = torch.tensor([[-100, 5, -100], [1, -100, -100]])
    assert position_mask({"labels": labels}, PositionUnit.TOKEN).tolist() == [[False, True, False], [True, False, False]]


def test_unit_inference():
    assert infer_position_unit(tiny_llama(layers=1)) is PositionUnit.NEXT_TOKEN
    assert infer_position_unit(tiny_bert(layers=1)) is PositionUnit.EXAMPLE
    assert infer_position_unit(MLP(), {"labels": torch.tensor([[1, 2]])}) is PositionUnit.TOKEN
    assert infer_position_unit(MLP(), {"labels": torch.tensor([0.5, 1.0])}) is PositionUnit.EXAMPLE
