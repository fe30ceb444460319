"""Cross-tokenizer distillation: alignment on real tokenizers of three families, the ULD and hybrid losses against
hand formulas, finite differences and TRL's GOLD loss, the one-tokenizer limit, accumulation, and the refusals."""

from __future__ import annotations

import math
from types import SimpleNamespace

import datasets
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, normalizers
from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerFast

from hf_distill import DistillationConfig, DistillationTrainer
from hf_distill.data.alignment import VocabularyMap, align_spans, check_coverage, decoded_offsets, teacher_offsets
from hf_distill.signals.cross_vocab import (
    AlignedSpans,
    SpanSide,
    clamped_jsd,
    hybrid_distance,
    sorted_l1,
    span_log_probs,
)
from hf_distill.signals.logits import aligned_loss_sum
from hf_distill.teachers import CrossTokenizerTeacher

from .conftest import tiny_llama
from .tokenizer_kinds import CORPUS, KINDS

TEXT = "  Unbelievable: the café served 🙂 crème brûlée, naïvely!"
PAIRS = [("byte_bpe", "sentencepiece"), ("byte_bpe", "wordpiece"), ("sentencepiece", "wordpiece"),
         ("sentencepiece", "byte_bpe")]


def spans_of(student_name: str, teacher_name: str, text: str = TEXT):
    student, teacher = KINDS[student_name](), KINDS[teacher_name]()
    decoded, s_off = decoded_offsets(student, student(text, add_special_tokens=False)["input_ids"])
    _, t_off = teacher_offsets(teacher, [decoded])
    return decoded, s_off, t_off[0], align_spans(s_off, t_off[0])


@pytest.mark.parametrize("student_name,teacher_name", PAIRS)
def test_spans_of_three_tokenizer_families_cover_the_same_text(student_name, teacher_name):
    """Byte-level BPE, SentencePiece (Metaspace) and uncased WordPiece on a text with leading spaces, accents and an
    emoji: every span's student tokens and teacher tokens end at the same character, spans follow each other without
    overlap, and together they cover every non-space character (the WordPiece side lowercases, its offsets still
    point into the original)."""
    text, s_off, t_off, spans = spans_of(student_name, teacher_name)
    assert len(spans) >= 8
    previous_end = 0
    for s_idx, t_idx in spans:
        s_end, t_end = s_off[s_idx[-1]][1], t_off[t_idx[-1]][1]
        assert s_end == t_end
        assert min(s_off[i][0] for i in s_idx) >= previous_end - 1  # (byte pieces of one character share it)
        previous_end = s_end
    covered = "".join(text[min(s_off[i][0] for i in s):s_off[s[-1]][1]] for s, _ in spans)
    assert covered.replace(" ", "") == text[: previous_end].replace(" ", "")
    assert previous_end >= len(text.rstrip()) - 1


def test_the_emoji_and_accented_byte_pieces_stay_in_one_span_and_one_word_split_in_three():
    """Byte-level BPE cuts the emoji and 'è' into two pieces each: both pieces land in the same span, never at a
    boundary inside the character; 'Unbelievable' is one SentencePiece token facing three byte-level ones."""
    text, s_off, t_off, spans = spans_of("byte_bpe", "sentencepiece")
    student = KINDS["byte_bpe"]()
    ids = student(text, add_special_tokens=False)["input_ids"]
    pieces = student.convert_ids_to_tokens(ids)
    by_token = {i: (s, t) for s, t in spans for i in s}
    emoji = [i for i, p in enumerate(pieces) if p in ("ĠðŁ", "ĻĤ")]
    assert len(emoji) == 2 and by_token[emoji[0]] == by_token[emoji[1]]
    word = next((s, t) for s, t in spans if "Unbelievable" in text[s_off[s[0]][0]:s_off[s[-1]][1]])
    assert [text[slice(*s_off[i])] for i in word[0]] == [" ", "Unbelievabl", "e"]
    assert [text[slice(*t_off[i])].strip() for i in word[1]] == ["Unbelievable"]
    hand = align_spans([(0, 12)], [(0, 2), (2, 9), (9, 12)])  # a hand-made split in three
    assert hand == [([0], [0, 1, 2])]


