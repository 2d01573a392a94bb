"""The CUDA backend (fusedres.cuda -> fusedres._C) against the reference backend on CUDA tensors, primitive by
primitive, and cross-checked against Triton: every dtype, both layouts, odd C and vector tails, misaligned
(but dense) tensors that force the scalar kernels, 1x1 spatial up to ResNet-50 layer shapes, determinism,
a non-default stream, data far from zero.

GPU-only: skipped where there is no CUDA device or the extension is not built (its logic is covered on the
CPU by tests/test_cuda_host.py). The op-level tests (tests/test_bn_act.py, ...) also run on this backend
whenever it is available.
"""
from __future__ import annotations

import os

import pytest
import torch

import fusedres
from fusedres import backends, reference

cuda_backend = backends.load("cuda")
_HAVE = torch.cuda.is_available() and cuda_backend is not None and cuda_backend.extension() is not None
if not _HAVE:  # one skip line for the module, not one per parametrised case
    pytest.skip("needs a CUDA GPU and the fusedres._C extension (pip install -e . with a CUDA toolkit)",
                allow_module_level=True)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (rtol, atol) of an output in its dtype, against the reference on the same inputs (both compute in fp32)
OUT_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
SHAPES = [
    (2, 3, 5, 5),      # odd C: lanes cross channels
    (3, 5, 7, 7),      # HW = 49: NCHW per-lane channels + vector tail
    (4, 64, 1, 1),     # 1x1 spatial
    (3, 1000, 2, 2),   # C=1000: partly idle channel tile
    (2, 24, 4, 4),     # NCHW uniform vectors
    (2, 64, 56, 56),   # ResNet-50 layer1
    (4, 256, 14, 14),  # layer3
    (2, 2048, 7, 7),   # layer4
]
VARIANTS = ["plain", "residual", "dual"]
# FUSEDRES_CUDA_TEST_QUICK=1 (scripts/gpu.sh under compute-sanitizer): small shapes, no Triton cross-check
QUICK = os.environ.get("FUSEDRES_CUDA_TEST_QUICK", "0") == "1"
if QUICK:
    SHAPES = [(2, 3, 5, 5), (3, 5, 7, 7), (3, 1000, 2, 2), (2, 24, 4, 4), (2, 64, 8, 8)]


def make(shape, dtype, channels_last, offset=0.0, misaligned=False):
    """A dense activation; misaligned: its data pointer is one element past a 16-byte boundary."""
    n, c, h, w = shape
    x = torch.randn(shape, device="cuda") + offset
    if not misaligned:
        x = x.to(dtype)
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x
    buf = torch.empty(x.numel() + 1, dtype=dtype, device="cuda")
    if channels_last:
        t = buf[1:].view(n, h, w, c).permute(0, 3, 1, 2)
        t.copy_(x)
    else:
        t = buf[1:].view(shape)
        t.copy_(x)
    assert t.data_ptr() % 16 != 0
    return t


def vec(c, lo=-1.5, hi=1.5):
    return torch.empty(c, device="cuda").uniform_(lo, hi)


def inputs(shape, dtype, channels_last, variant, misaligned=False, offset=0.0):
    c = shape[1]
    x = make(shape, dtype, channels_last, offset + 2.0, misaligned)
    mean = x.float().mean((0, 2, 3)) + 0.1 * torch.randn(c, device="cuda")
    res = make(shape, dtype, channels_last, 0.0, misaligned) if variant == "residual" else None
    xb = make(shape, dtype, channels_last, -1.0, misaligned) if variant == "dual" else None
    mean_b = xb.float().mean((0, 2, 3)) if xb is not None else None
    scale_b, shift_b = (vec(c), vec(c)) if xb is not None else (None, None)
    return dict(x=x, mean=mean, scale=vec(c), shift=vec(c), residual=res, xb=xb, mean_b=mean_b, scale_b=scale_b,
                shift_b=shift_b)


