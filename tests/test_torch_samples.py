"""PyTorch's own test data for BatchNorm, run through fusedres: the `nn.BatchNorm2d` ModuleInfo samples (and its
error inputs) drive `fusedres.nn.BatchNormAct2d`, the `nn.functional.batch_norm` OpInfo samples drive
`fusedres.bn_act` (4-D samples as they are, the others reshaped to [N, C, L, 1]), in every dtype the infos
offer, both memory formats, train and eval, on the test device (the GPU where there is one) and every backend
that accepts the input.

Outputs, gradients, running statistics and num_batches_tracked are compared with stock under one rule: within
the dtype's tolerance of stock, or no further from a float64 run on the same (rounded) inputs than 2x stock's
own error. The one refused sample (a 1-D `(0,)` input: 0 channels) must raise fusedres's clear ValueError;
docs/torch_compat.md lists it."""
import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
# torch.testing._internal imports expecttest (requirements-dev.txt); the GPU machine's offline stack may lack it,
# and a collection error would stop gpu.sh's whole test step there.
pytest.importorskip("expecttest", reason="torch.testing._internal needs expecttest (pip install expecttest)")
from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402
from torch.testing._internal.common_modules import module_db  # noqa: E402

# Importing torch.testing._internal freezes torch.backends flags for the whole process (its own suite's
# disable_global_flags()); the rest of this suite sets cudnn.allow_tf32 in fixtures, so thaw them again.
torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True
assert not torch.backends.flags_frozen()

import fusedres
from fusedres.nn import BatchNormAct2d
from helpers import TOLERANCES, backend_names

OPINFO = next(o for o in op_db if o.name == "nn.functional.batch_norm" and o.variant_test_name == "")
MODULEINFO = next(m for m in module_db if m.module_cls is nn.BatchNorm2d)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the test device, as conftest's
BACKENDS = backend_names(DEVICE)
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
VARIANTS = {"plain": (False, False), "residual": (True, False), "residual_relu": (True, True)}


def _cases(backend):
    """(variant, (has_residual, relu)), (layout, memory format) pairs; the interpreted Triton backend (slow)
    runs the two variants that between them take every kernel path: plain and residual + ReLU."""
    names = VARIANTS if backend != "triton" else ("plain", "residual_relu")
    return [((n, VARIANTS[n]), f) for n in names for f in LAYOUTS.items()]


def _sorted(dtypes):
    return sorted(dtypes, key=str)


def assert_matches_stock(got, stock, exact, dtype, what):
    """Within tolerance of stock, or no further from the float64 result than 2x stock's own error."""
    if stock is None:
        assert got is None or not got.any(), f"{what}: stock gives no gradient, fusedres a non-zero one"
        return
    assert got is not None and got.shape == stock.shape and got.dtype == stock.dtype, \
        f"{what}: {None if got is None else (got.shape, got.dtype)} vs stock {(stock.shape, stock.dtype)}"
    rtol, atol = TOLERANCES[dtype]
    scale = max(1.0, exact.abs().max().item()) if exact.numel() else 1.0
    if torch.allclose(got.double(), stock.double(), rtol=rtol, atol=atol * scale, equal_nan=True):
        return
    err = (got.double() - exact).abs().max().item()
    stock_err = (stock.double() - exact).abs().max().item()
    assert err <= 2 * stock_err, (f"{what}: max |fusedres - float64| = {err:.3g} but max |stock - float64| = "
                                  f"{stock_err:.3g} (and not within rtol={rtol}, atol={atol * scale:.3g} of stock)")


def _leaf(t, dtype=None, memory_format=torch.contiguous_format):
    if t is None:
        return None
    t = t.detach().to(dtype or t.dtype).contiguous(memory_format=memory_format)
    return t.requires_grad_(t.is_floating_point())


def _grads(y, dy, tensors):
    leaves = [t for t in tensors if t is not None and t.requires_grad]
    got = iter(torch.autograd.grad(y, leaves, dy, allow_unused=True))
    return [next(got) if t is not None and t.requires_grad else None for t in tensors]