def test_special_tokens_and_bos_belong_to_no_span():
    """The SentencePiece teacher adds its BOS: it covers no text and joins no span; a skipped special token in the
    student's ids covers nothing either."""
    student, teacher = KINDS["byte_bpe"](), KINDS["sentencepiece"]()
    ids = student("the teacher", add_special_tokens=False)["input_ids"] + [student.eos_token_id]
    text, s_off = decoded_offsets(student, ids)
    rows, t_off = teacher_offsets(teacher, [text])
    assert rows[0][0] == teacher.bos_token_id and t_off[0][0] == (0, 0)
    assert s_off[-1][0] == s_off[-1][1]
    spans = align_spans(s_off, t_off[0])
    assert all(0 not in t and len(ids) - 1 not in s for s, t in spans)


def test_the_vocabulary_map_matches_decoded_strings_across_space_markers():
    """'Ġthe' (byte-level) and '▁the' (SentencePiece) both spell ' the' and are mapped; a WordPiece continuation
    '##ly' spells 'ly'; special tokens are never mapped; one vocabulary maps onto itself."""
    bpe, sp, wp = KINDS["byte_bpe"](), KINDS["sentencepiece"](), KINDS["wordpiece"]()
    vocab = VocabularyMap.build(bpe, sp)
    pairs = dict(zip(vocab.teacher_ids.tolist(), vocab.student_ids.tolist()))
    assert pairs[sp.convert_tokens_to_ids("▁the")] == bpe.convert_tokens_to_ids("Ġthe")
    assert sp.bos_token_id not in pairs and bpe.eos_token_id not in pairs.values()
    assert 0 < len(vocab) < len(sp)
    wp_map = dict(zip(*(t.tolist() for t in VocabularyMap.build(sp, wp).__dict__.values()
                        if torch.is_tensor(t))))
    if "##ly" in wp.get_vocab() and "ly" in sp.get_vocab():
        assert wp_map[wp.convert_tokens_to_ids("##ly")] == sp.convert_tokens_to_ids("ly")
    assert VocabularyMap.build(bpe, KINDS["byte_bpe"]()).identity


def test_uncovered_text_and_slow_tokenizers_are_refused():
    """A normaliser that deletes characters leaves them uncovered: refused, showing them; a slow tokenizer (no
    offset mapping) is refused naming the fast one."""
    base = KINDS["byte_bpe"]()
    backend = Tokenizer.from_str(base.backend_tokenizer.to_str())
    backend.normalizer = normalizers.Replace("!", "")
    dropping = PreTrainedTokenizerFast(tokenizer_object=backend)
    with pytest.raises(ValueError, match="do not cover the text.*'!'"):
        teacher_offsets(dropping, ["the end!"])
    with pytest.raises(ValueError, match="no token covers 'xyz'"):
        check_coverage("ab xyz", [(0, 2)], "teacher")
    slow = SimpleNamespace(is_fast=False)
    with pytest.raises(ValueError, match="slow tokenizer.*use_fast=True"):
        CrossTokenizerTeacher(SimpleNamespace(models=[]), base, slow)


# ---- the losses ------------------------------------------------------------------------------------------------


