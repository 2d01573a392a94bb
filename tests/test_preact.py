"""Pre-activation ResNets ("Identity Mappings in Deep Residual Networks"): the stock `fusedres.preact` networks,
their fused conversions (`fusedres.models.preact_*`), convert / unconvert, and fused-vs-stock training."""
import copy
import inspect

import pytest
import torch
from torch import nn

import fusedres
from fusedres import convert, models, preact, unconvert
from fusedres.nn import BatchNormAct2d, PreActBasicBlock, PreActBottleneck
from model_compare import (assert_float32_like_stock, float32_errors, randomise, save_load, saved_bytes, structure,
                           tensor_ptrs, train_and_compare)


def tiny(kind):
    """'cifar': depth-20 CIFAR bottleneck net (2 units per stage, stride on the 1x1 conv, projection shortcuts
    at every stage entry); 'imagenet-basic' / 'imagenet-bottleneck': the ImageNet layout (7x7 stem + max-pool,
    stride on the 3x3 conv) at toy widths."""
    if kind == "cifar":
        return randomise(preact.preact_resnet_cifar(20, num_classes=5))
    block = preact.PreActBasicBlock if kind == "imagenet-basic" else preact.PreActBottleneck
    return randomise(preact.PreActResNet(block, [1, 2, 1], [4, 8, 8], num_classes=5, stem="imagenet",
                                         stem_width=8))


def _units(model, classes):
    return [m for m in model.modules() if isinstance(m, classes)]


@pytest.mark.parametrize("depth,units,params", [(164, 54, 1.703), (1001, 333, 10.328)])
def test_cifar_depth_and_structure(depth, units, params):
    """ResNet-164 / ResNet-1001: 9n + 2 weighted layers (stem conv + 3 convs per unit + fc; the 3 projection
    convs are not counted, as in the paper), parameters as in the paper (1.7M; 10.2M quoted, 10.33M here with
    BN and fc), every BN -> ReLU pair fused, state_dict keys unchanged, unconvert restores the stock classes."""
    with torch.device("meta"):
        stock = getattr(models, f"preact_resnet{depth}")(fused=False)
    fused = convert(copy.deepcopy(stock))
    convs = [m for m in stock.modules() if isinstance(m, nn.Conv2d)]
    projections = [m for m in stock.modules() if isinstance(m, preact.PreActBottleneck) and m.downsample is not None]
    assert len(convs) - len(projections) + 1 == depth and len(projections) == 3
    assert round(sum(p.numel() for p in stock.parameters()) / 1e6, 3) == params
    assert len(_units(stock, preact.PreActBottleneck)) == units and type(stock.bn) is nn.BatchNorm2d
    assert len(_units(fused, PreActBottleneck)) == units and not _units(fused, preact.PreActBottleneck)
    assert sum(type(m) is BatchNormAct2d and m.act == "relu" for m in fused.modules()) == 3 * units + 1
    assert not any(type(m) is nn.BatchNorm2d for m in fused.modules())
    assert [(k, v.shape) for k, v in fused.state_dict().items()] == \
        [(k, v.shape) for k, v in stock.state_dict().items()]
    back = unconvert(fused)
    assert structure(back) == structure(stock) and repr(back) == repr(stock)
    assert [m.stride for m in stock.layer2[0].modules() if isinstance(m, nn.Conv2d)] == [(2, 2), (1, 1), (1, 1),
                                                                                        (2, 2)]


@pytest.mark.parametrize("kind", ["cifar", "imagenet-basic", "imagenet-bottleneck"])
def test_tiny_preact_trains_like_stock_float64(kind):
    """Two momentum-SGD steps and an eval forward in float64 through the default backend: outputs, input and
    parameter gradients, running statistics within 1e-10."""
    stock = tiny(kind).double()
    fused = convert(copy.deepcopy(stock))
    assert _units(fused, (PreActBasicBlock, PreActBottleneck))
    shape = (4, 3, 8, 8) if kind == "cifar" else (4, 3, 16, 16)
    train_and_compare(stock, fused, tol=1e-10, shape=shape)


def test_tiny_preact_float32_error_like_stock():
    """float32 against a float64 reference: each fused error (norm-wise; output, input gradient, worst parameter
    gradient, worst running statistic, eval output) within 2x stock float32's + 8 eps
    (`assert_float32_like_stock`). Measured, seeds 0-7: stock 6.4e-7..1.3e-6 in the output, 1.2e-6..1.8e-6
    input grad, 2.1e-6..3.8e-6 worst parameter grad, 1.4e-7..2.5e-7 statistics, 1.7e-7..6.8e-7 eval output;
    fused 6.7e-7..1.9e-6, 1.3e-6..1.8e-6, 2.1e-6..3.9e-6, 1.6e-7..2.4e-7, 2.6e-7..7.3e-7: at most 0.53 of the
    bound."""
    stock = tiny("cifar")
    fused = convert(copy.deepcopy(stock))
    assert_float32_like_stock(float32_errors(stock, fused, shape=(4, 3, 8, 8)))


