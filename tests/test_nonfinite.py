"""Non-finite inputs behave as in stock PyTorch: NaN / ±inf in x, in the residual or in a BN weight give the
outputs and gradients F.batch_norm + add + torch.relu (or F.conv2d + ...) give — NaN where stock has NaN, the
same finite values elsewhere, nothing hangs — on every backend available here and in the CUDA kernels'
per-thread code (host harness). Three traps this guards: a ReLU written as max(z, 0) turns NaN into 0 (stock
torch.relu(nan) is nan); a ReLU backward written as where(z > 0, g, 0) drops the gradient at NaN, where stock
threshold_backward (0 only where z <= 0) passes it; and 0 * (x - mean) in an eval-mode input gradient turns a
finite stock gradient into NaN when x is inf or NaN. A non-finite value in one channel must not reach the
statistics of another.
"""
import pytest
import torch
import torch.nn.functional as F

import fusedres
from fusedres.reference import conv_bn_act_reference
from helpers import backend_names

NAN, INF = float("nan"), float("inf")
SHAPE = (2, 3, 4, 4)
BAD_CHANNEL = 1
# (tensor, value): where the non-finite value goes — one element of channel BAD_CHANNEL (x, residual) or the
# whole channel's weight.
# An inf weight is left out: stock's eval BN computes x * (w * invstd) + (b - mean * w * invstd), where w = inf
# gives inf - inf = NaN, and the centred (x - mean) * (w * invstd) + b of every fusedres backend gives ±inf (0
# after the ReLU for -inf) — a formulation difference (kept for precision when |mean| >> std), not a bug.
PLACES = [("x", NAN), ("x", INF), ("x", -INF), ("residual", NAN), ("residual", INF), ("residual", -INF),
          ("weight", NAN)]


def _inputs(device, where, value):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(SHAPE, generator=g).to(device)
    res = torch.randn(SHAPE, generator=g).to(device)
    w = (torch.rand(SHAPE[1], generator=g) + 0.5).to(device)
    b = torch.randn(SHAPE[1], generator=g).to(device)
    rm = (torch.randn(SHAPE[1], generator=g) * 0.1).to(device)
    rv = (torch.rand(SHAPE[1], generator=g) + 0.5).to(device)
    dy = torch.randn(SHAPE, generator=g).to(device)
    t = {"x": x, "residual": res, "weight": w}[where]
    if where == "weight":
        t[BAD_CHANNEL] = value
    else:
        t[1, BAD_CHANNEL, 2, 3] = value
    return x, res, w, b, rm, rv, dy


def _run(fn, x, res, w, b, dy):
    leaves = [t.detach().clone().requires_grad_() for t in (x, res, w, b)]
    y = fn(*leaves)
    y.backward(dy)
    return [y.detach()] + [t.grad for t in leaves]


def _assert_same(ours, stock, names, strict=True):
    """Same finite values, non-finite exactly where stock is; with `strict` also NaN exactly where stock has
    NaN. An inf in x is not strict: whether a non-finite statistic is inf or NaN depends on the summation (a
    batch mean of data with an inf is NaN in stock's Welford batch_norm, inf in torch.var_mean)."""
    for a, e, name in zip(ours, stock, names):
        if strict:
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4, equal_nan=True, msg=lambda m: f"{name}: {m}")
            continue
        bad = ~torch.isfinite(e)
        assert torch.equal(~torch.isfinite(a), bad), f"{name}: non-finite at other places than stock"
        torch.testing.assert_close(a[~bad], e[~bad], rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("where,value", PLACES, ids=[f"{w}={v}" for w, v in PLACES])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bn_act_nonfinite_matches_stock(device, where, value, training):
    x, res, w, b, rm, rv, dy = _inputs(device, where, value)
    stock_stats = [rm.clone(), rv.clone()]
    stock = _run(lambda x, r, w, b: torch.relu(F.batch_norm(x, *stock_stats, w, b, training) + r), x, res, w, b, dy)
    for backend in backend_names(device):
        stats = [rm.clone(), rv.clone()]
        with fusedres.use_backend(backend):
            ours = _run(lambda x, r, w, b: fusedres.bn_act(x, *stats, w, b, training, residual=r, relu=True),
                        x, res, w, b, dy)
        _assert_same(ours + stats, stock + stock_stats,
                     [f"{backend} {n}" for n in ("y", "dx", "dres", "dw", "db", "running_mean", "running_var")],
                     strict=not (value in (INF, -INF) and where == "x"))
        if where != "residual":  # the other channels' statistics and outputs stay finite
            others = [c for c in range(SHAPE[1]) if c != BAD_CHANNEL]
            assert torch.isfinite(ours[0][:, others]).all() and torch.isfinite(stats[0][others]).all()
            assert torch.isfinite(stats[1][others]).all()


@pytest.mark.parametrize("value", [NAN, INF])
def test_dual_bn_act_and_scale_shift_act_nonfinite_match_stock(device, value):
    x, r, w, b, rm, rv, dy = _inputs(device, "x", value)
    r[0, 2, 1, 1] = value  # the shortcut input has a bad value in another channel

    def stock_fn(x, r, w, b):
        return torch.relu(F.batch_norm(x, None, None, w, b, True) + F.batch_norm(r, None, None, b.abs(), w, True))

    def dual_fn(x, r, w, b):
        return fusedres.dual_bn_act(x, r, weight=w, bias=b, running_mean=None, running_var=None, weight_r=b.abs(),
                                    bias_r=w, running_mean_r=None, running_var_r=None, training=True)

    def ssa_stock(x, r, w, b):  # eval-style: fixed per-channel vectors, a residual
        return torch.relu((x - rm.view(1, -1, 1, 1)) * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1) + r)

    def ssa_fn(x, r, w, b):
        return fusedres.scale_shift_act(x, rm, w, b, residual=r)

    stock = _run(stock_fn, x, r, w, b, dy)
    stock_ssa = _run(ssa_stock, x, r, w, b, dy)
    for backend in backend_names(device):
        with fusedres.use_backend(backend):
            _assert_same(_run(dual_fn, x, r, w, b, dy), stock, [f"{backend} dual {n}" for n in "y dx dr dw db".split()])
            _assert_same(_run(ssa_fn, x, r, w, b, dy), stock_ssa,
                         [f"{backend} scale_shift_act {n}" for n in "y dx dres dscale dshift".split()])


