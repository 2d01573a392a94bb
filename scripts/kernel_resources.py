"""Registers, spills, shared memory and theoretical occupancy of every kernel, compiled offline the way it
launches (no GPU needed) — the table in docs/kernels.md and the budgets CI enforces (tests/test_kernel_resources.py).

Triton kernels: each variant is bound through Triton's own launch-time specialiser for the target (so pointer
and integer arguments carry the 16-byte alignment / divisibility attributes a real launch gives them, and
integers equal to 1 become constants), compiled with the num_warps / num_stages it launches with (each
autotune config of the conv kernel), then its PTX is run through the bundled ptxas with `-v`. CUDA kernels:
`nvcc -ptx` per architecture, then `ptxas -v` on that PTX; the block size comes from `__launch_bounds__`.

    python scripts/kernel_resources.py                 # write docs/kernels.md (TRITON_INTERPRET must be unset)
    python scripts/kernel_resources.py --check         # exit 1 when a budget is broken
    python scripts/kernel_resources.py --only triton   # skip the CUDA kernels

Theoretical occupancy uses NVIDIA's published per-SM limits (CUDA occupancy calculator rules: registers
allocated per warp in units of 256, 1 KB of shared memory reserved per block).
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Per-SM limits: sm_90 = H100/H200, sm_80 = A100.
ARCHS = {
    90: dict(regs=65536, threads=2048, blocks=32, smem_sm=228 * 1024, smem_block=227 * 1024),
    80: dict(regs=65536, threads=2048, blocks=32, smem_sm=164 * 1024, smem_block=163 * 1024),
}
# Occupancy floors (resident warps / 64) per kernel family, enforced on both architectures:
# - conv: tensor-core GEMM tiles hide latency with num_stages of asynchronous copies, not with resident warps:
#   at least 8 resident warps (12.5 %: two warpgroups, one CTA of 8 warps or two of 4).
# - elementwise (Triton apply kernels, 8 elements = 16 bytes of a 16-bit tensor per thread and load): at least
#   24 resident warps (37.5 %), so every SM keeps >= 12 KB of each input in flight.
# - reduction (Triton statistics / backward-reduce kernels: a whole [64, 64] tile per loop iteration in flight
#   per CTA): at least 8 resident warps (12.5 %).
# - cuda (the CUDA main kernels, 256-thread blocks, several 16-byte loads in flight per thread): at least 2
#   resident blocks (25 %).
# - finalize (per-channel finalize / merge kernels: a grid of a few programs, fewer than the SMs, so occupancy
#   does not bound them): at least 8 resident warps (12.5 %), which catches register blow-ups.
FLOORS = {"conv": 0.125, "elementwise": 0.375, "reduction": 0.125, "cuda": 0.25, "finalize": 0.125}


@dataclasses.dataclass
class Row:
    backend: str        # "triton" / "cuda"
    family: str         # key of FLOORS
    kernel: str
    variant: str        # flags / template arguments
    config: str         # tile, warps, stages (Triton); block size (CUDA)
    arch: int
    warps: int
    regs: int
    spill_stores: int
    spill_loads: int
    stack: int
    smem: int           # bytes per block (dynamic + static)

    @property
    def ctas(self) -> int:
        lim = ARCHS[self.arch]
        warp_regs = -(-max(self.regs, 1) * 32 // 256) * 256
        by_regs = (lim["regs"] // warp_regs) // self.warps
        by_threads = lim["threads"] // (32 * self.warps)
        by_smem = lim["smem_sm"] // (self.smem + 1024) if self.smem else lim["blocks"]
        return max(0, min(by_regs, by_threads, by_smem, lim["blocks"]))

    @property
    def occupancy(self) -> float:
        return self.ctas * self.warps / (ARCHS[self.arch]["threads"] // 32)

    def problems(self) -> list[str]:
        out = []
        if self.spill_stores or self.spill_loads:
            out.append(f"spills {self.spill_stores} B stores / {self.spill_loads} B loads per thread")
        if self.smem > ARCHS[self.arch]["smem_block"]:
            out.append(f"shared memory {self.smem} B > sm_{self.arch}'s {ARCHS[self.arch]['smem_block']} B per block")
        floor = FLOORS[self.family]
        if self.occupancy < floor - 1e-9:
            out.append(f"occupancy {self.occupancy:.1%} < the {self.family} floor {floor:.1%}")
        return out


_PTXAS_RE = {
    "regs": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "smem": re.compile(r"(\d+) bytes smem"),
}


def parse_ptxas(log: str) -> dict[str, dict[str, int]]:
    """ptxas -v output → {mangled function name: {regs, stack, spill_stores, spill_loads, smem}}."""
    out: dict[str, dict[str, int]] = {}
    name = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line) or re.search(r"Function properties for (\S+)",
                                                                                 line)
        if m:
            name = m.group(1)
            out.setdefault(name, dict(regs=0, stack=0, spill_stores=0, spill_loads=0, smem=0))
            continue
        if name is None:
            continue
        for key, rx in _PTXAS_RE.items():
            m = rx.search(line)
            if m:
                out[name][key] = max(out[name][key], int(m.group(1)))
    return out


def ptxas_path() -> str:
    from triton.backends.nvidia.compiler import get_ptxas
    return get_ptxas(90).path


def run_ptxas(ptx: str, arch: int, ptxas: str | None = None, opts=("--regAllocOptLevel=2",)) -> dict[str, dict[str, int]]:
    """ptxas -v on `ptx` (Triton's bundled ptxas with Triton's options unless `ptxas` names another, e.g. nvcc's
    for its own PTX with the build's (default) options)."""
    suffix = "a" if arch == 90 else ""  # Triton (and wgmma) target sm_90a
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "k.ptx")
        src.write_text(ptx)
        done = subprocess.run([ptxas or ptxas_path(), "-v", *opts, f"--gpu-name=sm_{arch}{suffix}",
                               str(src), "-o", str(Path(tmp, "k.o"))], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"ptxas failed: {done.stderr[-2000:]}")
    return parse_ptxas(done.stdout + done.stderr)


