"""fusedres.nn against stock PyTorch/torchvision: BatchNormAct2d vs nn.BatchNorm2d [+ residual] [+ ReLU], the
two-BN tail, the fused blocks vs torchvision's, the activation memory they save, and their error messages."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet as tv

from fusedres.nn import BasicBlock, BatchNormAct2d, Bottleneck, dual_bn_act_modules

CL = torch.channels_last
NCHW = torch.contiguous_format


def assert_close(actual, expected, tol, what=""):
    """Elementwise |actual - expected| <= tol * max|expected| (+ tol * |expected|): relative to the tensor's
    scale, so values that cancel to ~0 (BN outputs, gradients) do not need an absolute tolerance each."""
    assert actual.shape == expected.shape, what
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    a, e = actual.detach().double(), expected.detach().double()
    scale = max(e.abs().max().item(), 1e-30)
    torch.testing.assert_close(a, e, rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


# ----------------------------------------------------------------------------------- BatchNormAct2d
def _stock_forward(bn, x, residual, act):
    y = bn(x)
    if residual is not None:
        y = y + residual
    return F.relu(y) if act == "relu" else y


def _run_pair(fused, stock, shape, device, *, act, residual, memory_format, dtype=torch.float32, steps=3,
              tol=1e-5, stock_dtype=None):
    """Run `steps` forward/backward passes (fresh inputs each) through both, comparing everything."""
    stock_dtype = stock_dtype or dtype
    for step in range(steps):
        x = (torch.randn(shape, device=device) * 2 + 0.5).contiguous(memory_format=memory_format)
        r = torch.randn(shape, device=device).contiguous(memory_format=memory_format) if residual else None
        g = torch.randn(shape, device=device)
        xf = x.to(dtype).requires_grad_()
        xs = x.to(stock_dtype).requires_grad_()
        rf = None if r is None else r.to(dtype).requires_grad_()
        rs = None if r is None else r.to(stock_dtype).requires_grad_()
        yf = fused(xf, residual=rf)
        ys = _stock_forward(stock, xs, rs, act)
        assert yf.dtype == dtype
        assert yf.is_contiguous(memory_format=memory_format)
        assert_close(yf.to(stock_dtype), ys, tol, f"output, step {step}")
        yf.backward(g.to(dtype))
        ys.backward(g.to(stock_dtype))
        assert_close(xf.grad.to(stock_dtype), xs.grad, tol, f"grad x, step {step}")
        if residual:
            assert_close(rf.grad.to(stock_dtype), rs.grad, tol, f"grad residual, step {step}")
    for (name, pf), (_, ps) in zip(fused.named_parameters(), stock.named_parameters()):
        assert_close(pf.grad.to(ps.dtype), ps.grad, tol, f"grad {name}")
    for (name, bf), (_, bs) in zip(fused.named_buffers(), stock.named_buffers()):
        if name == "num_batches_tracked":
            assert torch.equal(bf, bs)
        else:
            assert_close(bf.to(bs.dtype), bs, tol, name)


BN_CASES = {  # name: (BatchNorm2d kwargs, act, residual)
    "relu": ({}, "relu", False),
    "relu_residual": ({}, "relu", True),
    "residual_no_act": ({}, None, True),
    "plain": ({}, None, False),
    "cumulative_momentum": ({"momentum": None}, "relu", True),
    "no_affine": ({"affine": False}, "relu", True),
    "no_running_stats": ({"track_running_stats": False}, "relu", True),
    "no_affine_no_stats_cumulative": ({"affine": False, "track_running_stats": False, "momentum": None},
                                      None, False),
}


def _make_pair(channels, kwargs, act, device, dtype=torch.float32):
    stock = nn.BatchNorm2d(channels, **kwargs).to(device, dtype)
    if stock.weight is not None:
        with torch.no_grad():  # non-trivial affine parameters
            stock.weight.uniform_(0.5, 1.5)
            stock.bias.uniform_(-0.5, 0.5)
    fused = BatchNormAct2d.from_bn(copy.deepcopy(stock), act=act)
    return fused, stock


@pytest.mark.parametrize("memory_format", [NCHW, CL], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("channels", [3, 5])
@pytest.mark.parametrize("case", list(BN_CASES))
def test_batchnorm_act_train_then_eval(case, channels, memory_format, device):
    kwargs, act, residual = BN_CASES[case]
    fused, stock = _make_pair(channels, kwargs, act, device)
    shape = (2, channels, 4, 5)
    _run_pair(fused, stock, shape, device, act=act, residual=residual, memory_format=memory_format)
    fused.eval()
    stock.eval()
    for p in (*fused.parameters(), *stock.parameters()):
        p.grad = None
    _run_pair(fused, stock, shape, device, act=act, residual=residual, memory_format=memory_format, steps=1)


def test_momentum_none_is_cumulative_average(device):
    """momentum=None: running stats are the plain average of the batch statistics seen so far."""
    bn = BatchNormAct2d(3, momentum=None, act=None).to(device)
    xs = [torch.randn(4, 3, 2, 2, device=device) * (i + 1) + i for i in range(3)]
    for x in xs:
        bn(x)
    assert bn.num_batches_tracked.item() == 3
    means = torch.stack([x.mean((0, 2, 3)) for x in xs])
    variances = torch.stack([x.var((0, 2, 3), unbiased=True) for x in xs])
    assert_close(bn.running_mean, means.mean(0), 1e-5, "running_mean")
    assert_close(bn.running_var, variances.mean(0), 1e-5, "running_var")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("module_dtype", ["float32", "same"], ids=["fp32_params", "lowp_params"])
def test_batchnorm_act_low_precision(dtype, module_dtype, device):
    """Low-precision activations (with fp32 parameters as under autocast, or a fully cast module) against the
    fp32 module on the same (rounded) inputs: 1e-2 relative, a few bf16 ulps (2**-8 = 3.9e-3)."""
    mdtype = torch.float32 if module_dtype == "float32" else dtype
    fused, stock = _make_pair(5, {}, "relu", device)
    fused = fused.to(mdtype)
    _run_pair(fused, stock, (2, 5, 4, 4), device, act="relu", residual=True, memory_format=CL, dtype=dtype,
              stock_dtype=torch.float32, tol=1e-2, steps=2)


def test_batchnorm_act_float64(device):
    fused, stock = _make_pair(3, {"momentum": None}, "relu", device, dtype=torch.float64)
    _run_pair(fused, stock, (2, 3, 3, 3), device, act="relu", residual=True, memory_format=NCHW,
              dtype=torch.float64, tol=1e-12)


def test_from_bn_shares_tensors_and_state_dict_keys():
    bn = nn.BatchNorm2d(4)
    bn.eval()
    fused = BatchNormAct2d.from_bn(bn, act=None)
    assert not fused.training and fused.act is None
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        assert getattr(fused, name) is getattr(bn, name)
    assert list(fused.state_dict()) == list(bn.state_dict())
    assert all(fused.state_dict()[k].data_ptr() == v.data_ptr() for k, v in bn.state_dict().items())
    back = fused.to_bn()
    assert type(back) is nn.BatchNorm2d and back.weight is bn.weight and back.running_var is bn.running_var
    for kwargs in ({}, {"affine": False}, {"track_running_stats": False}, {"momentum": None, "eps": 1e-3}):
        stock = nn.BatchNorm2d(6, **kwargs)
        new = BatchNormAct2d(6, **kwargs)
        assert list(new.state_dict()) == list(stock.state_dict())
        new.load_state_dict(stock.state_dict(), strict=True)
        stock.load_state_dict(new.state_dict(), strict=True)
        assert (new.eps, new.momentum, new.affine, new.track_running_stats) == \
            (stock.eps, stock.momentum, stock.affine, stock.track_running_stats)
    assert isinstance(new, nn.BatchNorm2d)
    with pytest.raises(ValueError, match="unsupported activation 'gelu'"):
        BatchNormAct2d(3, act="gelu")


# ----------------------------------------------------------------------------------- errors
def test_errors(device):
    bn = BatchNormAct2d(3).to(device)
    x = torch.randn(2, 3, 4, 4, device=device)
    with pytest.raises(ValueError, match=r"expected 4D input .*got 3D"):
        bn(x[0])
    with pytest.raises(ValueError, match="has 5 channels but the layer has num_features=3"):
        bn(torch.randn(2, 5, 4, 4, device=device))
    with pytest.raises(ValueError, match=r"residual shape \(2, 3, 4, 3\) does not match"):
        bn(x, residual=torch.randn(2, 3, 4, 3, device=device))
    with pytest.raises(TypeError, match="residual dtype torch.float64 does not match"):
        bn(x, residual=x.double())
    with pytest.raises(ValueError, match="residual is on meta"):
        bn(x, residual=torch.empty_like(x, device="meta"))
    with pytest.raises(TypeError, match="dtype torch.int64; supported: float32, float16, bfloat16"):
        bn(torch.ones(2, 3, 4, 4, dtype=torch.long, device=device))
    with pytest.raises(ValueError, match="expected more than 1 value per channel when training"):
        bn(torch.randn(1, 3, 1, 1, device=device))
    assert bn.num_batches_tracked.item() == 0, "a rejected input must not touch the running statistics"
    bn.eval()
    assert bn(torch.randn(1, 3, 1, 1, device=device)).shape == (1, 3, 1, 1)  # eval: one value is fine


# ----------------------------------------------------------------------------------- the two-BN tail
@pytest.mark.parametrize("mode", ["train", "eval", "shortcut_bn_eval"])
def test_dual_bn_act_modules(mode, device):
    """relu(bn(x) + bn_r(r)) with different momentum (one cumulative) and eps; in `shortcut_bn_eval` the
    shortcut BN alone is in eval mode, which takes the unfused fallback."""
    bn = nn.BatchNorm2d(5, momentum=None).to(device)
    bn_r = nn.BatchNorm2d(5, momentum=0.3, eps=1e-3).to(device)
    with torch.no_grad():
        for m in (bn, bn_r):
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    if mode == "eval":
        bn.eval()
        bn_r.eval()
    if mode == "shortcut_bn_eval":
        bn_r.eval()
    fbn, fbn_r = copy.deepcopy(bn), copy.deepcopy(bn_r)
    for step in range(2):
        x = (torch.randn(2, 5, 3, 3, device=device) + 1).contiguous(memory_format=CL)
        r = torch.randn(2, 5, 3, 3, device=device).contiguous(memory_format=CL) * 3
        xf, rf, xs, rs = (t.clone().requires_grad_() for t in (x, r, x, r))
        yf = dual_bn_act_modules(xf, fbn, rf, fbn_r)
        ys = F.relu(bn(xs) + bn_r(rs))
        assert_close(yf, ys, 1e-5, f"output {step}")
        g = torch.randn_like(ys)
        yf.backward(g)
        ys.backward(g)
        assert_close(xf.grad, xs.grad, 1e-5, "grad x")
        assert_close(rf.grad, rs.grad, 1e-5, "grad r")
    for mf, ms in ((fbn, bn), (fbn_r, bn_r)):
        for (name, tf), ts in zip(mf.state_dict().items(), ms.state_dict().values()):
            assert_close(tf.double(), ts.double(), 1e-5, name)
        assert_close(mf.weight.grad, ms.weight.grad, 1e-5, "weight grad")
        assert_close(mf.bias.grad, ms.bias.grad, 1e-5, "bias grad")


# ----------------------------------------------------------------------------------- blocks
def _ds(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


BLOCK_CASES = {  # name: (torchvision block factory, input channels)
    "basic_identity": (lambda: tv.BasicBlock(4, 4), 4),
    "basic_downsample": (lambda: tv.BasicBlock(4, 6, stride=2, downsample=_ds(4, 6, 2)), 4),
    "bottleneck_identity": (lambda: tv.Bottleneck(12, 3), 12),
    "bottleneck_downsample": (lambda: tv.Bottleneck(6, 3, stride=2, downsample=_ds(6, 12, 2)), 6),
    "bottleneck_grouped": (lambda: tv.Bottleneck(6, 4, downsample=_ds(6, 16, 1), groups=2, base_width=32), 6),
    "basic_other_downsample": (lambda: tv.BasicBlock(4, 6, stride=2, downsample=nn.Sequential(
        nn.AvgPool2d(2), nn.Conv2d(4, 6, 1, bias=False), nn.BatchNorm2d(6))), 4),
}


def _randomize_bn(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)


@pytest.mark.parametrize("memory_format", [NCHW, CL], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("case", list(BLOCK_CASES))
def test_block_matches_torchvision(case, memory_format, device):
    factory, cin = BLOCK_CASES[case]
    stock = factory().to(device, memory_format=memory_format)
    _randomize_bn(stock)
    fused_cls = BasicBlock if isinstance(stock, tv.BasicBlock) else Bottleneck
    fused = fused_cls.from_torchvision(copy.deepcopy(stock))
    assert isinstance(fused.bn1, BatchNormAct2d) and isinstance(fused.relu, nn.ReLU)
    for mode in ("train", "train", "eval"):
        stock.train(mode == "train")
        fused.train(mode == "train")
        x = torch.randn(2, cin, 8, 8, device=device).contiguous(memory_format=memory_format)
        xs, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        ys, yf = stock(xs), fused(xf)
        assert_close(yf, ys, 1e-5, f"{mode} output")
        g = torch.randn_like(ys)
        ys.backward(g)
        yf.backward(g)
        assert_close(xf.grad, xs.grad, 1e-5, f"{mode} grad x")
    for (name, pf), (_, ps) in zip(fused.named_parameters(), stock.named_parameters()):
        assert_close(pf.grad, ps.grad, 1e-5, f"grad {name}")
    for (name, tf), ts in zip(fused.state_dict().items(), stock.state_dict().values()):
        assert_close(tf.double(), ts.double(), 1e-5, name)


def test_block_under_autocast(device):
    """Under autocast conv outputs are low precision while the block input is fp32: the identity is cast to
    the BN output's dtype, as stock `out += identity` does."""
    dtype = torch.bfloat16
    stock = tv.Bottleneck(8, 2).to(device)
    _randomize_bn(stock)
    fused = Bottleneck.from_torchvision(copy.deepcopy(stock))
    x = torch.randn(2, 8, 6, 6, device=device)
    with torch.autocast(device_type=device, dtype=dtype):
        ys, yf = stock(x), fused(x)
    assert yf.dtype == ys.dtype == dtype
    assert_close(yf.float(), ys.float(), 2e-2, "autocast output")


