"""The last-program finalize's counters (fusedres/_counters.py): every reduction that finalizes in its last program
or block per channel block leaves its counters at zero, so the next launch on the stream starts clean, and one
buffer per (device, stream) serves every launch (no allocation, no fill per step). On the CPU the Triton kernels
run in the interpreter (programs one after another: this checks the counting and the reset, not the memory
ordering, which needs a GPU); on a GPU the same test runs the compiled kernels of every backend available."""
from __future__ import annotations

import pytest
import torch

import fusedres
from fusedres import _counters, backends
from fusedres.ops.batch_stats import batch_stats
from helpers import activation, backend_names, channel_params


def _buffers(device):
    return {k: v for k, v in _counters._BUFFERS.items() if k[0] == torch.device(device).type}


def _step(device, backend):
    """Forward + backward of every op that finalizes in its reduction: bn_act (train), dual_bn_act, batch_stats
    and the conv statistics merge, with several programs per channel block and channel counts over one block."""
    results = []
    torch.manual_seed(0)
    with backends.use_backend(backend):
        for c, cl in ((8, True), (70, False)):
            x = activation((3, c, 5, 4), torch.float32, device, cl).requires_grad_()
            r = activation((3, c, 5, 4), torch.float32, device, cl).requires_grad_()
            w, b, rm, rv = channel_params(c, device)
            y = fusedres.bn_act(x, rm, rv, w.requires_grad_(), b.requires_grad_(), True, 0.1, 1e-5, r, True)
            y.backward(torch.ones_like(y))
            y2 = fusedres.dual_bn_act(x.detach(), r.detach(), weight=w.detach(), bias=b.detach(), running_mean=None,
                                      running_var=None, weight_r=w.detach(), bias_r=b.detach(), running_mean_r=None,
                                      running_var_r=None, training=True)
            mean, var = batch_stats(x.detach())
            results += [y.detach(), x.grad, r.grad, w.grad, b.grad, rm, rv, y2, mean, var]
        if device == "cpu" or backend != "reference":
            xc = activation((2, 6, 9, 7), torch.float32, device, True)
            wc = torch.randn(37, 6, 3, 3, device=device) / 5
            results += list(fusedres.conv_bn_act(xc, wc, padding=1, stats=True, allow_tf32=False))
    return results


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_counters_are_zero_after_every_fused_reduction_and_reused(device, backend):
    if backend not in backend_names(device):
        pytest.skip(f"the {backend} backend cannot run on {device} here")
    first = _step(device, backend)
    buffers = _buffers(device)
    assert buffers, "no counter buffer was used: the finalizes did not run in their reductions"
    for key, buf in buffers.items():
        assert int(buf.count_nonzero()) == 0, f"counters {key} left non-zero: {buf.nonzero().flatten().tolist()}"
    ids = {k: v.data_ptr() for k, v in buffers.items()}
    second = _step(device, backend)
    assert {k: v.data_ptr() for k, v in _buffers(device).items()} == ids, "a counter buffer was reallocated"
    for a, b in zip(first, second):  # the ticket only picks which program merges: bitwise the same results
        assert torch.equal(a, b)


def test_counters_grow_and_stay_zeroed(device):
    """A launch needing more counters than the buffer has gets a new zeroed buffer, at least twice the size."""
    like = torch.empty(1, device=device)
    small = _counters.counters(like, 8)
    big = _counters.counters(like, small.numel() + 1)
    assert big.numel() >= max(2 * small.numel(), small.numel() + 1) and int(big.count_nonzero()) == 0
    assert _counters.counters(like, 4) is big
