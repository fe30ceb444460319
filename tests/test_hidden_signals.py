"""Hidden-state and attention signals: layer maps, each loss against a hand computation, projections, MLM triple loss."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertForMaskedLM, BertTokenizer, DataCollatorForLanguageModeling

from hf_distill import DistillationTrainer, shrink_model
from hf_distill.signals.hidden import attention_kl, cosine_distance, feature_mse, resolve_layer_map

from .conftest import classification_dataset, kl_rows, tiny_bert


def _batch(dataset, n, start=0):
    return {k: torch.tensor(dataset[start:start + n][k]) for k in dataset.column_names}


def _perturbed(model, seed=3, scale=0.05):
    """The shrunk student starts from the teacher's layers; noise makes every mapped pair differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def _states(model, batch, **flags):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **flags)


# ---- layer maps --------------------------------------------------------------------------------------------------


def test_layer_maps():
    assert resolve_layer_map("auto", 3, 6, distilled_from_layers=[0, 2, 4]) == [(1, 1), (2, 3), (3, 5)]
    assert resolve_layer_map("auto", 2, 4) == [(1, 2), (2, 4)]  # evenly spaced
    assert resolve_layer_map("auto", 3, 12) == [(1, 4), (2, 8), (3, 12)]
    assert resolve_layer_map("last", 3, 12) == [(3, 12)]
    assert resolve_layer_map("0:0,3:12", 3, 12) == [(0, 0), (3, 12)]
    with pytest.raises(ValueError, match=r"pair \[4, 2\] is out of range"):
        resolve_layer_map([[4, 2]], 3, 12)
    with pytest.raises(ValueError, match="is it the teacher the student was shrunk from"):
        resolve_layer_map("auto", 2, 4, distilled_from_layers=[0, 8])


# ---- the distances against their definitions ---------------------------------------------------------------------


def test_cosine_and_mse_rows_match_their_formulas():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(5, 7, generator=g, dtype=torch.float64)
    for i in range(5):
        dot = sum(a[i, k] * b[i, k] for k in range(7))
        norms = math.sqrt(sum(float(a[i, k]) ** 2 for k in range(7))) * math.sqrt(sum(float(b[i, k]) ** 2 for k in range(7)))
        assert cosine_distance(a, b)[i].item() == pytest.approx(float(1 - dot / norms), rel=1e-12)
        mse = sum(float(a[i, k] - b[i, k]) ** 2 for k in range(7)) / 7
        assert feature_mse(a, b)[i].item() == pytest.approx(mse, rel=1e-12)
    assert torch.allclose(cosine_distance(a, 3 * a), torch.zeros(5, dtype=torch.float64), atol=1e-12)


def _random_attention(b, h, t, seed, masked_keys=None):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(b, h, t, t, generator=g, dtype=torch.float64)
    if masked_keys is not None:
        scores = scores.masked_fill(~masked_keys[:, None, None, :], float("-inf"))
    return scores.softmax(-1)


def test_attention_kl_matches_a_hand_computation_with_padding_and_differing_heads():
    keys = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    student = _random_attention(2, 2, 5, seed=1, masked_keys=keys)
    teacher = _random_attention(2, 2, 5, seed=2, masked_keys=keys)
    by_hand = torch.zeros(2, 5, dtype=torch.float64)
    for b in range(2):
        for q in range(5):
            per_head = []
            for h in range(2):
                terms = [teacher[b, h, q, k] * (teacher[b, h, q, k].log() - student[b, h, q, k].log())
                         for k in range(5) if teacher[b, h, q, k] > 0]
                per_head.append(sum(terms))
            by_hand[b, q] = sum(per_head) / 2
    torch.testing.assert_close(attention_kl(student, teacher), by_hand)
    assert torch.isfinite(attention_kl(student, teacher)).all()  # padded keys: 0 log 0 = 0

    wide_teacher = _random_attention(2, 4, 5, seed=3, masked_keys=keys)  # 4 heads vs the student's 2
    s_mean, t_mean = student.mean(1), wide_teacher.mean(1)
    expected = kl_rows(t_mean.clamp_min(1e-300), s_mean.clamp_min(1e-300))
    torch.testing.assert_close(attention_kl(student, wide_teacher), expected)


