"""On-policy distillation (lmbda, seq_kd, the sampled-token estimator): what counts in a sampled batch, exactness under
accumulation and resume, the off-policy limit, the estimator's expected gradient, and the refusals."""

from __future__ import annotations

import datasets
import pytest
import torch
import torch.nn.functional as F

from hf_distill import DistillationConfig, DistillationTrainer
from hf_distill.data.chat import prepare_chat_dataset
from hf_distill.signals.logits import reverse_kl, sampled_token_kl
from hf_distill.teachers import SampledCompletions
from hf_distill.teachers.sampled import prompt_rows, sample_completions

from .conftest import lm_dataset, tiny_llama
from .test_chat_data import CHATML, chat_tokenizer

VOCAB = 24  # the chat tokenizer's size: every sampled id is one of its tokens
QUESTIONS = ["hello", "how are you", "hi there", "hello how are you", "are you fine", "hi", "you there", "how are"]
ANSWERS = ["fine thanks", "ok", "hi there how are you", "thanks", "fine", "ok ok ok thanks", "hello", "be brief ok"]


def chat_rows(n: int = 8) -> datasets.Dataset:
    return datasets.Dataset.from_list([
        {"prompt": [{"role": "user", "content": QUESTIONS[i % 8]}],
         "completion": [{"role": "assistant", "content": ANSWERS[i % 8]}]} for i in range(n)])


def setup(eos: str = "<|im_end|>", n: int = 8):
    tokenizer = chat_tokenizer(CHATML, eos)
    rows, collator = prepare_chat_dataset(chat_rows(n), tokenizer)
    return tokenizer, rows, collator


def trainer_for(tmp_path, tokenizer, rows, collator, student=None, **overrides) -> DistillationTrainer:
    values = dict(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, save_strategy="no",
                  per_device_train_batch_size=4, max_steps=2, logging_steps=1, disable_tqdm=True, seed=0,
                  lmbda=1.0, max_new_tokens=6, logits_loss="reverse_kl", temperature=1.0, task_weight=0.0,
                  logits_weight=1.0, optim="sgd", learning_rate=1.0, lr_scheduler_type="constant",
                  train_sampling_strategy="sequential", weight_decay=0.0)
    values.update(overrides)
    return DistillationTrainer(model=student or tiny_llama(vocab=VOCAB, layers=1, seed=2),
                               teacher_model=tiny_llama(vocab=VOCAB, seed=1), args=DistillationConfig(**values),
                               train_dataset=rows, data_collator=collator, processing_class=tokenizer)


def collated(collator, rows, indices):
    return collator([rows[i] for i in indices])


