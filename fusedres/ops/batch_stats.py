"""`batch_stats`: the per-channel batch mean and biased variance of x [N, C, H, W] as a differentiable op — the
backends' fused statistics primitive (one read of x: the CUDA / Triton statistics kernels, `torch.var_mean` in
the reference), with autograd.

Registered ops (torch.ops.fusedres.*):
    batch_stats(x) -> (mean, var)        both [C] in the accumulation dtype (float32; float64 for float64)
    bn_stats(x, weight, bias, running_mean!, running_var!, num_batches_tracked, momentum, eps)
        -> (mean, var, scale, shift)     BatchNorm's batch statistics and its per-channel (scale, shift), the
                                         running statistics updated in place: the statistics pass and ONE
                                         finalize launch, no per-channel torch ops (the first two of a fused
                                         BatchNorm's three forward launches; bn_act / dual_bn_act run the third)
Backward: d mean / dx = 1 / count, d var / dx = 2 (x - mean) / count, in plain torch (count = N * H * W); only x
and mean are saved. Used by the conv-mode pre-activation units (`fusedres.nn.preact_conv`) for the statistics of
a unit's input, whose BN + ReLU then runs in the next conv's prologue.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fusedres import backends, reference
from fusedres._layout import acc_dtype
from fusedres.ops._common import channel_count, check_activation, check_bn, check_channels, densify, fake_channels
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


@torch.library.custom_op("fusedres::bn_stats",
                         mutates_args=("running_mean", "running_var", "num_batches_tracked"))
def bn_stats_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
                running_var: Optional[Tensor], num_batches_tracked: Optional[Tensor], momentum: Optional[float],
                eps: float, increment: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    refuse_forward_ad("bn_stats")
    _check_stats(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, increment)
    if x.numel() == 0:  # an empty batch: zeros, running statistics untouched, the batch counted (as stock)
        if increment:
            num_batches_tracked.add_(1)
        return tuple(fake_channels(x).zero_() for _ in range(4))
    (x,) = densify(x)
    return backends.select(x).bn_stats(x, weight, bias, eps, running_mean, running_var, momentum,
                                       None if increment else num_batches_tracked,
                                       increment=num_batches_tracked if increment else None)


def _check_stats(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, increment):
    check_bn(x, "x", weight, bias, running_mean, running_var)
    if increment and (num_batches_tracked is None or momentum is None):
        raise ValueError("fusedres: bn_stats increment=True needs num_batches_tracked and a numeric momentum (the "
                         "kernel that increments it does not also read it)")


@bn_stats_op.register_fake
def _(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, increment=False):
    _check_stats(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, increment)
    return tuple(fake_channels(x) for _ in range(4))


@torch.library.custom_op("fusedres::bn_finalize",
                         mutates_args=("running_mean", "running_var", "num_batches_tracked"))
def bn_finalize(x: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                running_mean: Optional[Tensor], running_var: Optional[Tensor], num_batches_tracked: Optional[Tensor],
                momentum: float, centred: bool) -> tuple[Tensor, Tensor]:
    _check_finalize(x, mean, var, weight, bias, running_mean, running_var, num_batches_tracked)
    backend = backends.select(x) if x.numel() else reference
    acc = acc_dtype(x.dtype)
    return backend.bn_finalize(x, mean.to(acc).contiguous(), var.to(acc).contiguous(), weight, bias, eps,
                               running_mean, running_var, float(momentum), num_batches_tracked, centred)


def _check_finalize(x, mean, var, weight, bias, running_mean, running_var, num_batches_tracked):
    check_bn(x, "x", weight, bias, running_mean, running_var)
    check_channels(mean, x, "mean")
    check_channels(var, x, "var")
    if (running_mean is None) != (running_var is None):
        raise ValueError("fusedres: bn_finalize needs both running_mean and running_var, or neither")
    if num_batches_tracked is not None and (num_batches_tracked.numel() != 1
                                            or num_batches_tracked.dtype != torch.int64
                                            or num_batches_tracked.device != x.device):
        raise ValueError(f"fusedres: num_batches_tracked must be a one-element int64 tensor on {x.device}")


@bn_finalize.register_fake
def _(x, mean, var, weight, bias, eps, running_mean, running_var, num_batches_tracked, momentum, centred):
    _check_finalize(x, mean, var, weight, bias, running_mean, running_var, num_batches_tracked)
    return fake_channels(x), fake_channels(x)


@torch.library.custom_op("fusedres::bn_params", mutates_args=())
def bn_params_op(x: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                 eps: float) -> tuple[Tensor, Tensor]:
    check_bn(x, "x", weight, bias, mean, var)
    (x,) = densify(x) if x.numel() else (x,)
    acc = acc_dtype(x.dtype)
    return backends.select(x).bn_params(x, mean.to(acc).contiguous(), var.to(acc).contiguous(), weight, bias, eps)


@bn_params_op.register_fake
def _(x, mean, var, weight, bias, eps):
    check_bn(x, "x", weight, bias, mean, var)
    return fake_channels(x), fake_channels(x)


def bn_stats(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
             running_var: Optional[Tensor], momentum: Optional[float], eps: float,
             num_batches_tracked: Optional[Tensor] = None, increment: bool = False):
    """(mean, biased var, scale, shift) of a training-mode BatchNorm of x with BN(x) = (x - mean) * scale +
    shift, updating the running statistics (when given) as nn.BatchNorm2d does; momentum None is the cumulative
    average, factor 1 / num_batches_tracked (already incremented), read on the device. `increment`: instead,
    add one to num_batches_tracked in the finalize launch (nn.BatchNorm2d.forward's own bookkeeping; momentum
    must be a number). Not differentiable: the fused ops' backward formulas cover the statistics."""
    if running_mean is not None and momentum is None and num_batches_tracked is None:
        raise ValueError("fusedres: momentum=None (cumulative moving average) needs num_batches_tracked")
    with torch.no_grad():
        return torch.ops.fusedres.bn_stats(x, weight, bias, running_mean, running_var,
                                           num_batches_tracked if momentum is None or increment else None,
                                           None if momentum is None else float(momentum), eps,
                                           bool(increment and num_batches_tracked is not None))


def batch_stats(x: Tensor):
    """(mean, biased var) of x over (N, H, W), differentiable (module docstring); an empty batch gives zeros
    (finite, unlike torch.var_mean's NaN, so a BatchNorm over it has zero parameter gradients, as stock).
    Under torch.func transforms or forward-mode AD it is torch.var_mean itself."""
    check_activation(x, "x")
    if transformed(x):
        return _reference_stats(x)
    return torch.ops.fusedres.batch_stats(x)
