"""Learned skip weights and zero-init residuals: relu(a * BN(x) + b * shortcut) fused at no extra pass.

Op level: `bn_act(..., residual_weight=w)` (the shortcut weight) against F.batch_norm + w * r + relu in float64.
"""
import pytest
import torch

import fusedres
from fusedres.reference import bn_act_reference
from helpers import DTYPES, activation, assert_close, backend_names, channel_params, double_leaf, leaf


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
    torch.library.opcheck(ops.bn_act_train.default, (x, w, b, r, 1e-5, True, rw))
    torch.library.opcheck(ops.bn_act_eval.default, (x, w, b, r, rm, rv, 1e-5, False, rw))
    y, mean, var = ops.bn_act_train(x, w, b, r, 1e-5, True, rw)
    torch.library.opcheck(ops.bn_act_backward.default,
                          (torch.randn_like(y), x.detach(), w, b, r.detach(), mean, var, 1e-5, True, True, True,
                           rw.detach()))


def test_residual_weight_needs_residual_and_c_values(device):
    x = activation((2, 3, 2, 2), torch.float32, device, False)
    with pytest.raises(ValueError, match="residual_weight was given without a residual"):
        fusedres.bn_act(x, None, None, training=True, residual_weight=torch.ones(3, device=device))
    with pytest.raises(ValueError, match=r"residual_weight.*expected shape \(3,\)"):
        fusedres.bn_act(x, None, None, training=True, residual=x.clone(), residual_weight=torch.ones(4, device=device))
