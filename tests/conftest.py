"""Test set-up: Triton runs in its interpreter on CPU tensors when no GPU is present, and every output a
launcher allocates is filled with NaN first, so an element a kernel fails to write fails the test."""
import os

import pytest
import torch

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
