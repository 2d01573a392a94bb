"""Benchmark: the fused Triton conv (`fusedres.conv_bn_act`) per ResNet-50 layer against cuDNN conv + separate
BN / add / ReLU (eager, channels_last), and a folded ResNet-50 against torch.compile(mode="max-autotune") of
the stock model. Writes JSON and markdown to benchmarks/results/conv_bn_act-<time>.{json,md}.

    python benchmarks/conv_bn_act.py                       # batch 256, bf16, every layer, inference epilogues
    python benchmarks/conv_bn_act.py --stats               # also: raw conv + BN statistics vs conv + var_mean
    python benchmarks/conv_bn_act.py --model               # also: folded ResNet-50 vs max-autotune stock
    python benchmarks/conv_bn_act.py --smoke               # CPU/interpreter: tiny shapes, checks the harness only

Timing: triton.testing.do_bench (median, L2 flushed between calls). TFLOP/s counts 2*MACs of the conv.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Layer:
    name: str
    c_in: int
    c_out: int
    k: int
    stride: int
    size: int          # input H = W
    epilogue: str      # "bn_relu", "bn_add_relu" (identity residual), "bn" (projection shortcut)

    @property
    def out_size(self) -> int:
        return (self.size + 2 * (self.k // 2) - self.k) // self.stride + 1

    def flops(self, batch: int) -> int:
        return 2 * batch * self.out_size ** 2 * self.c_out * self.c_in * self.k * self.k


def resnet50_layers() -> list[Layer]:
    """The distinct conv shapes of ResNet-50 v1.5 at 224x224, with the epilogue each gets when folded."""
    layers = [Layer("stem 7x7/2", 3, 64, 7, 2, 224, "bn_relu")]
    inplanes = 64
    for stage, (width, size) in enumerate(((64, 56), (128, 56), (256, 28), (512, 14)), start=1):
        stride = 1 if stage == 1 else 2
        out = width * 4
        half = size // stride
        layers += [
            Layer(f"layer{stage}.0.conv1 1x1", inplanes, width, 1, 1, size, "bn_relu"),
            Layer(f"layer{stage}.0.conv2 3x3/{stride}", width, width, 3, stride, size, "bn_relu"),
            Layer(f"layer{stage}.0.conv3 1x1 +res", width, out, 1, 1, half, "bn_add_relu"),
            Layer(f"layer{stage}.0.downsample 1x1/{stride}", inplanes, out, 1, stride, size, "bn"),
            Layer(f"layer{stage}.1.conv1 1x1", out, width, 1, 1, half, "bn_relu"),
        ]
        if stride == 2:
            layers.append(Layer(f"layer{stage}.1.conv2 3x3", width, width, 3, 1, half, "bn_relu"))
        inplanes = out
    return layers


def _inputs(layer: Layer, batch: int, dtype, device):
    cl = torch.channels_last
    x = torch.randn(batch, layer.c_in, layer.size, layer.size, device=device, dtype=dtype).contiguous(
        memory_format=cl)
    w = (torch.randn(layer.c_out, layer.c_in, layer.k, layer.k, device=device, dtype=dtype)
         / (layer.c_in * layer.k * layer.k) ** 0.5).contiguous(memory_format=cl)
    o = layer.out_size
    r = torch.randn(batch, layer.c_out, o, o, device=device, dtype=dtype).contiguous(memory_format=cl)
    bn = dict(running_mean=torch.randn(layer.c_out, device=device) * 0.1,
              running_var=torch.rand(layer.c_out, device=device) + 0.5,
              weight=torch.rand(layer.c_out, device=device) + 0.5, bias=torch.randn(layer.c_out, device=device))
    scale = bn["weight"] * torch.rsqrt(bn["running_var"] + 1e-5)
    shift = bn["bias"] - bn["running_mean"] * scale
    return x, w, r, bn, scale, shift


def _candidates(layer: Layer, batch: int, dtype, device, stats: bool):
    import fusedres

    x, w, r, bn, scale, shift = _inputs(layer, batch, dtype, device)
    pad = layer.k // 2
    res = layer.epilogue == "bn_add_relu"
    relu = layer.epilogue != "bn"

    def eager():
        y = F.conv2d(x, w, None, layer.stride, pad)
        y = F.batch_norm(y, bn["running_mean"], bn["running_var"], bn["weight"].to(dtype), bn["bias"].to(dtype),
                         False, 0.0, 1e-5)
        if res:
            y = y + r
        return torch.relu(y) if relu else y

    def fused():
        return fusedres.conv_bn_act(x, w, stride=layer.stride, padding=pad, out_scale=scale, out_shift=shift,
                                    residual=r if res else None, relu=relu)

    out = {"cudnn+eager": eager, "fused": fused}
    if stats:
        out["cudnn conv+var_mean"] = lambda: torch.var_mean(F.conv2d(x, w, None, layer.stride, pad).float(),
                                                            dim=(0, 2, 3), unbiased=False)
        out["fused conv+stats"] = lambda: fusedres.conv_bn_act(x, w, stride=layer.stride, padding=pad,
                                                               stats=True)
    return out, (eager, fused)


def _time(fn, device) -> float:
    if device.type != "cuda":
        t = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t)
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100))


def bench_layers(layers, batch, dtype, device, stats: bool) -> list[dict]:
    rows = []
    for layer in layers:
        cands, (eager, fused) = _candidates(layer, batch, dtype, device, stats)
        with torch.no_grad():
            ref, got = eager(), fused()
            err = ((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1)).item()
            for impl, fn in cands.items():
                fn()  # compile / autotune outside the timing
                ms = _time(fn, device)
                rows.append(dict(layer=layer.name, impl=impl, ms=ms, tflops=layer.flops(batch) / ms / 1e9,
                                 max_rel_err=err if impl == "fused" else None, **asdict(layer)))
                print(f"{layer.name:32s} {impl:22s} {ms:8.3f} ms {rows[-1]['tflops']:7.1f} TFLOP/s", flush=True)
    return rows


def bench_model(batch, dtype, device) -> list[dict]:
    import torchvision

    import fusedres

    model = torchvision.models.resnet50().to(device=device, dtype=dtype).eval().to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    folded = fusedres.fold(model)
    compiled = torch.compile(model, mode="max-autotune")
    rows = []
    with torch.no_grad():
        for impl, fn in (("eager", model), ("compile max-autotune", compiled), ("fusedres.fold", folded)):
            fn(x)
            ms = _time(lambda: fn(x), device)
            rows.append(dict(layer="resnet50 inference", impl=impl, ms=ms, img_per_s=batch / ms * 1e3))
            print(f"resnet50 {impl:24s} {ms:8.2f} ms {batch / ms * 1e3:9.0f} img/s", flush=True)
    return rows


def _markdown(rows, meta) -> str:
    lines = [f"# conv_bn_act benchmark — {meta['device']}, batch {meta['batch']}, {meta['dtype']}", "",
             "| layer | impl | ms | TFLOP/s | img/s |", "|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['impl']} | {r['ms']:.3f} | {r.get('tflops', 0) or 0:.1f} | "
                     f"{r.get('img_per_s', 0) or 0:.0f} |")
    per_layer = {}
    for r in rows:
        if r["impl"] in ("fused", "cudnn+eager"):
            per_layer.setdefault(r["layer"], {})[r["impl"]] = r["ms"]
    wins = [v["fused"] < v["cudnn+eager"] for v in per_layer.values() if len(v) == 2]
    if wins:
        lines += ["", f"fused faster than cuDNN + eager epilogue on {sum(wins)}/{len(wins)} layers "
                      f"({100 * sum(wins) / len(wins):.0f} %; target 80 %)"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--layers", default="", help="substring filter on layer names")
    p.add_argument("--stats", action="store_true", help="also time conv + BN statistics (training forward)")
    p.add_argument("--model", action="store_true", help="also time a folded ResNet-50 vs max-autotune")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (interpreter): harness check only")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    layers = [l for l in resnet50_layers() if args.layers in l.name]
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        device = torch.device("cpu")
        batch, dtype = 1, torch.float32
        layers = [Layer(l.name, max(3, l.c_in // 64), max(4, l.c_out // 64), l.k, l.stride, 8, l.epilogue)
                  for l in layers[:4]]
    elif not torch.cuda.is_available():
        print("no CUDA device: nothing to time (use --smoke to check the harness on CPU)")
        return 0
    else:
        device, batch = torch.device("cuda"), args.batch
    rows = bench_layers(layers, batch, dtype, device, args.stats)
    if args.model and device.type == "cuda":
        rows += bench_model(batch, dtype, device)
    meta = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter smoke)",
                batch=batch, dtype=str(dtype).replace("torch.", ""), torch=torch.__version__,
                time=time.strftime("%Y-%m-%dT%H:%M:%S"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"conv_bn_act-{time.strftime('%Y%m%d-%H%M%S')}{'-smoke' if args.smoke else ''}"
    stem.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    stem.with_suffix(".md").write_text(_markdown(rows, meta))
    print(f"wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