# ---- the trainer's combined loss -----------------------------------------------------------------------------------


def test_hidden_cosine_loss_through_the_trainer_matches_a_hand_computation(make_args):
    teacher = tiny_bert(layers=4, seed=1)
    student = _perturbed(shrink_model(teacher, num_layers=2))  # keeps teacher layers 0 and 2
    data = classification_dataset()
    args = make_args(task_weight=0.2, logits_weight=0.3, hidden_weight=0.5, temperature=2.0)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data)
    assert len(trainer.signal_modules) == 0  # same width: no projection
    batch = _batch(data, 6)
    assert (batch["attention_mask"] == 0).any()  # padding is present, and must not count
    loss = trainer.compute_loss(student, batch)

    out_s = _states(student, batch, output_hidden_states=True)
    out_t = _states(teacher, batch, output_hidden_states=True)
    ce = -torch.log_softmax(out_s.logits, -1)[torch.arange(6), batch["labels"]].mean()
    kl = kl_rows(torch.softmax(out_t.logits / 2, -1), torch.softmax(out_s.logits / 2, -1)).mean() * 4
    terms = []
    for b in range(6):
        for t in range(batch["input_ids"].shape[1]):
            if batch["attention_mask"][b, t]:
                pair_values = []
                for s_index, t_index in [(1, 1), (2, 3)]:  # student hidden i+1 <-> teacher kept layer + 1
                    hs, ht = out_s.hidden_states[s_index][b, t], out_t.hidden_states[t_index][b, t]
                    pair_values.append(1 - hs.dot(ht) / (hs.norm() * ht.norm()))
                terms.append(sum(pair_values) / 2)
    hidden = torch.stack(terms).mean()
    assert hidden > 1e-4
    torch.testing.assert_close(loss, 0.2 * ce + 0.3 * kl + 0.5 * hidden, rtol=1e-5, atol=1e-6)


def test_padding_never_counts(make_args):
    """Changing the ids under padding changes the hidden states there, but not the hidden or attention losses."""
    teacher = tiny_bert(layers=2, seed=1)
    student = _perturbed(shrink_model(teacher, num_layers=1))
    data = classification_dataset()
    args = make_args(task_weight=0.0, logits_weight=0.0, hidden_weight=1.0, attention_weight=1.0)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data)
    batch = _batch(data, 6)
    padded = batch["attention_mask"] == 0
    assert padded.any()
    other = {**batch, "input_ids": torch.where(padded, (batch["input_ids"] + 7) % 60, batch["input_ids"])}
    states, other_states = _states(student, batch, output_hidden_states=True), _states(student, other,
                                                                                       output_hidden_states=True)
    assert not torch.allclose(states.hidden_states[1][padded], other_states.hidden_states[1][padded])
    with torch.no_grad():
        torch.testing.assert_close(trainer.compute_loss(student, other), trainer.compute_loss(student, batch))


def test_hidden_mse_with_projection_across_widths_matches_a_hand_computation(make_args):
    teacher, student = tiny_bert(layers=4, hidden=32, seed=1), tiny_bert(layers=2, hidden=16, seed=2)
    data = classification_dataset()
    args = make_args(task_weight=0.0, logits_weight=0.0, hidden_weight=1.0, hidden_loss="mse", layer_map=[[0, 0], [2, 4]])
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data)
    projections = trainer.signal_modules["hidden__hidden_projections"]
    assert sorted(projections.keys()) == ["0_0", "2_4"]
    batch = _batch(data, 5)
    loss = trainer.compute_loss(student, batch)

    out_s = _states(student, batch, output_hidden_states=True)
    out_t = _states(teacher, batch, output_hidden_states=True)
    mask = batch["attention_mask"].bool()
    per_pair = []
    for s_index, t_index in [(0, 0), (2, 4)]:
        weight, bias = projections[f"{s_index}_{t_index}"].weight, projections[f"{s_index}_{t_index}"].bias
        projected = out_s.hidden_states[s_index] @ weight.T + bias  # FitNets' f_w
        per_pair.append(((projected - out_t.hidden_states[t_index]) ** 2).mean(-1)[mask].mean())
    torch.testing.assert_close(loss, sum(per_pair) / 2, rtol=1e-5, atol=1e-6)


