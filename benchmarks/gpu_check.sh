#!/usr/bin/env bash
# GPU checks, for a machine with NVIDIA GPUs (run from the repository root; not part of the test suite):
#   1. a tiny distillation (task + logits + hidden states through a learned projection) under each Accelerate engine:
#      DDP, FSDP2, DeepSpeed ZeRO-2 and ZeRO-3 (skipped, and said so, when deepspeed is not installed), with
#      benchmarks/engine_check.py: losses finite, the teacher never in the optimizer and unchanged, the projection
#      trained with the student, the saved student reloads, only the main process wrote files;
#   2. benchmark 1 of docs/performance.md (output loss alone, plain vs chunked) on the GPU in bfloat16;
#   2b. bench_chunk_kernel.py on the GPU: the output chunk's closed form eager vs compiled (Triton);
#   3. bench_vs_trl.py on the GPU in bf16 (SmolLM2-135M -> 15 layers, 4 x 512 tokens): TRL's GKDTrainer with bf16
#      autocast, with its Liger option (`use_liger_kernel`) off and on (on: skipped, and said so, when liger-kernel is
#      not installed), beside ours in fp32, with bf16 autocast and the compiled output kernel (`ours-fast`;
#      `output_kernel="compiled"`, Triton), in the recommended setting
#      (`ours-bf16-head`: the bf16 teacher and output layers; the recommended `ours-bf16-backward` adds bf16
#      backward products to an fp32 forward and does not combine with --bf16) and with our output terms through
#      Liger's kernel (`ours-liger`, `output_kernel="liger"`;
#      when liger-kernel is installed), with the GPU's matmul limits.
# Needs torch with CUDA, transformers, accelerate, datasets (and optionally deepspeed) importable, e.g. after
# `pip install -e .[dev]`; the package is taken from this checkout either way.
#
#   bash benchmarks/gpu_check.sh [OUTPUT_DIR]      # results: OUTPUT_DIR/<engine>.json, OUTPUT_DIR/gpu_check.md
set -uo pipefail
cd "$(dirname "$0")/.."
OUTPUT_DIR=${1:-${OUT:-gpu_check_results}}
mkdir -p "$OUTPUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_DISABLED=true
PYTHON=${PYTHON:-python3}
NGPU=$($PYTHON -c "import torch; print(torch.cuda.device_count())")
if [ "${NGPU:-0}" -lt 1 ]; then echo "No CUDA GPU visible to torch: nothing to check."; exit 1; fi
SUMMARY="$OUTPUT_DIR/gpu_check.md"
{
  echo "# GPU check $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/GPU: /'
  $PYTHON -c "import torch, transformers, accelerate; print('torch', torch.__version__, '| transformers', transformers.__version__, '| accelerate', accelerate.__version__)"
  echo
  echo "| engine | processes | result |"
  echo "|---|---:|---|"
} > "$SUMMARY"

status=0
for engine in ddp fsdp2 deepspeed-zero2 deepspeed-zero3; do
  case $engine in
    ddp) config=configs/accelerate/ddp-gpu.yaml ;;
    *) config=configs/accelerate/$engine.yaml ;;
  esac
  if [[ $engine == deepspeed* ]] && ! $PYTHON -c "import deepspeed" 2>/dev/null; then
    echo "| $engine | | skipped: deepspeed is not installed |" >> "$SUMMARY"; continue
  fi
  port=$((29500 + RANDOM % 1000))
  echo "== $engine ($NGPU process(es))"
  if $PYTHON -m accelerate.commands.launch --config_file "$config" --num_processes "$NGPU" --main_process_port "$port" \
      benchmarks/engine_check.py "$OUTPUT_DIR" "$engine" > "$OUTPUT_DIR/$engine.log" 2>&1 \
      && $PYTHON -c "import json,sys; sys.exit(0 if json.load(open('$OUTPUT_DIR/$engine.json'))['ok'] else 1)"; then
    echo "| $engine | $NGPU | ok |" >> "$SUMMARY"
  else
    status=1
    echo "| $engine | $NGPU | FAILED: $(grep -E 'Error|error' "$OUTPUT_DIR/$engine.log" | tail -1 | cut -c1-200) |" >> "$SUMMARY"
  fi
  tail -3 "$OUTPUT_DIR/$engine.log"
done

echo "== benchmark 1 on the GPU (bfloat16)"
$PYTHON benchmarks/bench_logits_loss.py --device cuda --dtype bfloat16 --tokens 512 1024 2048 4096 --repeats 3 \
  --output "$OUTPUT_DIR/bench_logits_loss_cuda.json" >> "$SUMMARY" 2> "$OUTPUT_DIR/bench_logits_loss_cuda.log" || status=1
echo "== bench_chunk_kernel.py on the GPU (the chunk's closed form, eager vs torch.compile / Triton)"
echo -e "\n## bench_chunk_kernel.py, CUDA\n" >> "$SUMMARY"
$PYTHON benchmarks/bench_chunk_kernel.py --device cuda --output "$OUTPUT_DIR/bench_chunk_kernel_cuda.json" \
  >> "$SUMMARY" 2> "$OUTPUT_DIR/bench_chunk_kernel_cuda.log" || status=1
echo "== bench_vs_trl.py on the GPU (bf16; TRL's Liger option off, then on)"
echo -e "\n## bench_vs_trl.py, CUDA, bf16\n" >> "$SUMMARY"
$PYTHON benchmarks/bench_vs_trl.py --device cuda --bf16 --steps 10 --warmup 3 --seq_len 512 \
  --trainers trl-bf16 ours ours-bf16-head ours-fast --output "$OUTPUT_DIR/bench_vs_trl_cuda.json" >> "$SUMMARY" \
  2> "$OUTPUT_DIR/bench_vs_trl_cuda.log" || status=1
if $PYTHON -c "import liger_kernel" 2>/dev/null; then
  echo -e "\n### ours with output_kernel=liger\n" >> "$SUMMARY"
  $PYTHON benchmarks/bench_vs_trl.py --device cuda --bf16 --steps 10 --warmup 3 --seq_len 512 \
    --trainers ours-fast ours-liger --no_machine --output "$OUTPUT_DIR/bench_vs_trl_cuda_ours_liger.json" \
    >> "$SUMMARY" 2> "$OUTPUT_DIR/bench_vs_trl_cuda_ours_liger.log" || status=1
  echo -e "\n### with TRL's use_liger_kernel=True\n" >> "$SUMMARY"
  $PYTHON benchmarks/bench_vs_trl.py --device cuda --bf16 --steps 10 --warmup 3 --seq_len 512 --trl_liger \
    --trainers trl-bf16 --no_machine --output "$OUTPUT_DIR/bench_vs_trl_cuda_liger.json" >> "$SUMMARY" \
    2> "$OUTPUT_DIR/bench_vs_trl_cuda_liger.log" || status=1
else
  echo -e "\nTRL with Liger: skipped, liger-kernel is not installed (pip install liger-kernel)." >> "$SUMMARY"
fi
cat "$SUMMARY"
exit $status
