# Sourced by the other scripts: creates .venv (once), installs the pinned dev stack and fusedres (editable,
# building the CUDA extension when nvcc is found, with compiler warnings as errors), and re-installs whenever
# the requirements, the build files or csrc/ change.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FUSEDRES_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
export FUSEDRES_WERROR="${FUSEDRES_WERROR:-1}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[fusedres] creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.fusedres-deps"
want="$(cd "$ROOT" && cat requirements-dev.txt pyproject.toml setup.py _fusedres_build.py CMakeLists.txt \
        csrc/* 2>/dev/null | sha1sum | cut -c1-16)"
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
  echo "[fusedres] installing pinned dev requirements and fusedres (first run: a few minutes)"
  _pip install -q --upgrade pip
  _pip install -q -r "$ROOT/requirements-dev.txt"
  _pip install -q -e "$ROOT"
  "$VENV/bin/python" -c "import fusedres, torch, triton; import fusedres.cuda as c; print('[fusedres] ready:', \
'torch', torch.__version__, '| triton', triton.__version__, '| CUDA backend:', c.build_info())"
  echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
