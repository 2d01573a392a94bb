"""Triton implicit-GEMM conv2d with a fused prologue and epilogue (`conv_bn_act`).

    a = act_in(x * in_scale[c] + in_shift[c])          prologue (optional), zero padding applied AFTER it
    c = conv2d(a, weight, stride, padding, dilation, groups)      fp32 accumulation (tensor cores)
    y = act(c * out_scale[k] + out_shift[k] [+ r * res_scale[k] + res_shift[k]])   epilogue (each optional)
    stats: per-output-channel mean and biased variance of the raw c (optional)

GEMM view: rows m = (n, oh, ow) output pixels (M = N*OH*OW), columns = output channels of one group, reduction
over (kh, kw, input channel of the group). Activations are NHWC (channels_last) dense; the launcher converts
other layouts. Weights are read as [C_out, KH, KW, C_in/groups] (a channels_last weight tensor: no copy when
the weight already is one, as `fusedres.fold` arranges), so a K-tile is contiguous along input channels.

BN statistics are deterministic and independent of the tile configuration: every group of STAT_ROWS output
rows writes its own partial (sum and sum of squared deviations from the group's own mean), and the conv's own
last programs merge the [M / STAT_ROWS, C_out] partials in float64 with the exact parallel-variance formula
(`_merge_stats`: chunks of rows in parallel, then the chunks per column tile; fixed order, the counters only pick
which program does it): a conv with statistics is one launch.

Programs run in grouped order (GROUP_M row tiles share L2 across all column tiles). A small C_in/groups with a
spatial filter (the 7x7 stem's 3 channels) reduces over the flat (kh, kw, c) index (`PACKED`) so K lanes are
not wasted on padding channels.

Configs are kept per GPU generation in `CONFIGS`. Autotuning (`tune_key`: independent of the batch size)
prunes them by shared memory, registers and channel counts before timing at most TUNE_TOP_K, and keeps each
winner in memory and in an on-disk cache per GPU name and Triton version (`cache_path()`;
`fusedres.tune` fills it ahead of training). FUSEDRES_CONV_AUTOTUNE=0 skips tuning and uses
`heuristic_config`; `torch.use_deterministic_algorithms(True)` does the same, so results are bitwise
reproducible across processes. Under the interpreter one small fixed config is used.
"""
from __future__ import annotations

import json
import os

import torch
import triton
import triton.language as tl

from fusedres._layout import empty
from fusedres.triton import INTERPRET, device_reasons
from fusedres._counters import counters

_INTERPRET = INTERPRET  # tests patch the module-level copy
# Element counts from which offsets are computed in int64 (tests lower it to cover that path on tiny inputs).
INT64_INDEX_THRESHOLD = 2**31
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _cfg(bm, bn, bk, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


# Autotune candidates per GPU generation (compute capability major), every one within the budgets of
# docs/kernels.md (no spill, shared memory within sm_80/sm_90 limits, >= 2 CTAs per SM; checked by
# tests/test_kernel_resources.py). Every BLOCK_M is a multiple of GPU_STAT_ROWS.
CONFIGS = {
    9: [  # Hopper
        _cfg(128, 128, 64, 8, 3), _cfg(128, 64, 64, 4, 4), _cfg(64, 128, 64, 4, 4), _cfg(64, 64, 64, 4, 4),
        _cfg(128, 64, 32, 4, 4), _cfg(128, 64, 16, 4, 4),
    ],
    8: [  # Ampere / Ada
        _cfg(128, 128, 32, 8, 3), _cfg(128, 64, 32, 4, 4), _cfg(64, 128, 32, 4, 4), _cfg(64, 64, 32, 4, 4),
        _cfg(64, 64, 16, 4, 4),
    ],
}
CONFIGS[10] = CONFIGS[9]  # Blackwell: start from the Hopper list until measured
# Autotuning budget: configs whose fp32 accumulator needs more registers per thread than this are pruned
# before timing (the measured no-spill bound with the kernel's address and prologue registers), and at most
# TUNE_TOP_K configs are timed per key.
ACC_REGS_PER_THREAD = 64
TUNE_TOP_K = 4
GROUP_M = 8  # row tiles per group of the grouped (L2-friendly) program order
_PLAN = None  # a fusedres.triton.plan.Plan while counting compilations on the CPU (kernels do not run)
GPU_STAT_ROWS = 64
# Under the interpreter (tests): one config, small so tiny shapes span several tiles and masked tails.
INTERPRET_CONFIG = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=1)
INTERPRET_STAT_ROWS = 16


def not_supported_reasons(x: torch.Tensor) -> list[str]:
    reasons = device_reasons(x, _INTERPRET)
    if x.dtype not in SUPPORTED_DTYPES:
        reasons.append(f"dtype {x.dtype} is not supported by the Triton conv kernel (float32, float16, bfloat16)")
    return reasons


# ------------------------------------------------------------------------------------------------- kernel
@triton.jit(do_not_specialize=["H", "W", "OH", "OW", "M", "stride_h", "stride_w", "pad_h", "pad_w", "dil_h",
                               "dil_w"])