def test_uld_and_the_hybrid_equal_their_hand_formulas():
    p_s = torch.tensor([[0.7, 0.2, 0.1]])
    p_t = torch.tensor([[0.1, 0.5, 0.3, 0.1]])
    # sorted: [0.7, 0.2, 0.1, 0] vs [0.5, 0.3, 0.1, 0.1] -> 0.2 + 0.1 + 0 + 0.1
    assert float(sorted_l1(p_s, p_t)) == pytest.approx(0.4)
    # map: teacher 1 <-> student 0, teacher 2 <-> student 1 (2 of 4 teacher ids: w = 0.5)
    vocab = VocabularyMap(torch.tensor([1, 2]), torch.tensor([0, 1]), teacher_size=4, student_size=3)
    a, b = torch.tensor([0.7, 0.2]), torch.tensor([0.5, 0.3])
    m = 0.5 * a + 0.5 * b
    jsd = 0.5 * float((b * (b / m).log()).sum()) + 0.5 * float((a * (a / m).log()).sum())
    rest = abs(0.1 - 0.1) + 0.1  # student [0.1] vs teacher [0.1, 0.1] sorted
    assert float(hybrid_distance(p_s, p_t, vocab, beta=0.5)) == pytest.approx(0.5 * jsd + 0.5 * rest, rel=1e-6)
    assert float(hybrid_distance(p_s, p_t, vocab, 0.5, matched_weight=0.8)) == pytest.approx(
        0.8 * jsd + 0.2 * rest, rel=1e-6)
    assert float(hybrid_distance(p_s, p_t, vocab, 0.5, matched_weight=1.0)) == pytest.approx(jsd, rel=1e-6)
    assert float(hybrid_distance(p_s, p_t, vocab, 0.5, matched_weight=0.0)) == pytest.approx(rest, rel=1e-6)
    assert float(clamped_jsd(a[None], b[None], 0.0)) == pytest.approx(float((b * (b / a).log()).sum()), rel=1e-6)


def test_a_span_distribution_is_the_chain_rule_over_its_tokens():
    """Span of tokens (y1, y2) predicted at rows 0 and 1: P(v) = p(v | y1) * p(y1); a one-token span is its row."""
    torch.manual_seed(0)
    z = torch.randn(3, 5, dtype=torch.float64)
    log_p = F.log_softmax(z, -1)
    tokens = torch.tensor([2, 4, 1])
    out = span_log_probs(z, tokens, torch.tensor([0, 0, 1]), torch.tensor([1, 2]), 2, 1.0)
    assert torch.allclose(out[0], log_p[1] + log_p[0, 2])
    assert torch.allclose(out[1], log_p[2])
    assert math.isclose(float(out[0, 4].exp()), float(log_p[0, 2].exp() * log_p[1, 4].exp()), rel_tol=1e-12)


def hand_spans(vocab, chunk_rows=0):
    """Two student rows / one teacher batch with spans of 1-3 tokens on either side (float64)."""
    student = SpanSide(rows=torch.tensor([0, 1, 2, 5, 6, 7]), tokens=torch.tensor([3, 1, 4, 0, 2, 5]),
                       group=torch.tensor([0, 1, 1, 2, 3, 3]), starts=torch.tensor([0, 1, 3, 4, 6]))
    teacher = SpanSide(rows=torch.arange(8), tokens=torch.tensor([6, 2, 0, 1, 3, 5, 4, 6]),
                       group=torch.tensor([0, 0, 0, 1, 2, 2, 3, 3]), starts=torch.tensor([0, 3, 4, 6, 8]))
    torch.manual_seed(3)
    teacher_logits = torch.randn(8, 7, dtype=torch.float64)
    return AlignedSpans(student, teacher, lambda rows: teacher_logits[rows], vocab, chunk_rows), teacher_logits


@pytest.mark.parametrize("kind", ["uld", "hybrid"])
def test_aligned_losses_have_the_finite_difference_gradient_and_chunking_changes_nothing(kind):
    vocab = VocabularyMap(torch.tensor([0, 2, 3, 5]), torch.tensor([1, 0, 2, 4]), teacher_size=7, student_size=6)
    spans, _ = hand_spans(vocab)
    torch.manual_seed(1)
    z = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    loss = lambda x: aligned_loss_sum(x, spans, kind, temperature=1.5, beta=0.3)  # noqa: E731
    assert torch.autograd.gradcheck(loss, (z,), eps=1e-6, atol=1e-6)
    chunked, _ = hand_spans(vocab, chunk_rows=3)
    assert chunked.chunks() == [(0, 1), (1, 3), (3, 4)]
    with torch.no_grad():
        assert float(aligned_loss_sum(z, chunked, kind, 1.5, 0.3)) == pytest.approx(float(loss(z)), rel=1e-12)
    with pytest.raises(ValueError, match="cannot hold one aligned span of 3 teacher tokens"):
        hand_spans(vocab, chunk_rows=2)[0].chunks()
    none = torch.zeros(0, dtype=torch.long)  # a micro-batch without a counted span: zero, on the student's graph
    empty = SpanSide(none, none, none, torch.zeros(1, dtype=torch.long))
    nothing = aligned_loss_sum(z, AlignedSpans(empty, empty, lambda rows: None, vocab, 3), kind)
    assert float(nothing.detach()) == 0 and nothing.requires_grad


