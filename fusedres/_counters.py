"""Zeroed int32 counters for the last-block finalize of the reduction kernels (Triton and CUDA backends).

A reduction whose last program (block) per channel tile finalizes takes a ticket from a counter and the winner
puts it back to 0, so one zero-filled buffer per (device, stream) serves every launch in stream order: kernels
sharing a buffer never run concurrently. Allocated once per stream, outside any dispatch mode (not part of a
step), grown when a launch needs more counters. A launch captured in a CUDA graph replays with the buffer it
was captured with, which stays zero between replays by the same rule.
"""
from __future__ import annotations

import torch

_BUFFERS: dict = {}


def counters(like: torch.Tensor, n: int) -> torch.Tensor:
    """At least n zeroed counters on like's device for the current stream (a fresh uninitialised stand-in for
    a fake tensor: the count level launches nothing)."""
    from torch._subclasses.fake_tensor import is_fake

    device = like.device
    if is_fake(like):
        return torch.empty(n, dtype=torch.int32, device=device)
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device.type, device.index, stream)
    buf = _BUFFERS.get(key)
    if buf is None or buf.numel() < n:
        from torch.utils._python_dispatch import _disable_current_modes

        size = max(n, 2 * (0 if buf is None else buf.numel()), 1024)
        with _disable_current_modes():
            buf = _BUFFERS[key] = torch.zeros(size, dtype=torch.int32, device=device)
    return buf