# ------------------------------------------------------------------------ OpInfo: nn.functional.batch_norm
def _to_4d(x):
    """A sample input as [N, C, H, W]: 3-D [N, C, L] -> [N, C, L, 1], 2-D [N, C] -> [N, C, 1, 1], 1-D (no
    channel dimension; the OpInfo gives it 0 channels) -> [N, 0, 1, 1]."""
    if x.dim() == 1:
        return x.reshape(x.shape[0], 0, 1, 1)
    while x.dim() < 4:
        x = x.unsqueeze(-1)
    return x


def _op_samples(dtype):
    return list(OPINFO.sample_inputs(DEVICE, dtype, requires_grad=True))


def _run_functional(fn, x, args, kwargs, r, relu, dy, dtype, fmt):
    x = _leaf(x, dtype, fmt)
    rm, rv, w, b = (None if a is None else a.detach().to(dtype).clone() for a in args)
    w, b = _leaf(w), _leaf(b)
    r = _leaf(r, dtype, fmt)
    y = fn(x, rm, rv, w, b, r, relu, kwargs)
    return (y, *_grads(y, dy.to(dtype), [x, w, b, r]), rm, rv)


def _stock_bn_act(x, rm, rv, w, b, r, relu, kwargs):
    y = F.batch_norm(x, rm, rv, w, b, **kwargs)
    y = y + r if r is not None else y
    return torch.relu(y) if relu else y


