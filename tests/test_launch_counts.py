"""Launches per fused op, counted: every aten compute op (a TorchDispatchMode that also looks inside the
fusedres ops' own Python bodies) plus every kernel launch — Triton kernels under the interpreter, CUDA
kernels by recording the calls into a stand-in `fusedres._C` (each entry point's launch count is fixed:
fr_api.h). Allocation (torch.empty and friends) and views are not launches; fills, copies and every other aten
op are. Outputs are not poisoned here (poisoning fills them, which is a test-only cost).

A training-mode fused BatchNorm is, with no per-channel torch op around its launches:
- Triton: 2 forward (the statistics pass, whose last program per channel block finalizes: scale, shift, the
  running statistics, num_batches_tracked; apply) and 2 backward (the reduction, finalized the same way:
  coefficients and parameter gradients; apply);
- CUDA: 2 forward (the statistics kernel's last block per channel tile does the finalize:
  stats_reduce_finalize; then apply) and 2 backward (the same for the reduction: backward_reduce_finalize;
  then apply).
`LAUNCHES` lists each case per backend. (The first fused launch on a stream also zero-fills its counter buffer
once, fusedres._counters: not counted here.)
"""
from __future__ import annotations

import contextlib

import pytest
import torch
import triton
from triton.runtime.interpreter import InterpretedFunction
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import fusedres
from fusedres import backends
from fusedres import cuda as fr_cuda
from fusedres.ops.batch_stats import batch_stats
from fusedres.triton import bn_act as triton_bn_act
from helpers import activation, channel_params

_FREE = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "lift_fresh", "detach",
         "alias", "_unsafe_view", "view", "as_strided", "expand", "t", "permute", "unsqueeze", "squeeze", "slice",
         "select"}
# Kernel launches of each fusedres._C entry point (csrc/fr_api.h).
_C_LAUNCHES = {"stats_partials": 1, "stats_finalize": 1, "apply": 1, "backward_partials": 1,
               "backward_finalize": 1, "backward_apply": 1, "backward_reduce": 2,
               "backward_reduce_finalize": 1, "stats_reduce_finalize": 1}