def test_identical_widths_get_a_projection_only_when_asked(make_args):
    teacher, student = tiny_bert(layers=2, seed=1), tiny_bert(layers=2, seed=2)
    args = make_args(hidden_weight=1.0, hidden_projection="linear")
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                  train_dataset=classification_dataset())
    assert sorted(trainer.signal_modules["hidden__hidden_projections"].keys()) == ["1_1", "2_2"]


def test_attention_loss_switches_to_eager_and_matches_a_hand_computation(make_args):
    teacher = tiny_bert(layers=4, seed=1)
    config = BertConfig(**{**teacher.config.to_dict(), "num_hidden_layers": 2, "num_attention_heads": 4})
    torch.manual_seed(5)
    student = type(teacher)(config)  # 4 heads against the teacher's 2: maps are head-averaged
    assert student.config._attn_implementation != "eager"
    data = classification_dataset()
    args = make_args(task_weight=0.0, logits_weight=0.0, attention_weight=1.0)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data)
    assert student.config._attn_implementation == "eager" and teacher.config._attn_implementation == "eager"
    batch = _batch(data, 4)
    loss = trainer.compute_loss(student, batch)

    maps_s = _states(student, batch, output_attentions=True).attentions
    maps_t = _states(teacher, batch, output_attentions=True).attentions
    mask = batch["attention_mask"]
    rows = []
    for b in range(4):
        for q in range(mask.shape[1]):
            if not mask[b, q]:
                continue
            per_pair = []
            for s_layer, t_layer in [(0, 1), (1, 3)]:  # evenly spaced map (1, 2), (2, 4) -> attention layers
                a_s, a_t = maps_s[s_layer][b, :, q].mean(0), maps_t[t_layer][b, :, q].mean(0)
                per_pair.append(sum(a_t[k] * (a_t[k].log() - a_s[k].log()) for k in range(mask.shape[1]) if a_t[k] > 0))
            rows.append(sum(per_pair) / 2)
    torch.testing.assert_close(loss, torch.stack(rows).mean(), rtol=1e-5, atol=1e-6)


def test_attention_needs_a_student_without_attention_dropout(make_args):
    teacher = tiny_bert(layers=2, seed=1)
    student = BertForMaskedLM(BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64))  # BERT's default attention dropout of 0.1
    with pytest.raises(ValueError, match=r"attention_probs_dropout_prob=0.1.*attention_probs_dropout_prob=0.0"):
        DistillationTrainer(model=student, teacher_model=teacher, args=make_args(attention_weight=1.0))


def test_layer_signals_need_configs_and_a_teacher(make_args):
    from .conftest import MLP

    with pytest.raises(ValueError, match="hidden_weight=1.0 compares the student with a teacher"):
        DistillationTrainer(model=tiny_bert(), args=make_args(hidden_weight=1.0))
    with pytest.raises(ValueError, match="declare their depth and width"):
        DistillationTrainer(model=MLP(), teacher_model=MLP(), args=make_args(hidden_weight=1.0))
    with pytest.raises(ValueError, match="out of range"):
        DistillationTrainer(model=tiny_bert(layers=2), teacher_model=tiny_bert(layers=2),
                            args=make_args(hidden_weight=1.0, layer_map="1:3"))