@pytest.mark.parametrize("hybrid", [False, True])
def test_the_losses_equal_trl_gold_on_identical_inputs(hybrid):
    """TRL's GOLD `ULDLoss` (bayesian merge, byte-offset alignment, skipped EOS) and ours on the same logits, tokens
    and offsets: GOLD averages over the aligned groups of a row, ours sums (the trainer divides by the counted
    positions), so ours / groups equals GOLD's value (relative 1e-5)."""
    gold = pytest.importorskip("trl.experimental.gold.gold_trainer")
    torch.manual_seed(0)
    vs, vt = 11, 13
    # answer tokens: student 'un|believ|able| the' + eos, teacher 'unbeliev|able| th|e' + eos (byte offsets)
    s_off = [[0, 0], [0, 2], [2, 8], [8, 12], [12, 16], [16, 16]]
    t_off = [[0, 0], [0, 8], [8, 12], [12, 15], [15, 16], [16, 16]]
    s_ids = torch.tensor([[1, 4, 7, 2, 9, 10]])
    t_ids = torch.tensor([[0, 5, 3, 8, 11, 12]])
    labels_s = torch.tensor([[-100, 4, 7, 2, 9, 10]])
    labels_t = torch.tensor([[-100, 5, 3, 8, 11, 12]])
    z_s = torch.randn(1, 6, vs, dtype=torch.float64)
    z_t = torch.randn(1, 6, vt, dtype=torch.float64)
    matched = {5: 4, 3: 7, 8: 2, 0: 1}  # teacher id -> student id
    config = SimpleNamespace(uld_crossentropy_weight=0.0, uld_distillation_weight=1.0, uld_student_temperature=1.0,
                             uld_teacher_temperature=1.0, uld_skip_student_eos=True, uld_skip_teacher_eos=True,
                             use_extended_uld=True, uld_token_merge_strategy="bayesian", uld_use_hybrid_loss=hybrid,
                             uld_hybrid_matched_weight=None, uld_hybrid_unmatched_weight=None, beta=0.5)
    loss = gold.ULDLoss(config)
    if hybrid:
        loss._vocab_mapping = matched
        loss._teacher_matched_ids, loss._student_matched_ids = set(matched), set(matched.values())
        loss.mapping_tensor = torch.full((max(matched) + 1,), -1, dtype=torch.long)
        for t, s in matched.items():
            loss.mapping_tensor[t] = s
    theirs = float(loss(z_s, z_t, labels_s, labels_t, s_ids, t_ids, torch.tensor([s_off]), torch.tensor([t_off])))
    # ours: the same groups from our alignment of the same offsets, predicting rows = token index - 1
    groups = align_spans([tuple(o) for o in s_off[1:5]], [tuple(o) for o in t_off[1:5]])
    assert groups == [([0, 1], [0]), ([2], [1]), ([3], [2, 3])]
    assert [len(g) for g in loss._align_by_byte_offsets(s_off[1:5], t_off[1:5])[0]] == [2, 1, 1]

    def side(grouped, ids):
        rows = [i for g in grouped for i in g]
        starts = [0]
        for g in grouped:
            starts.append(starts[-1] + len(g))
        return SpanSide(torch.tensor(rows), ids[0, 1:5][torch.tensor(rows)],
                        torch.tensor([k for k, g in enumerate(grouped) for _ in g]), torch.tensor(starts))

    vocab = None
    if hybrid:
        ordered = sorted(matched)
        vocab = VocabularyMap(torch.tensor(ordered), torch.tensor([matched[t] for t in ordered]), vt, vs)
    spans = AlignedSpans(side([g for g, _ in groups], s_ids), side([g for _, g in groups], t_ids),
                         lambda rows: z_t[0, :5][rows], vocab)
    ours = float(aligned_loss_sum(z_s[:, :5], spans, "hybrid" if hybrid else "uld", 1.0, 0.5)) / len(groups)
    assert ours == pytest.approx(theirs, rel=1e-5)


