#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one command, planned to end within 10 minutes on one H200:
#
#   LOG_DIR=/some/dir bash benchmarks/gpu_check.sh            # on a GPU machine (no network needed)
#   bash benchmarks/gpu_check.sh --dry-run                     # every step on the CPU at tiny sizes (seconds each)
#
# Steps, in order, each under its own time limit (expected minutes on an H200 in the table below) and all of them
# under a total of $GPU_CHECK_TOTAL_S seconds (default 570); every file is written as the step goes, so a run cut
# short keeps whatever finished:
#   1. probe          GPU, driver, versions, SDPA kernel and lse op for Pythia-2.8B's shapes; stops the whole run
#                     at once, exit 2, where torch sees no CUDA device                          -> probe.json
#   2. kernel tests   the compiled kernels against the float64 reference at the launchers' own configurations,
#                     the CUDA lse ops against the plain call (pytest -v, per-test timeouts, -n workers; CUDA tests
#                     fail, not skip, without a GPU)                                          -> kernel_tests.xml
#   3. pythia         benchmarks/bench_gpu_pythia.py at 2k, 8k, 32k (JSON rewritten after each measurement)
#                                                                                             -> pythia.json
#   4. kernel bench   the pytest-benchmark kernel suite                                         -> kernel_bench.json
# and every step's output in gpu_check.log, each step's status in steps.json: six files in LOG_DIR (default
# benchmarks/results/gpu_check; /tmp/attnscope-gpu-check-dry for a dry run).
#
# attnscope is not installed: a folder of links on PYTHONPATH makes this checkout importable (no pip, no network,
# no setuptools). gguf, duckdb, plotly, ray and datasets, which the GPU image lacks, are hidden (importing one
# raises ImportError), so a dry run proves the GPU paths run without them.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: [LOG_DIR=DIR] bash benchmarks/gpu_check.sh [--dry-run]" >&2; exit 64 ;;
esac
PY=${PYTHON:-python3}
if [ "$DRY" = 1 ]; then
  LOG_DIR=${LOG_DIR:-/tmp/attnscope-gpu-check-dry}
  TOTAL_S=${GPU_CHECK_TOTAL_S:-280}
else
  LOG_DIR=${LOG_DIR:-benchmarks/results/gpu_check}
  TOTAL_S=${GPU_CHECK_TOTAL_S:-570}
fi
mkdir -p "$LOG_DIR"
LOG_DIR=$(cd "$LOG_DIR" && pwd)
LOG=$LOG_DIR/gpu_check.log
: >"$LOG"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
unset TRITON_INTERPRET

