#!/usr/bin/env bash
# The test command: set-up (venv, pinned deps, editable install) then pytest. Extra args go to pytest.
# Without a GPU the Triton kernels run under TRITON_INTERPRET=1 on CPU tensors (tests/conftest.py sets it).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec python -m pytest tests "$@"