# ---- through the trainer -----------------------------------------------------------------------------------------


def lm_rows(tokenizer, texts, length=40):
    return datasets.Dataset.from_dict({"text": list(texts)}).map(
        lambda r: tokenizer(r["text"], truncation=True, max_length=length), remove_columns=["text"])


def cross_trainer(tmp_path, student_tok, teacher_tok, texts=CORPUS[:8], teacher_vocab=None, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, save_strategy="no",
                  per_device_train_batch_size=4, max_steps=2, logging_steps=1, disable_tqdm=True, seed=0,
                  logits_loss="hybrid", temperature=1.0, task_weight=0.5, logits_weight=1.0, optim="sgd",
                  learning_rate=1.0, lr_scheduler_type="constant", train_sampling_strategy="sequential",
                  weight_decay=0.0)
    values.update(overrides)
    return DistillationTrainer(
        model=tiny_llama(vocab=len(student_tok), layers=1, seed=2),
        teacher_model=tiny_llama(vocab=teacher_vocab or len(teacher_tok), seed=1), args=DistillationConfig(**values),
        train_dataset=lm_rows(student_tok, texts), data_collator=DataCollatorForLanguageModeling(student_tok, mlm=False),
        processing_class=student_tok, teacher_processing_class=teacher_tok)


def losses(trainer):
    return [log.get(k) for log in trainer.state.log_history if "loss" in log
            for k in ("loss", "task_loss", "logits_loss", "hidden_loss")]


@pytest.mark.parametrize("kind", ["uld", "hybrid"])
def test_one_tokenizer_forced_through_the_alignment_path_gives_the_same_vocabulary_loss(tmp_path, kind):
    """align_tokenizers='always' with the student's own tokenizer: every span is one token, so the run's losses
    (the output term, and hidden states pooled over spans with a projection between widths) equal those of the plain
    same-vocabulary run (relative 3e-5: float32 rounding, the span path forms exp(log_softmax)
    where the plain one takes softmax; the task term and the total agree to 1e-6)."""
    tokenizer = KINDS["byte_bpe"]()
    texts = ["the teacher distilled a small student model", "tokenizers disagree about where words end",
             "distillation transfers knowledge from a large teacher", "leading spaces are part of the text"] * 2
    hidden = dict(hidden_weight=0.5, hidden_span_pooling="mean")
    aligned = cross_trainer(tmp_path / "a", tokenizer, tokenizer, texts, logits_loss=kind, align_tokenizers="always",
                            **hidden)
    assert isinstance(aligned.teacher_source, CrossTokenizerTeacher)
    aligned.train()
    plain = cross_trainer(tmp_path / "p", tokenizer, None, texts, teacher_vocab=len(tokenizer), logits_loss=kind,
                          **hidden)
    assert not isinstance(plain.teacher_source, CrossTokenizerTeacher)
    plain.train()
    assert losses(aligned) == pytest.approx(losses(plain), rel=3e-5)
    # step 1 (same parameters): the task and the span-pooled hidden term to 1e-6
    assert losses(aligned)[1:4:2] == pytest.approx(losses(plain)[1:4:2], rel=1e-6)
    assert aligned.state.log_history[0]["span_share"] == 1.0


def one_step_update(tmp_path, batch_size, accumulation, name, **overrides):
    trainer = cross_trainer(tmp_path / name, KINDS["byte_bpe"](), KINDS["sentencepiece"](), max_steps=1,
                            per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
                            **overrides)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    return torch.cat([(p.detach() - b).flatten() for p, b in zip(trainer.model.parameters(), before)]), trainer


