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

import struct

import torch
import triton
import triton.language as tl

from fusedres._counters import counters
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
    # the last program of each channel block (a ticket from sem_ptr) also does _stats_finalize_kernel's work for
    # its channels (from the partials; its arguments of the same names), so BatchNorm's statistics are one launch
    sem_ptr, out_mean_ptr, out_var_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, rm_ptr, rv_ptr, nbt_ptr, eps,
    mom_hi, mom_lo, unb_hi, unb_lo,
    CL: tl.constexpr, ACC: tl.constexpr, IDX64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    PARAMS: tl.constexpr = False, HAS_W: tl.constexpr = False,
    HAS_B: tl.constexpr = False, RUNNING: tl.constexpr = 0, COUNT: tl.constexpr = False,
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
    if _last_program(sem_ptr):
        _stats_finalize_block(cnt_ptr, mean_ptr, m2_ptr, out_mean_ptr, out_var_ptr, w_ptr, b_ptr, scale_ptr,
                              shift_ptr, rm_ptr, rv_ptr, nbt_ptr, tl.num_programs(0), C, eps, mom_hi, mom_lo,
                              unb_hi, unb_lo, c_offs, c_mask, tl.program_id(1) == 0, True, PARAMS, HAS_W, HAS_B,
                              RUNNING, ACC, BLOCK_C, False, COUNT)
        _release(sem_ptr)


@triton.jit
def _welford_merge(cnt_ptr, mean_part_ptr, m2_part_ptr, P, C, c_offs, c_mask, ACC: tl.constexpr,
                   BLOCK_C: tl.constexpr):
    """(mean, biased var) of channels c_offs from the [P, C] partials, merged in program order (Chan); read
    from L2 (other programs of a fused launch wrote them)."""
    count = tl.zeros([BLOCK_C], dtype=ACC)
    mean = tl.zeros([BLOCK_C], dtype=ACC)
    m2 = tl.zeros([BLOCK_C], dtype=ACC)
    for p in range(0, P):
        n_p = tl.load(cnt_ptr + p * C + c_offs, mask=c_mask, other=0.0, cache_modifier=".cg")
        mean_p = tl.load(mean_part_ptr + p * C + c_offs, mask=c_mask, other=0.0, cache_modifier=".cg")
        m2_p = tl.load(m2_part_ptr + p * C + c_offs, mask=c_mask, other=0.0, cache_modifier=".cg")
        total = count + n_p
        frac = tl.where(total > 0, n_p / tl.where(total > 0, total, 1.0), 0.0)
        delta = mean_p - mean
        mean += delta * frac
        m2 += m2_p + delta * delta * count * frac
        count = total
    return mean, m2 / tl.maximum(count, 1.0)


