"""`fusedres::recast_conv` and the conv-mode stem conv (`RecastConv2d`): under autocast the convolution of a float32
input keeps that input for backward (not its low-precision copy) and casts it again there; values bitwise those of
F.conv2d under autocast, forward and backward. The stem module keeps its Parameters, state_dict keys and hooks, and
`unconvert` / `fold` give back an nn.Conv2d."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fusedres
from fusedres.nn.conv_blocks import RecastConv2d
from fusedres.ops.recast_conv import recast_conv, recasts
from helpers import mixed_resnet

AMP = [torch.bfloat16, torch.float16]
CONVS = [dict(stride=2, padding=3), dict(stride=1, padding=1, dilation=2), dict(stride=1, padding=0, groups=3)]


def _pair(x_grad, bias, channels_last, conv):
    x = torch.randn(2, 3, 11, 10)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    k = 1 if conv.get("groups") else 7 if conv["padding"] == 3 else 3
    w = torch.randn(6, 3 // conv.get("groups", 1), k, k)
    b = torch.randn(6) if bias else None
    leaves = [[t.clone().requires_grad_(g) if t is not None else None for t, g in ((x, x_grad), (w, True), (b, True))]
              for _ in range(2)]
    return leaves


@pytest.mark.parametrize("dtype", AMP)
@pytest.mark.parametrize("conv", CONVS, ids=["stem", "dilated", "grouped"])
@pytest.mark.parametrize("x_grad,bias,channels_last", [(False, False, True), (True, True, False),
                                                       (True, False, True)])
def test_like_f_conv2d_under_autocast(dtype, conv, x_grad, bias, channels_last):
    (xs, ws, bs), (xr, wr, br) = _pair(x_grad, bias, channels_last, conv)
    with torch.autocast("cpu", dtype=dtype):
        assert recasts(xs, ws, bs)
        y = recast_conv(xs, ws, bs, **conv)
        ref = F.conv2d(xr, wr, br, **conv)
    assert y.dtype == ref.dtype == dtype and y.stride() == ref.stride()
    assert torch.equal(y, ref)
    g = torch.randn_like(ref)
    y.backward(g)
    ref.backward(g)
    for a, r in ((xs, xr), (ws, wr), (bs, br)):
        if r is not None and r.requires_grad:
            assert a.grad.dtype == r.grad.dtype and torch.equal(a.grad, r.grad)
        elif a is not None:
            assert a.grad is None


def test_keeps_the_float32_input_not_a_copy():
    """What autograd saves: the caller's float32 x itself and the low-precision weight; stock keeps a bf16 copy
    of x."""
    x = torch.randn(2, 3, 16, 16)
    w = torch.randn(4, 3, 7, 7, requires_grad=True)

    def saved(conv):
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                conv(x, w, None, 2, 3)
        return kept

    ours, stock = saved(recast_conv), saved(F.conv2d)
    assert any(t is x for t in ours) and all(t.shape != x.shape or t is x for t in ours)
    assert any(t.shape == x.shape and t.dtype == torch.bfloat16 for t in stock)


def test_plain_conv_where_it_does_not_apply():
    x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3, requires_grad=True)
    assert not recasts(x, w)  # no autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert recasts(x, w)
        assert not recasts(x.bfloat16(), w)  # input already low precision
        assert not recasts(x, w.detach())  # nothing to differentiate: nothing saved
        assert not recasts(x, w.double())
        with torch.no_grad():
            assert not recasts(x, w)
        assert torch.equal(recast_conv(x, w.detach(), None, 1, 1), F.conv2d(x, w.detach(), None, 1, 1))
    # torch.func: plain F.conv2d (the op has no batching or jvp rule)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        g = torch.func.grad(lambda w: recast_conv(x, w, None, 1, 1).float().sum())(w.detach())
        r = torch.func.grad(lambda w: F.conv2d(x, w, None, 1, 1).float().sum())(w.detach())
    assert torch.equal(g, r)


def test_opcheck():
    x = torch.randn(2, 3, 9, 9, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(4, dtype=torch.bfloat16, requires_grad=True)
    torch.library.opcheck(torch.ops.fusedres.recast_conv.default, (x, w, None, [2, 2], [1, 1], [1, 1], 1))
    torch.library.opcheck(torch.ops.fusedres.recast_conv.default, (x.detach(), w, b, [1, 1], [0, 0], [1, 1], 1))


@pytest.mark.parametrize("args,err,match", [
    ((torch.randn(2, 3, 4, 4), torch.randn(4, 3, 3, 3, dtype=torch.bfloat16), torch.randn(4)), TypeError,
     "bias dtype"),
    ((torch.randn(2, 3, 4), torch.randn(4, 3, 3, dtype=torch.bfloat16), None), ValueError, "4-D"),
    ((torch.zeros(2, 3, 4, 4, dtype=torch.int32), torch.randn(4, 3, 3, 3), None), TypeError, "floating"),
    ((torch.randn(2, 3, 4, 4), torch.randn(4, 3, 3, 3, device="meta"), None), ValueError, "weight is on meta"),
])
def test_op_refuses_bad_input(args, err, match):
    with pytest.raises(err, match=match):
        torch.ops.fusedres.recast_conv(*args, [1, 1], [0, 0], [1, 1], 1)


def test_conv_mode_stem_module_round_trip():
    """convert(mode="conv") makes the stem's own conv1 a RecastConv2d (same object: Parameters, state_dict keys
    and a user's forward hook stay); unconvert and fold give back an nn.Conv2d; bn mode leaves it alone."""
    stock = mixed_resnet()
    conv1, weight = stock.conv1, stock.conv1.weight
    calls = []
    conv1.register_forward_hook(lambda m, i, o: calls.append(o.dtype))
    keys = list(stock.state_dict())
    model = fusedres.convert(stock, mode="conv")
    assert model.conv1 is conv1 and type(conv1) is RecastConv2d and conv1.weight is weight
    assert list(model.state_dict()) == keys
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(2, 3, 32, 32)).float().sum().backward()
    assert calls == [torch.bfloat16] and weight.grad is not None
    assert fusedres.convert(model, mode="conv").conv1 is conv1  # idempotent
    back = fusedres.unconvert(copy.deepcopy(model))
    assert type(back.conv1) is nn.Conv2d
    assert type(fusedres.convert(mixed_resnet()).conv1) is nn.Conv2d  # bn mode
    folded = fusedres.fold(copy.deepcopy(model).eval())
    assert type(folded.conv1).__name__ == "FoldedConv2d"


def test_stem_module_compiles_fullgraph():
    from torch._dynamo.testing import CompileCounterWithBackend

    conv = nn.Conv2d(3, 4, 7, 2, 3, bias=False)
    conv.__class__ = RecastConv2d
    ref = copy.deepcopy(conv)
    ref.__class__ = nn.Conv2d
    counter = CompileCounterWithBackend("aot_eager")
    x = torch.randn(2, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = torch.compile(conv, fullgraph=True, backend=counter)(x)
        r = ref(x)
    y.float().sum().backward()
    r.float().sum().backward()
    assert any("fusedres.recast_conv" in str(n.target) for g in counter.graphs for n in g.graph.nodes)
    assert torch.equal(y, r) and torch.equal(conv.weight.grad, ref.weight.grad)