def test_only_what_is_asked_is_computed(make_args):
    calls = []

    def spy(model, who):
        forward = model.forward

        def wrapped(*args, **kwargs):
            calls.append((who, kwargs.get("output_hidden_states"), kwargs.get("output_attentions")))
            return forward(*args, **kwargs)

        model.forward = wrapped
        return model

    data = classification_dataset()
    plain = DistillationTrainer(model=spy(tiny_bert(seed=2), "student"), teacher_model=spy(tiny_bert(seed=1), "teacher"),
                                args=make_args(), train_dataset=data)
    plain.compute_loss(plain.model, _batch(data, 4))
    assert calls == [("student", None, None), ("teacher", None, None)]
    calls.clear()
    hidden = DistillationTrainer(model=spy(tiny_bert(seed=2), "student"),
                                 teacher_model=spy(tiny_bert(seed=1), "teacher"),
                                 args=make_args(hidden_weight=1.0), train_dataset=data)
    hidden.compute_loss(hidden.model, _batch(data, 4))
    assert calls == [("student", True, None), ("teacher", True, None)]


# ---- projections: trained, accumulated exactly, checkpointed, restored, never exported --------------------------


def _flat(trainer):
    return torch.cat([p.detach().flatten() for p in [*trainer.model.parameters(), *trainer.signal_modules.parameters()]])


def test_accumulation_is_exact_for_token_counted_terms(make_args):
    """GA=2 x 2 rows updates student and projections like one step of 4 rows, with ragged attention masks."""
    teacher, student = tiny_bert(layers=2, hidden=32, seed=1), tiny_bert(layers=1, hidden=16, seed=2)
    data = classification_dataset(n=4, seed=2)
    lengths = [sum(row) for row in data["attention_mask"]]
    assert lengths[0] + lengths[1] != lengths[2] + lengths[3]  # the micro-batches count different numbers of tokens

    def one_step(batch, accumulation):
        args = make_args(per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation, max_steps=1,
                         optim="sgd", learning_rate=1.0, lr_scheduler_type="constant", max_grad_norm=0.0,
                         weight_decay=0.0, train_sampling_strategy="sequential", task_weight=0.3, logits_weight=0.3,
                         hidden_weight=1.0, hidden_loss="mse")
        trainer = DistillationTrainer(model=copy.deepcopy(student), teacher_model=teacher, args=args,
                                      train_dataset=data)
        start = _flat(trainer)
        trainer.train()
        return _flat(trainer) - start

    big, accumulated = one_step(4, 1), one_step(2, 2)
    assert big.norm() > 0
    assert float((big - accumulated).norm() / big.norm()) < 1e-5


def test_projections_train_checkpoint_resume_and_stay_out_of_the_export(make_args, tmp_path):
    teacher, student = tiny_bert(layers=2, hidden=32, seed=1), tiny_bert(layers=1, hidden=16, seed=2)
    data = classification_dataset(n=16)
    common = dict(max_steps=4, save_strategy="steps", save_steps=2, train_sampling_strategy="sequential",
                  hidden_weight=1.0, learning_rate=1e-2, max_grad_norm=1.0)
    args = make_args(output_dir=str(tmp_path / "run"), **common)
    trainer = DistillationTrainer(model=copy.deepcopy(student), teacher_model=teacher, args=args, train_dataset=data)
    initial = {k: v.clone() for k, v in trainer.signal_modules.state_dict().items()}
    trainer.train()
    final = trainer.signal_modules.state_dict()
    assert all(not torch.equal(initial[k], final[k]) for k in final)  # the student's optimizer trains them
    assert {"hidden_loss", "logits_loss", "task_loss"} <= set(trainer.state.log_history[0])

    saved = load_file(tmp_path / "run" / "checkpoint-2" / "hf_distill_modules.safetensors")
    assert set(saved) == {f"hidden__hidden_projections.1_2.{p}" for p in ("weight", "bias")}

    # exported student: the plain student only, loadable as such
    trainer.save_model(str(tmp_path / "export"))
    exported = load_file(tmp_path / "export" / "model.safetensors")
    assert set(exported) == set(student.state_dict()) or set(exported) < set(student.state_dict())
    assert not any("projection" in key for key in exported)
    assert not os.path.exists(tmp_path / "export" / "hf_distill_modules.safetensors")

    # resume from step 2: projections come back from the checkpoint (fresh ones are zeroed here to prove it)
    args = make_args(output_dir=str(tmp_path / "resumed"), **common)
    resumed = DistillationTrainer(model=copy.deepcopy(student), teacher_model=teacher, args=args, train_dataset=data)
    with torch.no_grad():
        for p in resumed.signal_modules.parameters():
            p.zero_()
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    for key, value in resumed.signal_modules.state_dict().items():
        torch.testing.assert_close(value, final[key], rtol=0, atol=1e-6)
    torch.testing.assert_close(_flat(resumed), _flat(trainer), rtol=0, atol=1e-6)


