"""`conv_bn_act`: a convolution with a fused scale-shift-ReLU prologue and a fused scale-shift / residual / ReLU /
BN-statistics epilogue, in one pass over the input (Triton implicit GEMM; plain-torch reference elsewhere).

    a = act_in(x * in_scale[c] + in_shift[c])            (prologue; zero padding is applied to a)
    c = conv2d(a, weight, stride, padding, dilation, groups)
    y = act(c * out_scale[k] + out_shift[k] [+ residual * res_scale[k] + res_shift[k]])
    mean, var = biased per-channel batch statistics of c   (stats=True; else empty tensors)

Registered op (torch.ops.fusedres.*):
    conv_bn_act(x, weight, in_scale, in_shift, out_scale, out_shift, residual, res_scale, res_shift,
                stride, padding, dilation, groups, in_relu, relu, stats, allow_tf32) -> (y, mean, var)
y is channels_last in x's dtype; mean/var are float32 (float64 for float64 inputs). Backward: plain torch for
the prologue/epilogue derivatives plus `aten.convolution_backward` for dgrad/wgrad; the prologue output is
recomputed from x, the ReLU mask from y, and the raw conv output c is taken from y when the epilogue is empty
(the training-mode case) or recomputed by one convolution otherwise, so no extra activation is saved.
Gradients flow into mean and var (the BN that consumes them differentiates through its statistics).
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch
from torch import Tensor

from fusedres import backends
from fusedres._layout import acc_dtype
from fusedres.ops._common import check_activation, check_channels, check_flag
from fusedres.ops._transforms import refuse_forward_ad, transformed

_DIMS = (0, 2, 3)


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _pair(v, name: str) -> list[int]:
    """An int or a sequence of one or two ints (as F.conv2d) as [h, w]; string padding modes are refused."""
    if _is_int(v):
        return [int(v), int(v)]
    if isinstance(v, (str, bytes)) or not isinstance(v, (tuple, list, torch.Size)) \
            or not all(_is_int(i) for i in v):
        raise TypeError(f"fusedres: conv_bn_act {name} must be an int or a pair of ints, got {v!r}")
    v = [int(i) for i in v]
    if len(v) == 1:
        return v * 2
    if len(v) != 2:
        raise ValueError(f"fusedres: conv_bn_act {name} must be an int or a pair of ints, got {len(v)} values {v}")
    return v


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
           dilation, groups, in_relu=False):
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
    if not _is_int(groups):
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
    for v, name in ((in_scale, "in_scale"), (in_shift, "in_shift")):
        check_channels(v, xc, name)
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
    if in_relu and in_scale is None and in_shift is None:
        raise ValueError("fusedres: conv_bn_act in_relu=True needs a prologue (in_scale and/or in_shift); "
                         "got neither")
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


@torch.library.custom_op("fusedres::conv_bn_act", mutates_args=())
def conv_bn_act_op(x: Tensor, weight: Tensor, in_scale: Optional[Tensor], in_shift: Optional[Tensor],
                   out_scale: Optional[Tensor], out_shift: Optional[Tensor], residual: Optional[Tensor],
                   res_scale: Optional[Tensor], res_shift: Optional[Tensor], stride: list[int], padding: list[int],
                   dilation: list[int], groups: int, in_relu: bool, relu: bool, stats: bool,
                   allow_tf32: bool) -> tuple[Tensor, Tensor, Tensor]:
    refuse_forward_ad("conv_bn_act")
    _check(x, weight, in_scale, in_shift, out_scale, out_shift, residual, res_scale, res_shift, stride, padding,
           dilation, groups, in_relu)
    if x.numel() == 0:
        return _empty_batch(x, weight, stride, padding, dilation, stats)
    if _use_triton(x):
        return _triton_module().conv_bn_act(x, weight, in_scale, in_shift, in_relu, out_scale, out_shift, residual,
                                 res_scale, res_shift, relu, stride, padding, dilation, groups, stats, allow_tf32)
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
      dilation, groups, in_relu, relu, stats, allow_tf32):
    oh, ow = _check(x, weight, in_scale, in_shift, out_scale, out_shift, residual, res_scale, res_shift, stride,
                    padding, dilation, groups, in_relu)
    y = torch.empty((x.shape[0], weight.shape[0], oh, ow), dtype=x.dtype, device=x.device,
                    memory_format=torch.channels_last)
    c = weight.shape[0] if stats else 0
    acc = acc_dtype(x.dtype)
    return y, x.new_empty((c,), dtype=acc), x.new_empty((c,), dtype=acc)


def _save(ctx, inputs, output):
    (x, weight, in_scale, in_shift, out_scale, out_shift, residual, res_scale, res_shift, stride, padding,
     dilation, groups, in_relu, relu, stats, allow_tf32) = inputs
    y, mean, _ = output
    ctx.plain = out_scale is None and out_shift is None and residual is None and not relu
    ctx.save_for_backward(x, weight, in_scale, in_shift, out_scale, out_shift, residual, res_scale, res_shift,
                          y if (relu or ctx.plain) else None, mean)
    ctx.conv = (list(stride), list(padding), list(dilation), groups)
    ctx.in_relu, ctx.relu, ctx.stats = in_relu, relu, stats


def _ch(v, dtype):
    return v.to(dtype).view(1, -1, 1, 1)


def _cast(g, like):
    return None if like is None or g is None else g.to(like.dtype)


def _backward(ctx, gy, gmean, gvar):
    x, w, s_in, t_in, s_out, t_out, r, s_r, t_r, y, mean = ctx.saved_tensors
    need = ctx.needs_input_grad
    stride, padding, dilation, groups = ctx.conv
    acc = acc_dtype(x.dtype)
    wx = w.to(x.dtype)
    prologue = s_in is not None or t_in is not None
    a = x
    if prologue:
        u = x.to(acc)
        if s_in is not None:
            u = u * _ch(s_in, acc)
        if t_in is not None:
            u = u + _ch(t_in, acc)
        a = (torch.relu(u) if ctx.in_relu else u).to(x.dtype)
    gz = gy.to(acc)
    if ctx.relu:
        gz = torch.where(y <= 0, torch.zeros_like(gz), gz)  # torch.relu's backward (NaN passes)
    count = x.shape[0] * gy.shape[2] * gy.shape[3]
    need_c = (ctx.stats and gvar is not None) or (s_out is not None and need[4])
    c = None
    if need_c:
        if ctx.plain:
            c = y.to(acc)
        else:
            c = torch.ops.aten.convolution(a, wx, None, stride, padding, dilation, False, [0, 0], groups).to(acc)
    dc = gz * _ch(s_out, acc) if s_out is not None else gz
    if ctx.stats and (gmean is not None or gvar is not None):
        # d mean / dc = 1 / count, d var / dc = 2 (c - mean) / count (one tensor-by-int division: traceable
        # with symbolic shapes)
        d_stats = 0
        if gmean is not None:
            d_stats = _ch(gmean, acc)
        if gvar is not None:
            d_stats = d_stats + 2 * _ch(gvar, acc) * (c - _ch(mean, acc))
        dc = dc + d_stats / count
    grads = [None] * 17
    if s_out is not None and need[4]:
        grads[4] = _cast((gz * c).sum(_DIMS), s_out)
    if t_out is not None and need[5]:
        grads[5] = _cast(gz.sum(_DIMS), t_out)
    if r is not None:
        if need[6]:
            grads[6] = (gz * _ch(s_r, acc) if s_r is not None else gz).to(r.dtype)
        if s_r is not None and need[7]:
            grads[7] = _cast((gz * r.to(acc)).sum(_DIMS), s_r)
        if t_r is not None and need[8]:
            grads[8] = _cast(gz.sum(_DIMS), t_r)
    want_a = need[0] or (prologue and (need[2] or need[3]))
    if want_a or need[1]:
        da, dw, _ = torch.ops.aten.convolution_backward(dc.to(x.dtype), a, wx, None, stride, padding, dilation,
                                                        False, [0, 0], groups, [want_a, need[1], False])
        if need[1]:
            grads[1] = dw.to(w.dtype)
        if want_a:
            if prologue:
                gu = da.to(acc)
                if ctx.in_relu:
                    gu = torch.where(u <= 0, torch.zeros_like(gu), gu)
                if need[0]:
                    grads[0] = (gu * _ch(s_in, acc) if s_in is not None else gu).to(x.dtype)
                if s_in is not None and need[2]:
                    grads[2] = _cast((gu * x.to(acc)).sum(_DIMS), s_in)
                if t_in is not None and need[3]:
                    grads[3] = _cast(gu.sum(_DIMS), t_in)
            else:
                grads[0] = da
    return tuple(grads)


conv_bn_act_op.register_autograd(_backward, setup_context=_save)


def _autocast(x, residual):
    """Under torch.autocast the convolution runs in the autocast dtype, as F.conv2d does there: float32
    activations (and residual) are cast; weights are cast by the kernels, per-channel vectors stay float32."""
    if not isinstance(x, Tensor) or not torch.is_autocast_enabled(x.device.type) or x.dtype != torch.float32:
        return x, residual
    dtype = torch.get_autocast_dtype(x.device.type)
    cast = lambda t: t.to(dtype) if isinstance(t, Tensor) and t.dtype == torch.float32 else t  # noqa: E731
    return cast(x), cast(residual)


def conv_bn_act(x: Tensor, weight: Tensor, *, stride=1, padding=0, dilation=1, groups: int = 1,
                in_scale: Optional[Tensor] = None, in_shift: Optional[Tensor] = None, in_relu: bool = False,
                out_scale: Optional[Tensor] = None, out_shift: Optional[Tensor] = None,
                residual: Optional[Tensor] = None, res_scale: Optional[Tensor] = None,
                res_shift: Optional[Tensor] = None, relu: bool = False, stats: bool = False,
                allow_tf32: Optional[bool] = None):
    """The fused convolution (module docstring). Returns y, or (y, mean, var) when `stats`. `allow_tf32`
    (float32 inputs only) defaults to `torch.backends.cudnn.allow_tf32`, as `F.conv2d` does; False computes
    exact float32 products. Under torch.func transforms or forward-mode AD it runs the same math with stock
    ops (`fusedres.reference.conv_bn_act_reference`, F.conv2d)."""
    if allow_tf32 is None:
        allow_tf32 = bool(torch.backends.cudnn.allow_tf32)
    x, residual = _autocast(x, residual)
    for v, name in ((in_relu, "in_relu"), (relu, "relu"), (stats, "stats"), (allow_tf32, "allow_tf32")):
        check_flag(v, name)
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    # checked here too (not only inside the op) so a wrong argument type gets this message, not the dispatcher's
    _check(x, weight, in_scale, in_shift, out_scale, out_shift, residual, res_scale, res_shift, stride, padding,
           dilation, groups, in_relu)
    if transformed(x, weight, in_scale, in_shift, out_scale, out_shift, residual, res_scale, res_shift):
        from fusedres.reference import conv_bn_act_reference

        y, mean, var = conv_bn_act_reference(x, weight, in_scale, in_shift, in_relu, out_scale, out_shift, residual,
                                             res_scale, res_shift, relu, stride, padding, dilation, groups, stats,
                                             channels_last=False)
        return (y, mean, var) if stats else y
    y, mean, var = torch.ops.fusedres.conv_bn_act(x, weight, in_scale, in_shift, out_scale, out_shift, residual,
                                                  res_scale, res_shift, stride, padding, dilation, groups,
                                                  in_relu, relu, stats, allow_tf32)
    return (y, mean, var) if stats else y