@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_block_constructor_matches_torchvision_keys(kind):
    if kind == "basic":
        args = dict(inplanes=4, planes=8, stride=2, downsample=_ds(4, 8, 2))
        fused, stock = BasicBlock(**args), tv.BasicBlock(**args)
    else:
        args = dict(inplanes=8, planes=4, stride=2, groups=2, base_width=32)
        fused = Bottleneck(**args, downsample=_ds(8, 16, 2))
        stock = tv.Bottleneck(**args, downsample=_ds(8, 16, 2))
    assert [(k, v.shape) for k, v in fused.state_dict().items()] == \
        [(k, v.shape) for k, v in stock.state_dict().items()]
    assert [n for n, _ in fused.named_modules()] == [n for n, _ in stock.named_modules()]
    fused.load_state_dict(stock.state_dict(), strict=True)
    stock.load_state_dict(fused.state_dict(), strict=True)
    assert fused.stride == stock.stride == 2 and fused.expansion == stock.expansion
    assert all(type(getattr(fused, n)) is BatchNormAct2d and getattr(fused, n).act == "relu"
               for n in ("bn1", "bn2") + (("bn3",) if kind == "bottleneck" else ()))
    assert type(fused.downsample[1]) is nn.BatchNorm2d
    with pytest.raises(ValueError, match="BasicBlock only supports groups=1"):
        BasicBlock(4, 4, groups=2)
    with pytest.raises(TypeError, match="fuse nn.BatchNorm2d only; norm_layer built a GroupNorm"):
        Bottleneck(8, 2, norm_layer=lambda c: nn.GroupNorm(1, c))


