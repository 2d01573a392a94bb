"""Plain-PyTorch references: the semantics every fusedres backend must match.

Two layers, both imported by tests and benchmarks:

* module semantics — `bn_act_reference` / `dual_bn_act_reference`: `F.batch_norm` (running statistics
  updated in place exactly as `nn.BatchNorm2d` does) followed by the optional residual add and ReLU;
* the reference *backend* — the four primitives of `fusedres.backends` written with torch ops, accumulating in
  float32 (float64 for float64 inputs). It runs anywhere and is the fallback for CPU tensors.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fusedres._layout import acc_dtype

_DIMS = (0, 2, 3)


def bn_act_reference(x, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                     eps=1e-5, residual=None, relu=False, residual_weight=None):
    """act(BN(x) [+ residual [* residual_weight]]) with stock PyTorch ops."""
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    if residual is not None:
        if residual_weight is not None:
            residual = residual * _channel(residual_weight.to(residual.dtype))
        y = y + residual
    return torch.relu(y) if relu else y


def dual_bn_act_reference(x, bn_x: dict, residual, bn_residual: dict, training=False, relu=True):
    """act(BN_a(x) + BN_b(residual)); bn_* are dicts of F.batch_norm's keyword arguments."""
    y = F.batch_norm(x, training=training, **bn_x) + F.batch_norm(residual, training=training, **bn_residual)
    return torch.relu(y) if relu else y


# ---------------------------------------------------------------- the reference backend
def not_supported_reasons(x: torch.Tensor) -> list[str]:
    return []


def _channel(v: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, 1, 1)


def _pre_activation(x, mean, scale, shift, residual, xb, mean_b, scale_b, shift_b):
    acc = acc_dtype(x.dtype)
    z = (x.to(acc) - _channel(mean)) * _channel(scale) + _channel(shift)
    if residual is not None:
        z = z + residual.to(acc)
    if xb is not None and mean_b is None:  # a weighted residual xb * scale_b
        z = z + xb.to(acc) * _channel(scale_b)
    elif xb is not None:
        z = z + (xb.to(acc) - _channel(mean_b)) * _channel(scale_b) + _channel(shift_b)
    return z


def _masked_grad(dy, z, relu):
    g = dy.to(z.dtype)
    # torch.relu's backward (threshold_backward): 0 where z <= 0, the gradient elsewhere — NaN included
    return torch.where(z <= 0, torch.zeros_like(g), g) if relu else g


def batch_stats(x: torch.Tensor):
    """Per-channel mean and biased variance of x [N, C, H, W], in the accumulation dtype."""
    var, mean = torch.var_mean(x.to(acc_dtype(x.dtype)), dim=_DIMS, unbiased=False)
    return mean, var


def apply(x, mean, scale, shift, residual, xb, mean_b, scale_b, shift_b, relu):
    """y = act((x - mean) * scale + shift [+ residual | + (xb - mean_b) * scale_b + shift_b]), per channel,
    in x's dtype. Centring before scaling keeps precision when |mean| >> std."""
    z = _pre_activation(x, mean, scale, shift, residual, xb, mean_b, scale_b, shift_b)
    return (torch.relu(z) if relu else z).to(x.dtype)


def backward_reduce(dy, x, mean, scale, shift, residual, xb, mean_b, scale_b, shift_b, relu, want_grad_residual):
    """g = dy * relu'(z); per channel sum(g), sum(g * (x - mean)) [and for xb]; grad_residual = g."""
    z = _pre_activation(x, mean, scale, shift, residual, xb, mean_b, scale_b, shift_b)
    g = _masked_grad(dy, z, relu)
    sum_g = g.sum(_DIMS)
    sum_g_xc = (g * (x.to(g.dtype) - _channel(mean))).sum(_DIMS)
    xbc = None if xb is None else xb.to(g.dtype) if mean_b is None else xb.to(g.dtype) - _channel(mean_b)
    sum_g_xbc = None if xb is None else (g * xbc).sum(_DIMS)
    grad_residual = g.to(x.dtype, copy=True) if want_grad_residual else None
    return sum_g, sum_g_xc, sum_g_xbc, grad_residual


