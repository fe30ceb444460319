"""Where bf16 costs the student's gradient: one distillation step's gradient in each precision against float32's.

The held-out loss after 60 steps rose 2.9% with the student under bf16 autocast and 0.13% with only the output layers
in bf16 (docs/performance.md, section 8). This script finds which part of the student's step carries the error: it
takes the gradient of one step of the `bench_vs_trl.py` job (SmolLM2-135M -> its 15-layer shrink, JSD beta 0.5, the
first --batch_size blocks of news-articles, no clipping) in each variant, and compares it with the float32 one per
parameter family (embeddings / output layer, attention projections, MLP projections, norms):

    relative error = ||g - g_fp32|| / ||g_fp32||,     cosine = <g, g_fp32> / (||g|| ||g_fp32||)

Variants (all with `DistillationTrainer`, the teacher in bf16 unless said): ``fp32`` (the reference, fp32 teacher),
``bf16-teacher``, ``bf16-head`` (``output_layer_dtype="bfloat16"``), ``autocast`` (``bf16=True``), and ``autocast``
with one part of every decoder layer taken out of autocast (``-fp32-attention``: the attention block;
``-fp32-mlp``: the MLP block), the rest as in ``autocast``; and two on the decoder's `nn.Linear` layers only (no
autocast, the output layers as ``bf16-head``): ``bf16-linear-fp32-weight-grad`` (``y = bf16(x) @ bf16(W)^T`` and
``dL/dx = bf16(g) @ bf16(W)`` in bf16, ``dL/dW = g^T @ x`` in float32) and ``bf16-forward-fp32-backward`` (the forward
products in bf16, both backward products in float32 from float32 inputs): which of the three products carries the
error; ``fp32-forward-bf16-backward``: the forward products in float32, both backward products in bf16 (the package's
``linear_backward_dtype="bfloat16"``, `hf_distill.kernels.linear_backward`, on every `nn.Linear` of the student but its output
layer).

    python benchmarks/precision_gradients.py --batch_size 4 --seq_len 256
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_vs_trl import packed_blocks  # noqa: E402

VARIANTS = ("fp32", "bf16-teacher", "bf16-head", "autocast", "autocast-fp32-attention", "autocast-fp32-mlp",
            "bf16-linear-fp32-weight-grad", "bf16-forward-fp32-backward", "fp32-forward-bf16-backward")
FAMILIES = ("embeddings / output layer", "attention", "mlp", "norms")


def family(name: str) -> str:
    if "embed" in name or "lm_head" in name:
        return FAMILIES[0]
    if "self_attn" in name:
        return FAMILIES[1]
    if "mlp" in name:
        return FAMILIES[2]
    return FAMILIES[3]


def without_autocast(module) -> None:
    """Run `module.forward` with autocast off and its floating-point tensor inputs in float32."""
    import torch

    forward = module.forward

    def cast(value):
        return value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value

    @functools.wraps(forward)
    def fp32_forward(*args, **kwargs):
        with torch.autocast(device_type="cpu", enabled=False):
            return forward(*[cast(a) for a in args], **{k: cast(v) for k, v in kwargs.items()})

    module.forward = fp32_forward


def bf16_linear(module, weight_grad_bf16: bool, input_grad_bf16: bool) -> None:
    """Replace `module.forward` (an `nn.Linear`) with ``y = bf16(x) @ bf16(W)^T + b`` (float32 out), and a backward
    whose ``dL/dx = g @ W`` and ``dL/dW = g^T @ x`` run in bf16 or float32 as asked (float32 accumulation either way)."""
    import torch

    class Linear(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, bias):
            ctx.save_for_backward(x, weight)
            y = (x.bfloat16() @ weight.bfloat16().t()).float()
            return y + bias if bias is not None else y

        @staticmethod
        def backward(ctx, g):
            x, weight = ctx.saved_tensors
            low = torch.bfloat16
            gx = ((g.to(low) @ weight.to(low)).float() if input_grad_bf16 else g @ weight)
            g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
            gw = ((g2.to(low).t() @ x2.to(low)).float() if weight_grad_bf16 else g2.t() @ x2)
            return gx, gw, (g2.sum(0) if ctx.needs_input_grad[2] else None)

    module.forward = lambda x: Linear.apply(x, module.weight, module.bias)


def gradient(variant: str, opts, model_dir: str, train, collator) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, TrainerCallback

    from hf_distill import DistillationConfig, DistillationTrainer
    from hf_distill.students import shrink_model

    teacher = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    transformers.set_seed(opts.seed)
    student = shrink_model(teacher, num_layers=opts.student_layers)
    grads: dict = {}

    class Grab(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            grads.update({n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None})

    autocast = variant.startswith("autocast")
    linear = variant.startswith(("bf16-linear", "bf16-forward", "fp32-forward"))
    extra = {"output_layer_dtype": "bfloat16"} if variant == "bf16-head" or linear else {}
    backward_bf16 = variant == "fp32-forward-bf16-backward"
    if backward_bf16:
        extra["linear_backward_dtype"] = "bfloat16"
    args = DistillationConfig(
        output_dir=tempfile.mkdtemp(prefix="precision_gradients_"), max_steps=1,
        per_device_train_batch_size=opts.batch_size, learning_rate=1e-9, lr_scheduler_type="constant",
        max_grad_norm=0.0, seed=opts.seed, bf16=autocast, use_cpu=True, train_sampling_strategy="sequential",
        remove_unused_columns=False, logging_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True,
        logits_loss="jsd", jsd_beta=0.5, task_weight=0.0, logits_weight=1.0,
        teacher_dtype=None if variant == "fp32" else "bfloat16", **extra)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=train,
                                  data_collator=collator, callbacks=[Grab()])
    part = {"autocast-fp32-attention": "self_attn", "autocast-fp32-mlp": "mlp"}.get(variant)
    if part:
        for layer in trainer.model.model.layers:
            without_autocast(getattr(layer, part))
    if linear and not backward_bf16:
        for name, module in trainer.model.model.layers.named_modules():
            if isinstance(module, torch.nn.Linear) and not any(re.search(k, name) for k in opts.keep_fp32):
                bf16_linear(module, weight_grad_bf16=False, input_grad_bf16=variant.startswith("bf16-linear"))
    with contextlib.redirect_stdout(sys.stderr):
        trainer.train()
    return grads


def compare(grads: dict, reference: dict) -> dict:
    import torch

    out = {}
    for fam in (*FAMILIES, "all"):
        names = [n for n in reference if fam == "all" or family(n) == fam]
        if not names:
            continue
        g = torch.cat([grads[n].double().flatten() for n in names])
        r = torch.cat([reference[n].double().flatten() for n in names])
        out[fam] = {"relative_error": float((g - r).norm() / r.norm()),
                    "cosine": float(g @ r / (g.norm() * r.norm()))}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--student_layers", type=int, default=15)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--keep_fp32", nargs="*", default=[], help="the bf16-linear and bf16-forward variants leave "
                        "the decoder's nn.Linear layers whose name under model.layers matches one of these regular "
                        "expressions in fp32, e.g. down_proj or '^0\\.' (layer 0)")
    parser.add_argument("--output", default=None, help="also write the numbers as JSON here")
    opts = parser.parse_args()

    import json

    import datasets
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling

    from hf_distill.data.assets import fetch

    model_dir = str(fetch("smollm2-135m"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    train = datasets.Dataset.from_dict(packed_blocks(tokenizer, str(fetch("news-articles")), opts.seq_len,
                                                     opts.batch_size))
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    reference = gradient("fp32", opts, model_dir, train, collator)
    rows = {v: compare(gradient(v, opts, model_dir, train, collator), reference) for v in opts.variants if v != "fp32"}
    print(f"### One step's student gradient against float32's ({opts.batch_size} x {opts.seq_len} tokens, JSD, "
          f"SmolLM2-135M -> {opts.student_layers} layers)\n")
    print("| variant | " + " | ".join(f"{f}: rel. error / cosine" for f in (*FAMILIES, "all")) + " |")
    print("|---|" + "---:|" * (len(FAMILIES) + 1))
    for variant, numbers in rows.items():
        cells = [f"{numbers[f]['relative_error']:.4f} / {numbers[f]['cosine']:.5f}" if f in numbers else ""
                 for f in (*FAMILIES, "all")]
        print(f"| {variant} | " + " | ".join(cells) + " |")
    if opts.output:
        with open(opts.output, "w") as f:
            json.dump({"options": vars(opts), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