def test_from_and_to_torchvision_share_everything():
    stock = tv.Bottleneck(8, 4, stride=2, downsample=_ds(8, 16, 2))
    stock.eval()
    fused = Bottleneck.from_torchvision(stock)
    assert not fused.training
    for name in ("conv1", "conv2", "conv3", "relu", "downsample"):
        assert getattr(fused, name) is getattr(stock, name)
    assert all(fused.state_dict()[k].data_ptr() == v.data_ptr() for k, v in stock.state_dict().items())
    assert list(fused.state_dict()) == list(stock.state_dict())
    back = fused.to_torchvision()
    assert type(back) is tv.Bottleneck and type(back.bn3) is nn.BatchNorm2d and back.stride == 2
    assert all(back.state_dict()[k].data_ptr() == v.data_ptr() for k, v in stock.state_dict().items())
    with pytest.raises(TypeError, match="needs a torchvision BasicBlock"):
        BasicBlock.from_torchvision(stock)


# ----------------------------------------------------------------------------------- activation memory
def _saved_activation_bytes(block, x):
    """Bytes of the distinct 4-D non-parameter storages autograd saves during block(x)."""
    own = {t.untyped_storage().data_ptr() for t in (*block.parameters(), *block.buffers())}
    saved = {}

    def pack(t):
        if t.dim() == 4 and t.untyped_storage().data_ptr() not in own:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = block(x)
    return sum(saved.values()), y


