"""Compile every Triton kernel variant to a cubin for sm_80 and sm_90 without a GPU (run as a script, with
TRITON_INTERPRET unset). The interpreter accepts code the real compiler rejects (types of loop-carried values,
int64 casts, constexpr masks); this catches those on machines with no GPU. Each variant is bound by Triton's own
launch specialiser (16-byte-aligned pointers, integer divisibility) as in scripts/kernel_resources.py, which
also records each one's registers, spills and occupancy."""
import itertools
import sys
from pathlib import Path

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import fusedres.triton.bn_act as T
import fusedres.triton.conv_bn_act as TC

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import kernel_resources as KR  # noqa: E402

PTR = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32", "float64": "*fp64"}
ACC = {"float16": "float32", "bfloat16": "float32", "float32": "float32", "float64": "float64"}
# per-channel and partial buffers are in the accumulation dtype; activations in the input dtype
ACC_PTRS = {"cnt_ptr", "mean_ptr", "m2_ptr", "mean_part_ptr", "m2_part_ptr", "var_ptr", "scale_ptr",
            "shift_ptr", "mean_b_ptr", "scale_b_ptr", "shift_b_ptr", "sum_g_ptr", "sum_gx_ptr", "sum_gxb_ptr",
            "kg_ptr", "kx_ptr", "kc_ptr", "kgb_ptr", "kxb_ptr", "kcb_ptr",
            # conv_bn_act: per-channel prologue/epilogue vectors and statistics partials are float32
            "in_scale_ptr", "in_shift_ptr", "out_scale_ptr", "out_shift_ptr", "res_scale_ptr", "res_shift_ptr",
            "sum_ptr",
            # finalize kernels: BN parameters, running statistics (float32 buffers), per-side outputs
            "w_ptr", "b_ptr", "rm_ptr", "rv_ptr", "var_b_ptr", "a0_ptr", "a1_ptr", "a2_ptr", "a3_ptr", "b0_ptr",
            "b1_ptr", "b2_ptr", "b3_ptr"}
INT64_PTRS = {"nbt_ptr"}
INT32_PTRS = {"sem_ptr"}
FLOAT_ARGS = {"eps", "eps_b", "count", "mom_hi", "mom_lo", "unb_hi", "unb_lo"}


def compile_variant(fn, dtype, constexprs, target):
    import torch
    tdtype = getattr(torch, dtype)
    consts = dict(constexprs)
    if "ACC" in consts:
        consts["ACC"] = getattr(tl, ACC[dtype])
    ptrs = {name: getattr(torch, ACC[dtype]) for name in ACC_PTRS}
    ptrs.update({name: torch.int64 for name in INT64_PTRS})
    ptrs.update({name: torch.int32 for name in INT32_PTRS})
    if "BLOCK_M" in consts:  # the conv kernel's w_ptr is the conv weight, in the activation dtype; its chunk
        ptrs.pop("w_ptr")     # statistics are float64
        ptrs.update({name: torch.float64 for name in ("cnt_ptr", "cmean_ptr", "cm2_ptr")})
        consts.setdefault("BLOCK_P", TC.GPU_BLOCK_P)
    floats = {name: 1e-5 for name in FLOAT_ARGS}  # float arguments: specialised as fp32, as at launch
    options = {}
    if "BLOCK_M" in consts:
        cfg = dict(consts, num_warps=8 if consts["BLOCK_M"] * consts["BLOCK_N"] >= 128 * 128 else 4, num_stages=3)
        consts.update(TC.conv_constexprs(cfg, 64, consts["KH"], consts["KW"]))
        options = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return KR.compile_launch(fn, target, KR.launch_args(fn, ptrs, floats, consts, tdtype), options)


def variants():
    for dtype in ("float16", "bfloat16", "float32", "float64"):
        for cl, idx64 in itertools.product((False, True), (False, True)):
            if idx64 and dtype in ("bfloat16", "float64"):
                continue
            tile = dict(CL=cl, ACC=None, IDX64=idx64, BLOCK_R=64, BLOCK_C=64)
            # the statistics pass finalizes in its last programs: batch_stats, bn_stats (momentum, + the
            # num_batches_tracked increment, momentum=None)
            for fin in (dict(), dict(PARAMS=True, HAS_W=True, HAS_B=True, RUNNING=1, COUNT=True),
                        dict(PARAMS=True, HAS_W=True, HAS_B=True, RUNNING=2)):
                yield T._stats_partial_kernel, dtype, dict(tile, **fin)
            for res_mode, relu in itertools.product((0, 1, 2, 3), (False, True)):
                if dtype != "float32" and (res_mode, relu) not in ((1, True), (2, True), (3, True)):
                    continue
                yield T._apply_kernel, dtype, dict(CL=cl, RES_MODE=res_mode, RELU=relu, ACC=None, IDX64=idx64,
                                                    BLOCK=1024)
                # the backward's reduction finalizes in its last programs (FINALIZE, side modes as the ops use
                # them); the synchronised ops' plain reduction does not
                for fin in _finalize_modes(res_mode, dtype):
                    yield T._bwd_reduce_kernel, dtype, dict(tile, RES_MODE=res_mode, RELU=relu,
                                                             WRITE_DRES=res_mode == 1, **fin)
                # K_A / K_B: BatchNorm sides (k_x, k_c read) or affine ones (scale_shift_act, weighted residual)
                for k_a in (True, False) if dtype == "float32" else (True,):
                    yield T._bwd_apply_kernel, dtype, dict(CL=cl, RES_MODE=res_mode, RELU=relu, K_A=k_a,
                                                            K_B=res_mode == 2 and k_a, ACC=None, IDX64=idx64,
                                                            BLOCK=1024)
        # on given statistics: eval's (scale, shift), a conv prologue's (CENTRED), conv mode's running statistics
        for params, centred, running, count in ((True, False, 0, False), (True, True, 0, False), (False, False, 1, True)):
            yield T._stats_finalize_kernel, dtype, dict(PARAMS=params, HAS_W=params, HAS_B=params, RUNNING=running,
                                                        CENTRED=centred, COUNT=count, ACC=None, BLOCK_C=64)
    yield from conv_variants()


