"""`bn_act`: y = act(BN(x) [+ residual]) — BatchNorm, optional residual add and optional ReLU in one pass.

Registered ops (torch.ops.fusedres.*):
    bn_act_train(x, weight, bias, residual, eps, relu) -> (y, mean, var)        batch statistics
    bn_act_eval(x, weight, bias, residual, running_mean, running_var, eps, relu) -> y
    bn_act_backward(grad_y, x, weight, bias, residual, mean, var, eps, relu, training, grad_residual)
        -> (grad_x, grad_weight, grad_bias, grad_residual)
Forward saves x (its own dtype), mean and var, plus the residual when relu is on; the ReLU mask is recomputed
from them in backward, so the output itself is never saved. The public entry point is `bn_act(...)` below,
which mirrors `F.batch_norm` and updates the running statistics.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fusedres import backends
from fusedres._layout import acc_dtype
from fusedres.ops._common import (cast_param_grad, channel_count, check_batch_size, check_bn, check_like,
                                  densify, fake_channels, fake_like, grad_coefficients, scale_shift,
                                  update_running_stats)


def _check(x, weight, bias, residual, mean=None, var=None, training=True):
    check_bn(x, "x", weight, bias, mean, var)
    if residual is not None:
        check_like(residual, x, "residual")
    if training:
        check_batch_size(x)


@torch.library.custom_op("fusedres::bn_act_train", mutates_args=())
def bn_act_train(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
                 eps: float, relu: bool) -> tuple[Tensor, Tensor, Tensor]:
    _check(x, weight, bias, residual)
    x, residual = densify(x, residual)
    backend = backends.select(x)
    mean, var = backend.batch_stats(x)
    _, scale, shift = scale_shift(mean, var, weight, bias, eps)
    y = backend.apply(x, mean, scale, shift, residual, None, None, None, None, relu)
    return y, mean, var


@bn_act_train.register_fake
def _(x, weight, bias, residual, eps, relu):
    _check(x, weight, bias, residual)
    return fake_like(x), fake_channels(x), fake_channels(x)


@torch.library.custom_op("fusedres::bn_act_eval", mutates_args=())
def bn_act_eval(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
                running_mean: Tensor, running_var: Tensor, eps: float, relu: bool) -> Tensor:
    _check(x, weight, bias, residual, running_mean, running_var, training=False)
    x, residual = densify(x, residual)
    acc = acc_dtype(x.dtype)
    mean = running_mean.to(acc)
    _, scale, shift = scale_shift(mean, running_var.to(acc), weight, bias, eps)
    return backends.select(x).apply(x, mean, scale, shift, residual, None, None, None, None, relu)


@bn_act_eval.register_fake
def _(x, weight, bias, residual, running_mean, running_var, eps, relu):
    _check(x, weight, bias, residual, running_mean, running_var, training=False)
    return fake_like(x)


@torch.library.custom_op("fusedres::bn_act_backward", mutates_args=())
def bn_act_backward(grad_y: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                    residual: Optional[Tensor], mean: Tensor, var: Tensor, eps: float, relu: bool,
                    training: bool, grad_residual: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    check_like(grad_y, x, "grad_y")
    x, grad_y, residual = densify(x, grad_y, residual)
    backend = backends.select(x)
    acc = acc_dtype(x.dtype)
    mean, var = mean.to(acc), var.to(acc)
    invstd, scale, shift = scale_shift(mean, var, weight, bias, eps)
    sum_g, sum_g_xc, _, d_res = backend.backward_reduce(grad_y, x, mean, scale, shift, residual, None, None,
                                                        None, None, relu, grad_residual)
    k_g, k_x, k_c, d_w, d_b = grad_coefficients(sum_g, sum_g_xc, invstd, scale, channel_count(x), training)
    dx, _ = backend.backward_apply(grad_y, x, mean, scale, shift, residual, None, None, None, None, relu,
                                   k_g, k_x, k_c, None, None, None)
    if d_res is None:
        d_res = x.new_empty(0)
    return dx, d_w, d_b, d_res


@bn_act_backward.register_fake
def _(grad_y, x, weight, bias, residual, mean, var, eps, relu, training, grad_residual):
    check_like(grad_y, x, "grad_y")
    return fake_like(x), fake_channels(x), fake_channels(x), fake_like(x) if grad_residual else x.new_empty(0)


def _save_train(ctx, inputs, output):
    x, weight, bias, residual, eps, relu = inputs
    _, mean, var = output
    ctx.mark_non_differentiable(mean, var)
    ctx.save_for_backward(x, weight, bias, residual if relu else None, mean, var)
    ctx.eps, ctx.relu, ctx.training = eps, relu, True
    ctx.has_residual = residual is not None


def _save_eval(ctx, inputs, output):
    x, weight, bias, residual, running_mean, running_var, eps, relu = inputs
    ctx.save_for_backward(x, weight, bias, residual if relu else None, running_mean, running_var)
    ctx.eps, ctx.relu, ctx.training = eps, relu, False
    ctx.has_residual = residual is not None


def _backward(ctx, grad_y):
    x, weight, bias, residual, mean, var = ctx.saved_tensors
    want_res = ctx.has_residual and ctx.needs_input_grad[3]
    dx, dw, db, dr = torch.ops.fusedres.bn_act_backward(grad_y, x, weight, bias, residual, mean, var, ctx.eps,
                                                        ctx.relu, ctx.training, want_res)
    return dx, cast_param_grad(dw, weight), cast_param_grad(db, bias), dr if want_res else None


def _backward_train(ctx, grad_y, _grad_mean, _grad_var):
    return _backward(ctx, grad_y) + (None, None)


def _backward_eval(ctx, grad_y):
    return _backward(ctx, grad_y) + (None, None, None, None)


bn_act_train.register_autograd(_backward_train, setup_context=_save_train)
bn_act_eval.register_autograd(_backward_eval, setup_context=_save_eval)


def bn_act(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
           weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, training: bool = False,
           momentum: float = 0.1, eps: float = 1e-5, residual: Optional[Tensor] = None,
           relu: bool = False) -> Tensor:
    """act(F.batch_norm(x, ...) [+ residual]) as one fused op; same arguments and running-stat update as
    `F.batch_norm`, plus `residual` (same shape, dtype, device as x) and `relu`."""
    if training:
        y, mean, var = torch.ops.fusedres.bn_act_train(x, weight, bias, residual, eps, relu)
        if running_mean is not None:
            update_running_stats(running_mean, running_var, mean, var, channel_count(x), momentum)
        return y
    if running_mean is None or running_var is None:
        raise ValueError("fusedres: bn_act with training=False needs running_mean and running_var")
    return torch.ops.fusedres.bn_act_eval(x, weight, bias, residual, running_mean, running_var, eps, relu)
