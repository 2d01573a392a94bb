"""Compile every Triton kernel variant to a cubin for sm_80 and sm_90 without a GPU (run as a script, with
TRITON_INTERPRET unset). The interpreter accepts code the real compiler rejects (types of loop-carried values,
int64 casts, constexpr masks); this catches those on machines with no GPU."""
import itertools
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import fusedres.triton.bn_act as T

PTR = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32", "float64": "*fp64"}
ACC = {"float16": "float32", "bfloat16": "float32", "float32": "float32", "float64": "float64"}
# per-channel and partial buffers are in the accumulation dtype; activations in the input dtype
ACC_PTRS = {"cnt_ptr", "mean_ptr", "m2_ptr", "mean_part_ptr", "m2_part_ptr", "var_ptr", "scale_ptr",
            "shift_ptr", "mean_b_ptr", "scale_b_ptr", "shift_b_ptr", "sum_g_ptr", "sum_gx_ptr", "sum_gxb_ptr",
            "kg_ptr", "kx_ptr", "kc_ptr", "kgb_ptr", "kxb_ptr", "kcb_ptr"}


def compile_variant(fn, dtype, constexprs, target):
    names = fn.arg_names
    sig = {}
    for name in names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = PTR[ACC[dtype]] if name in ACC_PTRS else PTR[dtype]
        else:
            sig[name] = "i64" if constexprs.get("IDX64") else "i32"
    consts = dict(constexprs)
    if "ACC" in consts:
        consts["ACC"] = getattr(tl, ACC[dtype])
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=target)


def variants():
    for dtype in ("float16", "bfloat16", "float32", "float64"):
        for cl, idx64 in itertools.product((False, True), (False, True)):
            if idx64 and dtype in ("bfloat16", "float64"):
                continue
            tile = dict(CL=cl, ACC=None, IDX64=idx64, BLOCK_R=64, BLOCK_C=64)
            yield T._stats_partial_kernel, dtype, tile
            for res_mode, relu in itertools.product((0, 1, 2), (False, True)):
                if dtype != "float32" and (res_mode, relu) not in ((1, True), (2, True)):
                    continue
                yield T._apply_kernel, dtype, dict(CL=cl, RES_MODE=res_mode, RELU=relu, ACC=None, IDX64=idx64,
                                                    BLOCK=1024)
                yield T._bwd_reduce_kernel, dtype, dict(tile, RES_MODE=res_mode, RELU=relu,
                                                         WRITE_DRES=res_mode == 1)
                yield T._bwd_apply_kernel, dtype, dict(CL=cl, RES_MODE=res_mode, RELU=relu, ACC=None,
                                                        IDX64=idx64, BLOCK=1024)
        yield T._stats_finalize_kernel, dtype, dict(ACC=None, BLOCK_C=64)


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
