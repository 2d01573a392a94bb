"""Learned skip weights and zero-init residuals: relu(a * BN(x) + b * shortcut) fused at no extra pass.

Op level: `bn_act(..., residual_weight=w)` (the shortcut weight) against F.batch_norm + w * r + relu in float64.
"""
import copy

import pytest
import torch
from torch import nn
from torchvision.models import resnet as tv

import fusedres
from fusedres.reference import bn_act_reference
from model_compare import assert_like_stock, assert_runs_like_stock
from helpers import (DTYPES, activation, assert_close, backend_names, channel_params, double_leaf, leaf,
                     randomise_bns)


@pytest.fixture(autouse=True)
def _tiles(small_tiles):
    pass


def _weighted_reference(x, rm, rv, w, b, training, r, rw, relu):
    y = bn_act_reference(x, rm, rv, w, b, training, 0.1, 1e-5, r * rw.view(1, -1, 1, 1), False)
    return torch.relu(y) if relu else y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("relu", [True, False])
def test_residual_weight_matches_reference(device, dtype, channels_last, training, relu):
    shape = (2, 5, 3, 3)
    for backend in backend_names(device):
        x = activation(shape, dtype, device, channels_last, scale=2.0)
        r = activation(shape, dtype, device, channels_last)
        dy = activation(shape, dtype, device, channels_last)
        w, b, rm, rv = channel_params(5, device)
        rw = torch.randn(5, device=device)
        xs, rs, ws, bs, rws = leaf(x), leaf(r), leaf(w), leaf(b), leaf(rw)
        rm_f, rv_f = rm.clone(), rv.clone()
        with fusedres.use_backend(backend):
            y = fusedres.bn_act(xs, rm_f, rv_f, ws, bs, training, residual=rs, relu=relu, residual_weight=rws)
            y.backward(dy)
        xd, rd, wd, bd, rwd = (double_leaf(t) for t in (x, r, w, b, rw))
        rm_d, rv_d = rm.double(), rv.double()
        yd = _weighted_reference(xd, rm_d, rv_d, wd, bd, training, rd, rwd, relu)
        yd.backward(dy.double())
        what = f"{backend} "
        assert_close(y, yd, dtype, what + "y")
        assert_close(xs.grad, xd.grad, dtype, what + "grad x")
        assert_close(rs.grad, rd.grad, dtype, what + "grad residual")
        acc = torch.float32 if dtype == torch.float32 else dtype
        assert_close(rws.grad, rwd.grad, acc, what + "grad residual_weight")
        assert_close(ws.grad, wd.grad, acc, what + "grad weight")
        assert_close(bs.grad, bd.grad, acc, what + "grad bias")
        assert_close(rm_f, rm_d, torch.float32, what + "running_mean")


def test_residual_weight_gradcheck(device):
    x = activation((2, 3, 2, 3), torch.float64, device, False).requires_grad_()
    r = activation((2, 3, 2, 3), torch.float64, device, True).requires_grad_()
    w, b, _, _ = channel_params(3, device, torch.float64)
    rw = torch.randn(3, device=device, dtype=torch.float64, requires_grad=True)
    fn = lambda x, r, w, b, rw: fusedres.bn_act(x, None, None, w, b, True, residual=r, relu=True,  # noqa: E731
                                                residual_weight=rw)
    torch.autograd.gradcheck(fn, (x, r, w.requires_grad_(), b.requires_grad_(), rw))


def test_residual_weight_opcheck(device):
    x = activation((2, 3, 4, 3), torch.float32, device, True).requires_grad_()
    r = activation((2, 3, 4, 3), torch.float32, device, True).requires_grad_()
    w, b, rm, rv = channel_params(3, device)
    rw = torch.randn(3, device=device, requires_grad=True)
    ops = torch.ops.fusedres
    stats = ops.bn_stats(x.detach(), w, b, None, None, None, 0.1, 1e-5)
    torch.library.opcheck(ops.bn_act_train.default, (x, w, b, r, *stats, 1e-5, True, rw))
    torch.library.opcheck(ops.bn_act_eval.default, (x, w, b, r, rm, rv, 1e-5, False, rw))
    y = ops.bn_act_train(x, w, b, r, *stats, 1e-5, True, rw)
    torch.library.opcheck(ops.bn_act_backward.default,
                          (torch.randn_like(y), x.detach(), w, b, r.detach(), *stats, 1e-5, True, True, True,
                           rw.detach()))


