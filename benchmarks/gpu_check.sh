#!/usr/bin/env bash
# One-shot GPU check: build the CUDA extension, run the GPU tests and the benchmarks, print a summary.
#
# Usage (repository root, on the GPU machine): bash benchmarks/gpu_check.sh
# Needs torch (CUDA build), triton, nvcc, ninja, pytest, pytest-benchmark; no internet.
# Every step has a timeout so that the whole script ends within BUDGET_S seconds (default 540).
# Logs and benchmark tables go to $OUT/gpu_check when OUT is set, else to a fresh temp folder.
set -uo pipefail
cd "$(dirname "$0")/.."

BUDGET_S=${BUDGET_S:-540}
START=$(date +%s)
LOG_DIR=${OUT:+$OUT/gpu_check}
LOG_DIR=${LOG_DIR:-$(mktemp -d -t pec_gpu_check.XXXX)}
mkdir -p "$LOG_DIR"
export PEC_BENCH_DIR="$LOG_DIR" PYTHONUNBUFFERED=1
SUMMARY="$LOG_DIR/summary.txt"
: > "$SUMMARY"

source benchmarks/_budget.sh  # elapsed, allow, run

{
  echo "== device"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi failed"
  python -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'| cuda', torch.version.cuda, '| triton', triton.__version__, '|', torch.cuda.get_device_name())"
  nvcc --version | tail -n 1
} 2>&1 | tee "$LOG_DIR/device.log"

export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
run build 300 python -m pip install --no-build-isolation --no-deps -e . \
  && python -c "import pec_kernels._C, pec_kernels; print(pec_kernels.extension_status())" 2>&1 | tee -a "$LOG_DIR/build.log"

export PEC_REQUIRE_EXTENSION=1
# Includes tests/test_compile.py's GPU cases (opcheck of every torch.ops.pec op, an Inductor fullgraph step
# on the CUDA ops: its compilation takes a while), the kNN memory bound and the SDE batch past 65,535.
run gpu_tests 240 python -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors tests/
# The CPU suites (faiss-cpu/scikit-learn anchors, the CPU iteration benchmark, overlapped scoring with a
# slow http reward) do not spend the GPU machine's time: run them on a CPU machine with
# `pytest benchmarks/ --benchmark-only`. The real-size model cases (bench_models.py) have their own script
# and budget: benchmarks/gpu_models.sh.
run benchmarks 400 python -m pytest benchmarks/ --benchmark-only -q -s -p no:cacheprovider \
  --ignore=benchmarks/bench_knn_cpu_anchors.py --ignore=benchmarks/bench_iteration.py \
  --ignore=benchmarks/bench_models.py --ignore=benchmarks/bench_overlap.py \
  --benchmark-json="$LOG_DIR/benchmarks.json"
# Last, as the longest: the end-to-end iteration at SD3.5-M size (issue 11 item 7, GPU part; torch.compile of
# a 2.2B transformer takes a minute or two). Its table lands next to the others.
run iteration_gpu 300 python -m pytest benchmarks/bench_iteration.py --benchmark-only -q -s -p no:cacheprovider -m gpu

echo
echo "================ summary ($(elapsed)s; logs in $LOG_DIR)"
sed -n 2,3p "$LOG_DIR/device.log"
cat "$SUMMARY"
for table in "$LOG_DIR"/bench_*.md; do
  [[ -e $table ]] && { echo; cat "$table"; }
done
