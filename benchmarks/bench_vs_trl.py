"""Benchmark 2: end-to-end distillation throughput and peak memory, TRL's `GKDTrainer` vs our `DistillationTrainer`.

What runs: the same logit-distillation job in up to five ways, each for --warmup + --steps optimizer steps:

- ``trl``: `trl.experimental.gkd.GKDTrainer` with ``lmbda=0`` (never generates: every batch is the dataset's own),
  ``seq_kd=False`` and ``beta``: generalized JSD on the full ``[batch, seq, vocab]`` logits of both models.
- ``trl-bf16``: the same with ``bf16=True`` (autocast; on this CPU TRL's fastest setting, docs/performance.md section 8).
- ``ours``: `hf_distill.DistillationTrainer` with ``logits_loss="jsd", jsd_beta=beta, task_weight=0,
  logits_weight=1`` and ``logits_chunk_size`` left at its default ``"auto"`` (the loss computed chunk by chunk from the
  final hidden states, no full logits) or --chunk_size; fp32 (the `TrainingArguments` defaults).
- ``ours-bf16-head``: the teacher in bfloat16, `keep_freed_memory()` (glibc keeps freed blocks instead of returning
  them to the kernel), the student's decoder in fp32 and only the output layers' matmuls in bf16
  (``output_layer_dtype="bfloat16"``: fp32 softmax, loss and gradient accumulation); the recommended setting before
  ``linear_backward_dtype``.
- ``ours-fast``: the same teacher and memory setting with ``bf16=True`` autocast for the student, the compiled
  output kernel and the compiled decoder layers (what the command line does with ``--bf16``; fastest; the held-out loss rises 2-3%:
  `benchmarks/precision_gradients.py` shows why).
- ``ours-bf16-backward``: ``ours-bf16-head`` with ``linear_backward_dtype="bfloat16"``, the student's `nn.Linear`
  layers computing their forward in float32 and both backward products (``dL/dx``, ``dL/dW``) in bf16
  (`hf_distill.kernels.linear_backward`; one step's gradient within about 1% of float32's, against 16% for a bf16 forward);
  the recommended setting before ``output_kernel="compiled"``.
- ``ours-compiled``: ``ours-bf16-backward`` with ``output_kernel="compiled"``, the chunk's closed-form loss and
  gradient as one `torch.compile` kernel (`hf_distill.kernels.compiled`; its compile falls in the warm-up steps,
  ``setup_to_first_step_s`` in the JSON); the recommended setting before ``compile_student_layers``.
- ``ours-recommended``: ours in its recommended setting on *this* machine: the `DistillationConfig` of ``ours`` with
  `hf_distill.speed.performance.apply_speed_defaults` applied, exactly what the command line does by default (where bf16 is
  fast and `torch.compile` can build, the same as ``ours-layers``; on a CPU without bf16 units float32 throughout with
  the compiled output kernel and decoder layers). What it applied is in the JSON (``speed_defaults``).
- ``ours-layers``: the recommended setting where bf16 is fast, spelled out: ``ours-compiled`` with
  ``compile_student_layers=True``, each decoder layer of the student through `torch.compile` in training steps
  (`hf_distill.speed.layer_compile`; one graph for all layers, compiled in the first warm-up step).
- ``ours-liger``: ``ours-fast`` with the output terms through Liger's fused kernel (``output_kernel="liger"``; needs
  liger-kernel; compiled on CUDA, eager elsewhere).
- ``ours-plain``: the same as ``ours`` with ``logits_chunk_size=0`` (our full-logits path). Both ``logits_chunk_size``
  settings are passed only when `DistillationConfig` has that field; without it the two "ours" rows run the same code.

Same for every row: teacher SmolLM2-135M (asset ``smollm2-135m``, 30 layers, vocabulary 49,152), student its 15-layer
shrink (``shrink_model(teacher, num_layers=15)``, built after the same seed), data the ``news-articles`` asset tokenised
and packed into blocks of --seq_len tokens, read in order (``train_sampling_strategy="sequential"``, so step k sees the
same batch in every row), one collator (``DataCollatorForLanguageModeling(mlm=False)``: labels = input_ids), per-device
batch size, AdamW (``--optim``: torch's foreach by default, or fused) at a constant learning rate,
``max_grad_norm``, no gradient checkpointing, fp32 (``--bf16`` turns on bf16 autocast for all rows), no evaluation,
no checkpoints, no logging. GKD is fed the tokenised blocks directly:
``dataset_kwargs={"skip_prepare_dataset": True}`` (SFTTrainer neither re-tokenises nor packs),
``remove_unused_columns=False``, ``packing=False``, ``padding_free=False`` and our collator instead of its default
`DataCollatorForChatML`. Its loss covers the same positions as ours (shifted ``labels != -100``) and is normalised the
same way (the sum divided by the step's counted tokens, `num_items_in_batch`), so at step 1 both losses are the same
number when T = 1. TRL's `compute_loss` never passes ``temperature`` to its loss (it only affects sampling), and ours
multiplies the soft term by T^2: at T != 1 the values differ but the work does not.

How it is measured: every row runs in its own subprocess (``--worker NAME``), so memory is its own.
- Tokens/s: the tokens of the timed steps (after --warmup warm-up steps) over their wall time, from
  ``time.perf_counter()`` taken at `on_step_end` by a `TrainerCallback` (after a CUDA synchronize on GPU); set-up and
  warm-up are excluded (each step's seconds, warm-up included, are in the JSON: ``step_seconds``). This host's speed
  drifts from hour to hour (up to 1.3x between two runs of the same row): ``--rounds N`` runs the rows in turn N times,
  shows each row at its median round and prints each round's ratio to that round's fastest TRL row.
- Peak RSS: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of the worker at the end (the whole process). RSS increase:
  the resident-set high-water mark during training (``VmHWM`` after resetting it through ``/proc/self/clear_refs``
  just before ``train()``; ``ru_maxrss`` when that reset is refused) minus the RSS just before ``train()``: models
  and data are in the baseline, optimizer state, gradients, activations and logits in the increase.
- CUDA: ``torch.cuda.max_memory_allocated`` over the run (models included) and its increase during training.
- Loss: the training loss of step 1 and of the last step (per counted token, as each trainer returns it), and the
  held-out loss: the trained student's mean next-token cross-entropy on the --eval_blocks blocks after the training
  ones, in float32 without autocast.
- Machine (`benchmarks/machine_limits.py`, off with --no_machine): the measured matmul rate of this machine in fp32 and
  bf16 (fp16 and tf32 on CUDA) at the job's own shapes (every matmul of the teacher's forward and the student's forward
  and backward, the output layer in chunks), the FLOP count per token written out, and per row the achieved GFLOP/s
  (tokens/s x FLOPs per token) and its share of each limit.

Targets (issue 21): ours in its recommended setting (ours-recommended) >= 2.5x the tokens/s of TRL's fastest row
(``trl`` or ``trl-bf16``) at <= 0.6x its peak RSS; the step at >= 40% of the matmul limit of the fastest precision
this machine offers (bf16 where it has bf16 units, else float32); the held-out loss within 1% of ours (fp32).

Rows that multiply in bf16 whatever the machine (``trl-bf16``, ``ours-fast``, ``ours-bf16-*``, ``ours-compiled``,
``ours-layers``, ``ours-liger``, every row with --bf16) are skipped with a message on a CPU without fast bf16
(`hf_distill.speed.performance.fast_bf16`: no AVX512-BF16 / AMX), where torch's bf16 matmul runs a scalar loop about 100x
slower than float32; TRL's fastest row is then ``trl``. --force_slow_bf16 runs them anyway.

On-policy mode (``--on_policy``): every step the student completes --batch_size prompts (the TREC questions as user
turns, ChatML template) with at most --max_new_tokens sampled tokens (temperature 1, top-k and top-p off), the teacher
scores them, and the student trains on its completion tokens: ``trl`` is `GKDTrainer` with ``lmbda=1`` (its
`DataCollatorForChatML` on ``messages``), ``trl-stable`` TRL's stable `trl.DistillationTrainer` (always on-policy,
chunked loss; ``prompt`` column, left padding), ``ours`` `DistillationTrainer` with ``lmbda=1`` (prompt-only rows,
`chat.prepare_chat_dataset(prompts=True)`), all at ``beta`` / ``jsd_beta`` = --beta. Tokens are the trained ones
(prompt and completion, no padding) of each trainer's own sampled sequences; the generation time is the wall time
of each trainer's generation call (`generate_on_policy_outputs`, `_generate`, our `generate_fn`); "training part"
tokens/s divides the same tokens by the step time minus that. Targets: training part >= 1.25x GKD's and >= the stable
trainer's; overall >= both; peak RSS <= 0.6x GKD's.

    python benchmarks/bench_vs_trl.py --on_policy --trainers trl trl-stable ours --batch_size 4 --max_new_tokens 64

    python benchmarks/bench_vs_trl.py --steps 10 --warmup 2 --batch_size 4 --seq_len 256 \
        --trainers trl trl-bf16 ours ours-compiled ours-layers ours-fast \
        --output docs/results/issue21/speed_256.json
    HF_DISTILL_ASSETS=/path/to/assets python benchmarks/bench_vs_trl.py                # 20 timed steps, 4 x 512, CPU
    python benchmarks/bench_vs_trl.py --device cuda --bf16 --output docs/results/bench_vs_trl.json
    python benchmarks/bench_vs_trl.py --steps 3 --warmup 1 --batch_size 2 --seq_len 64   # smoke run
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_logits_loss import machine  # noqa: E402

TRAINERS = ("trl", "trl-bf16", "ours", "ours-plain", "ours-fast", "ours-bf16-head", "ours-bf16-backward",
            "ours-compiled", "ours-layers", "ours-recommended", "ours-liger", "trl-stable", "ours-generate")
#: Rows that run their student step under bf16 autocast whatever --bf16 says (``TrainingArguments(bf16=True)``).
BF16_ROWS = ("trl-bf16", "ours-fast", "ours-liger")
#: Rows that multiply bf16 matrices whatever the machine (autocast, a bf16 teacher, bf16 output layers or backward):
#: on a CPU without bf16 units (`hf_distill.speed.performance.fast_bf16` False) they run ~100x slower and are skipped.
HALF_PRECISION_ROWS = BF16_ROWS + ("ours-bf16-head", "ours-bf16-backward", "ours-compiled", "ours-layers")
#: Marks the worker's result line on stdout (libraries may print there too).
RESULT_MARK = "BENCH_VS_TRL_RESULT "


def _status_kb(key: str) -> int | None:
    """A ``/proc/self/status`` field in kB (``VmRSS``, ``VmHWM``), or None where there is no procfs."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the process's resident-set high-water mark (VmHWM) to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ---- worker: one trainer in this process -----------------------------------------------------------------------------


