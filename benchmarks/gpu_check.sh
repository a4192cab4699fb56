#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one command, for a machine that already has torch, triton and
# transformers (attnscope is installed without touching them):
#   1. the Triton kernel tests, compiled (pytest --device cuda), and the CPU-path tests on the same machine;
#   2. benchmarks/bench_gpu_pythia.py (Pythia-2.8B geometry at 2k, 8k, 32k tokens);
#   3. the pytest-benchmark kernel suite on cuda.
# Logs go to $LOG_DIR (default benchmarks/results); the benchmark JSON to benchmarks/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG_DIR=${LOG_DIR:-benchmarks/results}
mkdir -p "$LOG_DIR"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$LOG_DIR/gpu_device.txt"
python3 -m pytest -q -p no:cacheprovider --device cuda tests/test_kernels_triton.py tests/test_attn_stats.py \
  2>&1 | tee "$LOG_DIR/gpu_tests.log"
python3 benchmarks/bench_gpu_pythia.py "$@" 2>&1 | tee "$LOG_DIR/gpu_bench.log"
python3 -m pytest -q -p no:cacheprovider -o addopts="" --device cuda benchmarks/test_bench_kernels.py \
  --benchmark-json="$LOG_DIR/gpu_kernels_benchmark.json" 2>&1 | tail -40 | tee "$LOG_DIR/gpu_kernels_benchmark.log"
