# Sourced by the other scripts: creates .venv (once), installs the pinned dev stack and fusedres (editable,
# building the CUDA extension when nvcc is found, with compiler warnings as errors), and re-installs whenever
# the requirements, the build files or csrc/ change.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FUSEDRES_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
export FUSEDRES_WERROR="${FUSEDRES_WERROR:-1}"
_t0=$SECONDS
if [ ! -x "$VENV/bin/python" ]; then
  echo "[fusedres]    0s creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.fusedres-deps"
want="$(cd "$ROOT" && cat requirements-dev.txt pyproject.toml setup.py _fusedres_build.py CMakeLists.txt \
        csrc/* 2>/dev/null | sha1sum | cut -c1-16)"
_step() {  # one progress line per set-up step, with the time since set-up started
  echo "[fusedres] $(printf '%4ss' $((SECONDS - _t0))) $*"
}
_pip() {  # quiet pip; on failure show its log and stop
  local log
  log="$(mktemp)"
  if ! "$VENV/bin/python" -m pip "$@" >"$log" 2>&1; then
    grep -v "is ignored: it is neither" "$log" | tail -n 60
    echo "[fusedres] pip $* failed" >&2
    rm -f "$log"
    return 1
  fi
  rm -f "$log"
}
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[fusedres] setting up $VENV (first run: minutes; each step below shows the seconds since the start)"
  _step "upgrading pip"
  _pip install -q --upgrade pip
  _step "installing requirements-dev.txt (torch, torchvision, triton, timm, pytest, ...)"
  _pip install -q -r "$ROOT/requirements-dev.txt"
  _step "installing fusedres (editable; builds the CUDA extension when nvcc is found)"
  _pip install -q -e "$ROOT"
  _step "checking the install"
  "$VENV/bin/python" -c "import fusedres, torch, triton; import fusedres.cuda as c; print('[fusedres] ready:', \
'torch', torch.__version__, '| triton', triton.__version__, '| CUDA backend:', c.build_info())"
  echo "$want" > "$stamp"
  _step "set-up done"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
