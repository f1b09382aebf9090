#!/usr/bin/env bash
# The fast-path checks for a lent GPU (H100 / H200), in one command of under 9 minutes
# (issue 16, "What it must show": on a lent GPU).
#
#   OUT=./gpu_out bash scripts/gpu_checks.sh      # from the repository root, .venv present
#
# Runs in order, each under its own timeout, all inside an overall budget (GPU_CHECKS_BUDGET
# seconds, default 530; a step is skipped once too little is left):
#   1. env        imports v4jax, lists the JAX devices (stops here when JAX sees no GPU or
#                 v4jax does not import), then nvidia-smi
#   2. pytest     `pytest -m gpu` over the test files that hold GPU tests (compiled Pallas
#                 sparse-attention forward / backward against the reference)
#   3. bench_moe  `scripts/bench_moe.py --gpu`: one MoE layer at Flash width (D 4096, F 2048,
#                 E 256, k 6, FP4): grouped (auto) vs dense TFLOP/s at T = 4096, and the
#                 batch-1 decode step's weight bandwidth (bytes of the k experts + shared expert
#                 + router over the time) against the datasheet peak
#   4. attention  `scripts/bench_attention.py --backward` at the Flash 4K prefill shape:
#                 Pallas forward + backward vs the jnp reference and autodiff
#   5. decode     `scripts/bench_decode.py`: tiny-model prefill / decode tokens/s, new vs old path
# Produces five files under $OUT (default ./gpu_out):
#   gpu_checks.log (every step's output, in order), summary.json (rc and seconds per step),
#   bench_moe_gpu.json, bench_attention_bwd.json, bench_decode_gpu.json.
# Needs no network. PY overrides the interpreter (default .venv/bin/python, else python3); the
# repository root goes on PYTHONPATH so an uninstalled checkout imports too.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-./gpu_out}"
BUDGET="${GPU_CHECKS_BUDGET:-530}"
PY="${PY:-.venv/bin/python}"
if [ ! -x "$PY" ] && ! command -v "$PY" >/dev/null; then
  echo "gpu_checks: $PY not found; falling back to python3" >&2
  PY=python3
fi
mkdir -p "$OUT"
LOG="$OUT/gpu_checks.log"
STEPS="$(mktemp -d)"
trap 'rm -rf "$STEPS"' EXIT
: >"$LOG"
export JAX_PLATFORMS=cuda # never fall back to the CPU silently (tests/conftest.py keeps it)
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
START=$SECONDS
RESULTS=()
LAST_RC=0

# step NAME TIMEOUT_S CMD...: runs CMD under min(TIMEOUT_S, what the budget has left), appends
# its output to $LOG, records "NAME rc seconds" (rc null: skipped) and sets LAST_RC.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - (SECONDS - START) - 5))
  ((left < limit)) && limit=$left
  if ((limit < 15)); then
    echo "== $name: skipped (budget spent)" | tee -a "$LOG"
    RESULTS+=("$name null 0")
    LAST_RC=1
    return
  fi
  echo "== $name (timeout ${limit}s): $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout -k 5 "$limit" "$@" >"$STEPS/$name.log" 2>&1
  local rc=$?
  cat "$STEPS/$name.log" >>"$LOG"
  ((rc == 124 || rc == 137)) && echo "== $name: TIMED OUT after ${limit}s" | tee -a "$LOG"
  echo "== $name: rc=$rc in $((SECONDS - t0))s" | tee -a "$LOG"
  RESULTS+=("$name $rc $((SECONDS - t0))")
  LAST_RC=$rc
}

step env 60 "$PY" -c 'import jax, sys, v4jax
print("jax", jax.__version__, jax.default_backend(), jax.devices())
sys.exit(0 if jax.default_backend() == "gpu" else "gpu_checks: JAX sees no GPU")'
if ((LAST_RC != 0)); then
  echo "gpu_checks: no usable GPU backend (see $LOG); stopping" | tee -a "$LOG"
  tail -n 20 "$STEPS/env.log"
  exit 1
fi
if command -v nvidia-smi >/dev/null; then
  timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >>"$LOG" 2>&1
fi

mapfile -t GPU_TESTS < <(grep -l "mark.gpu" tests/test_*.py)
step pytest 150 "$PY" -m pytest -q -p no:xdist -m gpu "${GPU_TESTS[@]}"
step bench_moe 120 "$PY" scripts/bench_moe.py --gpu --out "$OUT/bench_moe_gpu.json"
step attention 90 "$PY" scripts/bench_attention.py --backward \
  --only "flash prefill ctx=4096" --json "$OUT/bench_attention_bwd.json"
step decode 150 "$PY" scripts/bench_decode.py --paths new,old --batches 1,4 \
  --json "$OUT/bench_decode_gpu.json"

{
  echo "{"
  for i in "${!RESULTS[@]}"; do
    read -r name rc secs <<<"${RESULTS[$i]}"
    sep=","
    ((i == ${#RESULTS[@]} - 1)) && sep=""
    echo "  \"$name\": {\"rc\": $rc, \"seconds\": $secs}$sep"
  done
  echo "}"
} >"$OUT/summary.json"

echo
echo "== last lines of each step (full output: $LOG)"
for name in pytest bench_moe attention decode; do
  [ -f "$STEPS/$name.log" ] && { echo "-- $name"; tail -n 12 "$STEPS/$name.log"; }
done
echo
echo "== summary (total $((SECONDS - START))s)"
printf '%s\n' "${RESULTS[@]}"