def test_user_built_optimizer_is_refused_when_signals_learn_modules(make_args):
    teacher, student = tiny_bert(layers=2, hidden=32, seed=1), tiny_bert(layers=1, hidden=16, seed=2)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="user-built optimizer does not hold"):
        DistillationTrainer(model=student, teacher_model=teacher, args=make_args(hidden_weight=1.0),
                            optimizers=(optimizer, None))


# ---- DistilBERT's triple loss on masked-LM pre-training ---------------------------------------------------------


@pytest.fixture
def mlm_setup(tmp_path):
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(55)]
    (tmp_path / "vocab.txt").write_text("\n".join(words))
    tokenizer = BertTokenizer(str(tmp_path / "vocab.txt"))
    import datasets

    g = torch.Generator().manual_seed(0)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(0, 55, (int(n),), generator=g))
             for n in torch.randint(4, 12, (24,), generator=g)]
    data = datasets.Dataset.from_dict({"text": texts}).map(
        lambda b: tokenizer(b["text"]), batched=True, remove_columns=["text"]
    )
    torch.manual_seed(1)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    teacher = BertForMaskedLM(config).eval()
    student = _perturbed(shrink_model(teacher, num_layers=2, strategy="distilbert"))
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.3, seed=0)
    return tokenizer, data, teacher, student, collator


def test_mlm_triple_loss_matches_distilberts_formula(make_args, mlm_setup):
    _, data, teacher, student, collator = mlm_setup
    assert student.config.distilled_from_layers == [0, 3]
    # DistilBERT's weights: 5 x soft-target KL, 2 x MLM, 1 x cosine of the last hidden states
    args = make_args(task_weight=2.0, logits_weight=5.0, hidden_weight=1.0, layer_map="last", temperature=2.0)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                                  data_collator=collator)
    batch = collator([data[i] for i in range(6)])
    masked = batch["labels"] != -100
    assert 0 < masked.sum() < batch["attention_mask"].sum()
    loss = trainer.compute_loss(student, batch)

    out_s = _states(student, batch, output_hidden_states=True)
    out_t = _states(teacher, batch, output_hidden_states=True)
    mlm = -torch.log_softmax(out_s.logits[masked], -1)[torch.arange(int(masked.sum())), batch["labels"][masked]].mean()
    kl = kl_rows(torch.softmax(out_t.logits[masked] / 2, -1), torch.softmax(out_s.logits[masked] / 2, -1)).mean() * 4
    tokens = batch["attention_mask"].bool()
    hs, ht = out_s.hidden_states[-1][tokens], out_t.hidden_states[-1][tokens]
    cosine = (1 - (hs * ht).sum(-1) / (hs.norm(dim=-1) * ht.norm(dim=-1))).mean()
    torch.testing.assert_close(loss, 2.0 * mlm + 5.0 * kl + 1.0 * cosine, rtol=1e-5, atol=1e-6)


def test_mlm_triple_loss_trains_and_logs_each_term(make_args, mlm_setup):
    _, data, teacher, student, collator = mlm_setup
    args = make_args(task_weight=2.0, logits_weight=5.0, hidden_weight=1.0, layer_map="last", max_steps=8,
                     per_device_train_batch_size=6, learning_rate=5e-3, eval_strategy="no")
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                                  eval_dataset=data, data_collator=collator)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    for term in ("task", "logits", "hidden"):
        assert all(math.isfinite(row[f"{term}_loss"]) for row in trainer.state.log_history if "loss" in row)
    assert after["eval_hidden_loss"] < before["eval_hidden_loss"]
    assert after["eval_logits_loss"] < before["eval_logits_loss"]
