#!/usr/bin/env bash
# The one script to run on a lent GPU machine, in a single call, from the repository root:
#   bash scripts/gpu.sh                      all steps, logs and results under $OUT (default ./gpu-out)
#   STEPS="build bench" bash scripts/gpu.sh  only some steps (build kernels tests memcheck racecheck bench preact)
# Steps (each runs even when an earlier one fails; a summary closes the run):
#   build      pip install --no-build-isolation --no-deps -e .  with the machine's own Python (no venv, no
#              network); warnings are errors; the build time is in build.log
#   kernels    the op / kernel tests first (CUDA backend, bn_act, dual_bn_act, scale_shift_act, conv_bn_act),
#              so a short budget still covers the code that only a GPU can check
#   tests      python -m pytest tests -q on the GPU: the rest of the suite (all of it when kernels is not run)
#   memcheck   compute-sanitizer --tool memcheck over tests/test_cuda_backend.py (quick shapes)
#   racecheck  compute-sanitizer --tool racecheck over its reductions
#   bench      python -m fusedres.bench --level $BENCH_LEVEL --out $OUT/bench (when fusedres/bench exists)
#   preact     the ResNet-1001 memory row: stock vs fused (bn and conv mode) pre-activation ResNet-1001 training step
# The device tool stops a command after 10 minutes: the steps share GPU_BUDGET_S (default 570 s), each capped
# by its own limit and by what is left; a step with under 20 s left is skipped and says so.
# What comes back: summary.txt (versions, device, one line per step), <step>.log for each step run, and
# results.tar.gz with everything (junit XML, benchmark results): 8 files at most, as the device tool returns.
# Exit status: non-zero when any step failed.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-$PWD/gpu-out}"
MORE="$OUT/more"  # packed into results.tar.gz at the end
mkdir -p "$MORE"
PY="${PYTHON:-python3}"
STEPS="${STEPS:-build kernels tests memcheck racecheck bench preact}"
KERNEL_TESTS=(tests/test_cuda_backend.py tests/test_bn_act.py tests/test_dual_bn_act.py tests/test_scale_shift_act.py
              tests/test_conv_bn_act.py)
BENCH_LEVEL="${BENCH_LEVEL:-all}"
DEADLINE=$((SECONDS + ${GPU_BUDGET_S:-570}))
export FUSEDRES_WERROR="${FUSEDRES_WERROR:-1}"
export FUSEDRES_BUILD_CUDA="${FUSEDRES_BUILD_CUDA:-1}"
export PYTHONUNBUFFERED=1
# The machine's own Python may be marked externally managed (PEP 668), and it has no network: tell pip so
# (older pips ignore the variables they do not know).
export PIP_BREAK_SYSTEM_PACKAGES=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1

declare -a SUMMARY=()
FAILED=0
wanted() { [[ " $STEPS " == *" $1 "* ]]; }
note() { SUMMARY+=("$(printf '%-10s %s' "$1" "$2")"); }

# step NAME CAP_S COMMAND...: run with a time cap, log to $OUT/NAME.log, record rc, time and last line
step() {
  local name="$1" cap="$2"; shift 2
  local log="$OUT/$name.log" left=$((DEADLINE - SECONDS))
  if [ "$left" -lt 20 ]; then
    note "$name" "skipped: out of time (GPU_BUDGET_S)"
    return 0
  fi
  [ "$cap" -le "$left" ] || cap=$left
  echo "=== [$name] (cap ${cap}s) $*" | tee "$log"
  local t0=$SECONDS
  timeout --signal=INT --kill-after=10 "$cap" "$@" >>"$log" 2>&1
  local rc=$?
  tail -n 15 "$log"
  [ "$rc" -eq 124 ] && echo "[$name] stopped after ${cap}s" >>"$log"
  note "$name" "$(printf 'rc=%-3s %4ss  %s' "$rc" "$((SECONDS - t0))" "$(tail -n 1 "$log" | cut -c1-110)")"
  [ "$rc" -eq 0 ] || FAILED=1
}

{
  echo "date: $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || true
  nvcc --version 2>&1 | tail -n 2 || true
  cmake --version 2>&1 | head -n 1 || true
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'triton', triton.__version__)" 2>&1 || true
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
} >"$MORE/env.txt"
cat "$MORE/env.txt"

if wanted build; then
  rm -rf build/temp.* 2>/dev/null  # a clean CMake dir: build.log then times the full build
  step build 300 bash -c "time '$PY' -m pip install --no-build-isolation --no-deps -v -e . && '$PY' -c \
'import fusedres.cuda as c, torch; print(c.build_info()); x = torch.randn(2, 8, 4, 4, device=\"cuda\"); \
r = c.not_supported_reasons(x); print(\"CUDA backend accepts a CUDA tensor:\", not r, r); assert not r'"
fi

if wanted kernels; then
  step kernels 240 "$PY" -m pytest "${KERNEL_TESTS[@]}" -q -ra --junitxml="$MORE/kernels.xml"
fi
if wanted tests; then
  ignore=()
  if wanted kernels; then
    for f in "${KERNEL_TESTS[@]}"; do ignore+=("--ignore=$f"); done
  fi
  step tests 360 "$PY" -m pytest tests "${ignore[@]}" -q -ra --junitxml="$MORE/tests.xml"
fi

if wanted memcheck || wanted racecheck; then
  if command -v compute-sanitizer >/dev/null 2>&1; then
    SAN=(compute-sanitizer --error-exitcode 1 --target-processes all)
    export FUSEDRES_CUDA_TEST_QUICK=1
    wanted memcheck && step memcheck 180 "${SAN[@]}" --tool memcheck --leak-check no \
      "$PY" -m pytest tests/test_cuda_backend.py -q -x -p no:cacheprovider
    wanted racecheck && step racecheck 150 "${SAN[@]}" --tool racecheck \
      "$PY" -m pytest tests/test_cuda_backend.py -q -x -p no:cacheprovider \
      -k "test_batch_stats or test_backward_reduce or deterministic"
    unset FUSEDRES_CUDA_TEST_QUICK
  else
    note sanitizer "skipped: compute-sanitizer not found"
  fi
fi

if wanted bench; then
  if [ -d fusedres/bench ]; then
    mkdir -p "$MORE/bench"
    if "$PY" -m fusedres.bench --help >/dev/null 2>&1; then
      step bench 600 "$PY" -m fusedres.bench --level "$BENCH_LEVEL" --out "$MORE/bench"
    else
      step bench 30 "$PY" -m fusedres.bench --help
    fi
  else
    note bench "skipped: no fusedres/bench"
  fi
fi

if wanted preact; then
  mkdir -p "$MORE/bench"
  step preact 300 "$PY" -m fusedres.bench --level models --models preact_resnet1001 --modes train \
    --impl 'eager,fusedres[*],fusedres[triton]+conv' --dtype fp32,bf16 --out "$MORE/bench"
fi

echo
echo "=== summary (logs in $OUT)"
{ cat "$MORE/env.txt"; echo; printf '%s\n' "${SUMMARY[@]}"; } >"$OUT/summary.txt"
printf '%s\n' "${SUMMARY[@]}"
cp "$OUT"/*.log "$OUT/summary.txt" "$MORE/" 2>/dev/null
tar -czf "$OUT/results.tar.gz" -C "$MORE" . && rm -rf "$MORE"
exit "$FAILED"