# ------------------------------------------------------------------------------------------------- Triton
class Ptr:
    """A launch argument standing in for a tensor: dtype and a 16-byte-aligned address (as the CUDA caching
    allocator gives every fresh tensor)."""

    def __init__(self, dtype):
        self.dtype = dtype

    def data_ptr(self):
        return 1 << 20


def bind(fn, target, args: dict, options: dict):
    """(signature, constexprs, attrs, options) of launching `fn` with `args` on `target`, computed by Triton's own
    launch binder (triton.runtime.jit), so the specialisation is exactly a real launch's."""
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, opts = binder(**args, **options)
    return JITFunction._pack_args(fn, backend, dict(options), bound, specialization, opts)


def compile_launch(fn, target, args: dict, options: dict):
    import triton
    from triton.compiler import ASTSource

    options = {"num_warps": 4, "num_stages": 3, **options}  # Triton's launch defaults
    opts, signature, constexprs, attrs = bind(fn, target, args, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=opts.__dict__)


def launch_args(fn, ptr_dtypes: dict, ints: dict, constexprs: dict, default_dtype):
    """Every argument of `fn`: pointers as aligned `Ptr`s (dtype per name, else `default_dtype`), integers from
    `ints` (default 4096: a multiple of 16, as most sizes of a ResNet are), constexprs as given."""
    args = {}
    for name in fn.arg_names:
        if name in constexprs:
            args[name] = constexprs[name]
        elif name.endswith("_ptr"):
            args[name] = Ptr(ptr_dtypes.get(name, default_dtype))
        else:
            args[name] = ints.get(name, 4096)
    return args


def _flags(d: dict, keys) -> str:
    return " ".join(k for k in keys if d.get(k)) or "-"


def conv_layer():
    """(pointer dtypes, sizes, all-off flags) of `_conv_kernel` at a ResNet-50 3x3 layer (56x56, 64 channels,
    batch 256): the specialisation the tables and scripts/prologue_asm.py compile."""
    import torch
    import fusedres.triton.conv_bn_act as TC

    conv_ptrs = {n: torch.float32 for n in ("in_scale_ptr", "in_shift_ptr", "out_scale_ptr", "out_shift_ptr",
                                            "res_scale_ptr", "res_shift_ptr", "sum_ptr", "m2_ptr", "mean_ptr",
                                            "var_ptr")}
    conv_ptrs.update(cnt_ptr=torch.float64, cmean_ptr=torch.float64, cm2_ptr=torch.float64, sem_ptr=torch.int32)
    ints = dict(H=56, W=56, C_in=64, OH=56, OW=56, C_out=64, M=256 * 56 * 56, CIN_G=64, COUT_G=64, stride_h=1,
                stride_w=1, pad_h=1, pad_w=1, dil_h=1, dil_w=1,
                CHUNK_ROWS=TC.stat_chunk_rows(256 * 56 * 56, False))
    none = dict(PROLOGUE=False, IN_RELU=False, OUT_SCALE=False, OUT_SHIFT=False, RESIDUAL=False, RES_AFFINE=False,
                RELU=False, STATS=False, UPCAST=False, IDX64=False, STAT_ROWS=TC.GPU_STAT_ROWS,
                BLOCK_P=TC.GPU_BLOCK_P)
    return conv_ptrs, ints, none


