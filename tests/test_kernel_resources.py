"""The resource budgets of docs/kernels.md, enforced: every Triton kernel variant (compiled as it launches:
real alignment / divisibility specialisation, each conv config's num_warps and num_stages) and every CUDA
kernel (nvcc + ptxas -v), for sm_90 and sm_80, has no spill, shared memory within the per-block limit and
occupancy at or above its family's floor (`scripts/kernel_resources.py`)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import kernel_resources as kr  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="the offline compile runs in CPU CI (a GPU's time is for "
                                                      "the GPU tests)")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_every_kernel_within_budget(backend):
    if backend == "cuda" and not shutil.which("nvcc"):
        pytest.skip("no CUDA toolkit (nvcc): the CUDA extension is not built here either")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "kernel_resources.py"), "--check", "--only",
                           backend], env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "kernel variants compiled" in done.stdout


def test_budget_rules():
    """The occupancy model and the budget checks on hand-made rows (CUDA occupancy-calculator rules)."""
    row = lambda **k: kr.Row(**{**dict(backend="triton", family="conv", kernel="k", variant="v", config="c",  # noqa: E731
                                       arch=90, warps=8, regs=190, spill_stores=0, spill_loads=0, stack=0,
                                       smem=115712), **k})
    assert row().ctas == 1 and row().occupancy == 0.125 and row().problems() == []
    assert row(regs=128).ctas == 2                               # 8 warps x 32 x 128 = 32 K registers
    assert row(warps=4, regs=126, smem=75264).ctas == 3          # shared memory: 3 x (73.5 + 1) KB <= 228 KB
    assert row(arch=80, warps=4, regs=126, smem=75264).ctas == 2  # 164 KB on sm_80
    assert "spills" in row(spill_stores=8).problems()[0]
    assert "shared memory" in row(arch=80, smem=170000).problems()[0]
    assert "occupancy" in row(warps=4, regs=255, smem=150000).problems()[0]   # one 4-warp CTA: 6.25 %
    assert "occupancy" in row(family="elementwise", warps=4, regs=128).problems()[0]  # 4 CTAs x 4 warps = 25 %
    log = ("ptxas info    : Compiling entry function 'k1' for 'sm_90a'\nptxas info    : Function properties for k1\n"
           "    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 1024 bytes smem, 400 bytes cmem[0]\n")
    assert kr.parse_ptxas(log) == {"k1": dict(regs=255, stack=16, spill_stores=8, spill_loads=12, smem=1024)}
