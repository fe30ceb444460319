#!/usr/bin/env bash
# Issue 38's acceptance trial with the README's commands on the packaged SmolLM2-135M-Instruct teacher and TREC
# questions: generate (64 questions, <= 48 new tokens, greedy, top-32 cache) -> distil a 10-layer cut (20 steps,
# lr 3e-4, batch 8) -> 8 on-policy steps from it (lmbda 1, reverse KL, 32 sampled tokens, batch 4).
# Each arm is skipped when its folder is complete (resumable); logs go to docs/results/issue38/trial-*.log.
# Usage: bash benchmarks/quality/trial_samples.sh [WORK_DIR]   (about 10 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=${1:-/tmp/hf_distill_trial38}
LOGS=docs/results/issue38
HF=.venv/bin/hf-distill
mkdir -p "$WORK" "$LOGS"
export HF_HUB_OFFLINE=1
if [ ! -f "$WORK/gen/manifest.json" ] || ! grep -q '"complete": true' "$WORK/gen/manifest.json"; then
  $HF generate --teacher asset:smollm2-135m --dataset asset:trec --prompt_column text --max_train_samples 64 \
    --max_new_tokens 48 --temperature 0 --cache_top_k 32 --output_dir "$WORK/gen" 2>&1 | tee "$LOGS/trial-generate.log"
fi
if [ ! -f "$WORK/seq/model.safetensors" ]; then
  $HF distill --task causal-lm --teacher asset:smollm2-135m --student_layers 10 --dataset "$WORK/gen" \
    --teacher_cache "$WORK/gen" --logits_weight 0.5 --task_weight 0.5 --temperature 1 --max_steps 20 \
    --learning_rate 3e-4 --per_device_train_batch_size 8 --logging_steps 5 --eval_strategy steps --eval_steps 10 \
    --save_strategy no --report_to none --output_dir "$WORK/seq" 2>&1 | tee "$LOGS/trial-distill.log"
fi
if [ ! -f "$WORK/on-policy/model.safetensors" ]; then
  $HF distill --task causal-lm --teacher asset:smollm2-135m --student "$WORK/seq" --dataset asset:trec \
    --prompt_column text --max_train_samples 64 --lmbda 1 --logits_loss reverse_kl --temperature 1 \
    --task_weight 0 --logits_weight 1 --max_new_tokens 32 --max_steps 8 --per_device_train_batch_size 4 \
    --logging_steps 2 --save_strategy no --report_to none --output_dir "$WORK/on-policy" \
    2>&1 | tee "$LOGS/trial-on-policy.log"
fi
cp "$WORK/seq/_report/report.md" "$LOGS/trial-distill-report.md"
cp "$WORK/on-policy/_report/report.md" "$LOGS/trial-on-policy-report.md"
cp "$WORK/on-policy/README.md" "$LOGS/trial-on-policy-card.md"