@triton.jit
def _invstd(var, eps, ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    """1 / sqrt(var + eps) with IEEE (round-to-nearest) square root and division, as the CUDA kernels."""
    if ACC == tl.float64:
        invstd = 1.0 / tl.sqrt(var + eps)
    else:
        invstd = tl.div_rn(tl.full([BLOCK_C], 1.0, ACC), tl.sqrt_rn(var + eps))
    return invstd


@triton.jit
def _scalar(hi, lo, ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    """A host float passed as float32 hi + lo (Triton passes float arguments as float32): exact enough for a
    float64 accumulation, hi itself for float32."""
    return tl.full([BLOCK_C], hi, ACC) + tl.full([BLOCK_C], lo, ACC)


@triton.jit
def _lerp(a, b, w):
    """torch.lerp's formula: a + w * (b - a) for w < 0.5, else b - (b - a) * (1 - w)."""
    return tl.where(w < 0.5, a + w * (b - a), b - (b - a) * (1.0 - w))


@triton.jit
def _stats_finalize_kernel(
    mean_ptr, var_ptr,                     # [C] mean and biased variance (out when finalizing partials)
    w_ptr, b_ptr,                          # [C] BN weight and bias (HAS_W / HAS_B; else 1 and 0)
    scale_ptr, shift_ptr,                  # [C] out (PARAMS): BN(x) = (x - mean) * scale + shift
    rm_ptr, rv_ptr,                        # [C] running mean / var, updated in place (RUNNING > 0)
    nbt_ptr,                               # [] int64 num_batches_tracked (RUNNING == 2: factor 1 / nbt)
    C, eps,
    mom_hi, mom_lo, unb_hi, unb_lo,        # momentum and unbias = count / (count - 1) as float32 hi + lo pairs
    PARAMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    RUNNING: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, CENTRED: tl.constexpr = False,
    COUNT: tl.constexpr = False,
):
    """The per-channel work of a BatchNorm on given statistics (eval's (scale, shift), a conv prologue's, conv
    mode's running statistics); the statistics pass runs the same work on its partials: form
    (scale, shift) and update the running statistics with `momentum` (RUNNING 1) or the cumulative
    factor 1 / num_batches_tracked read on the device (RUNNING 2, momentum=None: no host sync). CENTRED: shift
    is stored as shift - mean * scale, so BN(x) = x * scale + shift (a conv prologue's form). COUNT (never with
    RUNNING 2, whose factor reads it): program 0 adds one to num_batches_tracked, nn.BatchNorm2d's bookkeeping
    without a launch of its own."""
    c_offs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    _stats_finalize_block(mean_ptr, mean_ptr, mean_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr,
                          rm_ptr, rv_ptr, nbt_ptr, 0, C, eps, mom_hi, mom_lo, unb_hi, unb_lo, c_offs, c_offs < C,
                          tl.program_id(0) == 0, False, PARAMS, HAS_W, HAS_B, RUNNING, ACC, BLOCK_C, CENTRED, COUNT)


@triton.jit
def _stats_finalize_block(cnt_ptr, mean_part_ptr, m2_part_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr,
                          rm_ptr, rv_ptr, nbt_ptr, P, C, eps, mom_hi, mom_lo, unb_hi, unb_lo, c_offs, c_mask, first,
                          FROM_PARTIALS: tl.constexpr, PARAMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                          RUNNING: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, CENTRED: tl.constexpr,
                          COUNT: tl.constexpr):
    """_stats_finalize_kernel's work for channels c_offs (`first`: the block that also counts the batch), run by
    that kernel or by the last program of a channel block of _stats_partial_kernel."""
    if FROM_PARTIALS:
        mean, var = _welford_merge(cnt_ptr, mean_part_ptr, m2_part_ptr, P, C, c_offs, c_mask, ACC, BLOCK_C)
        tl.store(mean_ptr + c_offs, mean, mask=c_mask)
        tl.store(var_ptr + c_offs, var, mask=c_mask)
    else:
        mean = tl.load(mean_ptr + c_offs, mask=c_mask, other=0.0).to(ACC)
        var = tl.load(var_ptr + c_offs, mask=c_mask, other=1.0).to(ACC)
    if PARAMS:
        invstd = _invstd(var, eps, ACC, BLOCK_C)
        scale = invstd
        if HAS_W:
            scale = tl.load(w_ptr + c_offs, mask=c_mask, other=0.0).to(ACC) * invstd
        shift = tl.zeros([BLOCK_C], dtype=ACC)
        if HAS_B:
            shift = tl.load(b_ptr + c_offs, mask=c_mask, other=0.0).to(ACC)
        if CENTRED:
            shift = shift - mean * scale
        tl.store(scale_ptr + c_offs, scale, mask=c_mask)
        tl.store(shift_ptr + c_offs, shift, mask=c_mask)
    if RUNNING > 0:
        if RUNNING == 2:
            f = tl.full([BLOCK_C], 1.0, ACC) / tl.full([BLOCK_C], tl.load(nbt_ptr), ACC)
        else:
            f = _scalar(mom_hi, mom_lo, ACC, BLOCK_C)
        unbias = _scalar(unb_hi, unb_lo, ACC, BLOCK_C)
        rm = tl.load(rm_ptr + c_offs, mask=c_mask, other=0.0)
        rv = tl.load(rv_ptr + c_offs, mask=c_mask, other=0.0)
        rm_t = rm.dtype
        new_m = _lerp(rm.to(ACC), mean.to(rm_t).to(ACC), f)
        new_v = _lerp(rv.to(ACC), (var * unbias).to(rv.dtype).to(ACC), f)
        tl.store(rm_ptr + c_offs, new_m.to(rm_t), mask=c_mask)
        tl.store(rv_ptr + c_offs, new_v.to(rv.dtype), mask=c_mask)
    if COUNT:
        if first:
            tl.store(nbt_ptr, tl.load(nbt_ptr) + 1)


@triton.jit
def _pre_activation(x, r, xb, c, mean_ptr, scale_ptr, shift_ptr, mean_b_ptr, scale_b_ptr, shift_b_ptr, mask,
                    RES_MODE: tl.constexpr, ACC: tl.constexpr):
    """z = (x - mean[c]) * scale[c] + shift[c] (+ r | + (xb - mean_b[c]) * scale_b[c] + shift_b[c] | + xb *
    scale_b[c]), in the accumulation dtype; centring first keeps precision when |mean| >> std. RES_MODE 3 is
    the weighted residual (mean_b = shift_b = 0, never read)."""
    z = (x.to(ACC) - tl.load(mean_ptr + c, mask=mask, other=0.0)) * tl.load(scale_ptr + c, mask=mask, other=0.0) \
        + tl.load(shift_ptr + c, mask=mask, other=0.0)
    if RES_MODE == 1:
        z += r.to(ACC)
    if RES_MODE == 2:
        z += (xb.to(ACC) - tl.load(mean_b_ptr + c, mask=mask, other=0.0)) \
            * tl.load(scale_b_ptr + c, mask=mask, other=0.0) + tl.load(shift_b_ptr + c, mask=mask, other=0.0)
    if RES_MODE == 3:
        z += xb.to(ACC) * tl.load(scale_b_ptr + c, mask=mask, other=0.0)
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
    xb = tl.load(xb_ptr + offs, mask=mask & (RES_MODE >= 2), other=0.0)
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
    # FINALIZE: the last program of each channel block (a ticket from sem_ptr) also finalizes its channels
    # (_bwd_finalize_block), so the backward is two launches
    sem_ptr, var_ptr, var_b_ptr, a0_ptr, a1_ptr, a2_ptr, a3_ptr, b0_ptr, b1_ptr, b2_ptr, b3_ptr, eps, eps_b, count,
    CL: tl.constexpr, RES_MODE: tl.constexpr, RELU: tl.constexpr, WRITE_DRES: tl.constexpr,
    ACC: tl.constexpr, IDX64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    FINALIZE: tl.constexpr = False, MODE_A: tl.constexpr = 1, MODE_B: tl.constexpr = 0,
    TRAINING: tl.constexpr = True,
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
        xb = tl.load(xb_ptr + offs, mask=mask & (RES_MODE >= 2), other=0.0)
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
        if RES_MODE == 3:
            sum_gxb += tl.sum(tl.where(mask, g * xb.to(ACC), 0.0), axis=0)
    out = p * C + c_offs
    tl.store(sum_g_ptr + out, sum_g, mask=c_mask)
    tl.store(sum_gx_ptr + out, sum_gx, mask=c_mask)
    if RES_MODE >= 2:
        tl.store(sum_gxb_ptr + out, sum_gxb, mask=c_mask)
    if FINALIZE:
        if _last_program(sem_ptr):
            _bwd_finalize_block(sum_g_ptr, sum_gx_ptr, sum_gxb_ptr, scale_ptr, var_ptr, scale_b_ptr, var_b_ptr,
                                a0_ptr, a1_ptr, a2_ptr, a3_ptr, b0_ptr, b1_ptr, b2_ptr, b3_ptr,
                                tl.num_programs(0), C, eps, eps_b, count, c_offs, c_mask, MODE_A, MODE_B, TRAINING,
                                ACC, BLOCK_C)
            _release(sem_ptr)


@triton.jit
def _last_program(sem_ptr, BLOCK_AXIS: tl.constexpr = 1):
    """Whether this program is the last of its channel block (program index on BLOCK_AXIS; the partials run
    along the other axis) to finish writing its partials: all threads' stores are ordered before the ticket
    (barrier, then an acq_rel atomic at GPU scope, as Inductor's cooperative reductions do), and the winner's
    later loads see every program's partials. The winner zeroes the counter again (`_release`)."""
    tl.debug_barrier()
    ticket = tl.atomic_add(sem_ptr + tl.program_id(BLOCK_AXIS), 1, sem="acq_rel", scope="gpu")
    return ticket == tl.num_programs(1 - BLOCK_AXIS) - 1


@triton.jit
def _release(sem_ptr, BLOCK_AXIS: tl.constexpr = 1):
    tl.atomic_xchg(sem_ptr + tl.program_id(BLOCK_AXIS), 0)  # zero again for the next launch


@triton.jit
def _centred_term(x, mean, kx, ACC: tl.constexpr):
    """kx * (x - mean), exactly 0 where kx == 0 (eval mode): an inf or NaN x must not give 0 * inf = NaN where
    stock's eval-mode gradient has no such term."""
    return tl.where(kx == 0.0, 0.0, (x.to(ACC) - mean) * kx)


@triton.jit
def _bwd_finalize_block(sum_g_ptr, sum_gx_ptr, sum_gxb_ptr, scale_ptr, var_ptr, scale_b_ptr, var_b_ptr,
                        a0_ptr, a1_ptr, a2_ptr, a3_ptr, b0_ptr, b1_ptr, b2_ptr, b3_ptr, P, C, eps, eps_b, count,
                        c_offs, c_mask, MODE_A: tl.constexpr, MODE_B: tl.constexpr, TRAINING: tl.constexpr,
                        ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    """Channels c_offs, by the last program of their block in _bwd_reduce_kernel: merge the backward partials in
    program order (read from L2: other programs wrote them) and turn them into what the apply pass and autograd
    need: for a BatchNorm side dx = scale * g + k_x * (x - mean) + k_c with k_x, k_c from the sums (0 in eval) and
    the weight / bias gradients; for an affine side (scale_shift_act) the mean / scale / shift gradients."""
    # sum_g / sum_gx / sum_gxb: [P, C] partials; scale, var (scale_b, var_b): side a (b); a0..a3 / b0..b3 [C] out:
    # MODE 1 (BN): k_x, k_c, grad_weight, grad_bias; MODE 2 (affine): grad_mean, grad_scale, grad_shift; MODE 3:
    # grad_scale
    sg = tl.zeros([BLOCK_C], dtype=ACC)
    sgx = tl.zeros([BLOCK_C], dtype=ACC)
    sgxb = tl.zeros([BLOCK_C], dtype=ACC)
    for p in range(0, P):
        sg += tl.load(sum_g_ptr + p * C + c_offs, mask=c_mask, other=0.0, cache_modifier=".cg")
        sgx += tl.load(sum_gx_ptr + p * C + c_offs, mask=c_mask, other=0.0, cache_modifier=".cg")
        if MODE_B > 0:
            sgxb += tl.load(sum_gxb_ptr + p * C + c_offs, mask=c_mask, other=0.0, cache_modifier=".cg")
    _side_grads(sg, sgx, scale_ptr, var_ptr, eps, count, a0_ptr, a1_ptr, a2_ptr, a3_ptr, c_offs, c_mask, MODE_A,
                TRAINING, ACC, BLOCK_C)
    _side_grads(sg, sgxb, scale_b_ptr, var_b_ptr, eps_b, count, b0_ptr, b1_ptr, b2_ptr, b3_ptr, c_offs, c_mask,
                MODE_B, TRAINING, ACC, BLOCK_C)


@triton.jit
def _side_grads(sg, sgx, scale_ptr, var_ptr, eps, count, o0, o1, o2, o3, c_offs, c_mask, MODE: tl.constexpr,
                TRAINING: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    """One side's outputs of _bwd_finalize_block (fusedres.ops._common.grad_coefficients' formulas)."""
    if MODE == 1:
        scale = tl.load(scale_ptr + c_offs, mask=c_mask, other=0.0)
        var = tl.load(var_ptr + c_offs, mask=c_mask, other=1.0)
        invstd = _invstd(var, eps, ACC, BLOCK_C)
        if TRAINING:
            tl.store(o0 + c_offs, -scale * invstd * invstd * sgx / count, mask=c_mask)
            tl.store(o1 + c_offs, -scale * sg / count, mask=c_mask)
        else:
            tl.store(o0 + c_offs, tl.zeros([BLOCK_C], dtype=ACC), mask=c_mask)
            tl.store(o1 + c_offs, tl.zeros([BLOCK_C], dtype=ACC), mask=c_mask)
        tl.store(o2 + c_offs, sgx * invstd, mask=c_mask)
        tl.store(o3 + c_offs, sg, mask=c_mask)
    if MODE == 2:
        scale = tl.load(scale_ptr + c_offs, mask=c_mask, other=0.0)
        tl.store(o0 + c_offs, -scale * sg, mask=c_mask)
        tl.store(o1 + c_offs, sgx, mask=c_mask)
        tl.store(o2 + c_offs, sg, mask=c_mask)
    if MODE == 3:
        tl.store(o1 + c_offs, sgx, mask=c_mask)


@triton.jit
def _bwd_apply_kernel(
    dy_ptr, x_ptr, r_ptr, xb_ptr,   # [N, C, H, W] grad of y, x, residual (RES_MODE 1), xb (RES_MODE 2, 3)
    dx_ptr, dxb_ptr,                # [N, C, H, W] out: grad of x, grad of xb (RES_MODE 2, 3)
    mean_ptr, scale_ptr, shift_ptr, mean_b_ptr, scale_b_ptr, shift_b_ptr,  # [C] both BNs (mask recompute)
    kg_ptr, kx_ptr, kc_ptr,         # [C] dx = kg * g + kx * (x - mean) + kc (K_A; else dx = kg * g)
    kgb_ptr, kxb_ptr, kcb_ptr,      # [C] the same for xb (K_B)
    numel, C, INNER,
    CL: tl.constexpr, RES_MODE: tl.constexpr, RELU: tl.constexpr, K_A: tl.constexpr, K_B: tl.constexpr,
    ACC: tl.constexpr, IDX64: tl.constexpr, BLOCK: tl.constexpr,
):
    offs, mask, c = _flat(numel, C, INNER, CL, IDX64, BLOCK)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
    xb = tl.load(xb_ptr + offs, mask=mask & (RES_MODE >= 2), other=0.0)
    if RELU:
        r = tl.load(r_ptr + offs, mask=mask & (RES_MODE == 1), other=0.0)
        z = _pre_activation(x, r, xb, c, mean_ptr, scale_ptr, shift_ptr, mean_b_ptr, scale_b_ptr, shift_b_ptr,
                            mask, RES_MODE, ACC)
        g = tl.where(z <= 0, 0.0, g)
    dx = g * tl.load(kg_ptr + c, mask=mask, other=0.0)
    if K_A:
        dx = dx + _centred_term(x, tl.load(mean_ptr + c, mask=mask, other=0.0),
                                tl.load(kx_ptr + c, mask=mask, other=0.0), ACC) \
            + tl.load(kc_ptr + c, mask=mask, other=0.0)
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if RES_MODE >= 2:
        dxb = g * tl.load(kgb_ptr + c, mask=mask, other=0.0)
        if K_B:
            dxb = dxb + _centred_term(xb, tl.load(mean_b_ptr + c, mask=mask, other=0.0),
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
    return 8 if res_mode >= 2 else 4  # the weighted residual (3) loads the same three tiles


def _res_mode(residual, xb, mean_b=None) -> int:
    """0: no second input; 1: a residual; 2: a second BatchNorm (xb, mean_b, scale_b, shift_b); 3: a weighted
    residual xb * scale_b (mean_b and shift_b absent)."""
    if residual is not None:
        return 1
    if xb is None:
        return 0
    return 2 if mean_b is not None else 3


def _channels(geo, x, k: int = 1):
    return [empty((geo.C,), dtype=geo.acc, device=x.device) for _ in range(k)]


def _statistics(x, geo, mean, var, **finalize):
    """The statistics pass, whose last program per channel block also finalizes (_finalize's keyword
    arguments): BatchNorm's per-channel work in the same launch."""
    parts = [empty((geo.programs, geo.C), dtype=geo.acc, device=x.device) for _ in range(3)]
    ptrs, scalars, flags = _finalize_args(geo, mean, var, **finalize)
    _stats_partial_kernel[geo.reduce_grid](x, *parts, *geo.tile_args(), counters(x, geo.reduce_grid[1]), *ptrs,
                                           *scalars, CL=geo.cl, ACC=geo.tl_acc, IDX64=geo.idx64,
                                           BLOCK_R=geo.block_r, BLOCK_C=geo.block_c, **flags)


def _finalize_args(geo, mean, var, weight=None, bias=None, eps=0.0, scale=None, shift=None, running_mean=None,
                   running_var=None, momentum=None, num_batches_tracked=None, count=0, increment=None):
    """(pointers, float scalars, constexprs) of the finalize: mean, var, w, b, scale, shift, rm, rv, nbt;
    eps, momentum and unbias as hi + lo pairs; PARAMS, HAS_W, HAS_B, RUNNING, COUNT. `increment`: a
    num_batches_tracked to add one to (momentum must then be a number: the kernel does not also read it)."""
    running = 0 if running_mean is None else 2 if momentum is None else 1
    if running == 2 and num_batches_tracked is None:
        raise ValueError("fusedres: momentum=None (cumulative average) needs num_batches_tracked")
    if increment is not None and running == 2:
        raise ValueError("fusedres: the finalize increments num_batches_tracked only with a numeric momentum")
    if increment is not None:
        num_batches_tracked = increment
    stand_in = mean
    pick = lambda t, on=True: t if (t is not None and on) else stand_in  # noqa: E731
    ptrs = (mean, var, pick(weight), pick(bias), pick(scale), pick(shift), pick(running_mean, running),
            pick(running_var, running), pick(num_batches_tracked, running == 2 or increment is not None))
    scalars = (float(eps), *_hi_lo(momentum or 0.0), *_hi_lo(count / (count - 1) if count > 1 else 1.0))
    flags = dict(PARAMS=scale is not None, HAS_W=weight is not None, HAS_B=bias is not None, RUNNING=running,
                 COUNT=increment is not None)
    return ptrs, scalars, flags


def _finalize(geo, mean, var, centred=False, **finalize):
    """Launch _stats_finalize_kernel on given mean and var (_finalize_args' keyword arguments)."""
    ptrs, scalars, flags = _finalize_args(geo, mean, var, **finalize)
    _stats_finalize_kernel[(triton.cdiv(geo.C, geo.block_c),)](
        *ptrs, geo.C, *scalars, ACC=geo.tl_acc, BLOCK_C=geo.block_c, CENTRED=centred, **flags)


def _hi_lo(v: float):
    """v as two float32 values whose sum is v to about 2**-48 (kernel float arguments are float32)."""
    hi = struct.unpack("f", struct.pack("f", v))[0]
    return hi, v - hi


def batch_stats(x: torch.Tensor):
    """Per-channel mean and biased variance of x, in the accumulation dtype (one launch)."""
    geo = _Geometry(x)
    mean, var = _channels(geo, x, 2)
    _statistics(x, geo, mean, var)
    return mean, var


def bn_stats(x, weight, bias, eps, running_mean, running_var, momentum, num_batches_tracked, increment=None):
    """(mean, biased var, scale, shift) of BatchNorm on x in one launch (the statistics pass, finalized by its
    last programs), which also updates running_mean / running_var in place when given, with `momentum`, or
    with the cumulative factor 1 / num_batches_tracked read on the device when momentum is None, and adds one
    to `increment` (a num_batches_tracked) when given."""
    geo = _Geometry(x)
    mean, var, scale, shift = _channels(geo, x, 4)
    _statistics(x, geo, mean, var, weight=weight, bias=bias, eps=eps, scale=scale, shift=shift,
                running_mean=running_mean, running_var=running_var, momentum=momentum,
                num_batches_tracked=num_batches_tracked, count=geo.N * geo.HW, increment=increment)
    return mean, var, scale, shift


class _Channels:
    """The channel blocking of the finalize kernels alone (any batch size, empty included)."""

    def __init__(self, x: torch.Tensor):
        self.C = x.shape[1]
        self.acc = acc_dtype(x.dtype)
        self.tl_acc = _TL_ACC[self.acc]
        self.block_c = min(triton.next_power_of_2(self.C), 64)
        self.programs = 1


def bn_params(x, mean, var, weight, bias, eps):
    """(scale, shift) of BatchNorm with the given (running) mean and variance: one launch."""
    geo = _Channels(x)
    scale, shift = _channels(geo, x, 2)
    _finalize(geo, mean, var, weight=weight, bias=bias, eps=eps, scale=scale, shift=shift)
    return scale, shift


def bn_finalize(x, mean, var, weight, bias, eps, running_mean, running_var, momentum, num_batches_tracked,
                centred):
    """A BatchNorm's per-channel work on batch statistics of x computed elsewhere (a conv epilogue's), in one
    launch: (scale, shift) (`centred`: BN(x) = x * scale + shift, a conv prologue's form; else (x - mean) * scale
    + shift), running statistics updated with factor `momentum`, num_batches_tracked (when given) plus one."""
    geo = _Channels(x)
    scale, shift = _channels(geo, x, 2)
    _finalize(geo, mean, var, centred=centred, weight=weight, bias=bias, eps=eps, scale=scale, shift=shift,
              running_mean=running_mean, running_var=running_var, momentum=float(momentum),
              count=x.shape[0] * x.shape[2] * x.shape[3], increment=num_batches_tracked)
    return scale, shift


def _second(xb, mean, scale, shift, mean_b, scale_b, shift_b):
    """The second-input vectors, with stand-ins the kernels never read for absent ones."""
    if xb is None:
        return mean, scale, shift
    return (mean_b if mean_b is not None else scale_b, scale_b, shift_b if shift_b is not None else scale_b)


def apply(x, mean, scale, shift, residual, xb, mean_b, scale_b, shift_b, relu):
    """y = act((x - mean) * scale + shift [+ residual | + (xb - mean_b) * scale_b + shift_b | + xb * scale_b])
    in x's dtype and layout (the last form when mean_b and shift_b are None: a weighted residual)."""
    y = empty_like(x)
    if x.numel() == 0:
        return y
    geo = _Geometry(x)
    _apply_kernel[geo.flat_grid](
        x, residual if residual is not None else x, xb if xb is not None else x, y,
        mean, scale, shift, *_second(xb, mean, scale, shift, mean_b, scale_b, shift_b),
        geo.numel, geo.C, geo.inner, CL=geo.cl, RES_MODE=_res_mode(residual, xb, mean_b), RELU=relu,
        ACC=geo.tl_acc, IDX64=geo.idx64, BLOCK=FLAT_BLOCK)
    return y


def _reduce_partials(geo, dy, x, mean, scale, shift, residual, xb, mean_b, scale_b, shift_b, relu,
                     want_grad_residual, fin=None):
    """The reduction launch; `fin` (a dict of _bwd_reduce_kernel's finalize arguments: var, var_b, outs_a,
    outs_b, eps, eps_b, count, MODE_A, MODE_B, TRAINING) makes its last program per channel block finalize."""
    n_sums = 3 if xb is not None else 2
    parts = [empty((geo.programs, geo.C), dtype=geo.acc, device=x.device) for _ in range(n_sums)]
    d_res = empty_like(x) if want_grad_residual else None  # the residual has x's shape, dtype and layout
    if fin is None:
        stand_in = parts[0]
        tail = (stand_in,) * 11 + (0.0, 0.0, 0.0)
        flags = {}
    else:
        tail = (counters(x, geo.reduce_grid[1]), fin["var"], fin["var_b"], *fin["outs_a"], *fin["outs_b"],
                fin["eps"], fin["eps_b"], fin["count"])
        flags = dict(FINALIZE=True, MODE_A=fin["MODE_A"], MODE_B=fin["MODE_B"], TRAINING=fin["TRAINING"])
    _bwd_reduce_kernel[geo.reduce_grid](
        dy, x, residual if residual is not None else x, xb if xb is not None else x,
        d_res if d_res is not None else dy,
        mean, scale, shift, *_second(xb, mean, scale, shift, mean_b, scale_b, shift_b),
        parts[0], parts[1], parts[n_sums - 1],
        *geo.tile_args(), *tail, CL=geo.cl, RES_MODE=_res_mode(residual, xb, mean_b), RELU=relu,
        WRITE_DRES=d_res is not None, ACC=geo.tl_acc, IDX64=geo.idx64, BLOCK_R=geo.block_r, BLOCK_C=geo.block_c,
        num_warps=reduce_warps(_res_mode(residual, xb, mean_b)), **flags)
    return parts, d_res


def backward_reduce(dy, x, mean, scale, shift, residual, xb, mean_b, scale_b, shift_b, relu, want_grad_residual):
    """Per-channel sum(g), sum(g * (x - mean)) [, sum(g * (xb - mean_b))] with g = dy * relu'(z); and
    grad_residual = g when asked (written in the same pass). The primitive of the synchronised ops, which
    all-reduce the sums between the passes; the single-process ops use `backward`."""
    geo = _Geometry(x)
    parts, d_res = _reduce_partials(geo, dy, x, mean, scale, shift, residual, xb, mean_b, scale_b, shift_b, relu,
                                    want_grad_residual)
    sums = [part.sum(0) for part in parts]
    return sums[0], sums[1], sums[2] if xb is not None else None, d_res


def _bwd_apply(geo, dy, x, mean, scale, shift, residual, xb, mean_b, scale_b, shift_b, relu, k_g, k_x, k_c,
               k_g_b, k_x_b, k_c_b):
    dx = empty_like(x)
    dxb = empty_like(xb) if xb is not None else None
    if x.numel() == 0:
        return dx, dxb
    second = _second(xb, mean, scale, shift, mean_b, scale_b, shift_b)
    k_a = (k_g, k_x if k_x is not None else k_g, k_c if k_c is not None else k_g)
    k_b = (k_g_b, k_x_b if k_x_b is not None else k_g_b, k_c_b if k_c_b is not None else k_g_b) \
        if xb is not None else k_a
    _bwd_apply_kernel[geo.flat_grid](
        dy, x, residual if residual is not None else x, xb if xb is not None else x,
        dx, dxb if dxb is not None else dx, mean, scale, shift, *second, *k_a, *k_b,
        geo.numel, geo.C, geo.inner, CL=geo.cl, RES_MODE=_res_mode(residual, xb, mean_b), RELU=relu,
        K_A=k_x is not None, K_B=k_x_b is not None, ACC=geo.tl_acc, IDX64=geo.idx64, BLOCK=FLAT_BLOCK)
    return dx, dxb


def backward_apply(dy, x, mean, scale, shift, residual, xb, mean_b, scale_b, shift_b, relu,
                   k_g, k_x, k_c, k_g_b, k_x_b, k_c_b):
    """dx = k_g * g + k_x * (x - mean) + k_c per channel (and dxb with the xb coefficients)."""
    return _bwd_apply(_Geometry(x), dy, x, mean, scale, shift, residual, xb, mean_b, scale_b, shift_b, relu,
                      k_g, k_x, k_c, k_g_b, k_x_b, k_c_b)


def _side_mode(present, var, mean) -> int:
    """_bwd_finalize_block's MODE of one side."""
    if not present:
        return 0
    if var is not None:
        return 1
    return 2 if mean is not None else 3


_SIDE_OUTPUTS = {0: (), 1: (2, 3), 2: (0, 1, 2), 3: (1,)}


def backward(dy, x, mean, scale, shift, var, eps, residual, xb, mean_b, scale_b, shift_b, var_b, eps_b, relu,
             training, want_grad_residual):
    """The whole backward of y = act(side_a(x) [+ residual | + side_b(xb)]) in 2 launches: the reduction,
    whose last program per channel block also finalizes (coefficients, parameter gradients), and apply. Each side is a BatchNorm when its biased variance (var, var_b) is given — (mean, scale, shift) from
    the forward, gradients (grad_weight, grad_bias) — or else an affine map with gradients (grad_mean,
    grad_scale, grad_shift); a side b without mean_b / shift_b is the weighted residual xb * scale_b, gradient
    (grad_scale_b,). Returns (dx, dxb | None, grad_residual | None, grads_a, grads_b)."""
    geo = _Geometry(x)
    mode_a, mode_b = _side_mode(True, var, mean), _side_mode(xb is not None, var_b, mean_b)
    outs_a, outs_b = _channels(geo, x, 4), _channels(geo, x, 4)
    fin = dict(var=var if var is not None else scale, var_b=var_b if var_b is not None else scale,
               outs_a=outs_a, outs_b=outs_b, eps=float(eps), eps_b=float(eps_b), count=float(geo.N * geo.HW),
               MODE_A=mode_a, MODE_B=mode_b, TRAINING=bool(training))
    _, d_res = _reduce_partials(geo, dy, x, mean, scale, shift, residual, xb, mean_b, scale_b, shift_b, relu,
                                want_grad_residual, fin)
    bn_a, bn_b = mode_a == 1, mode_b == 1
    dx, dxb = _bwd_apply(geo, dy, x, mean, scale, shift, residual, xb, mean_b, scale_b, shift_b, relu,
                         scale, outs_a[0] if bn_a else None, outs_a[1] if bn_a else None,
                         scale_b, outs_b[0] if bn_b else None, outs_b[1] if bn_b else None)
    return (dx, dxb, d_res, tuple(outs_a[i] for i in _SIDE_OUTPUTS[mode_a]),
            tuple(outs_b[i] for i in _SIDE_OUTPUTS[mode_b]))


# ------------------------------------------------------------------------------------------------ traffic
# What one launch of each kernel reads and writes, from its arguments by parameter name: (reads, writes), each
# tensor once (fusedres.bench.traffic counts the bytes; tests/test_count.py checks them against the addresses the
# interpreter touches, so a kernel whose loads change fails there until this table follows).
def _pre_activation_reads(a):
    """What _pre_activation loads besides x: the C vectors, and r, the second BN or the weighted residual."""
    mode = a["RES_MODE"]
    reads = [a["mean_ptr"], a["scale_ptr"], a["shift_ptr"]]
    if mode == 1:
        reads.append(a["r_ptr"])
    if mode == 2:
        reads += [a["xb_ptr"], a["mean_b_ptr"], a["scale_b_ptr"], a["shift_b_ptr"]]
    if mode == 3:
        reads += [a["xb_ptr"], a["scale_b_ptr"]]
    return reads


def _apply_traffic(a):
    return [a["x_ptr"]] + _pre_activation_reads(a), [a["y_ptr"]]


def _stats_traffic(a):
    """The statistics pass, and its last programs reading the partials back to finalize."""
    more_reads, more_writes = _stats_finalize_traffic(a, partials=True)
    return [a["x_ptr"]] + more_reads, [a["cnt_ptr"], a["mean_ptr"], a["m2_ptr"]] + more_writes


def _stats_finalize_traffic(a, partials=False):
    """The finalize's reads and writes (`partials`: the statistics pass's last programs, which read the
    partials back and write mean and var; named out_mean_ptr / out_var_ptr there)."""
    mean, var = ("out_mean_ptr", "out_var_ptr") if partials else ("mean_ptr", "var_ptr")
    reads = [a["cnt_ptr"], a["mean_ptr"], a["m2_ptr"]] if partials else [a[mean], a[var]]
    writes = [a[mean], a[var]] if partials else []
    if a["PARAMS"]:
        reads += ([a["w_ptr"]] if a["HAS_W"] else []) + ([a["b_ptr"]] if a["HAS_B"] else [])
        writes += [a["scale_ptr"], a["shift_ptr"]]
    if a["RUNNING"]:
        reads += [a["rm_ptr"], a["rv_ptr"]] + ([a["nbt_ptr"]] if a["RUNNING"] == 2 else [])
        writes += [a["rm_ptr"], a["rv_ptr"]]
    if a["COUNT"]:
        reads.append(a["nbt_ptr"])
        writes.append(a["nbt_ptr"])
    return reads, writes


def _bwd_reduce_traffic(a):
    mode = a["RES_MODE"]
    reads = [a["dy_ptr"], a["x_ptr"], a["mean_ptr"]] + ([a["xb_ptr"]] if mode >= 2 else []) \
        + ([a["mean_b_ptr"]] if mode == 2 else [])
    if a["RELU"]:
        reads += _pre_activation_reads(a)
    writes = [a["sum_g_ptr"], a["sum_gx_ptr"]] + ([a["sum_gxb_ptr"]] if mode >= 2 else []) \
        + ([a["dres_ptr"]] if a["WRITE_DRES"] else [])
    if a["FINALIZE"]:  # the last programs read the partials back and write the per-channel outputs
        more_reads, more_writes = _bwd_finalize_traffic(a)
        reads, writes = reads + more_reads, writes + more_writes
    return reads, writes


_SIDE_TRAFFIC = {0: ((), ()), 1: ((0, 1), (0, 1, 2, 3)), 2: ((0,), (0, 1, 2)), 3: ((), (1,))}


def _bwd_finalize_traffic(a):
    reads = [a["sum_g_ptr"], a["sum_gx_ptr"]] + ([a["sum_gxb_ptr"]] if a["MODE_B"] > 0 else [])
    writes = []
    for mode, ins, outs in ((a["MODE_A"], ("scale_ptr", "var_ptr"), "a"), (a["MODE_B"], ("scale_b_ptr", "var_b_ptr"),
                                                                            "b")):
        read_idx, write_idx = _SIDE_TRAFFIC[mode]
        reads += [a[ins[i]] for i in read_idx]
        writes += [a[f"{outs}{i}_ptr"] for i in write_idx]
    return reads, writes


def _bwd_apply_traffic(a):
    mode = a["RES_MODE"]
    reads = [a["dy_ptr"], a["x_ptr"], a["kg_ptr"]] + ([a["mean_ptr"], a["kx_ptr"], a["kc_ptr"]] if a["K_A"] else [])
    if mode >= 2:
        reads += [a["xb_ptr"], a["kgb_ptr"]] + ([a["mean_b_ptr"], a["kxb_ptr"], a["kcb_ptr"]] if a["K_B"] else [])
    if a["RELU"]:
        reads += _pre_activation_reads(a)
    return reads, [a["dx_ptr"]] + ([a["dxb_ptr"]] if mode >= 2 else [])


TRAFFIC = {
    "_stats_partial_kernel": _stats_traffic,
    "_stats_finalize_kernel": _stats_finalize_traffic,
    "_apply_kernel": _apply_traffic,
    "_bwd_reduce_kernel": _bwd_reduce_traffic,
    "_bwd_apply_kernel": _bwd_apply_traffic,
}
