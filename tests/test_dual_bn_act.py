"""dual_bn_act: act(BN_a(x) + BN_b(r)) against two F.batch_norm + add + relu in float64."""
import pytest
import torch

import fusedres
from fusedres.reference import dual_bn_act_reference
from helpers import DTYPES, activation, assert_close, backend_names, channel_params, double_leaf, leaf

SHAPES = [(2, 3, 5, 7), (3, 5, 1, 1), (2, 16, 3, 2)]


@pytest.fixture(autouse=True)
def _tiles(small_tiles):
    pass


def _bn_args(params, grad=False, double=False):
    w, b, rm, rv = params
    conv = double_leaf if double else (leaf if grad else (lambda t: t))
    stat = (lambda t: t.double()) if double else (lambda t: t.clone())
    return dict(weight=conv(w), bias=conv(b), running_mean=stat(rm), running_var=stat(rv))


def _run(backend, device, shape, dtype, channels_last, training, relu=True, momentum=(0.1, 0.3)):
    c = shape[1]
    x = activation(shape, dtype, device, channels_last, scale=2.0)
    r = activation(shape, dtype, device, channels_last, offset=1.0)
    pa, pb = channel_params(c, device), channel_params(c, device)
    dy = activation(shape, dtype, device, channels_last)

    xs, rs = leaf(x), leaf(r)
    a, b = _bn_args(pa, grad=True), _bn_args(pb, grad=True)
    with fusedres.use_backend(backend):
        y = fusedres.dual_bn_act(xs, rs, **a, momentum=momentum[0], eps=1e-5,
                                 **{k + "_r": v for k, v in b.items()}, momentum_r=momentum[1], eps_r=1e-3,
                                 training=training, relu=relu)
        y.backward(dy)

    xd, rd = double_leaf(x), double_leaf(r)
    ad, bd = _bn_args(pa, double=True), _bn_args(pb, double=True)
    yd = dual_bn_act_reference(xd, dict(ad, momentum=momentum[0], eps=1e-5), rd,
                               dict(bd, momentum=momentum[1], eps=1e-3), training, relu)
    yd.backward(dy.double())

    assert y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert_close(y, yd, dtype, "y")
    assert_close(xs.grad, xd.grad, dtype, "grad x")
    assert_close(rs.grad, rd.grad, dtype, "grad r")
    param_dtype = torch.float32 if dtype == torch.float32 else dtype
    for name, fused, ref in (("a", a, ad), ("b", b, bd)):
        assert_close(fused["weight"].grad, ref["weight"].grad, param_dtype, f"grad weight {name}")
        assert_close(fused["bias"].grad, ref["bias"].grad, param_dtype, f"grad bias {name}")
        assert_close(fused["running_mean"], ref["running_mean"], torch.float32, f"running_mean {name}")
        assert_close(fused["running_var"], ref["running_var"], torch.float32, f"running_var {name}")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(device, shape, dtype, channels_last, training):
    for backend in backend_names(device):
        _run(backend, device, shape, dtype, channels_last, training)


def test_without_relu(device):
    for backend in backend_names(device):
        _run(backend, device, (2, 5, 3, 3), torch.float32, True, True, relu=False)


def test_gradcheck_float64(device):
    shape = (2, 3, 2, 3)
    x = activation(shape, torch.float64, device, False).requires_grad_()
    r = activation(shape, torch.float64, device, False).requires_grad_()
    (wa, ba, rma, rva), (wb, bb, rmb, rvb) = ([t.double() for t in channel_params(3, device)] for _ in range(2))
    leaves = [t.requires_grad_() for t in (wa, ba, wb, bb)]

    def fn(training):
        return lambda x, r, wa, ba, wb, bb: fusedres.dual_bn_act(
            x, r, weight=wa, bias=ba, running_mean=rma.clone(), running_var=rva.clone(), weight_r=wb, bias_r=bb,
            running_mean_r=rmb.clone(), running_var_r=rvb.clone(), training=training, relu=True)

    for backend in backend_names(device):
        with fusedres.use_backend(backend):
            assert torch.autograd.gradcheck(fn(True), (x, r, *leaves))
            assert torch.autograd.gradcheck(fn(False), (x, r, *leaves))