def _conv_kernel(
    x_ptr,                        # [N, H, W, C_in] input, NHWC dense
    w_ptr,                        # [C_out, KH, KW, C_in/groups] weights (channels_last [C_out, C_in/g, KH, KW])
    y_ptr,                        # [N, OH, OW, C_out] out, NHWC dense, x's dtype
    in_scale_ptr, in_shift_ptr,   # [C_in] fp32 prologue a = x * in_scale + in_shift (PROLOGUE)
    out_scale_ptr,                # [C_out] fp32 epilogue scale (OUT_SCALE)
    out_shift_ptr,                # [C_out] fp32 epilogue shift / bias (OUT_SHIFT)
    r_ptr,                        # [N, OH, OW, C_out] residual, NHWC dense, x's dtype (RESIDUAL)
    res_scale_ptr, res_shift_ptr,  # [C_out] fp32 residual affine r * res_scale + res_shift (RES_AFFINE)
    sum_ptr, m2_ptr,              # [cdiv(M, STAT_ROWS), C_out] fp32 out: per-row-group sum and centred M2 (STATS)
    cnt_ptr, cmean_ptr, cm2_ptr,  # [cdiv(M, CHUNK_ROWS), C_out] fp64 out: rows, mean, M2 of each chunk (STATS)
    sem_ptr,                      # int32 counters, zero between launches (STATS; see _merge_stats)
    mean_ptr, var_ptr,            # [C_out] fp32 out: batch mean and biased variance of c (STATS)
    CHUNK_ROWS,                   # output rows per statistics chunk, a multiple of BLOCK_M and STAT_ROWS
    H, W, C_in, OH, OW, C_out,    # sizes and geometry that vary with the input resolution and batch are not
    M,                            # specialised (one compiled variant per layer type), N * OH * OW output pixels
    CIN_G, COUT_G,                # channels per group (input, output)
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr,
    PROLOGUE: tl.constexpr, IN_RELU: tl.constexpr,
    OUT_SCALE: tl.constexpr, OUT_SHIFT: tl.constexpr, RESIDUAL: tl.constexpr, RES_AFFINE: tl.constexpr,
    RELU: tl.constexpr, STATS: tl.constexpr, STAT_ROWS: tl.constexpr, BLOCK_P: tl.constexpr,
    PRECISION: tl.constexpr,      # "tf32" or "ieee" (fp32 inputs; ignored by fp16/bf16)
    IDX64: tl.constexpr,
    UPCAST: tl.constexpr,         # interpreter only: its bf16 tl.dot is wrong, so multiply bf16 values in fp32
    REG_A: tl.constexpr,          # sm_90+ and 16-bit x (see reg_a): prologue padding mask derived from loads
    PACKED: tl.constexpr,         # small C_in/groups: the reduction runs over flat (kh, kw, c) (see below)
    GROUP_M: tl.constexpr,        # row tiles per group of the L2-friendly program order
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Grouped program order: GROUP_M row tiles sweep every column tile before the next group starts, so the
    # A rows (activations) of a group stay in L2 while all N tiles read them, and the weights are shared too.
    pid = tl.program_id(0)
    g = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(COUT_G, BLOCK_N)
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = rm < M
    if IDX64:
        rm = rm.to(tl.int64)
    ow = rm % OW
    t = rm // OW
    oh = t % OH
    n = t // OH
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < COUT_G
    co = g * COUT_G + rn
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if PACKED:
        # Flat reduction index k = (kh * KW + kw) * CIN_G + c, which is also the weight's contiguous inner
        # order: every K lane carries a useful (tap, channel) pair (the 7x7 stem's 147 = 3 * 49 values fill
        # 147 of 160 lanes, not 3 of 16 per tap). A is gathered per lane.
        K_TOT = KH * KW * CIN_G
        for k0 in range(0, K_TOT, BLOCK_K):
            kk = k0 + rk
            k_mask = kk < K_TOT
            tap = kk // CIN_G
            ck = kk - tap * CIN_G
            kh = tap // KW
            kw = tap - kh * KW
            ih = (oh * stride_h - pad_h)[:, None] + (kh * dil_h)[None, :]
            iw = (ow * stride_w - pad_w)[:, None] + (kw * dil_w)[None, :]
            a_mask = m_mask[:, None] & k_mask[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a_offs = ((n[:, None] * H + ih) * W + iw) * C_in + (g * CIN_G + ck)[None, :]
            a = tl.load(x_ptr + a_offs, mask=a_mask, other=0.0)
            if PROLOGUE:
                s_in = tl.load(in_scale_ptr + g * CIN_G + ck, mask=k_mask, other=0.0)
                b_in = tl.load(in_shift_ptr + g * CIN_G + ck, mask=k_mask, other=0.0)
                af = a.to(tl.float32) * s_in[None, :] + b_in[None, :]
                if IN_RELU:
                    af = tl.where(af < 0, 0.0, af)
                a = tl.where(a_mask, af, 0.0).to(x_ptr.dtype.element_ty)
            b = tl.load(w_ptr + co[None, :] * K_TOT + kk[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            if UPCAST:
                acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
    else:
        # One flat loop over (kh, kw, input-channel block), so the compiler pipelines loads across filter taps
        # (a nested loop would leave 1x1-per-tap inner loops of one iteration with nothing to overlap).
        c_iters = tl.cdiv(CIN_G, BLOCK_K)
        for it in range(0, KH * KW * c_iters):
            tap = it // c_iters
            k0 = (it - tap * c_iters) * BLOCK_K
            kh = tap // KW
            kw = tap - kh * KW
            ih = oh * stride_h - pad_h + kh * dil_h
            iw = ow * stride_w - pad_w + kw * dil_w
            valid = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            x_row = ((n * H + ih) * W + iw) * C_in + g * CIN_G   # [BLOCK_M]
            ck = k0 + rk
            k_mask = ck < CIN_G
            a_mask = valid[:, None] & k_mask[None, :]
            a = tl.load(x_ptr + x_row[:, None] + ck[None, :], mask=a_mask, other=0.0)
            if PROLOGUE:
                s_in = tl.load(in_scale_ptr + g * CIN_G + ck, mask=k_mask, other=0.0)
                b_in = tl.load(in_shift_ptr + g * CIN_G + ck, mask=k_mask, other=0.0)
                af = a.to(tl.float32) * s_in[None, :] + b_in[None, :]
                if IN_RELU:
                    af = tl.where(af < 0, 0.0, af)  # NaN passes, like torch.relu (tl.maximum would give 0)
                # zero padding (and masked tails) after the prologue: contribute exactly 0. With REG_A only the
                # row (tap in bounds) mask is applied (masked channel tails already give 0: x, in_scale and
                # in_shift load 0 there), and it is taken from two masked loads of one word (other=0 / other=1
                # agree exactly on the rows in bounds), not from index arithmetic: Triton's OptimizeDotOperands
                # then moves the x tile's conversion to the wgmma register-operand layout up to its load, so
                # the prologue runs in that layout on the tile read from the pipeline's buffer (ldmatrix)
                # instead of the transformed tile going through a second shared-memory buffer
                # (docs/conv_bn_act.md).
                if not REG_A:
                    a = tl.where(a_mask, af, 0.0).to(x_ptr.dtype.element_ty)
                else:
                    word = in_scale_ptr.to(tl.pointer_type(tl.int32)) + g * CIN_G + tl.zeros([BLOCK_M], tl.int32)
                    keep = tl.load(word, mask=valid, other=0) == tl.load(word, mask=valid, other=1)
                    a = tl.where(keep[:, None], af, 0.0).to(x_ptr.dtype.element_ty)
            w_offs = co[None, :] * (KH * KW * CIN_G) + (tap * CIN_G + ck)[:, None]
            b = tl.load(w_ptr + w_offs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            if UPCAST:
                acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc, input_precision=PRECISION)

    out_mask = m_mask[:, None] & n_mask[None, :]
    if STATS:
        GROUPS: tl.constexpr = BLOCK_M // STAT_ROWS
        v = tl.where(out_mask, acc, 0.0)
        v3 = tl.reshape(v, [GROUPS, STAT_ROWS, BLOCK_N])
        ones = tl.where(out_mask, 1.0, 0.0)
        cnt3 = tl.reshape(ones, [GROUPS, STAT_ROWS, BLOCK_N])
        cnt = tl.sum(cnt3, axis=1)                          # [GROUPS, BLOCK_N] valid rows per group
        s = tl.sum(v3, axis=1)                              # [GROUPS, BLOCK_N]
        mean_g = s / tl.maximum(cnt, 1.0)
        d = tl.where(cnt3 > 0, v3 - mean_g[:, None, :], 0.0)
        m2 = tl.sum(d * d, axis=1)
        rows = pid_m * GROUPS + tl.arange(0, GROUPS)
        st_offs = rows[:, None] * C_out + co[None, :]
        st_mask = (rows * STAT_ROWS < M)[:, None] & n_mask[None, :]
        tl.store(sum_ptr + st_offs, s, mask=st_mask)
        tl.store(m2_ptr + st_offs, m2, mask=st_mask)

    z = acc
    if OUT_SCALE:
        z = z * tl.load(out_scale_ptr + co, mask=n_mask, other=0.0)[None, :]
    if OUT_SHIFT:
        z = z + tl.load(out_shift_ptr + co, mask=n_mask, other=0.0)[None, :]
    y_offs = rm[:, None] * C_out + co[None, :]
    if RESIDUAL:
        r = tl.load(r_ptr + y_offs, mask=out_mask, other=0.0).to(tl.float32)
        if RES_AFFINE:
            r = r * tl.load(res_scale_ptr + co, mask=n_mask, other=0.0)[None, :] \
                + tl.load(res_shift_ptr + co, mask=n_mask, other=0.0)[None, :]
        z = z + r
    if RELU:
        z = tl.where(z < 0, 0.0, z)  # NaN passes, like torch.relu
    tl.store(y_ptr + y_offs, z.to(y_ptr.dtype.element_ty), mask=out_mask)
    if STATS:
        _merge_stats(sum_ptr, m2_ptr, cnt_ptr, cmean_ptr, cm2_ptr, sem_ptr, mean_ptr, var_ptr, pid_m, pid_n, g,
                     num_pid_n, M, C_out, COUT_G, CHUNK_ROWS, STAT_ROWS, BLOCK_M, BLOCK_P, BLOCK_N)


@triton.jit
def _merge_stats(sum_ptr, m2_ptr, cnt_ptr, cmean_ptr, cm2_ptr, sem_ptr, mean_ptr, var_ptr, pid_m, pid_n, g,
                 num_pid_n, M, C, COUT_G, CHUNK_ROWS, STAT_ROWS: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """The statistics merge in the conv's own last programs (no merge launch). Rows are cut into chunks of
    CHUNK_ROWS (from M alone, so the result does not depend on the tile config): per column tile, the last row
    tile of a chunk to store its partials merges the chunk's partials (`_merge_chunk`), and the last chunk
    merger merges the chunks into mean and var (`_merge_chunks`). Counters: one per (chunk, column tile), then
    one per column tile after them; each winner zeroes its own. Fixed order throughout: the tickets only pick
    which program merges. The column tile's channels are indexed afresh (not the accumulator's slice layout,
    whose 2-D tiles here would be spread over the MMA layout and cost registers)."""
    rn = pid_n * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = rn < COUT_G
    c = g * COUT_G + rn
    n_cols = tl.num_programs(1) * num_pid_n
    col = g * num_pid_n + pid_n
    chunk = (pid_m * BLOCK_M) // CHUNK_ROWS
    r_lo = chunk * CHUNK_ROWS
    tiles = tl.minimum(tl.cdiv(M - r_lo, BLOCK_M), CHUNK_ROWS // BLOCK_M)
    tl.debug_barrier()
    ticket = tl.atomic_add(sem_ptr + chunk * n_cols + col, 1, sem="acq_rel", scope="gpu")
    if ticket == tiles - 1:
        per_chunk = CHUNK_ROWS // STAT_ROWS
        P = tl.cdiv(M, STAT_ROWS)
        _merge_chunk(sum_ptr, m2_ptr, cnt_ptr, cmean_ptr, cm2_ptr, chunk, chunk * per_chunk,
                     tl.minimum(chunk * per_chunk + per_chunk, P), C, M, c, c_mask, STAT_ROWS, BLOCK_P, BLOCK_C)
        tl.atomic_xchg(sem_ptr + chunk * n_cols + col, 0)
        S = tl.cdiv(M, CHUNK_ROWS)
        tl.debug_barrier()
        last = tl.atomic_add(sem_ptr + S * n_cols + col, 1, sem="acq_rel", scope="gpu")
        if last == S - 1:
            _merge_chunks(cnt_ptr, cmean_ptr, cm2_ptr, mean_ptr, var_ptr, S, C, c, c_mask, BLOCK_P, BLOCK_C)
            tl.atomic_xchg(sem_ptr + S * n_cols + col, 0)


@triton.jit
def _merge_chunk(sum_ptr, m2_ptr, cnt_ptr, mean_ptr, m2_out_ptr, chunk, p_lo, p_hi, C, M, c, c_mask,
                 STAT_ROWS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Stage 1 for channels c: the exact parallel-variance merge of the partials p_lo <= p < p_hi in float64,
    in order: mean = sum(s_p) / n, M2 = sum(m2_p + n_p * (s_p / n_p - mean)^2), stored as chunk `chunk`'s
    (rows, mean, M2). The partials were written by other programs of this launch: read from L2 (.cg)."""
    rows = (tl.minimum(p_hi * STAT_ROWS, M) - p_lo * STAT_ROWS).to(tl.float64)
    total = tl.zeros([BLOCK_C], dtype=tl.float64)
    for p0 in range(p_lo, p_hi, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = (p < p_hi)[:, None] & c_mask[None, :]
        s = tl.load(sum_ptr + p[:, None] * C + c[None, :], mask=mask, other=0.0, cache_modifier=".cg")
        total += tl.sum(s.to(tl.float64), axis=0)
    mean = total / rows
    m2 = tl.zeros([BLOCK_C], dtype=tl.float64)
    for p0 in range(p_lo, p_hi, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        p_mask = p < p_hi
        mask = p_mask[:, None] & c_mask[None, :]
        offs = p[:, None] * C + c[None, :]
        s = tl.load(sum_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float64)
        q = tl.load(m2_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float64)
        n = tl.where(p_mask, tl.minimum(M - p * STAT_ROWS, STAT_ROWS), 1).to(tl.float64)
        d = s / n[:, None] - mean[None, :]
        m2 += tl.sum(tl.where(mask, q + n[:, None] * d * d, 0.0), axis=0)
    out = chunk * C + c
    tl.store(cnt_ptr + out, tl.zeros([BLOCK_C], dtype=tl.float64) + rows, mask=c_mask)
    tl.store(mean_ptr + out, mean, mask=c_mask)
    tl.store(m2_out_ptr + out, m2, mask=c_mask)


@triton.jit
def _merge_chunks(cnt_ptr, mean_part_ptr, m2_part_ptr, mean_ptr, var_ptr, S, C, c, c_mask, BLOCK_S: tl.constexpr,
                  BLOCK_C: tl.constexpr):
    """Stage 2 for channels c: the S chunks' (rows, mean, M2) merged in float64 by the same exact formula,
    mean = sum(n_i mean_i) / n, M2 = sum(m2_i + n_i (mean_i - mean)^2), BLOCK_S chunks per step in a fixed
    order (read from L2: other programs wrote them)."""
    count = tl.zeros([BLOCK_C], dtype=tl.float64)
    total = tl.zeros([BLOCK_C], dtype=tl.float64)
    for s0 in range(0, S, BLOCK_S):
        i = s0 + tl.arange(0, BLOCK_S)
        offs = i[:, None] * C + c[None, :]
        mask = (i < S)[:, None] & c_mask[None, :]
        n_i = tl.load(cnt_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
        count += tl.sum(n_i, axis=0)
        total += tl.sum(n_i * tl.load(mean_part_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg"), axis=0)
    count = tl.where(c_mask, count, 1.0)  # no 0 / 0 in the channel tail's masked lanes
    mean = total / count
    m2 = tl.zeros([BLOCK_C], dtype=tl.float64)
    for s0 in range(0, S, BLOCK_S):
        i = s0 + tl.arange(0, BLOCK_S)
        offs = i[:, None] * C + c[None, :]
        mask = (i < S)[:, None] & c_mask[None, :]
        n_i = tl.load(cnt_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
        d = tl.load(mean_part_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg") - mean[None, :]
        m2 += tl.sum(tl.load(m2_part_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg") + n_i * d * d, axis=0)
    tl.store(mean_ptr + c, mean.to(tl.float32), mask=c_mask)
    tl.store(var_ptr + c, (m2 / count).to(tl.float32), mask=c_mask)


def heuristic_config(cin_g: int, cout_g: int, kh: int = 1, kw: int = 1) -> dict:
    """One config without tuning (FUSEDRES_CONV_AUTOTUNE=0, deterministic mode): tiles sized to the channel
    counts, from configs within the resource budgets of docs/kernels.md."""
    if packed(cin_g, kh, kw):  # the gathered A tile's per-lane index math: 128-row tiles spill on sm_80
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3)
    block_n = 128 if cout_g >= 128 else 64
    block_k = 64 if cin_g >= 64 else 32 if cin_g >= 32 else 16
    return dict(BLOCK_M=128, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=8 if block_n == 128 else 4,
                num_stages=3)


def packed(cin_g: int, kh: int, kw: int) -> bool:
    """Whether the flat (kh, kw, c) reduction is used: a channel block would leave most K lanes idle."""
    return cin_g < 16 and kh * kw > 1


def conv_constexprs(cfg: dict, cin_g: int, kh: int, kw: int, interpret: bool = False) -> dict:
    """The launch's tile constexprs for config `cfg` (BLOCK_* and the derived PACKED / GROUP_M)."""
    return dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                PACKED=packed(cin_g, kh, kw), GROUP_M=2 if interpret else GROUP_M)


def config_label(cfg: dict) -> str:
    return "x".join(str(cfg[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in cfg) or "-"


def configs_for(major: int) -> list:
    return CONFIGS.get(major, CONFIGS[8])


# ---------------------------------------------------------------------------------------------- autotuning
def tune_key(x_dtype, N, OH, OW, C_out, cin_g, cout_g, KH, KW, stride, flags) -> str:
    """What a tuned winner is stored under. M enters only as the per-image row count OH * OW (M / N): the
    batch size is not in the key, so a partial last batch and eval batches reuse the training batch's winner
    (no new timing, no new compiles), and the key is stable across processes and runs (the on-disk cache)."""
    opts = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in sorted(flags.items())
                    if k not in ("STAT_ROWS", "UPCAST", "REG_A"))
    return f"{str(x_dtype).split('.')[-1]}|rows{OH * OW}|co{C_out}|g{cin_g}x{cout_g}|k{KH}x{KW}|s{stride[0]}x{stride[1]}|{opts}"


def _device_limits(device) -> tuple[int, int]:
    """(shared memory per block, SM count) of device."""
    props = torch.cuda.get_device_properties(device)
    smem = getattr(props, "shared_memory_per_block_optin", 0) or (227 * 1024 if props.major >= 9 else 163 * 1024 if
                                                                 props.major == 8 else 96 * 1024)
    return smem, props.multi_processor_count


def prune_configs(configs, elem_bytes: int, cin_g: int, cout_g: int, kh: int, kw: int, smem_limit: int) -> list:
    """Configs worth timing for one GEMM shape, before any is compiled: within the shared-memory budget
    (num_stages buffered A and B tiles) and the register budget (fp32 accumulator <= ACC_REGS_PER_THREAD per
    thread, the measured no-spill bound), and not wider than the channels (a BLOCK_N / BLOCK_K beyond the next
    power of two of C_out/g / C_in/g only masks lanes off). At most TUNE_TOP_K remain, in list order."""
    kept = []
    k_extent = kh * kw * cin_g if packed(cin_g, kh, kw) else cin_g
    for cfg in configs:
        kw_ = cfg.all_kwargs() if hasattr(cfg, "all_kwargs") else cfg
        bm, bn, bk = kw_["BLOCK_M"], kw_["BLOCK_N"], kw_["BLOCK_K"]
        smem = kw_["num_stages"] * (bm * bk + bk * bn) * elem_bytes
        acc_regs = bm * bn // (32 * kw_["num_warps"])
        if smem > smem_limit or acc_regs > ACC_REGS_PER_THREAD:
            continue
        if bn > max(32, triton.next_power_of_2(cout_g)) or bk > max(16, triton.next_power_of_2(k_extent)):
            continue
        kept.append(cfg)
    return kept[:TUNE_TOP_K]


def cache_path() -> str:
    """The on-disk cache of tuned winners: $FUSEDRES_CACHE_DIR/conv_autotune.json (default
    ~/.cache/fusedres)."""
    root = os.environ.get("FUSEDRES_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fusedres")
    return os.path.join(root, "conv_autotune.json")


def _cache_scope(device) -> str:
    """Winners are valid for one GPU model and one Triton version (codegen changes move the best tile)."""
    return f"{torch.cuda.get_device_name(device)}|triton {triton.__version__}"


_WINNERS: dict = {}       # scope -> {tune key -> config kwargs}; loaded from and written to cache_path()
_LOADED: set = set()


def _winners(scope: str) -> dict:
    if scope not in _LOADED:
        _LOADED.add(scope)
        try:
            with open(cache_path()) as f:
                _WINNERS.setdefault(scope, {}).update(json.load(f).get(scope, {}))
        except (OSError, ValueError):
            pass
    return _WINNERS.setdefault(scope, {})


def _save(scope: str) -> None:
    path = cache_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            data = {}
        data.setdefault(scope, {}).update(_WINNERS[scope])
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: winners stay in memory for this process


def _autotuned_config(key, scope, candidates, launch, bench=None) -> dict:
    """The cached winner for `key` in `scope` (GPU name + Triton version), else time each candidate once
    (`bench`: triton.testing.do_bench) and cache the fastest in memory and on disk."""
    winners = _winners(scope)
    if key not in winners:
        if len(candidates) == 1:
            winners[key] = candidates[0]
        else:
            if bench is None:
                from triton.testing import do_bench
                bench = lambda fn: do_bench(fn, warmup=5, rep=20)  # noqa: E731
            times = []
            for cfg in candidates:
                try:
                    times.append(bench(lambda: launch(cfg)))
                except Exception:  # noqa: BLE001 (a config this GPU cannot run: out of resources)
                    times.append(float("inf"))
            winners[key] = candidates[min(range(len(candidates)), key=times.__getitem__)]
        _save(scope)
    return winners[key]


def config_choice(device) -> str:
    """How the launcher picks the kernel config: "interpret" (CPU, the interpreter's fixed config),
    "heuristic" (`heuristic_config`: FUSEDRES_CONV_AUTOTUNE=0, or deterministic mode — the config fixes the
    fp32 summation order of y and of the statistics, so it must not depend on which config won a timing race
    in this process), else "autotune"."""
    if torch.device(device).type == "cpu":
        return "interpret"
    if os.environ.get("FUSEDRES_CONV_AUTOTUNE", "1") == "0" or torch.are_deterministic_algorithms_enabled():
        return "heuristic"
    return "autotune"


# ------------------------------------------------------------------------------------------------ launcher
def out_size(size: int, k: int, stride: int, pad: int, dil: int) -> int:
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


def conv_bn_act(x, weight, in_scale, in_shift, in_relu, out_scale, out_shift, residual, res_scale, res_shift,
                relu, stride, padding, dilation, groups, stats, allow_tf32):
    """The fused conv (see the module docstring). x [N, C_in, H, W] any dense layout (used as NHWC),
    weight [C_out, C_in/groups, KH, KW]; per-channel vectors fp32 (or None); residual [N, C_out, OH, OW].
    Returns (y channels_last in x's dtype, mean, var) — mean/var fp32 [C_out] when `stats`, else empty."""
    N, C_in, H, W = x.shape
    C_out, cin_g, KH, KW = weight.shape
    OH = out_size(H, KH, stride[0], padding[0], dilation[0])
    OW = out_size(W, KW, stride[1], padding[1], dilation[1])
    cl = torch.channels_last
    x = x.contiguous(memory_format=cl)
    w = weight.to(x.dtype).contiguous(memory_format=cl)   # no copy for a channels_last weight of x's dtype
    y = empty((N, C_out, OH, OW), dtype=x.dtype, device=x.device, memory_format=cl)
    M = N * OH * OW
    f32 = dict(dtype=torch.float32, device=x.device)
    vec = lambda v: None if v is None else v.to(**f32).contiguous()  # noqa: E731
    in_scale, in_shift, out_scale, out_shift, res_scale, res_shift = map(
        vec, (in_scale, in_shift, out_scale, out_shift, res_scale, res_shift))
    if in_scale is not None or in_shift is not None:
        in_scale = in_scale if in_scale is not None else torch.ones(C_in, **f32)
        in_shift = in_shift if in_shift is not None else torch.zeros(C_in, **f32)
    res_affine = residual is not None and (res_scale is not None or res_shift is not None)
    if res_affine:
        res_scale = res_scale if res_scale is not None else torch.ones(C_out, **f32)
        res_shift = res_shift if res_shift is not None else torch.zeros(C_out, **f32)
    if residual is not None:
        residual = residual.to(x.dtype).contiguous(memory_format=cl)
    plan = _PLAN
    interp = x.device.type == "cpu" and plan is None
    stat_rows = INTERPRET_STAT_ROWS if interp else GPU_STAT_ROWS
    chunk_rows = stat_chunk_rows(M, interp)
    cout_g = C_out // groups
    if stats and M > 0 and C_out > 0:
        chunks = triton.cdiv(M, chunk_rows)
        sums = empty((triton.cdiv(M, stat_rows), C_out), **f32)
        m2s = empty((triton.cdiv(M, stat_rows), C_out), **f32)
        parts = [empty((chunks, C_out), dtype=torch.float64, device=x.device) for _ in range(3)]
        mean = empty((C_out,), **f32)
        var = empty((C_out,), **f32)
        # (chunk, column tile) counters, then one per column tile; the narrowest BLOCK_N any config has
        sem = counters(y, (chunks + 1) * triton.cdiv(cout_g, MIN_BLOCK_N) * groups)
    else:
        sums = m2s = sem = y
        parts = [y] * 3
        if stats and M == 0:  # no values: NaN statistics, as the reference's mean of nothing
            mean, var = torch.full((C_out,), float("nan"), **f32), torch.full((C_out,), float("nan"), **f32)
        else:
            mean, var = torch.empty(0, **f32), torch.empty(0, **f32)
    if M == 0 or C_out == 0:
        return y, mean, var
    dummy = y
    idx64 = max(x.numel(), y.numel(), w.numel()) >= INT64_INDEX_THRESHOLD
    args = (x, w, y, in_scale if in_scale is not None else dummy, in_shift if in_shift is not None else dummy,
            out_scale if out_scale is not None else dummy, out_shift if out_shift is not None else dummy,
            residual if residual is not None else dummy,
            res_scale if res_affine else dummy, res_shift if res_affine else dummy, sums, m2s, *parts, sem,
            mean, var, chunk_rows, H, W, C_in, OH, OW, C_out, M, cin_g, C_out // groups, stride[0], stride[1], padding[0], padding[1],
            dilation[0], dilation[1])
    flags = dict(KH=KH, KW=KW, PROLOGUE=in_scale is not None, IN_RELU=bool(in_relu) and in_scale is not None,
                 OUT_SCALE=out_scale is not None, OUT_SHIFT=out_shift is not None, RESIDUAL=residual is not None,
                 RES_AFFINE=res_affine, RELU=bool(relu), STATS=bool(stats), STAT_ROWS=stat_rows,
                 BLOCK_P=INTERPRET_BLOCK_P if interp else GPU_BLOCK_P,
                 PRECISION="tf32" if allow_tf32 and x.dtype == torch.float32 else "ieee", IDX64=idx64,
                 UPCAST=interp and x.dtype == torch.bfloat16,
                 REG_A=reg_a(x.dtype, plan.major if plan is not None else None if interp else
                             torch.cuda.get_device_capability(x.device)[0]))

    def launch(cfg):
        consts = conv_constexprs(cfg, cin_g, KH, KW, interpret=interp)
        grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(cout_g, cfg["BLOCK_N"]), groups)
        opts = {} if interp else dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        _conv_kernel[grid](*args, **flags, **consts, **opts)

    how = plan.choice if plan is not None else config_choice(x.device)
    if how == "interpret":
        launch(INTERPRET_CONFIG)
    elif how == "heuristic":
        cfg = heuristic_config(cin_g, cout_g, KH, KW)
        if plan is not None:
            launch(cfg)
        else:
            with torch.cuda.device(x.device):
                launch(cfg)
    else:
        key = tune_key(x.dtype, N, OH, OW, C_out, cin_g, cout_g, KH, KW, stride, flags)
        if plan is not None:
            cfg = plan.tune(key, _candidates(plan.major, plan.smem, x.dtype, cin_g, cout_g, KH, KW), launch)
            launch(cfg)
        else:
            with torch.cuda.device(x.device):
                major = torch.cuda.get_device_capability(x.device)[0]
                smem = _device_limits(x.device)[0]
                cfg = _autotuned_config(key, _cache_scope(x.device),
                                        _candidates(major, smem, x.dtype, cin_g, cout_g, KH, KW), launch)
                launch(cfg)
    return y, mean, var


def reg_a(dtype, major) -> bool:
    """Whether the prologue takes its padding mask from loads (REG_A), which lets Triton run it in the wgmma
    register-operand layout: Hopper and later (major >= 9) with 16-bit inputs, and the interpreter (major None,
    16-bit) so the tests cover it. Not on sm_80 (mma.sync: the hoisted fp32 prologue costs registers and
    spills there) nor for fp32/tf32."""
    return dtype in (torch.float16, torch.bfloat16) and (major is None or major >= 9)


def _candidates(major, smem, dtype, cin_g, cout_g, kh, kw) -> list[dict]:
    """Configs autotuning times for one shape; the packed path runs its one budget-checked config."""
    if packed(cin_g, kh, kw):
        return [heuristic_config(cin_g, cout_g, kh, kw)]
    cands = [c.all_kwargs() for c in prune_configs(configs_for(major), dtype.itemsize, cin_g, cout_g, kh, kw, smem)]
    return cands or [heuristic_config(cin_g, cout_g, kh, kw)]


# Statistics merge (`_merge_stats`, in the conv's last programs): about this many chunks of rows, each merged by
# the last row tile of the chunk per column tile (at ResNet-50's shapes that is >= 132 merging programs, an
# H100 / H200's SM count, overlapping the conv's remaining tiles); chunk rows are a multiple of CHUNK_UNIT, which
# every BLOCK_M (and STAT_ROWS) divides, and depend on M alone. The interpreter gets small chunks so tiny shapes
# span several chunks of several tiles.
MERGE_CHUNKS = 160
CHUNK_UNIT = 256
INTERPRET_MERGE_CHUNKS = 3
INTERPRET_CHUNK_UNIT = INTERPRET_CONFIG["BLOCK_M"]
GPU_BLOCK_P = 4       # partials (chunks) per step of a chunk merge (fp64 [BLOCK_P, BLOCK_N] tiles)
INTERPRET_BLOCK_P = 4
MIN_BLOCK_N = 16      # the narrowest column tile of any config (sizes the counters)


def stat_chunk_rows(M: int, interpret: bool) -> int:
    """Output rows per statistics chunk: about M / MERGE_CHUNKS rounded up to the chunk unit."""
    unit = INTERPRET_CHUNK_UNIT if interpret else CHUNK_UNIT
    target = INTERPRET_MERGE_CHUNKS if interpret else MERGE_CHUNKS
    return max(unit, triton.cdiv(triton.cdiv(max(M, 1), target), unit) * unit)


# ------------------------------------------------------------------------------------------------ traffic
def _touched(size: int, out: int, k: int, stride: int, pad: int, dil: int) -> int:
    """Input rows (or columns) some output position reads: a strided 1x1 conv skips the others."""
    return len({o * stride - pad + t * dil for o in range(out) for t in range(k)} & set(range(size)))


def _conv_traffic(a):
    """x where some output reads it, the weights, y; the C vectors and residual the flags switch on; the
    statistics partials and chunk statistics (written, read back by the merging programs) and mean / var. A conv's FLOPs are counted as torch.utils.flop_counter counts its convolution."""
    x, w = a["x_ptr"], a["w_ptr"]
    n = x.shape[0]
    rows = _touched(a["H"], a["OH"], a["KH"], a["stride_h"], a["pad_h"], a["dil_h"])
    cols = _touched(a["W"], a["OW"], a["KW"], a["stride_w"], a["pad_w"], a["dil_w"])
    reads = [(x, n * rows * cols * a["C_in"] * x.element_size()), w]
    if a["PROLOGUE"]:
        reads += [a["in_scale_ptr"], a["in_shift_ptr"]]
    reads += [a["out_scale_ptr"]] if a["OUT_SCALE"] else []
    reads += [a["out_shift_ptr"]] if a["OUT_SHIFT"] else []
    reads += [a["r_ptr"]] if a["RESIDUAL"] else []
    reads += [a["res_scale_ptr"], a["res_shift_ptr"]] if a["RES_AFFINE"] else []
    writes = [a["y_ptr"]]
    if a["STATS"]:  # partials and chunk statistics are written, then read back by the merging programs
        merged = [a["sum_ptr"], a["m2_ptr"], a["cnt_ptr"], a["cmean_ptr"], a["cm2_ptr"]]
        reads += merged
        writes += merged + [a["mean_ptr"], a["var_ptr"]]
    return reads, writes


def conv_flops(a) -> int:
    from torch.utils.flop_counter import conv_flop_count

    return conv_flop_count([a["x_ptr"].shape[0], a["C_in"], a["H"], a["W"]], list(a["w_ptr"].shape),
                           [a["x_ptr"].shape[0], a["C_out"], a["OH"], a["OW"]], transposed=False)


TRAFFIC = {"_conv_kernel": _conv_traffic}
FLOPS = {"_conv_kernel": conv_flops}