def _centred_term(x, mean, k_x):
    """k_x * (x - mean), and exactly 0 where k_x == 0 (eval mode, scale_shift_act): stock's eval-mode input
    gradient has no such term, so an inf or NaN x must not turn it into 0 * inf = NaN. k_x None: no term."""
    if k_x is None:
        return torch.zeros_like(x)
    k = _channel(k_x)
    return torch.where(k == 0, torch.zeros_like(x), (x - _channel(mean)) * k)


def _input_grad(g, x, mean, k_g, k_x, k_c):
    d = g * _channel(k_g) + _centred_term(x.to(g.dtype), mean, k_x)
    return (d if k_c is None else d + _channel(k_c)).to(x.dtype)


def backward_apply(dy, x, mean, scale, shift, residual, xb, mean_b, scale_b, shift_b, relu,
                   k_g, k_x, k_c, k_g_b, k_x_b, k_c_b):
    """dx = k_g * g + k_x * (x - mean) + k_c per channel (and the same for xb with its own coefficients);
    absent k_x / k_c (None) are 0."""
    z = _pre_activation(x, mean, scale, shift, residual, xb, mean_b, scale_b, shift_b)
    g = _masked_grad(dy, z, relu)
    dx = _input_grad(g, x, mean, k_g, k_x, k_c)
    dxb = None if xb is None else _input_grad(g, xb, mean_b, k_g_b, k_x_b, k_c_b)
    return dx, dxb


def bn_stats(x, weight, bias, eps, running_mean, running_var, momentum, num_batches_tracked, increment=None):
    """(mean, biased var, scale, shift) of BatchNorm on x; running statistics updated in place as
    nn.BatchNorm2d does (momentum None: cumulative average with factor 1 / num_batches_tracked); `increment`
    (a num_batches_tracked) gets one added."""
    mean, var = batch_stats(x)
    scale, shift = bn_params(x, mean, var, weight, bias, eps)
    cumulative = running_mean is not None and momentum is None
    factor = 1.0 / num_batches_tracked.to(mean.dtype) if cumulative else momentum
    _running_update(x, mean, var, running_mean, running_var, factor, increment)
    return mean, var, scale, shift


def bn_finalize(x, mean, var, weight, bias, eps, running_mean, running_var, momentum, num_batches_tracked,
                centred):
    """(scale, shift) from given batch statistics of x (`centred`: BN(x) = x * scale + shift), the running
    statistics with factor `momentum`, num_batches_tracked (when given) plus one."""
    _running_update(x, mean, var, running_mean, running_var, momentum, num_batches_tracked)
    scale, shift = bn_params(x, mean, var, weight, bias, eps)
    return (scale, shift - mean * scale) if centred else (scale, shift)


@torch.no_grad()
def _running_update(x, mean, var, running_mean, running_var, factor, increment):
    """nn.BatchNorm2d's running-statistics lerp with `factor` (not for an empty batch) and `increment` + 1."""
    count = x.shape[0] * x.shape[2] * x.shape[3]
    if running_mean is not None and count > 0:
        running_mean.lerp_(mean.to(running_mean.dtype), factor)
        running_var.lerp_((var * (count / (count - 1))).to(running_var.dtype), factor)
    if increment is not None:
        increment.add_(1)


def bn_params(x, mean, var, weight, bias, eps):
    """(scale, shift) with BN(x) = (x - mean) * scale + shift, in x's accumulation dtype."""
    acc = acc_dtype(x.dtype)
    invstd = torch.rsqrt(var.to(acc) + eps)
    scale = invstd if weight is None else weight.to(acc) * invstd
    shift = torch.zeros_like(invstd) if bias is None else bias.to(acc, copy=True)
    return scale, shift


