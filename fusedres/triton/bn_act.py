"""Triton backend for `bn_act` and `dual_bn_act`: BatchNorm statistics, BN-apply + residual add(s) + ReLU,
and the fused backward (one reduction pass + one elementwise pass).

Implements the four primitives of `fusedres.backends` (semantics: `fusedres.reference`). Activations are
dense NCHW or dense NHWC (channels_last) [N, C, H, W]; reductions tile them as [rows, channels] where a row
is one (n, h, w) position, so one kernel serves both layouts. Statistics are numerically stable: each tile's
mean and M2 are computed exactly from registers and merged with Chan's parallel formula, and per-program
partials are merged in a fixed order, so results are deterministic (no atomics). Offsets are int64 when an
element count can pass 2**31.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusedres._layout import acc_dtype, empty, empty_like, is_channels_last
from fusedres.triton import INTERPRET, device_reasons

_INTERPRET = INTERPRET  # tests patch the module-level copy
# Elements per reduction tile and per elementwise program. The interpreter's cost is per program, so it gets
# large blocks too; the op tests shrink both so tiny shapes still span many tiles and programs.
TILE_ELEMENTS = 4096
FLAT_BLOCK = 4096 if _INTERPRET else 1024
# Element counts from which offsets are computed in int64 (tests lower it to cover that path on tiny inputs).
INT64_INDEX_THRESHOLD = 2**31
_TL_ACC = {torch.float32: tl.float32, torch.float64: tl.float64}


def not_supported_reasons(x: torch.Tensor) -> list[str]:
    reasons = device_reasons(x, _INTERPRET)
    if x.dtype == torch.float64 and x.device.type == "cuda" and torch.version.hip is not None:
        reasons.append("float64 on ROCm is not supported by the Triton kernels")
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        reasons.append("x is neither dense NCHW nor dense channels_last")
    return reasons


# ------------------------------------------------------------------------------------------------ kernels
@triton.jit
def _tile(t, N, C, HW, tiles_per_n, c_offs, CL: tl.constexpr, BLOCK_R: tl.constexpr, IDX64: tl.constexpr):
    """Offsets [BLOCK_R, BLOCK_C] and mask of reduction tile t (a block of rows × a block of channels)."""
    r = tl.arange(0, BLOCK_R)
    if IDX64:
        t = tl.cast(t, tl.int64)
    if CL:
        rows = t * BLOCK_R + r
        mask_r = rows < N * HW
        offs = rows[:, None] * C + c_offs[None, :]
    else:
        n = t // tiles_per_n
        hw = (t % tiles_per_n) * BLOCK_R + r
        mask_r = hw < HW
        offs = n * C * HW + c_offs[None, :] * HW + hw[:, None]
    mask = mask_r[:, None] & (c_offs[None, :] < C)
    return offs, mask, tl.sum(mask_r.to(tl.int32), axis=0)


# Loop counts and the batch are not specialised: a partial or eval batch must not compile a new variant.
_LOOP_ARGS = ["N", "num_tiles", "tiles_per_program", "tiles_per_n"]


@triton.jit(do_not_specialize=_LOOP_ARGS)
def _stats_partial_kernel(
    x_ptr,        # [N, C, H, W] input, NCHW or NHWC dense
    cnt_ptr,      # [P, C] out: rows seen by program p (acc dtype)
    mean_ptr,     # [P, C] out: partial mean
    m2_ptr,       # [P, C] out: partial sum of squared deviations
    N, C, HW,
    num_tiles,    # reduction tiles in total
    tiles_per_program,
    tiles_per_n,  # NCHW only: tiles per image
    CL: tl.constexpr, ACC: tl.constexpr, IDX64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    p = tl.program_id(0)
    c_offs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    count = tl.zeros([BLOCK_C], dtype=ACC)
    mean = tl.zeros([BLOCK_C], dtype=ACC)
    m2 = tl.zeros([BLOCK_C], dtype=ACC)
    t_end = tl.minimum((p + 1) * tiles_per_program, num_tiles)
    for t in range(p * tiles_per_program, t_end):
        offs, mask, rows = _tile(t, N, C, HW, tiles_per_n, c_offs, CL, BLOCK_R, IDX64)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        n_t = rows.to(ACC)
        mean_t = tl.sum(x, axis=0) / n_t
        d = tl.where(mask, x - mean_t[None, :], 0.0)
        m2_t = tl.sum(d * d, axis=0)
        total = count + n_t
        delta = mean_t - mean
        mean += delta * (n_t / total)
        m2 += m2_t + delta * delta * (count * n_t / total)
        count = total
    out = p * C + c_offs
    c_mask = c_offs < C
    tl.store(cnt_ptr + out, count, mask=c_mask)
    tl.store(mean_ptr + out, mean, mask=c_mask)
    tl.store(m2_ptr + out, m2, mask=c_mask)


@triton.jit(do_not_specialize=["P"])
def _stats_finalize_kernel(
    cnt_ptr, mean_part_ptr, m2_part_ptr,   # [P, C] partials from _stats_partial_kernel
    mean_ptr, var_ptr,                     # [C] out: mean and biased variance
    P, C,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr,
):
    c_offs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offs < C
    count = tl.zeros([BLOCK_C], dtype=ACC)
    mean = tl.zeros([BLOCK_C], dtype=ACC)
    m2 = tl.zeros([BLOCK_C], dtype=ACC)
    for p in range(0, P):
        n_p = tl.load(cnt_ptr + p * C + c_offs, mask=c_mask, other=0.0)
        mean_p = tl.load(mean_part_ptr + p * C + c_offs, mask=c_mask, other=0.0)
        m2_p = tl.load(m2_part_ptr + p * C + c_offs, mask=c_mask, other=0.0)
        total = count + n_p
        frac = tl.where(total > 0, n_p / tl.where(total > 0, total, 1.0), 0.0)
        delta = mean_p - mean
        mean += delta * frac
        m2 += m2_p + delta * delta * count * frac
        count = total
    tl.store(mean_ptr + c_offs, mean, mask=c_mask)
    tl.store(var_ptr + c_offs, m2 / tl.maximum(count, 1.0), mask=c_mask)


@triton.jit
def _pre_activation(x, r, xb, c, mean_ptr, scale_ptr, shift_ptr, mean_b_ptr, scale_b_ptr, shift_b_ptr, mask,
                    RES_MODE: tl.constexpr, ACC: tl.constexpr):
    """z = (x - mean[c]) * scale[c] + shift[c] (+ r | + (xb - mean_b[c]) * scale_b[c] + shift_b[c]), in the
    accumulation dtype; centring first keeps precision when |mean| >> std."""
    z = (x.to(ACC) - tl.load(mean_ptr + c, mask=mask, other=0.0)) * tl.load(scale_ptr + c, mask=mask, other=0.0) \
        + tl.load(shift_ptr + c, mask=mask, other=0.0)
    if RES_MODE == 1:
        z += r.to(ACC)
    if RES_MODE == 2:
        z += (xb.to(ACC) - tl.load(mean_b_ptr + c, mask=mask, other=0.0)) \
            * tl.load(scale_b_ptr + c, mask=mask, other=0.0) + tl.load(shift_b_ptr + c, mask=mask, other=0.0)
    return z


@triton.jit
def _flat(numel, C, INNER, CL: tl.constexpr, IDX64: tl.constexpr, BLOCK: tl.constexpr):
    """Flat element offsets of this program, their mask and their channel index."""
    pid = tl.program_id(0)
    if IDX64:
        pid = pid.to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    if CL:
        c = offs % C
    else:
        c = (offs // INNER) % C
    return offs, mask, c


@triton.jit
def _apply_kernel(
    x_ptr,                    # [N, C, H, W] input
    r_ptr,                    # [N, C, H, W] residual added after BN (RES_MODE 1)
    xb_ptr,                   # [N, C, H, W] second BN's input (RES_MODE 2)
    y_ptr,                    # [N, C, H, W] out, x's dtype
    mean_ptr, scale_ptr, shift_ptr,        # [C] BN(x) = (x - mean) * scale + shift
    mean_b_ptr, scale_b_ptr, shift_b_ptr,  # [C] the second BN's (RES_MODE 2)
    numel, C, INNER,          # INNER = H*W for NCHW (unused for NHWC)
    CL: tl.constexpr, RES_MODE: tl.constexpr, RELU: tl.constexpr, ACC: tl.constexpr, IDX64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs, mask, c = _flat(numel, C, INNER, CL, IDX64, BLOCK)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    r = tl.load(r_ptr + offs, mask=mask & (RES_MODE == 1), other=0.0)
    xb = tl.load(xb_ptr + offs, mask=mask & (RES_MODE == 2), other=0.0)
    z = _pre_activation(x, r, xb, c, mean_ptr, scale_ptr, shift_ptr, mean_b_ptr, scale_b_ptr, shift_b_ptr, mask,
                        RES_MODE, ACC)
    if RELU:
        z = tl.where(z < 0, 0.0, z)  # lets NaN through, like torch.relu (tl.maximum would turn NaN into 0)
    tl.store(y_ptr + offs, z.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=_LOOP_ARGS)
def _bwd_reduce_kernel(
    dy_ptr, x_ptr, r_ptr, xb_ptr,   # [N, C, H, W] grad of y, x, residual (RES_MODE 1), xb (RES_MODE 2)
    dres_ptr,                       # [N, C, H, W] out (WRITE_DRES): grad of the residual = masked dy
    mean_ptr, scale_ptr, shift_ptr, mean_b_ptr, scale_b_ptr, shift_b_ptr,  # [C] both BNs (mask recompute)
    sum_g_ptr, sum_gx_ptr, sum_gxb_ptr,  # [P, C] out: partial sum(g), sum(g*(x-mean)), sum(g*(xb-mean_b))
    N, C, HW, num_tiles, tiles_per_program, tiles_per_n,
    CL: tl.constexpr, RES_MODE: tl.constexpr, RELU: tl.constexpr, WRITE_DRES: tl.constexpr,
    ACC: tl.constexpr, IDX64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    p = tl.program_id(0)
    c_offs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offs < C
    mean = tl.load(mean_ptr + c_offs, mask=c_mask, other=0.0)
    mean_b = tl.load(mean_b_ptr + c_offs, mask=c_mask & (RES_MODE == 2), other=0.0)
    sum_g = tl.zeros([BLOCK_C], dtype=ACC)
    sum_gx = tl.zeros([BLOCK_C], dtype=ACC)
    sum_gxb = tl.zeros([BLOCK_C], dtype=ACC)
    t_end = tl.minimum((p + 1) * tiles_per_program, num_tiles)
    for t in range(p * tiles_per_program, t_end):
        offs, mask, rows = _tile(t, N, C, HW, tiles_per_n, c_offs, CL, BLOCK_R, IDX64)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
        xb = tl.load(xb_ptr + offs, mask=mask & (RES_MODE == 2), other=0.0)
        if RELU:
            r = tl.load(r_ptr + offs, mask=mask & (RES_MODE == 1), other=0.0)
            z = _pre_activation(x, r, xb, c_offs[None, :], mean_ptr, scale_ptr, shift_ptr, mean_b_ptr, scale_b_ptr,
                                shift_b_ptr, mask, RES_MODE, ACC)
            g = tl.where(z <= 0, 0.0, g)  # torch.relu's backward: NaN z passes the gradient
        if WRITE_DRES:
            tl.store(dres_ptr + offs, g.to(dres_ptr.dtype.element_ty), mask=mask)
        sum_g += tl.sum(g, axis=0)
        sum_gx += tl.sum(tl.where(mask, g * (x.to(ACC) - mean[None, :]), 0.0), axis=0)
        if RES_MODE == 2:
            sum_gxb += tl.sum(tl.where(mask, g * (xb.to(ACC) - mean_b[None, :]), 0.0), axis=0)
    out = p * C + c_offs
    tl.store(sum_g_ptr + out, sum_g, mask=c_mask)
    tl.store(sum_gx_ptr + out, sum_gx, mask=c_mask)
    if RES_MODE == 2:
        tl.store(sum_gxb_ptr + out, sum_gxb, mask=c_mask)


@triton.jit
def _centred_term(x, mean, kx, ACC: tl.constexpr):
    """kx * (x - mean), exactly 0 where kx == 0 (eval mode): an inf or NaN x must not give 0 * inf = NaN where
    stock's eval-mode gradient has no such term."""
    return tl.where(kx == 0.0, 0.0, (x.to(ACC) - mean) * kx)