def triton_variants(arch: int):
    """(family, fn, variant label, config label, args, options) for every Triton kernel variant a launch uses."""
    import torch
    import triton.language as tl

    import fusedres.triton.bn_act as T
    import fusedres.triton.conv_bn_act as TC

    f32 = torch.float32
    acc_ptrs = {n: f32 for n in ("cnt_ptr", "mean_ptr", "m2_ptr", "mean_part_ptr", "m2_part_ptr", "var_ptr",
                                 "scale_ptr", "shift_ptr", "mean_b_ptr", "scale_b_ptr", "shift_b_ptr", "sum_g_ptr",
                                 "sum_gx_ptr", "sum_gxb_ptr", "kg_ptr", "kx_ptr", "kc_ptr", "kgb_ptr", "kxb_ptr",
                                 "kcb_ptr", "var_b_ptr", "a0_ptr", "a1_ptr", "a2_ptr", "a3_ptr", "b0_ptr", "b1_ptr",
                                 "b2_ptr", "b3_ptr")}
    acc_ptrs["sem_ptr"] = torch.int32
    acc_ptrs["nbt_ptr"] = torch.int64
    floats = {n: 1e-5 for n in ("eps", "eps_b", "count", "mom_hi", "mom_lo", "unb_hi", "unb_lo")}  # fp32 at launch
    # bn_act: Triton's default 4 warps / 3 stages unless the launcher sets them; the tiles it picks for C >= 64
    for dtype, cl in itertools.product((torch.bfloat16, torch.float32), (False, True)):
        dname = str(dtype).split(".")[1]
        base = dict(CL=cl, ACC=tl.float32, IDX64=False)
        tile = dict(base, BLOCK_R=T.TILE_ELEMENTS // 64, BLOCK_C=64)
        layout = "NHWC" if cl else "NCHW"
        fin = dict(PARAMS=True, HAS_W=True, HAS_B=True, RUNNING=1, COUNT=True)  # bn_stats
        yield ("reduction", T._stats_partial_kernel, f"{dname} {layout}", "R64xC64",
               launch_args(T._stats_partial_kernel, dict(acc_ptrs, out_mean_ptr=f32, out_var_ptr=f32, w_ptr=f32,
                                                         b_ptr=f32, rm_ptr=f32, rv_ptr=f32), floats,
                           dict(tile, **fin), dtype), {})
        for res_mode in (0, 1, 2):
            flags = dict(base, RES_MODE=res_mode, RELU=True)
            label = f"{dname} {layout} res_mode={res_mode} relu"
            yield ("elementwise", T._apply_kernel, label, "BLOCK=1024",
                   launch_args(T._apply_kernel, acc_ptrs, {}, dict(flags, BLOCK=1024), dtype), {})
            yield ("reduction", T._bwd_reduce_kernel, label, "R64xC64",
                   launch_args(T._bwd_reduce_kernel, acc_ptrs, floats,
                               dict(tile, RES_MODE=res_mode, RELU=True, WRITE_DRES=res_mode == 1, FINALIZE=True,
                                    MODE_A=1, MODE_B=1 if res_mode == 2 else 0, TRAINING=True), dtype),
                   dict(num_warps=T.reduce_warps(res_mode) if hasattr(T, "reduce_warps") else 4))
            yield ("elementwise", T._bwd_apply_kernel, label, "BLOCK=1024",
                   launch_args(T._bwd_apply_kernel, acc_ptrs, {}, dict(flags, BLOCK=1024), dtype), {})
    yield ("finalize", T._stats_finalize_kernel, "float32", "C64",
           launch_args(T._stats_finalize_kernel, {"nbt_ptr": torch.int64}, floats, dict(ACC=tl.float32, BLOCK_C=64),
                       f32), {})

    # conv_bn_act at a ResNet-50 3x3 layer's sizes (56x56, 64 channels, batch 256): every config of this
    # architecture's autotune list and the heuristic (untuned) one with conv mode's inner-conv options in bf16
    # (prologue + statistics: the most registers); fold's block tail (bf16) and conv mode in fp32/tf32 with the
    # first config
    conv_ptrs, ints, none = conv_layer()
    conv_mode = dict(none, PROLOGUE=True, IN_RELU=True, STATS=True)
    fold_tail = dict(none, OUT_SCALE=True, OUT_SHIFT=True, RESIDUAL=True, RES_AFFINE=True, RELU=True)
    keys = ("PROLOGUE", "STATS", "OUT_SCALE", "RESIDUAL", "RES_AFFINE", "RELU", "PACKED")
    configs = [c.all_kwargs() for c in TC.configs_for(arch // 10)]
    heuristic = [TC.heuristic_config(64, 64, 3, 3), TC.heuristic_config(256, 256, 3, 3)]
    runs = [(torch.bfloat16, "ieee", conv_mode, cfg) for cfg in configs + [h for h in heuristic if h not in configs]]
    runs += [(torch.bfloat16, "ieee", fold_tail, configs[0]), (torch.float32, "tf32", conv_mode, configs[0])]
    for dtype, prec, flags, kw in runs:
        dname = str(dtype).split(".")[1]
        consts = dict(flags, KH=3, KW=3, PRECISION=prec, REG_A=TC.reg_a(dtype, arch // 10),
                      **TC.conv_constexprs(kw, ints["CIN_G"], 3, 3))
        label = TC.config_label(kw) + (" (heuristic)" if kw not in configs else "")
        yield ("conv", TC._conv_kernel, f"{dname} {prec} 3x3 {_flags(consts, keys)}", label,
               launch_args(TC._conv_kernel, conv_ptrs, ints, consts, dtype),
               dict(num_warps=kw["num_warps"], num_stages=kw["num_stages"]))
    # the stem (7x7, C_in=3, stride 2, the packed small-C_in path) with the heuristic config
    stem = dict(ints, H=224, W=224, C_in=3, OH=112, OW=112, M=256 * 112 * 112, CIN_G=3, stride_h=2, stride_w=2,
                pad_h=3, pad_w=3, CHUNK_ROWS=TC.stat_chunk_rows(256 * 112 * 112, False))
    kw = TC.heuristic_config(3, 64, 7, 7)
    consts = dict(none, STATS=True, KH=7, KW=7, PRECISION="ieee", REG_A=TC.reg_a(torch.bfloat16, arch // 10),
                  **TC.conv_constexprs(kw, 3, 7, 7))
    yield ("conv", TC._conv_kernel, f"bfloat16 ieee 7x7 stem {_flags(consts, keys)}",
           TC.config_label(kw) + " (heuristic)",
           launch_args(TC._conv_kernel, conv_ptrs, stem, consts, torch.bfloat16),
           dict(num_warps=kw["num_warps"], num_stages=kw["num_stages"]))


def _triton_row(arch: int, index: int) -> Row:
    from triton.backends.compiler import GPUTarget

    family, fn, variant, config, args, options = list(triton_variants(arch))[index]
    try:
        kernel = compile_launch(fn, GPUTarget("cuda", arch, 32), args, options)
    except Exception as exc:
        raise RuntimeError(f"sm_{arch} {fn.__name__} {variant} {config}: {exc}") from exc
    res = next(iter(run_ptxas(kernel.asm["ptx"], arch).values()))
    warps = kernel.metadata.num_warps
    return Row("triton", family, fn.__name__, variant, f"{config} w{warps} s{options.get('num_stages', 3)}", arch,
               warps, res["regs"], res["spill_stores"], res["spill_loads"], res["stack"],
               kernel.metadata.shared + res["smem"])


def triton_rows(arch: int, jobs: int) -> list[Row]:
    """Compile every variant, `jobs` processes at a time."""
    n = len(list(triton_variants(arch)))
    if jobs <= 1:
        return [_triton_row(arch, i) for i in range(n)]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_triton_row, [arch] * n, range(n)))


# --------------------------------------------------------------------------------------------------- CUDA
def _demangle(names: list[str]) -> list[str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool:
        return names
    done = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    return done.stdout.splitlines() if done.returncode == 0 else names


def cuda_rows(arch: int) -> list[Row]:
    nvcc = str(Path(shutil.which("nvcc") or os.environ.get("CUDA_HOME", "/usr/local/cuda") + "/bin/nvcc").resolve())
    rows = []
    for src in sorted((ROOT / "csrc").glob("*.cu")):
        with tempfile.TemporaryDirectory() as tmp:
            ptx = Path(tmp, "k.ptx")
            # the build's own flags (CMakeLists.txt): --fmad=false changes register allocation
            subprocess.run([nvcc, "-O3", "--fmad=false", "-std=c++17", f"-arch=compute_{arch}", "-ptx", "-I", str(ROOT / "csrc"),
                            str(src), "-o", str(ptx)], check=True, capture_output=True, text=True)
            text = ptx.read_text()
        threads = {}
        for m in re.finditer(r"\.entry (\S+)\(.*?\)\s*(\.maxntid (\d+), (\d+), (\d+))?", text, re.S):
            threads[m.group(1)] = int(m.group(3)) * int(m.group(4)) * int(m.group(5)) if m.group(2) else 0
        res = run_ptxas(text, arch, str(Path(nvcc).with_name("ptxas")), opts=())
        names = sorted(res)
        for mangled, pretty in zip(names, _demangle(names)):
            r = res[mangled]
            block = threads.get(mangled, 0)
            if not block:
                raise RuntimeError(f"{pretty}: no __launch_bounds__, so its block size is unknown")
            base = pretty.split("(")[0].split("<")[0].split(" ")[-1]
            tmpl = pretty[len(pretty.split("<")[0]):].split("(")[0] if "<" in pretty.split("(")[0] else ""
            family = "finalize" if "finalize" in base else "cuda"
            rows.append(Row("cuda", family, f"{src.name}: {base}", tmpl or "-", f"{block} threads", arch,
                            -(-block // 32), r["regs"], r["spill_stores"], r["spill_loads"], r["stack"], r["smem"]))
    return rows


# ---------------------------------------------------------------------------------------------------- table
def collect(only: str | None = None, jobs: int = 1) -> list[Row]:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled")
    rows = []
    for arch in (90, 80):
        if only in (None, "triton"):
            rows += triton_rows(arch, jobs)
        if only in (None, "cuda"):
            rows += cuda_rows(arch)
    return rows


def markdown(rows: list[Row]) -> str:
    import torch
    import triton

    lines = [
        "# Kernel resources (generated by `python scripts/kernel_resources.py`; do not edit by hand)",
        "",
        f"Compiled offline (no GPU): Triton {triton.__version__}, torch {torch.__version__}, its bundled ptxas for "
        "the Triton kernels, nvcc + ptxas for `csrc/*.cu`. Each Triton kernel is bound by Triton's own launch-time "
        "specialiser (16-byte-aligned pointers, integers divisible by 16 marked so, integers equal to 1 made "
        "constant) with the sizes of a ResNet-50 layer at batch 256, and compiled with the num_warps / num_stages it "
        "launches with: every autotune config of the conv kernel for that architecture. Occupancy is theoretical "
        "(resident warps / 64 per SM) from registers, shared memory and threads per block under NVIDIA's per-SM "
        "limits (sm_90: 64 K registers, 228 KB shared memory, 227 KB per block; sm_80: 164 KB, 163 KB per block; "
        "1 KB reserved per block; registers allocated in units of 256 per warp).",
        "",
        "Budgets, enforced by `tests/test_kernel_resources.py` on every row: no spill (spill stores and loads 0), "
        "shared memory within the per-block limit, and occupancy at least the floor of the kernel's family: "
        + ", ".join(f"{k} {v:.1%}" for k, v in FLOORS.items())
        + " (conv: 8 resident warps, two warpgroups; its GEMM tiles hide latency with num_stages of asynchronous "
        "copies rather than with resident warps). Configs that broke a budget were removed from `CONFIGS` in "
        "`fusedres/triton/conv_bn_act.py` (see the section at the end).",
        "",
        "| backend | arch | kernel | variant | config | regs | spill st/ld (B) | stack (B) | smem (B) | CTAs/SM | "
        "occupancy |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r.backend} | sm_{r.arch} | `{r.kernel}` | {r.variant} | {r.config} | {r.regs} | "
                     f"{r.spill_stores}/{r.spill_loads} | {r.stack} | {r.smem} | {r.ctas} | {r.occupancy:.1%} |")
    bad = [r for r in rows if r.problems()]
    lines += ["", f"Rows over budget: {len(bad)}."]
    lines += [f"- sm_{r.arch} `{r.kernel}` {r.variant} {r.config}: {'; '.join(r.problems())}" for r in bad]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 when a kernel breaks a budget; write nothing")
    ap.add_argument("--only", choices=("triton", "cuda"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "kernels.md"))
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles (default: CPUs)")
    a = ap.parse_args(argv)
    rows = collect(a.only, a.jobs)
    bad = [f"sm_{r.arch} {r.kernel} {r.variant} {r.config}: {'; '.join(r.problems())}" for r in rows if r.problems()]
    if a.check:
        print(f"{len(rows)} kernel variants compiled")
        for b in bad:
            print("BUDGET", b)
        return 1 if bad else 0
    Path(a.out).write_text(markdown(rows))
    print(f"wrote {a.out}: {len(rows)} rows, {len(bad)} over budget")
    for b in bad:
        print("BUDGET", b)
    return 0


if __name__ == "__main__":
    sys.exit(main())