def test_residual_weight_needs_residual_and_c_values(device):
    x = activation((2, 3, 2, 2), torch.float32, device, False)
    with pytest.raises(ValueError, match="residual_weight was given without a residual"):
        fusedres.bn_act(x, None, None, training=True, residual_weight=torch.ones(3, device=device))
    with pytest.raises(ValueError, match=r"residual_weight.*expected shape \(3,\)"):
        fusedres.bn_act(x, None, None, training=True, residual=x.clone(), residual_weight=torch.ones(4, device=device))


# ---------------------------------------------------------------- blocks with learned skip weights
def _stock_forward_with_skip(b, x, w, on):
    """A post-activation block's forward (torchvision's or timm's attribute names) with the skip weight applied
    in plain PyTorch (the reference)."""
    out = torch.relu(b.bn1(b.conv1(x)))
    if hasattr(b, "conv3"):
        out = torch.relu(b.bn2(b.conv2(out)))
        out = b.bn3(b.conv3(out))
    else:
        out = b.bn2(b.conv2(out))
    identity = x if b.downsample is None else b.downsample(x)
    wv = w.view(1, -1, 1, 1)
    return torch.relu(out * wv + identity if on == "branch" else out + identity * wv)


def _block(kind):
    if kind == "basic":
        return tv.BasicBlock(6, 6)
    if kind == "basic_down":
        return tv.BasicBlock(4, 6, stride=2, downsample=nn.Sequential(nn.Conv2d(4, 6, 1, 2, bias=False),
                                                                       nn.BatchNorm2d(6)))
    return tv.Bottleneck(4, 2, downsample=nn.Sequential(nn.Conv2d(4, 8, 1, bias=False), nn.BatchNorm2d(8)))


def _check_skip_steps(stock, fused, on, trainings):
    """For each step (training or eval): output, input and every parameter gradient (the skip weight's
    included) and the buffers of `fused` against `stock` + the weight in plain PyTorch, float64."""
    ref_w = fused.skip_weight.detach().clone().requires_grad_()
    for training in trainings:
        stock.train(training)
        fused.train(training)
        x = torch.randn(2, stock.conv1.in_channels, 6, 6, dtype=torch.float64)
        xs, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        ys = _stock_forward_with_skip(stock, xs, ref_w, on)
        yf = fused(xf)
        dy = torch.randn_like(ys)
        ys.backward(dy)
        yf.backward(dy)
        torch.testing.assert_close(yf, ys, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(xf.grad, xs.grad, rtol=1e-9, atol=1e-10)
        ref_params = dict(stock.named_parameters(), skip_weight=ref_w)
        assert sorted(ref_params) == sorted(n for n, _ in fused.named_parameters())
        for name, p in fused.named_parameters():
            torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-9, atol=1e-10, msg=name)
        for (name, b), c in zip(fused.named_buffers(), stock.buffers()):
            torch.testing.assert_close(b, c, rtol=1e-12, atol=1e-12, msg=name)
        for p in [*fused.parameters(), *stock.parameters(), ref_w]:
            p.grad = None


@pytest.mark.parametrize("mode", ["bn", "conv"])
@pytest.mark.parametrize("on", ["branch", "shortcut"])
@pytest.mark.parametrize("kind", ["scalar", "channel"])
@pytest.mark.parametrize("block", ["basic", "basic_down", "bottleneck"])
def test_skip_weight_block_matches_reference(on_test_device, block, kind, on, mode):
    """Fused block with a learned skip weight vs torchvision's block + the weight in plain PyTorch, float64:
    output, input and every parameter gradient (the skip weight's included), running statistics; two
    training steps then eval."""
    stock = _block(block).double()
    randomise_bns(stock)
    fused = fusedres.convert(copy.deepcopy(stock), mode=mode, skip_weight=kind, skip_on=on, skip_init=0.5)
    with torch.no_grad():
        fused.skip_weight.copy_(torch.randn_like(fused.skip_weight))
    _check_skip_steps(stock, fused, on, (True, True, False))


def test_skip_weight_float32_channels_last(on_test_device):
    stock = _block("bottleneck").to(memory_format=torch.channels_last)
    randomise_bns(stock)
    fused = fusedres.convert(copy.deepcopy(stock), skip_weight="channel", skip_on="shortcut")
    with torch.no_grad():
        fused.skip_weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    w = fused.skip_weight.detach()
    truth = _stock_forward_with_skip(copy.deepcopy(stock).double(), x, w.double(), "shortcut")
    plain = _stock_forward_with_skip(stock, x.float(), w, "shortcut")
    assert_like_stock(fused(x.float()), plain, truth, "skip-weight bottleneck output")


