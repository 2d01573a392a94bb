"""Test set-up: Triton runs in its interpreter on CPU tensors when no GPU is present, and every output a
launcher allocates is filled with NaN first, so an element a kernel fails to write fails the test."""
import atexit
import os
import shutil
import tempfile

# A private Inductor cache per test run: its FX-graph cache key misses a custom op's schema change, so compiled
# code cached by another checkout (an older fusedres op signature) would otherwise be replayed here.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="fusedres-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first `import triton`

import fusedres  # noqa: E402

DEVICES = ["cuda"] if torch.cuda.is_available() else ["cpu"]


@pytest.fixture(autouse=True)
def _poison_and_seed():
    torch.manual_seed(0)
    with fusedres.poison_outputs():
        yield


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param

from helpers import on_test_device, small_tiles  # noqa: E402,F401  (fixtures shared by the op tests)