def packed_blocks(tokenizer, csv_path: str, seq_len: int, blocks: int) -> dict[str, list[list[int]]]:
    """The first `blocks` blocks of `seq_len` tokens of the articles, tokenised and concatenated in file order."""
    ids: list[int] = []
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            text = row["text"]
            if text and text.strip():
                ids.extend(tokenizer(text)["input_ids"])
            if len(ids) >= seq_len * blocks:
                break
    if len(ids) < seq_len * blocks:
        raise ValueError(f"news-articles holds {len(ids)} tokens, fewer than {blocks} blocks of {seq_len}.")
    rows = [ids[i * seq_len: (i + 1) * seq_len] for i in range(blocks)]
    return {"input_ids": rows, "attention_mask": [[1] * seq_len for _ in rows]}


def on_policy_data(which: str, tokenizer, count: int):
    """`count` TREC questions as chat prompts, in each trainer's format: GKD `messages` (with a placeholder answer its
    collator needs; lmbda=1 never trains on it), the stable trainer `prompt`, ours prompt-only rows."""
    import datasets

    from hf_distill.data.assets import fetch

    with open(fetch("trec"), newline="") as f:
        questions = list(dict.fromkeys(r["text"].strip() for r in csv.DictReader(f)))[:count]
    turns = [[{"role": "user", "content": q}] for q in questions]
    if which == "trl":
        return datasets.Dataset.from_dict({"messages": [[*t, {"role": "assistant", "content": "OK"}] for t in turns]}), None
    if which == "trl-stable":
        return datasets.Dataset.from_dict({"prompt": turns}), None
    from hf_distill.data.chat import prepare_chat_dataset

    return prepare_chat_dataset(datasets.Dataset.from_dict({"prompt": turns}), tokenizer, prompts=True)


