"""Layout and allocation helpers shared by every backend launcher.

Kernels see a 4-D activation as dense NCHW or dense NHWC (channels_last); anything else is copied to one of
the two first. `poison_outputs()` makes every launcher fill the outputs it allocates with NaN, so a test sees
any element a kernel forgot to write.
"""
from __future__ import annotations

import contextlib
import os

import torch

_POISON = [os.environ.get("FUSEDRES_POISON", "0") == "1"]


@contextlib.contextmanager
def poison_outputs(enabled: bool = True):
    """Fill every output buffer a launcher allocates with NaN (integer buffers: -1) while active."""
    old = _POISON[0]
    _POISON[0] = enabled
    try:
        yield
    finally:
        _POISON[0] = old


def empty(shape, *, dtype, device, memory_format=torch.contiguous_format) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
    if _POISON[0]:
        t.fill_(float("nan") if t.is_floating_point() else -1)
    return t


def empty_like(x: torch.Tensor, dtype=None) -> torch.Tensor:
    return empty(x.shape, dtype=dtype or x.dtype, device=x.device, memory_format=memory_format_of(x))


def is_channels_last(x: torch.Tensor) -> bool:
    """True when x is dense NHWC and not also dense NCHW (the two coincide when C == 1 or H*W == 1)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """The dense layout kernels will use for x: its own when dense, else the one its strides suggest."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.channels_last if x.dim() == 4 and x.stride(1) == 1 else torch.contiguous_format


def dense(x: torch.Tensor | None, memory_format: torch.memory_format) -> torch.Tensor | None:
    """x as a dense tensor in `memory_format` (no copy when it already is)."""
    if x is None or x.is_contiguous(memory_format=memory_format):
        return x
    return x.contiguous(memory_format=memory_format)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics and accumulation dtype: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32
