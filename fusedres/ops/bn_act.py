"""`bn_act`: y = act(BN(x) [+ residual [* residual_weight]]) — BatchNorm, optional residual add (optionally
scaled per channel: a learned shortcut weight) and optional ReLU in one pass.

Registered ops (torch.ops.fusedres.*):
    bn_act_train(x, weight, bias, residual, mean, var, scale, shift, eps, relu, residual_weight=None) -> y
    bn_act_eval(x, weight, bias, residual, running_mean, running_var, eps, relu, residual_weight=None) -> y
    bn_act_backward(grad_y, x, weight, bias, residual, mean, var, scale, shift, eps, relu, training,
                    grad_residual, residual_weight=None)
        -> (grad_x, grad_weight, grad_bias, grad_residual, grad_residual_weight)
Training is `fusedres::bn_stats` (statistics pass + one finalize launch that also forms scale and shift and
updates the running statistics) followed by `bn_act_train` (the apply pass); its backward is three launches
(reduce, finalize — coefficients and weight / bias / residual_weight gradients —, apply) and no per-channel
torch op. Eval forms (scale, shift) in one launch before the apply (and again in backward).
Forward saves x (its own dtype), mean, var, scale and shift, plus the residual when relu is on or it is
weighted; the ReLU mask is recomputed from them in backward, so the output itself is never saved. A residual
weight w (C values) runs as the backends' second-input path xb * scale_b with scale_b = w, so its gradient
sum(g * residual) per channel comes out of the same backward reduction. The public entry point is
`bn_act(...)` below, which mirrors `F.batch_norm`. An empty batch returns early from every op (empty output,
zero parameter gradients, running statistics untouched).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fusedres import backends
from fusedres._layout import acc_dtype
from fusedres.ops._common import (cast_param_grad, check_batch_size, check_bn, check_bn_call, check_channels,
                                  check_flag, check_like, densify, fake_channels, fake_like)
from fusedres.ops._transforms import refuse_forward_ad, transformed
from fusedres.ops.batch_stats import bn_stats
from fusedres.reference import bn_act_reference


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
    second-input term r * w (mean_b and shift_b absent)."""
    if residual_weight is None:
        return residual, None, None, None, None
    return None, residual, None, residual_weight.to(acc_dtype(x.dtype)).contiguous(), None


@torch.library.custom_op("fusedres::bn_act_train", mutates_args=())
def bn_act_train(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
                 mean: Tensor, var: Tensor, scale: Tensor, shift: Tensor, eps: float, relu: bool,
                 residual_weight: Optional[Tensor] = None) -> Tensor:
    refuse_forward_ad("bn_act_train")
    _check(x, weight, bias, residual, residual_weight=residual_weight)
    if x.numel() == 0:
        return fake_like(x)
    x, residual = densify(x, residual)
    return backends.select(x).apply(x, mean, scale, shift, *residual_args(x, residual, residual_weight), relu)


@bn_act_train.register_fake
def _(x, weight, bias, residual, mean, var, scale, shift, eps, relu, residual_weight=None):
    _check(x, weight, bias, residual, residual_weight=residual_weight)
    return fake_like(x)


def _eval_params(backend, x, running_mean, running_var, weight, bias, eps):
    acc = acc_dtype(x.dtype)
    mean, var = running_mean.to(acc), running_var.to(acc)
    return (mean, var) + tuple(backend.bn_params(x, mean, var, weight, bias, eps))


@torch.library.custom_op("fusedres::bn_act_eval", mutates_args=())
def bn_act_eval(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
                running_mean: Tensor, running_var: Tensor, eps: float, relu: bool,
                residual_weight: Optional[Tensor] = None) -> Tensor:
    refuse_forward_ad("bn_act_eval")
    _check(x, weight, bias, residual, running_mean, running_var, training=False, residual_weight=residual_weight)
    if x.numel() == 0:
        return fake_like(x)
    x, residual = densify(x, residual)
    backend = backends.select(x)
    mean, _, scale, shift = _eval_params(backend, x, running_mean, running_var, weight, bias, eps)
    return backend.apply(x, mean, scale, shift, *residual_args(x, residual, residual_weight), relu)


