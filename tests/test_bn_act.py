"""bn_act: act(BN(x) [+ residual]) against F.batch_norm + add + relu in float64, per backend, dtype, layout."""
import pytest
import torch

import fusedres
from fusedres.reference import bn_act_reference
from helpers import (DTYPES, activation, assert_close, backend_names, channel_params, double_leaf, leaf)

SHAPES = [(2, 3, 5, 7), (3, 5, 1, 1), (1, 64, 3, 3), (4, 16, 2, 3)]
MODES = {  # name: (has_residual, relu)
    "bn": (False, False),
    "bn_relu": (False, True),
    "bn_add": (True, False),
    "bn_add_relu": (True, True),
}


@pytest.fixture(autouse=True)
def _tiles(small_tiles):
    pass


def _run(backend, device, shape, dtype, channels_last, mode, training, momentum=0.1, affine=True,
         offset=0.0):
    has_res, relu = MODES[mode]
    c = shape[1]
    x = activation(shape, dtype, device, channels_last, offset=offset, scale=2.0)
    r = activation(shape, dtype, device, channels_last) if has_res else None
    w, b, rm, rv = channel_params(c, device)
    if not affine:
        w = b = None
    dy = activation(shape, dtype, device, channels_last)

    xs, rs = leaf(x), leaf(r) if has_res else None
    ws, bs = (leaf(w), leaf(b)) if affine else (None, None)
    rm_f, rv_f = rm.clone(), rv.clone()
    with fusedres.use_backend(backend):
        y = fusedres.bn_act(xs, rm_f, rv_f, ws, bs, training, momentum, 1e-5, rs, relu)
        y.backward(dy)

    xd, rd = double_leaf(x), double_leaf(r) if has_res else None
    wd, bd = (double_leaf(w), double_leaf(b)) if affine else (None, None)
    rm_d, rv_d = rm.double(), rv.double()
    yd = bn_act_reference(xd, rm_d, rv_d, wd, bd, training, momentum, 1e-5, rd, relu)
    yd.backward(dy.double())

    assert y.dtype == dtype and y.shape == x.shape
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert_close(y, yd, dtype, "y")
    assert_close(xs.grad, xd.grad, dtype, "grad x")
    if has_res:
        assert_close(rs.grad, rd.grad, dtype, "grad residual")
    if affine:
        # parameter gradients are sums over N*H*W values: compare with float32-level tolerances
        assert_close(ws.grad, wd.grad, torch.float32 if dtype == torch.float32 else dtype, "grad weight")
        assert_close(bs.grad, bd.grad, torch.float32 if dtype == torch.float32 else dtype, "grad bias")
    assert_close(rm_f, rm_d, torch.float32, "running_mean")
    assert_close(rv_f, rv_d, torch.float32, "running_var")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(device, shape, dtype, channels_last, mode, training):
    for backend in backend_names(device):
        _run(backend, device, shape, dtype, channels_last, mode, training)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", [(3, 2048, 2, 2), (2, 130, 3, 3)], ids=["c2048", "c130"])
def test_wide_channels(device, shape, channels_last, monkeypatch):
    from fusedres.triton import bn_act as tbn
    monkeypatch.setattr(tbn, "TILE_ELEMENTS", 4096)
    monkeypatch.setattr(tbn, "FLAT_BLOCK", 1024)
    for backend in backend_names(device):
        _run(backend, device, shape, torch.float32, channels_last, "bn_add_relu", True)


@pytest.mark.parametrize("momentum", [0.1, None, 1.0])
def test_momentum_and_affine_variants(device, momentum):
    for backend in backend_names(device):
        _run(backend, device, (2, 5, 3, 3), torch.float32, False, "bn_relu", True, momentum=momentum or 0.25)
        _run(backend, device, (2, 5, 3, 3), torch.float32, True, "bn_add_relu", True, affine=False)


def test_large_mean_keeps_variance(device):
    """1000 + 2*randn in float32: statistics merged with Chan's formula keep the variance (a naive
    E[x^2] - E[x]^2 loses ~3% here) and the output is as accurate as stock float32 BatchNorm, whose error is
    set by the float32 rounding of x and of the mean itself."""
    import torch.nn.functional as F
    for cl in (False, True):
        x = activation((4, 6, 5, 5), torch.float32, device, cl, offset=1000.0, scale=2.0)
        w, b, _, _ = channel_params(6, device)
        expected = F.batch_norm(x.double(), None, None, w.double(), b.double(), True)
        stock_error = (F.batch_norm(x, None, None, w, b, True).double() - expected).abs().max().item()
        for backend in backend_names(device):
            with fusedres.use_backend(backend):
                y = fusedres.bn_act(x, None, None, w, b, True)
            assert (y.double() - expected).abs().max().item() <= 2 * stock_error + 1e-6, backend


