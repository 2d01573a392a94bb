"""Determinism: under torch.use_deterministic_algorithms(True) every fused op, run twice on the same inputs, gives
bitwise identical outputs, gradients and running statistics (torch.equal), on every backend available here —
and a converted ResNet's training step (bn and conv modes) does too. On a GPU these run on it (the `device`
fixture); see docs/determinism.md for why each op is deterministic.
"""
import copy

import pytest
import torch
from torch import nn

import fusedres
from helpers import backend_names, tiny_resnet


@pytest.fixture(autouse=True)
def deterministic():
    old, old_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old, warn_only=old_warn)


def _leaves(tensors):
    return [t.detach().clone().requires_grad_(t.is_floating_point()) if t is not None else None for t in tensors]


def _twice(fn, tensors, extra=()):
    """fn(*leaves) twice (forward + backward with a fixed upstream gradient); each run's outputs, input
    gradients and the tensors in `extra` after the run (e.g. running statistics, reset before each run)."""
    runs = []
    for _ in range(2):
        state = [t.clone() for t in extra]
        leaves = _leaves(tensors)
        out = fn(*leaves, *state)
        outs = out if isinstance(out, tuple) else (out,)
        g = torch.Generator(device="cpu").manual_seed(3)
        loss = sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device)).sum()
                   for o in outs)
        loss.backward()
        runs.append([o.detach() for o in outs] + [t.grad for t in leaves if t is not None and t.requires_grad]
                    + state)
    return runs


def _assert_bitwise(runs, what):
    first, second = runs
    assert len(first) == len(second)
    for i, (a, b) in enumerate(zip(first, second)):
        assert a is not None and torch.equal(a, b), f"{what}: result {i} differs between two identical runs"


def _vecs(c, device):
    return [torch.rand(c, device=device) + 0.5, torch.randn(c, device=device)]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bn_act_is_bitwise_reproducible(device, training):
    x = torch.randn(4, 8, 6, 6, device=device).contiguous(memory_format=torch.channels_last)
    res = torch.randn_like(x)
    stats = [torch.randn(8, device=device) * 0.1, torch.rand(8, device=device) + 0.5]
    for backend in backend_names(device):
        with fusedres.use_backend(backend):
            runs = _twice(lambda x, r, w, b, rm, rv: fusedres.bn_act(x, rm, rv, w, b, training, residual=r,
                                                                     relu=True),
                          [x, res, *_vecs(8, device)], stats)
        _assert_bitwise(runs, f"{backend} bn_act")


def test_dual_bn_act_and_scale_shift_act_are_bitwise_reproducible(device):
    x, r = torch.randn(4, 8, 5, 5, device=device), torch.randn(4, 8, 5, 5, device=device)
    stats = [torch.zeros(8, device=device), torch.ones(8, device=device)] * 2
    m, s, t = torch.randn(8, device=device), *_vecs(8, device)
    for backend in backend_names(device):
        with fusedres.use_backend(backend):
            dual = _twice(lambda x, r, w, b, wr, br, rm, rv, rmr, rvr: fusedres.dual_bn_act(
                x, r, weight=w, bias=b, running_mean=rm, running_var=rv, weight_r=wr, bias_r=br, running_mean_r=rmr,
                running_var_r=rvr, training=True), [x, r, *_vecs(8, device), *_vecs(8, device)], stats)
            ssa = _twice(lambda x, xb, m, s, t, mb, sb, tb: fusedres.scale_shift_act(
                x, m, s, t, xb=xb, mean_b=mb, scale_b=sb, shift_b=tb), [x, r, m, s, t, m.flip(0), s, t])
        _assert_bitwise(dual, f"{backend} dual_bn_act")
        _assert_bitwise(ssa, f"{backend} scale_shift_act")


CONV_VARIANTS = {
    "stats": dict(stats=True),
    "prologue_stats": dict(in_scale=True, in_shift=True, in_relu=True, stats=True),
    "epilogue": dict(out_scale=True, out_shift=True, residual=True, res_scale=True, relu=True),
}


@pytest.mark.parametrize("variant", list(CONV_VARIANTS))
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_conv_bn_act_is_bitwise_reproducible(on_test_device, variant, backend):
    opts = dict(CONV_VARIANTS[variant])
    names = ["x", "weight"] + [k for k in ("in_scale", "in_shift", "out_scale", "out_shift", "residual",
                                           "res_scale") if opts.pop(k, False)]
    shapes = dict(x=(2, 6, 7, 7), weight=(10, 3, 3, 3), in_scale=(6,), in_shift=(6,), out_scale=(10,),
                  out_shift=(10,), residual=(2, 10, 4, 4), res_scale=(10,))
    tensors = [torch.randn(shapes[n]) for n in names]

    def fn(*leaves):
        return fusedres.conv_bn_act(**dict(zip(names, leaves)), stride=2, padding=1, groups=2, allow_tf32=False,
                                    **opts)

    with fusedres.use_backend(backend):
        runs = _twice(fn, tensors)
    _assert_bitwise(runs, f"{backend} conv_bn_act {variant}")


def test_deterministic_mode_fixes_the_gpu_conv_config(monkeypatch):
    """Autotuning picks a config by timing, so two processes can pick different ones and sum in a different
    order: deterministic mode uses the fixed heuristic config instead (checked without a GPU)."""
    from fusedres.triton import conv_bn_act as tc

    assert tc.config_choice("cpu") == "interpret"
    assert tc.config_choice("cuda") == "heuristic"
    torch.use_deterministic_algorithms(False)
    monkeypatch.setenv("FUSEDRES_CONV_AUTOTUNE", "1")
    assert tc.config_choice("cuda") == "autotune"
    monkeypatch.setenv("FUSEDRES_CONV_AUTOTUNE", "0")
    assert tc.config_choice("cuda") == "heuristic"


class _SpatialMean(nn.Module):
    """Global average pool as a mean: adaptive_avg_pool2d's CUDA backward has no deterministic implementation
    (it raises under the flag), and the point here is the fused ops."""

    def forward(self, x):
        return x.mean((2, 3), keepdim=True)


@pytest.mark.parametrize("mode", ["bn", "conv"])
def test_converted_resnet_training_step_is_bitwise_reproducible(on_test_device, mode):
    base = tiny_resnet(width=8, num_classes=4)
    base.avgpool = _SpatialMean()
    base.fc = nn.Identity()  # a cuBLAS matmul needs CUBLAS_WORKSPACE_CONFIG under the flag; not ours to test
    base = fusedres.convert(base, mode=mode).train()
    x = torch.randn(4, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    device = x.device
    for backend in backend_names(device):
        results = []
        for _ in range(2):
            model = copy.deepcopy(base)
            with fusedres.use_backend(backend):
                out = model(x)
                out.square().sum().backward()
            results.append([out.detach()] + [p.grad for p in model.parameters()]
                           + list(model.state_dict().values()))
        _assert_bitwise(results, f"{backend} resnet {mode} mode")
