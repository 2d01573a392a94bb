"""fusedres.models: torchvision-signature constructors give fused models that load torchvision checkpoints
unchanged, and a fused tiny ResNet trains like the stock one."""
import copy
import inspect

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models import resnet as tv

import fusedres
from fusedres import models
from fusedres.nn import BasicBlock, BatchNormAct2d, Bottleneck
from helpers import tiny_resnet
from model_compare import assert_runs_like_stock

NAMES = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2", "resnext50_32x4d"]


@pytest.mark.parametrize("name", NAMES)
def test_constructor_structure_matches_torchvision(name):
    """Built on the meta device (no memory, no init cost): same signature, same state_dict keys and shapes,
    every block fused, stem fused."""
    params = [(p.name, p.kind, p.default) for p in inspect.signature(getattr(models, name)).parameters.values()]
    assert params == [(p.name, p.kind, p.default)
                      for p in inspect.signature(getattr(torchvision.models, name)).parameters.values()]
    with torch.device("meta"):
        fused = getattr(models, name)(num_classes=7)
        stock = getattr(torchvision.models, name)(num_classes=7)
    assert [(k, v.shape) for k, v in fused.state_dict().items()] == \
        [(k, v.shape) for k, v in stock.state_dict().items()]
    blocks = [m for m in fused.modules() if isinstance(m, (BasicBlock, Bottleneck))]
    stock_blocks = [m for m in stock.modules() if isinstance(m, (tv.BasicBlock, tv.Bottleneck))]
    assert len(blocks) == len(stock_blocks) > 0
    assert not any(isinstance(m, (tv.BasicBlock, tv.Bottleneck)) for m in fused.modules())
    assert type(fused.bn1) is BatchNormAct2d and type(fused.relu) is nn.Identity
    assert fused.fc.out_features == 7


@pytest.mark.parametrize("name", ["resnext50_32x4d", "wide_resnet50_2"])
def test_load_torchvision_state_dict_both_ways(name):
    stock = getattr(torchvision.models, name)(num_classes=3)
    with torch.no_grad():
        for b in stock.buffers():
            b.add_(torch.rand_like(b.float()).to(b.dtype) if b.is_floating_point() else 1)
    fused = getattr(models, name)(num_classes=3)
    if name == "resnext50_32x4d":
        assert fused.layer1[0].conv2.groups == 32
    fused.load_state_dict(stock.state_dict(), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(fused.state_dict().values(), stock.state_dict().values()))
    with torch.device("meta"):
        back = getattr(torchvision.models, name)(num_classes=3)
    back.load_state_dict(fused.state_dict(), strict=True, assign=True)
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), stock.state_dict().values()))
    stock.eval()
    fused.eval()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert_runs_like_stock(stock, fused, lambda model, dtype: {"eval output": model(x.to(dtype))})


def test_constructor_kwargs_and_weights():
    fused = models.resnet50(zero_init_residual=True, num_classes=4)
    assert all(not m.bn3.weight.any() for m in fused.modules() if isinstance(m, Bottleneck))
    with pytest.raises(ValueError, match="unknown weights 'V3'"):  # loading itself: tests/test_weights.py
        models.resnet18(weights="V3")
    back = fusedres.unconvert(models.resnet18())
    assert type(back.layer1[0]) is tv.BasicBlock and type(back.bn1) is nn.BatchNorm2d


def _losses(model, data, steps, batch):
    xs, ys = data
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    losses = []
    for step in range(steps):
        idx = torch.arange(step * batch, (step + 1) * batch) % xs.shape[0]
        loss = F.cross_entropy(model(xs[idx]), ys[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.tensor(losses, dtype=torch.float64)


@pytest.mark.slow
def test_convergence_matches_stock(device):
    """100 momentum-SGD steps of a tiny ResNet (8/16 channels, 8x8 inputs, batch 16) on a synthetic 4-class
    task (class = one of 4 fixed random 3x8x8 patterns plus strong noise, so the loss keeps moving), stock and
    fused from the same init, in float64 and in float32.

    Runs with the reference backend (`fusedres.use_backend("reference")`) on CPU: 200 steps through the
    Triton interpreter would take minutes; the modules, the op layer and the autograd wiring under test are
    the same for every backend, and the op tests check the Triton kernels against the same reference. On a
    GPU the automatically selected backend runs.

    Tolerances. float64: the loss curves agree within 1e-9 at every step (measured: equal to the last
    printed digit), so any semantic difference (a running statistic, gradient, momentum) shows. float32: the
    curves agree with float64's to ~1e-7 until, some tens of steps in, a rounding-level difference moves an
    activation across a ReLU kink, which changes that step's gradient, and the trajectories separate like two SGD runs
    with different seeds would, slowly: measured, single-batch losses then differ by up to 5e-2 and the means
    over 10-step windows by up to 5e-3 (losses fall from 1.4 to 0.02). So over the first 20 steps the fp32 fused
    losses must be within 2x stock fp32's own error against the float64 run; after that, 10-step means within
    1e-2 throughout (two runs of one SGD, not rounding), and the loss must fall by 4x."""
    torch.manual_seed(0)
    stock = tiny_resnet().to(device)
    init = copy.deepcopy(stock)
    patterns = torch.randn(4, 3, 8, 8)
    ys = torch.randint(0, 4, (256,))
    xs = patterns[ys] + 2.5 * torch.randn(256, 3, 8, 8)
    data = (xs.to(device), ys.to(device))
    data64 = (data[0].double(), data[1])
    backend = "reference" if device == "cpu" else None
    stock64 = _losses(copy.deepcopy(init).double(), data64, 100, 16)
    with fusedres.use_backend(backend):
        fused64 = _losses(fusedres.convert(copy.deepcopy(init).double()), data64, 100, 16)
    assert (fused64 - stock64).abs().max() < 1e-9, (fused64 - stock64).abs().max()

    fused = fusedres.convert(copy.deepcopy(init))
    stock_losses = _losses(stock, data, 100, 16)
    with fusedres.use_backend(backend):
        fused_losses = _losses(fused, data, 100, 16)
    err_f, err_s = (fused_losses - stock64)[:20].abs().max(), (stock_losses - stock64)[:20].abs().max()
    bound = 2 * err_s + 8 * torch.finfo(torch.float32).eps * stock64[:20].abs().max()
    assert err_f <= bound, f"first 20 fp32 losses: fused error against float64 {err_f:.3e} > {bound:.3e} (2x stock's)"
    windows_f, windows_s = fused_losses.view(10, 10).mean(1), stock_losses.view(10, 10).mean(1)
    assert (windows_f - windows_s).abs().max() < 1e-2, (windows_f, windows_s)
    assert fused_losses[-10:].mean() < stock_losses[:5].mean() / 4, fused_losses
