"""Level `kernels`: each fused op on every backend that accepts the input, against PyTorch's own sequence
(`fusedres.reference`, eager and under torch.compile) and a device-to-device copy of the same tensor, on the
shapes where ResNet-50 uses them.

Modes: fwd = training forward (batch statistics, running-stat update), bwd = its backward, infer = eval
forward. Every call is timed on its own after L2 is flushed (see timing.CudaTimer).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fusedres.bench import traffic
from fusedres.bench.common import (DTYPES, MEMORY_FORMATS, Config, backend_of, dtype_name, fused_impl,
                                   keep_impl, with_backend)
from fusedres.bench.results import make_row
from fusedres.bench.timing import measure

LEVEL = "kernels"
COPY = "copy"


@dataclass(frozen=True)
class KernelSpec:
    """One fused op at one place of the network: op 'bn_act' (optionally + residual) or 'dual_bn_act'."""
    op: str
    where: str
    channels: int
    size: int
    residual: bool = False
    relu: bool = True

    @property
    def label(self) -> str:
        if self.op == "dual_bn_act":
            return "dual_bn_act" + ("+relu" if self.relu else "")
        return "bn_act" + ("+add" if self.residual else "") + ("+relu" if self.relu else "")

    @property
    def name(self) -> str:
        return f"{self.label} {self.where} {self.channels}x{self.size}x{self.size}"

    def shape(self, batch: int) -> tuple[int, int, int, int]:
        return (batch, self.channels, self.size, self.size)

    def bytes(self, batch: int, element_size: int, mode: str) -> int:
        if self.op == "dual_bn_act":
            return traffic.dual_bn_act_bytes(self.shape(batch), element_size, mode)
        return traffic.bn_act_bytes(self.shape(batch), element_size, mode, self.residual, self.relu)


def resnet50_specs(quick: bool = False) -> list[KernelSpec]:
    """Where ResNet-50 (224x224 input) runs each fused op: bn1/bn2 + ReLU at the block width, bn3 + identity
    + ReLU and the downsampling block's bn3 + downsample-BN + ReLU at 4x the width; the stem's bn1 + ReLU."""
    stages = [("layer1", 64, 56), ("layer2", 128, 28), ("layer3", 256, 14), ("layer4", 512, 7)]
    if quick:
        stages = [stages[0], stages[2]]
    specs = [] if quick else [KernelSpec("bn_act", "stem", 64, 112)]
    for stage, width, size in stages:
        specs += [KernelSpec("bn_act", stage, width, size),
                  KernelSpec("bn_act", stage, 4 * width, size, residual=True),
                  KernelSpec("dual_bn_act", stage + ".0", 4 * width, size)]
    return specs


def impl_names(backends: list[str]) -> list[str]:
    return [COPY, "pytorch", "pytorch+compile"] + [fused_impl(b) for b in backends]


def _channel_params(c: int, device) -> dict:
    return dict(weight=torch.rand(c, device=device) + 0.5, bias=torch.randn(c, device=device) * 0.1,
                running_mean=torch.zeros(c, device=device), running_var=torch.ones(c, device=device))


class Problem:
    """Inputs of one (spec, mode, dtype, layout), shared by every candidate; each candidate gets its own
    running statistics and, for bwd, its own autograd graph."""

    def __init__(self, spec: KernelSpec, mode: str, batch: int, dtype, memory_format, device):
        self.spec, self.mode = spec, mode
        shape = spec.shape(batch)

        def act():
            return torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=memory_format)

        self.x = act()
        self.r = act() if (spec.residual or spec.op == "dual_bn_act") else None
        self.params = _channel_params(spec.channels, device)
        self.params_r = _channel_params(spec.channels, device) if spec.op == "dual_bn_act" else None
        self.grad = act() if mode == "bwd" else None

    def _fresh(self, p: dict | None, grad: bool) -> dict | None:
        if p is None:
            return None
        out = {k: v.clone() for k, v in p.items()}
        for k in ("weight", "bias"):
            out[k].requires_grad_(grad)
        return out

    def op(self, fn_kind: str):
        """The callable computing the op with fusedres ('fused') or PyTorch's sequence ('pytorch'),
        closed over fresh per-candidate tensors, and the leaves autograd differentiates in bwd."""
        import fusedres
        from fusedres.reference import bn_act_reference, dual_bn_act_reference

        grad = self.mode == "bwd"
        training = self.mode != "infer"
        x = self.x.detach().clone().requires_grad_(grad)
        r = None if self.r is None else self.r.detach().clone().requires_grad_(grad)
        p, pr = self._fresh(self.params, grad), self._fresh(self.params_r, grad)
        relu = self.spec.relu
        if self.spec.op == "dual_bn_act":
            leaves = [x, r, p["weight"], p["bias"], pr["weight"], pr["bias"]]
            if fn_kind == "fused":
                def fn(x, r):
                    return fusedres.ops.dual_bn_act(
                        x, r, weight=p["weight"], bias=p["bias"], running_mean=p["running_mean"],
                        running_var=p["running_var"], momentum=0.1, eps=1e-5, weight_r=pr["weight"],
                        bias_r=pr["bias"], running_mean_r=pr["running_mean"], running_var_r=pr["running_var"],
                        momentum_r=0.1, eps_r=1e-5, training=training, relu=relu)
            else:
                def fn(x, r):
                    return dual_bn_act_reference(x, dict(p, momentum=0.1, eps=1e-5), r,
                                                 dict(pr, momentum=0.1, eps=1e-5), training=training, relu=relu)
        else:
            leaves = [x, p["weight"], p["bias"]] + ([r] if r is not None else [])
            impl = fusedres.ops.bn_act if fn_kind == "fused" else bn_act_reference

            def fn(x, r):
                return impl(x, p["running_mean"], p["running_var"], p["weight"], p["bias"], training, 0.1, 1e-5,
                            residual=r, relu=relu)
        return fn, (x, r), leaves

    def candidate(self, impl: str):
        """A builder for `impl` (see timing.measure)."""
        def build():
            if impl == COPY:
                dst = torch.empty_like(self.x)
                src = self.x
                return lambda: dst.copy_(src)
            backend = backend_of(impl)
            fn, args, leaves = self.op("fused" if backend else "pytorch")
            if impl == "pytorch+compile":
                fn = torch.compile(fn, dynamic=False)
            if self.mode == "infer":
                def call():
                    with torch.no_grad():
                        return fn(*args)
                return with_backend(backend, call)
            if self.mode == "fwd":
                return with_backend(backend, lambda: fn(*args))
            y = with_backend(backend, lambda: fn(*args))()
            grad = self.grad

            def backward():
                return torch.autograd.grad(y, leaves, grad, retain_graph=True)
            return with_backend(backend, backward)
        return build


def groups(cfg: Config) -> list[tuple[KernelSpec, str, str, str]]:
    specs = cfg.kernel_specs or resnet50_specs(cfg.quick)
    return [(spec, dtype, fmt, mode) for spec in specs for dtype in cfg.dtypes for fmt in cfg.memory_formats
            for mode in cfg.kernel_modes]


def run(cfg: Config, device, timer, bar=None, on_group=None) -> list[dict]:
    """Rows for every (spec, dtype, memory format, mode) group; copy rows carry the roofline."""
    import fusedres

    rows = []
    for spec, dtype_key, fmt, mode in groups(cfg):
        dtype = DTYPES[dtype_key]
        if bar is not None:
            bar.set_description(f"{spec.name} {mode} {dtype_key} {fmt}")
        problem = Problem(spec, mode, cfg.batch, dtype, MEMORY_FORMATS[fmt], device)
        backends = fusedres.available_backends(problem.x)
        impls = [i for i in impl_names(backends) if i == COPY or keep_impl(i, LEVEL, cfg.impls)]
        results = measure({i: problem.candidate(i) for i in impls}, timer, repeats=cfg.repeats,
                          warmup=cfg.warmup, target_ms=cfg.target_ms, max_iters=cfg.max_iters)
        element_size = problem.x.element_size()
        shape = list(spec.shape(cfg.batch))
        copy_bytes = traffic.copy_bytes(shape, element_size)
        copy_gbps = traffic.gbps(copy_bytes, results[COPY].ms)
        for impl, m in results.items():
            nbytes = copy_bytes if impl == COPY else spec.bytes(cfg.batch, element_size, mode)
            rate = traffic.gbps(nbytes, m.ms)
            rows.append(make_row(LEVEL, spec.name, mode, impl, dtype_name(dtype), fmt, cfg.batch, m,
                                 gbps=rate, shape=shape, bytes=nbytes, copy_gbps=copy_gbps,
                                 pct_of_copy=None if rate is None or not copy_gbps else 100.0 * rate / copy_gbps))
        del problem, results
        timer.recover()
        if on_group is not None:
            on_group(rows)
        if bar is not None:
            bar.update()
    return rows
