"""torch.func and forward-mode AD for the fused ops: detect them and take stock's own math instead.

The registered ops (`torch.ops.fusedres.*`) carry a backward formula (reverse mode) but no forward-mode (jvp)
formula and no batching rule, so under `torch.func.jvp` / `torch.autograd.forward_ad` they would lose the
tangent, and under `vmap` they would run once per sample. The public entry points (`bn_act`, `dual_bn_act`,
`scale_shift_act`, `conv_bn_act`, `batch_stats` and the modules built on them) therefore check their tensor
arguments first: when one is a functorch-wrapped tensor (inside `torch.func.vmap`, `grad`, `vjp`, `jvp`,
`jacrev`, `jacfwd`, `hessian`) or carries a forward-mode tangent (`torch.autograd.forward_ad.make_dual`), the
call runs the composite reference in `fusedres.reference` (`F.batch_norm`, `F.conv2d`, `torch.relu`, ...),
which every transform supports exactly as it supports stock PyTorch: same results, same running-statistic
updates, same errors (e.g. vmap over training BatchNorm with unbatched running statistics).
Under `torch.compile` the check is skipped (Dynamo traces the fused ops themselves).
"""
from __future__ import annotations

import torch
from torch.autograd import forward_ad


def transformed(*tensors) -> bool:
    """True inside forward-mode AD (a `forward_ad.dual_level`, which `torch.func.jvp` also opens) or when any
    tensor in `tensors` (None allowed) is a functorch-wrapped tensor (vmap, grad, ...): the caller must then
    run its composite reference path."""
    if torch.compiler.is_compiling():
        return False
    if forward_ad._current_level >= 0:
        return True
    return any(isinstance(t, torch.Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


def refuse_forward_ad(op: str) -> None:
    """Called first in each registered op's implementation: forward-mode AD reaching a `torch.ops.fusedres.*`
    op directly (not through a public entry point) would silently lose the tangent, since custom ops have no
    jvp formula, so it raises instead."""
    if forward_ad._current_level >= 0 and not torch.compiler.is_compiling():
        raise RuntimeError(f"fusedres: torch.ops.fusedres.{op} has no forward-mode AD (jvp) formula, so "
                           f"torch.func.jvp / jacfwd / torch.autograd.forward_ad through it would drop the "
                           f"tangent; call the public function instead (fusedres.bn_act, dual_bn_act, "
                           f"scale_shift_act, conv_bn_act, fusedres.ops.batch_stats.batch_stats, or the "
                           f"fusedres.nn modules), which runs stock PyTorch ops under forward-mode AD")