def test_batch_stats_match_float64(device):
    from fusedres import backends
    x = activation((3, 7, 9, 5), torch.float32, device, True, offset=1000.0)
    var_d, mean_d = torch.var_mean(x.double(), dim=(0, 2, 3), unbiased=False)
    for name in backend_names(device):
        mean, var = backends.load(name).batch_stats(x)
        torch.testing.assert_close(mean.double(), mean_d, rtol=1e-6, atol=0)
        torch.testing.assert_close(var.double(), var_d, rtol=1e-4, atol=0)


def test_gradcheck_float64(device):
    """Finite differences through the kernels themselves (float64 end to end)."""
    shape = (2, 3, 3, 2)
    x = activation(shape, torch.float64, device, False).requires_grad_()
    r = activation(shape, torch.float64, device, False).requires_grad_()
    w, b, rm, rv = (t.double() for t in channel_params(3, device))
    w.requires_grad_()
    b.requires_grad_()
    for backend in backend_names(device):
        with fusedres.use_backend(backend):
            assert torch.autograd.gradcheck(
                lambda x, w, b, r: fusedres.bn_act(x, None, None, w, b, True, 0.1, 1e-5, r, True), (x, w, b, r))
            assert torch.autograd.gradcheck(
                lambda x, w, b, r: fusedres.bn_act(x, rm, rv, w, b, False, 0.1, 1e-5, r, True), (x, w, b, r))


def test_int64_indexing_path(device, monkeypatch):
    """The int64-offset variant of every kernel (used past 2**31 elements), forced on a small input."""
    from fusedres.triton import bn_act as tbn
    monkeypatch.setattr(tbn, "INT64_INDEX_THRESHOLD", 0)
    for cl in (False, True):
        _run("triton", device, (2, 5, 3, 3), torch.float32, cl, "bn_add_relu", True)