def test_skip_init_zero_starts_as_identity(on_test_device):
    """ReZero/SkipInit: with skip_init=0 on the branch, each identity block is relu(x) at first, and the skip
    weights still receive gradients."""
    model = fusedres.models.resnet18(num_classes=3, skip_weight="scalar", skip_init=0.0)
    block = model.layer1[0]
    x = torch.randn(2, 64, 2, 2).abs()
    torch.testing.assert_close(block(x), x)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    weights = [m.skip_weight for m in model.modules() if isinstance(m, fusedres.nn.BasicBlock)]
    assert len(weights) == 8 and all(w.shape == (1,) and w.grad is not None for w in weights)
    assert any(w.grad.abs().item() > 0 for w in weights)
    keys = model.state_dict().keys()
    assert "layer1.0.skip_weight" in keys and sum(k.endswith("skip_weight") for k in keys) == 8


def test_zero_init_residual_honoured(on_test_device):
    """torchvision's zero_init_residual (last BN weight 0: every block starts as relu(shortcut)) survives
    conversion: the fused model equals stock and an identity block returns relu(x)."""
    stock = tv.resnet18(num_classes=3, zero_init_residual=True)
    fused = fusedres.convert(copy.deepcopy(stock))
    blocks = [m for m in fused.modules() if isinstance(m, fusedres.nn.BasicBlock)]
    assert blocks and all(float(m.bn2.weight.detach().abs().max()) == 0.0 for m in blocks)
    x = torch.randn(2, 64, 4, 4)
    torch.testing.assert_close(fused.layer1[0](x), torch.relu(x))
    xi = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    assert_runs_like_stock(stock, fused, lambda model, dtype: {"output": model(xi.to(dtype))})


def test_skip_weight_conversion_rules():
    model = tv.ResNet(tv.BasicBlock, [1, 1, 1, 1], num_classes=2)
    fused = fusedres.convert(model, skip_weight="channel")
    first = [m.skip_weight for m in fused.modules() if isinstance(m, fusedres.nn.BasicBlock)]
    fusedres.convert(fused, skip_weight="channel")  # idempotent: no second weight, same Parameters
    assert [m.skip_weight for m in fused.modules() if isinstance(m, fusedres.nn.BasicBlock)] == first
    with pytest.raises(ValueError, match="skip weight.*cannot be unconverted"):
        fusedres.unconvert(fused)
    with pytest.raises(ValueError, match="skip_weight must be None or one of"):
        fusedres.convert(tv.resnet18(), skip_weight="vector")
    with pytest.raises(ValueError, match="skip_on one of"):
        fusedres.convert(tv.resnet18(), skip_weight="scalar", skip_on="both")
    with pytest.raises(ValueError, match="no fused post-activation block"):
        fusedres.convert(nn.Sequential(nn.Conv2d(3, 3, 1)), skip_weight="scalar")
    with pytest.raises(ValueError, match="already has a skip weight"):
        fused.layer1[0].add_skip_weight()
    folded = fusedres.fold(fused.eval())
    assert isinstance(folded.layer1[0], fusedres.nn.BasicBlock)  # left unfolded, still correct


def test_skip_weight_checkpoint_roundtrip(tmp_path):
    model = fusedres.models.resnet18(num_classes=3, skip_weight="scalar", skip_on="shortcut")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, fusedres.nn.BasicBlock):
                m.skip_weight.fill_(0.7)
    model.eval()
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(loaded(x), model(x))
    again = fusedres.models.resnet18(num_classes=3, skip_weight="scalar", skip_on="shortcut").eval()
    again.load_state_dict(model.state_dict())
    torch.testing.assert_close(again(x), model(x))


@pytest.mark.parametrize("on", ["branch", "shortcut"])
@pytest.mark.parametrize("block", ["basic", "bottleneck_avgdown"])
def test_skip_weight_timm_block(on_test_device, block, on):
    """timm's fused blocks take the same skip weights: against timm's block + the weight in plain PyTorch,
    float64, one training step then eval."""
    timm_resnet = pytest.importorskip("timm.models.resnet")
    if block == "basic":
        stock = timm_resnet.BasicBlock(6, 6)
    else:
        ds = nn.Sequential(nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False),
                           nn.Conv2d(4, 8, 1, bias=False), nn.BatchNorm2d(8))
        stock = timm_resnet.Bottleneck(4, 2, stride=2, downsample=ds)
    stock = randomise_bns(stock.double())
    fused = fusedres.convert(copy.deepcopy(stock), skip_weight="channel", skip_on=on)
    with torch.no_grad():
        fused.skip_weight.copy_(torch.randn_like(fused.skip_weight))
    _check_skip_steps(stock, fused, on, (True, False))
    with pytest.raises(ValueError, match="skip weight.*cannot be unconverted"):
        fusedres.unconvert(fused)
