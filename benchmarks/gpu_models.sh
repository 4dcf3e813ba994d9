#!/usr/bin/env bash
# Real-size model throughput on one GPU (issue 19, item 5): benchmarks/bench_models.py's GPU cases, Wan2.1-1.3B
# (17 frames at 480 px) then Qwen-Image (512 px), ours against the Flow-GRPO-style eager loop on the same
# random-weight model, in images (frames) per GPU-second. Beside gpu_check.sh, which fills its own budget.
#
# Usage (repository root, on the GPU machine): bash benchmarks/gpu_models.sh
# Needs torch (CUDA build), diffusers, peft, pytest, pytest-benchmark; no internet. Uses pec_kernels' CUDA
# extension when gpu_check.sh (or pip install -e .) built it, its Triton/torch fallback otherwise (printed).
# Every step has a timeout so that the whole script ends within BUDGET_S seconds (default 240: 4 minutes).
# Logs and tables go to $OUT/gpu_models when OUT is set, else to a fresh temp folder.
# PEC_BENCH_MODELS_REPS (default 2): timed iterations per side; PEC_BENCH_MODELS_COMPILE=1 compiles ours.
set -uo pipefail
cd "$(dirname "$0")/.."

BUDGET_S=${BUDGET_S:-240}
START=$(date +%s)
LOG_DIR=${OUT:+$OUT/gpu_models}
LOG_DIR=${LOG_DIR:-$(mktemp -d -t pec_gpu_models.XXXX)}
mkdir -p "$LOG_DIR"
export PYTHONUNBUFFERED=1
SUMMARY="$LOG_DIR/summary.txt"
: > "$SUMMARY"
source benchmarks/_budget.sh  # elapsed, allow, run

{
  echo "== device"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi failed"
  python -c "import sys, torch, diffusers, pec_kernels; print('python', sys.version.split()[0], '| torch', \
torch.__version__, '| cuda', torch.version.cuda, '| diffusers', diffusers.__version__, '|', \
torch.cuda.get_device_name(), '| pec_kernels', pec_kernels.extension_status())"
} 2>&1 | tee "$LOG_DIR/device.log"

# One pytest per model, each writing its own table (the cheaper one first, so that it always gets measured).
for model in wan qwen_image; do
  mkdir -p "$LOG_DIR/$model"
  cap=$([[ $model == wan ]] && echo 100 || echo 220)
  PEC_BENCH_DIR="$LOG_DIR/$model" run "$model" "$cap" python -m pytest benchmarks/bench_models.py --benchmark-only \
    -q -s -p no:cacheprovider -m gpu -k "gpu and $model"
done

echo
echo "================ summary ($(elapsed)s; logs in $LOG_DIR)"
sed -n 2,3p "$LOG_DIR/device.log"
cat "$SUMMARY"
for table in "$LOG_DIR"/*/bench_models.md; do
  [[ -e $table ]] && { echo; cat "$table"; }
done
