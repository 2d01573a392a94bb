"""`recast_conv`: an autocast convolution of a float32 input that keeps the float32 input for backward and casts it
again there, instead of keeping its low-precision copy.

Under autocast F.conv2d casts a float32 input to the autocast dtype and autograd keeps that copy for the weight
gradient, on top of the float32 input the caller holds anyway: for a ResNet stem at batch 256, 224x224, a 77 MB
bf16 image batch the step does not need. This op saves the float32 input instead and recasts it in backward:
forward 2 launches as stock (cast, conv), backward one more (cast, `convolution_backward`). The values are those
of F.conv2d under autocast (the same cast of the same input, the same convolution), bitwise.

Registered op (torch.ops.fusedres.*):
    recast_conv(x, weight, bias, stride, padding, dilation, groups) -> convolution(x.to(weight.dtype), weight, bias)
weight (and bias) already in the low-precision dtype (the caller casts them, differentiably, as autocast does);
x float32. Saves (x, weight). Backward: x cast again, one `aten.convolution_backward` for the gradients asked
for; x's gradient cast to x's dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fusedres.ops._common import int_pair
from fusedres.ops._transforms import refuse_forward_ad, transformed


def _check(x, weight, bias) -> None:
    for t, name in ((x, "x"), (weight, "weight")):
        if not isinstance(t, Tensor):
            raise TypeError(f"fusedres: recast_conv {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"fusedres: recast_conv {name} must be a floating tensor, got {t.dtype}")
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"fusedres: recast_conv takes a 4-D input and a 4-D weight, got shapes {tuple(x.shape)} "
                         f"and {tuple(weight.shape)}")
    if bias is not None and bias.dtype != weight.dtype:
        raise TypeError(f"fusedres: recast_conv bias dtype {bias.dtype} does not match weight dtype {weight.dtype}")
    for t, name in ((weight, "weight"), (bias, "bias")):
        if t is not None and t.device != x.device:
            raise ValueError(f"fusedres: recast_conv {name} is on {t.device} but x is on {x.device}")


def _conv(x, weight, bias, stride, padding, dilation, groups):
    return torch.ops.aten.convolution(x.to(weight.dtype), weight, bias, stride, padding, dilation, False, [0, 0],
                                      groups)


@torch.library.custom_op("fusedres::recast_conv", mutates_args=())
def recast_conv_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: list[int], padding: list[int],
                   dilation: list[int], groups: int) -> Tensor:
    refuse_forward_ad("recast_conv")
    _check(x, weight, bias)
    return _conv(x, weight, bias, stride, padding, dilation, groups)


@recast_conv_op.register_fake
def _(x, weight, bias, stride, padding, dilation, groups):
    _check(x, weight, bias)
    return _conv(x, weight, bias, stride, padding, dilation, groups)


def _save(ctx, inputs, output):
    x, weight, bias, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(x, weight)
    ctx.conv = (list(stride), list(padding), list(dilation), groups)
    ctx.bias_sizes = None if bias is None else list(bias.shape)


def _backward(ctx, grad_y):
    x, weight = ctx.saved_tensors
    need = ctx.needs_input_grad[:3]
    stride, padding, dilation, groups = ctx.conv
    dx = dw = db = None
    if any(need):
        dx, dw, db = torch.ops.aten.convolution_backward(grad_y, x.to(weight.dtype), weight, ctx.bias_sizes, stride,
                                                         padding, dilation, False, [0, 0], groups, list(need))
    return (dx.to(x.dtype) if need[0] else None, dw if need[1] else None, db if need[2] else None,
            None, None, None, None)


recast_conv_op.register_autograd(_backward, setup_context=_save)


def recasts(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> bool:
    """Whether `recast_conv` applies: autocast on for x's device, x and the parameters float32, gradients
    recorded (with nothing to save for backward it would gain nothing), no torch.func transform."""
    return (torch.is_autocast_enabled(x.device.type) and torch.is_grad_enabled() and x.dtype == torch.float32
            and weight.dtype == torch.float32 and (bias is None or bias.dtype == torch.float32)
            and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
            and not transformed(x, weight, bias))


def recast_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding=0, dilation=1,
                groups: int = 1) -> Tensor:
    """F.conv2d(x, weight, bias, ...) with integer padding. Where `recasts(...)`, the weight and bias are cast to
    the autocast dtype (differentiably, as autocast does) and the convolution runs as `fusedres::recast_conv`,
    keeping float32 x for backward instead of its low-precision copy; elsewhere it is plain F.conv2d."""
    if not recasts(x, weight, bias):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    dtype = torch.get_autocast_dtype(x.device.type)
    return torch.ops.fusedres.recast_conv(x, weight.to(dtype), None if bias is None else bias.to(dtype),
                                          int_pair(stride, "recast_conv", "stride"),
                                          int_pair(padding, "recast_conv", "padding"),
                                          int_pair(dilation, "recast_conv", "dilation"), groups)
