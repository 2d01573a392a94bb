"""Measuring a group of candidates fairly: warm-up excluded, candidates interleaved, medians over repeats.

A group is the set of impls that solve the same problem (one kernel shape, one block, one model and mode).
Each candidate is given as a *builder* returning the callable to time, so a failure while building, compiling,
warming up or measuring becomes that candidate's error and the others go on.
"""
from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from fusedres.bench.common import describe_error


@dataclass
class Measurement:
    impl: str
    samples_ms: list[float] = field(default_factory=list)
    iters: int = 0
    peak_mem_bytes: int | None = None
    error: str | None = None

    @property
    def ms(self) -> float | None:
        return statistics.median(self.samples_ms) if self.samples_ms and self.error is None else None


class CudaTimer:
    """CUDA-event timing on the current stream.

    With `flush_l2`, every call is timed on its own after a 256 MiB buffer is overwritten (as
    triton.testing.do_bench does), so memory-bound kernels read from DRAM rather than a warm L2.
    """

    def __init__(self, flush_l2: bool = False, device=None):
        self.device = torch.device(device or "cuda")
        self._flush = torch.empty(256 * 2 ** 20, dtype=torch.int8, device=self.device) if flush_l2 else None

    def sync(self) -> None:
        torch.cuda.synchronize(self.device)

    def time(self, fn: Callable, iters: int) -> float:
        """Milliseconds per call of fn, over `iters` calls."""
        if self._flush is None:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / iters
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(iters)]
        for start, end in events:
            self._flush.zero_()
            start.record()
            fn()
            end.record()
        self.sync()
        return sum(s.elapsed_time(e) for s, e in events) / iters

    def peak_memory(self, fn: Callable) -> int:
        """Bytes one call allocates at its peak above what was allocated before it began."""
        self.sync()
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        fn()
        self.sync()
        return torch.cuda.max_memory_allocated(self.device) - base

    def recover(self) -> None:
        gc.collect()
        try:
            self.sync()
        except Exception:  # a sticky CUDA error has nothing more to free
            pass
        torch.cuda.empty_cache()


class WallTimer:
    """perf_counter timing, for exercising the harness on CPU in tests; never used for published numbers."""

    def sync(self) -> None:
        pass

    def time(self, fn: Callable, iters: int) -> float:
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - start) * 1e3 / iters

    def peak_memory(self, fn: Callable) -> None:
        fn()
        return None

    def recover(self) -> None:
        gc.collect()


def rotation(order: list, r: int) -> list:
    """Round r of the interleaving: the candidate list rotated by r, so no impl always runs first."""
    if not order:
        return []
    k = r % len(order)
    return order[k:] + order[:k]


def measure(builders: dict[str, Callable[[], Callable]], timer, *, repeats: int = 10, warmup: int = 3,
            target_ms: float = 25.0, max_iters: int = 200, memory: bool = False) -> dict[str, Measurement]:
    """Build, warm up, calibrate and then time every candidate, interleaved, `repeats` times.

    Each sample is the mean over `iters` back-to-back calls, `iters` chosen once per candidate so a sample
    lasts about `target_ms`; the reported value is the median of the samples.
    """
    results = {impl: Measurement(impl) for impl in builders}
    fns: dict[str, Callable] = {}
    for impl, build in builders.items():
        m = results[impl]
        try:
            fn = build()
            for _ in range(max(warmup, 1)):
                fn()
            timer.sync()
            once = timer.time(fn, 1)
            m.iters = int(min(max(math.ceil(target_ms / max(once, 1e-3)), 1), max_iters))
            if memory:
                m.peak_mem_bytes = timer.peak_memory(fn)
            fns[impl] = fn
        except Exception as exc:  # one failing candidate must not end the run
            m.error = describe_error(exc)
            fn = None
            timer.recover()
    live = list(fns)
    for r in range(repeats):
        for impl in rotation(live, r):
            if impl not in fns:
                continue
            m = results[impl]
            try:
                m.samples_ms.append(timer.time(fns[impl], m.iters))
            except Exception as exc:
                m.error = describe_error(exc)
                del fns[impl]
                timer.recover()
    fns.clear()
    return results