@pytest.mark.slow
def test_resnet164_matches_stock():
    """The real ResNet-164 on a 2x3x8x8 input, float64: one momentum-SGD step and an eval forward, fused vs
    stock within 1e-9 (163 BN + ReLU ops in a chain). Runs with the reference backend on CPU: one step through
    the Triton interpreter takes ~30 s here; modules, op registration and autograd are the same for every
    backend, and the tiny networks above run the same units through the Triton kernels."""
    torch.manual_seed(0)
    stock = randomise(models.preact_resnet164(fused=False)).double()
    fused = convert(copy.deepcopy(stock))
    with fusedres.use_backend("reference" if not torch.cuda.is_available() else None):
        train_and_compare(stock, fused, tol=1e-9, steps=1, shape=(2, 3, 8, 8), num_classes=10)


def test_unconvert_and_save_load():
    model = tiny("cifar").double()
    model.layer2.eval()
    before_structure, before_repr, ptrs = structure(model), repr(model), tensor_ptrs(model)
    modes = [m.training for m in model.modules()]
    fused = convert(model)
    assert fused is model and type(fused.bn) is BatchNormAct2d and type(fused.relu) is nn.Identity
    assert tensor_ptrs(fused) == ptrs and convert(fused) is fused
    assert [m.training for m in fused.modules()] == modes
    fused.eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    loaded = save_load(fused)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), fused(x), rtol=0, atol=0)
    assert structure(loaded) == structure(fused)
    back = unconvert(fused)
    assert back is model and structure(back) == before_structure and repr(back) == before_repr
    assert tensor_ptrs(back) == ptrs
    unit = preact.PreActBottleneck(8, 4)
    fused_unit = convert(unit)
    assert type(fused_unit) is PreActBottleneck and fused_unit.conv2 is unit.conv2
    assert fused_unit.bn1.weight is unit.bn1.weight and type(unconvert(fused_unit)) is preact.PreActBottleneck


def test_custom_units_left_alone():
    class Custom(preact.PreActBottleneck):
        def forward(self, x):
            return super().forward(x) * 2

    class CustomNet(preact.PreActResNet):
        def forward(self, x):
            return super().forward(x)

    unit = preact.PreActBottleneck(8, 2)
    unit.bn2 = nn.GroupNorm(2, 2)
    seq = convert(nn.Sequential(Custom(8, 2), unit))
    assert type(seq[0]) is Custom and type(seq[1]) is preact.PreActBottleneck
    net = convert(CustomNet(preact.PreActBasicBlock, [1], [4], stem_width=4))
    assert type(net.bn) is nn.BatchNorm2d and type(net.relu) is nn.ReLU and type(net.layer1[0]) is PreActBasicBlock


def test_constructors():
    for name in ("preact_resnet164", "preact_resnet1001"):
        params = inspect.signature(getattr(models, name)).parameters
        assert list(params) == ["num_classes", "fused", "mode"] and params["fused"].default is True
        assert params["mode"].default == "bn" and params["mode"].kind is inspect.Parameter.KEYWORD_ONLY
    with torch.device("meta"):
        m = models.preact_resnet50(num_classes=7)
        s = models.preact_resnet18(fused=False)
        c = models.preact_resnet164(num_classes=100)
    assert type(c.layer3[-1]) is PreActBottleneck and c.fc.out_features == 100
    assert m.fc.out_features == 7 and type(m.layer1[0]) is PreActBottleneck and type(m.bn) is BatchNormAct2d
    assert m.layer2[0].conv2.stride == (2, 2) and m.layer2[0].conv1.stride == (1, 1)  # stride on the 3x3
    assert type(s.layer1[0]) is preact.PreActBasicBlock and type(s.bn) is nn.BatchNorm2d
    with pytest.raises(ValueError, match="9n \\+ 2"):
        models.preact_resnet_cifar(100)


def test_saved_activation_bytes_like_stock():
    """What autograd keeps for backward, counted in unique storages: inside a unit, a fused BN + ReLU saves its
    input x and its output is saved by the next conv, exactly the storages stock's BN (x) and ReLU / conv
    (output) keep. The one difference is the network's final BN + ReLU, whose output only stock's ReLU saves
    (global average pooling does not), so fused saves exactly that one activation fewer. Measured the same way
    at 2x3x32x32: ResNet-164 stock 49.91 MB, fused 49.78 MB (-0.26 %)."""
    stock = tiny("cifar")
    fused = convert(copy.deepcopy(stock))
    x = torch.randn(2, 3, 16, 16)
    final = stock.fc.in_features * 2 * 4 * 4 * 4  # N x C x H x W float32 after the last stage (16 / 4 = 4)
    # activations only: the fused BN also keeps its per-channel scale and shift (C floats each) for backward
    assert saved_bytes(stock, x, True) - saved_bytes(fused, x, True) == final


