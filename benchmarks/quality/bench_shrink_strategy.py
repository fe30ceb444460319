"""Which teacher layers should a cut causal-LM student keep? (issue 38, item 4: the command line's default)

Teacher SmolLM2-135M (packaged asset, 30 layers); students: `shrink_model` cuts of --student_layers layers by each
strategy of `hf_distill.students.select_layers` (every_other: 0, 2, ..., the old default, which drops the top third;
uniform: spread over the depth, the first and the last kept; distilbert: every other from the bottom and from the
top). NewsArticles packed into --block_size-token blocks. Each student is measured as cut (step 0) and after --steps
optimizer steps of the same distillation (``0.5 * CE + 0.5 * T^2 * KL(p_t || p_s)``, AdamW, constant learning rate,
the same batches in the same order, seed 0). The held-out blocks are split into dev (chooses) and test (reports).

    HF_DISTILL_ASSETS=... python benchmarks/quality/bench_shrink_strategy.py [--student_layers 10 --steps 30]
        [--output docs/results/issue38/shrink_strategy.json]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, DataCollatorForLanguageModeling

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, perplexity, teacher_perplexity, write_json  # noqa: E402

from hf_distill import DistillationConfig, DistillationTrainer, shrink_model  # noqa: E402
from hf_distill.cli import ModelArguments  # noqa: E402
from hf_distill.cli.models import prepare_inputs, resolve_source  # noqa: E402
from hf_distill.data.loading import DataArguments  # noqa: E402
from hf_distill.students import SHRINK_STRATEGIES, select_layers  # noqa: E402


@torch.no_grad()
def continuations(model, tokenizer, prompts: list[list[int]], new_tokens: int) -> list[str]:
    """Greedy continuations of `prompts` (token ids), decoded: what a person reads to judge a student."""
    model.eval()
    out = []
    for ids in prompts:
        generated = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False,
                                   pad_token_id=tokenizer.eos_token_id)
        out.append(tokenizer.decode(generated[0, len(ids):], skip_special_tokens=True))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="asset:smollm2-135m")
    parser.add_argument("--dataset", default="asset:news-articles")
    parser.add_argument("--student_layers", type=int, default=10)
    parser.add_argument("--strategies", nargs="+", default=list(SHRINK_STRATEGIES))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--dev_blocks", type=int, default=32)
    parser.add_argument("--test_blocks", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=3e-4)
    parser.add_argument("--samples", type=int, default=3, help="dev blocks whose first --prompt_tokens tokens every "
                        "model continues greedily (--new_tokens), printed beside the teacher's")
    parser.add_argument("--prompt_tokens", type=int, default=24)
    parser.add_argument("--new_tokens", type=int, default=24)
    parser.add_argument("--output", default=None, help="also write the results as JSON here")
    options = parser.parse_args()
    started = time.perf_counter()
    workdir = tempfile.mkdtemp(prefix="bench_shrink_")
    data_args = DataArguments(dataset=options.dataset, block_size=options.block_size,
                              max_train_samples=options.steps * options.batch_size,
                              max_eval_samples=options.dev_blocks + options.test_blocks)
    tokenizer, data = prepare_inputs(ModelArguments(teacher=options.teacher, task="causal-lm"), data_args,
                                     DistillationConfig(output_dir=workdir, report_to=[], use_cpu=True, seed=0))
    train = data.train.select(range(min(len(data.train), options.steps * options.batch_size)))
    dev = data.eval.select(range(options.dev_blocks))
    test = data.eval.select(range(options.dev_blocks, min(len(data.eval), options.dev_blocks + options.test_blocks)))
    teacher = AutoModelForCausalLM.from_pretrained(resolve_source(options.teacher), dtype=torch.float32).eval()
    depth = teacher.config.num_hidden_layers
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    prompts = [list(dev[i]["input_ids"][: options.prompt_tokens]) for i in range(min(options.samples, len(dev)))]
    results = {}
    for strategy in options.strategies:
        try:
            layers = select_layers(depth, options.student_layers, strategy)
        except ValueError as error:
            print(f"  {strategy}: skipped ({error})", file=sys.stderr)
            continue
        torch.manual_seed(0)
        student = shrink_model(teacher, layers=layers)
        args = DistillationConfig(
            output_dir=os.path.join(workdir, strategy), report_to=[], use_cpu=True, seed=0, max_steps=options.steps,
            per_device_train_batch_size=options.batch_size, per_device_eval_batch_size=options.batch_size,
            learning_rate=options.learning_rate, lr_scheduler_type="constant", logging_steps=10, save_strategy="no",
            eval_strategy="no", disable_tqdm=True, temperature=1.0, task_weight=0.5, logits_weight=0.5,
        )
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=train,
                                      data_collator=collator, processing_class=tokenizer)
        at_cut = {"dev": perplexity(trainer, dev), "test": perplexity(trainer, test)}
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        trained = {"dev": perplexity(trainer, dev), "test": perplexity(trainer, test)}
        results[strategy] = {"layers": layers, "at_cut": at_cut, "trained": trained, "train_seconds": seconds,
                             "samples": continuations(student, tokenizer, prompts, options.new_tokens)}
        print(f"  {strategy} {layers}: cut dev {at_cut['dev']:.1f}, after {options.steps} steps dev "
              f"{trained['dev']:.2f} test {trained['test']:.2f} ({seconds:.0f} s)", file=sys.stderr, flush=True)
        del trainer, student
    teacher_ppl = teacher_perplexity(teacher, tokenizer, collator, os.path.join(workdir, "teacher"),
                                     options.batch_size, {"dev": dev, "test": test})
    teacher_samples = continuations(teacher, tokenizer, prompts, options.new_tokens)
    best = min(results, key=lambda s: results[s]["trained"]["dev"])
    total = time.perf_counter() - started
    print(f"\n### Shrink strategy: SmolLM2-135M ({depth} layers) -> {options.student_layers} layers, {options.steps} "
          f"steps of {options.batch_size} x {options.block_size} tokens\n")
    print("| strategy | teacher layers kept | perplexity as cut (dev / test) | after distillation (dev / test) | s |")
    print("|---|---|---:|---:|---:|")
    for name, r in results.items():
        mark = " (best on dev)" if name == best else ""
        print(f"| {name}{mark} | {r['layers']} | {r['at_cut']['dev']:.1f} / {r['at_cut']['test']:.1f} | "
              f"{r['trained']['dev']:.2f} / {r['trained']['test']:.2f} | {r['train_seconds']:.0f} |")
    print(f"| (the teacher) | all {depth} | {teacher_ppl['dev']:.2f} / {teacher_ppl['test']:.2f} | | |")
    print(f"\n#### Greedy continuations of {len(prompts)} dev blocks' first {options.prompt_tokens} tokens "
          f"({options.new_tokens} new tokens)\n")
    for i, ids in enumerate(prompts):
        print(f"- prompt {i + 1}: {tokenizer.decode(ids)!r}")
        print(f"  - teacher: {teacher_samples[i]!r}")
        for name, r in results.items():
            print(f"  - {name}: {r['samples'][i]!r}")
    info = machine("cpu")
    print(f"\nBest on dev: {best}. Total {total / 60:.1f} min.\nMachine: {info}\nSettings: {vars(options)}")
    write_json(options.output, {"machine": info, "settings": vars(options), "results": results,
                                "teacher_perplexity": teacher_ppl, "teacher_samples": teacher_samples,
                                "prompts": [tokenizer.decode(ids) for ids in prompts], "best_on_dev": best,
                                "total_seconds": total})
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
