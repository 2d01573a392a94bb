"""pytest-benchmark suite for the fused kernels and blocks: `pytest benchmarks/ --benchmark-only` on a CUDA GPU.

Every benchmark is skipped without CUDA: CPU timings (Triton interpreter) say nothing about the kernels.
Shape and dtype: FUSEDRES_BENCH_BATCH (default 128), FUSEDRES_BENCH_DTYPE (bf16, fp16 or fp32; default bf16),
channels_last. For the full comparison with tables, JSON and plots use `python -m fusedres.bench`.
"""
import os

import pytest
import torch

BATCH = int(os.environ.get("FUSEDRES_BENCH_BATCH", "128"))
DTYPE = os.environ.get("FUSEDRES_BENCH_DTYPE", "bf16")
NO_GPU = "needs a CUDA GPU: these benchmarks time GPU kernels (no CUDA device here; scripts/bench.sh runs the " \
         "CPU correctness demo instead)"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=NO_GPU)
    for item in items:
        item.add_marker(skip)


@pytest.fixture
def bench_batch():
    return BATCH


@pytest.fixture
def bench_dtype():
    return DTYPE


@pytest.fixture
def cuda_sync_benchmark(benchmark):
    """benchmark(fn) where each round is `fn` followed by a device synchronize, after a warm-up."""
    def run(fn, rounds=50, warmup=5):
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()

        def timed():
            fn()
            torch.cuda.synchronize()
        return benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)
    return run
