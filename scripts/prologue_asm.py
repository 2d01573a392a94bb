"""Where the conv kernel's prologue-transformed A operand goes on sm_90 (offline, no GPU): compiles
`_conv_kernel` at conv mode (bf16, 3x3, PROLOGUE + IN_RELU + STATS) for each Hopper config and reports the
warp_group_dot's A operand (shared memdesc or registers), shared-memory ops in TTGIR, shared/matrix
instructions and wgmma forms in PTX, and ptxas registers / spills.

    python scripts/prologue_asm.py [--dump DIR] [--config I] [--arch 90] [--flags conv|plain] [--reg-a 0|1]
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def variants(arch, flags_name="conv", reg_a=True):
    import torch
    import fusedres.triton.conv_bn_act as TC
    import kernel_resources as KR
    conv_ptrs, ints, none = KR.conv_layer()
    flags = dict(none, PROLOGUE=True, IN_RELU=True, STATS=True) if flags_name == "conv" else dict(none, STATS=True)
    for kw in [c.all_kwargs() for c in TC.configs_for(arch // 10)]:
        consts = dict(flags, KH=3, KW=3, PRECISION="ieee", REG_A=reg_a, **TC.conv_constexprs(kw, 64, 3, 3))
        yield (TC.config_label(kw) + f" w{kw['num_warps']} s{kw['num_stages']}",
               KR.launch_args(TC._conv_kernel, conv_ptrs, ints, consts, torch.bfloat16),
               dict(num_warps=kw["num_warps"], num_stages=kw["num_stages"]))


def analyse(ttgir: str, ptx: str) -> dict:
    out = {}
    dots = re.findall(r"= ttng\.warp_group_dot (%\S+), (%\S+), .*?: (.*)", ttgir) or \
        re.findall(r"= tt\.dot (%\S+), (%\S+), .*?: (.*)", ttgir)
    forms = []
    for a, b, ty in dots:
        at = ty.split(" * ")[0].strip()
        forms.append("A=shared(memdesc)" if at.startswith("!ttg.memdesc") else "A=registers(" + at[:40] + ")")
    out["dot"] = ("warp_group_dot " if "warp_group_dot" in ttgir else "tt.dot/mma ") + ", ".join(forms)
    for op in ("ttg.local_alloc", "ttg.local_store", "ttg.local_load", "ttg.async_copy_global_to_local",
               "ttg.convert_layout", "ttng.fence_async_shared"):
        out[op.split(".")[-1]] = len(re.findall(re.escape(op) + r"\b", ttgir))
    for ins in ("st.shared", "ld.shared", "stmatrix", "ldmatrix", "cp.async.cg", "cp.async.ca", "fence.proxy.async"):
        out[ins] = len(re.findall(re.escape(ins), ptx))
    loop = _loop_body(ttgir, r"scf\.for ", r"scf\.yield")
    out["loop: local_alloc(src)"] = len(re.findall(r"ttg\.local_alloc %", loop))
    out["loop: local_load->dot_op"] = len(re.findall(r"ttg\.local_load [^\n]*-> tensor<[^\n]*#ttg\.dot_op<\{opIdx = 0", loop))
    out["loop: local_load->other"] = len(re.findall(r"ttg\.local_load ", loop)) - out["loop: local_load->dot_op"]
    body = _ptx_loop(ptx)
    for ins in ("st.shared", "ld.shared", "ldmatrix", "stmatrix", "bar.sync"):
        out["ptx loop: " + ins] = body.count(ins)
    wg = re.findall(r"wgmma\.mma_async\.sync\.aligned\.(\S+)\s+\{[^}]*\},\s*(\{|%rd)", ptx)
    out["wgmma RS"] = sum(1 for _, f in wg if f == "{")
    out["wgmma SS"] = sum(1 for _, f in wg if f == "%rd")
    out["wgmma shapes"] = sorted({s for s, _ in wg})
    return out


def _loop_body(text: str, start: str, end: str) -> str:
    """The text of the (last) loop holding the warp_group_dot / tt.dot."""
    best = ""
    for m in re.finditer(start, text):
        e = re.compile(end).search(text, m.end())
        if e and ("warp_group_dot " in text[m.end():e.start()] or "tt.dot " in text[m.end():e.start()]):
            best = text[m.start():e.end()]
    return best


def _ptx_loop(ptx: str) -> str:
    """The PTX of the loop (label ... back-branch to it) that issues the wgmma / mma instructions."""
    for m in re.finditer(r"^(\$L__BB\d+_\d+):.*Loop Header", ptx, re.M):
        back = re.search(r"bra(\.uni)?\s+" + re.escape(m.group(1)) + ";", ptx[m.end():])
        if back:
            body = ptx[m.start():m.end() + back.end()]
            if "wgmma.mma_async" in body or "mma.sync" in body:
                return body
    return ""


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--config", type=int, default=None)
    p.add_argument("--dump", default=None)
    p.add_argument("--flags", default="conv")
    p.add_argument("--no-ptxas", action="store_true")
    p.add_argument("--reg-a", type=int, default=None, help="REG_A (default: what a launch on --arch uses)")
    a = p.parse_args()
    from triton.backends.compiler import GPUTarget
    import torch
    import fusedres.triton.conv_bn_act as TC
    import kernel_resources as KR
    for i, (label, args, options) in enumerate(variants(a.arch, a.flags, TC.reg_a(torch.bfloat16, a.arch // 10)
                                                                  if a.reg_a is None else bool(a.reg_a))):
        if a.config is not None and i != a.config:
            continue
        k = KR.compile_launch(TC._conv_kernel, GPUTarget("cuda", a.arch, 32), args, options)
        ttgir, ptx = k.asm["ttgir"], k.asm["ptx"]
        if a.dump:
            d = Path(a.dump)
            d.mkdir(parents=True, exist_ok=True)
            for ext in ("ttir", "ttgir", "llir", "ptx"):
                (d / f"conv_{i}.{ext}").write_text(k.asm[ext])
        r = analyse(ttgir, ptx)
        if not a.no_ptxas:
            res = next(iter(KR.run_ptxas(ptx, a.arch).values()))
            r["regs"] = res["regs"]
            r["spill"] = res["spill_stores"] + res["spill_loads"]
            r["smem"] = k.metadata.shared
        print(f"[{i}] sm_{a.arch} {label}: " + "; ".join(f"{k_}={v}" for k_, v in r.items()), flush=True)


if __name__ == "__main__":
    main()