CONV_PLACES = [("x", NAN), ("x", INF), ("residual", NAN), ("weight", NAN), ("in_shift", NAN)]


@pytest.mark.parametrize("where,value", CONV_PLACES, ids=[f"{w}={v}" for w, v in CONV_PLACES])
def test_conv_bn_act_nonfinite_matches_stock(on_test_device, where, value):
    """Prologue (BN + ReLU of the input), conv, epilogue (scale, shift, residual, ReLU) and statistics with a
    non-finite value, against the same computation in stock ops (Triton where it runs, then the reference)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 5, 5, generator=g)
    w = torch.randn(6, 4, 3, 3, generator=g)
    vec = {"in_scale": torch.rand(4, generator=g) + 0.5, "in_shift": torch.randn(4, generator=g),
           "out_scale": torch.rand(6, generator=g) + 0.5, "out_shift": torch.randn(6, generator=g)}
    res = torch.randn(2, 6, 5, 5, generator=g)
    if where == "x":
        x[1, 2, 2, 3] = value
    elif where == "residual":
        res[0, 3, 1, 1] = value
    elif where == "weight":
        w[BAD_CHANNEL, 2, 1, 1] = value  # the centre tap: inside the image for every output pixel
    else:
        vec["in_shift"][2] = value
    x, w, res = x.to(torch.get_default_device()), w.to(torch.get_default_device()), res.to(torch.get_default_device())
    vec = {k: v.to(x.device) for k, v in vec.items()}
    kw = dict(padding=1, in_relu=True, relu=True, stats=True, **vec)
    y0, m0, v0 = conv_bn_act_reference(x.double(), w.double(), residual=res.double(), **kw)
    for backend in ("triton", "reference"):
        with fusedres.use_backend(backend):
            y, m, v = fusedres.conv_bn_act(x, w, residual=res, allow_tf32=False, **kw)
        for a, e, name in ((y, y0, "y"), (m, m0, "mean"), (v, v0, "var")):
            torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-4, equal_nan=True,
                                       msg=lambda msg: f"{backend} {name}: {msg}")
        if where == "weight":  # only the output channel with the NaN weight is NaN, statistics included
            others = [c for c in range(6) if c != BAD_CHANNEL]
            assert torch.isfinite(y[:, others]).all() and torch.isfinite(m[others]).all()
            assert torch.isnan(m[BAD_CHANNEL]) and torch.isnan(y[:, BAD_CHANNEL]).all()


# ------------------------------------------------------------------------------------------------ CUDA kernels
try:
    from fusedres import _C_host as H
except ImportError:
    H = None


@pytest.fixture
def h():
    if H is None:
        pytest.skip("fusedres._C_host is not built (no CUDA toolkit at install time)")
    return H


def _mem(t, cl):
    if t is None:
        return None
    t = t.float()
    return (t.permute(0, 2, 3, 1) if cl else t).contiguous().numpy().ravel()


def _unmem(a, shape, cl):
    n, c, hh, ww = shape
    t = torch.from_numpy(a.copy())
    return t.view(n, hh, ww, c).permute(0, 3, 1, 2) if cl else t.view(n, c, hh, ww)


@pytest.mark.parametrize("cl,vec", [(True, 4), (False, 4), (True, 1)], ids=["nhwc_vec", "nchw_vec", "scalar"])
@pytest.mark.parametrize("where,value", PLACES[:6], ids=[f"{w}={v}" for w, v in PLACES[:6]])
def test_cuda_kernels_nonfinite(h, cl, vec, where, value):
    """The CUDA kernels' own per-thread code (statistics, apply, backward) on the host, against the reference
    backend (which matches stock, tests above): NaN passes the ReLU, a bad value stays in its channel."""
    from fusedres import reference

    x, res, w, b, rm, rv, dy = _inputs("cpu", where, value)
    n, c, hh, ww = SHAPE
    geo = (n, c, hh * ww, cl, vec, True)
    mean, var, _ = h.stats(_mem(x, cl), *geo, 132)
    rmean, rvar = reference.batch_stats(x)
    torch.testing.assert_close(torch.from_numpy(mean), rmean, rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(torch.from_numpy(var), rvar, rtol=1e-4, atol=1e-5, equal_nan=True)
    others = [k for k in range(c) if k != BAD_CHANNEL]
    assert torch.isfinite(torch.from_numpy(var)[others]).all()
    # eval-style vectors so the bad value does not spread over its channel: y, g and dx are checked per element
    scale, shift = w * torch.rsqrt(rv + 1e-5), b
    y = h.apply(_mem(x, cl), rm.numpy(), scale.numpy(), shift.numpy(), _mem(res, cl), None, None, None, None, True,
                *geo, 132)
    want = reference.apply(x, rm, scale, shift, res, None, None, None, None, True)
    torch.testing.assert_close(_unmem(y, SHAPE, cl), want, rtol=1e-6, atol=1e-6, equal_nan=True)
    sg, sgx, _, gres, _ = h.backward_reduce(_mem(dy, cl), _mem(x, cl), scale.numpy(), shift.numpy(), rm.numpy(),
                                            _mem(res, cl), None, None, None, None, True, True, *geo, 132)
    r = reference.backward_reduce(dy, x, rm, scale, shift, res, None, None, None, None, True, True)
    torch.testing.assert_close(torch.from_numpy(sg), r[0], rtol=1e-4, atol=1e-4, equal_nan=True)
    torch.testing.assert_close(torch.from_numpy(sgx), r[1], rtol=1e-4, atol=1e-4, equal_nan=True)
    torch.testing.assert_close(_unmem(gres, SHAPE, cl), r[3], rtol=0, atol=0, equal_nan=True)
    zero = torch.zeros(c)
    dx, _ = h.backward_apply(_mem(dy, cl), _mem(x, cl), scale.numpy(), shift.numpy(), _mem(res, cl), None, None,
                             None, True, rm.numpy(), scale.numpy(), zero.numpy(), zero.numpy(), None, None, None,
                             None, *geo, 132)
    rdx, _ = reference.backward_apply(dy, x, rm, scale, shift, res, None, None, None, None, True, scale, zero, zero,
                                      None, None, None)
    torch.testing.assert_close(_unmem(dx, SHAPE, cl), rdx, rtol=1e-5, atol=1e-5, equal_nan=True)
    # eval BN backward of stock: dx = dy * relu'(z) * scale (relu' = 0 only where z <= 0: NaN z passes dy)
    # — finite even where x is inf or NaN
    z = (x - rm.view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1) + res
    torch.testing.assert_close(rdx, torch.where(z <= 0, 0.0, dy) * scale.view(1, -1, 1, 1), rtol=1e-5, atol=1e-5)


def test_cuda_elementwise_helpers_nonfinite(h):
    """fr_math.h's per-element helpers: NaN passes the ReLU forward and its gradient (as torch.relu), z <= 0
    blocks it; an eval-mode input gradient (k_x = 0) stays finite for an inf or NaN input."""
    import math

    assert h.masked_grad(2.0, NAN, True) == 2.0 and h.masked_grad(2.0, 0.0, True) == 0.0
    assert h.masked_grad(2.0, -INF, True) == 0.0 and h.masked_grad(2.0, -1.0, False) == 2.0
    for x in (INF, -INF, NAN):
        assert h.bn_input_grad(1.5, x, 0.25, 2.0, 0.0, 0.5) == 3.5
        assert not math.isfinite(h.bn_input_grad(1.5, x, 0.25, 2.0, 0.1, 0.5))  # training: the term is real
