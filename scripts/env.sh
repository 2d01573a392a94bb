# Sourced by the other scripts: creates .venv (once), installs the pinned dev stack and fusedres (editable).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FUSEDRES_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[fusedres] creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.fusedres-deps"
want="$(cat "$ROOT/requirements-dev.txt" "$ROOT/pyproject.toml" "$ROOT/setup.py" | sha1sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[fusedres] installing pinned dev requirements and fusedres (first run takes a few minutes)"
  "$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
  "$VENV/bin/python" -m pip install -q -r "$ROOT/requirements-dev.txt" 2>&1 | grep -v "is ignored" || true
  "$VENV/bin/python" -m pip install -q -e "$ROOT" 2>&1 | grep -v "is ignored" || true
  "$VENV/bin/python" -c "import fusedres, torch, triton" 
  echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
