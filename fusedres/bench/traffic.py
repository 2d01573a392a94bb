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


# ------------------------------------------------------------------------------------------------ declared
# Each launcher declares next to its kernels what one launch reads and writes (fusedres/triton/*.py: TRAFFIC,
# keyed by kernel name, called with the launch's arguments by parameter name; fusedres/cuda.py: KERNELS, keyed by
# `fusedres._C` entry, one (kernel, reads, writes) per kernel it launches). An entry of reads / writes is a
# tensor (all of it) or (tensor, bytes) for a kernel that touches only part of it (a strided 1x1 conv's input).
# Every tensor counts once per launch and direction however often the kernel touches it: the DRAM traffic of a
# launch whose re-reads hit in cache. tests/test_count.py checks the declarations against the addresses the
# Triton interpreter really loads and stores.
CATEGORIES = ("convolution", "bn_add_relu", "glue", "other")
CATEGORY_LABELS = {"convolution": "convolution", "bn_add_relu": "BN/add/ReLU", "glue": "per-channel glue",
                   "other": "other"}


def storage_key(t) -> tuple:
    """What identifies the memory a tensor covers (fake tensors included): storage, offset, extent."""
    return (t.untyped_storage()._cdata, t.storage_offset(), unique_elements(t), t.element_size())


def unique_elements(t) -> int:
    """Distinct elements of t (an expanded tensor's broadcast dimensions count once)."""
    return math.prod(s for s, st in zip(t.shape, t.stride()) if st != 0) if t.dim() else 1


def tensor_nbytes(t) -> int:
    return unique_elements(t) * t.element_size()


def declared_bytes(entries) -> int:
    """Bytes of a declared reads (or writes) list, each distinct tensor once."""
    seen, total = set(), 0
    for e in entries:
        t, nbytes = e if isinstance(e, tuple) else (e, None)
        if t is None:
            continue
        key = storage_key(t)
        if key in seen:
            continue
        seen.add(key)
        total += tensor_nbytes(t) if nbytes is None else nbytes
    return total


def op_bytes(inputs, outputs) -> int:
    """An aten op's traffic: its distinct input tensors read once, its outputs written once."""
    return declared_bytes(inputs) + declared_bytes(outputs)


def category(name: str, tensors, flops: int, inside_fused: bool) -> str:
    """convolution, bn_add_relu (BatchNorm, residual add, ReLU and their backward on activations), glue
    (per-channel vector math: no tensor with more than one dimension, or two inside a fused op) or other
    (stem pooling, fc, loss, layout and dtype copies)."""
    if flops and name not in MATMUL_OPS:
        return "convolution"
    dims = max((t.dim() for t in tensors), default=0)
    if dims <= 1 or (inside_fused and dims <= 2):
        return "glue"
    if dims >= 4 and (name in BN_OPS or inside_fused and name not in COPY_OPS):
        return "bn_add_relu"
    return "other"


# aten ops that must read some inputs twice: a training BatchNorm needs its statistics over the whole tensor
# before it can normalise (CUDA: a statistics kernel, then an elementwise one; backward: a reduction, then an
# elementwise pass), like the fused kernels above. {op: (index of its `training` argument, inputs read twice)}.
# Each is still one launch in the count (the one-launch-per-aten-op rule), so stock's launches are a floor.
TWO_PASS_OPS = {
    "native_batch_norm": (5, (0,)),
    "_native_batch_norm_legit": (5, (0,)),
    "cudnn_batch_norm": (5, (0,)),
    "native_batch_norm_backward": (7, (0, 1)),
}


def reread_bytes(name: str, args) -> int:
    """Bytes an aten op reads a second time (TWO_PASS_OPS), 0 for every other op."""
    if name not in TWO_PASS_OPS:
        return 0
    flag, again = TWO_PASS_OPS[name]
    if len(args) <= flag or not args[flag]:
        return 0
    return declared_bytes([args[i] for i in again if i < len(args) and args[i] is not None])


MATMUL_OPS = frozenset({"mm", "addmm", "bmm", "baddbmm", "matmul", "linear"})
BN_OPS = frozenset({
    "native_batch_norm", "native_batch_norm_backward", "_native_batch_norm_legit",
    "_native_batch_norm_legit_no_training", "_native_batch_norm_legit_functional", "cudnn_batch_norm",
    "cudnn_batch_norm_backward", "miopen_batch_norm", "batch_norm_stats", "batch_norm_elemt",
    "batch_norm_backward_reduce", "batch_norm_backward_elemt", "batch_norm_gather_stats_with_counts",
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "relu", "relu_", "threshold_backward", "where",
    "le", "lt", "ge", "gt", "neg", "sum", "zeros_like", "clamp_min", "clamp_min_"})
COPY_OPS = frozenset({"_to_copy", "to", "copy_", "_foreach_copy_", "clone", "contiguous"})
