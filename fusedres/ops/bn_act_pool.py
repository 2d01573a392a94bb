"""`bn_act_pool`: max_pool2d(act(BatchNorm(x))) in training mode — a ResNet stem's BN + ReLU + max-pool (conv mode)
that keeps only x for backward: stock keeps x for BatchNorm, the ReLU output for ReLU and the pool, and the
pool's int64 indices.

Registered op (torch.ops.fusedres.*):
    bn_act_pool_train(x, weight, bias, eps, relu, kernel_size, stride, padding, dilation, ceil_mode)
        -> (y, mean, var)          mean / biased var: the batch statistics (accumulation dtype)
Forward: the backends' statistics + finalize (`bn_stats`) and apply passes, then `max_pool2d`. Backward forms
(scale, shift) again (`fusedres::bn_params`, one launch), recomputes the
activation (one elementwise pass, `scale_shift_act`) and the pool's argmax (`max_pool2d_with_indices`), scatters the gradient through it and runs
BatchNorm's training backward (`bn_act_backward`: reduce, finalize, apply).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fusedres import backends
from fusedres._layout import acc_dtype
from fusedres.ops import batch_stats as _batch_stats, bn_act as _bn_act  # noqa: F401  (ops in backward)
from fusedres.ops import scale_shift_act as _scale_shift_act  # noqa: F401
from fusedres.ops._common import cast_param_grad, check_batch_size, check_bn, densify, fake_channels, fake_like


def _pool(a, kernel_size, stride, padding, dilation, ceil_mode):
    return F.max_pool2d(a, kernel_size, stride, padding, dilation, ceil_mode)


@torch.library.custom_op("fusedres::bn_act_pool_train", mutates_args=())
def bn_act_pool_train(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, relu: bool,
                      kernel_size: list[int], stride: list[int], padding: list[int], dilation: list[int],
                      ceil_mode: bool) -> tuple[Tensor, Tensor, Tensor]:
    check_bn(x, "x", weight, bias)
    check_batch_size(x)
    (x,) = densify(x)
    backend = backends.select(x)
    mean, var, scale, shift = backend.bn_stats(x, weight, bias, eps, None, None, None, None)
    a = backend.apply(x, mean, scale, shift, None, None, None, None, None, relu)
    return _pool(a, kernel_size, stride, padding, dilation, ceil_mode), mean, var


@bn_act_pool_train.register_fake
def _(x, weight, bias, eps, relu, kernel_size, stride, padding, dilation, ceil_mode):
    check_bn(x, "x", weight, bias)
    y = _pool(fake_like(x), kernel_size, stride, padding, dilation, ceil_mode)
    return y, fake_channels(x), fake_channels(x)


def _save(ctx, inputs, output):
    x, weight, bias, eps, relu, kernel_size, stride, padding, dilation, ceil_mode = inputs
    _, mean, var = output
    ctx.mark_non_differentiable(mean, var)
    ctx.save_for_backward(x, weight, bias, mean, var)
    ctx.eps, ctx.relu, ctx.pool = eps, relu, (list(kernel_size), list(stride), list(padding), list(dilation),
                                              ceil_mode)


def _backward(ctx, grad_y, _grad_mean, _grad_var):
    x, weight, bias, mean, var = ctx.saved_tensors
    acc = acc_dtype(x.dtype)
    mean_a = mean.to(acc)
    scale, shift = torch.ops.fusedres.bn_params(x, mean_a, var.to(acc), weight, bias, ctx.eps)
    a = torch.ops.fusedres.scale_shift_act(x, mean_a, scale, shift, None, None, None, None, None, ctx.relu)
    k, s, p, d, ceil = ctx.pool
    _, idx = torch.ops.aten.max_pool2d_with_indices(a, k, s, p, d, ceil)
    grad_a = torch.ops.aten.max_pool2d_with_indices_backward(grad_y, a, k, s, p, d, ceil, idx)
    dx, dw, db, _, _ = torch.ops.fusedres.bn_act_backward(grad_a.to(x.dtype), x, weight, bias, None, mean_a,
                                                         var.to(acc), scale, shift, ctx.eps, ctx.relu, True,
                                                         False)
    return dx, cast_param_grad(dw, weight), cast_param_grad(db, bias), None, None, None, None, None, None, None


bn_act_pool_train.register_autograd(_backward, setup_context=_save)
