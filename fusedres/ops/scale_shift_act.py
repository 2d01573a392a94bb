"""`scale_shift_act`: y = act((x - mean) * scale + shift [+ residual | + (xb - mean_b) * scale_b + shift_b |
+ xb * scale_b]) with
per-channel vectors that are *differentiable inputs* — the BN-apply of a block tail whose batch statistics
came from the conv epilogue (`conv_bn_act(stats=True)`), so the tail is one read of the conv output instead
of a statistics pass plus an apply pass. Gradients flow into mean/scale/shift (and the xb ones), hence back
through the statistics into the conv, as BatchNorm's do.

Registered ops (torch.ops.fusedres.*), built on the dispatcher's primitives (cuda → triton → reference); one
launch forward, three backward (reduce, finalize — the mean / scale / shift gradients —, apply):
    scale_shift_act(x, mean, scale, shift, residual, xb, mean_b, scale_b, shift_b, relu) -> y
    scale_shift_act_backward(grad_y, x, mean, scale, shift, residual, xb, mean_b, scale_b, shift_b, relu)
        -> (grad_x, grad_mean, grad_scale, grad_shift, grad_residual, grad_xb, grad_mean_b, grad_scale_b,
            grad_shift_b)
residual and xb are mutually exclusive; vectors are in the accumulation dtype (float32; float64 for float64).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fusedres import backends, reference
from fusedres._layout import acc_dtype
from fusedres.ops._common import (check_activation, check_channels, check_flag, check_like, densify, fake_channels,
                                  fake_like)
from fusedres.ops._transforms import refuse_forward_ad, transformed


def _check(x, mean, scale, shift, residual, xb, mean_b, scale_b, shift_b):
    check_activation(x, "x")
    for v, name in ((mean, "mean"), (scale, "scale"), (shift, "shift")):
        if v is None:
            raise ValueError(f"fusedres: scale_shift_act needs {name} (a C-element vector), got None")
        check_channels(v, x, name)
    if residual is not None and xb is not None:
        raise ValueError("fusedres: scale_shift_act takes a residual or a second input xb, not both")
    if residual is not None:
        check_like(residual, x, "residual")
    if xb is not None:
        check_like(xb, x, "xb")
        if scale_b is None:
            raise ValueError("fusedres: scale_shift_act with xb needs scale_b")
        if (mean_b is None) != (shift_b is None):
            raise ValueError("fusedres: scale_shift_act with xb needs mean_b and shift_b both, or neither (a "
                             "weighted residual xb * scale_b)")
        for v, name in ((mean_b, "mean_b"), (scale_b, "scale_b"), (shift_b, "shift_b")):
            check_channels(v, x, name)
    elif mean_b is not None or scale_b is not None or shift_b is not None:
        raise ValueError("fusedres: scale_shift_act got mean_b / scale_b / shift_b without xb (the second input)")


def _vecs(x, *vs):
    acc = acc_dtype(x.dtype)
    return tuple(None if v is None else v.to(acc).contiguous() for v in vs)


@torch.library.custom_op("fusedres::scale_shift_act", mutates_args=())
def scale_shift_act_op(x: Tensor, mean: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor],
                       xb: Optional[Tensor], mean_b: Optional[Tensor], scale_b: Optional[Tensor],
                       shift_b: Optional[Tensor], relu: bool) -> Tensor:
    refuse_forward_ad("scale_shift_act")
    _check(x, mean, scale, shift, residual, xb, mean_b, scale_b, shift_b)
    if x.numel() == 0:
        return fake_like(x)
    x, residual, xb = densify(x, residual, xb)
    return backends.select(x).apply(x, *_vecs(x, mean, scale, shift), residual, xb,
                                    *_vecs(x, mean_b, scale_b, shift_b), relu)


@scale_shift_act_op.register_fake
def _(x, mean, scale, shift, residual, xb, mean_b, scale_b, shift_b, relu):
    _check(x, mean, scale, shift, residual, xb, mean_b, scale_b, shift_b)
    return fake_like(x)


@torch.library.custom_op("fusedres::scale_shift_act_backward", mutates_args=())
def scale_shift_act_backward(grad_y: Tensor, x: Tensor, mean: Tensor, scale: Tensor, shift: Tensor,
                             residual: Optional[Tensor], xb: Optional[Tensor], mean_b: Optional[Tensor],
                             scale_b: Optional[Tensor], shift_b: Optional[Tensor], relu: bool
                             ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    refuse_forward_ad("scale_shift_act_backward")
    check_like(grad_y, x, "grad_y")
    if x.numel() == 0:
        return _empty_grads(x, residual, xb, mean_b, shift_b, lambda: fake_channels(x).zero_())
    x, grad_y, residual, xb = densify(x, grad_y, residual, xb)
    backend = backends.select(x)
    mean, scale, shift = _vecs(x, mean, scale, shift)
    mean_b, scale_b, shift_b = _vecs(x, mean_b, scale_b, shift_b)
    has_b = xb is not None
    dx, dxb, d_res, (d_mean, d_scale, d_shift), grads_b = backend.backward(
        grad_y, x, mean, scale, shift, None, 0.0, residual, xb, mean_b, scale_b, shift_b, None, 0.0, relu, True,
        residual is not None)
    e = lambda: x.new_empty(0)  # noqa: E731  (distinct empties: outputs must not alias)
    ev = lambda: scale.new_empty(0)  # noqa: E731
    d_mean_b, d_scale_b, d_shift_b = (grads_b if len(grads_b) == 3 else (ev(), grads_b[0], ev())) if has_b \
        else (ev(), ev(), ev())
    return (dx, d_mean, d_scale, d_shift, d_res if d_res is not None else e(), dxb if has_b else e(), d_mean_b,
            d_scale_b, d_shift_b)


@scale_shift_act_backward.register_fake
def _(grad_y, x, mean, scale, shift, residual, xb, mean_b, scale_b, shift_b, relu):
    return _empty_grads(x, residual, xb, mean_b, shift_b, lambda: fake_channels(x))


def _empty_grads(x, residual, xb, mean_b, shift_b, vector):
    """scale_shift_act_backward's outputs as new tensors (none aliasing another): activation gradients
    allocated in x's layout, C-vectors from `vector()` (uninitialised for the fake, zeros for an empty batch),
    0-element tensors for the absent inputs (mean_b and shift_b are absent for a weighted xb * scale_b)."""
    act = lambda present: fake_like(x) if present else x.new_empty(0)  # noqa: E731
    vec = lambda present: vector() if present else fake_channels(x).new_empty(0)  # noqa: E731
    has_b = xb is not None
    return (act(True), vector(), vector(), vector(), act(residual is not None), act(has_b),
            vec(has_b and mean_b is not None), vec(has_b), vec(has_b and shift_b is not None))


def _save(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:9])
    ctx.relu = inputs[9]


def _cast(g, like):
    return None if like is None else g.to(like.dtype)


def _backward(ctx, grad_y):
    x, mean, scale, shift, residual, xb, mean_b, scale_b, shift_b = ctx.saved_tensors
    grads = torch.ops.fusedres.scale_shift_act_backward(grad_y, x, mean, scale, shift, residual, xb, mean_b,
                                                        scale_b, shift_b, ctx.relu)
    like = (x, mean, scale, shift, residual, xb, mean_b, scale_b, shift_b)
    return tuple(_cast(g, t) for g, t in zip(grads, like)) + (None,)


scale_shift_act_op.register_autograd(_backward, setup_context=_save)


def scale_shift_act(x: Tensor, mean: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor] = None,
                    xb: Optional[Tensor] = None, mean_b: Optional[Tensor] = None, scale_b: Optional[Tensor] = None,
                    shift_b: Optional[Tensor] = None, relu: bool = True) -> Tensor:
    """act((x - mean) * scale + shift [+ residual | + (xb - mean_b) * scale_b + shift_b]), differentiable in
    every tensor argument. Under torch.func transforms or forward-mode AD it runs the same math in plain torch
    ops (`fusedres.reference.apply`)."""
    check_flag(relu, "relu")
    if transformed(x, mean, scale, shift, residual, xb, mean_b, scale_b, shift_b):
        _check(x, mean, scale, shift, residual, xb, mean_b, scale_b, shift_b)
        return reference.apply(x, mean, scale, shift, residual, xb, mean_b, scale_b, shift_b, relu)
    return torch.ops.fusedres.scale_shift_act(x, mean, scale, shift, residual, xb, mean_b, scale_b, shift_b, relu)