def test_across_tokenizers_accumulation_equals_one_big_batch_and_spans_are_logged(tmp_path):
    """Byte-level BPE student, SentencePiece teacher (another vocabulary size): GA=2 x 2 rows updates exactly like
    1 x 4 rows (the output term is summed over spans and divided by the step's counted student positions, the
    span-pooled hidden term by its tokens); the teacher's logits in chunks of 8 rows give the same update; aligned
    spans are logged."""
    hidden = dict(hidden_weight=0.5, hidden_span_pooling="mean")  # (teacher width 32, student 32: no projection)
    big, trainer = one_step_update(tmp_path, 4, 1, "big", **hidden)
    accumulated, _ = one_step_update(tmp_path, 2, 2, "ga", **hidden)
    chunked, _ = one_step_update(tmp_path, 4, 1, "chunked", logits_chunk_size=8, **hidden)
    assert big.norm() > 0
    assert float((big - accumulated).norm() / big.norm()) < 1e-5
    assert float((big - chunked).norm() / big.norm()) < 1e-5
    log = trainer.state.log_history[0]
    assert log["aligned_spans"] > 10 and 0 < log["span_share"] < 1 and log["logits_loss"] > 0
    assert log["hidden_loss"] > 0


def test_bad_cross_tokenizer_settings_are_refused_before_training(tmp_path):
    student, teacher = KINDS["byte_bpe"](), KINDS["sentencepiece"]()
    with pytest.raises(ValueError, match="hidden_weight=1.0 matches hidden states token by token.*"
                                         "hidden_span_pooling='mean'"):
        cross_trainer(tmp_path, student, teacher, hidden_weight=1.0)
    with pytest.raises(ValueError, match="attention_weight=1.0 compares the models token by token"):
        cross_trainer(tmp_path, student, teacher, attention_weight=1.0)
    with pytest.raises(ValueError, match="logits_loss='forward_kl'.*'hybrid'"):
        cross_trainer(tmp_path, student, teacher, logits_loss="forward_kl")
    with pytest.raises(ValueError, match="seq_kd=True"):
        cross_trainer(tmp_path, student, teacher, seq_kd=True)
    with pytest.raises(ValueError, match="align_tokenizers='always'.*teacher_processing_class"):
        cross_trainer(tmp_path, student, None, teacher_vocab=len(student), align_tokenizers="always")
    with pytest.raises(ValueError, match="cannot hold one aligned span"):
        cross_trainer(tmp_path, student, teacher, [TEXT] * 4, logits_chunk_size=1, max_steps=1).train()


