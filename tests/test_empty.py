"""Empty batches (N = 0, or an empty spatial extent) behave as in stock PyTorch on every backend: an empty
output in the input's layout, zero parameter gradients, running statistics untouched, num_batches_tracked
still counting, in training and eval, forward and backward."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fusedres
from fusedres.nn import BatchNormAct2d
from fusedres.reference import conv_bn_act_reference
from helpers import backend_names, channel_params

pytestmark = pytest.mark.usefixtures("on_test_device")  # every tensor on the test device (the GPU if any)
BACKENDS = backend_names("cuda" if torch.cuda.is_available() else "cpu")
C = 3
EMPTY_SHAPES = [(0, C, 4, 5), (2, C, 0, 3)]


def _layout(t, channels_last):
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


def _assert_same_layout(y, like):
    """Shape, dtype and strides of stock's empty output (for an empty tensor: the input's own strides)."""
    assert y.shape == like.shape and y.dtype == like.dtype and y.stride() == like.stride()


def _grads(y, tensors):
    """Gradients of sum(y) (all zero for an empty y, with the inputs' shapes), None where a tensor gets none."""
    leaves = [t for t in tensors if t is not None]
    grads = iter(torch.autograd.grad(y.sum(), leaves, allow_unused=True))
    return [None if t is None else next(grads) for t in tensors]


def _assert_grads_equal(got, want):
    for g, w in zip(got, want):
        if w is None:
            assert g is None or not g.any()
        else:
            assert g is not None and g.shape == w.shape
            torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", EMPTY_SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("residual,relu", [(False, False), (True, True)])
def test_bn_act(backend, shape, channels_last, training, residual, relu):
    x = _layout(torch.randn(shape), channels_last).requires_grad_()
    r = _layout(torch.randn(shape), channels_last).requires_grad_() if residual else None
    w, b, rm, rv = (t.requires_grad_() if i < 2 else t for i, t in enumerate(channel_params(C, None)))
    rm_s, rv_s = rm.clone(), rv.clone()
    want = F.batch_norm(x, rm_s, rv_s, w, b, training, 0.1, 1e-5)
    if residual:
        want = want + r
    want = torch.relu(want) if relu else want
    want_grads = _grads(want, [x, w, b, r])
    with fusedres.use_backend(backend):
        y = fusedres.bn_act(x, rm, rv, w, b, training, 0.1, 1e-5, residual=r, relu=relu)
        grads = _grads(y, [x, w, b, r])
    _assert_same_layout(y, x)
    _assert_grads_equal(grads, want_grads)
    torch.testing.assert_close((rm, rv), (rm_s, rv_s), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_dual_bn_act(backend, channels_last, training):
    x = _layout(torch.randn(0, C, 3, 3), channels_last).requires_grad_()
    r = _layout(torch.randn(0, C, 3, 3), channels_last).requires_grad_()
    pa, pb = channel_params(C, None), channel_params(C, None)
    for p in (pa, pb):
        p[0].requires_grad_(), p[1].requires_grad_()
    stats = [t.clone() for t in (pa[2], pa[3], pb[2], pb[3])]
    with fusedres.use_backend(backend):
        y = fusedres.dual_bn_act(x, r, weight=pa[0], bias=pa[1], running_mean=pa[2], running_var=pa[3],
                                 weight_r=pb[0], bias_r=pb[1], running_mean_r=pb[2], running_var_r=pb[3],
                                 training=training)
        grads = _grads(y, [x, pa[0], pa[1], r, pb[0], pb[1]])
    _assert_same_layout(y, x)
    zeros = torch.zeros(C)
    _assert_grads_equal(grads, [torch.empty_like(x), zeros, zeros, torch.empty_like(r), zeros, zeros])
    torch.testing.assert_close([pa[2], pa[3], pb[2], pb[3]], stats, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("second", ["none", "residual", "xb"])
def test_scale_shift_act(backend, channels_last, second):
    x = _layout(torch.randn(0, C, 2, 2), channels_last).requires_grad_()
    vecs = [torch.randn(C, requires_grad=True) for _ in range(6)]
    other = _layout(torch.randn(0, C, 2, 2), channels_last).requires_grad_() if second != "none" else None
    args = dict(residual=other) if second == "residual" else \
        dict(xb=other, mean_b=vecs[3], scale_b=vecs[4], shift_b=vecs[5]) if second == "xb" else {}
    with fusedres.use_backend(backend):
        y = fusedres.scale_shift_act(x, *vecs[:3], relu=True, **args)
        grads = _grads(y, [x, *vecs, other])
    _assert_same_layout(y, x)
    zeros = torch.zeros(C)
    has_b = second == "xb"
    _assert_grads_equal(grads, [torch.empty_like(x), zeros, zeros, zeros] + [zeros if has_b else None] * 3
                        + [None if other is None else torch.empty_like(other)])


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "cuda"])  # no CUDA conv
@pytest.mark.parametrize("stats", [False, True])
def test_conv_bn_act(backend, stats):
    x = torch.randn(0, 4, 5, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    wconv = torch.randn(6, 4, 3, 3, requires_grad=True)
    s_in, t_in, s_out, t_out = (torch.randn(n, requires_grad=True) for n in (4, 4, 6, 6))
    r = torch.randn(0, 6, 3, 3).contiguous(memory_format=torch.channels_last).requires_grad_()
    kw = dict(in_scale=s_in, in_shift=t_in, in_relu=True, out_scale=s_out, out_shift=t_out, residual=r,
              relu=True)
    want = conv_bn_act_reference(x, wconv, s_in, t_in, True, s_out, t_out, r, None, None, True, stats=stats)
    want_grads = _grads(want[0], [x, wconv, s_in, t_in, s_out, t_out, r])
    with fusedres.use_backend(backend):
        out = fusedres.conv_bn_act(x, wconv, stats=stats, allow_tf32=False, **kw)
        y = out[0] if stats else out
        grads = _grads(y, [x, wconv, s_in, t_in, s_out, t_out, r])
    assert y.shape == (0, 6, 3, 3) and y.is_contiguous(memory_format=torch.channels_last)
    if stats:
        torch.testing.assert_close(out[1:], (torch.zeros(6),) * 2, rtol=0, atol=0)
    _assert_grads_equal(grads, want_grads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", EMPTY_SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_module_matches_stock(backend, shape, channels_last, momentum):
    """Training then eval on an empty batch, as nn.BatchNorm2d (+ add + ReLU): running statistics unchanged,
    num_batches_tracked incremented in training (so momentum=None's cumulative average counts the batch)."""
    stock = nn.BatchNorm2d(C, momentum=momentum)
    with torch.no_grad():
        stock.weight.uniform_(0.5, 1.5), stock.bias.normal_(), stock.running_mean.normal_()
    for act in (None, "relu"):
        fused, ref = BatchNormAct2d.from_bn(copy.deepcopy(stock), act=act), copy.deepcopy(stock)
        for training in (True, False):
            fused.train(training), ref.train(training)
            x = _layout(torch.randn(shape), channels_last).requires_grad_()
            r = _layout(torch.randn(shape), channels_last)
            want = ref(x) + r
            want = torch.relu(want) if act else want
            want_grads = _grads(want, [x, ref.weight, ref.bias])
            with fusedres.use_backend(backend):
                y = fused(x, r)
                grads = _grads(y, [x, fused.weight, fused.bias])
            _assert_same_layout(y, x)
            _assert_grads_equal(grads, want_grads)
            for name, t in ref.state_dict().items():
                torch.testing.assert_close(fused.state_dict()[name], t, rtol=0, atol=0, msg=name)
        assert int(fused.num_batches_tracked) == 1


def test_stock_semantics_pinned():
    """What the tests above rely on stock doing (torch's own behaviour, checked so a change is noticed)."""
    bn = nn.BatchNorm2d(C).train()
    rm = bn.running_mean.clone()
    x = torch.randn(0, C, 2, 2, requires_grad=True)
    y = bn(x)
    y.sum().backward()
    assert y.shape == x.shape and int(bn.num_batches_tracked) == 1 and torch.equal(bn.running_mean, rm)
    assert torch.equal(bn.weight.grad, torch.zeros(C)) and torch.equal(bn.bias.grad, torch.zeros(C))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn(torch.randn(1, C, 1, 1))


def test_one_value_per_channel_still_refused():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fusedres.bn_act(torch.randn(1, C, 1, 1), None, None, training=True)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        BatchNormAct2d(C)(torch.randn(1, C, 1, 1))


@pytest.mark.parametrize("channels_last", [False, True])
def test_triton_primitives_on_empty(channels_last):
    """The Triton launchers themselves take an empty tensor (no ZeroDivisionError in their tiling)."""
    from fusedres.triton import bn_act as tbn

    x = _layout(torch.randn(0, C, 2, 2), channels_last)
    mean, var = tbn.batch_stats(x)
    assert mean.shape == var.shape == (C,)
    z = torch.zeros(C)
    y = tbn.apply(x, z, z + 1, z, None, None, None, None, None, True)
    assert y.shape == x.shape
    sums = tbn.backward_reduce(x, x, z, z + 1, z, None, None, None, None, None, True, False)
    assert torch.equal(sums[0], z) and torch.equal(sums[1], z)


@pytest.mark.parametrize("mode", ["bn", "conv"])
def test_converted_resnet_matches_stock(mode):
    """A converted ResNet (fused blocks, dual tails; conv mode's statistics from the conv epilogue) on an empty
    batch: training step and eval forward, state_dict and every parameter gradient as stock's."""
    from helpers import tiny_resnet

    stock = tiny_resnet()
    fused = fusedres.convert(copy.deepcopy(stock), mode=mode)
    x = torch.randn(0, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    for training in (True, False):
        stock.train(training), fused.train(training)
        ys, yf = stock(x), fused(x)
        assert yf.shape == ys.shape
        if training:
            ys.sum().backward(), yf.sum().backward()
            got = dict(fused.named_parameters())
            for name, p in stock.named_parameters():
                torch.testing.assert_close(got[name].grad, p.grad, rtol=0, atol=0, msg=name)
        want = stock.state_dict()
        for name, t in fused.state_dict().items():
            torch.testing.assert_close(t, want[name], rtol=0, atol=0, msg=name)
