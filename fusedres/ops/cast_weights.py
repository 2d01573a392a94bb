"""`cast_weights`: several weights cast to one dtype in one launch, and their gradients cast back in one.

Under autocast every convolution casts its float32 weight to the autocast dtype (one launch per conv) and its
backward casts the weight gradient back to float32 (one more per conv). A conv-mode block casts all its conv
weights at once instead: one `torch._foreach_copy_` into outputs allocated `empty_like` each weight. CUDA runs
it as one multi_tensor_apply kernel when the sources share a dtype, the destinations share a dtype and each
pair has the same sizes and strides, as here. The rounding is `Tensor.to`'s (round to nearest even), so the
values are bitwise those of `[w.to(dtype) for w in weights]` forward and of the per-weight casts backward.

Registered op (torch.ops.fusedres.*):
    cast_weights(weights, dtype) -> [w.to(dtype) for w in weights]   (always new tensors, never the inputs)
Backward: the output gradients, each cast to its weight's dtype, in one `_foreach_copy_`; an output that got no
gradient (or a weight that needs none) gives None.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fusedres.ops._transforms import refuse_forward_ad, transformed


def _check(weights, dtype) -> None:
    if not isinstance(weights, (list, tuple)) or not weights:
        raise ValueError(f"fusedres: cast_weights needs a non-empty list of tensors, got {weights!r}")
    for i, w in enumerate(weights):
        if not isinstance(w, Tensor):
            raise TypeError(f"fusedres: cast_weights weights[{i}] must be a torch.Tensor, got {type(w).__name__}")
        if not w.is_floating_point():
            raise TypeError(f"fusedres: cast_weights weights[{i}] must be a floating tensor, got {w.dtype}")
    devices = {w.device for w in weights}
    if len(devices) > 1:
        raise ValueError(f"fusedres: cast_weights needs all weights on one device (one launch), got "
                         f"{sorted(map(str, devices))}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"fusedres: cast_weights dtype must be a floating torch.dtype, got {dtype!r}")


def _copies(sources, dtypes) -> list[Tensor]:
    outs = [torch.empty_like(s, dtype=d) for s, d in zip(sources, dtypes)]
    torch._foreach_copy_(outs, sources)
    return outs


@torch.library.custom_op("fusedres::cast_weights", mutates_args=())
def cast_weights_op(weights: list[Tensor], dtype: torch.dtype) -> list[Tensor]:
    refuse_forward_ad("cast_weights")
    _check(weights, dtype)
    return _copies(weights, [dtype] * len(weights))


@cast_weights_op.register_fake
def _(weights, dtype):
    _check(weights, dtype)
    return [torch.empty_like(w, dtype=dtype) for w in weights]


def _save(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    ctx.dtypes = [w.dtype for w in inputs[0]]


def _backward(ctx, grads):
    need = ctx.needs_input_grad[0]
    wanted = [i for i, g in enumerate(grads) if g is not None and need[i]]
    out = [None] * len(grads)
    if wanted:
        for i, g in zip(wanted, _copies([grads[i] for i in wanted], [ctx.dtypes[i] for i in wanted])):
            out[i] = g
    return out, None


cast_weights_op.register_autograd(_backward, setup_context=_save)


def cast_weights(weights, dtype: torch.dtype) -> list[Tensor]:
    """`[w.to(dtype) for w in weights]` as one launch forward and one backward (module docstring); the outputs
    are always new tensors. Under torch.func transforms or forward-mode AD it is exactly that list of `.to`."""
    weights = list(weights) if isinstance(weights, (list, tuple)) else weights
    _check(weights, dtype)
    if transformed(*weights):
        return [w.to(dtype) for w in weights]
    return torch.ops.fusedres.cast_weights(weights, dtype)
