"""`batch_stats`: the per-channel batch mean and biased variance of x [N, C, H, W] as a differentiable op — the
backends' fused statistics primitive (one read of x: the CUDA / Triton statistics kernels, `torch.var_mean` in
the reference), with autograd.

Registered op (torch.ops.fusedres.*):
    batch_stats(x) -> (mean, var)        both [C] in the accumulation dtype (float32; float64 for float64)
Backward: d mean / dx = 1 / count, d var / dx = 2 (x - mean) / count, in plain torch (count = N * H * W); only x
and mean are saved. Used by the conv-mode pre-activation units (`fusedres.nn.preact_conv`) for the statistics of
a unit's input, whose BN + ReLU then runs in the next conv's prologue.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fusedres import backends
from fusedres._layout import acc_dtype
from fusedres.ops._common import channel_count, check_activation, densify, fake_channels
from fusedres.ops._transforms import refuse_forward_ad, transformed

_DIMS = (0, 2, 3)


@torch.library.custom_op("fusedres::batch_stats", mutates_args=())
def batch_stats_op(x: Tensor) -> tuple[Tensor, Tensor]:
    refuse_forward_ad("batch_stats")
    check_activation(x, "x")
    if x.numel() == 0:
        return _reference_stats(x)
    (x,) = densify(x)
    mean, var = backends.select(x).batch_stats(x)
    acc = acc_dtype(x.dtype)
    return mean.to(acc), var.to(acc)


@batch_stats_op.register_fake
def _(x):
    check_activation(x, "x")
    return fake_channels(x), fake_channels(x)


def _save(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], output[0])


def _backward(ctx, gmean, gvar):
    x, mean = ctx.saved_tensors
    acc = acc_dtype(x.dtype)
    xc = x.to(acc) - mean.to(acc).view(1, -1, 1, 1)
    d = 2 * gvar.to(acc).view(1, -1, 1, 1) * xc if gvar is not None else torch.zeros_like(xc)
    if gmean is not None:
        d = d + gmean.to(acc).view(1, -1, 1, 1)
    return (d / channel_count(x)).to(x.dtype)


batch_stats_op.register_autograd(_backward, setup_context=_save)


def _reference_stats(x):
    x = x.to(acc_dtype(x.dtype))
    if x.numel() == 0:  # no values: zeros (finite, so an empty batch's BatchNorm has zero gradients)
        return x.new_zeros(x.shape[1]), x.new_zeros(x.shape[1])
    var, mean = torch.var_mean(x, dim=_DIMS, unbiased=False)
    return mean, var


def batch_stats(x: Tensor):
    """(mean, biased var) of x over (N, H, W), differentiable (module docstring); an empty batch gives zeros
    (finite, unlike torch.var_mean's NaN, so a BatchNorm over it has zero parameter gradients, as stock).
    Under torch.func transforms or forward-mode AD it is torch.var_mean itself."""
    check_activation(x, "x")
    if transformed(x):
        return _reference_stats(x)
    return torch.ops.fusedres.batch_stats(x)