class _Counter(TorchDispatchMode):
    """Records aten compute ops; fusedres ops are not counted themselves but run their bodies under the mode."""

    def __init__(self):
        super().__init__()
        self.aten, self.kernels = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "fusedres":
            with self:
                return OPDEFS[func._schema.name]._init_fn(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name not in _FREE and not func.is_view:
            self.aten.append(name)
        return func(*args, **kwargs)

    @property
    def total(self):
        return len(self.aten) + len(self.kernels)


class _CountedKernel:
    def __init__(self, kernel, name, log):
        self.kernel, self.name, self.log = kernel, name, log

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.log.append(self.name)
            with _disable_current_modes():  # the interpreter's own host-side tensor work is not the kernel's
                return launch(*args, **kwargs)
        return run


class _FakeExtension:
    """Stands in for fusedres._C: records entry-point calls (their fixed launch counts), launches nothing."""

    def __init__(self, log):
        self.log = log

    def reduce_splits(self, *args):
        return 2

    def __getattr__(self, name):
        if name not in _C_LAUNCHES:
            raise AttributeError(name)
        return lambda *args, **kwargs: self.log.extend([name] * _C_LAUNCHES[name])


# (forward, backward) launches per case and backend
LAUNCHES = {
    "bn_act_train": {"triton": (2, 2), "cuda": (2, 2)},
    "bn_act_eval": {"triton": (2, 3), "cuda": (2, 3)},  # backward: (scale, shift) again, then the backward
    "dual_bn_act_train": {"triton": (3, 2), "cuda": (3, 2)},  # a statistics pass (+ finalize) per BatchNorm
    "scale_shift_act": {"triton": (1, 2), "cuda": (1, 2)},
    "batch_stats": {"triton": (1, None), "cuda": (1, None)},
}


@pytest.fixture(params=["triton", "cuda"])
def counter(request, monkeypatch):
    """A _Counter whose `kernels` list receives every launch of the chosen backend."""
    c = _Counter()
    c.backend = request.param
    if request.param == "triton":
        for name in dir(triton_bn_act):
            kernel = getattr(triton_bn_act, name)
            if name.endswith("_kernel") and isinstance(kernel, (triton.runtime.JITFunction, InterpretedFunction)):
                monkeypatch.setattr(triton_bn_act, name, _CountedKernel(kernel, name, c.kernels))
    else:
        monkeypatch.setattr(fr_cuda, "_load", lambda: _FakeExtension(c.kernels))
        monkeypatch.setattr(fr_cuda, "not_supported_reasons", lambda x: [])
        monkeypatch.setattr(fr_cuda, "_launch", lambda ext, x: None)
        monkeypatch.setattr(fr_cuda, "_sm_count", lambda index: 4)
        monkeypatch.setattr(fr_cuda, "_semaphore", lambda x, n: None)  # its one-time zero fill is not per op
    with fusedres.poison_outputs(False), backends.use_backend(request.param):
        yield c


@contextlib.contextmanager
def _counting(c):
    c.aten.clear()
    c.kernels.clear()
    with c:
        yield c


def _inputs(device, residual=False, weighted=False, cl=True):
    x = activation((2, 8, 3, 5), torch.float32, device, cl).requires_grad_()
    r = activation((2, 8, 3, 5), torch.float32, device, cl).requires_grad_() if residual else None
    w, b, rm, rv = channel_params(8, device)
    rw = torch.randn(8, device=device, requires_grad=True) if weighted else None
    return x, r, w.requires_grad_(), b.requires_grad_(), rm, rv, rw


def _fwd_bwd(c, forward):
    with _counting(c):
        y = forward()
    fwd = (list(c.aten), list(c.kernels))
    dy = torch.randn_like(y)
    with _counting(c):
        y.backward(dy)
    return fwd, (list(c.aten), list(c.kernels))


@pytest.mark.parametrize("variant", ["plain", "residual", "weighted", "no_running", "cumulative"])
def test_bn_act_training_launches(counter, device, variant):
    x, r, w, b, rm, rv, rw = _inputs(device, variant in ("residual", "weighted"), variant == "weighted")
    if variant == "no_running":
        rm = rv = None
    nbt = torch.tensor(3, device=device) if variant == "cumulative" else None
    momentum = None if variant == "cumulative" else 0.1
    rm0 = None if rm is None else rm.clone()
    (fa, fk), (ba, bk) = _fwd_bwd(counter, lambda: fusedres.bn_act(
        x, rm, rv, w, b, True, momentum, 1e-5, r, True, rw, num_batches_tracked=nbt))
    want_f, want_b = LAUNCHES["bn_act_train"][counter.backend]
    assert fa == [] and len(fk) == want_f, (fa, fk)
    assert ba == [] and len(bk) == want_b, (ba, bk)
    assert all(t.grad is not None for t in (x, w, b) + ((r,) if r is not None else ()) + ((rw,) if rw is not None
                                                                                           else ()))
    if rm is not None and counter.backend == "triton":  # the finalize kernel updated the running statistics
        assert not torch.equal(rm, rm0)


def test_bn_act_eval_launches(counter, device):
    x, r, w, b, rm, rv, _ = _inputs(device, residual=True)
    (fa, fk), (ba, bk) = _fwd_bwd(counter, lambda: fusedres.bn_act(x, rm, rv, w, b, False, 0.1, 1e-5, r, True))
    want_f, want_b = LAUNCHES["bn_act_eval"][counter.backend]
    assert fa == [] and len(fk) == want_f, (fa, fk)
    assert ba == [] and len(bk) == want_b, (ba, bk)


def test_dual_bn_act_training_launches(counter, device):
    """Two BatchNorms: a statistics pass (and a finalize) each, one apply; one backward for both."""
    x, r, w, b, rm, rv, _ = _inputs(device, residual=True)
    _, _, w2, b2, rm2, rv2, _ = _inputs(device)
    (fa, fk), (ba, bk) = _fwd_bwd(counter, lambda: fusedres.dual_bn_act(
        x, r, weight=w, bias=b, running_mean=rm, running_var=rv, weight_r=w2, bias_r=b2, running_mean_r=rm2,
        running_var_r=rv2, training=True))
    want_f, want_b = LAUNCHES["dual_bn_act_train"][counter.backend]
    assert fa == [] and len(fk) == want_f, (fa, fk)
    assert ba == [] and len(bk) == want_b, (ba, bk)


@pytest.mark.parametrize("second", [None, "residual", "xb"])
def test_scale_shift_act_launches(counter, device, second):
    x, r, *_ = _inputs(device, residual=second is not None)
    vec = lambda: torch.randn(8, device=device, requires_grad=True)  # noqa: E731
    mean, scale, shift = vec(), vec(), vec()
    kw = {}
    if second == "residual":
        kw = dict(residual=r)
    elif second == "xb":
        kw = dict(xb=r, mean_b=vec(), scale_b=vec(), shift_b=vec())
    (fa, fk), (ba, bk) = _fwd_bwd(counter, lambda: fusedres.scale_shift_act(x, mean, scale, shift, **kw))
    want_f, want_b = LAUNCHES["scale_shift_act"][counter.backend]
    assert fa == [] and len(fk) == want_f, (fa, fk)
    assert ba == [] and len(bk) == want_b, (ba, bk)


def test_batch_stats_launches(counter, device):
    x = activation((2, 8, 3, 5), torch.float32, device, True)
    with _counting(counter):
        batch_stats(x)
    assert counter.aten == [] and len(counter.kernels) == LAUNCHES["batch_stats"][counter.backend][0], \
        (counter.aten, counter.kernels)