def _nbytes(*shape, elem=4):
    n = elem
    for s in shape:
        n *= s
    return n


def test_saved_activation_bytes_basic_block(device):
    """Stock saves x (conv1), conv1 out (bn1), bn1/relu out (relu, conv2), conv2 out (bn2) and the block
    output (final relu): 5 activations. Fused saves x, conv1 out, bn1 out, conv2 out: the tail's residual is
    x, already saved by conv1, and its ReLU mask is recomputed, so the output is not saved."""
    stock = tv.BasicBlock(8, 8).to(device)
    fused = BasicBlock.from_torchvision(copy.deepcopy(stock))
    x = torch.randn(2, 8, 8, 8, device=device)
    a = _nbytes(2, 8, 8, 8)
    stock_bytes, _ = _saved_activation_bytes(stock, x)
    fused_bytes, _ = _saved_activation_bytes(fused, x)
    assert stock_bytes == 5 * a
    assert fused_bytes == 4 * a


def test_saved_activation_bytes_bottleneck_downsample(device):
    """Downsampling Bottleneck (x: 2x16x8x8, width 4, output 2x16x4x4). Stock saves x, c1, r1 (8x8, 4 ch),
    c2, r2 (4x4, 4 ch), c3, the shortcut conv output d and the block output (4x4, 16 ch). The fused tail
    (dual_bn_act) saves c3 and d only: one output-sized activation less."""
    stock = tv.Bottleneck(16, 4, stride=2, downsample=_ds(16, 16, 2)).to(device)
    fused = Bottleneck.from_torchvision(copy.deepcopy(stock))
    x = torch.randn(2, 16, 8, 8, device=device)
    x_b, c1, c2, c3 = _nbytes(2, 16, 8, 8), _nbytes(2, 4, 8, 8), _nbytes(2, 4, 4, 4), _nbytes(2, 16, 4, 4)
    stock_bytes, _ = _saved_activation_bytes(stock, x)
    fused_bytes, _ = _saved_activation_bytes(fused, x)
    assert stock_bytes == x_b + 2 * c1 + 2 * c2 + 3 * c3
    assert fused_bytes == x_b + 2 * c1 + 2 * c2 + 2 * c3
