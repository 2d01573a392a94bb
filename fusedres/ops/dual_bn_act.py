"""`dual_bn_act`: y = act(BN_a(x) + BN_b(r)) — the projection-shortcut tail of a downsampling ResNet block
(bn3 of the main branch plus the BatchNorm of `downsample`) in one forward pass and one fused backward.

Registered ops (torch.ops.fusedres.*):
    dual_bn_act_train(x, weight, bias, mean, var, scale, shift, eps, r, weight_r, bias_r, mean_r, var_r,
                      scale_r, shift_r, eps_r, relu) -> y
    dual_bn_act_eval(x, weight, bias, running_mean, running_var, eps,
                     r, weight_r, bias_r, running_mean_r, running_var_r, eps_r, relu) -> y
    dual_bn_act_backward(grad_y, x, weight, bias, mean, var, scale, shift, eps, r, weight_r, bias_r, mean_r,
                         var_r, scale_r, shift_r, eps_r, relu, training)
        -> (grad_x, grad_weight, grad_bias, grad_r, grad_weight_r, grad_bias_r)
Training: one `fusedres::bn_stats` per BatchNorm (statistics + finalize with scale, shift and the running
statistics), then one apply launch; backward: one reduce, one finalize (both BNs' coefficients and gradients),
one apply. Forward saves both inputs and their statistics; the ReLU mask is recomputed in backward.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fusedres import backends
from fusedres.ops._common import (cast_param_grad, check_batch_size, check_bn, check_bn_call, check_flag,
                                  check_like, densify, fake_channels, fake_like)
from fusedres.ops._transforms import refuse_forward_ad, transformed
from fusedres.ops.batch_stats import bn_stats
from fusedres.ops.bn_act import _check_increment, _eval_params, average_factor
from fusedres.reference import dual_bn_act_reference


def _check(x, weight, bias, r, weight_r, bias_r, stats=(None,) * 4, training=True):
    check_bn(x, "x", weight, bias, stats[0], stats[1])
    check_like(r, x, "r (the shortcut input)")
    check_bn(r, "r", weight_r, bias_r, stats[2], stats[3])
    if training:
        check_batch_size(x)


@torch.library.custom_op("fusedres::dual_bn_act_train", mutates_args=())
def dual_bn_act_train(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor, var: Tensor,
                      scale: Tensor, shift: Tensor, eps: float, r: Tensor, weight_r: Optional[Tensor],
                      bias_r: Optional[Tensor], mean_r: Tensor, var_r: Tensor, scale_r: Tensor, shift_r: Tensor,
                      eps_r: float, relu: bool) -> Tensor:
    refuse_forward_ad("dual_bn_act_train")
    _check(x, weight, bias, r, weight_r, bias_r)
    if x.numel() == 0:
        return fake_like(x)
    x, r = densify(x, r)
    return backends.select(x).apply(x, mean, scale, shift, None, r, mean_r, scale_r, shift_r, relu)


@dual_bn_act_train.register_fake
def _(x, weight, bias, mean, var, scale, shift, eps, r, weight_r, bias_r, mean_r, var_r, scale_r, shift_r, eps_r,
      relu):
    _check(x, weight, bias, r, weight_r, bias_r)
    return fake_like(x)


@torch.library.custom_op("fusedres::dual_bn_act_eval", mutates_args=())
def dual_bn_act_eval(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Tensor,
                     running_var: Tensor, eps: float, r: Tensor, weight_r: Optional[Tensor],
                     bias_r: Optional[Tensor], running_mean_r: Tensor, running_var_r: Tensor, eps_r: float,
                     relu: bool) -> Tensor:
    refuse_forward_ad("dual_bn_act_eval")
    _check(x, weight, bias, r, weight_r, bias_r, (running_mean, running_var, running_mean_r, running_var_r),
           training=False)
    if x.numel() == 0:
        return fake_like(x)
    x, r = densify(x, r)
    backend = backends.select(x)
    mean, _, scale, shift = _eval_params(backend, x, running_mean, running_var, weight, bias, eps)
    mean_r, _, scale_r, shift_r = _eval_params(backend, x, running_mean_r, running_var_r, weight_r, bias_r, eps_r)
    return backend.apply(x, mean, scale, shift, None, r, mean_r, scale_r, shift_r, relu)


@dual_bn_act_eval.register_fake
def _(x, weight, bias, running_mean, running_var, eps, r, weight_r, bias_r, running_mean_r, running_var_r,
      eps_r, relu):
    _check(x, weight, bias, r, weight_r, bias_r, (running_mean, running_var, running_mean_r, running_var_r),
           training=False)
    return fake_like(x)


@torch.library.custom_op("fusedres::dual_bn_act_backward", mutates_args=())
def dual_bn_act_backward(grad_y: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                         mean: Tensor, var: Tensor, scale: Optional[Tensor], shift: Optional[Tensor], eps: float,
                         r: Tensor, weight_r: Optional[Tensor], bias_r: Optional[Tensor], mean_r: Tensor,
                         var_r: Tensor, scale_r: Optional[Tensor], shift_r: Optional[Tensor], eps_r: float,
                         relu: bool, training: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    refuse_forward_ad("dual_bn_act_backward")
    check_like(grad_y, x, "grad_y")
    if x.numel() == 0:
        zero = fake_channels(x).zero_()
        return fake_like(x), zero, zero.clone(), fake_like(r), zero.clone(), zero.clone()
    x, grad_y, r = densify(x, grad_y, r)
    backend = backends.select(x)
    if scale is None:  # eval: (scale, shift) from the running statistics
        mean, var, scale, shift = _eval_params(backend, x, mean, var, weight, bias, eps)
        mean_r, var_r, scale_r, shift_r = _eval_params(backend, x, mean_r, var_r, weight_r, bias_r, eps_r)
    dx, dr, _, (d_w, d_b), (d_w_r, d_b_r) = backend.backward(
        grad_y, x, mean, scale, shift, var, eps, None, r, mean_r, scale_r, shift_r, var_r, eps_r, relu, training,
        False)
    return dx, d_w, d_b, dr, d_w_r, d_b_r


@dual_bn_act_backward.register_fake
def _(grad_y, x, weight, bias, mean, var, scale, shift, eps, r, weight_r, bias_r, mean_r, var_r, scale_r, shift_r,
      eps_r, relu, training):
    check_like(grad_y, x, "grad_y")
    return fake_like(x), fake_channels(x), fake_channels(x), fake_like(r), fake_channels(x), fake_channels(x)


def _save_train(ctx, inputs, output):
    x, weight, bias, mean, var, scale, shift, eps, r, weight_r, bias_r, mean_r, var_r, scale_r, shift_r, eps_r, \
        relu = inputs
    ctx.save_for_backward(x, weight, bias, mean, var, scale, shift, r, weight_r, bias_r, mean_r, var_r, scale_r,
                          shift_r)
    ctx.eps, ctx.eps_r, ctx.relu, ctx.training = eps, eps_r, relu, True


def _save_eval(ctx, inputs, output):
    x, weight, bias, rm, rv, eps, r, weight_r, bias_r, rm_r, rv_r, eps_r, relu = inputs
    ctx.save_for_backward(x, weight, bias, rm, rv, None, None, r, weight_r, bias_r, rm_r, rv_r, None, None)
    ctx.eps, ctx.eps_r, ctx.relu, ctx.training = eps, eps_r, relu, False


def _backward(ctx, grad_y):
    x, weight, bias, mean, var, scale, shift, r, weight_r, bias_r, mean_r, var_r, scale_r, shift_r = \
        ctx.saved_tensors
    dx, dw, db, dr, dw_r, db_r = torch.ops.fusedres.dual_bn_act_backward(
        grad_y, x, weight, bias, mean, var, scale, shift, ctx.eps, r, weight_r, bias_r, mean_r, var_r, scale_r,
        shift_r, ctx.eps_r, ctx.relu, ctx.training)
    return (dx, cast_param_grad(dw, weight), cast_param_grad(db, bias),
            dr, cast_param_grad(dw_r, weight_r), cast_param_grad(db_r, bias_r))


def _backward_train(ctx, grad_y):
    dx, dw, db, dr, dw_r, db_r = _backward(ctx, grad_y)
    return dx, dw, db, None, None, None, None, None, dr, dw_r, db_r, None, None, None, None, None, None


def _backward_eval(ctx, grad_y):
    dx, dw, db, dr, dw_r, db_r = _backward(ctx, grad_y)
    return dx, dw, db, None, None, None, dr, dw_r, db_r, None, None, None, None


dual_bn_act_train.register_autograd(_backward_train, setup_context=_save_train)
dual_bn_act_eval.register_autograd(_backward_eval, setup_context=_save_eval)


def dual_bn_act(x: Tensor, r: Tensor, *, weight: Optional[Tensor], bias: Optional[Tensor],
                running_mean: Optional[Tensor], running_var: Optional[Tensor], momentum: Optional[float] = 0.1,
                eps: float = 1e-5, weight_r: Optional[Tensor], bias_r: Optional[Tensor],
                running_mean_r: Optional[Tensor], running_var_r: Optional[Tensor], momentum_r: Optional[float] = 0.1,
                eps_r: float = 1e-5, training: bool = False, relu: bool = True,
                num_batches_tracked: Optional[Tensor] = None, num_batches_tracked_r: Optional[Tensor] = None,
                increment_num_batches_tracked: bool = False) -> Tensor:
    """act(BN_a(x) + BN_b(r)) as one fused op; each BN's arguments as in `F.batch_norm` (`*_r` for r's BN).
    Training uses batch statistics for both and updates whichever running statistics are given (not for an
    empty batch, as stock). A momentum of None is the cumulative average over the (already incremented)
    `num_batches_tracked[_r]`, read on the device. `increment_num_batches_tracked` (training, numeric momenta):
    add one to each given num_batches_tracked[_r] inside its statistics launch (nn.BatchNorm2d's bookkeeping).
    Under torch.func transforms or forward-mode AD it runs stock's own ops."""
    check_bn_call(x, running_mean, running_var, weight, bias, training, 0.0 if momentum is None else momentum,
                  eps)
    check_bn_call(r, running_mean_r, running_var_r, weight_r, bias_r, training,
                  0.0 if momentum_r is None else momentum_r, eps_r, "r", "_r")
    check_like(r, x, "r (the shortcut input)")
    check_flag(relu, "relu")
    inc = _check_increment(increment_num_batches_tracked, training, momentum, num_batches_tracked)
    inc_r = _check_increment(increment_num_batches_tracked, training, momentum_r, num_batches_tracked_r)
    if transformed(x, r, weight, bias, running_mean, running_var, weight_r, bias_r, running_mean_r, running_var_r):
        for t, on in ((num_batches_tracked, inc), (num_batches_tracked_r, inc_r)):
            if on:
                t.add_(1)
        return dual_bn_act_reference(
            x, dict(running_mean=running_mean, running_var=running_var, weight=weight, bias=bias,
                    momentum=average_factor(momentum, num_batches_tracked), eps=eps), r,
            dict(running_mean=running_mean_r, running_var=running_var_r, weight=weight_r, bias=bias_r,
                 momentum=average_factor(momentum_r, num_batches_tracked_r), eps=eps_r), training, relu)
    if training:
        _check(x, weight, bias, r, weight_r, bias_r)
        stats = bn_stats(x, weight, bias, running_mean, running_var, momentum, eps, num_batches_tracked, inc)
        stats_r = bn_stats(r, weight_r, bias_r, running_mean_r, running_var_r, momentum_r, eps_r,
                           num_batches_tracked_r, inc_r)
        return torch.ops.fusedres.dual_bn_act_train(x, weight, bias, *stats, eps, r, weight_r, bias_r, *stats_r,
                                                    eps_r, relu)
    if running_mean is None or running_mean_r is None:
        raise ValueError("fusedres: dual_bn_act with training=False needs the running statistics of both BNs")
    return torch.ops.fusedres.dual_bn_act_eval(x, weight, bias, running_mean, running_var, eps, r, weight_r,
                                               bias_r, running_mean_r, running_var_r, eps_r, relu)
