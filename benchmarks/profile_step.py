"""Where one distillation step's time goes: `torch.profiler` over a few optimizer steps of bench_vs_trl.py's job.

The job: teacher SmolLM2-135M (asset ``smollm2-135m``), student its 15-layer `shrink_model`, news-articles packed into
--seq_len-token blocks, batch --batch_size, `DistillationTrainer(logits_loss="jsd", task_weight=0, logits_weight=1)`
with the default chunked output path. Precision: --teacher_dtype (the teacher's weights), --autocast (CPU/GPU bf16 /
fp16 autocast of the student's step; `TrainingArguments(bf16=True)` or fp16). After --warmup untimed steps, --steps
steps run under the profiler; printed: wall time per step, the operators grouped into families (matmul, attention,
softmax and log-softmax, normalisation, element-wise, casts and copies, optimizer, other) with self CPU time and share,
and the top operators by self CPU time.

    python benchmarks/profile_step.py                                   # fp32
    python benchmarks/profile_step.py --teacher_dtype bfloat16          # bf16 teacher
    python benchmarks/profile_step.py --teacher_dtype bfloat16 --autocast bf16 --output docs/results/profile.json
    python benchmarks/profile_step.py --teacher_dtype bfloat16 --output_layer_dtype bfloat16 --keep_freed_memory \
        --linear_backward_dtype bfloat16 --output_kernel compiled --compile_student_layers
                                                                         # the command line's recommended setting
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

#: Operator families, matched in order on the profiler's operator name (first match wins).
FAMILIES = (
    ("compiled kernels", ("CompiledFxGraph", "Torch-Compiled Region", "CompiledFunction", "cpp_fused", "triton_")),
    ("attention", ("scaled_dot_product", "flash_attention", "_efficient_attention", "sdpa")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm",
                "mkldnn", "onednn", "aten::_addmm", "aten::addmv")),
    ("softmax / log-softmax / logsumexp", ("softmax", "logsumexp", "log_softmax")),
    ("normalisation", ("rms_norm", "layer_norm", "aten::rsqrt", "norm")),
    ("casts and copies", ("aten::to", "aten::_to_copy", "aten::copy_", "aten::clone", "aten::contiguous",
                          "aten::cat", "aten::index", "aten::gather", "aten::scatter", "aten::masked", "aten::where",
                          "aten::embedding", "aten::fill_", "aten::zero_", "aten::zeros", "aten::empty")),
    ("optimizer", ("adam", "_foreach", "aten::lerp", "aten::addcdiv", "aten::addcmul", "aten::sqrt")),
    ("element-wise", ("aten::mul", "aten::add", "aten::sub", "aten::div", "aten::neg", "aten::exp", "aten::log",
                      "aten::silu", "aten::sigmoid", "aten::tanh", "aten::pow", "aten::sum", "aten::mean",
                      "aten::clamp", "aten::abs", "aten::max", "aten::min", "aten::argmax", "aten::sort",
                      "aten::topk", "aten::cos", "aten::sin", "aten::threshold", "aten::eq", "aten::ne",
                      "aten::lt", "aten::gt", "aten::ge", "aten::le", "aten::logical", "aten::reciprocal")),
)


def family(name: str) -> str:
    low = name.lower()
    for label, keys in FAMILIES:
        if any(key.lower() in low for key in keys):
            return label
    return "other"


def build(opts: argparse.Namespace):
    import datasets
    import torch
    import transformers
    from bench_vs_trl import packed_blocks
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling

    from hf_distill import DistillationConfig, DistillationTrainer
    from hf_distill.data.assets import fetch
    from hf_distill.students import shrink_model

    transformers.set_seed(0)
    model_dir = str(fetch("smollm2-135m"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    steps = opts.warmup + opts.steps
    train = datasets.Dataset.from_dict(packed_blocks(tokenizer, str(fetch("news-articles")), opts.seq_len,
                                                     steps * opts.batch_size))
    teacher = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    transformers.set_seed(0)
    student = shrink_model(teacher, num_layers=15)
    extra = {"bf16": opts.autocast == "bf16", "fp16": opts.autocast == "fp16"}
    for key in ("teacher_dtype", "output_layer_dtype", "linear_backward_dtype", "output_kernel",
                "compile_student_layers"):
        if getattr(opts, key, None):
            extra[key] = getattr(opts, key)
    args = DistillationConfig(
        output_dir=os.path.join("/tmp", "profile_step"), max_steps=steps, per_device_train_batch_size=opts.batch_size,
        learning_rate=5e-5, lr_scheduler_type="constant", optim=opts.optim, use_cpu=opts.device == "cpu",
        train_sampling_strategy="sequential", logging_strategy="no", save_strategy="no", report_to="none",
        disable_tqdm=True, logits_loss="jsd", jsd_beta=0.5, task_weight=0.0, logits_weight=1.0, **extra,
    )
    return DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=train,
                               processing_class=tokenizer,
                               data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--teacher_dtype", default=None)
    parser.add_argument("--autocast", choices=("bf16", "fp16"), default=None)
    parser.add_argument("--output_layer_dtype", choices=("bfloat16", "float16"), default=None,
                        help="the chunked output layers' matmuls in this dtype (the command line's default: bfloat16)")
    parser.add_argument("--linear_backward_dtype", choices=("bfloat16",), default=None,
                        help="the student's linear layers' backward products in this dtype (the command line's default)")
    parser.add_argument("--output_kernel", choices=("chunked", "compiled"), default=None,
                        help="the chunked output terms eager or through torch.compile (the command line's default: "
                             "compiled; its compile falls in the warm-up steps)")
    parser.add_argument("--compile_student_layers", action="store_true",
                        help="the student's decoder layers through torch.compile (the command line's default; their "
                             "compile falls in the warm-up steps)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--optim", default="adamw_torch", choices=["adamw_torch", "adamw_torch_fused"])
    parser.add_argument("--keep_freed_memory", action="store_true", help="hf_distill.speed.performance.keep_freed_memory()")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--output", default=None)
    opts = parser.parse_args()

    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    if opts.keep_freed_memory:
        from hf_distill.speed.performance import keep_freed_memory

        print("keep_freed_memory:", keep_freed_memory())
    trainer = build(opts)

    class Profiled(TrainerCallback):
        def __init__(self):
            self.prof, self.ends = None, []

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())
            if state.global_step == opts.warmup:
                self.prof = profile(activities=[ProfilerActivity.CPU], record_shapes=False)
                self.prof.__enter__()

        def on_train_end(self, args, state, control, **kw):
            if self.prof is not None:
                self.prof.__exit__(None, None, None)

    callback = Profiled()
    trainer.add_callback(callback)
    trainer.train()
    step_s = (callback.ends[-1] - callback.ends[opts.warmup - 1]) / opts.steps
    events = [e for e in callback.prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    by_family: dict[str, float] = defaultdict(float)
    for e in events:
        by_family[family(e.key)] += e.self_cpu_time_total
    tokens = opts.batch_size * opts.seq_len
    title = (f"teacher_dtype={opts.teacher_dtype or 'float32'}, autocast={opts.autocast or 'off'}, "
             f"keep_freed_memory={opts.keep_freed_memory}, "
             f"{opts.batch_size} x {opts.seq_len} tokens")
    print(f"\n### Profile of one step ({title}): {step_s:.2f} s per step (profiled), {tokens / step_s:.1f} tokens/s\n")
    print("| operator family | self CPU s per step | share |\n|---|---:|---:|")
    for name, us in sorted(by_family.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {us / 1e6 / opts.steps:.3f} | {100 * us / total:.1f}% |")
    print("\n| top operators (self CPU) | s per step | share | calls per step |\n|---|---:|---:|---:|")
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[: opts.top]
    for e in top:
        print(f"| {e.key} | {e.self_cpu_time_total / 1e6 / opts.steps:.3f} | "
              f"{100 * e.self_cpu_time_total / total:.1f}% | {e.count // opts.steps} |")
    if opts.output:
        with open(opts.output, "w") as f:
            json.dump({"settings": vars(opts), "seconds_per_step": step_s, "tokens_per_s": tokens / step_s,
                       "families_s_per_step": {k: v / 1e6 / opts.steps for k, v in by_family.items()},
                       "top": [{"op": e.key, "s_per_step": e.self_cpu_time_total / 1e6 / opts.steps,
                                "calls_per_step": e.count // opts.steps} for e in top]}, f, indent=1)


if __name__ == "__main__":
    main()
