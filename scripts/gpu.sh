#!/usr/bin/env bash
# The one script to run on a lent GPU machine, in one device call, from the repository root:
#   bash scripts/gpu.sh                 every step in priority order; results under $OUT (default ./gpu-out)
#   bash scripts/gpu.sh --dry-run       the same control flow on any machine: steps print their commands and
#                                       sleep DRY_STEP_S (default 0) instead of running (tests/test_gpu_script.py)
#   STEPS="build ops train" bash scripts/gpu.sh   only some steps
# A lease is 15 minutes of device time, the machine's start (1-2 min) and the transfers included, and one call
# runs at most 10 minutes: the steps share GPU_BUDGET_S (default 540 s), in priority order, each capped by its
# own budget (seconds, below; override one with BUDGET_<step>=S) and by what is left. A step with under
# MIN_STEP_S (default 20) s left is skipped and says so. Priority:
#   1 build        pip install --no-build-isolation --no-deps -e . with the machine's Python (torch 2.11,
#                  Triton 3.6, nvcc 13.0, cmake, ninja, pybind11; no network), sm_90 only, warnings as errors;
#                  then one CUDA-tensor call through the CUDA backend
#   2 ops          GPU correctness of every op on CUDA tensors (CUDA backend, bn_act, dual_bn_act,
#                  scale_shift_act, conv_bn_act; non-finite inputs; determinism)
#   3 train        ResNet-50 training rows, batch 256, bf16 AMP channels_last (fusedres.bench --quick): eager
#                  (its fp32 and fp16 baselines too) and torch.compile;
#      train_bn    fusedres bn mode on the cuda and triton backends, each also under torch.compile;
#      train_conv  fusedres conv mode (the triton conv kernel), also under torch.compile. Three bench calls,
#                  each with eager as its baseline, so a cut leaves the finished ones
#   4 kernels      the kernel rows (fusedres.bench --level kernels --quick)
#   5 tests        the rest of the suite; memcheck / racecheck (compute-sanitizer over the CUDA backend's tests);
#      ...         blocks rows; the ResNet-1001 memory row (preact)
# Whatever finished is in $OUT after every step (the device tool may kill the call at its limit, so nothing
# waits for the end): summary.txt (versions, one line per step: rc, seconds, last line), results.tar.gz (every
# log, junit XML and benchmark JSON/CSV/markdown), train.md (the ResNet-50 rows so far). Exit status: non-zero
# when a step failed or was cut.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    *) echo "gpu.sh: unknown argument $arg (use --dry-run, or STEPS=...)" >&2; exit 2 ;;
  esac
done
OUT="${OUT:-$PWD/gpu-out}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/fusedres-gpu.XXXXXX")"  # logs and results; packed into $OUT after each step
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
ALL_STEPS="build ops train train_bn train_conv kernels tests memcheck racecheck blocks preact"
STEPS="${STEPS:-$ALL_STEPS}"
# per-step budgets (seconds), in priority order
declare -A BUDGET=([build]=150 [ops]=150 [train]=75 [train_bn]=90 [train_conv]=90 [kernels]=60 [tests]=240
                   [memcheck]=150 [racecheck]=120 [blocks]=120 [preact]=150)
OP_TESTS=(tests/test_cuda_backend.py tests/test_counters.py tests/test_bn_act.py tests/test_dual_bn_act.py
          tests/test_scale_shift_act.py tests/test_conv_bn_act.py tests/test_nonfinite.py tests/test_determinism.py)
TRAIN=(--level models --models resnet50 --modes train --batch 256 --dtype bf16 --quick --no-plots)
START=$SECONDS
DEADLINE=$((SECONDS + ${GPU_BUDGET_S:-540}))
export FUSEDRES_WERROR="${FUSEDRES_WERROR:-1}" FUSEDRES_BUILD_CUDA="${FUSEDRES_BUILD_CUDA:-1}"
export FUSEDRES_CUDA_ARCHS="${FUSEDRES_CUDA_ARCHS:-90}"  # the H200: one architecture builds in half the time
export PYTHONUNBUFFERED=1
# The machine's own Python may be marked externally managed (PEP 668), and it has no network.
export PIP_BREAK_SYSTEM_PACKAGES=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1

declare -a SUMMARY=()
FAILED=0
wanted() { [[ " $STEPS " == *" $1 "* ]]; }
note() { SUMMARY+=("$(printf '%-11s %s' "$1" "$2")"); }

# Rewrite $OUT from $WORK: a call killed at any point keeps the steps that finished.
publish() {
  {
    cat "$WORK/env.txt" 2>/dev/null
    echo
    [ "$DRY" = 1 ] && echo "DRY RUN: no step ran its command"
    printf '%s\n' "${SUMMARY[@]}"
    echo "elapsed $((SECONDS - START))s of GPU_BUDGET_S=${GPU_BUDGET_S:-540}"
  } >"$OUT/summary.txt"
  cp "$OUT/summary.txt" "$WORK/summary.txt"
  find "$WORK" -path "$WORK/train*" -name '*.md' -newer "$WORK/env.txt" -print0 2>/dev/null |
    xargs -0 -r cat >"$OUT/train.md.tmp" 2>/dev/null && mv "$OUT/train.md.tmp" "$OUT/train.md"
  [ -s "$OUT/train.md" ] || rm -f "$OUT/train.md"
  tar -czf "$OUT/results.tar.gz.tmp" -C "$WORK" . 2>/dev/null && mv "$OUT/results.tar.gz.tmp" "$OUT/results.tar.gz"
}
trap 'note interrupted "the script was stopped (signal)"; FAILED=1; publish; exit 1' INT TERM