def _side_grads(sum_g, sum_gx, scale, var, eps, count, training, affine_mean):
    if var is not None:  # a BatchNorm: (grad_weight, grad_bias) and its (k_x, k_c)
        invstd = torch.rsqrt(var + eps)
        k_x = -scale * invstd * invstd * sum_gx / count if training else torch.zeros_like(scale)
        k_c = -scale * sum_g / count if training else torch.zeros_like(scale)
        return (sum_gx * invstd, sum_g.clone()), k_x, k_c
    if affine_mean:
        return (-scale * sum_g, sum_gx, sum_g.clone()), None, None
    return (sum_gx,), None, None


def backward(dy, x, mean, scale, shift, var, eps, residual, xb, mean_b, scale_b, shift_b, var_b, eps_b, relu,
             training, want_grad_residual):
    """The backward of act(side_a(x) [+ residual | + side_b(xb)]) (see fusedres.triton.bn_act.backward):
    (dx, dxb | None, grad_residual | None, grads_a, grads_b)."""
    sum_g, sum_gx, sum_gxb, d_res = backward_reduce(dy, x, mean, scale, shift, residual, xb, mean_b, scale_b,
                                                    shift_b, relu, want_grad_residual)
    count = x.shape[0] * x.shape[2] * x.shape[3]
    grads_a, k_x, k_c = _side_grads(sum_g, sum_gx, scale, var, eps, count, training, True)
    grads_b, k_x_b, k_c_b = ((), None, None) if xb is None else _side_grads(
        sum_g, sum_gxb, scale_b, var_b, eps_b, count, training, mean_b is not None)
    dx, dxb = backward_apply(dy, x, mean, scale, shift, residual, xb, mean_b, scale_b, shift_b, relu, scale, k_x,
                             k_c, scale_b, k_x_b, k_c_b)
    return dx, dxb, d_res, grads_a, grads_b


# ================================================================ conv_bn_act (single-pass convolution)
# Appended section owned by the conv work; see fusedres/ops/conv_bn_act.py for the op.
def conv_bn_act_reference(x, weight, in_scale=None, in_shift=None, in_relu=False, out_scale=None,
                          out_shift=None, residual=None, res_scale=None, res_shift=None, relu=False, stride=1,
                          padding=0, dilation=1, groups=1, stats=False, channels_last=True):
    """(y, mean, var) of the fused conv with stock ops, computed in the accumulation dtype (float64 for float64
    inputs); y in x's dtype and channels_last, mean/var the biased batch statistics of the raw conv output
    (empty when `stats` is False). Autograd flows through it (tests differentiate it in float64).

        a = act_in(x * in_scale + in_shift)     (zero padding applied to a, i.e. after the prologue)
        c = conv2d(a, weight)
        y = act(c * out_scale + out_shift + residual * res_scale + res_shift)
    """
    acc = acc_dtype(x.dtype)
    a = x.to(acc)
    if in_scale is not None or in_shift is not None:
        if in_scale is not None:
            a = a * _channel(in_scale.to(acc))
        if in_shift is not None:
            a = a + _channel(in_shift.to(acc))
        if in_relu:
            a = torch.relu(a)
    c = F.conv2d(a, weight.to(acc), None, stride, padding, dilation, groups)
    z = c
    if out_scale is not None:
        z = z * _channel(out_scale.to(acc))
    if out_shift is not None:
        z = z + _channel(out_shift.to(acc))
    if residual is not None:
        r = residual.to(acc)
        if res_scale is not None:
            r = r * _channel(res_scale.to(acc))
        if res_shift is not None:
            r = r + _channel(res_shift.to(acc))
        z = z + r
    if relu:
        z = torch.relu(z)
    y = z.to(x.dtype)
    if channels_last:  # as the kernel writes it; False keeps F.conv2d's layout (vmap cannot set channels_last)
        y = y.contiguous(memory_format=torch.channels_last)
    if not stats:
        e = x.new_empty(0, dtype=acc)
        return y, e, e
    if c.numel() == 0:  # no values: zeros (finite, so an empty batch's BatchNorm has zero gradients)
        return y, c.new_zeros(c.shape[1]), c.new_zeros(c.shape[1])
    var, mean = torch.var_mean(c, dim=_DIMS, unbiased=False)
    return y, mean, var