@triton.jit
def _bwd_apply_kernel(
    dy_ptr, x_ptr, r_ptr, xb_ptr,   # [N, C, H, W] grad of y, x, residual (RES_MODE 1), xb (RES_MODE 2)
    dx_ptr, dxb_ptr,                # [N, C, H, W] out: grad of x, grad of xb (RES_MODE 2)
    mean_ptr, scale_ptr, shift_ptr, mean_b_ptr, scale_b_ptr, shift_b_ptr,  # [C] both BNs (mask recompute)
    kg_ptr, kx_ptr, kc_ptr,         # [C] dx = kg * g + kx * (x - mean) + kc
    kgb_ptr, kxb_ptr, kcb_ptr,      # [C] the same for xb
    numel, C, INNER,
    CL: tl.constexpr, RES_MODE: tl.constexpr, RELU: tl.constexpr, ACC: tl.constexpr, IDX64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs, mask, c = _flat(numel, C, INNER, CL, IDX64, BLOCK)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
    xb = tl.load(xb_ptr + offs, mask=mask & (RES_MODE == 2), other=0.0)
    if RELU:
        r = tl.load(r_ptr + offs, mask=mask & (RES_MODE == 1), other=0.0)
        z = _pre_activation(x, r, xb, c, mean_ptr, scale_ptr, shift_ptr, mean_b_ptr, scale_b_ptr, shift_b_ptr,
                            mask, RES_MODE, ACC)
        g = tl.where(z <= 0, 0.0, g)
    dx = g * tl.load(kg_ptr + c, mask=mask, other=0.0) \
        + _centred_term(x, tl.load(mean_ptr + c, mask=mask, other=0.0), tl.load(kx_ptr + c, mask=mask, other=0.0),
                        ACC) \
        + tl.load(kc_ptr + c, mask=mask, other=0.0)
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if RES_MODE == 2:
        dxb = g * tl.load(kgb_ptr + c, mask=mask, other=0.0) \
            + _centred_term(xb, tl.load(mean_b_ptr + c, mask=mask, other=0.0),
                            tl.load(kxb_ptr + c, mask=mask, other=0.0), ACC) \
            + tl.load(kcb_ptr + c, mask=mask, other=0.0)
        tl.store(dxb_ptr + offs, dxb.to(dxb_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------- launchers
class _Geometry:
    """How a [N, C, H, W] tensor is tiled: layout, reduction tiles, programs per channel block."""

    def __init__(self, x: torch.Tensor):
        self.N, self.C, H, W = x.shape
        self.HW = H * W
        self.numel = x.numel()
        self.cl = is_channels_last(x)
        self.idx64 = self.numel + x.shape[1] * TILE_ELEMENTS >= INT64_INDEX_THRESHOLD
        self.acc = acc_dtype(x.dtype)
        self.tl_acc = _TL_ACC[self.acc]
        self.block_c = min(triton.next_power_of_2(self.C), 64)
        rows = self.N * self.HW if self.cl else self.HW
        self.block_r = max(1, min(triton.next_power_of_2(rows), TILE_ELEMENTS // self.block_c))
        if self.cl:
            self.tiles_per_n = 1
            self.num_tiles = triton.cdiv(self.N * self.HW, self.block_r)
        else:
            self.tiles_per_n = triton.cdiv(self.HW, self.block_r)
            self.num_tiles = self.N * self.tiles_per_n
        c_blocks = triton.cdiv(self.C, self.block_c)
        target = 4 if x.device.type == "cpu" else 4 * _sm_count(x.device)
        programs = max(1, min(self.num_tiles, triton.cdiv(target, c_blocks)))
        self.tiles_per_program = max(1, triton.cdiv(self.num_tiles, programs))  # an empty x has no tiles
        self.programs = triton.cdiv(self.num_tiles, self.tiles_per_program)
        self.reduce_grid = (self.programs, c_blocks)
        self.flat_grid = (triton.cdiv(self.numel, FLAT_BLOCK),)
        self.inner = 1 if self.cl else self.HW

    def tile_args(self):
        return (self.N, self.C, self.HW, self.num_tiles, self.tiles_per_program, self.tiles_per_n)


_SM_COUNT: dict = {}


def _sm_count(device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def reduce_warps(res_mode: int) -> int:
    """Warps of the backward reduction: its dual-BN variant (dy, x and xb tiles of 4096 elements) spills with
    4 warps in float32 and fits with 8; the others fit in 4 (docs/kernels.md)."""
    return 8 if res_mode == 2 else 4


def _res_mode(residual, xb) -> int:
    return 1 if residual is not None else 2 if xb is not None else 0


def batch_stats(x: torch.Tensor):
    """Per-channel mean and biased variance of x, in the accumulation dtype."""
    geo = _Geometry(x)
    parts = [empty((geo.programs, geo.C), dtype=geo.acc, device=x.device) for _ in range(3)]
    mean = empty((geo.C,), dtype=geo.acc, device=x.device)
    var = empty((geo.C,), dtype=geo.acc, device=x.device)
    _stats_partial_kernel[geo.reduce_grid](x, *parts, *geo.tile_args(), CL=geo.cl, ACC=geo.tl_acc,
                                           IDX64=geo.idx64, BLOCK_R=geo.block_r, BLOCK_C=geo.block_c)
    _stats_finalize_kernel[(triton.cdiv(geo.C, geo.block_c),)](*parts, mean, var, geo.programs, geo.C,
                                                               ACC=geo.tl_acc, BLOCK_C=geo.block_c)
    return mean, var


def _second(xb, mean, scale, shift, mean_b, scale_b, shift_b):
    """The second-BN vectors, or stand-ins the kernels never read when there is no second BN."""
    return (mean_b, scale_b, shift_b) if xb is not None else (mean, scale, shift)


def apply(x, mean, scale, shift, residual, xb, mean_b, scale_b, shift_b, relu):
    """y = act((x - mean) * scale + shift [+ residual | + (xb - mean_b) * scale_b + shift_b]) in x's dtype and
    layout."""
    y = empty_like(x)
    if x.numel() == 0:
        return y
    geo = _Geometry(x)
    _apply_kernel[geo.flat_grid](
        x, residual if residual is not None else x, xb if xb is not None else x, y,
        mean, scale, shift, *_second(xb, mean, scale, shift, mean_b, scale_b, shift_b),
        geo.numel, geo.C, geo.inner, CL=geo.cl, RES_MODE=_res_mode(residual, xb), RELU=relu, ACC=geo.tl_acc,
        IDX64=geo.idx64, BLOCK=FLAT_BLOCK)
    return y


def backward_reduce(dy, x, mean, scale, shift, residual, xb, mean_b, scale_b, shift_b, relu, want_grad_residual):
    """Per-channel sum(g), sum(g * (x - mean)) [, sum(g * (xb - mean_b))] with g = dy * relu'(z); and
    grad_residual = g when asked (written in the same pass)."""
    geo = _Geometry(x)
    n_sums = 3 if xb is not None else 2
    parts = [empty((geo.programs, geo.C), dtype=geo.acc, device=x.device) for _ in range(n_sums)]
    d_res = empty_like(x) if want_grad_residual else None  # the residual has x's shape, dtype and layout
    _bwd_reduce_kernel[geo.reduce_grid](
        dy, x, residual if residual is not None else x, xb if xb is not None else x,
        d_res if d_res is not None else dy,
        mean, scale, shift, *_second(xb, mean, scale, shift, mean_b, scale_b, shift_b),
        parts[0], parts[1], parts[n_sums - 1],
        *geo.tile_args(), CL=geo.cl, RES_MODE=_res_mode(residual, xb), RELU=relu, WRITE_DRES=d_res is not None,
        ACC=geo.tl_acc, IDX64=geo.idx64, BLOCK_R=geo.block_r, BLOCK_C=geo.block_c,
        num_warps=reduce_warps(_res_mode(residual, xb)))
    sums = [part.sum(0) for part in parts]
    return sums[0], sums[1], sums[2] if xb is not None else None, d_res


def backward_apply(dy, x, mean, scale, shift, residual, xb, mean_b, scale_b, shift_b, relu,
                   k_g, k_x, k_c, k_g_b, k_x_b, k_c_b):
    """dx = k_g * g + k_x * (x - mean) + k_c per channel (and dxb with the xb coefficients)."""
    dx = empty_like(x)
    dxb = empty_like(xb) if xb is not None else None
    if x.numel() == 0:
        return dx, dxb
    geo = _Geometry(x)
    second = _second(xb, mean, scale, shift, mean_b, scale_b, shift_b)
    k_b = (k_g_b, k_x_b, k_c_b) if xb is not None else (k_g, k_x, k_c)
    _bwd_apply_kernel[geo.flat_grid](
        dy, x, residual if residual is not None else x, xb if xb is not None else x,
        dx, dxb if dxb is not None else dx, mean, scale, shift, *second, k_g, k_x, k_c, *k_b,
        geo.numel, geo.C, geo.inner, CL=geo.cl, RES_MODE=_res_mode(residual, xb), RELU=relu, ACC=geo.tl_acc,
        IDX64=geo.idx64, BLOCK=FLAT_BLOCK)
    return dx, dxb


# ------------------------------------------------------------------------------------------------ traffic
# What one launch of each kernel reads and writes, from its arguments by parameter name: (reads, writes), each
# tensor once (fusedres.bench.traffic counts the bytes; tests/test_count.py checks them against the addresses the
# interpreter touches, so a kernel whose loads change fails there until this table follows).
def _second_bn(a):
    return [a["xb_ptr"], a["mean_b_ptr"], a["scale_b_ptr"], a["shift_b_ptr"]]


def _pre_activation_reads(a):
    """What _pre_activation loads besides x: the C vectors, and r or the second BN."""
    mode = a["RES_MODE"]
    return [a["mean_ptr"], a["scale_ptr"], a["shift_ptr"]] + ([a["r_ptr"]] if mode == 1 else []) \
        + (_second_bn(a) if mode == 2 else [])


def _apply_traffic(a):
    return [a["x_ptr"]] + _pre_activation_reads(a), [a["y_ptr"]]


def _bwd_reduce_traffic(a):
    mode = a["RES_MODE"]
    reads = [a["dy_ptr"], a["x_ptr"], a["mean_ptr"]] + ([a["xb_ptr"], a["mean_b_ptr"]] if mode == 2 else [])
    if a["RELU"]:
        reads += _pre_activation_reads(a)
    writes = [a["sum_g_ptr"], a["sum_gx_ptr"]] + ([a["sum_gxb_ptr"]] if mode == 2 else []) \
        + ([a["dres_ptr"]] if a["WRITE_DRES"] else [])
    return reads, writes


def _bwd_apply_traffic(a):
    mode = a["RES_MODE"]
    reads = [a["dy_ptr"], a["x_ptr"], a["mean_ptr"], a["kg_ptr"], a["kx_ptr"], a["kc_ptr"]]
    if mode == 2:
        reads += [a["xb_ptr"], a["mean_b_ptr"], a["kgb_ptr"], a["kxb_ptr"], a["kcb_ptr"]]
    if a["RELU"]:
        reads += _pre_activation_reads(a)
    return reads, [a["dx_ptr"]] + ([a["dxb_ptr"]] if mode == 2 else [])


TRAFFIC = {
    "_stats_partial_kernel": lambda a: ([a["x_ptr"]], [a["cnt_ptr"], a["mean_ptr"], a["m2_ptr"]]),
    "_stats_finalize_kernel": lambda a: ([a["cnt_ptr"], a["mean_part_ptr"], a["m2_part_ptr"]],
                                         [a["mean_ptr"], a["var_ptr"]]),
    "_apply_kernel": _apply_traffic,
    "_bwd_reduce_kernel": _bwd_reduce_traffic,
    "_bwd_apply_kernel": _bwd_apply_traffic,
}
