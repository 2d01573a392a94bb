"""A block's conv weights cast under autocast in one launch each way, shared by the bn-mode blocks (`blocks.py`,
`timm_blocks.py`) and the conv-mode ones (`conv_blocks.py`, `preact_conv.py`).

Under autocast every `F.conv2d` casts its float32 weight to the autocast dtype (one `_to_copy` launch per conv) and
its backward casts the weight gradient back (one more). `autocast_weights` casts all of a block's conv weights in
one `cast_weights` launch instead (one backward), with `.to`'s rounding, so the values are bitwise those of the
per-conv casts. A bn-mode block then runs each conv as `F.conv2d` with its cast weight (`run_conv`): exactly what
`nn.Conv2d.forward` would run, provided the module is a plain `nn.Conv2d` with no hooks (`block_weights`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module

from fusedres.ops.cast_weights import cast_weights

_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")


def autocast_weights(x: Tensor, convs) -> dict:
    """Under autocast, {conv: its weight in the autocast dtype} for `convs`, all cast in one `cast_weights` launch
    (backward: one for all their gradients) where each conv would cast its own (one launch each way per conv).
    Empty (each conv as before) without autocast, when x is neither float32 nor the autocast dtype, or when a
    weight is not a float32 tensor on x's device."""
    if not torch.is_autocast_enabled(x.device.type):
        return {}
    dtype = torch.get_autocast_dtype(x.device.type)
    convs = list(dict.fromkeys(convs))
    if x.dtype not in (torch.float32, dtype) or not convs or any(
            c.weight.dtype != torch.float32 or c.weight.device != x.device for c in convs):
        return {}
    return dict(zip(convs, cast_weights([c.weight for c in convs], dtype)))


def hooked(m: nn.Module) -> bool:
    """Whether calling m runs hooks (its own forward / backward (pre-)hooks, or global module ones)."""
    return any(getattr(m, h, None) for h in _HOOKS) or any(getattr(_module, h, None) for h in _GLOBAL_HOOKS)


def _plain(conv) -> bool:
    """An `nn.Conv2d` itself (no subclass, no forward set on the instance) whose call runs no hook."""
    return type(conv) is nn.Conv2d and "forward" not in vars(conv) and not hooked(conv)


def block_weights(x: Tensor, convs) -> dict:
    """For a bn-mode block whose forward runs `convs`: their autocast weights cast in one launch (`autocast_weights`)
    when every one of them can run functionally, else {} (the block calls its modules, so every hook fires).
    A conv with another padding mode is left out of the cast and called as a module."""
    if not torch.is_autocast_enabled(x.device.type):
        return {}
    convs = list(convs)
    if not all(_plain(c) for c in convs):
        return {}
    return autocast_weights(x, [c for c in convs if c.padding_mode == "zeros"])


def run_conv(conv: nn.Module, x: Tensor, weights: dict) -> Tensor:
    """conv(x), with the already cast weight from `weights` when it has one (then as nn.Conv2d's zero-padding
    forward, the bias left to autocast like the module call leaves it)."""
    w = weights.get(conv) if weights else None
    if w is None:
        return conv(x)
    return F.conv2d(x, w, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