def test_opcheck(device):
    shape = (2, 3, 4, 3)
    x = activation(shape, torch.float32, device, True).requires_grad_()
    r = activation(shape, torch.float32, device, True).requires_grad_()
    (wa, ba, rma, rva), (wb, bb, rmb, rvb) = (channel_params(3, device) for _ in range(2))
    for t in (wa, ba, wb, bb):
        t.requires_grad_()
    ops = torch.ops.fusedres
    sa = ops.bn_stats(x.detach(), wa.detach(), ba.detach(), None, None, None, 0.1, 1e-5)
    sb = ops.bn_stats(r.detach(), wb.detach(), bb.detach(), None, None, None, 0.1, 1e-3)
    torch.library.opcheck(ops.dual_bn_act_train.default, (x, wa, ba, *sa, 1e-5, r, wb, bb, *sb, 1e-3, True))
    torch.library.opcheck(ops.dual_bn_act_train.default, (x, None, None, *sa, 1e-5, r, None, None, *sb, 1e-5,
                                                          False))
    torch.library.opcheck(ops.dual_bn_act_eval.default, (x, wa, ba, rma, rva, 1e-5, r, wb, bb, rmb, rvb, 1e-5, True))
    y = ops.dual_bn_act_train(x, wa, ba, *sa, 1e-5, r, wb, bb, *sb, 1e-3, True)
    torch.library.opcheck(ops.dual_bn_act_backward.default,
                          (torch.randn_like(y), x.detach(), wa.detach(), ba.detach(), *sa, 1e-5, r.detach(),
                           wb.detach(), bb.detach(), *sb, 1e-3, True, True))


def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    shape = (2, 4, 3, 3)
    x = activation(shape, torch.float32, device, True)
    r = activation(shape, torch.float32, device, True)
    pa, pb = channel_params(4, device), channel_params(4, device)

    def step(x, r, wa, ba, wb, bb, stats):
        return fusedres.dual_bn_act(x, r, weight=wa, bias=ba, running_mean=stats[0], running_var=stats[1],
                                    weight_r=wb, bias_r=bb, running_mean_r=stats[2], running_var_r=stats[3],
                                    training=True, relu=True)

    outs = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="inductor")):
        xs, rs = leaf(x), leaf(r)
        params = [leaf(t) for t in (pa[0], pa[1], pb[0], pb[1])]
        stats = [t.clone() for t in (pa[2], pa[3], pb[2], pb[3])]
        y = fn(xs, rs, *params, stats)
        y.square().sum().backward()
        outs.append([y, xs.grad, rs.grad] + [p.grad for p in params] + stats)
    for eager, compiled in zip(*outs):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case, error, match", [
    ("r_shape", ValueError, r"r \(the shortcut input\) shape"),
    ("r_dtype", TypeError, r"r \(the shortcut input\) dtype"),
    ("r_channels", ValueError, r"weight_r \(of r\) has shape \(5,\)"),
    ("one_value", ValueError, "more than 1 value per channel"),
])
def test_bad_input_errors(device, case, error, match):
    x = activation((2, 3, 4, 4), torch.float32, device, False)
    r = activation((2, 3, 4, 4), torch.float32, device, False)
    (wa, ba, rma, rva), (wb, bb, rmb, rvb) = (channel_params(3, device) for _ in range(2))
    if case == "r_shape":
        r = r[:, :, :2]
    elif case == "r_dtype":
        r = r.bfloat16()
    elif case == "r_channels":
        wb = torch.ones(5, device=device)
    elif case == "one_value":
        x, r = x[:1, :, :1, :1], r[:1, :, :1, :1]
    with pytest.raises(error, match=match):
        fusedres.dual_bn_act(x, r, weight=wa, bias=ba, running_mean=rma, running_var=rva, weight_r=wb, bias_r=bb,
                             running_mean_r=rmb, running_var_r=rvb, training=True)
