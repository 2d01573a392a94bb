"""`conv_bn_act`: a convolution with a fused scale-shift-ReLU prologue and a fused scale-shift / residual / ReLU /
BN-statistics epilogue, in one pass over the input (Triton implicit GEMM; plain-torch reference elsewhere).

    a = act_in(x * in_scale[c] + in_shift[c])            (prologue; zero padding is applied to a)
    c = conv2d(a, weight, stride, padding, dilation, groups)
    y = act(c * out_scale[k] + out_shift[k] [+ residual * res_scale[k] + res_shift[k]])
    mean, var = biased per-channel batch statistics of c   (stats=True; else empty tensors)

Registered op (torch.ops.fusedres.*):
    conv_bn_act(x, weight, in_scale, in_shift, out_scale, out_shift, residual, res_scale, res_shift,
                stride, padding, dilation, groups, in_relu, relu, stats, allow_tf32,
                in_weight=None, in_bias=None, in_mean=None, in_var=None, in_eps=1e-5) -> (y, mean, var)
y is channels_last in x's dtype; mean/var are float32 (float64 for float64 inputs). A BatchNorm prologue
(in_mean / in_var: x's batch statistics, in_weight / in_bias its affine) replaces in_scale / in_shift; its
backward is BatchNorm's training backward with the statistics' gradient folded into dx (none returned for
in_mean / in_var). Backward (`_backward`): the prologue output materialised once in x's dtype,
`aten.convolution_backward` for dgrad/wgrad, the prologue's backward as one reduction + one elementwise pass
of the backends' BN kernels (docs/conv_bn_act.md counts the passes). Gradients flow into mean and var.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fusedres import backends
from fusedres._layout import acc_dtype
from fusedres.ops import batch_stats as _batch_stats, bn_act as _bn_act  # noqa: F401  (ops used in backward)
from fusedres.ops import scale_shift_act as _scale_shift_act  # noqa: F401
from fusedres.ops._common import (check_activation, check_channels, check_eps, check_flag, int_pair, is_int,
                                  scale_shift)
from fusedres.ops._transforms import refuse_forward_ad, transformed

_DIMS = (0, 2, 3)


def _out_hw(x, weight, stride, padding, dilation):
    kh, kw = weight.shape[2], weight.shape[3]
    oh = (x.shape[2] + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (x.shape[3] + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return oh, ow


class _Named:
    """A stand-in with .shape[1] = c for check_channels."""

    def __init__(self, like, c):
        self.shape = (like.shape[0], c)
        self.device = like.device


def _check(x, weight, in_scale, in_shift, out_scale, out_shift, residual, res_scale, res_shift, stride, padding,
           dilation, groups, in_relu=False, in_weight=None, in_bias=None, in_mean=None, in_var=None, in_eps=1e-5):
    check_activation(x, "x")
    if not isinstance(weight, Tensor):
        raise TypeError(f"fusedres: conv weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 4:
        raise ValueError(f"fusedres: conv weight must be a 4-D tensor [C_out, C_in/groups, KH, KW], got "
                         f"{getattr(weight, 'shape', type(weight).__name__)}")
    if weight.device != x.device:
        raise ValueError(f"fusedres: weight is on {weight.device} but x is on {x.device}")
    if not weight.is_floating_point():
        raise TypeError(f"fusedres: weight must be floating, got {weight.dtype}")
    c_out = weight.shape[0]
    if not is_int(groups):
        raise TypeError(f"fusedres: conv_bn_act groups must be an int, got {type(groups).__name__} {groups!r}")
    if groups < 1 or x.shape[1] != weight.shape[1] * groups or c_out % groups:
        raise ValueError(f"fusedres: x has {x.shape[1]} channels, weight {tuple(weight.shape)}, groups={groups}: "
                         f"need C_in == weight.shape[1] * groups and C_out % groups == 0")
    for v, name, low in ((stride, "stride", 1), (dilation, "dilation", 1), (padding, "padding", 0)):
        if min(v) < low:
            raise ValueError(f"fusedres: conv_bn_act {name} must be >= {low}, got {list(v)}")
    oh, ow = _out_hw(x, weight, stride, padding, dilation)
    if oh < 1 or ow < 1:
        raise ValueError(f"fusedres: conv output would be empty ({oh}x{ow}) for input {tuple(x.shape)}")
    xc = _Named(x, x.shape[1])
    for v, name in ((in_scale, "in_scale"), (in_shift, "in_shift"), (in_weight, "in_weight"), (in_bias, "in_bias"),
                    (in_mean, "in_mean"), (in_var, "in_var")):
        check_channels(v, xc, name)
    bn_prologue = in_mean is not None or in_var is not None
    if bn_prologue:
        if in_mean is None or in_var is None:
            raise ValueError("fusedres: conv_bn_act needs both in_mean and in_var (a BatchNorm prologue), got one")
        if (in_scale is None) != (in_shift is None) or any(
                isinstance(v, Tensor) and v.requires_grad for v in (in_scale, in_shift)):
            raise ValueError("fusedres: with a BatchNorm prologue (in_mean, in_var, in_weight, in_bias), in_scale "
                             "and in_shift are optional and, if given, both: its precomputed x * in_scale + in_shift "
                             "form (no gradient of their own; e.g. fusedres::bn_finalize(centred=True))")
        check_eps(in_eps, True, "in_eps")
    elif in_weight is not None or in_bias is not None:
        raise ValueError("fusedres: conv_bn_act in_weight / in_bias need in_mean and in_var (a BatchNorm prologue)")
    yc = _Named(x, c_out)
    for v, name in ((out_scale, "out_scale"), (out_shift, "out_shift"), (res_scale, "res_scale"),
                    (res_shift, "res_shift")):
        check_channels(v, yc, name)
    if residual is not None:
        check_activation(residual, "residual")
        want = (x.shape[0], c_out, oh, ow)
        if tuple(residual.shape) != want:
            raise ValueError(f"fusedres: residual shape {tuple(residual.shape)} != conv output shape {want}")
        if residual.device != x.device:
            raise ValueError(f"fusedres: residual is on {residual.device} but x is on {x.device}")
    elif res_scale is not None or res_shift is not None:
        raise ValueError("fusedres: res_scale / res_shift given without a residual")
    if in_relu and in_scale is None and in_shift is None and not bn_prologue:
        raise ValueError("fusedres: conv_bn_act in_relu=True needs a prologue (in_scale and/or in_shift, or "
                         "in_mean and in_var); got none")
    return oh, ow


def _triton_module():
    try:
        from fusedres.triton import conv_bn_act as module
    except ImportError:  # triton missing
        return None
    return module


def _use_triton(x) -> bool:
    """Triton unless the reference backend is forced or Triton refuses x (float64, CPU without the
    interpreter); there is no CUDA-backend conv, so a forced 'cuda' runs the Triton conv. A forced 'triton' or
    'cuda' that Triton refuses raises BackendUnavailable, as the other ops do."""
    forced = backends.forced_backend()
    if forced == "reference":
        return False
    module = _triton_module()
    reasons = ["the Triton conv is not available (triton is not installed)"] if module is None \
        else module.not_supported_reasons(x)
    if reasons and forced is not None:
        raise backends.BackendUnavailable(f"fusedres backend {forced!r} was forced but the conv_bn_act Triton "
                                          f"kernel cannot run this input: " + "; ".join(reasons))
    return not reasons


def _bn_prologue(x, in_weight, in_bias, in_mean, in_var, in_eps):
    """(mean, scale, shift) of the BatchNorm prologue: BN(x) = (x - mean) * scale + shift, in the accumulation
    dtype, by torch ops (the reference path and torch.func transforms)."""
    acc = acc_dtype(x.dtype)
    mean = in_mean.to(acc)
    _, scale, shift = scale_shift(mean, in_var.to(acc), in_weight, in_bias, in_eps)
    return mean, scale, shift


@torch.library.custom_op("fusedres::conv_bn_act", mutates_args=())
def conv_bn_act_op(x: Tensor, weight: Tensor, in_scale: Optional[Tensor], in_shift: Optional[Tensor],
                   out_scale: Optional[Tensor], out_shift: Optional[Tensor], residual: Optional[Tensor],
                   res_scale: Optional[Tensor], res_shift: Optional[Tensor], stride: list[int], padding: list[int],
                   dilation: list[int], groups: int, in_relu: bool, relu: bool, stats: bool,
                   allow_tf32: bool, in_weight: Optional[Tensor] = None, in_bias: Optional[Tensor] = None,
                   in_mean: Optional[Tensor] = None, in_var: Optional[Tensor] = None,
                   in_eps: float = 1e-5) -> tuple[Tensor, Tensor, Tensor]:
    refuse_forward_ad("conv_bn_act")
    _check(x, weight, in_scale, in_shift, out_scale, out_shift, residual, res_scale, res_shift, stride, padding,
           dilation, groups, in_relu, in_weight, in_bias, in_mean, in_var, in_eps)
    if x.numel() == 0:
        return _empty_batch(x, weight, stride, padding, dilation, stats)
    if in_mean is not None and in_scale is None:  # BN prologue: BN(x) = x * scale + (shift - mean * scale)
        in_scale, in_shift = torch.ops.fusedres.bn_finalize(x, in_mean, in_var, in_weight, in_bias, in_eps, None,
                                                            None, None, 0.0, True)  # one launch
    if _use_triton(x):
        return _triton_module().conv_bn_act(x, weight, in_scale, in_shift, in_relu, out_scale, out_shift, residual,
                                            res_scale, res_shift, relu, stride, padding, dilation, groups, stats,
                                            allow_tf32)
    from fusedres.reference import conv_bn_act_reference

    with torch.no_grad():
        y, mean, var = conv_bn_act_reference(x, weight, in_scale, in_shift, in_relu, out_scale, out_shift,
                                             residual, res_scale, res_shift, relu, stride, padding, dilation,
                                             groups, stats)
    return y.clone() if y is x else y, mean, var.clone() if var is mean else var


def _empty_batch(x, weight, stride, padding, dilation, stats):
    """An empty batch's (y, mean, var), as the reference gives them: an empty y and, when `stats`, zeros for
    the statistics of no values (finite, so a BatchNorm over the empty batch has zero parameter gradients, as
    stock's)."""
    oh, ow = _out_hw(x, weight, stride, padding, dilation)
    y = torch.empty((x.shape[0], weight.shape[0], oh, ow), dtype=x.dtype, device=x.device,
                    memory_format=torch.channels_last)
    c = weight.shape[0] if stats else 0
    acc = acc_dtype(x.dtype)
    return y, x.new_zeros((c,), dtype=acc), x.new_zeros((c,), dtype=acc)


@conv_bn_act_op.register_fake
def _(x, weight, in_scale, in_shift, out_scale, out_shift, residual, res_scale, res_shift, stride, padding,
      dilation, groups, in_relu, relu, stats, allow_tf32, in_weight=None, in_bias=None, in_mean=None, in_var=None,
      in_eps=1e-5):
    oh, ow = _check(x, weight, in_scale, in_shift, out_scale, out_shift, residual, res_scale, res_shift, stride,
                    padding, dilation, groups, in_relu, in_weight, in_bias, in_mean, in_var, in_eps)
    y = torch.empty((x.shape[0], weight.shape[0], oh, ow), dtype=x.dtype, device=x.device,
                    memory_format=torch.channels_last)
    c = weight.shape[0] if stats else 0
    acc = acc_dtype(x.dtype)
    return y, x.new_empty((c,), dtype=acc), x.new_empty((c,), dtype=acc)


def _save(ctx, inputs, output):
    (x, weight, in_scale, in_shift, out_scale, out_shift, residual, res_scale, res_shift, stride, padding,
     dilation, groups, in_relu, relu, stats, allow_tf32, in_weight, in_bias, in_mean, in_var, in_eps) = inputs
    y, mean, _ = output
    ctx.plain = out_scale is None and out_shift is None and residual is None and not relu
    ctx.save_for_backward(x, weight, in_scale, in_shift, out_scale, out_shift, residual, res_scale, res_shift,
                          y if (relu or ctx.plain) else None, mean if stats else None, in_weight, in_bias, in_mean,
                          in_var)
    ctx.conv = (list(stride), list(padding), list(dilation), groups)
    ctx.in_relu, ctx.relu, ctx.stats, ctx.in_eps = in_relu, relu, stats, in_eps
    ctx.set_materialize_grads(False)  # an unused mean / var gets None, not a zero tensor to add


def _ch(v, dtype):
    return v.to(dtype).view(1, -1, 1, 1)


def _cast(g, like):
    return None if like is None or g is None else g.to(like.dtype)


def _epilogue_grad(ctx, gy, x, w, s_out, t_out, r, s_r, t_r, y, mean, gmean, gvar, a):
    """The gradient dc of the raw conv output c (x's dtype), and the epilogue vectors' and residual's gradients
    (by input index). The training blocks' convs have a plain epilogue and their statistics get no gradient
    (the consumers fold it into BatchNorm's backward): then dc is gy itself, no pass. Otherwise a few torch
    ops, and c itself, where needed and not saved (out_scale's or the statistics' gradient behind a non-empty
    epilogue), is recomputed by one convolution — paths no fusedres model takes in training."""
    need = ctx.needs_input_grad
    grads = {}
    stride, padding, dilation, groups = ctx.conv
    acc = acc_dtype(x.dtype)
    count = gy.shape[0] * gy.shape[2] * gy.shape[3]
    stats_grad = ctx.stats and (gmean is not None or gvar is not None)
    if ctx.plain and not stats_grad:
        return gy, grads
    gz = torch.ops.aten.threshold_backward(gy, y, 0) if ctx.relu else gy  # torch.relu's backward
    if r is not None and need[6]:
        grads[6] = (gz.to(acc) * _ch(s_r, acc)).to(r.dtype) if s_r is not None else gz
    if t_out is not None and need[5]:
        grads[5] = _cast(gz.sum(_DIMS, dtype=acc), t_out)
    if r is not None:
        if s_r is not None and need[7]:
            grads[7] = _cast((gz.to(acc) * r.to(acc)).sum(_DIMS), s_r)
        if t_r is not None and need[8]:
            grads[8] = _cast(gz.sum(_DIMS, dtype=acc), t_r)
    need_c = (stats_grad and gvar is not None) or (s_out is not None and need[4])
    if not (need_c or stats_grad or s_out is not None):
        return gz, grads
    c = None
    if need_c:
        c = y.to(acc) if ctx.plain else torch.ops.aten.convolution(a, w.to(x.dtype), None, stride, padding,
                                                                   dilation, False, [0, 0], groups).to(acc)
    gzf = gz.to(acc)
    if s_out is not None and need[4]:
        grads[4] = _cast((gzf * c).sum(_DIMS), s_out)
    dc = gzf * _ch(s_out, acc) if s_out is not None else gzf
    if stats_grad:  # d mean / dc = 1 / count, d var / dc = 2 (c - mean) / count
        d_stats = 0
        if gmean is not None:
            d_stats = _ch(gmean, acc)
        if gvar is not None:
            d_stats = d_stats + 2 * _ch(gvar, acc) * (c - _ch(mean, acc))
        dc = dc + d_stats / count
    return dc.to(x.dtype), grads


def _backward(ctx, gy, gmean, gvar):
    """dgrad / wgrad by `aten.convolution_backward` (cuDNN on GPU) with the prologue output materialised once
    in x's dtype (one elementwise pass), and the prologue's backward as one reduction + one elementwise pass of
    the backends' BN-backward kernels: for a BatchNorm prologue the full training-mode BatchNorm + ReLU
    backward (`bn_act_backward`: the gradient through the batch statistics in_mean / in_var is folded into dx,
    and none is returned for them); for an (in_scale, in_shift) prologue dx = relu'(u) * da * in_scale and the
    per-channel sums of the vectors' gradients."""
    (x, w, s_in, t_in, s_out, t_out, r, s_r, t_r, y, mean, in_w, in_b, in_mean, in_var) = ctx.saved_tensors
    need = ctx.needs_input_grad
    stride, padding, dilation, groups = ctx.conv
    acc = acc_dtype(x.dtype)
    if gy is None:  # only the statistics were used
        oh, ow = _out_hw(x, w, stride, padding, dilation)
        gy = x.new_zeros((x.shape[0], w.shape[0], oh, ow)).contiguous(memory_format=torch.channels_last)
    bn_prologue = in_mean is not None
    prologue = bn_prologue or s_in is not None or t_in is not None
    a = x
    if prologue:  # the prologue output, once, in x's dtype and layout
        if bn_prologue:
            p_mean = in_mean.to(acc)
            if s_in is not None:  # the forward's precomputed form: scale, and shift = bias
                p_scale = s_in.to(acc)
                p_shift = in_b.to(acc) if in_b is not None else torch.zeros_like(p_scale)
            else:  # one launch (a registered op: this formula must stay traceable)
                p_scale, p_shift = torch.ops.fusedres.bn_params(x, p_mean, in_var.to(acc), in_w, in_b, ctx.in_eps)
        else:
            zero = torch.zeros(x.shape[1], dtype=acc, device=x.device)
            p_mean = zero
            p_scale = torch.ones_like(zero) if s_in is None else s_in.to(acc)
            p_shift = zero if t_in is None else t_in.to(acc)
        a = torch.ops.fusedres.scale_shift_act(x, p_mean, p_scale, p_shift, None, None, None, None, None,
                                               ctx.in_relu)
    dc, grads = _epilogue_grad(ctx, gy, x, w, s_out, t_out, r, s_r, t_r, y, mean, gmean, gvar, a)
    out = [None] * 22
    for i, g in grads.items():
        out[i] = g
    for i, like in ((4, s_out), (5, t_out), (7, s_r), (8, t_r)):
        out[i] = _cast(out[i], like)
    want_a = need[0] or (prologue and any(need[i] for i in (2, 3, 17, 18)))
    if not (want_a or need[1]):
        return tuple(out)
    wx = w.to(x.dtype)
    da, dw, _ = torch.ops.aten.convolution_backward(dc.to(x.dtype), a, wx, None, stride, padding, dilation,
                                                    False, [0, 0], groups, [want_a, need[1], False])
    if need[1]:
        out[1] = dw.to(w.dtype)
    if not want_a:
        return tuple(out)
    if not prologue:
        out[0] = da
        return tuple(out)
    da = da.to(x.dtype)
    if bn_prologue:
        dx, d_w, d_b, _, _ = torch.ops.fusedres.bn_act_backward(da, x, in_w, in_b, None, in_mean, in_var,
                                                                p_scale, p_shift, ctx.in_eps, ctx.in_relu, True,
                                                                False)
        out[0] = dx if need[0] else None
        out[17], out[18] = _cast(d_w if need[17] else None, in_w), _cast(d_b if need[18] else None, in_b)
        return tuple(out)
    # dx = relu'(u) * da * in_scale; d in_scale = sum(relu'(u) * da * x), d in_shift = sum(relu'(u) * da)
    dx, _, d_s, d_t = torch.ops.fusedres.scale_shift_act_backward(da, x, p_mean, p_scale, p_shift, None, None,
                                                                  None, None, None, ctx.in_relu)[:4]
    out[0] = dx if need[0] else None
    out[2], out[3] = _cast(d_s if need[2] else None, s_in), _cast(d_t if need[3] else None, t_in)
    return tuple(out)


conv_bn_act_op.register_autograd(_backward, setup_context=_save)


def _autocast(x, weight, residual):
    """Under torch.autocast the convolution runs in the autocast dtype, as F.conv2d does there: float32
    activations, residual and weight are cast (the weight by a differentiable cast outside the op, as autocast
    casts it for F.conv2d, so the op saves the cast weight and its backward needs no second cast); per-channel
    vectors stay float32."""
    if not isinstance(x, Tensor) or not torch.is_autocast_enabled(x.device.type):
        return x, weight, residual
    dtype = torch.get_autocast_dtype(x.device.type)
    cast = lambda t: t.to(dtype) if isinstance(t, Tensor) and t.dtype == torch.float32 else t  # noqa: E731
    if x.dtype == torch.float32:
        x, residual = cast(x), cast(residual)
    return x, (cast(weight) if x.dtype == dtype else weight), residual


def conv_bn_act(x: Tensor, weight: Tensor, *, stride=1, padding=0, dilation=1, groups: int = 1,
                in_scale: Optional[Tensor] = None, in_shift: Optional[Tensor] = None, in_relu: bool = False,
                out_scale: Optional[Tensor] = None, out_shift: Optional[Tensor] = None,
                residual: Optional[Tensor] = None, res_scale: Optional[Tensor] = None,
                res_shift: Optional[Tensor] = None, relu: bool = False, stats: bool = False,
                allow_tf32: Optional[bool] = None, in_stats=None, in_weight: Optional[Tensor] = None,
                in_bias: Optional[Tensor] = None, in_eps: float = 1e-5):
    """The fused convolution (module docstring). Returns y, or (y, mean, var) when `stats`. `allow_tf32`
    (float32 inputs only) defaults to `torch.backends.cudnn.allow_tf32`, as `F.conv2d` does; False computes
    exact float32 products. `in_stats=(mean, var)`: a training-mode BatchNorm prologue with x's batch statistics
    (e.g. the previous conv's `stats=True` outputs), `in_weight` / `in_bias` / `in_eps` its affine and eps; its
    backward is BatchNorm's, gradient through the statistics included, and returns none for mean and var. Under
    torch.func transforms or forward-mode AD it runs the same math with stock ops
    (`fusedres.reference.conv_bn_act_reference`, F.conv2d)."""
    if allow_tf32 is None:
        allow_tf32 = bool(torch.backends.cudnn.allow_tf32)
    x, weight, residual = _autocast(x, weight, residual)
    for v, name in ((in_relu, "in_relu"), (relu, "relu"), (stats, "stats"), (allow_tf32, "allow_tf32")):
        check_flag(v, name)
    in_mean = in_var = None
    if in_stats is not None:
        if not isinstance(in_stats, (tuple, list)) or len(in_stats) != 2:
            raise TypeError(f"fusedres: conv_bn_act in_stats must be a (mean, var) pair, got {in_stats!r}")
        in_mean, in_var = in_stats
    stride = int_pair(stride, "conv_bn_act", "stride")
    padding = int_pair(padding, "conv_bn_act", "padding")
    dilation = int_pair(dilation, "conv_bn_act", "dilation")
    # checked here too (not only inside the op) so a wrong argument type gets this message, not the dispatcher's
    _check(x, weight, in_scale, in_shift, out_scale, out_shift, residual, res_scale, res_shift, stride, padding,
           dilation, groups, in_relu, in_weight, in_bias, in_mean, in_var, in_eps)
    if transformed(x, weight, in_scale, in_shift, out_scale, out_shift, residual, res_scale, res_shift, in_weight,
                   in_bias, in_mean, in_var):
        from fusedres.reference import conv_bn_act_reference

        if in_mean is not None:  # the BatchNorm prologue as differentiable torch math on the given statistics
            mean, in_scale, shift = _bn_prologue(x, in_weight, in_bias, in_mean, in_var, in_eps)
            in_shift = shift - mean * in_scale
        y, mean, var = conv_bn_act_reference(x, weight, in_scale, in_shift, in_relu, out_scale, out_shift, residual,
                                             res_scale, res_shift, relu, stride, padding, dilation, groups, stats,
                                             channels_last=False)
        return (y, mean, var) if stats else y
    y, mean, var = torch.ops.fusedres.conv_bn_act(x, weight, in_scale, in_shift, out_scale, out_shift, residual,
                                                  res_scale, res_shift, stride, padding, dilation, groups,
                                                  in_relu, relu, stats, allow_tf32, in_weight, in_bias, in_mean,
                                                  in_var, float(in_eps) if in_mean is not None else 1e-5)
    return (y, mean, var) if stats else y
