"""Per-call backend choice for the fused ops: cuda → triton → reference.

Every backend is a module exposing the same primitives (see `fusedres.reference` for their exact semantics)
and `not_supported_reasons(x) -> list[str]`:

    batch_stats(x) -> (mean, var)
    bn_stats(x, weight, bias, eps, running_mean, running_var, momentum, num_batches_tracked)
        -> (mean, var, scale, shift)        statistics + finalize (running statistics updated in place)
    bn_params(x, mean, var, weight, bias, eps) -> (scale, shift)
    apply(x, mean, scale, shift, residual, xb, mean_b, scale_b, shift_b, relu) -> y
    backward(dy, x, mean, scale, shift, var, eps, residual, xb, mean_b, scale_b, shift_b, var_b, eps_b, relu,
             training, want_grad_residual) -> (dx, dxb | None, grad_residual | None, grads_a, grads_b)
    backward_reduce(dy, x, mean, scale, shift, residual, xb, mean_b, scale_b, shift_b, relu, want_grad_residual)
        -> (sum_g, sum_g_xc, sum_g_xbc | None, grad_residual | None)
    backward_apply(dy, x, mean, scale, shift, residual, xb, mean_b, scale_b, shift_b, relu,
                   k_g, k_x, k_c, k_g_b, k_x_b, k_c_b) -> (dx, dxb | None)
bn_stats, apply and backward are a fused BatchNorm's 3 + 3 launches (CUDA: 2 + 2; docs/launches.md);
backward_reduce / backward_apply serve the synchronised ops, which all-reduce the sums in between. A second
input xb without mean_b / shift_b is a weighted residual xb * scale_b.

`select(x)` returns the first backend that accepts x. `use_backend(name)` (or the environment variable
`FUSEDRES_BACKEND`) forces one; a forced backend that refuses an input raises instead of falling back.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
from types import ModuleType

import torch

BACKENDS = ("cuda", "triton", "reference")
_MODULES = {
    "cuda": "fusedres.cuda",
    "triton": "fusedres.triton.bn_act",
    "reference": "fusedres.reference",
}
# Process-wide, not a context variable: autograd runs CUDA backward passes on its own worker threads, which
# must see the same choice as the forward.
_forced: list[str | None] = [None]


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run this input; the message lists why."""


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown fusedres backend {name!r}; choose one of {BACKENDS}")
    return name


@contextlib.contextmanager
def use_backend(name: str | None):
    """Force `name` ('cuda', 'triton' or 'reference') for fused ops run inside the block, backward passes
    included (process-wide, so do not mix different choices across threads); None = automatic."""
    old = _forced[0]
    _forced[0] = None if name is None else _check_name(name)
    try:
        yield
    finally:
        _forced[0] = old


def forced_backend() -> str | None:
    name = _forced[0]
    if name is None:
        env = os.environ.get("FUSEDRES_BACKEND", "").strip().lower()
        name = _check_name(env) if env and env != "auto" else None
    return name


@functools.cache
def load(name: str) -> ModuleType | None:
    """The backend module, or None when it cannot be imported here (not built, triton missing)."""
    try:
        return importlib.import_module(_MODULES[_check_name(name)])
    except ImportError:
        return None


def not_supported_reasons(name: str, x: torch.Tensor) -> list[str]:
    """Why backend `name` refuses input x (empty when it accepts it)."""
    module = load(name)
    if module is None:
        return [f"the {name} backend is not available in this installation"]
    return module.not_supported_reasons(x)


def available_backends(x: torch.Tensor) -> list[str]:
    """Backends that accept x, in preference order."""
    return [name for name in BACKENDS if not not_supported_reasons(name, x)]


def select(x: torch.Tensor) -> ModuleType:
    """The backend module to run x on: the forced one, else the first in BACKENDS that accepts it."""
    name = forced_backend()
    if name is not None:
        reasons = not_supported_reasons(name, x)
        if reasons:
            raise BackendUnavailable(f"fusedres backend {name!r} was forced but cannot run this input: "
                                     + "; ".join(reasons))
        return load(name)
    for candidate in BACKENDS:
        if not not_supported_reasons(candidate, x):
            return load(candidate)
    raise BackendUnavailable("no fusedres backend accepts this input")  # the reference accepts everything