def test_deterministic(device):
    x = activation((4, 8, 5, 5), torch.float32, device, True, scale=3.0)
    dy = activation((4, 8, 5, 5), torch.float32, device, True)
    w, b, _, _ = channel_params(8, device)
    outs = []
    for _ in range(2):
        xs = leaf(x)
        y = fusedres.bn_act(xs, None, None, w, b, True, relu=True)
        y.backward(dy)
        outs.append((y, xs.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_saves_input_not_output(device):
    """Forward saves x (own dtype), the residual and per-channel statistics — never the output."""
    x = leaf(activation((2, 4, 3, 3), torch.bfloat16, device, True))
    r = leaf(activation((2, 4, 3, 3), torch.bfloat16, device, True))
    w, b, rm, rv = channel_params(4, device)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = fusedres.bn_act(x, rm, rv, w, b, True, residual=r, relu=True)
    ptrs = {t.untyped_storage().data_ptr() for t in saved}
    assert y.untyped_storage().data_ptr() not in ptrs
    assert x.untyped_storage().data_ptr() in ptrs and r.untyped_storage().data_ptr() in ptrs
    big = [t for t in saved if t.dim() == 4]
    assert all(t.dtype == torch.bfloat16 for t in big) and len(big) == 2
    assert all(t.dtype == torch.float32 and t.numel() == 4 for t in saved if t.dim() == 1)


def test_non_dense_inputs_are_accepted(device):
    """Sliced / permuted inputs are copied to a dense layout first, with the same result."""
    base = activation((2, 6, 5, 8), torch.float32, device, False)
    x = base[:, ::2, :, 1:6]  # neither NCHW- nor NHWC-dense
    r = activation((2, 3, 5, 5), torch.float32, device, True)
    w, b, rm, rv = channel_params(3, device)
    y = fusedres.bn_act(x, None, None, w, b, True, residual=r, relu=True)
    yd = bn_act_reference(x.double(), None, None, w.double(), b.double(), True, 0.1, 1e-5, r.double(), True)
    assert_close(y, yd, torch.float32, "y")


def test_opcheck(device):
    x = activation((2, 3, 4, 3), torch.float32, device, True).requires_grad_()
    r = activation((2, 3, 4, 3), torch.float32, device, True).requires_grad_()
    w, b, rm, rv = channel_params(3, device)
    w.requires_grad_()
    b.requires_grad_()
    ops = torch.ops.fusedres
    stats = ops.bn_stats(x.detach(), w.detach(), b.detach(), None, None, None, 0.1, 1e-5)
    # bn_stats is not differentiable (bn_act_train's backward covers the statistics): checked without grad
    torch.library.opcheck(ops.bn_stats.default, (x.detach(), w.detach(), b.detach(), rm, rv, None, 0.1, 1e-5))
    torch.library.opcheck(ops.bn_stats.default, (x.detach(), None, None, rm, rv, torch.tensor(3, device=device),
                                                 None, 1e-3))
    torch.library.opcheck(ops.bn_act_train.default, (x, w, b, r, *stats, 1e-5, True))
    torch.library.opcheck(ops.bn_act_train.default, (x, None, None, None, *stats, 1e-3, False))
    torch.library.opcheck(ops.bn_act_eval.default, (x, w, b, r, rm, rv, 1e-5, True))
    y = ops.bn_act_train(x, w, b, r, *stats, 1e-5, True)
    torch.library.opcheck(ops.bn_act_backward.default,
                          (torch.randn_like(y), x.detach(), w.detach(), b.detach(), r.detach(), *stats, 1e-5,
                           True, True, True))


def test_torch_compile_fullgraph(device):
    """The registered ops trace with fake tensors: fullgraph compile with Inductor matches eager, running
    statistics included."""
    torch._dynamo.reset()

    def step(x, r, w, b, rm, rv):
        return fusedres.bn_act(x, rm, rv, w, b, True, 0.1, 1e-5, r, True)

    x = activation((2, 4, 3, 3), torch.float32, device, True)
    r = activation((2, 4, 3, 3), torch.float32, device, True)
    w, b, rm, rv = channel_params(4, device)
    outs = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="inductor")):
        xs, rs, ws, bs, rms, rvs = leaf(x), leaf(r), leaf(w), leaf(b), rm.clone(), rv.clone()
        y = fn(xs, rs, ws, bs, rms, rvs)
        y.square().sum().backward()
        outs.append((y, xs.grad, rs.grad, ws.grad, bs.grad, rms, rvs))
    for eager, compiled in zip(*outs):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case, error, match", [
    ("rank", ValueError, "must be 4-D"),
    ("channels", ValueError, r"weight \(of x\) has shape \(4,\) but the input has 3 channels"),
    ("res_shape", ValueError, "residual shape"),
    ("res_dtype", TypeError, "residual dtype"),
    ("res_device", ValueError, "residual is on meta"),
    ("param_device", ValueError, "is on meta"),
    ("one_value", ValueError, "more than 1 value per channel"),
    ("int_dtype", TypeError, "dtype torch.int32"),
    ("eval_without_stats", ValueError, "needs running_mean"),
])
def test_bad_input_errors(device, case, error, match):
    x = activation((2, 3, 4, 4), torch.float32, device, False)
    w, b, rm, rv = channel_params(3, device)
    kwargs = dict(running_mean=rm, running_var=rv, weight=w, bias=b, training=True)
    if case == "rank":
        x = x[0]
    elif case == "channels":
        kwargs["weight"] = torch.ones(4, device=device)
    elif case == "res_shape":
        kwargs["residual"] = x[:, :, :3]
    elif case == "res_dtype":
        kwargs["residual"] = x.half()
    elif case == "res_device":
        kwargs["residual"] = torch.empty_like(x, device="meta")
    elif case == "param_device":
        kwargs["bias"] = b.to("meta")
    elif case == "one_value":
        x = x[:1, :, :1, :1]
    elif case == "int_dtype":
        x = x.int()
    elif case == "eval_without_stats":
        kwargs.update(training=False, running_mean=None, running_var=None)
    with pytest.raises(error, match=match):
        fusedres.bn_act(x, **kwargs)


def test_float64_runs_in_float64(device):
    """float64 is supported (statistics and math in float64), e.g. for gradcheck."""
    x = activation((2, 3, 4, 4), torch.float64, device, False)
    w, b, rm, rv = (t.double() for t in channel_params(3, device))
    y = fusedres.bn_act(x, rm.clone(), rv.clone(), w, b, True, relu=True)
    yd = bn_act_reference(x, rm.clone(), rv.clone(), w, b, True, 0.1, 1e-5, None, True)
    assert y.dtype == torch.float64
    assert_close(y, yd, torch.float64, "y")