@bn_act_eval.register_fake
def _(x, weight, bias, residual, running_mean, running_var, eps, relu, residual_weight=None):
    _check(x, weight, bias, residual, running_mean, running_var, training=False, residual_weight=residual_weight)
    return fake_like(x)


@torch.library.custom_op("fusedres::bn_act_backward", mutates_args=())
def bn_act_backward(grad_y: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                    residual: Optional[Tensor], mean: Tensor, var: Tensor, scale: Optional[Tensor],
                    shift: Optional[Tensor], eps: float, relu: bool, training: bool, grad_residual: bool,
                    residual_weight: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    refuse_forward_ad("bn_act_backward")
    check_like(grad_y, x, "grad_y")
    if x.numel() == 0:
        zero = fake_channels(x).zero_()
        return (fake_like(x), zero, zero.clone(), fake_like(x) if grad_residual else x.new_empty(0),
                zero.clone() if residual_weight is not None else zero.new_empty(0))
    x, grad_y, residual = densify(x, grad_y, residual)
    backend = backends.select(x)
    if scale is None:  # eval: (scale, shift) from the running statistics
        mean, var, scale, shift = _eval_params(backend, x, mean, var, weight, bias, eps)
    res, xb, mean_b, scale_b, shift_b = residual_args(x, residual, residual_weight)
    weighted = residual_weight is not None
    dx, d_xb, d_res, (d_w, d_b), grads_b = backend.backward(
        grad_y, x, mean, scale, shift, var, eps, res, xb, mean_b, scale_b, shift_b, None, 0.0, relu, training,
        grad_residual and not weighted)
    if weighted:
        d_res = d_xb  # residual_weight * g, from the second-input path
    if d_res is None or not grad_residual:
        d_res = x.new_empty(0)
    return dx, d_w, d_b, d_res, grads_b[0] if weighted else d_w.new_empty(0)


@bn_act_backward.register_fake
def _(grad_y, x, weight, bias, residual, mean, var, scale, shift, eps, relu, training, grad_residual,
      residual_weight=None):
    check_like(grad_y, x, "grad_y")
    return (fake_like(x), fake_channels(x), fake_channels(x), fake_like(x) if grad_residual else x.new_empty(0),
            fake_channels(x) if residual_weight is not None else fake_channels(x).new_empty(0))


def _save(ctx, x, weight, bias, residual, stats, eps, relu, residual_weight, training):
    keep_residual = relu or residual_weight is not None
    ctx.save_for_backward(x, weight, bias, residual if keep_residual else None, *stats, residual_weight)
    ctx.eps, ctx.relu, ctx.training = eps, relu, training
    ctx.has_residual = residual is not None


def _save_train(ctx, inputs, output):
    x, weight, bias, residual, mean, var, scale, shift, eps, relu, residual_weight = inputs
    _save(ctx, x, weight, bias, residual, (mean, var, scale, shift), eps, relu, residual_weight, True)


def _save_eval(ctx, inputs, output):
    x, weight, bias, residual, running_mean, running_var, eps, relu, residual_weight = inputs
    _save(ctx, x, weight, bias, residual, (running_mean, running_var, None, None), eps, relu, residual_weight,
          False)


def _backward(ctx, grad_y, residual_index):
    """Gradients of (x, weight, bias, residual) and of residual_weight."""
    x, weight, bias, residual, mean, var, scale, shift, residual_weight = ctx.saved_tensors
    want_res = ctx.has_residual and ctx.needs_input_grad[residual_index]
    dx, dw, db, dr, drw = torch.ops.fusedres.bn_act_backward(grad_y, x, weight, bias, residual, mean, var, scale,
                                                             shift, ctx.eps, ctx.relu, ctx.training, want_res,
                                                             residual_weight)
    return ((dx, cast_param_grad(dw, weight), cast_param_grad(db, bias), dr if want_res else None),
            cast_param_grad(drw, residual_weight))


def _backward_train(ctx, grad_y):
    grads, d_rw = _backward(ctx, grad_y, 3)
    return grads + (None, None, None, None, None, None, d_rw)


def _backward_eval(ctx, grad_y):
    grads, d_rw = _backward(ctx, grad_y, 3)
    return grads + (None, None, None, None, d_rw)


bn_act_train.register_autograd(_backward_train, setup_context=_save_train)
bn_act_eval.register_autograd(_backward_eval, setup_context=_save_eval)


def bn_act(input: Optional[Tensor] = None, running_mean: Optional[Tensor] = None,
           running_var: Optional[Tensor] = None, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
           training: bool = False, momentum: Optional[float] = 0.1, eps: float = 1e-5,
           residual: Optional[Tensor] = None, relu: bool = False, residual_weight: Optional[Tensor] = None,
           num_batches_tracked: Optional[Tensor] = None, *, x: Optional[Tensor] = None,
           increment_num_batches_tracked: bool = False) -> Tensor:
    """act(F.batch_norm(input, ...) [+ residual [* residual_weight]]) as one fused op; same arguments and
    running-stat update as `F.batch_norm` (`x=` is accepted for `input`), plus `residual` (same shape, dtype,
    device as input), `relu`, and `residual_weight`: C per-channel factors on the residual (a learned shortcut
    weight; differentiable). `momentum=None` is nn.BatchNorm2d's cumulative average: pass its (already
    incremented) `num_batches_tracked`; the factor 1 / num_batches_tracked is read on the device. An empty batch
    gives an empty output and leaves the running statistics alone, as stock. `increment_num_batches_tracked`
    (training, numeric momentum): add one to num_batches_tracked inside the statistics launch, the bookkeeping
    nn.BatchNorm2d.forward does with a launch of its own. Under torch.func transforms or forward-mode AD it runs
    stock's own ops (`fusedres.ops._transforms`)."""
    x = input_arg(input, x)
    check_bn_call(x, running_mean, running_var, weight, bias, training,
                  0.0 if momentum is None else momentum, eps)
    check_flag(relu, "relu")
    increment = _check_increment(increment_num_batches_tracked, training, momentum, num_batches_tracked)
    if transformed(x, running_mean, running_var, weight, bias, residual, residual_weight):
        _check(x, weight, bias, residual, running_mean, running_var, training, residual_weight)
        if increment:
            num_batches_tracked.add_(1)
        return bn_act_reference(x, running_mean, running_var, weight, bias, training,
                                average_factor(momentum, num_batches_tracked), eps, residual, relu,
                                residual_weight)
    if training:
        _check(x, weight, bias, residual, residual_weight=residual_weight)
        stats = bn_stats(x, weight, bias, running_mean, running_var, momentum, eps, num_batches_tracked, increment)
        return torch.ops.fusedres.bn_act_train(x, weight, bias, residual, *stats, eps, relu, residual_weight)
    return torch.ops.fusedres.bn_act_eval(x, weight, bias, residual, running_mean, running_var, eps, relu,
                                          residual_weight)


def _check_increment(increment, training, momentum, num_batches_tracked) -> bool:
    check_flag(increment, "increment_num_batches_tracked")
    if not increment or num_batches_tracked is None:
        return False
    if not training or momentum is None:
        raise ValueError("fusedres: increment_num_batches_tracked needs training=True and a numeric momentum (for "
                         "momentum=None pass the already incremented num_batches_tracked instead)")
    return True


def average_factor(momentum, num_batches_tracked) -> float:
    """F.batch_norm's momentum for the stock fallback path: momentum, or (None) nn.BatchNorm2d's cumulative
    factor 1 / num_batches_tracked."""
    if momentum is not None:
        return momentum
    return 0.0 if num_batches_tracked is None else 1.0 / float(num_batches_tracked)


def input_arg(input, x):
    """F.batch_norm's first argument, given as `input` or (fusedres's older name) `x=`, not both."""
    if x is not None:
        if input is not None:
            raise TypeError("fusedres: got both input and x (x is another name for input); pass one")
        return x
    return input
