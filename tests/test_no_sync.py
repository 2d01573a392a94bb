"""A converted ResNet-50 training step (bn and conv mode) forces no device-to-host copy: no `.item()`,
`.tolist()`, tensor-to-Python-scalar conversion or data-dependent output shape (nonzero, boolean-mask indexing,
unique, ...), which would stall the CPU on the GPU every step and break CUDA-graph capture. Checked on the CPU
with a TorchDispatchMode over every aten op the step runs, including those inside fusedres' own ops, with the
Triton launches recorded instead of run (`fusedres.triton.plan.Plan`, conv launcher as on sm_90 with the
heuristic config: autotuning times kernels, which syncs, once per shape, ahead of training with
`fusedres.tune`)."""
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fusedres
from fusedres.triton.plan import Plan

aten = torch.ops.aten
# ops that copy a value to the host or whose output shape depends on tensor values
SYNCING = {aten._local_scalar_dense.default, aten.item.default, aten.is_nonzero.default, aten.nonzero.default,
           aten.masked_select.default, aten._unique2.default, aten.unique_dim.default,
           aten.unique_consecutive.default, aten.equal.default, aten.repeat_interleave.Tensor,
           aten.nonzero_numpy.default}


class NoSync(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        if func in SYNCING:
            raise AssertionError(f"host sync: {func}")
        if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
            idx = args[1]
            if any(i is not None and i.dtype == torch.bool for i in idx):
                raise AssertionError(f"data-dependent shape: {func} with a boolean mask")
        if func.namespace == "fusedres":
            with self:  # the aten ops inside fusedres' own ops (their CPU implementation) are checked too
                return func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **kwargs)
        return func(*args, **kwargs)


def _forbid(monkeypatch):
    def fail(name):
        def f(self, *a, **k):
            raise AssertionError(f"host sync: Tensor.{name}")
        return f
    for name in ("tolist", "numpy", "item", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, fail(name))


def test_mode_catches_syncs(monkeypatch):
    """The checker is live: each kind of sync fails it."""
    x = torch.randn(8)
    for bad in (lambda: x.sum().item(), lambda: x.nonzero(), lambda: x[x > 0], lambda: bool(x.sum() > 0),
                lambda: x.unique()):
        with pytest.raises(AssertionError, match="host sync|data-dependent"), NoSync():
            bad()
    _forbid(monkeypatch)
    with pytest.raises(AssertionError, match="tolist"):
        x.tolist()


@pytest.mark.parametrize("mode", ["bn", "conv"])
def test_resnet50_training_step_has_no_host_sync(mode, monkeypatch):
    torch.manual_seed(0)
    model = fusedres.convert(fusedres.models.resnet50(num_classes=10), mode=mode).to(
        memory_format=torch.channels_last)
    # momentum=None (cumulative average) too: its factor comes from a counter tensor
    next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)).momentum = None
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(4, 3, 32, 32).to(memory_format=torch.channels_last)
    target = torch.randint(0, 10, (4,))
    check = NoSync()

    def step():
        loss = torch.nn.functional.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with Plan(major=9, autotune=False) as plan:
        step()  # the first step may read state once (momentum=None's batch count); steady-state steps may not
        _forbid(monkeypatch)
        with check:
            step()
            step()
    assert plan.launches > 50 and check.ops > 500


def test_cumulative_momentum_counts_on_the_host(monkeypatch):
    """momentum=None's factor 1 / num_batches_tracked comes from a host-side count (no sync per step) that
    follows the buffer through a loaded state_dict and an in-place reset: running statistics match stock's."""
    torch.manual_seed(0)
    stock = torch.nn.BatchNorm2d(3, momentum=None)
    fused = fusedres.nn.BatchNormAct2d(3, momentum=None, act=None)
    fused.load_state_dict(stock.state_dict())

    def step(checked=False):
        x = torch.randn(4, 3, 5, 5)
        stock(x)                    # stock reads the count from the buffer each step (a sync on a GPU)
        with NoSync() if checked else contextlib.nullcontext():
            fused(x)
        torch.testing.assert_close(fused.running_mean, stock.running_mean)
        torch.testing.assert_close(fused.running_var, stock.running_var)

    step()
    step(checked=True)              # the count is known on the host now: no sync
    stock.num_batches_tracked.fill_(10)
    fused.load_state_dict(stock.state_dict())
    step()                          # re-read after the load (one read), then counted on the host again
    step(checked=True)
    with pytest.raises(AssertionError, match="host sync"):
        fused.num_batches_tracked.add_(5)   # written behind its back: read again (caught here as a sync)
        stock.num_batches_tracked.add_(5)
        step(checked=True)
    fused.reset_running_stats()
    stock.reset_running_stats()
    step()
    step(checked=True)
    assert int(fused.num_batches_tracked) == int(stock.num_batches_tracked) == 2
