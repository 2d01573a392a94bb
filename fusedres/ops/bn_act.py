"""`bn_act`: y = act(BN(x) [+ residual [* residual_weight]]) — BatchNorm, optional residual add (optionally
scaled per channel: a learned shortcut weight) and optional ReLU in one pass.

Registered ops (torch.ops.fusedres.*):
    bn_act_train(x, weight, bias, residual, eps, relu, residual_weight=None) -> (y, mean, var)
    bn_act_eval(x, weight, bias, residual, running_mean, running_var, eps, relu, residual_weight=None) -> y
    bn_act_backward(grad_y, x, weight, bias, residual, mean, var, eps, relu, training, grad_residual,
                    residual_weight=None) -> (grad_x, grad_weight, grad_bias, grad_residual, grad_residual_weight)
Forward saves x (its own dtype), mean and var, plus the residual when relu is on or it is weighted; the ReLU
mask is recomputed from them in backward, so the output itself is never saved. A residual weight w (C values)
runs as the backends' second-input path with (mean_b, scale_b, shift_b) = (0, w, 0), so its gradient
sum(g * residual) per channel comes out of the same backward reduction. The public entry point is
`bn_act(...)` below, which mirrors `F.batch_norm` and updates the running statistics.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fusedres import backends
from fusedres._layout import acc_dtype
from fusedres.ops._common import check_bn_call, check_flag
from fusedres.ops._transforms import refuse_forward_ad, transformed
from fusedres.reference import bn_act_reference
from fusedres.ops._common import (cast_param_grad, channel_count, check_batch_size, check_bn, check_channels,
                                  check_like, densify, fake_channels, fake_like, grad_coefficients, scale_shift,
                                  update_running_stats)


def _check(x, weight, bias, residual, mean=None, var=None, training=True, residual_weight=None):
    check_bn(x, "x", weight, bias, mean, var)
    if residual is not None:
        check_like(residual, x, "residual")
    if residual_weight is not None:
        if residual is None:
            raise ValueError("fusedres: residual_weight was given without a residual")
        check_channels(residual_weight, x, "residual_weight")
    if training:
        check_batch_size(x)


def residual_args(x, residual, residual_weight):
    """(residual, xb, mean_b, scale_b, shift_b) for the backend primitives: a weighted residual w * r is the
    second-input term (r - 0) * w + 0."""
    if residual_weight is None:
        return residual, None, None, None, None
    w = residual_weight.to(acc_dtype(x.dtype)).contiguous()
    zero = torch.zeros_like(w)
    return None, residual, zero, w, zero


@torch.library.custom_op("fusedres::bn_act_train", mutates_args=())
def bn_act_train(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
                 eps: float, relu: bool, residual_weight: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    refuse_forward_ad("bn_act_train")
    _check(x, weight, bias, residual, residual_weight=residual_weight)
    if x.numel() == 0:
        zeros = x.new_zeros((x.shape[1],), dtype=acc_dtype(x.dtype))
        return fake_like(x), zeros, zeros.clone()
    x, residual = densify(x, residual)
    backend = backends.select(x)
    mean, var = backend.batch_stats(x)
    _, scale, shift = scale_shift(mean, var, weight, bias, eps)
    y = backend.apply(x, mean, scale, shift, *residual_args(x, residual, residual_weight), relu)
    return y, mean, var


@bn_act_train.register_fake
def _(x, weight, bias, residual, eps, relu, residual_weight=None):
    _check(x, weight, bias, residual, residual_weight=residual_weight)
    return fake_like(x), fake_channels(x), fake_channels(x)


@torch.library.custom_op("fusedres::bn_act_eval", mutates_args=())
def bn_act_eval(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
                running_mean: Tensor, running_var: Tensor, eps: float, relu: bool,
                residual_weight: Optional[Tensor] = None) -> Tensor:
    refuse_forward_ad("bn_act_eval")
    _check(x, weight, bias, residual, running_mean, running_var, training=False, residual_weight=residual_weight)
    if x.numel() == 0:
        return fake_like(x)
    x, residual = densify(x, residual)
    acc = acc_dtype(x.dtype)
    mean = running_mean.to(acc)
    _, scale, shift = scale_shift(mean, running_var.to(acc), weight, bias, eps)
    return backends.select(x).apply(x, mean, scale, shift, *residual_args(x, residual, residual_weight), relu)


@bn_act_eval.register_fake
def _(x, weight, bias, residual, running_mean, running_var, eps, relu, residual_weight=None):
    _check(x, weight, bias, residual, running_mean, running_var, training=False, residual_weight=residual_weight)
    return fake_like(x)


@torch.library.custom_op("fusedres::bn_act_backward", mutates_args=())
def bn_act_backward(grad_y: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                    residual: Optional[Tensor], mean: Tensor, var: Tensor, eps: float, relu: bool,
                    training: bool, grad_residual: bool, residual_weight: Optional[Tensor] = None
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    refuse_forward_ad("bn_act_backward")
    check_like(grad_y, x, "grad_y")
    if x.numel() == 0:
        zero = fake_channels(x).zero_()
        return (fake_like(x), zero, zero.clone(), fake_like(x) if grad_residual else x.new_empty(0),
                zero.clone() if residual_weight is not None else zero.new_empty(0))
    x, grad_y, residual = densify(x, grad_y, residual)
    backend = backends.select(x)
    acc = acc_dtype(x.dtype)
    mean, var = mean.to(acc), var.to(acc)
    invstd, scale, shift = scale_shift(mean, var, weight, bias, eps)
    res_args = residual_args(x, residual, residual_weight)
    weighted = residual_weight is not None
    sum_g, sum_g_xc, sum_g_r, d_res = backend.backward_reduce(grad_y, x, mean, scale, shift, *res_args, relu,
                                                              grad_residual and not weighted)
    k_g, k_x, k_c, d_w, d_b = grad_coefficients(sum_g, sum_g_xc, invstd, scale, channel_count(x), training)
    # a weighted residual is the second input, whose gradient the kernels write anyway (the backends need
    # its coefficients even when it is not wanted)
    k_b = (res_args[3], res_args[2], res_args[2]) if weighted else (None, None, None)
    dx, d_res_w = backend.backward_apply(grad_y, x, mean, scale, shift, *res_args, relu, k_g, k_x, k_c, *k_b)
    if weighted:
        d_res = d_res_w if grad_residual else None  # residual_weight * g, from the second-input path
    if d_res is None:
        d_res = x.new_empty(0)
    return dx, d_w, d_b, d_res, sum_g_r if weighted else d_w.new_empty(0)


@bn_act_backward.register_fake
def _(grad_y, x, weight, bias, residual, mean, var, eps, relu, training, grad_residual, residual_weight=None):
    check_like(grad_y, x, "grad_y")
    return (fake_like(x), fake_channels(x), fake_channels(x), fake_like(x) if grad_residual else x.new_empty(0),
            fake_channels(x) if residual_weight is not None else fake_channels(x).new_empty(0))


def _save(ctx, x, weight, bias, residual, stat_a, stat_b, eps, relu, residual_weight, training):
    keep_residual = relu or residual_weight is not None
    ctx.save_for_backward(x, weight, bias, residual if keep_residual else None, stat_a, stat_b, residual_weight)
    ctx.eps, ctx.relu, ctx.training = eps, relu, training
    ctx.has_residual = residual is not None


def _save_train(ctx, inputs, output):
    x, weight, bias, residual, eps, relu, residual_weight = inputs
    _, mean, var = output
    ctx.mark_non_differentiable(mean, var)
    _save(ctx, x, weight, bias, residual, mean, var, eps, relu, residual_weight, True)


def _save_eval(ctx, inputs, output):
    x, weight, bias, residual, running_mean, running_var, eps, relu, residual_weight = inputs
    _save(ctx, x, weight, bias, residual, running_mean, running_var, eps, relu, residual_weight, False)


def _backward(ctx, grad_y, residual_index):
    """Gradients of (x, weight, bias, residual) and of residual_weight."""
    x, weight, bias, residual, mean, var, residual_weight = ctx.saved_tensors
    want_res = ctx.has_residual and ctx.needs_input_grad[residual_index]
    dx, dw, db, dr, drw = torch.ops.fusedres.bn_act_backward(grad_y, x, weight, bias, residual, mean, var,
                                                             ctx.eps, ctx.relu, ctx.training, want_res,
                                                             residual_weight)
    return ((dx, cast_param_grad(dw, weight), cast_param_grad(db, bias), dr if want_res else None),
            cast_param_grad(drw, residual_weight))


def _backward_train(ctx, grad_y, _grad_mean, _grad_var):
    grads, d_rw = _backward(ctx, grad_y, 3)
    return grads + (None, None, d_rw)


def _backward_eval(ctx, grad_y):
    grads, d_rw = _backward(ctx, grad_y, 3)
    return grads + (None, None, None, None, d_rw)


bn_act_train.register_autograd(_backward_train, setup_context=_save_train)
bn_act_eval.register_autograd(_backward_eval, setup_context=_save_eval)


def bn_act(input: Optional[Tensor] = None, running_mean: Optional[Tensor] = None,
           running_var: Optional[Tensor] = None, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
           training: bool = False, momentum: float = 0.1, eps: float = 1e-5, residual: Optional[Tensor] = None,
           relu: bool = False, residual_weight: Optional[Tensor] = None, *, x: Optional[Tensor] = None) -> Tensor:
    """act(F.batch_norm(input, ...) [+ residual [* residual_weight]]) as one fused op; same arguments and
    running-stat update as `F.batch_norm` (`x=` is accepted for `input`), plus `residual` (same shape, dtype,
    device as input), `relu`, and `residual_weight`: C per-channel factors on the residual (a learned shortcut
    weight; differentiable). An empty batch gives an empty output and leaves the running statistics alone, as
    stock. Under torch.func transforms or forward-mode AD it runs stock's own ops (`fusedres.ops._transforms`)."""
    x = input_arg(input, x)
    check_bn_call(x, running_mean, running_var, weight, bias, training, momentum, eps)
    check_flag(relu, "relu")
    if transformed(x, running_mean, running_var, weight, bias, residual, residual_weight):
        _check(x, weight, bias, residual, running_mean, running_var, training, residual_weight)
        return bn_act_reference(x, running_mean, running_var, weight, bias, training, momentum, eps, residual,
                                relu, residual_weight)
    if training:
        y, mean, var = torch.ops.fusedres.bn_act_train(x, weight, bias, residual, eps, relu, residual_weight)
        if running_mean is not None:
            update_running_stats(running_mean, running_var, mean, var, channel_count(x), momentum)
        return y
    if running_mean is None or running_var is None:
        raise ValueError("fusedres: bn_act with training=False needs running_mean and running_var")
    return torch.ops.fusedres.bn_act_eval(x, weight, bias, residual, running_mean, running_var, eps, relu,
                                          residual_weight)


def input_arg(input, x):
    """F.batch_norm's first argument, given as `input` or (fusedres's older name) `x=`, not both."""
    if x is not None:
        if input is not None:
            raise TypeError("fusedres: got both input and x (x is another name for input); pass one")
        return x
    return input
