"""The CUDA kernels' logic, checked on the CPU (no GPU needed): `fusedres._C_host` runs the kernels' own
per-thread code (csrc/fr_math.h, csrc/fr_bodies.h) over an emulated grid — index arithmetic, vector tails,
split partitioning, the block tree, Welford/Chan, the BN forward/backward per-element math — and these tests
compare it with numpy and with `fusedres.reference`.

The module is built with the CUDA extension (it needs the same CMake build); where a CUDA toolkit is present
and the build was not switched off, a missing module is a failure, not a skip.
"""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fusedres import reference

try:
    from fusedres import _C_host as H
except ImportError as e:  # not built
    H, _IMPORT_ERROR = None, e

_TOOLKIT = bool(shutil.which("nvcc") or os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"))
_BUILD_OFF = os.environ.get("FUSEDRES_BUILD_CUDA", "").strip().lower() in ("0", "false", "no", "off")


def test_harness_is_built_where_a_toolkit_is():
    if H is None and _TOOLKIT and not _BUILD_OFF:
        pytest.fail(f"nvcc is available but fusedres._C_host is not importable ({_IMPORT_ERROR}); "
                    "the native build was skipped or failed: pip install -e . -v shows why")


@pytest.fixture
def h():
    if H is None:
        pytest.skip("fusedres._C_host is not built (no CUDA toolkit at install time)")
    return H


# ------------------------------------------------------------------------------------------------ helpers
def to_mem(x: torch.Tensor, cl: bool) -> np.ndarray:
    """x [N, C, H, W] as the flat float32 array of its NCHW or NHWC memory."""
    x = x.float()
    return (x.permute(0, 2, 3, 1) if cl else x).contiguous().numpy().ravel()


def from_mem(a: np.ndarray, shape, cl: bool) -> torch.Tensor:
    n, c, hh, ww = shape
    t = torch.from_numpy(np.asarray(a, dtype=np.float32).copy())
    return t.view(n, hh, ww, c).permute(0, 3, 1, 2) if cl else t.view(n, c, hh, ww)


def vecs(c: int, k: int, lo=-1.5, hi=1.5):
    return [torch.empty(c).uniform_(lo, hi) for _ in range(k)]


def npv(t):
    return None if t is None else t.contiguous().numpy()


# (N, C, H, W, channels_last, vec, aligned): vec 8 = 16-byte fp16/bf16 vectors, 4 = fp32, 1 = scalar.
LAYOUT_CASES = [
    (2, 64, 7, 7, True, 8, True),      # ResNet-50 layer4-like spatial, rows kernels
    (2, 64, 7, 7, False, 8, True),     # NCHW, HW=49 not a multiple of 8: per-lane channels + tail; planes
    (3, 6, 14, 14, False, 8, True),    # NCHW 14x14 (HW=196): plane path with 16-byte vectors across planes
    (2, 5, 7, 7, False, 4, True),      # ... fp32 vectors at 7x7
    (3, 16, 4, 4, False, 8, True),     # NCHW, HW=16: uniform vectors
    (2, 1000, 1, 1, True, 8, True),    # C=1000: 125 vectors, last block tile partly idle
    (2, 1000, 1, 2, True, 4, True),
    (3, 3, 5, 5, True, 8, True),       # odd C: flat lanes crossing channels
    (3, 5, 3, 3, False, 4, True),
    (2, 24, 3, 5, True, 8, False),     # misaligned pointers: scalar kernels
    (2, 24, 3, 5, False, 4, False),
    (4, 32, 16, 16, True, 8, True),    # enough rows for several splits
    (4, 32, 16, 16, False, 8, True),
    (1, 8, 1, 1, False, 4, True),      # 1x1 spatial, N*H*W = 1 (apply only)
]


# ------------------------------------------------------------------------------------------------ index math
def test_tree_reduction_counts_every_thread_once(h):
    for n in range(1, 300):
        ts = h.tree_start(n)
        assert ts == 0 if n == 1 else (ts & (ts - 1) == 0 and ts < n <= 2 * ts)
        assert h.tree_sum([float(i + 1) for i in range(n)]) == n * (n + 1) / 2
        if n in (2, 3, 5, 8, 85, 128, 255, 256):  # each position reaches the root exactly once
            for i in range(n):
                assert h.tree_sum([float(j == i) for j in range(n)]) == 1.0


@pytest.mark.parametrize("inner,C", [(1, 1), (1, 3), (1, 64), (49, 5), (7, 1000), (3136, 256), (1, 2048)])
def test_channel_position_and_grid_stride_walk(h, inner, C):
    rng = np.random.default_rng(inner * 1000 + C)
    for e in rng.integers(0, 10 * inner * C, 50).tolist() + [0, inner * C - 1, inner * C]:
        assert h.chan_pos(e, inner, C) == ((e // inner) % C, e % inner)
    for step in [1, 3, 8, inner, inner * C, inner * C + 1, 7 * inner * C - 5, 256 * 8 * 132]:
        e0 = int(rng.integers(0, inner * C))
        cs, ss = h.chan_walk(e0, step, 40, inner, C)
        es = e0 + step * np.arange(40)
        np.testing.assert_array_equal(cs, (es // inner) % C)
        np.testing.assert_array_equal(ss, es % inner)


@pytest.mark.parametrize("E,inner,C", [(1, 1, 1), (7, 1, 7), (98, 49, 2), (3 * 5 * 9, 9, 5), (2 * 3 * 25, 1, 3),
                                       (1000, 1, 1000), (4 * 16 * 16, 16, 4), (12345, 1, 5), (12345, 823, 5)])
@pytest.mark.parametrize("vec", [1, 4, 8])
@pytest.mark.parametrize("nthreads", [1, 3, 256, 4096])
@pytest.mark.parametrize("unroll", [1, 2, 4])
def test_flat_loop_visits_each_element_once_with_its_channel(h, E, inner, C, vec, nthreads, unroll):
    want = (np.arange(E) // inner) % C
    visits, chan = h.flat_coverage(E, inner, C, vec, nthreads, False, unroll)
    np.testing.assert_array_equal(visits, 1)
    np.testing.assert_array_equal(chan, want)
    if inner % vec == 0:  # uniform-channel vectors (NCHW, vec | H*W): every lane takes the vector's channel
        visits, chan = h.flat_coverage(E, inner, C, vec, nthreads, True, unroll)
        np.testing.assert_array_equal(visits, 1)
        np.testing.assert_array_equal(chan, want)


@pytest.mark.parametrize("M,C,vec", [(1, 8, 8), (49, 64, 8), (97, 1000, 8), (300, 1000, 4), (33, 3, 1), (50, 5, 1),
                                     (64, 2048, 8), (1000, 24, 8), (7, 40, 1)])
@pytest.mark.parametrize("splits", [1, 2, 7, 1000])
@pytest.mark.parametrize("unroll", [1, 2, 3, 4])
def test_row_kernels_partition_rows_and_channels(h, M, C, vec, splits, unroll):
    p = h.row_plan(C, vec, splits)
    assert p["bx"] * p["by"] <= 256 and p["gx"] * p["bx"] * vec >= C and p["gy"] == splits
    visits, chan = h.rows_coverage(M, C, vec, splits, unroll)
    np.testing.assert_array_equal(visits, 1)
    np.testing.assert_array_equal(chan, np.arange(M * C) % C)


@pytest.mark.parametrize("N,HW,C,vec", [(1, 1, 3, 1), (2, 49, 4, 1), (3, 16, 5, 8), (5, 3136, 2, 8), (2, 12, 3, 4),
                                        (7, 9, 2, 1)])
@pytest.mark.parametrize("splits", [1, 2, 5, 300])
@pytest.mark.parametrize("unroll", [1, 2, 4])
def test_channel_kernels_partition_planes(h, N, HW, C, vec, splits, unroll):
    visits, chan = h.channels_coverage(N, HW, C, vec, splits, unroll)
    np.testing.assert_array_equal(visits, 1)
    np.testing.assert_array_equal(chan, (np.arange(N * C * HW) // HW) % C)


@pytest.mark.parametrize("N,HW,C,vec", [(2, 49, 3, 8), (3, 196, 2, 8), (2, 49, 5, 4), (4, 1, 3, 8), (2, 3, 7, 8),
                                        (1, 9, 1, 4), (5, 13, 3, 8), (2, 7, 4, 8)])
@pytest.mark.parametrize("splits", [1, 2, 300])
@pytest.mark.parametrize("unroll", [1, 2, 3])
def test_plane_kernels_cover_planes_with_aligned_vectors(h, N, HW, C, vec, splits, unroll):
    """The NCHW plane path (vec does not divide H*W): every element once, in its channel, read through aligned
    vectors that may reach into the neighbouring planes (those lanes are masked)."""
    visits, chan = h.channels_coverage(N, HW, C, vec, splits, unroll, True)
    np.testing.assert_array_equal(visits, 1)
    np.testing.assert_array_equal(chan, (np.arange(N * C * HW) // HW) % C)
    W = h.plane_slots(HW, vec)
    starts = np.arange(N * C) * HW  # every plane's alignment offset needs at most W vectors
    assert ((starts + HW + vec - 1) // vec - starts // vec).max() <= W


RESNET50 = [(256, 64, 56 * 56), (256, 256, 56 * 56), (256, 128, 28 * 28), (256, 512, 28 * 28),
            (256, 256, 14 * 14), (256, 1024, 14 * 14), (256, 512, 7 * 7), (256, 2048, 7 * 7), (1, 2048, 49),
            (1, 64, 49), (8, 1000, 1)]


@pytest.mark.parametrize("n,c,hw", RESNET50)
@pytest.mark.parametrize("cl", [True, False])
@pytest.mark.parametrize("elem", [2, 4])
def test_reduce_splits_fill_the_gpu_without_starving_threads(h, n, c, hw, cl, elem):
    sm = 132
    splits = h.reduce_splits(n, c, hw, cl, elem, sm)
    assert 1 <= splits <= 65535
    vec = 16 // elem
    if cl:
        v = vec if c % vec == 0 else 1
        p = h.row_plan(c, v, splits)
        blocks, per_thread = p["gx"] * splits, n * hw / (splits * p["by"])
    else:  # plane path when vec does not divide hw: plane_slots vectors per plane
        items = n * hw / vec if hw % vec == 0 else n * h.plane_slots(hw, vec)
        blocks, per_thread = c * splits, items / (splits * 256)
    if n * hw >= 100_000:  # large batches: at least a wave of blocks, and threads that each do real work
        assert blocks >= sm * 8 or per_thread < 16
        assert per_thread >= 8 or splits == 1
    assert splits == 1 or per_thread >= 4


def test_kernel_choice(h):
    assert h.choose_elementwise(True, True, 64, 49, 8) == "rows"
    assert h.choose_elementwise(True, True, 3, 49, 8) == "flat_lanes"
    assert h.choose_elementwise(False, True, 64, 16, 8) == "flat_uniform"
    assert h.choose_elementwise(False, True, 64, 49, 8) == "flat_lanes"
    assert h.choose_elementwise(True, False, 64, 49, 8) == "flat_scalar"
    assert h.choose_reduce(True, True, 1000, 1, 8) == "rows_vec"
    assert h.choose_reduce(True, True, 1000, 1, 16) == "rows_scalar"
    assert h.choose_reduce(False, True, 5, 49, 8) == "channels_planes"
    assert h.choose_reduce(False, False, 5, 49, 8) == "channels_scalar"
    assert h.choose_reduce(False, True, 5, 3136, 8) == "channels_vec"
    assert h.choose_reduce(False, False, 5, 3136, 8) == "channels_scalar"
    assert h.flat_blocks(1, 8, 132) == 1 and h.flat_blocks(10**9, 8, 132) == 132 * 8


# ------------------------------------------------------------------------------------------------ statistics
def test_welford_combine_identities_and_union(h):
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal(37) + 5, rng.standard_normal(91) * 3 - 2
    wa, wb = h.welford_sequence(a.astype(np.float32)), h.welford_sequence(b.astype(np.float32))
    assert wa[0] == 37 and wa[1] == pytest.approx(a.mean(), rel=1e-5)
    assert wa[2] == pytest.approx(((a - a.mean()) ** 2).sum(), rel=1e-4)
    both = np.concatenate([a, b])
    for w in (h.welford_combine(wa, wb), h.welford_combine(wb, wa)):
        assert w[0] == 128
        assert w[1] == pytest.approx(both.mean(), rel=1e-5)
        assert w[2] == pytest.approx(((both - both.mean()) ** 2).sum(), rel=1e-4)
    empty = (0.0, 0.0, 0.0)
    assert h.welford_combine(wa, empty) == pytest.approx(wa)
    assert h.welford_combine(empty, wb) == pytest.approx(wb)
    assert h.welford_combine(empty, empty) == (0.0, 0.0, 0.0)


def test_welford_keeps_the_variance_of_data_far_from_zero(h):
    rng = np.random.default_rng(2)
    x = (1000 + rng.standard_normal(100_000)).astype(np.float32)
    n, mean, m2 = h.welford_sequence(x)
    x64 = x.astype(np.float64)
    assert m2 / n == pytest.approx(x64.var(), rel=1e-3)
    # sanity of the test itself: the textbook one-pass formula in float32 loses the variance here
    naive = np.float32((x * x).sum(dtype=np.float32) / n) - np.float32(x.sum(dtype=np.float32) / n) ** 2
    assert abs(naive - x64.var()) > 1e-2


@pytest.mark.parametrize("case", LAYOUT_CASES, ids=str)
@pytest.mark.parametrize("offset", [0.0, 1000.0])
@pytest.mark.parametrize("sm_count", [1, 1000])
def test_batch_stats_emulation(h, case, offset, sm_count):
    n, c, hh, ww, cl, vec, aligned = case
    x = torch.randn(n, c, hh, ww) * 2 + offset
    mean, var, splits = h.stats(to_mem(x, cl), n, c, hh * ww, cl, vec, aligned, sm_count)
    x64 = x.double()
    torch.testing.assert_close(torch.from_numpy(mean).double(), x64.mean((0, 2, 3)), rtol=1e-6, atol=2e-4)
    torch.testing.assert_close(torch.from_numpy(var).double(), x64.var((0, 2, 3), unbiased=False), rtol=2e-3,
                               atol=1e-5)
    rm, rv = reference.batch_stats(x)
    torch.testing.assert_close(torch.from_numpy(var), rv, rtol=2e-3, atol=1e-5)


@pytest.mark.parametrize("cl,shape", [(True, (4, 128, 28, 28)), (False, (8, 4, 56, 56)), (False, (600, 2, 7, 7))])
def test_batch_stats_many_splits_resnet_like(h, cl, shape):
    # fp16-like vectors and a 132-SM plan: several row splits (and channel tiles) folded by the finalize pass
    n, c, hh, ww = shape
    x = torch.randn(shape) + 1000
    mean, var, splits = h.stats(to_mem(x, cl), n, c, hh * ww, cl, 8, True, 132)
    assert splits > 1
    torch.testing.assert_close(torch.from_numpy(var).double(), x.double().var((0, 2, 3), unbiased=False),
                               rtol=2e-3, atol=1e-5)


@pytest.mark.parametrize("vec", [4, 8])
def test_plane_path_keeps_a_neighbouring_channels_nonfinite_values_out(h, vec):
    """Plane-path vectors reach into the neighbouring channels' planes: their inf / NaN must not leak."""
    n, c, hh, ww = 3, 4, 7, 7
    x = torch.randn(n, c, hh, ww)
    x[:, 1] = float("inf")
    x[1, 2, 3, 3] = float("nan")
    mean, var, _ = h.stats(to_mem(x, False), n, c, hh * ww, False, vec, True, 132)
    assert h.choose_reduce(False, True, c, hh * ww, vec) == "channels_planes"
    want = x.double().var((0, 2, 3), unbiased=False)
    for i in (0, 3):
        assert var[i] == pytest.approx(float(want[i]), rel=2e-3)
    assert not np.isfinite(mean[1]) and np.isnan(var[2])
    dy = torch.randn(n, c, hh, ww)
    ones = np.ones(c, np.float32)
    sg, sgx, _, _, _ = h.backward_reduce(to_mem(dy, False), to_mem(x, False), ones, ones * 0, np.zeros(c, np.float32),
                                         None, None, None, None, None, False, False, n, c, hh * ww, False, vec, True,
                                         132)
    torch.testing.assert_close(torch.from_numpy(sg), dy.sum((0, 2, 3)), rtol=1e-4, atol=1e-4)
    want_gx = (dy.double() * x.double()).sum((0, 2, 3))
    for i in (0, 3):
        assert sgx[i] == pytest.approx(float(want_gx[i]), rel=1e-4, abs=1e-4)


# ------------------------------------------------------------------------------------------------ apply
VARIANTS = ["plain", "residual", "dual"]


def _inputs(n, c, hh, ww, variant):
    x = torch.randn(n, c, hh, ww) + 3
    mean, scale, shift = x.mean((0, 2, 3)) + torch.randn(c) * 0.1, *vecs(c, 2)
    res = torch.randn(n, c, hh, ww) if variant == "residual" else None
    xb = torch.randn(n, c, hh, ww) - 2 if variant == "dual" else None
    mean_b, scale_b, shift_b = (xb.mean((0, 2, 3)), *vecs(c, 2)) if variant == "dual" else (None, None, None)
    return x, mean, scale, shift, res, xb, mean_b, scale_b, shift_b


@pytest.mark.parametrize("case", LAYOUT_CASES, ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("relu", [False, True])
def test_apply_emulation_matches_reference(h, case, variant, relu):
    n, c, hh, ww, cl, vec, aligned = case
    x, mean, scale, shift, res, xb, mean_b, scale_b, shift_b = _inputs(n, c, hh, ww, variant)
    mem = (lambda t: None if t is None else to_mem(t, cl))
    y = h.apply(mem(x), npv(mean), npv(scale), npv(shift), mem(res), mem(xb), npv(mean_b), npv(scale_b), npv(shift_b),
                relu, n, c, hh * ww, cl, vec, aligned, 132)
    want = reference.apply(x, mean, scale, shift, res, xb, mean_b, scale_b, shift_b, relu)
    torch.testing.assert_close(from_mem(y, x.shape, cl), want, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------ backward
def _bwd_inputs(n, c, hh, ww, variant):
    x, mean, scale, shift, res, xb, mean_b, scale_b, shift_b = _inputs(n, c, hh, ww, variant)
    dy = torch.randn(n, c, hh, ww)
    return dy, x, scale, shift, mean, res, xb, scale_b, shift_b, mean_b


@pytest.mark.parametrize("case", [cs for cs in LAYOUT_CASES if cs[0] * cs[2] * cs[3] > 1], ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("relu", [False, True])
def test_backward_reduce_emulation_matches_reference(h, case, variant, relu):
    n, c, hh, ww, cl, vec, aligned = case
    dy, x, scale, shift, mean, res, xb, scale_b, shift_b, mean_b = _bwd_inputs(n, c, hh, ww, variant)
    want_res = res is not None
    mem = (lambda t: None if t is None else to_mem(t, cl))
    sg, sgx, sgxb, gres, _ = h.backward_reduce(mem(dy), mem(x), npv(scale), npv(shift), npv(mean), mem(res), mem(xb),
                                               npv(scale_b), npv(shift_b), npv(mean_b), relu, want_res, n, c, hh * ww,
                                               cl, vec, aligned, 132)
    rg, rgx, rgxb, rres = reference.backward_reduce(dy, x, mean, scale, shift, res, xb, mean_b, scale_b, shift_b,
                                                    relu, want_res)
    torch.testing.assert_close(torch.from_numpy(sg), rg, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.from_numpy(sgx), rgx, rtol=1e-4, atol=1e-4)
    if xb is not None:
        torch.testing.assert_close(torch.from_numpy(sgxb), rgxb, rtol=1e-4, atol=1e-4)
    else:
        assert sgxb is None
    if want_res:
        torch.testing.assert_close(from_mem(gres, x.shape, cl), rres, rtol=0, atol=0)
    else:
        assert gres is None


@pytest.mark.parametrize("case", LAYOUT_CASES, ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("relu", [False, True])
def test_backward_apply_emulation_matches_reference(h, case, variant, relu):
    n, c, hh, ww, cl, vec, aligned = case
    dy, x, scale, shift, mean, res, xb, scale_b, shift_b, mean_b = _bwd_inputs(n, c, hh, ww, variant)
    k_g, k_x, k_c = vecs(c, 3)
    k_g_b, k_x_b, k_c_b = vecs(c, 3) if xb is not None else (None, None, None)
    mem = (lambda t: None if t is None else to_mem(t, cl))
    dx, dxb = h.backward_apply(mem(dy), mem(x), npv(scale), npv(shift), mem(res), mem(xb), npv(scale_b),
                               npv(shift_b), relu, npv(mean), npv(k_g), npv(k_x), npv(k_c), npv(mean_b), npv(k_g_b),
                               npv(k_x_b), npv(k_c_b), n, c, hh * ww, cl, vec, aligned, 132)
    rdx, rdxb = reference.backward_apply(dy, x, mean, scale, shift, res, xb, mean_b, scale_b, shift_b, relu, k_g, k_x,
                                         k_c, k_g_b, k_x_b, k_c_b)
    torch.testing.assert_close(from_mem(dx, x.shape, cl), rdx, rtol=1e-5, atol=1e-5)
    if xb is not None:
        torch.testing.assert_close(from_mem(dxb, x.shape, cl), rdxb, rtol=1e-5, atol=1e-5)
    else:
        assert dxb is None


@pytest.mark.parametrize("cl,vec", [(True, 8), (False, 8), (True, 1)])
@pytest.mark.parametrize("training", [True, False])
def test_full_backward_matches_autograd(h, cl, vec, training):
    """Emulated reduce -> coefficient formula -> emulated apply == autograd of BN + residual + ReLU."""
    n, c, hh, ww, eps = 4, 16, 6, 6, 1e-5
    x = torch.randn(n, c, hh, ww, dtype=torch.float64) * 2 + 3
    res = torch.randn(n, c, hh, ww, dtype=torch.float64)
    weight, bias = (torch.rand(c, dtype=torch.float64) + 0.5), torch.randn(c, dtype=torch.float64)
    dy = torch.randn(n, c, hh, ww, dtype=torch.float64)
    rm, rv = torch.randn(c, dtype=torch.float64), torch.rand(c, dtype=torch.float64) + 0.5
    xr, wr, br, resr = (t.clone().requires_grad_() for t in (x, weight, bias, res))
    y = torch.relu(F.batch_norm(xr, rm.clone(), rv.clone(), wr, br, training, 0.1, eps) + resr)
    y.backward(dy)

    x32, res32, dy32 = x.float(), res.float(), dy.float()
    if training:
        var, mean = torch.var_mean(x32, dim=(0, 2, 3), unbiased=False)
    else:
        mean, var = rm.float(), rv.float()
    invstd = torch.rsqrt(var + eps)
    scale = weight.float() * invstd
    shift = bias.float()  # centred: BN(x) = (x - mean) * scale + shift
    mem = (lambda t: to_mem(t, cl))
    sg, sgx, _, gres, _ = h.backward_reduce(mem(dy32), mem(x32), npv(scale), npv(shift), npv(mean), mem(res32), None,
                                            None, None, None, True, True, n, c, hh * ww, cl, vec, True, 4)
    k = [h.bn_backward_coefficients(float(sg[i]), float(sgx[i]), float(invstd[i]), float(scale[i]),
                                    float(n * hh * ww), training) for i in range(c)]
    kk = {name: torch.tensor([ki[name] for ki in k]) for name in k[0]}
    dx, _ = h.backward_apply(mem(dy32), mem(x32), npv(scale), npv(shift), mem(res32), None, None, None, True,
                             npv(mean), npv(kk["k_g"]), npv(kk["k_x"]), npv(kk["k_c"]), None, None, None, None, n, c,
                             hh * ww, cl, vec, True, 4)
    torch.testing.assert_close(from_mem(dx, x.shape, cl).double(), xr.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(from_mem(gres, x.shape, cl).double(), resr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kk["grad_weight"].double(), wr.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(kk["grad_bias"].double(), br.grad, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ finalize
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("running", ["momentum", "cumulative", None])
@pytest.mark.parametrize("cl,vec", [(True, 8), (False, 4)])
def test_stats_finalize_matches_reference(h, affine, running, cl, vec):
    """Emulated statistics pass -> stats_params_kernel's per-channel work (scale, shift, running statistics)
    == the reference backend's bn_stats (rsqrt, lerp_ in torch)."""
    n, c, hh, ww, eps = 3, 37, 5, 4, 1e-3
    x = torch.randn(n, c, hh, ww) * 2 + 3
    w, b = (torch.rand(c) + 0.5, torch.randn(c)) if affine else (None, None)
    rm, rv = (torch.randn(c), torch.rand(c) + 0.5) if running else (None, None)
    nbt = torch.tensor(7) if running == "cumulative" else None
    momentum = 0.3 if running == "momentum" else None
    mean, var, _ = h.stats(to_mem(x, cl), n, c, hh * ww, cl, vec, True, 132)
    count = n * hh * ww
    scale, shift, new_rm, new_rv = h.stats_finalize(mean, var, npv(w), npv(b), eps, npv(rm), npv(rv),
                                                    None if nbt is None else int(nbt), momentum or 0.0,
                                                    count / (count - 1))
    ref_rm, ref_rv = (None, None) if rm is None else (rm.clone(), rv.clone())
    _, _, ref_scale, ref_shift = reference.bn_stats(x, w, b, eps, ref_rm, ref_rv, momentum, nbt)
    torch.testing.assert_close(torch.from_numpy(scale), ref_scale, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(torch.from_numpy(shift), ref_shift, rtol=0, atol=0)
    if rm is None:
        assert new_rm is None and new_rv is None
    else:
        torch.testing.assert_close(torch.from_numpy(new_rm), ref_rm, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.from_numpy(new_rv), ref_rv, rtol=1e-4, atol=1e-6)
        assert not torch.equal(ref_rm, rm)  # the update did happen


def test_running_update_is_torch_lerp(h):
    """lerp_f is torch.lerp's two-branch formula; torch contracts it into a fused multiply-add, the kernels
    (built with --fmad=false) round each step, so they agree to an ulp on both sides of w = 0.5."""
    rng = np.random.default_rng(5)
    a, b_ = rng.standard_normal(200).astype(np.float32), rng.standard_normal(200).astype(np.float32)
    for w in (0.1, 0.5, 0.9, 1.0 / 3):
        # mean = b_, var = 1, unbias = 1: running_mean and running_var both move from a towards b_ and 1
        _, _, rm, rv = h.stats_finalize(b_, np.ones(200, np.float32), None, None, 0.0, a, a.copy(), None, w, 1.0)
        ta = torch.from_numpy(a.copy())
        torch.testing.assert_close(torch.from_numpy(rm), ta.lerp(torch.from_numpy(b_), w), rtol=0, atol=2.4e-7)
        torch.testing.assert_close(torch.from_numpy(rv), ta.lerp(torch.ones(200), w), rtol=0, atol=2.4e-7)


def _reduce_sums(h, dy, x, scale, shift, mean, res, xb, scale_b, shift_b, mean_b, relu, cl, vec):
    n, c, hh, ww = x.shape
    mem = (lambda t: None if t is None else to_mem(t, cl))
    return h.backward_reduce(mem(dy), mem(x), npv(scale), npv(shift), npv(mean), mem(res), mem(xb), npv(scale_b),
                             npv(shift_b), npv(mean_b), relu, False, n, c, hh * ww, cl, vec, True, 132)


def _side_b(variant, xb, c, eps_b):
    """(mean_b, scale_b, shift_b, var_b) of a backward variant's second input: a second BatchNorm ("dual"), a
    weighted residual ("weighted": scale_b only), an affine map ("affine_xb"); all None otherwise."""
    if variant == "dual":
        var_b, mean_b = xb.var((0, 2, 3), unbiased=False), xb.mean((0, 2, 3))
        return (mean_b, *reference.bn_params(xb, mean_b, var_b, torch.rand(c) + 0.5, torch.randn(c), eps_b), var_b)
    if variant == "weighted":
        return None, torch.randn(c), None, None
    if variant == "affine_xb":
        return (xb.mean((0, 2, 3)), *vecs(c, 2), None)
    return None, None, None, None


@pytest.mark.parametrize("variant", ["bn", "bn_eval", "dual", "weighted", "affine", "affine_xb"])
@pytest.mark.parametrize("cl,vec", [(True, 8), (False, 4)])
def test_backward_finalize_matches_reference(h, variant, cl, vec):
    """Emulated reduce -> bwd_finalize_kernel's per-side work (side_grads) -> emulated apply == the reference
    backend's backward, for every side kind the ops use."""
    n, c, hh, ww, eps, eps_b = 2, 19, 4, 5, 1e-5, 1e-3
    x = torch.randn(n, c, hh, ww) + 2
    dy = torch.randn(n, c, hh, ww)
    var = x.var((0, 2, 3), unbiased=False)
    mean = x.mean((0, 2, 3))
    scale, shift = reference.bn_params(x, mean, var, torch.rand(c) + 0.5, torch.randn(c), eps)
    bn_a = variant in ("bn", "bn_eval", "dual", "weighted")
    xb = torch.randn(n, c, hh, ww) - 1 if variant in ("dual", "weighted", "affine_xb") else None
    mean_b, scale_b, shift_b, var_b = _side_b(variant, xb, c, eps_b)
    training = variant != "bn_eval"
    va = var if bn_a else None
    want = reference.backward(dy, x, mean, scale, shift, va, eps, None, xb, mean_b, scale_b, shift_b, var_b, eps_b,
                              True, training, False)
    sg, sgx, sgxb, _, _ = _reduce_sums(h, dy, x, scale, shift, mean, None, xb, scale_b, shift_b, mean_b, True, cl,
                                       vec)
    count = float(n * hh * ww)
    mode_a = 1 if bn_a else 2
    mode_b = 0 if xb is None else 1 if var_b is not None else 3 if mean_b is None else 2
    out_a = h.side_grads(mode_a, sg, sgx, npv(scale), npv(va), eps, count, training)
    grads_a = [out_a[i] for i in ((2, 3) if mode_a == 1 else (0, 1, 2))]
    for got, ref in zip(grads_a, want[3]):
        torch.testing.assert_close(torch.from_numpy(got), ref, rtol=1e-4, atol=1e-4)
    k_x, k_c = (out_a[0], out_a[1]) if mode_a == 1 else (None, None)
    k_xb = k_cb = None
    if xb is not None:
        out_b = h.side_grads(mode_b, sg, sgxb, npv(scale_b), npv(var_b), eps_b, count, training)
        grads_b = [out_b[i] for i in {1: (2, 3), 2: (0, 1, 2), 3: (1,)}[mode_b]]
        for got, ref in zip(grads_b, want[4]):
            torch.testing.assert_close(torch.from_numpy(got), ref, rtol=1e-4, atol=1e-4)
        if mode_b == 1:
            k_xb, k_cb = out_b[0], out_b[1]
    mem = (lambda t: None if t is None else to_mem(t, cl))
    dx, dxb = h.backward_apply(mem(dy), mem(x), npv(scale), npv(shift), None, mem(xb), npv(scale_b), npv(shift_b),
                               True, npv(mean), npv(scale), k_x, k_c, npv(mean_b), npv(scale_b), k_xb, k_cb, n, c,
                               hh * ww, cl, vec, True, 132)
    torch.testing.assert_close(from_mem(dx, x.shape, cl), want[0], rtol=1e-4, atol=1e-4)
    if xb is not None:
        torch.testing.assert_close(from_mem(dxb, x.shape, cl), want[1], rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ fused finalize
FUSED_CASES = [case for case in LAYOUT_CASES if case[0] * case[2] * case[3] > 1] + [
    (16, 16, 32, 32, True, 8, True),   # 16 splits > kFinalBy: every folding row adds several partials
    (8, 2, 128, 128, False, 4, True),  # ... NCHW (16 splits), one channel per block
    (16, 24, 16, 16, True, 4, True),   # bx = 6 channel vectors: blocks of 6 x 42 threads, 13 splits
]


@pytest.mark.parametrize("variant", ["bn", "bn_eval", "dual", "weighted", "affine_xb"])
@pytest.mark.parametrize("case", FUSED_CASES, ids=lambda t: "x".join(map(str, t[:4])) + f"-cl{int(t[4])}-v{t[5]}"
                         + ("" if t[6] else "-unaligned"))
def test_fused_finalize_is_bitwise_the_separate_finalize(h, case, variant):
    """backward_reduce_finalize (the last block of each grid column folds its channels, with the reduction
    kernel's own block shape) gives bit for bit the sums and outputs of the three-launch path: partials ->
    bwd_finalize_kernel (block (kFinalBx, kFinalBy)) -> side_grads."""
    n, c, hh, ww, cl, vec, aligned = case
    torch.manual_seed(n * 1000 + c)
    eps, eps_b = 1e-5, 1e-3
    x = torch.randn(n, c, hh, ww) + 1
    dy = torch.randn(n, c, hh, ww)
    dy[0, 0] = -0.0  # a channel whose partials may be -0
    mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    scale, shift = reference.bn_params(x, mean, var, torch.rand(c) + 0.5, torch.randn(c), eps)
    xb = torch.randn(n, c, hh, ww) - 1 if variant in ("dual", "weighted", "affine_xb") else None
    mean_b, scale_b, shift_b, var_b = _side_b(variant, xb, c, eps_b)
    mode_a = 2 if variant == "affine_xb" else 1
    mode_b = 0 if xb is None else 1 if var_b is not None else 3 if mean_b is None else 2
    va = var if mode_a == 1 else None
    training = variant != "bn_eval"
    mem = (lambda t: None if t is None else to_mem(t, cl))
    args = (mem(dy), mem(x), npv(scale), npv(shift), npv(mean), None, mem(xb), npv(scale_b), npv(shift_b),
            npv(mean_b), True, True, n, c, hh * ww, cl, vec, aligned, 132)
    sg, sgx, sgxb, gres, splits = h.backward_reduce(*args)
    out_a, out_b, sums, gres_f, splits_f = h.backward_reduce_finalize(
        *args, mode_a=mode_a, mode_b=mode_b, training=training, var=npv(va), eps=eps, var_b=npv(var_b), eps_b=eps_b)
    assert splits_f == splits
    np.testing.assert_array_equal(gres_f, gres)
    for got, want in zip(sums, [sg, sgx] + ([sgxb] if xb is not None else [])):
        assert got.tobytes() == want.tobytes()  # bitwise, -0 included
    count = float(n * hh * ww)
    written = {1: (0, 1, 2, 3), 2: (0, 1, 2), 3: (1,)}
    want_a = h.side_grads(mode_a, sg, sgx, npv(scale), npv(va), eps, count, training)
    for i in written[mode_a]:
        assert out_a[i].tobytes() == want_a[i].tobytes(), (variant, i)
    if xb is None:
        assert out_b is None
    else:
        want_b = h.side_grads(mode_b, sg, sgxb, npv(scale_b), npv(var_b), eps_b, count, training)
        for i in written[mode_b]:
            assert out_b[i].tobytes() == want_b[i].tobytes(), (variant, i)


@pytest.mark.parametrize("variant", ["momentum", "cumulative", "increment", "no_affine", "stats_only"])
@pytest.mark.parametrize("case", FUSED_CASES, ids=lambda t: "x".join(map(str, t[:4])) + f"-cl{int(t[4])}-v{t[5]}"
                         + ("" if t[6] else "-unaligned"))
def test_fused_stats_finalize_is_bitwise_the_separate_finalize(h, case, variant):
    """stats_reduce_finalize (the last block of each statistics grid column merges its channels' Welford
    partials, with the statistics kernel's own block shape, and finishes them) gives bit for bit the mean, var,
    scale, shift and running statistics of the two-launch path: partials -> stats_params_kernel's merge (block
    (kFinalBx, kFinalBy), emulated by `stats`) -> its per-channel finish (`stats_finalize`); num_batches_tracked
    is incremented exactly once."""
    n, c, hh, ww, cl, vec, aligned = case
    torch.manual_seed(n * 1000 + c + 7)
    eps = 1e-3
    x = torch.randn(n, c, hh, ww) * 3 + 1
    x[0, 0] = -0.0  # a channel whose partials may be -0
    w, b = (None, None) if variant in ("no_affine", "stats_only") else (torch.rand(c) + 0.5, torch.randn(c))
    running = variant != "stats_only"
    rm, rv = (torch.randn(c), torch.rand(c) + 0.5) if running else (None, None)
    nbt = 4 if variant in ("cumulative", "increment") else None
    momentum = 0.0 if variant == "cumulative" else 0.1
    count = n * hh * ww
    unbias = count / (count - 1)
    mem = to_mem(x, cl)
    mean, var, splits = h.stats(mem, n, c, hh * ww, cl, vec, aligned, 132)
    got = h.stats_reduce_finalize(mem, n, c, hh * ww, cl, vec, aligned, 132, weight=npv(w), bias=npv(b), eps=eps,
                                  running_mean=npv(rm), running_var=npv(rv), num_batches_tracked=nbt,
                                  momentum=momentum, unbias=unbias, increment=variant == "increment")
    f_mean, f_var, f_scale, f_shift, f_rm, f_rv, f_nbt, f_splits = got
    assert f_splits == splits
    assert f_mean.tobytes() == mean.tobytes() and f_var.tobytes() == var.tobytes()  # bitwise, -0 included
    factor_nbt = nbt if variant == "cumulative" else None
    scale, shift, new_rm, new_rv = h.stats_finalize(mean, var, npv(w), npv(b), eps, npv(rm), npv(rv), factor_nbt,
                                                    momentum, unbias)
    assert f_scale.tobytes() == scale.tobytes() and f_shift.tobytes() == shift.tobytes()
    if running:
        assert f_rm.tobytes() == new_rm.tobytes() and f_rv.tobytes() == new_rv.tobytes()
    else:
        assert f_rm is None and f_rv is None
    assert f_nbt == (None if nbt is None else nbt + (variant == "increment"))
    torch.testing.assert_close(torch.from_numpy(f_mean), x.mean((0, 2, 3)), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.from_numpy(f_var), x.var((0, 2, 3), unbiased=False), rtol=1e-4, atol=1e-4)


def test_fused_finalize_cases_fold_many_splits(h):
    """The fused cases above include grids whose folding rows each add several partials (splits > kFinalBy)."""
    many = [h.reduce_splits(n, c, hh * ww, cl, 16 // vec, 132) for n, c, hh, ww, cl, vec, _ in FUSED_CASES]
    assert max(many) > 8 and min(many) >= 1, many