def _finalize_modes(res_mode: int, dtype: str):
    """The FINALIZE switches of _bwd_reduce_kernel a launch uses with this second input: none (the synchronised
    ops), a BatchNorm side a (training and eval) or an affine one (scale_shift_act), and the matching side b."""
    yield dict(FINALIZE=False)
    side_b = {0: 0, 1: 0, 2: 1, 3: 3}[res_mode]
    yield dict(FINALIZE=True, MODE_A=1, MODE_B=side_b, TRAINING=True)
    if dtype == "float32":
        yield dict(FINALIZE=True, MODE_A=1, MODE_B=side_b, TRAINING=False)
        yield dict(FINALIZE=True, MODE_A=2, MODE_B=2 if res_mode == 2 else side_b, TRAINING=True)


def conv_variants():
    """conv_bn_act: every epilogue/prologue switch, each dtype and precision, 1x1/3x3/7x7, the configs'
    tile shapes (GPU and interpreter), int64 offsets."""
    none = dict(UPCAST=False, REG_A=False, PROLOGUE=False, IN_RELU=False, OUT_SCALE=False, OUT_SHIFT=False, RESIDUAL=False, RES_AFFINE=False,
                RELU=False, STATS=False)
    fold = dict(none, OUT_SCALE=True, OUT_SHIFT=True, RELU=True)
    combos = [
        none,                                                          # raw conv
        dict(none, STATS=True),                                        # training: raw output + BN statistics
        dict(none, PROLOGUE=True, IN_RELU=True, STATS=True),           # training: consumer conv
        fold,                                                          # folded conv + BN + ReLU
        dict(fold, RESIDUAL=True),                                     # folded block tail, identity shortcut
        dict(fold, RESIDUAL=True, RES_AFFINE=True),                    # projection shortcut's own BN
        dict(none, PROLOGUE=True, OUT_SHIFT=True, RESIDUAL=True, RES_AFFINE=True, RELU=True, STATS=True),
    ]
    gpu_tile = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, STAT_ROWS=TC.GPU_STAT_ROWS)
    for dtype, precision in (("bfloat16", "ieee"), ("float16", "ieee"), ("float32", "tf32"), ("float32", "ieee")):
        for i, flags in enumerate(combos):
            if dtype != "bfloat16" and i != (2 if precision == "tf32" else 5):
                continue
            yield TC._conv_kernel, dtype, dict(flags, KH=3, KW=3, PRECISION=precision, IDX64=False, **gpu_tile)
            if flags.get("PROLOGUE") and dtype != "float32":  # the sm_90 launch's prologue form as well
                yield TC._conv_kernel, dtype, dict(flags, KH=3, KW=3, PRECISION=precision, IDX64=False,
                                                   REG_A=True, **gpu_tile)
    for kh in (1, 7):
        yield TC._conv_kernel, "bfloat16", dict(fold, KH=kh, KW=kh, PRECISION="ieee", IDX64=False, STAT_ROWS=64,
                                                BLOCK_M=128, BLOCK_N=64, BLOCK_K=16)
    for cfg in ((256, 128, 64), (128, 256, 64), (64, 64, 16)):  # the extreme autotune tile shapes
        yield TC._conv_kernel, "float16", dict(combos[2], KH=3, KW=3, PRECISION="ieee", IDX64=False, REG_A=True,
                                               STAT_ROWS=TC.GPU_STAT_ROWS, **dict(zip(("BLOCK_M", "BLOCK_N",
                                                                                      "BLOCK_K"), cfg)))
    yield TC._conv_kernel, "bfloat16", dict(combos[6], KH=3, KW=3, PRECISION="ieee", IDX64=True, **gpu_tile)
    yield TC._conv_kernel, "float32", dict(combos[6], KH=3, KW=3, PRECISION="ieee", IDX64=False,
                                           STAT_ROWS=TC.INTERPRET_STAT_ROWS,
                                           **{k: v for k, v in TC.INTERPRET_CONFIG.items() if k.startswith("BLOCK")})


def main(archs):
    count = 0
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        for fn, dtype, constexprs in variants():
            try:
                kernel = compile_variant(fn, dtype, constexprs, target)
            except Exception as exc:  # report which variant broke, then fail
                print(f"FAILED sm_{arch} {fn.__name__} {dtype} {constexprs}: {exc}", file=sys.stderr)
                raise
            assert kernel.asm["cubin"], fn.__name__
            count += 1
    print(f"compiled {count} kernel variants")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [90])