# step NAME COMMAND...: run under min(budget, time left), log to $WORK/NAME.log, record rc, time, last line.
step() {
  local name="$1"; shift
  local cap="${BUDGET[$name]}" left=$((DEADLINE - SECONDS))
  local override="BUDGET_$name"
  [ -n "${!override:-}" ] && cap="${!override}"
  local log="$WORK/$name.log"
  if [ "$left" -lt "${MIN_STEP_S:-20}" ]; then
    note "$name" "skipped: out of time (GPU_BUDGET_S)"
    publish
    return 0
  fi
  [ "$cap" -le "$left" ] || cap=$left
  echo "=== [$name] (cap ${cap}s) $*" | tee "$log"
  local t0=$SECONDS rc
  if [ "$DRY" = 1 ]; then
    local nap="${DRY_STEP_S:-0}"
    [[ " ${DRY_HANG:-} " == *" $name "* ]] && nap=$((cap + 30))  # a step that overruns its budget
    timeout --signal=INT --kill-after=5 "$cap" bash -c 'sleep "$0"; echo "would run: $*"' "$nap" "$@" >>"$log" 2>&1
  else
    timeout --signal=INT --kill-after=10 "$cap" "$@" >>"$log" 2>&1
  fi
  rc=$?
  tail -n 15 "$log"
  [ "$rc" -eq 124 ] && echo "[$name] stopped after ${cap}s (its budget)" >>"$log"
  note "$name" "$(printf 'rc=%-3s %4ss  %s' "$rc" "$((SECONDS - t0))" "$(tail -n 1 "$log" | cut -c1-110)")"
  [ "$rc" -eq 0 ] || FAILED=1
  publish
}

{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  echo "steps: $STEPS"
} >"$WORK/env.txt"
[ "$DRY" = 1 ] || {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || true
  nvcc --version 2>&1 | tail -n 2 || true
  cmake --version 2>&1 | head -n 1 || true
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'triton', triton.__version__)" 2>&1 || true
} >>"$WORK/env.txt"
cat "$WORK/env.txt"
publish

# 1 build
if wanted build; then
  rm -rf build/temp.* 2>/dev/null  # a clean CMake dir: build.log then times the full build
  step build bash -c "time '$PY' -m pip install --no-build-isolation --no-deps -v -e . && '$PY' -c \
'import fusedres.cuda as c, torch; print(c.build_info()); x = torch.randn(2, 8, 4, 4, device=\"cuda\"); \
r = c.not_supported_reasons(x); print(\"CUDA backend accepts a CUDA tensor:\", not r, r); assert not r'"
fi
# 2 correctness of every op on CUDA tensors
if wanted ops; then
  step ops "$PY" -m pytest "${OP_TESTS[@]}" -q -ra -p no:cacheprovider --junitxml="$WORK/ops.xml"
fi
# 3 ResNet-50 training rows at batch 256
if wanted train; then
  step train "$PY" -m fusedres.bench "${TRAIN[@]}" --impl 'eager,compile' --out "$WORK/train"
fi
if wanted train_bn; then
  step train_bn "$PY" -m fusedres.bench "${TRAIN[@]}" \
    --impl 'eager,fusedres[cuda],fusedres[triton],fusedres[cuda]+compile,fusedres[triton]+compile' \
    --out "$WORK/train_bn"
fi
if wanted train_conv; then
  step train_conv "$PY" -m fusedres.bench "${TRAIN[@]}" --impl 'eager,fusedres[triton]+conv*' \
    --out "$WORK/train_conv"
fi
# 4 kernel rows
if wanted kernels; then
  step kernels "$PY" -m fusedres.bench --level kernels --quick --no-plots --out "$WORK/kernels"
fi
# 5 the rest
if wanted tests; then
  ignore=()
  for f in "${OP_TESTS[@]}"; do ignore+=("--ignore=$f"); done
  step tests "$PY" -m pytest tests "${ignore[@]}" -q -ra -p no:cacheprovider --junitxml="$WORK/tests.xml"
fi
if wanted memcheck || wanted racecheck; then
  if [ "$DRY" = 1 ] || command -v compute-sanitizer >/dev/null 2>&1; then
    SAN=(compute-sanitizer --error-exitcode 1 --target-processes all)
    export FUSEDRES_CUDA_TEST_QUICK=1
    wanted memcheck && step memcheck "${SAN[@]}" --tool memcheck --leak-check no \
      "$PY" -m pytest tests/test_cuda_backend.py -q -x -p no:cacheprovider
    wanted racecheck && step racecheck "${SAN[@]}" --tool racecheck \
      "$PY" -m pytest tests/test_cuda_backend.py -q -x -p no:cacheprovider \
      -k "test_batch_stats or test_backward_reduce or deterministic"
    unset FUSEDRES_CUDA_TEST_QUICK
  else
    note sanitizer "skipped: compute-sanitizer not found"
  fi
fi
if wanted blocks; then
  step blocks "$PY" -m fusedres.bench --level blocks --quick --no-plots --out "$WORK/blocks"
fi
if wanted preact; then
  step preact "$PY" -m fusedres.bench --level models --models preact_resnet1001 --modes train --no-plots \
    --impl 'eager,fusedres[*],fusedres[triton]+conv' --dtype fp32,bf16 --out "$WORK/preact"
fi

echo
echo "=== summary (in $OUT)"
publish
cat "$OUT/summary.txt"
rm -rf "$WORK"
exit "$FAILED"