def worker(which: str, opts: argparse.Namespace) -> dict:
    import datasets
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, TrainerCallback

    from hf_distill.data.assets import fetch
    from hf_distill.students import shrink_model

    if opts.threads:
        torch.set_num_threads(opts.threads)
    cuda = opts.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda, but torch sees no GPU.")
    transformers.set_seed(opts.seed)

    model_dir = str(fetch("smollm2-135m"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    total_steps = opts.warmup + opts.steps
    train = datasets.Dataset.from_dict(
        packed_blocks(tokenizer, str(fetch("news-articles")), opts.seq_len, total_steps * opts.batch_size))
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)

    if opts.on_policy:
        train, collator = on_policy_data(which, tokenizer, total_steps * opts.batch_size)
    eval_ids = None
    if opts.eval_blocks and not opts.on_policy:  # the blocks after the training ones, for the held-out loss
        every = packed_blocks(tokenizer, str(fetch("news-articles")), opts.seq_len,
                              total_steps * opts.batch_size + opts.eval_blocks)
        eval_ids = torch.tensor(every["input_ids"][total_steps * opts.batch_size:])
    if which in ("ours-fast", "ours-bf16-head", "ours-bf16-backward", "ours-compiled", "ours-layers",
                 "ours-liger", "ours-recommended"):  # (section 8)
        from hf_distill.speed.performance import keep_freed_memory

        keep_freed_memory()
    teacher = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    transformers.set_seed(opts.seed)
    student = shrink_model(teacher, num_layers=opts.student_layers)

    output_dir = tempfile.mkdtemp(prefix=f"bench_vs_trl_{which}_")
    common = dict(
        output_dir=output_dir, max_steps=total_steps, per_device_train_batch_size=opts.batch_size,
        gradient_accumulation_steps=1, learning_rate=opts.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, optim=opts.optim, max_grad_norm=opts.max_grad_norm, seed=opts.seed, data_seed=opts.seed,
        bf16=opts.bf16 or which in BF16_ROWS, fp16=False, gradient_checkpointing=False, use_cpu=not cuda,
        train_sampling_strategy="sequential", dataloader_num_workers=0, remove_unused_columns=False,
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
    )
    chunk_setting = None
    speed_defaults = None
    generation = {"seconds": [], "tokens": []}
    if opts.on_policy:
        common.update(max_steps=total_steps)
    if which == "trl-stable":
        from trl import DistillationConfig as StableConfig
        from trl import DistillationTrainer as StableTrainer

        tokenizer.padding_side = "left"
        args = StableConfig(**common, beta=opts.beta, temperature=opts.temperature,
                            max_completion_length=opts.max_new_tokens, top_k=0, top_p=1.0)
        base = StableTrainer
    elif which == "trl" and opts.on_policy:
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        args = GKDConfig(**common, lmbda=1.0, seq_kd=False, beta=opts.beta, temperature=opts.temperature,
                         max_new_tokens=opts.max_new_tokens, max_length=1024, dataset_kwargs={"skip_prepare_dataset": True})
        base = GKDTrainer
    elif which in ("trl", "trl-bf16"):
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        args = GKDConfig(
            **common, lmbda=0.0, seq_kd=False, beta=opts.beta, temperature=opts.temperature,
            max_length=opts.seq_len, packing=False, padding_free=False,
            dataset_kwargs={"skip_prepare_dataset": True}, use_liger_kernel=opts.trl_liger,
        )
        base = GKDTrainer
    else:
        from hf_distill import DistillationConfig, DistillationTrainer

        extra = {}
        if "logits_chunk_size" in {f.name for f in dataclasses.fields(DistillationConfig)}:
            chunk_setting = 0 if which == "ours-plain" else (opts.chunk_size or "auto")
            extra["logits_chunk_size"] = chunk_setting
        if which in ("ours-bf16-head", "ours-bf16-backward", "ours-compiled", "ours-layers"):
            extra["output_layer_dtype"] = "bfloat16"
        if which in ("ours-bf16-backward", "ours-compiled", "ours-layers"):
            extra["linear_backward_dtype"] = "bfloat16"
        if which in ("ours-compiled", "ours-layers", "ours-fast"):
            extra["output_kernel"] = "compiled"
        if which in ("ours-layers", "ours-fast"):
            extra["compile_student_layers"] = True
        if which == "ours-liger":
            extra["output_kernel"] = "liger"
        if which in ("ours-fast", "ours-bf16-head", "ours-bf16-backward", "ours-compiled", "ours-layers",
                     "ours-liger"):
            from hf_distill.speed.performance import recommended_precision

            extra["teacher_dtype"] = recommended_precision(opts.device, None).teacher_dtype
        if opts.on_policy:
            extra.update(lmbda=1.0, max_new_tokens=opts.max_new_tokens, generation_temperature=opts.temperature)
            if which == "ours-generate":  # (the sampler before issue 42: transformers' generate)
                extra["sampler"] = "generate"
        args = DistillationConfig(
            **common, logits_loss="jsd", jsd_beta=opts.beta, task_weight=0.0, logits_weight=1.0,
            temperature=opts.temperature, **extra,
        )
        if which == "ours-recommended":  # what the command line applies on this machine, whatever it is
            from hf_distill.speed.performance import apply_speed_defaults

            speed_defaults = apply_speed_defaults(args, opts.device, "causal-lm")
        base = DistillationTrainer

    class Clock(TrainerCallback):
        """``time.perf_counter()`` at the start of training and at the end of every optimizer step."""

        def __init__(self) -> None:
            self.start: float | None = None
            self.ends: list[float] = []

        def on_train_begin(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

    class Recorded(base):
        """The trainer as is, keeping each step's loss (a detached tensor: no sync) and token count."""

        step_losses: list = []
        step_tokens: list = []

        def training_step(self, model, inputs, num_items_in_batch=None):
            if not opts.on_policy:
                self.step_tokens.append(int(inputs["input_ids"].numel()))
            loss = super().training_step(model, inputs, num_items_in_batch)
            if opts.on_policy and which != "trl-stable":  # (GKD rewrites `inputs` in place; ours got them rewritten)
                self.step_tokens.append(int(inputs["attention_mask"].sum()))
            self.step_losses.append(loss.detach())
            return loss

        @staticmethod
        def generate_on_policy_outputs(model, inputs, generation_config):  # GKD's generation, timed
            start = time.perf_counter()
            out = base.generate_on_policy_outputs(model, inputs, generation_config)
            generation["seconds"].append(time.perf_counter() - start)
            return out

        def _generate(self, prompts):  # the stable trainer's generation, timed
            start = time.perf_counter()
            out = super()._generate(prompts)
            generation["seconds"].append(time.perf_counter() - start)
            return out

        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            self.step_tokens.append(int(out["prompt_mask"].sum() + out["completion_mask"].sum()))
            return out

    clock = Clock()
    kwargs = {} if which == "trl-stable" or (which == "trl" and opts.on_policy) else {"data_collator": collator}
    if which == "ours" and opts.on_policy:
        kwargs["data_collator"] = collator
    trainer = Recorded(model=student, teacher_model=teacher, args=args, train_dataset=train,
                       processing_class=tokenizer, callbacks=[clock], **kwargs)
    if which.startswith("ours") and opts.on_policy:  # (its sampling calls, timed as they run: entropies included)
        sample = trainer.teacher_source._sample

        def timed(*a):
            start = time.perf_counter()
            out = sample(*a)
            generation["seconds"].append(time.perf_counter() - start)
            return out

        trainer.teacher_source._sample = timed
    del teacher, student  # the trainer holds them

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_before = torch.cuda.memory_allocated()
    rss_before_kb = _status_kb("VmRSS")
    maxrss_before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    hwm_reset = _reset_peak_rss()
    trainer.train()
    hwm_train_kb = _status_kb("VmHWM") if hwm_reset else None
    maxrss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    held_out = None
    if eval_ids is not None:  # mean next-token cross-entropy of the trained student, float32, no autocast
        model = trainer.model.eval()
        with torch.no_grad():
            losses_sum, counted = 0.0, 0
            for start in range(0, len(eval_ids), opts.batch_size):
                ids = eval_ids[start:start + opts.batch_size].to(model.device)
                logits = model(input_ids=ids).logits.float()
                losses_sum += float(torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))
                counted += ids[:, 1:].numel()
        held_out = losses_sum / counted

    if len(clock.ends) != total_steps:
        raise RuntimeError(f"expected {total_steps} optimizer steps, the callback saw {len(clock.ends)}")
    timed_from = clock.ends[opts.warmup - 1] if opts.warmup > 0 else clock.start
    seconds = clock.ends[-1] - timed_from
    tokens = sum(trainer.step_tokens[opts.warmup:])
    losses = [float(loss) for loss in trainer.step_losses]
    train_peak_kb = hwm_train_kb if hwm_train_kb is not None else maxrss_kb
    generating = sum(generation["seconds"][opts.warmup:]) if opts.on_policy else 0.0
    result = {
        "on_policy": opts.on_policy,
        "generation_seconds_timed": generating,
        "generation_share": generating / seconds,
        "training_tokens_per_s": tokens / max(seconds - generating, 1e-9),
        "trainer": which,
        "class": base.__name__,
        "logits_chunk_size": chunk_setting,
        "chunk_in_use": getattr(trainer, "logits_chunk_size", None) if which != "trl" else None,
        "steps_timed": opts.steps, "warmup": opts.warmup, "tokens_timed": tokens, "seconds_timed": seconds,
        "tokens_per_s": tokens / seconds,
        "step_seconds": [b - a for a, b in zip([clock.start, *clock.ends[:-1]], clock.ends)],
        "seconds_per_step": seconds / max(opts.steps, 1),
        "setup_to_first_step_s": clock.ends[0] - clock.start,
        "peak_rss_mb": maxrss_kb / 1024,
        "peak_rss_before_train_mb": maxrss_before_kb / 1024,
        "rss_before_train_mb": rss_before_kb / 1024 if rss_before_kb is not None else None,
        "peak_rss_during_train_mb": train_peak_kb / 1024,
        "rss_increase_mb": (train_peak_kb - rss_before_kb) / 1024 if rss_before_kb is not None else None,
        "rss_peak_source": "VmHWM reset before train()" if hwm_train_kb is not None else "ru_maxrss",
        "losses": losses,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "held_out_loss": held_out,
        "precision": ("bf16 autocast" if args.bf16 else "fp32") + (
            f", teacher {args.teacher_dtype}" if getattr(args, "teacher_dtype", None) else "") + (
            f", output layers {args.output_layer_dtype}" if getattr(args, "output_layer_dtype", None) else "") + (
            ", Liger kernel" if getattr(args, "output_kernel", "chunked") == "liger" else "") + (
            ", compiled output kernel" if getattr(args, "output_kernel", "chunked") == "compiled" else "") + (
            ", decoder backward bf16" if getattr(args, "linear_backward_dtype", None) else "") + (
            ", compiled decoder layers" if getattr(args, "compile_student_layers", False) else ""),
        "parameters": {"student": sum(p.numel() for p in trainer.model.parameters())},
        "speed_defaults": speed_defaults,
        "torch_threads": torch.get_num_threads(),
    }
    if cuda:
        result["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        result["cuda_increase_mb"] = (torch.cuda.max_memory_allocated() - cuda_before) / 2**20
        result["gpu"] = torch.cuda.get_device_name(0)
    shutil.rmtree(output_dir, ignore_errors=True)
    return result


# ---- parent: run the workers, print the table ------------------------------------------------------------------------


def machine_with_workers(device: str, results: list[dict]) -> dict:
    """`bench_logits_loss.machine`, plus the workers' torch threads and GPU names."""
    info = machine("cpu")
    threads = {r.get("torch_threads") for r in results if "torch_threads" in r}
    if threads:
        info["torch_threads"] = sorted(threads)[0] if len(threads) == 1 else sorted(threads)
    gpus = {r["gpu"] for r in results if "gpu" in r}
    if device == "cuda":
        info["gpu"] = ", ".join(sorted(gpus)) or "unknown"
    return info


def run_worker(which: str, opts: argparse.Namespace) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", which]
    for name in ("steps", "warmup", "batch_size", "seq_len", "beta", "temperature", "device", "lr", "optim",
                 "max_grad_norm", "seed", "student_layers", "chunk_size", "threads", "max_new_tokens", "eval_blocks"):
        value = getattr(opts, name)
        if value is not None:
            command += [f"--{name}", str(value)]
    if opts.bf16:
        command.append("--bf16")
    if opts.on_policy:
        command.append("--on_policy")
    if opts.trl_liger:
        command.append("--trl_liger")
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if done.returncode != 0 or not lines:
        err = [line for line in done.stderr.strip().splitlines() if line.strip()]
        tail = err[-1] if err else f"exit code {done.returncode} (killed: out of memory?)"
        if opts.verbose and err:
            print("\n".join(err[-30:]), file=sys.stderr)
        return {"trainer": which, "error": tail, "worker_wall_s": wall}
    result = json.loads(lines[-1][len(RESULT_MARK):])
    result["worker_wall_s"] = wall
    return result


def _ratio(value: float | None, reference: float | None) -> str:
    return f"{value / reference:.2f}x" if value is not None and reference else ""


def median_run(rounds: list[dict]) -> dict:
    """The round whose tokens/s is the median of a row's rounds (the lower middle one for an even count), with every
    round's tokens/s in ``tokens_per_s_rounds``; a failed round stands for the row only if every round failed."""
    good = sorted((r for r in rounds if "error" not in r), key=lambda r: r["tokens_per_s"])
    if not good:
        return rounds[-1]
    chosen = dict(good[(len(good) - 1) // 2])
    chosen["tokens_per_s_rounds"] = [r.get("tokens_per_s") for r in rounds]
    return chosen


def rounds_table(results: list[dict]) -> str:
    """Each row's tokens/s per round and its ratio to the fastest TRL row of the same round (rounds run in turn, so a
    round's rows saw the same hour of the host), with the median ratio."""
    trl = [r for r in results if r["trainer"] in ("trl", "trl-bf16") and "tokens_per_s_rounds" in r]
    count = max(len(r.get("tokens_per_s_rounds", [])) for r in results)
    fastest = [max((r["tokens_per_s_rounds"][i] or 0.0) for r in trl) if trl else None for i in range(count)]
    lines = ["| trainer | " + " | ".join(f"round {i + 1} tokens/s" for i in range(count)) + " | median | "
             + " | ".join(f"round {i + 1} vs TRL fastest" for i in range(count)) + " | median ratio |",
             "|---|" + "---:|" * (2 * count + 2)]
    for r in results:
        values = r.get("tokens_per_s_rounds", [])
        ratios = [v / f for v, f in zip(values, fastest) if v and f]
        cells = [f"{v:.1f}" if v else "failed" for v in values]
        shown = [f"{x:.2f}x" for x in ratios] + [""] * (count - len(ratios))
        middle = statistics.median(ratios) if ratios else None
        lines.append(f"| {r['trainer']} | " + " | ".join(cells) + f" | {r.get('tokens_per_s', 0):.1f} | "
                     + " | ".join(shown) + f" | {f'{middle:.2f}x' if middle else ''} |")
    return "\n".join(lines)


def table(results: list[dict], cuda: bool) -> str:
    trl_rows = [r for r in results if r["trainer"] in ("trl", "trl-bf16") and "error" not in r]
    reference = max(trl_rows, key=lambda r: r["tokens_per_s"]) if trl_rows else None  # TRL's fastest setting
    ref = (lambda key: reference.get(key)) if reference else (lambda key: None)
    head = ["trainer", "precision", "chunk", "tokens/s", "vs TRL", "peak RSS MB", "vs TRL", "RSS increase MB", "vs TRL"]
    if cuda:
        head += ["CUDA peak MB", "vs TRL"]
    on_policy = any(r.get("on_policy") for r in results)
    stable = next((r for r in results if r["trainer"] == "trl-stable" and "error" not in r), None)
    if on_policy:
        head[3:3] = ["training-part tokens/s", "vs TRL", "vs stable", "generating %"]
        head.insert(9, "vs stable")
    limits = any("achieved_gflops" in r for r in results)
    dtypes = [k[len("share_of_"):-len("_limit")] for r in results for k in r if k.startswith("share_of_")
              and k.endswith("_limit")]
    dtypes = list(dict.fromkeys(dtypes))
    if limits:
        head += ["GFLOP/s"] + [f"% of {d} limit" for d in dtypes]
    head += ["loss step 1", "loss last step", "held-out loss"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['trainer']} | | error: {r['error']} |" + " |" * (len(head) - 3))
            continue
        chunk = "" if r["trainer"].startswith("trl") else ("full logits" if r.get("chunk_in_use") is None
                                                 else f"{r['chunk_in_use']} tokens")
        cells = [r["trainer"], r.get("precision", ""), chunk]
        if on_policy:
            cells += [f"{r['training_tokens_per_s']:,.1f}", _ratio(r["training_tokens_per_s"], ref("training_tokens_per_s")),
                      _ratio(r["training_tokens_per_s"], stable and stable["training_tokens_per_s"]),
                      f"{100 * r['generation_share']:.0f}"]
        cells += [f"{r['tokens_per_s']:,.1f}", _ratio(r["tokens_per_s"], ref("tokens_per_s"))]
        if on_policy:
            cells.append(_ratio(r["tokens_per_s"], stable and stable["tokens_per_s"]))
        cells += [f"{r['peak_rss_mb']:,.0f}", _ratio(r["peak_rss_mb"], ref("peak_rss_mb")),
                 f"{r['rss_increase_mb']:,.0f}" if r.get("rss_increase_mb") is not None else "",
                 _ratio(r.get("rss_increase_mb"), ref("rss_increase_mb"))]
        if cuda:
            cells += [f"{r['cuda_peak_mb']:,.0f}", _ratio(r["cuda_peak_mb"], ref("cuda_peak_mb"))]
        if limits:
            cells += [f"{r.get('achieved_gflops', 0):,.0f}"] + [
                f"{100 * r.get(f'share_of_{d}_limit', 0):.0f}%" for d in dtypes]
        held = r.get("held_out_loss")
        cells += [f"{r['loss_first']:.6f}", f"{r['loss_last']:.6f}", f"{held:.4f}" if held is not None else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first")
    parser.add_argument("--batch_size", type=int, default=4, help="per-device batch size (blocks)")
    parser.add_argument("--seq_len", type=int, default=512, help="tokens per block")
    parser.add_argument("--beta", type=float, default=0.5, help="generalized JSD beta (GKD's beta, our jsd_beta)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for every row (trl-bf16 and ours-fast "
                        "always have it)")
    parser.add_argument("--trl_liger", action="store_true", help="TRL's use_liger_kernel=True (CUDA, liger-kernel)")
    parser.add_argument("--eval_blocks", type=int, default=16,
                        help="held-out blocks (after the training ones) for the student's loss at the end; 0: none")
    parser.add_argument("--no_machine", action="store_true", help="skip measuring the matmul limits")
    parser.add_argument("--force_slow_bf16", action="store_true",
                        help="run the bf16 rows even where this machine has no fast bf16 (skipped otherwise)")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--optim", default="adamw_torch", choices=["adamw_torch", "adamw_torch_fused"],
                        help="every row's optimizer; adamw_torch_fused is the TrainingArguments default (one fused "
                             "kernel per parameter instead of ~6 foreach passes)")
    parser.add_argument("--max_grad_norm", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--student_layers", type=int, default=15)
    parser.add_argument("--chunk_size", type=int, default=None,
                        help="logits_chunk_size of the 'ours' row (default 'auto'); 'ours-plain' always uses 0")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in every worker")
    parser.add_argument("--trainers", nargs="+", choices=TRAINERS, default=None,
                        help="default: trl ours ours-plain; with --on_policy: trl trl-stable ours")
    parser.add_argument("--output", default=None, help="also write everything as JSON here")
    parser.add_argument("--verbose", action="store_true", help="print a failed worker's stderr tail")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the rows this many times, one after the other in turn (a, b, a, b, ...); each row "
                             "shown at its median round, and each round's ratio to that round's fastest TRL row")
    parser.add_argument("--on_policy", action="store_true", help="every step samples completions (see the docstring)")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="on-policy: most tokens sampled per prompt")
    parser.add_argument("--worker", choices=TRAINERS, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.steps < 1 or opts.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if opts.trainers is None:
        opts.trainers = ["trl", "trl-stable", "ours"] if opts.on_policy else ["trl", "ours", "ours-plain"]
    if opts.worker:
        print(RESULT_MARK + json.dumps(worker(opts.worker, opts)), flush=True)
        return

    from hf_distill.speed.performance import fast_bf16

    if not fast_bf16(opts.device) and not opts.force_slow_bf16:
        slow = list(opts.trainers) if opts.bf16 else [w for w in opts.trainers if w in HALF_PRECISION_ROWS]
        if slow:
            print(f"skipping {', '.join(slow)}: this {opts.device} has no fast bf16 (no AVX512-BF16 / AMX), where "
                  "torch multiplies bf16 matrices about 100x slower than float32 (see the limit table); "
                  "--force_slow_bf16 runs them anyway", file=sys.stderr, flush=True)
            opts.trainers = [w for w in opts.trainers if w not in slow]
            if not opts.trainers:
                parser.error("every row asked for needs fast bf16, which this machine lacks: pass --force_slow_bf16 "
                             "or choose fp32 rows (trl, ours, ours-recommended)")
    runs: dict[str, list[dict]] = {which: [] for which in opts.trainers}
    for round_ in range(max(opts.rounds, 1)):
        for which in opts.trainers:
            print(f"running {which} (round {round_ + 1}) ...", file=sys.stderr, flush=True)
            result = run_worker(which, opts)
            shown = {k: v for k, v in result.items() if k not in ("losses", "step_seconds")}
            print(f"  {which}: {json.dumps(shown)}", file=sys.stderr, flush=True)
            runs[which].append(result)
    results = [median_run(runs[which]) for which in opts.trainers]

    cuda = opts.device == "cuda"
    settings = {
        "steps_timed": opts.steps, "warmup": opts.warmup, "batch_size": opts.batch_size, "seq_len": opts.seq_len,
        "tokens_per_step": opts.batch_size * opts.seq_len, "beta": opts.beta, "temperature": opts.temperature,
        "device": opts.device, "precision": "bf16 autocast" if opts.bf16 else "fp32", "optimizer": opts.optim,
        "lr": opts.lr, "lr_scheduler": "constant", "max_grad_norm": opts.max_grad_norm, "seed": opts.seed,
        "teacher": "asset:smollm2-135m (30 layers)",
        "student": f"shrink_model(teacher, num_layers={opts.student_layers})",
        "data": f"asset:news-articles packed into {opts.seq_len}-token blocks, sequential order",
        "ours_logits_chunk_size": opts.chunk_size or "auto", "ours_plain_logits_chunk_size": 0,
        "trl": "GKDTrainer(lmbda=0, seq_kd=False, skip_prepare_dataset, DataCollatorForLanguageModeling)",
    }
    info = machine_with_workers(opts.device, results)
    if not opts.no_machine and not opts.on_policy:  # measured after the rows, on the quiet machine
        from machine_limits import limits_table, machine_limits, shares

        from hf_distill.data.assets import fetch
        from hf_distill.kernels.chunked import auto_chunk_size

        chunk = opts.chunk_size or auto_chunk_size(49_152)
        info["limits"] = machine_limits(str(fetch("smollm2-135m")), opts.student_layers, opts.batch_size,
                                        opts.seq_len, chunk, opts.device)
        for r in results:
            if "error" not in r:
                r.update(shares(r["tokens_per_s"], info["limits"]))
        print("\n### The machine's matmul limit at this job's shapes (benchmarks/machine_limits.py)\n")
        print(limits_table(info["limits"]))
    if opts.on_policy:
        settings.update(seq_len=None, tokens_per_step=None, max_new_tokens=opts.max_new_tokens,
                        data="asset:trec questions as ChatML user turns, sequential order",
                        trl="GKDTrainer(lmbda=1, DataCollatorForChatML)", trl_stable="trl.DistillationTrainer")
        print(f"\n### On-policy distillation: TRL GKDTrainer (lmbda=1), TRL DistillationTrainer, DistillationTrainer "
              f"(lmbda=1) ({opts.device}, {settings['precision']}, {opts.batch_size} prompts x at most "
              f"{opts.max_new_tokens} sampled tokens, {opts.steps} timed steps)\n")
    else:
        print(f"\n### End-to-end distillation: TRL GKDTrainer vs DistillationTrainer ({opts.device}, "
              f"{settings['precision']}, batch {opts.batch_size} x {opts.seq_len} tokens, {opts.steps} timed steps)\n")
    print(table(results, cuda))
    if opts.rounds > 1:
        print(f"\n### Rounds (each row {opts.rounds} times in turn; the table above shows each row's median round)\n")
        print(rounds_table(results))
    ok = {r["trainer"]: r for r in results if "error" not in r}
    if "trl" in ok:
        for name in ("ours", "ours-plain"):
            if name in ok:
                a, b = ok["trl"]["loss_first"], ok[name]["loss_first"]
                print(f"\nstep-1 loss, {name} vs trl: {b:.6f} vs {a:.6f} (relative difference "
                      f"{abs(b - a) / max(abs(a), 1e-12):.1e})", end="")
        print()
    if any(r["trainer"] in ("ours", "ours-plain") and r.get("logits_chunk_size") is None for r in ok.values()):
        print("\nNote: this DistillationConfig has no `logits_chunk_size` field: 'ours' and 'ours-plain' ran the same "
              "(full-logits) code.")
    if opts.on_policy:
        print("\nTargets: the training part >= 1.25x GKD's and >= the stable trainer's; overall >= both; peak RSS "
              "<= 0.6x GKD's.")
    else:
        print("\nTargets: ours (ours-recommended: its recommended setting on this machine) >= 2.5x TRL's fastest row, "
              "<= 0.6x its peak RSS; the step at >= 40% of the fastest precision's limit.")
    shown = {k: v for k, v in info.items() if k != "limits"}  # (the limits: the table above, and the JSON)
    print(f"\nMachine: {json.dumps(shown)}\nSettings: {json.dumps(settings)}")
    if opts.output:
        os.makedirs(os.path.dirname(opts.output) or ".", exist_ok=True)
        with open(opts.output, "w") as f:
            json.dump({"machine": info, "settings": settings, "rows": results}, f, indent=1)
        print(f"\nwritten to {opts.output}")


if __name__ == "__main__":
    main()