def close(actual, expected, dtype, what):
    rtol, atol = OUT_TOL[dtype]
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def close_sum(actual, expected, abs_sum, what):
    """Per-channel sums: the error bound scales with the sum of the terms' magnitudes (order differs)."""
    bound = 1e-5 * abs_sum + 1e-5
    err = (actual.double() - expected.double()).abs()
    assert torch.all(err <= bound), f"{what}: max error {err.max().item()} (bound {bound.max().item()})"


def other_backends():
    names = ["reference"]
    if not QUICK and backends.load("triton") is not None and not backends.not_supported_reasons("triton", torch.empty(
            1, 1, 1, 1, device="cuda")):
        names.append("triton")
    return names


# ------------------------------------------------------------------------------------------------ basics
def test_extension_loads_and_supports_this_gpu():
    assert "archs" in cuda_backend.build_info()
    x = torch.randn(2, 8, 4, 4, device="cuda")
    assert cuda_backend.not_supported_reasons(x) == []
    assert backends.select(x) is cuda_backend  # preferred whenever it accepts the input
    assert "dtype float64" in " ".join(cuda_backend.not_supported_reasons(x.double()))
    assert cuda_backend.not_supported_reasons(x.cpu())


# ------------------------------------------------------------------------------------------------ primitives
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("misaligned", [False, True])
def test_batch_stats(shape, dtype, channels_last, misaligned):
    x = make(shape, dtype, channels_last, 3.0, misaligned)
    mean, var = cuda_backend.batch_stats(x)
    assert mean.dtype == var.dtype == torch.float32 and mean.shape == (shape[1],)
    x64 = x.double()
    torch.testing.assert_close(mean.double(), x64.mean((0, 2, 3)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.double(), x64.var((0, 2, 3), unbiased=False), rtol=1e-4, atol=1e-6)
    for name in other_backends():
        m2, v2 = backends.load(name).batch_stats(x)
        torch.testing.assert_close(mean, m2, rtol=1e-5, atol=1e-5, msg=lambda m: f"vs {name}: {m}")
        torch.testing.assert_close(var, v2, rtol=1e-4, atol=1e-6, msg=lambda m: f"vs {name}: {m}")


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("relu", [False, True])
def test_apply(shape, dtype, channels_last, variant, relu):
    a = inputs(shape, dtype, channels_last, variant)
    args = (a["x"], a["mean"], a["scale"], a["shift"], a["residual"], a["xb"], a["mean_b"], a["scale_b"],
            a["shift_b"], relu)
    y = cuda_backend.apply(*args)
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    for name in other_backends():
        close(y, backends.load(name).apply(*args), dtype, f"apply vs {name}")


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("relu", [False, True])
def test_backward_reduce(shape, dtype, channels_last, variant, relu):
    a = inputs(shape, dtype, channels_last, variant)
    dy = make(shape, dtype, channels_last)
    want_res = a["residual"] is not None
    args = (dy, a["x"], a["mean"], a["scale"], a["shift"], a["residual"], a["xb"], a["mean_b"], a["scale_b"],
            a["shift_b"], relu, want_res)
    sg, sgx, sgxb, gres = cuda_backend.backward_reduce(*args)
    # magnitudes for the error bound: sums of |g| and |g * (x - mean)|
    abs_dims = (0, 2, 3)
    dyf = dy.float().abs()
    for name in other_backends():
        rg, rgx, rgxb, rres = backends.load(name).backward_reduce(*args)
        close_sum(sg, rg, dyf.sum(abs_dims), f"sum_g vs {name}")
        close_sum(sgx, rgx, (dyf * (a["x"].float() - a["mean"].view(1, -1, 1, 1)).abs()).sum(abs_dims),
                  f"sum_g_xc vs {name}")
        if a["xb"] is not None:
            close_sum(sgxb, rgxb, (dyf * (a["xb"].float() - a["mean_b"].view(1, -1, 1, 1)).abs()).sum(abs_dims),
                      f"sum_g_xbc vs {name}")
        else:
            assert sgxb is None
        if want_res:
            close(gres, rres, dtype, f"grad_residual vs {name}")
        else:
            assert gres is None


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("relu", [False, True])
def test_backward_apply(shape, dtype, channels_last, variant, relu):
    a = inputs(shape, dtype, channels_last, variant)
    c = shape[1]
    dy = make(shape, dtype, channels_last)
    k = [vec(c) for _ in range(3)]
    kb = [vec(c) for _ in range(3)] if a["xb"] is not None else [None] * 3
    args = (dy, a["x"], a["mean"], a["scale"], a["shift"], a["residual"], a["xb"], a["mean_b"], a["scale_b"],
            a["shift_b"], relu, *k, *kb)
    dx, dxb = cuda_backend.backward_apply(*args)
    for name in other_backends():
        rdx, rdxb = backends.load(name).backward_apply(*args)
        close(dx, rdx, dtype, f"dx vs {name}")
        if a["xb"] is not None:
            close(dxb, rdxb, dtype, f"dxb vs {name}")
        else:
            assert dxb is None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("variant", VARIANTS)
def test_misaligned_tensors_take_the_scalar_kernels(dtype, channels_last, variant):
    shape = (2, 24, 3, 5)
    a = inputs(shape, dtype, channels_last, variant, misaligned=True)
    dy = make(shape, dtype, channels_last, misaligned=True)
    fwd = (a["x"], a["mean"], a["scale"], a["shift"], a["residual"], a["xb"], a["mean_b"], a["scale_b"],
           a["shift_b"], True)
    close(cuda_backend.apply(*fwd), reference.apply(*fwd), dtype, "apply")
    red = (dy,) + fwd + (a["residual"] is not None,)
    for got, want in zip(cuda_backend.backward_reduce(*red), reference.backward_reduce(*red)):
        if want is None:
            assert got is None
        elif want.dim() == 1:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
        else:
            close(got, want, dtype, "grad_residual")
    c = shape[1]
    ks = [vec(c) for _ in range(3)] + ([vec(c) for _ in range(3)] if a["xb"] is not None else [None] * 3)
    for got, want in zip(cuda_backend.backward_apply(dy, *fwd, *ks), reference.backward_apply(dy, *fwd, *ks)):
        if want is None:
            assert got is None
        else:
            close(got, want, dtype, "dx/dxb")


# ------------------------------------------------------------------------------------------------ properties
def test_data_far_from_zero_keeps_its_variance():
    x = make((8, 64, 28, 28), torch.float32, True, 1000.0)
    _, var = cuda_backend.batch_stats(x)
    torch.testing.assert_close(var.double(), x.double().var((0, 2, 3), unbiased=False), rtol=1e-3, atol=0)


@pytest.mark.parametrize("channels_last", [False, True])
def test_reductions_are_deterministic(channels_last):
    shape = (4, 64, 28, 28) if QUICK else (32, 256, 28, 28)  # many splits per channel
    a = inputs(shape, torch.float16, channels_last, "residual")
    dy = make(shape, torch.float16, channels_last)
    args = (dy, a["x"], a["mean"], a["scale"], a["shift"], a["residual"], None, None, None, None, True, True)
    first = cuda_backend.backward_reduce(*args)
    stats = cuda_backend.batch_stats(a["x"])
    for _ in range(3):
        again = cuda_backend.backward_reduce(*args)
        for u, v in zip(first, again):
            if u is not None:
                assert torch.equal(u, v)
        for u, v in zip(stats, cuda_backend.batch_stats(a["x"])):
            assert torch.equal(u, v)


def _bits(t):
    """t's bit patterns (-0 and NaN payloads included), as integers."""
    return t.contiguous().view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def _backward_three_launches(dy, x, mean, scale, shift, var, eps, residual, xb, mean_b, scale_b, shift_b, var_b,
                             eps_b, relu, training):
    """fusedres.cuda.backward as it was before the finalize moved into the reduction: backward_partials,
    backward_finalize, backward_apply. Returns (dx, dxb, grad_residual, grads_a, grads_b)."""
    from fusedres import cuda as C

    ext = C.extension()
    L = C._launch(ext, x)
    grad_residual = torch.empty_like(x) if residual is not None else None
    ws, splits = C._workspace(ext, x, 3 if xb is not None else 2)
    ext.backward_partials(L, dy.data_ptr(), x.data_ptr(), scale.data_ptr(), shift.data_ptr(), mean.data_ptr(),
                          C._ptr(residual), C._ptr(xb), C._ptr(scale_b), C._ptr(shift_b), C._ptr(mean_b), relu,
                          C._ptr(grad_residual), ws.data_ptr(), ws.numel(), splits)
    mode_a, mode_b = C._side(True, var, mean), C._side(xb is not None, var_b, mean_b)
    outs_a = [C._channels(x) if i in C._SIDE_OUTPUTS[mode_a] or mode_a == 1 else None for i in range(4)]
    outs_b = [C._channels(x) if i in C._SIDE_OUTPUTS[mode_b] or mode_b == 1 else None for i in range(4)]
    ext.backward_finalize(L, ws.data_ptr(), splits, mode_a, mode_b, training,
                          float(x.shape[0] * x.shape[2] * x.shape[3]), scale.data_ptr(), C._ptr(var), float(eps),
                          C._ptr(scale_b), C._ptr(var_b), float(eps_b), [C._ptr(t) for t in outs_a],
                          [C._ptr(t) for t in outs_b])
    dx, dxb = C.backward_apply(dy, x, mean, scale, shift, residual, xb, mean_b, scale_b, shift_b, relu, scale,
                               outs_a[0] if mode_a == 1 else None, outs_a[1] if mode_a == 1 else None, scale_b,
                               outs_b[0] if mode_b == 1 else None, outs_b[1] if mode_b == 1 else None)
    return (dx, dxb, grad_residual, tuple(outs_a[i] for i in C._SIDE_OUTPUTS[mode_a]),
            tuple(outs_b[i] for i in C._SIDE_OUTPUTS[mode_b]))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", ["residual", "dual"])
@pytest.mark.parametrize("shape", [(2, 3, 5, 5), (3, 1000, 2, 2), (4, 64, 28, 28)] if QUICK else
                         [(2, 3, 5, 5), (3, 1000, 2, 2), (32, 256, 28, 28), (8, 24, 14, 14)])
def test_fused_backward_is_bitwise_the_three_launch_backward(shape, dtype, channels_last, variant):
    """backward (backward_reduce_finalize: the reduction's last block per channel tile finalizes) gives the same
    bits as backward_partials + backward_finalize + backward_apply, run to run, and leaves its counters at 0."""
    from fusedres import cuda as C

    a = inputs(shape, dtype, channels_last, variant)
    dy = make(shape, dtype, channels_last)
    c = shape[1]
    var, var_b = torch.rand(c, device="cuda") + 0.5, (torch.rand(c, device="cuda") + 0.5 if variant == "dual"
                                                        else None)
    args = (dy, a["x"], a["mean"], a["scale"], a["shift"], var, 1e-5, a["residual"], a["xb"], a["mean_b"],
            a["scale_b"], a["shift_b"], var_b, 1e-3, True, True)
    want = _backward_three_launches(*args)
    for _ in range(2):
        got = cuda_backend.backward(*args, a["residual"] is not None)
        for g, w in zip(got, want):
            for u, v in (zip(g, w) if isinstance(g, tuple) else [(g, w)]):
                assert (u is None) == (v is None)
                if u is not None:
                    assert torch.equal(_bits(u), _bits(v))
    torch.cuda.synchronize()
    sem = C._semaphore(a["x"], c)
    assert sem.numel() >= c and int(sem.count_nonzero()) == 0


def test_fused_backward_counters_per_stream():
    """Each stream gets its own counter buffer; the fused backward on a side stream gives the same bits."""
    from fusedres import cuda as C

    shape = (8, 64, 14, 14)
    a = inputs(shape, torch.float16, True, "residual")
    dy = make(shape, torch.float16, True)
    var = torch.rand(64, device="cuda") + 0.5
    args = (dy, a["x"], a["mean"], a["scale"], a["shift"], var, 1e-5, a["residual"], None, None, None, None, None,
            1e-5, True, True, True)
    want = cuda_backend.backward(*args)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = cuda_backend.backward(*args)
        side_sem = C._semaphore(a["x"], 64)
    torch.cuda.current_stream().wait_stream(side)
    assert side_sem.data_ptr() != C._semaphore(a["x"], 64).data_ptr()
    assert torch.equal(got[0], want[0]) and all(torch.equal(u, v) for u, v in zip(got[3], want[3]))


def _bn_stats_two_launches(x, weight, bias, eps, running_mean, running_var, momentum, num_batches_tracked,
                           increment=None):
    """fusedres.cuda.bn_stats as it was before the finalize moved into the statistics kernel: stats_partials, then
    stats_finalize (fusedres.cuda._finalize without `fused`). Returns (mean, var, scale, shift)."""
    from fusedres import cuda as C

    ext = C.extension()
    L = C._launch(ext, x)
    mean, var = C._channels(x), C._channels(x)
    ws, splits = C._workspace(ext, x, 3)
    ext.stats_partials(L, x.data_ptr(), ws.data_ptr(), ws.numel(), splits)
    scale, shift = C._finalize(ext, L, x, ws, splits, mean, var, weight, bias, eps, running_mean, running_var,
                               momentum, num_batches_tracked, increment)
    return mean, var, scale, shift


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", ["momentum", "cumulative", "increment", "bf16_running", "no_affine"])
@pytest.mark.parametrize("shape", [(2, 3, 5, 5), (3, 1000, 2, 2), (4, 64, 28, 28)] if QUICK else
                         [(2, 3, 5, 5), (3, 1000, 2, 2), (32, 256, 28, 28), (8, 24, 14, 14), (2, 2048, 7, 7)])
def test_fused_stats_is_bitwise_the_two_launch_stats(shape, dtype, channels_last, variant):
    """bn_stats (stats_reduce_finalize: the statistics kernel's last block per channel tile finalizes) gives the
    same bits as stats_partials + stats_finalize for mean, var, scale, shift and the running statistics, run to
    run; num_batches_tracked gets exactly one per call; the counters are 0 afterwards."""
    from fusedres import cuda as C

    x = make(shape, dtype, channels_last, 0.5)
    c = shape[1]
    weight, bias = (None, None) if variant == "no_affine" else (torch.rand(c, device="cuda") + 0.5,
                                                              torch.randn(c, device="cuda"))
    rdt = torch.bfloat16 if variant == "bf16_running" else torch.float32  # bf16: torch's lerp_ after the kernel
    rm0, rv0 = torch.randn(c, device="cuda").to(rdt), (torch.rand(c, device="cuda") + 0.5).to(rdt)
    momentum = None if variant == "cumulative" else 0.1
    for _ in range(2):
        nbt = [torch.tensor(3, device="cuda") for _ in range(2)]
        rm, rv = [rm0.clone(), rm0.clone()], [rv0.clone(), rv0.clone()]
        inc = variant == "increment"
        want = _bn_stats_two_launches(x, weight, bias, 1e-3, rm[0], rv[0], momentum, nbt[0],
                                      nbt[0] if inc else None)
        got = cuda_backend.bn_stats(x, weight, bias, 1e-3, rm[1], rv[1], momentum, nbt[1], nbt[1] if inc else None)
        for u, v in zip(got, want):
            assert torch.equal(_bits(u), _bits(v))
        assert torch.equal(_bits(rm[1]), _bits(rm[0])) and torch.equal(_bits(rv[1]), _bits(rv[0]))
        assert int(nbt[1]) == int(nbt[0]) == 3 + inc
    torch.cuda.synchronize()
    sem = C._semaphore(x, c)
    assert sem.numel() >= c and int(sem.count_nonzero()) == 0


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("misaligned", [False, True])
@pytest.mark.parametrize("shape", [(3, 5, 7, 7), (3, 1000, 2, 2), (8, 64, 56, 56)])
def test_fused_batch_stats_is_bitwise_the_two_launch_batch_stats(shape, channels_last, misaligned):
    """batch_stats (one stats_reduce_finalize launch, mean and var only) is bitwise the two-launch path (partials
    + stats_finalize)."""
    from fusedres import cuda as C

    x = make(shape, torch.float16, channels_last, 0.5, misaligned=misaligned)
    mean, var, _, _ = _bn_stats_two_launches(x, None, None, 1e-5, None, None, 0.1, None)
    got = cuda_backend.batch_stats(x)
    assert torch.equal(_bits(got[0]), _bits(mean)) and torch.equal(_bits(got[1]), _bits(var))
    torch.cuda.synchronize()
    assert int(C._semaphore(x, shape[1]).count_nonzero()) == 0


def test_runs_on_the_current_stream():
    shape = (4, 64, 14, 14)
    a = inputs(shape, torch.float16, True, "residual")
    fwd = (a["x"], a["mean"], a["scale"], a["shift"], a["residual"], None, None, None, None, True)
    want = reference.apply(*fwd)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y = cuda_backend.apply(*fwd)
        mean, var = cuda_backend.batch_stats(a["x"])
    torch.cuda.current_stream().wait_stream(side)
    close(y, want, torch.float16, "apply on a side stream")
    torch.testing.assert_close(var, a["x"].float().var((0, 2, 3), unbiased=False), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_resnet50_batch256_layer1_shape(dtype):
    """N*H*W = 802,816 rows, C = 64: the largest reduction of ResNet-50 training at batch 256."""
    if QUICK:
        pytest.skip("large shape (FUSEDRES_CUDA_TEST_QUICK=1)")
    shape = (256, 64, 56, 56)
    a = inputs(shape, dtype, True, "residual")
    x = a["x"]
    mean, var = cuda_backend.batch_stats(x)
    torch.testing.assert_close(var.double(), x.double().var((0, 2, 3), unbiased=False), rtol=1e-4, atol=1e-6)
    dy = make(shape, dtype, True)
    args = (dy, x, mean, a["scale"], a["shift"], a["residual"], None, None, None, None, True, True)
    sg, sgx, _, gres = cuda_backend.backward_reduce(*args)
    rg, rgx, _, rres = reference.backward_reduce(*args)
    close_sum(sg, rg, dy.float().abs().sum((0, 2, 3)), "sum_g")
    close(gres, rres, dtype, "grad_residual")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_ops_end_to_end_on_cuda_backend(dtype, channels_last):
    """bn_act / dual_bn_act forward + backward through the registered ops, CUDA vs reference backend."""
    shape = (4, 64, 14, 14)
    c = shape[1]
    x = make(shape, dtype, channels_last, 1.0)
    r = make(shape, dtype, channels_last)
    w, b = vec(c, 0.5, 1.5), vec(c)
    grads = {}
    for name in ("cuda", "reference"):
        xs, rs, ws, bs = (t.detach().clone().requires_grad_() for t in (x, r, w, b))
        with fusedres.use_backend(name):
            y = fusedres.bn_act(xs, None, None, ws, bs, training=True, residual=rs, relu=True)
            y2 = fusedres.dual_bn_act(xs, rs, weight=ws, bias=bs, running_mean=None, running_var=None,
                                      weight_r=ws, bias_r=bs, running_mean_r=None, running_var_r=None,
                                      training=True, relu=True)
            ((y.float() ** 2).sum() + y2.float().sum()).backward()
        grads[name] = (y, y2, xs.grad, rs.grad, ws.grad, bs.grad)
    for got, want, what in zip(grads["cuda"], grads["reference"], ("y", "y2", "dx", "dr", "dw", "db")):
        rtol, atol = OUT_TOL[dtype]
        scale = max(1.0, want.float().abs().max().item())
        torch.testing.assert_close(got.float(), want.float(), rtol=rtol * 4, atol=atol * 4 * scale,
                                   msg=lambda m: f"{what}: {m}")
