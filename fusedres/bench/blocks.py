"""Level `blocks`: single torchvision ResNet blocks, stock vs `fusedres.convert`-ed, eager and compiled.

Modes: fwd = training-mode forward (autograd recording), train = forward + backward (grads of input and
parameters), and on request (--modes infer) infer = eval forward under inference_mode. Low-precision dtypes
run the AMP recipe (fp32 parameters, autocast).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from fusedres._layout import memory_format_of
from fusedres.bench.common import (DTYPES, MEMORY_FORMATS, Config, amp, backend_of, convert_model, dtype_name,
                                   fused_impl, keep_impl, with_backend)
from fusedres.bench.results import make_row
from fusedres.bench.timing import measure

LEVEL = "blocks"


@dataclass(frozen=True)
class BlockSpec:
    kind: str  # "basic" or "bottleneck"
    inplanes: int
    planes: int
    size: int
    stride: int = 1
    downsample: bool = False

    @property
    def name(self) -> str:
        kind = "BasicBlock" if self.kind == "basic" else "Bottleneck"
        out = self.planes * (1 if self.kind == "basic" else 4)
        tail = f"->{out}x{self.size // self.stride}x{self.size // self.stride}" if self.downsample else ""
        return f"{kind}{'+downsample' if self.downsample else ''} {self.inplanes}x{self.size}x{self.size}{tail}"

    def build(self) -> nn.Module:
        from torchvision.models.resnet import BasicBlock, Bottleneck

        cls = BasicBlock if self.kind == "basic" else Bottleneck
        downsample = None
        if self.downsample:
            out = self.planes * cls.expansion
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, out, 1, stride=self.stride, bias=False),
                                       nn.BatchNorm2d(out))
        return cls(self.inplanes, self.planes, stride=self.stride, downsample=downsample)


# ResNet-18 layer1 block; ResNet-50 layer1.1 (identity shortcut); ResNet-50 layer2.0 (projection shortcut).
DEFAULT_BLOCKS = (BlockSpec("basic", 64, 64, 56),
                  BlockSpec("bottleneck", 256, 64, 56),
                  BlockSpec("bottleneck", 256, 128, 56, stride=2, downsample=True))


def impl_names(backends: list[str]) -> list[str]:
    return ["eager", "compile"] + [n for b in backends for n in (fused_impl(b), fused_impl(b, "default"))]


def candidate(base: nn.Module, impl: str, mode: str, x: torch.Tensor, dtype, device):
    """A builder: its own copy of the block, converted and/or compiled as `impl` says, run in `mode`."""
    def build():
        block = nn.Sequential(copy.deepcopy(base)).to(device=device, memory_format=memory_format_of(x))
        backend = backend_of(impl)
        if backend is not None:
            block = convert_model(block)
        block.train(mode != "infer")
        if impl.endswith("compile"):
            block = torch.compile(block)
        if mode == "infer":
            def call():
                with torch.inference_mode(), amp(dtype, device):
                    return block(x)
            return with_backend(backend, call)
        xg = x.detach().clone().requires_grad_(True)
        params = [p for p in block.parameters() if p.requires_grad]
        if mode == "fwd":
            def call():
                with amp(dtype, device):
                    return block(xg)
            return with_backend(backend, call)
        grad = None

        def step():
            nonlocal grad
            with amp(dtype, device):
                y = block(xg)
            if grad is None:
                grad = torch.randn_like(y)
            return torch.autograd.grad(y, [xg] + params, grad)
        return with_backend(backend, step)
    return build


def groups(cfg: Config):
    specs = cfg.block_specs or list(DEFAULT_BLOCKS)
    return [(spec, dtype, fmt, mode) for spec in specs for dtype in cfg.dtypes for fmt in cfg.memory_formats
            for mode in cfg.block_modes]


def run(cfg: Config, device, timer, bar=None, on_group=None) -> list[dict]:
    import fusedres

    rows = []
    bases: dict[BlockSpec, nn.Module] = {}
    for spec, dtype_key, fmt, mode in groups(cfg):
        if bar is not None:
            bar.set_description(f"{spec.name} {mode} {dtype_key} {fmt}")
        dtype = DTYPES[dtype_key]
        memory_format = MEMORY_FORMATS[fmt]
        base = bases.setdefault(spec, spec.build())
        x = torch.randn(cfg.batch, spec.inplanes, spec.size, spec.size, device=device).contiguous(
            memory_format=memory_format)
        probe = x.to(dtype)
        backends = fusedres.available_backends(probe)
        impls = [i for i in impl_names(backends) if keep_impl(i, LEVEL, cfg.impls)]
        results = measure({i: candidate(base, i, mode, x, dtype, device) for i in impls}, timer,
                          repeats=cfg.repeats, warmup=cfg.warmup, target_ms=cfg.target_ms,
                          max_iters=cfg.max_iters, memory=True)
        for impl, m in results.items():
            rows.append(make_row(LEVEL, spec.name, mode, impl, dtype_name(dtype), fmt, cfg.batch, m))
        del results, x, probe
        timer.recover()
        if on_group is not None:
            on_group(rows)
        if bar is not None:
            bar.update()
    return rows