@pytest.mark.parametrize("eos", ["<|im_end|>", "<pad>"])
def test_a_sampled_batch_counts_exactly_the_completion_tokens_up_to_the_stop_token(tmp_path, eos):
    """Real sampling from a tiny student: each row is its prompt + the sampled completion; the counted positions are
    exactly the completion tokens, the stop token that ends one included, the padding after it never, also when the
    pad token is the end-of-sequence token (eos="<pad>": the tokenizer pads with its eos)."""
    tokenizer, rows, collator = setup()
    if eos == "<pad>":
        tokenizer.eos_token = "<pad>"
    assert (tokenizer.pad_token_id == tokenizer.eos_token_id) == (eos == "<pad>")
    trainer = trainer_for(tmp_path, tokenizer, rows, collator, max_new_tokens=12, num_generations=4)
    source = trainer.teacher_source
    assert isinstance(source, SampledCompletions)
    stops = set(source.settings.stop_ids)
    original = collated(collator, rows, range(4))
    seen = []
    source.generate_fn = lambda *a: seen.append(sample_completions(*a)) or seen[-1]
    batch = source.prepare_batch(original, trainer.model, (0, 0))
    completions = seen[0]
    assert len(completions) == 16 and batch["input_ids"].shape[0] == 16
    assert any(len(c) < 12 for c in completions) and any(len(c) == 12 for c in completions)  # stopped and cut off
    for r, completion in enumerate(completions):
        prompt_length = int((original["labels"][r // 4] == -100).logical_and(original["attention_mask"][r // 4] == 1)
                            .sum()) - 0
        prompt = original["input_ids"][r // 4][:prompt_length].tolist()
        assert batch["input_ids"][r][:prompt_length].tolist() == prompt
        counted = (batch["labels"][r] != -100).nonzero().flatten().tolist()
        assert counted == list(range(prompt_length, prompt_length + len(completion)))
        assert batch["input_ids"][r][counted].tolist() == completion
        assert all(t not in stops for t in completion[:-1])  # it ends at its first stop token
        assert int(batch["attention_mask"][r].sum()) == prompt_length + len(completion)
    # the trainer counts the positions that predict those tokens: one per completion token
    counts = trainer.accounting.measure(batch).counts
    assert int(counts["positions"]) == sum(map(len, completions))


def fixed_completions(lengths: dict[int, int]):
    """Deterministic 'generations': a completion whose length depends on the prompt (ragged), ending in the stop."""
    def generate(model, prompts, settings, seed):
        out = []
        for p in prompts:
            n = lengths.setdefault(len(p) + sum(p) % 5, 1 + (len(p) * 7 + sum(p)) % 6)
            out.append([4 + (sum(p) + j) % 18 for j in range(n - 1)] + [settings.stop_ids[0]])
        return out
    return generate


def one_step_update(tmp_path, batch_size: int, accumulation: int, name: str) -> torch.Tensor:
    tokenizer, rows, collator = setup()
    trainer = trainer_for(tmp_path / name, tokenizer, rows, collator, per_device_train_batch_size=batch_size,
                          gradient_accumulation_steps=accumulation, max_steps=1, task_weight=0.5,
                          logits_loss="jsd", jsd_beta=0.5)
    trainer.teacher_source.generate_fn = fixed_completions({})
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    return torch.cat([(p.detach() - b).flatten() for p, b in zip(trainer.model.parameters(), before)])


def test_accumulating_two_sampled_micro_batches_equals_one_batch_of_twice_the_size(tmp_path):
    """Fixed, ragged generations (1 to 6 tokens): GA=2 x 2 rows updates exactly like 1 x 4 rows (the counted
    completion tokens are summed over the optimizer step after generation)."""
    big = one_step_update(tmp_path, 4, 1, "big")
    accumulated = one_step_update(tmp_path, 2, 2, "ga")
    assert big.norm() > 0
    assert float((big - accumulated).norm() / big.norm()) < 1e-5


def test_the_dataset_completions_given_back_as_generations_reproduce_the_off_policy_run(tmp_path):
    """lmbda=1 whose 'student samples' are each row's own dataset completion trains exactly like the off-policy run
    (lmbda=0) on the same rows: the rewritten batch is the collated one, and every loss matches."""
    tokenizer, rows, collator = setup()
    answers = {}
    for row in rows:
        first = next(i for i, label in enumerate(row["labels"]) if label != -100)
        answers[tuple(row["input_ids"][:first])] = row["input_ids"][first:]

    def own_completions(model, prompts, settings, seed):
        return [list(answers[tuple(p)]) for p in prompts]

    runs = {}
    for lmbda in (0.0, 1.0):
        trainer = trainer_for(tmp_path / str(lmbda), tokenizer, rows, collator, lmbda=lmbda, max_steps=3,
                              task_weight=0.5, logits_loss="forward_kl", temperature=2.0)
        if lmbda:
            trainer.teacher_source.generate_fn = own_completions
        else:
            assert not isinstance(trainer.teacher_source, SampledCompletions)  # off-policy: no wrapper, no cost
        trainer.train()
        runs[lmbda] = [log[k] for log in trainer.state.log_history if "loss" in log
                       for k in ("loss", "task_loss", "logits_loss")]
    assert runs[0.0] == pytest.approx(runs[1.0], rel=1e-6, abs=1e-9)
    batch = collated(collator, rows, range(4))
    trainer.teacher_source.generate_fn = own_completions
    rewritten = trainer.teacher_source.prepare_batch(batch, trainer.model, (0, 0))
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(rewritten[key], batch[key]), key


def test_lmbda_picks_micro_batches_from_seed_and_step_alike_everywhere(tmp_path):
    """lmbda=0.5: about half the micro-batches are sampled, decided by (seed, step, micro-batch) only."""
    tokenizer, rows, collator = setup()
    trainer = trainer_for(tmp_path, tokenizer, rows, collator, lmbda=0.5)
    picks = [trainer.teacher_source.samples_student(step, micro) for step in range(400) for micro in range(2)]
    again = [trainer.teacher_source.samples_student(step, micro) for step in range(400) for micro in range(2)]
    assert picks == again and 0.42 < sum(picks) / len(picks) < 0.58


def run_logged(tmp_path, name, resume=None, max_steps=4, record=None):
    tokenizer, rows, collator = setup()
    trainer = trainer_for(tmp_path / "run", tokenizer, rows, collator, per_device_train_batch_size=2, max_steps=max_steps,
                          save_strategy="steps", save_steps=2, learning_rate=0.5, lmbda=0.5, seq_kd=True,
                          generation_temperature=1.3)

    def recording(model, prompts, settings, seed):
        out = sample_completions(model, prompts, settings, seed)
        record.append(out)
        return out

    trainer.teacher_source.generate_fn = recording
    trainer.train(resume_from_checkpoint=resume)
    return {log["step"]: log["loss"] for log in trainer.state.log_history if "loss" in log}


def test_resuming_mid_run_samples_the_same_completions_and_losses(tmp_path):
    """lmbda=0.5 with seq_kd (student and teacher both sample): a run resumed from its step-2 checkpoint draws the
    same completions at steps 3-4 and logs the same losses (1e-6) as the uninterrupted run."""
    full_record: list = []
    full = run_logged(tmp_path / "a", "full", record=full_record)
    resumed_record: list = []
    import shutil
    shutil.rmtree(tmp_path / "a" / "run" / "out" / "checkpoint-4")
    resumed = run_logged(tmp_path / "a", "resumed", resume=str(tmp_path / "a" / "run" / "out" / "checkpoint-2"),
                         record=resumed_record)
    assert sorted(resumed) == [1, 2, 3, 4]  # steps 1-2 come from the checkpoint's state
    assert resumed[3] == pytest.approx(full[3], rel=1e-6) and resumed[4] == pytest.approx(full[4], rel=1e-6)
    assert resumed_record == full_record[-len(resumed_record):] and resumed_record


def test_sampled_token_estimator_has_the_reverse_kl_gradient_in_expectation():
    """Monte Carlo on a tiny Llama: the mean over 80,000 tokens y ~ p_s per position of the gradient of
    `sampled_token_kl` matches the gradient of the full KL(p_s || p_t) (relative error < 2.5%; measured 1.4%, falling
    as 1/sqrt(samples): 3.5% at 20k, 0.7% at 320k), and its mean value matches the KL itself (3%)."""
    student, teacher = tiny_llama(vocab=VOCAB, layers=1, seed=2), tiny_llama(vocab=VOCAB, seed=1)
    ids = torch.tensor([[5, 9, 3, 12, 7, 20]])
    with torch.no_grad():
        z_t = teacher(input_ids=ids).logits[0]
    samples = 80_000

    def gradient(estimate: bool):
        student.zero_grad()
        z_s = student(input_ids=ids).logits[0]
        if estimate:
            generator = torch.Generator().manual_seed(0)
            y = torch.multinomial(F.softmax(z_s.detach(), -1), samples, replacement=True, generator=generator)
            rows = z_s.unsqueeze(1).expand(-1, samples, -1).reshape(-1, VOCAB)
            value = sampled_token_kl(rows, z_t.unsqueeze(1).expand(-1, samples, -1).reshape(-1, VOCAB),
                                     y.reshape(-1)).sum() / samples
        else:
            value = reverse_kl(z_s, z_t).sum()
        value.backward()
        return float(value.detach()), torch.cat([p.grad.flatten() for p in student.parameters()])

    value_mc, grad_mc = gradient(True)
    value_exact, grad_exact = gradient(False)
    assert grad_exact.norm() > 0
    assert float((grad_mc - grad_exact).norm() / grad_exact.norm()) < 0.025
    assert value_mc == pytest.approx(value_exact, rel=0.03)


def test_sampled_token_is_a_logits_loss_on_both_output_paths(tmp_path):
    """`logits_loss="sampled_token"` trains on-policy; the chunked and full-logits paths give the same losses."""
    losses = {}
    for chunk in ("auto", 0):
        tokenizer, rows, collator = setup()
        trainer = trainer_for(tmp_path / str(chunk), tokenizer, rows, collator, logits_loss="sampled_token",
                              logits_chunk_size=chunk)
        trainer.teacher_source.generate_fn = fixed_completions({})
        trainer.train()
        losses[chunk] = [log["logits_loss"] for log in trainer.state.log_history if "logits_loss" in log]
    assert losses["auto"] == pytest.approx(losses[0], rel=1e-5) and len(losses[0]) == 2


def test_prompt_only_rows_train_on_policy(tmp_path):
    """Prompt-only rows (no completion at all) are the prompts of lmbda=1; with lmbda < 1 they are refused."""
    tokenizer = chat_tokenizer(CHATML, "<|im_end|>")
    prompts = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": q}]} for q in QUESTIONS])
    rows, collator = prepare_chat_dataset(prompts, tokenizer, prompts=True)
    assert all(set(row["labels"]) == {-100} for row in rows)
    trainer = trainer_for(tmp_path, tokenizer, rows, collator)
    trainer.train()
    assert all(log["generated_tokens"] > 0 and log["sampled_share"] == 1.0
               for log in trainer.state.log_history if "loss" in log)
    with pytest.raises(ValueError, match="prompts alone.*lmbda=1.*seq_kd"):
        trainer_for(tmp_path, tokenizer, rows, collator, lmbda=0.5)


def test_bad_on_policy_settings_are_refused_before_training(tmp_path):
    tokenizer, rows, collator = setup()
    with pytest.raises(ValueError, match="lmbda must lie in \\[0, 1\\]"):
        DistillationConfig(output_dir=str(tmp_path), lmbda=1.5)
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        DistillationConfig(output_dir=str(tmp_path), max_new_tokens=0)
    from .conftest import tiny_bert
    with pytest.raises(ValueError, match="only a causal LM writes"):
        DistillationTrainer(model=tiny_bert(), teacher_model=tiny_bert(seed=1),
                            args=DistillationConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, lmbda=1.0),
                            train_dataset=rows, processing_class=tokenizer)
    with pytest.raises(ValueError, match="has no prompt"):  # plain LM rows: the first token counts
        trainer_for(tmp_path, tokenizer, lm_dataset(n=4).map(lambda r: {"labels": r["input_ids"]}), collator)
    with pytest.raises(ValueError, match="exceeds the model's context of 64.*at most"):
        trainer_for(tmp_path, tokenizer, rows, collator, max_new_tokens=60)
    with pytest.raises(ValueError, match="processing_class=tokenizer"):
        DistillationTrainer(model=tiny_llama(vocab=VOCAB), teacher_model=tiny_llama(vocab=VOCAB, seed=1),
                            args=DistillationConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, lmbda=1.0),
                            train_dataset=rows, data_collator=collator)
    no_pad = chat_tokenizer(CHATML, "<|im_end|>")
    no_pad.pad_token = None
    with pytest.raises(ValueError, match="no pad token.*tokenizer.pad_token = tokenizer.eos_token"):
        trainer_for(tmp_path, no_pad, rows, collator)
    packed, packed_collator = prepare_chat_dataset(chat_rows(), tokenizer, max_length=40, packing=True)
    with pytest.raises(ValueError, match="without packing"):
        trainer_for(tmp_path, tokenizer, packed, packed_collator)


def test_an_offline_cache_cannot_score_new_samples(tmp_path):
    from hf_distill.data.teacher_cache import build_teacher_cache, load_teacher_cache

    tokenizer, rows, collator = setup()
    path = build_teacher_cache(tiny_llama(vocab=VOCAB, seed=1), rows, str(tmp_path / "cache"), tokenizer=tokenizer,
                               top_k=4, data_collator=collator, teacher_id="t")
    cache = load_teacher_cache(path, tokenizer)
    args = DistillationConfig(output_dir=str(tmp_path / "o"), report_to=[], use_cpu=True, lmbda=0.5, temperature=1.0)
    with pytest.raises(ValueError, match="offline teacher cache.*set lmbda=0"):
        DistillationTrainer(model=tiny_llama(vocab=VOCAB), args=args, train_dataset=cache, data_collator=collator,
                            processing_class=tokenizer)
    # sampled_token needs student samples (lmbda > 0), which a cache cannot score: refused at the config already
    with pytest.raises(ValueError, match="sampled_token' is an on-policy estimator"):
        DistillationConfig(output_dir=str(tmp_path / "o"), report_to=[], use_cpu=True, logits_loss="sampled_token",
                           temperature=1.0)
    from hf_distill.signals.logits import check_cacheable

    with pytest.raises(ValueError, match="sampled_token.*top-k cache"):
        check_cacheable("sampled_token")


def test_distill_command_on_policy_on_prompts_alone_saves_a_student_that_answers(tmp_path):
    """`hf-distill distill --lmbda 1` on prompt-only data: trains on the student's own samples (logged), saves a
    student that stops at the template's end of turn; a teacher cache or another task is refused before loading."""
    from transformers import GenerationConfig

    from hf_distill.cli.jobs import distill_main

    from .test_chat_data import PROMPTS, _argv, _chat_teacher

    teacher, tokenizer = _chat_teacher(tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    datasets.Dataset.from_dict({"prompt": PROMPTS * 2}).to_json(str(prompts))
    argv = _argv(tmp_path, teacher, prompts, "--student_layers", "1", "--lmbda", "1", "--max_new_tokens", "5",
                 "--logits_loss", "reverse_kl", "--temperature", "1", "--task_weight", "0", "--logging_steps", "1")
    summary = distill_main(argv)
    out = tmp_path / "student"
    assert (out / "model.safetensors").is_file() and summary["rows"]
    assert GenerationConfig.from_pretrained(out).eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    report = (out / "_report" / "report.md").read_text()
    assert "generated_tokens" in report and "sampled_share" in report
    with pytest.raises(ValueError, match="teacher_cache cannot score"):
        distill_main([*argv, "--teacher_cache", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="only causal LMs write"):
        distill_main([*[a if a != "causal-lm" else "sequence-classification" for a in argv],
                      "--output_dir", str(tmp_path / "y")])


def test_a_lora_student_samples_with_its_adapters_and_its_base_model_teaches_and_writes_seq_kd(tmp_path):
    """Self-distillation of a LoRA student (no teacher model): the student samples with its adapters on; seq_kd
    completions come from the base model (adapters off), and a run trains on both."""
    import copy

    from peft import LoraConfig

    tokenizer, rows, collator = setup()
    base = tiny_llama(vocab=VOCAB, layers=1, seed=2)
    plain = copy.deepcopy(base)
    args = DistillationConfig(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, save_strategy="no",
                              per_device_train_batch_size=4, max_steps=2, logging_steps=1, disable_tqdm=True,
                              lmbda=0.5, seq_kd=True, generation_temperature=0.0, max_new_tokens=5,
                              logits_loss="reverse_kl", temperature=1.0, task_weight=0.0, logits_weight=1.0)
    trainer = DistillationTrainer(model=base, args=args, train_dataset=rows, data_collator=collator,
                                  processing_class=tokenizer,
                                  peft_config=LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    source = trainer.teacher_source
    settings = source.settings
    prompts = [row["input_ids"][:next(i for i, x in enumerate(row["labels"]) if x != -100)] for row in rows]
    by_base = sample_completions(plain, prompts, settings, 0)
    assert sample_completions(source.teacher_generator(), prompts, settings, 0) == by_base
    assert sample_completions(trainer.model, prompts, settings, 0) != by_base  # the adapters are on
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert all(log["generated_tokens"] > 0 for log in logs) and all(log["logits_loss"] >= 0 for log in logs)


def test_the_micro_batches_of_a_step_are_sampled_in_one_generation(tmp_path):
    """Gradient accumulation 3 with lmbda=0.5 and seq_kd: per optimizer step one generation call for the student's
    micro-batches (all their prompts, in order) and one for the teacher's; each micro-batch gets back the completions
    of its own prompts, exactly as one call per micro-batch would give them."""
    tokenizer, rows, collator = setup(n=24)
    trainer = trainer_for(tmp_path, tokenizer, rows, collator, per_device_train_batch_size=2,
                          gradient_accumulation_steps=3, lmbda=0.5, seq_kd=True, max_steps=1)
    source, fixed, calls = trainer.teacher_source, fixed_completions({}), []
    source.generate_fn = lambda model, prompts, settings, seed: calls.append((model, prompts)) or fixed(
        model, prompts, settings, seed)
    step = next(s for s in range(100) if len({source.samples_student(s, micro) for micro in range(3)}) == 2)
    student_picks = [source.samples_student(step, micro) for micro in range(3)]  # (both writers in this step)
    batches = [collated(collator, rows, range(2 * m, 2 * m + 2)) for m in range(3)]
    out = source.prepare_batches(batches, trainer.model, step)
    assert len(calls) == 2 and {id(model) for model, _ in calls} == {id(trainer.model),
                                                                       id(source.teacher_generator())}
    for model, prompts in calls:
        picked = [m for m in range(3) if student_picks[m] == (model is trainer.model)]
        assert prompts == [p for m in picked for p in prompt_rows(batches[m])]
    for m in range(3):
        one = source.prepare_batch(batches[m], trainer.model, (step, m))
        assert torch.equal(out[m]["input_ids"], one["input_ids"]) and torch.equal(out[m]["labels"], one["labels"])


def test_sampler_decode_for_a_model_it_cannot_serve_is_refused_before_training(tmp_path):
    """sampler='decode' with a student whose generation_config adds a repetition penalty (which the decode loop does
    not apply): refused when the trainer is built, naming the setting; 'auto' trains with generate instead."""
    tokenizer, rows, collator = setup()
    student = tiny_llama(vocab=VOCAB, layers=1, seed=2)
    student.generation_config.repetition_penalty = 1.2
    with pytest.raises(ValueError, match="sampler='decode' cannot sample from this model.*repetition_penalty=1.2"):
        trainer_for(tmp_path, tokenizer, rows, collator, student=student, sampler="decode")
    trainer = trainer_for(tmp_path, tokenizer, rows, collator, student=student, max_steps=1)
    trainer.train()
    assert trainer.state.log_history[0]["generated_tokens"] > 0
