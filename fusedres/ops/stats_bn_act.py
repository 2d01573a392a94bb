"""`stats_bn_act`: a training-mode BatchNorm (+ residual | + a second BatchNorm'd input) + ReLU whose batch
statistics were computed elsewhere — the block tail of conv mode, where the statistics of the conv outputs come
from the `conv_bn_act(stats=True)` epilogues, so the tail is one read of the conv output(s).

    y = act(BN(x; mean, var) [+ residual [* residual_weight] | + BN_b(xb; mean_b, var_b)])

Registered op (torch.ops.fusedres.*):
    stats_bn_act(x, weight, bias, mean, var, eps, residual, residual_weight, xb, weight_b, bias_b, mean_b, var_b,
                 eps_b, relu) -> y
mean / var (and mean_b / var_b) must be the biased batch statistics of x (xb). Backward is BatchNorm's
training-mode backward (`bn_act_backward` / `dual_bn_act_backward`: reduce, finalize, apply), which
already contains the gradient through the statistics, so none is returned for mean and var and the conv that
produced them needs no statistics term in its own backward. Saved: x (and xb, the residual), no output.
(scale, shift) come from the backend's finalize kernel (`bn_params`, one launch per BatchNorm), in forward and
again in backward.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fusedres import backends
from fusedres._layout import acc_dtype
from fusedres.ops._common import (cast_param_grad, check_bn, check_eps, check_flag, check_like,
                                  densify, fake_like)
from fusedres.ops.bn_act import _check as check_bn_act, residual_args


def _check(x, weight, bias, mean, var, eps, residual, residual_weight, xb, weight_b, bias_b, mean_b, var_b, eps_b):
    check_bn_act(x, weight, bias, residual, mean, var, training=False, residual_weight=residual_weight)
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
                    var_b: Optional[Tensor], eps_b: float, relu: bool) -> Tensor:
    _check(x, weight, bias, mean, var, eps, residual, residual_weight, xb, weight_b, bias_b, mean_b, var_b, eps_b)
    x, residual, xb = densify(x, residual, xb)
    acc = acc_dtype(x.dtype)
    backend = backends.select(x)
    mean = mean.to(acc)
    scale, shift = backend.bn_params(x, mean, var.to(acc), weight, bias, eps)
    if xb is None:
        return backend.apply(x, mean, scale, shift, *residual_args(x, residual, residual_weight), relu)
    mean_b = mean_b.to(acc)
    scale_b, shift_b = backend.bn_params(x, mean_b, var_b.to(acc), weight_b, bias_b, eps_b)
    return backend.apply(x, mean, scale, shift, None, xb, mean_b, scale_b, shift_b, relu)


@stats_bn_act_op.register_fake
def _(x, weight, bias, mean, var, eps, residual, residual_weight, xb, weight_b, bias_b, mean_b, var_b, eps_b, relu):
    _check(x, weight, bias, mean, var, eps, residual, residual_weight, xb, weight_b, bias_b, mean_b, var_b, eps_b)
    return fake_like(x)


def _save(ctx, inputs, output):
    x, weight, bias, mean, var, eps, residual, residual_weight, xb, weight_b, bias_b, mean_b, var_b, eps_b, relu = \
        inputs
    keep_residual = relu or residual_weight is not None
    ctx.save_for_backward(x, weight, bias, mean, var, residual if keep_residual else None, residual_weight, xb,
                          weight_b, bias_b, mean_b, var_b)
    ctx.eps, ctx.eps_b, ctx.relu = eps, eps_b, relu
    ctx.has_residual = residual is not None


def _backward(ctx, grad_y):
    x, weight, bias, mean, var, residual, residual_weight, xb, weight_b, bias_b, mean_b, var_b = ctx.saved_tensors
    need = ctx.needs_input_grad
    grads = [None] * 15
    if xb is None:
        want_res = ctx.has_residual and need[6]
        dx, dw, db, dr, drw = torch.ops.fusedres.bn_act_backward(grad_y, x, weight, bias, residual, mean, var,
                                                                 None, None, ctx.eps, ctx.relu, True, want_res,
                                                                 residual_weight)
        grads[6] = dr if want_res else None
        grads[7] = cast_param_grad(drw, residual_weight)
    else:
        dx, dw, db, dxb, dw_b, db_b = torch.ops.fusedres.dual_bn_act_backward(
            grad_y, x, weight, bias, mean, var, None, None, ctx.eps, xb, weight_b, bias_b, mean_b, var_b, None, None,
            ctx.eps_b, ctx.relu, True)
        grads[8], grads[9], grads[10] = dxb, cast_param_grad(dw_b, weight_b), cast_param_grad(db_b, bias_b)
    grads[0], grads[1], grads[2] = dx, cast_param_grad(dw, weight), cast_param_grad(db, bias)
    return tuple(grads)


stats_bn_act_op.register_autograd(_backward, setup_context=_save)


def stats_bn_act(x: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor] = None,
                 bias: Optional[Tensor] = None, eps: float = 1e-5, *, residual: Optional[Tensor] = None,
                 residual_weight: Optional[Tensor] = None, xb: Optional[Tensor] = None,
                 stats_b=None, weight_b: Optional[Tensor] = None, bias_b: Optional[Tensor] = None,
                 eps_b: float = 1e-5, relu: bool = True) -> Tensor:
    """act(BN(x) [+ residual [* residual_weight] | + BN_b(xb)]) with (mean, var) the batch statistics of x and
    `stats_b` = (mean_b, var_b) those of xb (module docstring)."""
    check_flag(relu, "relu")
    mean_b, var_b = stats_b if stats_b is not None else (None, None)
    _check(x, weight, bias, mean, var, eps, residual, residual_weight, xb, weight_b, bias_b, mean_b, var_b, eps_b)
    return torch.ops.fusedres.stats_bn_act(x, weight, bias, mean, var, float(eps), residual, residual_weight, xb,
                                           weight_b, bias_b, mean_b, var_b, float(eps_b), relu)