WORK=$(mktemp -d /tmp/attnscope-gpu-check.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/pkg/attnscope"
for f in "$REPO"/src/attnscope/*; do ln -s "$f" "$WORK/pkg/attnscope/"; done
for m in gguf duckdb plotly ray datasets; do
  mkdir -p "$WORK/hide/$m"
  echo "raise ImportError('$m is hidden by benchmarks/gpu_check.sh: the GPU image has none')" >"$WORK/hide/$m/__init__.py"
done
export PYTHONPATH=$WORK/hide:$WORK/pkg${PYTHONPATH:+:$PYTHONPATH}

log() { echo "$*" | tee -a "$LOG"; }
T0=$SECONDS
STEPS=""
FAILED=0
write_steps() { printf '{"dry_run": %s, "log_dir": "%s", "elapsed_s": %d, "steps": [%s]}\n' \
  "$([ "$DRY" = 1 ] && echo true || echo false)" "$LOG_DIR" "$((SECONDS - T0))" "$STEPS" >"$LOG_DIR/steps.json"; }

# run_step NAME EXPECTED_MINUTES LIMIT_S COMMAND...: the command under min(LIMIT_S, what the total leaves)
run_step() {
  local name=$1 expected=$2 limit=$3
  shift 3
  local left=$((TOTAL_S - (SECONDS - T0)))
  [ "$left" -lt "$limit" ] && limit=$left
  local t=$SECONDS rc status
  if [ "$limit" -lt 10 ]; then
    rc=124 status="skipped: the total of ${TOTAL_S} s is spent"
    log "== $name: $status"
  else
    log "== $name (expected ~${expected} min, limit ${limit} s, at $((SECONDS - T0)) s): $*"
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    case $rc in
      0) status=ok ;;
      124 | 137) status="timed out after ${limit} s" ;;
      *) status="failed (exit $rc)" ;;
    esac
    log "== $name: $status in $((SECONDS - t)) s"
  fi
  [ "$rc" = 0 ] || FAILED=1
  STEPS="$STEPS${STEPS:+, }{\"step\": \"$name\", \"expected_min\": $expected, \"limit_s\": $limit, \"rc\": $rc, \"status\": \"$status\", \"seconds\": $((SECONDS - t))}"
  write_steps
  return "$rc"
}

log "gpu_check: $([ "$DRY" = 1 ] && echo "dry run on the CPU" || echo "GPU run"), $($PY -c 'import sys; print(sys.executable)'), logs in $LOG_DIR"
have() { "$PY" -c "import $1" 2>/dev/null; }
PYTEST_EXTRA=()
have pytest_timeout && PYTEST_EXTRA+=(--timeout 150) || log "pytest-timeout missing: no per-test time limit"

if [ "$DRY" = 1 ]; then
  DEVICE=cpu
  # the interpreter runs the kernels on the CPU; a subset at the production configurations keeps it to seconds
  TESTS=(env TRITON_INTERPRET=1 "$PY" -m pytest -v -p no:cacheprovider -o addopts=-ra --device cpu
    -m "interpreter or cuda" -k "production and bfloat16 or test_capture")
  BENCH=(--tiny --layers 2 --lengths 64,256 --repeats 2)
  KBENCH=(-k "smollm2 and (512 or down_proj)")
else
  DEVICE=cuda
  TESTS=("$PY" -m pytest -v -p no:cacheprovider -o addopts=-ra --device cuda -m "interpreter or cuda")
  have xdist && TESTS+=(-n 8) || log "pytest-xdist missing: the kernel tests run in one process"
  BENCH=()
  KBENCH=()
fi

# 1. probe (seconds): nothing else runs where it fails
if ! run_step probe 0.2 60 "$PY" benchmarks/gpu_probe.py --device "$DEVICE" --out "$LOG_DIR/probe.json"; then
  log "gpu_check: stopped after the probe, nothing else was run (see its message above)"
  exit 2
fi

# 2. the kernels against the float64 reference (compiling them takes most of it), the CUDA lse ops
run_step kernel_tests 2 180 "${TESTS[@]}" "${PYTEST_EXTRA[@]}" --junitxml="$LOG_DIR/kernel_tests.xml" \
  tests/test_kernels_triton.py tests/test_vocab_stats.py tests/test_capture.py

# 3. Pythia-2.8B at 2k, 8k, 32k: it starts no new measurement once its budget is spent
left=$((TOTAL_S - (SECONDS - T0) - 90))
run_step pythia 5 330 "$PY" benchmarks/bench_gpu_pythia.py --device "$DEVICE" --out "$LOG_DIR/pythia.json" \
  --budget-s "$((left < 300 ? left : 300))" "${BENCH[@]}"

# 4. the pytest-benchmark kernel suite (its JSON is written when the suite ends)
run_step kernel_bench 1.5 120 "$PY" -m pytest -v -p no:cacheprovider -o addopts="" --device "$DEVICE" \
  "${PYTEST_EXTRA[@]}" benchmarks/test_bench_kernels.py --benchmark-json="$LOG_DIR/kernel_bench.json" "${KBENCH[@]}"

log "gpu_check: $([ "$FAILED" = 0 ] && echo "every step passed" || echo "some step failed"), $((SECONDS - T0)) s; files in $LOG_DIR:"
ls -la "$LOG_DIR" | tee -a "$LOG"
exit "$FAILED"