def test_distill_command_with_a_student_of_another_tokenizer_saves_a_student_of_its_own_tokenizer(tmp_path):
    """`hf-distill distill --student S` whose tokenizer differs from the teacher's: the data is tokenised for the
    student, the teacher is aligned (spans logged), and the saved student and its own tokenizer load with plain
    `from_pretrained`; the teacher is not scored on student tokens; a token-by-token loss and a cache are refused
    before any model loads."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_distill.cli.jobs import distill_main

    from .test_chat_data import _argv

    student_tok, teacher_tok = KINDS["byte_bpe"](), KINDS["sentencepiece"]()
    for name, tok, seed in (("teacher", teacher_tok, 1), ("student_in", student_tok, 2)):
        tiny_llama(vocab=len(tok), layers=1, seed=seed).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    data = tmp_path / "news.txt"
    data.write_text("\n".join(CORPUS))
    argv = _argv(tmp_path, tmp_path / "teacher", data, "--student", str(tmp_path / "student_in"), "--logits_loss",
                 "hybrid", "--block_size", "32", "--logging_steps", "1", "--temperature", "1")
    summary = distill_main(argv)
    out = tmp_path / "student"
    assert AutoTokenizer.from_pretrained(out).get_vocab() == student_tok.get_vocab()
    assert AutoModelForCausalLM.from_pretrained(out).config.vocab_size == len(student_tok)
    report = (out / "_report" / "report.md").read_text()
    assert "aligned_spans" in report and "span_share" in report
    rows = {name: (teacher, student) for name, teacher, student in summary["rows"]}
    assert rows["held-out perplexity"][0] == "-" and float(rows["held-out perplexity"][1]) > 1
    with pytest.raises(ValueError, match="cross-tokenizer run, which cannot use: --logits_loss forward_kl"):
        distill_main([*argv, "--logits_loss", "forward_kl", "--output_dir", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="--teacher_cache"):
        distill_main([*argv, "--teacher_cache", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "y")])


def test_on_policy_samples_are_decoded_and_aligned_for_a_teacher_of_another_tokenizer(tmp_path):
    """lmbda=1 with a SentencePiece teacher: the student's (fixed) samples are student tokens; the teacher scores
    them after decoding and re-tokenising, so spans count on the completions only, and training runs."""
    from hf_distill.data.chat import prepare_chat_dataset
    from hf_distill.teachers import SampledCompletions

    student_tok, teacher_tok = KINDS["byte_bpe"](), KINDS["sentencepiece"]()
    prompts = ["The café served", "Distillation transfers", "Tokenizers disagree about", "Emoji like"]
    rows, collator = prepare_chat_dataset(datasets.Dataset.from_dict(
        {"prompt": prompts, "completion": [" crème brûlée.", " knowledge.", " words.", " 🙂 show up."]}), student_tok)
    answer = student_tok(" a small student model", add_special_tokens=False)["input_ids"]
    trainer = DistillationTrainer(
        model=tiny_llama(vocab=len(student_tok), layers=1, seed=2), teacher_model=tiny_llama(vocab=len(teacher_tok)),
        args=DistillationConfig(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, save_strategy="no",
                                per_device_train_batch_size=4, max_steps=2, logging_steps=1, disable_tqdm=True,
                                lmbda=1.0, max_new_tokens=8, logits_loss="uld", task_weight=0.0, temperature=1.0),
        train_dataset=rows, data_collator=collator, processing_class=student_tok, teacher_processing_class=teacher_tok)
    source = trainer.teacher_source
    assert isinstance(source, SampledCompletions) and isinstance(source.inner, CrossTokenizerTeacher)
    source.generate_fn = lambda model, prompts, settings, seed: [answer + [settings.stop_ids[0]] for _ in prompts]
    trainer.train()
    log = trainer.state.log_history[0]
    # " a small student model" + stop per row: 4 spans of words, the stop token (special) in none
    assert log["generated_tokens"] == 4 * (len(answer) + 1)
    assert 0 < log["aligned_spans"] <= 4 * len(answer) and log["logits_loss"] > 0


GEMMA_LIKE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else "
              "m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}"
              "<start_of_turn>model\n{% endif %}")


def chat_version(make, template, specials, eos):
    import copy

    tokenizer = copy.deepcopy(make())
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.eos_token = eos
    tokenizer.chat_template = template
    return tokenizer


def test_chat_rows_reach_the_teacher_in_its_own_template_and_only_the_answers_are_aligned(tmp_path):
    """A ChatML byte-level student and a Gemma-style SentencePiece teacher: each row's prompt reaches the teacher in
    the teacher's own template (`data.with_teacher_prompts`), followed by the teacher's tokens of the student's
    answer text; the spans cover the answers only (no template text is aligned); a conversation with two answers is
    refused."""
    from hf_distill.data.chat import prepare_chat_dataset
    from hf_distill.data.loading import with_teacher_prompts

    from .test_chat_data import CHATML

    student_tok = chat_version(KINDS["byte_bpe"], CHATML, ["<|im_start|>", "<|im_end|>"], "<|im_end|>")
    teacher_tok = chat_version(KINDS["sentencepiece"], GEMMA_LIKE, ["<start_of_turn>", "<end_of_turn>"],
                               "<end_of_turn>")
    questions = ["What did the café serve?", "Why distil?", "Where do words end?", "Which emoji show up?"]
    answers = ["crème brûlée", "knowledge transfers", "tokenizers disagree", "🙂 and 🚀"]
    raw = datasets.Dataset.from_dict({"prompt": [[{"role": "user", "content": q}] for q in questions],
                                      "completion": [[{"role": "assistant", "content": a}] for a in answers]})
    rows, collator = prepare_chat_dataset(with_teacher_prompts(raw, teacher_tok), student_tok)
    assert "teacher_prompt_ids" in rows.column_names
    trainer = DistillationTrainer(
        model=tiny_llama(vocab=len(student_tok), layers=1, seed=2), teacher_model=tiny_llama(vocab=len(teacher_tok)),
        args=DistillationConfig(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, save_strategy="no",
                                per_device_train_batch_size=4, max_steps=1, logging_steps=1, disable_tqdm=True,
                                logits_loss="hybrid", temperature=1.0, train_sampling_strategy="sequential"),
        train_dataset=rows, data_collator=collator, processing_class=student_tok, teacher_processing_class=teacher_tok)
    inner, seen = trainer.teacher_source.inner, []
    original = inner.outputs
    inner.outputs = lambda inputs, request: seen.append(inputs["input_ids"].clone()) or original(inputs, request)
    trainer.train()
    for row, question, answer in zip(seen[0].tolist(), questions, answers):
        prompt = teacher_tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                 add_generation_prompt=True)
        expected = (teacher_tok(prompt, add_special_tokens=False)["input_ids"]
                    + teacher_tok(answer, add_special_tokens=False)["input_ids"])
        assert row[: len(expected)] == expected
        assert "<|im_start|>" not in teacher_tok.decode(row) and "<start_of_turn>model" in teacher_tok.decode(row)
    answer_tokens = sum(len(student_tok(a, add_special_tokens=False)["input_ids"]) for a in answers)
    log = trainer.state.log_history[0]
    assert 4 <= log["aligned_spans"] <= answer_tokens and log["logits_loss"] > 0
    # on-policy: the student's samples follow the teacher's rendering of the same prompts
    sample = student_tok(" tokenizers disagree", add_special_tokens=False)["input_ids"]
    on_policy = DistillationTrainer(
        model=tiny_llama(vocab=len(student_tok), layers=1, seed=2), teacher_model=tiny_llama(vocab=len(teacher_tok)),
        args=DistillationConfig(output_dir=str(tmp_path / "op"), report_to=[], use_cpu=True, save_strategy="no",
                                per_device_train_batch_size=4, max_steps=1, disable_tqdm=True, lmbda=1.0,
                                max_new_tokens=6, logits_loss="uld", temperature=1.0, num_generations=2,
                                train_sampling_strategy="sequential"),
        train_dataset=rows, data_collator=collator, processing_class=student_tok, teacher_processing_class=teacher_tok)
    on_policy.teacher_source.generate_fn = lambda m, p, settings, seed: [sample + [settings.stop_ids[0]] for _ in p * 2]
    inner, seen = on_policy.teacher_source.inner.inner, []
    original = inner.outputs
    inner.outputs = lambda inputs, request: seen.append(inputs["input_ids"].clone()) or original(inputs, request)
    on_policy.train()
    assert seen[0].shape[0] == 8
    for r, row in enumerate(seen[0].tolist()):
        prompt = teacher_tok.apply_chat_template([{"role": "user", "content": questions[r // 2]}], tokenize=False,
                                                 add_generation_prompt=True)
        expected = (teacher_tok(prompt, add_special_tokens=False)["input_ids"]
                    + teacher_tok(student_tok.decode(sample), add_special_tokens=False)["input_ids"])
        assert row[: len(expected)] == expected
    two_answers = datasets.Dataset.from_dict({"messages": [[
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]]})
    with pytest.raises(ValueError, match="2 assistant turns cannot be aligned"):
        with_teacher_prompts(two_answers, teacher_tok)
    # the command line does the same with chat data and a --student of another tokenizer
    from hf_distill.cli.jobs import distill_main

    from .test_chat_data import _argv

    for name, tok, seed in (("teacher", teacher_tok, 1), ("student_in", student_tok, 2)):
        tiny_llama(vocab=len(tok), layers=1, seed=seed).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    data = tmp_path / "chat.jsonl"
    raw.to_json(str(data))
    summary = distill_main(_argv(tmp_path, tmp_path / "teacher", data, "--student", str(tmp_path / "student_in"),
                                 "--logits_loss", "hybrid", "--logging_steps", "1"))
    assert float(dict((n, s) for n, _, s in summary["rows"])["held-out perplexity"]) > 1
