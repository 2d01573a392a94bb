"""`stats_bn_act`: a training-mode BatchNorm (+ residual | + a second BatchNorm'd input) + ReLU whose batch
statistics were computed elsewhere — the block tail of conv mode, where the statistics of the conv outputs come
from the `conv_bn_act(stats=True)` epilogues, so the tail is one read of the conv output(s).

    y = act(BN(x; mean, var) [+ residual [* residual_weight] | + BN_b(xb; mean_b, var_b)])

Registered op (torch.ops.fusedres.*):
    stats_bn_act(x, weight, bias, mean, var, eps, residual, residual_weight, xb, weight_b, bias_b, mean_b, var_b,
                 eps_b, relu, scale=None, shift=None, scale_b=None, shift_b=None) -> y
mean / var (and mean_b / var_b) must be the biased batch statistics of x (xb). Backward is BatchNorm's
training-mode backward (`bn_act_backward` / `dual_bn_act_backward`: reduce, finalize, apply), which
already contains the gradient through the statistics, so none is returned for mean and var and the conv that
produced them needs no statistics term in its own backward. Saved: x (and xb, the residual), no output.
(scale, shift) with BN(x) = (x - mean) * scale + shift are given (from the launch that finalized the
statistics, `fusedres::bn_finalize`) and kept for backward, or come from the backend's finalize kernel
(`bn_params`, one launch per BatchNorm) in forward and again in backward.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fusedres import backends
from fusedres._layout import acc_dtype
from fusedres.ops._common import (cast_param_grad, check_bn, check_channels, check_eps, check_flag, check_like,
                                  densify, fake_like)
from fusedres.ops.bn_act import _check as check_bn_act, residual_args


def _check(x, weight, bias, mean, var, eps, residual, residual_weight, xb, weight_b, bias_b, mean_b, var_b, eps_b,
           scale=None, shift=None, scale_b=None, shift_b=None):
    check_bn_act(x, weight, bias, residual, mean, var, training=False, residual_weight=residual_weight)
    for pair, side in (((scale, shift), ""), ((scale_b, shift_b), "_b")):
        if (pair[0] is None) != (pair[1] is None):
            raise ValueError(f"fusedres: stats_bn_act needs both scale{side} and shift{side} (BN's precomputed "
                             f"(scale, shift)), or neither")
        for v, name in zip(pair, (f"scale{side}", f"shift{side}")):
            check_channels(v, x, name)
            if v is not None and (v.dtype != acc_dtype(x.dtype) or not v.is_contiguous() or v.requires_grad):
                raise ValueError(f"fusedres: stats_bn_act {name} must be a contiguous {acc_dtype(x.dtype)} vector "
                                 f"without gradient (the finalize launch's output), got {v.dtype}")
    if xb is None and scale_b is not None:
        raise ValueError("fusedres: stats_bn_act scale_b / shift_b need xb")
    if xb is not None and (scale is None) != (scale_b is None):
        raise ValueError("fusedres: stats_bn_act with xb takes both BatchNorms' (scale, shift), or neither")
    for v, name in ((mean, "mean"), (var, "var")):
        if v is None:
            raise ValueError(f"fusedres: stats_bn_act needs {name} (the batch statistics of x), got None")
    check_eps(eps, True)
    if residual is not None and xb is not None:
        raise ValueError("fusedres: stats_bn_act takes a residual or a second input xb, not both")
    if xb is not None:
        check_like(xb, x, "xb")
        check_bn(xb, "xb", weight_b, bias_b, mean_b, var_b)
        if mean_b is None or var_b is None:
            raise ValueError("fusedres: stats_bn_act with xb needs mean_b and var_b (its batch statistics)")
        check_eps(eps_b, True, "eps_b")


@torch.library.custom_op("fusedres::stats_bn_act", mutates_args=())
def stats_bn_act_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor, var: Tensor,
                    eps: float, residual: Optional[Tensor], residual_weight: Optional[Tensor], xb: Optional[Tensor],
                    weight_b: Optional[Tensor], bias_b: Optional[Tensor], mean_b: Optional[Tensor],
                    var_b: Optional[Tensor], eps_b: float, relu: bool, scale: Optional[Tensor] = None,
                    shift: Optional[Tensor] = None, scale_b: Optional[Tensor] = None,
                    shift_b: Optional[Tensor] = None) -> Tensor:
    _check(x, weight, bias, mean, var, eps, residual, residual_weight, xb, weight_b, bias_b, mean_b, var_b, eps_b,
           scale, shift, scale_b, shift_b)
    x, residual, xb = densify(x, residual, xb)
    acc = acc_dtype(x.dtype)
    backend = backends.select(x)
    mean = mean.to(acc)
    if scale is None:
        scale, shift = backend.bn_params(x, mean, var.to(acc), weight, bias, eps)
    if xb is None:
        return backend.apply(x, mean, scale, shift, *residual_args(x, residual, residual_weight), relu)
    mean_b = mean_b.to(acc)
    if scale_b is None:
        scale_b, shift_b = backend.bn_params(x, mean_b, var_b.to(acc), weight_b, bias_b, eps_b)
    return backend.apply(x, mean, scale, shift, None, xb, mean_b, scale_b, shift_b, relu)


@stats_bn_act_op.register_fake
def _(x, weight, bias, mean, var, eps, residual, residual_weight, xb, weight_b, bias_b, mean_b, var_b, eps_b, relu,
      scale=None, shift=None, scale_b=None, shift_b=None):
    _check(x, weight, bias, mean, var, eps, residual, residual_weight, xb, weight_b, bias_b, mean_b, var_b, eps_b,
           scale, shift, scale_b, shift_b)
    return fake_like(x)


def _save(ctx, inputs, output):
    (x, weight, bias, mean, var, eps, residual, residual_weight, xb, weight_b, bias_b, mean_b, var_b, eps_b, relu,
     scale, shift, scale_b, shift_b) = inputs
    keep_residual = relu or residual_weight is not None
    ctx.save_for_backward(x, weight, bias, mean, var, residual if keep_residual else None, residual_weight, xb,
                          weight_b, bias_b, mean_b, var_b, scale, shift, scale_b, shift_b)
    ctx.eps, ctx.eps_b, ctx.relu = eps, eps_b, relu
    ctx.has_residual = residual is not None


def _backward(ctx, grad_y):
    (x, weight, bias, mean, var, residual, residual_weight, xb, weight_b, bias_b, mean_b, var_b, scale, shift,
     scale_b, shift_b) = ctx.saved_tensors
    need = ctx.needs_input_grad
    grads = [None] * 19
    if xb is None:
        want_res = ctx.has_residual and need[6]
        dx, dw, db, dr, drw = torch.ops.fusedres.bn_act_backward(grad_y, x, weight, bias, residual, mean, var,
                                                                 scale, shift, ctx.eps, ctx.relu, True, want_res,
                                                                 residual_weight)
        grads[6] = dr if want_res else None
        grads[7] = cast_param_grad(drw, residual_weight)
    else:
        dx, dw, db, dxb, dw_b, db_b = torch.ops.fusedres.dual_bn_act_backward(
            grad_y, x, weight, bias, mean, var, scale, shift, ctx.eps, xb, weight_b, bias_b, mean_b, var_b, scale_b,
            shift_b, ctx.eps_b, ctx.relu, True)
        grads[8], grads[9], grads[10] = dxb, cast_param_grad(dw_b, weight_b), cast_param_grad(db_b, bias_b)
    grads[0], grads[1], grads[2] = dx, cast_param_grad(dw, weight), cast_param_grad(db, bias)
    return tuple(grads)


stats_bn_act_op.register_autograd(_backward, setup_context=_save)


def stats_bn_act(x: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor] = None,
                 bias: Optional[Tensor] = None, eps: float = 1e-5, *, residual: Optional[Tensor] = None,
                 residual_weight: Optional[Tensor] = None, xb: Optional[Tensor] = None,
                 stats_b=None, weight_b: Optional[Tensor] = None, bias_b: Optional[Tensor] = None,
                 eps_b: float = 1e-5, relu: bool = True, params=None, params_b=None) -> Tensor:
    """act(BN(x) [+ residual [* residual_weight] | + BN_b(xb)]) with (mean, var) the batch statistics of x and
    `stats_b` = (mean_b, var_b) those of xb (module docstring). `params` / `params_b`: each BN's (scale, shift)
    if already formed (by the launch that finalized the statistics), saving a launch each way."""
    check_flag(relu, "relu")
    mean_b, var_b = stats_b if stats_b is not None else (None, None)
    scale, shift = params if params is not None else (None, None)
    scale_b, shift_b = params_b if params_b is not None else (None, None)
    _check(x, weight, bias, mean, var, eps, residual, residual_weight, xb, weight_b, bias_b, mean_b, var_b, eps_b,
           scale, shift, scale_b, shift_b)
    return torch.ops.fusedres.stats_bn_act(x, weight, bias, mean, var, float(eps), residual, residual_weight, xb,
                                           weight_b, bias_b, mean_b, var_b, float(eps_b), relu, scale, shift, scale_b,
                                           shift_b)
