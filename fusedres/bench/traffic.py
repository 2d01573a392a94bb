"""Bytes each fused kernel must move through DRAM, the numerator of every GB/s the harness reports.

Counted in activation-sized tensors of E = N*C*H*W*element_size bytes; per-channel vectors (weights,
statistics: < 0.1 % of the traffic at ResNet shapes) are left out. A training-mode BatchNorm needs its
statistics over the whole tensor before it can normalise, and ResNet activations are larger than L2, so a
training forward or backward reads its inputs twice (a reduction pass, then an elementwise pass):

    op            mode   reads                                     writes       total
    bn_act        fwd    x twice, residual                         y            (3 + res) E
    bn_act        infer  x, residual                               y            (2 + res) E
    bn_act        bwd    (dy, x, residual if relu) twice           dx, dres     (2 (2 + res*relu) + 1 + res) E
    dual_bn_act   fwd    x twice, r twice                          y            5 E
    dual_bn_act   infer  x, r                                      y            3 E
    dual_bn_act   bwd    (dy, x, r) twice                          dx, dr       8 E
    copy                 src                                       dst          2 E

The same byte count divides every impl's time for one problem (PyTorch's unfused sequence included), so its
GB/s is an *effective* bandwidth and ratios of GB/s equal ratios of time.
"""
from __future__ import annotations

import math

MODES = ("fwd", "bwd", "infer")


def tensor_bytes(shape, element_size: int) -> int:
    return math.prod(shape) * element_size


def bn_act_bytes(shape, element_size: int, mode: str, residual: bool, relu: bool) -> int:
    e = tensor_bytes(shape, element_size)
    res = int(bool(residual))
    if mode == "fwd":
        return (3 + res) * e
    if mode == "infer":
        return (2 + res) * e
    if mode == "bwd":
        return (2 * (2 + res * int(bool(relu))) + 1 + res) * e
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")


def dual_bn_act_bytes(shape, element_size: int, mode: str) -> int:
    e = tensor_bytes(shape, element_size)
    per_mode = {"fwd": 5, "infer": 3, "bwd": 8}
    if mode not in per_mode:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    return per_mode[mode] * e


def copy_bytes(shape, element_size: int) -> int:
    return 2 * tensor_bytes(shape, element_size)


def gbps(nbytes: int | None, ms: float | None) -> float | None:
    """Bytes per millisecond as GB/s (1 GB = 1e9 bytes)."""
    if nbytes is None or ms is None or ms <= 0:
        return None
    return nbytes / (ms * 1e6)