def _fused_bn_act(x, rm, rv, w, b, r, relu, kwargs):
    return fusedres.bn_act(x, rm, rv, w, b, residual=r, relu=relu, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", _sorted(OPINFO.supported_dtypes(DEVICE)))
def test_functional_batch_norm_samples(backend, dtype):
    torch.manual_seed(0)
    ran = 0
    for i, sample in enumerate(_op_samples(dtype)):
        x4 = _to_4d(sample.input)
        if x4.shape[1] == 0:  # the refused sample (docs/torch_compat.md)
            with fusedres.use_backend(backend), pytest.raises(ValueError, match="0 channels"):
                fusedres.bn_act(x4, *sample.args, **sample.kwargs)
            continue
        for (name, (has_res, relu)), (layout, fmt) in _cases(backend):
            what = f"sample {i} {tuple(sample.input.shape)} {sample.kwargs} {name} {layout}"
            r = torch.randn(x4.shape, device=DEVICE).to(dtype) if has_res else None
            dy = torch.randn(x4.shape, device=DEVICE).to(dtype)
            stock = _run_functional(_stock_bn_act, x4, sample.args, sample.kwargs, r, relu, dy, dtype, fmt)
            exact = _run_functional(_stock_bn_act, x4, sample.args, sample.kwargs, r, relu, dy, torch.float64,
                                    fmt)
            with fusedres.use_backend(backend):
                got = _run_functional(_fused_bn_act, x4, sample.args, sample.kwargs, r, relu, dy, dtype, fmt)
            assert got[0].stride() == stock[0].stride() or got[0].numel() == 0, f"{what}: output layout"
            for part, g, s, e in zip(("y", "grad x", "grad weight", "grad bias", "grad residual", "running_mean",
                                      "running_var"), got, stock, exact):
                assert_matches_stock(g, s, e, dtype, f"{what}: {part}")
            ran += 1
    assert ran > 0


# ------------------------------------------------------------------------ ModuleInfo: nn.BatchNorm2d
@torch.no_grad()
def _randomise(bn):
    """Non-trivial affine parameters and running statistics (stock's init is ones / zeros)."""
    if bn.weight is not None:
        bn.weight.uniform_(0.5, 1.5)
    if bn.bias is not None:
        bn.bias.normal_()
    if bn.running_mean is not None:
        bn.running_mean.normal_(0, 0.5), bn.running_var.uniform_(0.5, 1.5)
    return bn


def _run_module(module, x, r, relu, dy, dtype, fmt):
    m = copy.deepcopy(module).to(dtype)
    x = _leaf(x, dtype, fmt)
    r = _leaf(r, dtype, fmt)
    if isinstance(m, BatchNormAct2d):
        y = m(x, r) if r is not None else m(x)
    else:
        y = m(x)
        y = y + r if r is not None else y
        y = torch.relu(y) if relu else y
    grads = _grads(y, dy.to(dtype), [x, m.weight, m.bias, r])
    return [y, *grads], m.state_dict()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", _sorted(MODULEINFO.dtypes))
@pytest.mark.parametrize("training", [True, False])
def test_batchnorm2d_module_samples(backend, dtype, training):
    torch.manual_seed(0)
    inputs = MODULEINFO.module_inputs_func(MODULEINFO, device=DEVICE, dtype=dtype, requires_grad=True,
                                           training=training)
    assert inputs
    for mi in inputs:
        args, kwargs = mi.constructor_input.args, mi.constructor_input.kwargs
        x = mi.forward_input.args[0]
        stock = _randomise(nn.BatchNorm2d(*args, **kwargs, dtype=dtype, device=DEVICE)).train(training)
        for (name, (has_res, relu)), (layout, fmt) in _cases(backend):
            what = f"{mi.desc or 'default'} {args} {kwargs} training={training} {name} {layout}"
            fused = BatchNormAct2d.from_bn(copy.deepcopy(stock), act="relu" if relu else None)
            r = torch.randn(x.shape, device=DEVICE).to(dtype) if has_res else None
            dy = torch.randn(x.shape, device=DEVICE).to(dtype)
            want, want_state = _run_module(stock, x, r, relu, dy, dtype, fmt)
            exact, exact_state = _run_module(stock, x, r, relu, dy, torch.float64, fmt)
            with fusedres.use_backend(backend):
                got, got_state = _run_module(fused, x, r, relu, dy, dtype, fmt)
            assert got[0].stride() == want[0].stride() or got[0].numel() == 0, f"{what}: output layout"
            for part, g, s, e in zip(("y", "grad x", "grad weight", "grad bias", "grad residual"), got, want, exact):
                assert_matches_stock(g, s, e, dtype, f"{what}: {part}")
            assert list(got_state) == list(want_state)
            for key in want_state:
                if key == "num_batches_tracked":
                    assert torch.equal(got_state[key], want_state[key]), f"{what}: {key}"
                else:
                    assert_matches_stock(got_state[key], want_state[key], exact_state[key].double(), dtype,
                                         f"{what}: {key}")


@pytest.mark.parametrize("dtype", _sorted(MODULEINFO.dtypes))
@pytest.mark.parametrize("training", [True, False])
def test_batchnorm2d_module_error_inputs(dtype, training):
    """Each error input fails for BatchNormAct2d exactly when it fails for nn.BatchNorm2d, with the same
    exception type (and, for the errors the info declares, a message matching its regex)."""
    errors = MODULEINFO.module_error_inputs_func(MODULEINFO, device=DEVICE, dtype=dtype, requires_grad=False,
                                                 training=training)
    assert errors
    for e in errors:
        mi = e.module_error_input
        args, kwargs = mi.constructor_input.args, mi.constructor_input.kwargs
        x = mi.forward_input.args[0]
        stock = nn.BatchNorm2d(*args, **kwargs, dtype=dtype, device=DEVICE).train(training)
        fused = BatchNormAct2d(*args, **kwargs, dtype=dtype, device=DEVICE).train(training)
        try:
            stock(x)
        except Exception as stock_error:  # noqa: BLE001  (whatever stock raises, fusedres must raise too)
            with pytest.raises(type(stock_error)) as fused_error:
                fused(x)
            if training:
                assert e.error_type is type(stock_error)
                assert re.search(e.error_regex, str(fused_error.value))
        else:
            fused(x)


def test_functional_argument_names():
    """bn_act takes F.batch_norm's argument names (`input` first); `x=` still works; both at once is an error."""
    torch.manual_seed(0)
    x, rm, rv = torch.randn(2, 3, 2, 2), torch.randn(3), torch.rand(3) + 0.5
    kw = dict(running_mean=rm, running_var=rv, weight=torch.rand(3) + 0.5, bias=torch.randn(3), training=False,
              momentum=0.1, eps=1e-5)
    want = F.batch_norm(input=x, **kw)
    torch.testing.assert_close(fusedres.bn_act(input=x, **kw), want)
    torch.testing.assert_close(fusedres.bn_act(x=x, **kw), want)
    with pytest.raises(TypeError, match="got both input and x"):
        fusedres.bn_act(x, x=x, **kw)
