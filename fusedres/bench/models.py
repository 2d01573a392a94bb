"""Level `models`: whole torchvision ResNets, training-step and inference throughput and peak memory.

Candidates for one model and mode, measured interleaved in one group:
    eager (fp32, contiguous)                          torchvision as most people run it
    eager (bf16 and fp16 AMP, channels_last)          the usual fast recipe
    compile / compile[max-autotune]                   torch.compile: default for train, max-autotune for infer
    fusedres[<backend>]                               fusedres.convert(model), per backend accepting the input
    fusedres[<backend>]+compile[...]                  the converted model under torch.compile
    fusedres[<backend>]+conv                          fusedres.convert(model, mode="conv") (triton / reference:
                                                      the backends of the conv_bn_act kernel); planned for the
                                                      pre-activation models, for others when --impl names it
    fusedres[<backend>]+conv+compile[...]             the same under torch.compile (only when --impl names it)
    eager+cudagraphs, fusedres[<backend>]+cudagraphs  with --cuda-graphs
compile and fusedres candidates run in each --dtype (default bf16; fp32 runs contiguous, others channels_last).
train = forward, cross-entropy, backward, SGD step (GradScaler for fp16); infer = eval forward.
Models: torchvision's ResNets, and with --models the pre-activation preact_resnet164 / preact_resnet1001
(fusedres.preact, 32x32 inputs). Every row carries the call's peak memory; `peak_mem_ratio` (results.py) puts
it against eager's in the same group, so the ResNet-1001 train rows show the memory fusion saves (conv mode:
each BN + ReLU in the next conv's prologue, about half the saved activations).
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fusedres.bench.common import (CIFAR_MODELS, DTYPES, MEMORY_FORMATS, Config, amp, compile_suffix,
                                   convert_model, force_backend, fused_impl, get_convert, keep_impl,
                                   with_backend)
from fusedres.bench.results import make_row
from fusedres.bench.timing import measure

LEVEL = "models"
BASELINE_DTYPES = ("fp32", "bf16", "fp16")
CONV_SUFFIX = "+conv"  # convert(mode="conv"): the Triton conv_bn_act (or its reference) runs every block conv
CONV_BACKENDS = ("triton", "reference")


@dataclass(frozen=True)
class Candidate:
    impl: str
    dtype: str
    memory_format: str
    backend: str | None = None
    compile_mode: str | None = None
    graphs: bool = False
    conv_mode: bool = False


def layout_for(dtype: str) -> str:
    return "contiguous" if dtype == "fp32" else "channels_last"


def compile_mode_for(mode: str, quick: bool) -> str:
    return "max-autotune" if mode == "infer" and not quick else "default"


def conv_mode_for(name: str, cfg: Config) -> bool:
    """Whether a group plans conv-mode candidates: the pre-activation models (their memory row), and any model
    when an --impl pattern names a '+conv' impl (a whole torchvision ResNet autotunes every conv shape)."""
    return name in CIFAR_MODELS or any(CONV_SUFFIX in p for p in cfg.impls)


def plan(cfg: Config, mode: str, backends_for, conv: bool = False) -> list[Candidate]:
    """The candidates of one (model, mode) group; backends_for(dtype, memory_format) lists fusedres backends;
    `conv` adds fusedres[<backend>]+conv (convert(mode="conv")) for the conv kernel's backends."""
    cmode = compile_mode_for(mode, cfg.quick)
    out = [Candidate("eager", d, layout_for(d)) for d in BASELINE_DTYPES]
    for d in cfg.dtypes:
        fmt = layout_for(d)
        if d not in BASELINE_DTYPES:
            out.append(Candidate("eager", d, fmt))
        out.append(Candidate(compile_suffix(cmode)[1:], d, fmt, compile_mode=cmode))
        if cfg.cuda_graphs:
            out.append(Candidate("eager+cudagraphs", d, fmt, graphs=True))
        for b in backends_for(d, fmt):
            out.append(Candidate(fused_impl(b), d, fmt, backend=b))
            out.append(Candidate(fused_impl(b, cmode), d, fmt, backend=b, compile_mode=cmode))
            if cfg.cuda_graphs:
                out.append(Candidate(fused_impl(b, graphs=True), d, fmt, backend=b, graphs=True))
            if conv and b in CONV_BACKENDS:
                out.append(Candidate(fused_impl(b) + CONV_SUFFIX, d, fmt, backend=b, conv_mode=True))
                out.append(Candidate(fused_impl(b) + CONV_SUFFIX + compile_suffix(cmode), d, fmt, backend=b,
                                     conv_mode=True, compile_mode=cmode))
    seen, kept = set(), []
    for c in out:
        if (c.impl, c.dtype) not in seen and keep_impl(c.impl, LEVEL, cfg.impls):
            seen.add((c.impl, c.dtype))
            kept.append(c)
    return kept


def build_model(name: str, num_classes: int = 1000) -> torch.nn.Module:
    """The stock model: torchvision's, or for the pre-activation names fusedres.preact's unconverted network."""
    if name.startswith("preact_resnet"):
        from fusedres import models

        return getattr(models, name)(num_classes=num_classes, fused=False)
    import torchvision

    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


def image_size_for(name: str, cfg: Config) -> int:
    """CIFAR models run at their own 32x32; every other model at cfg.image_size."""
    return CIFAR_MODELS.get(name, cfg.image_size)


def _graphed_infer(fwd, x, dtype, device):
    """fwd(x) captured once in a CUDA graph; each call replays it."""
    static_x = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad(), amp(dtype, device, cache_enabled=False):
        for _ in range(3):
            fwd(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad(), amp(dtype, device, cache_enabled=False):
        out = fwd(static_x)

    def replay():
        graph.replay()
        return out
    return replay


def candidate(base: torch.nn.Module, cand: Candidate, mode: str, batch: int, cfg: Config, device,
              image_size: int | None = None):
    """A builder for one candidate: its own model copy, optimizer and inputs (image_size x image_size,
    default cfg.image_size)."""
    size = image_size or cfg.image_size

    def build():
        dtype = DTYPES[cand.dtype]
        memory_format = MEMORY_FORMATS[cand.memory_format]
        model = copy.deepcopy(base).to(device=device, memory_format=memory_format)
        if cand.backend is not None:
            model = convert_model(model, functools.partial(get_convert(), mode="conv") if cand.conv_mode else None)
        model.train(mode == "train")
        x = torch.randn(batch, 3, size, size, device=device).contiguous(
            memory_format=memory_format)
        fwd = model if cand.compile_mode is None else torch.compile(model, mode=cand.compile_mode)
        if mode == "infer":
            if cand.graphs:
                with force_backend(cand.backend):
                    fwd = _graphed_infer(fwd, x, dtype, device)
                return with_backend(cand.backend, fwd)

            def infer():
                with torch.inference_mode(), amp(dtype, device):
                    return fwd(x)
            return with_backend(cand.backend, infer)
        labels = torch.randint(0, cfg.num_classes, (batch,), device=device)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
        if cand.graphs:
            with force_backend(cand.backend), amp(dtype, device, cache_enabled=False):
                fwd = torch.cuda.make_graphed_callables(model, (x,))

        def train_step():
            with amp(dtype, device, cache_enabled=not cand.graphs):
                loss = F.cross_entropy(fwd(x), labels)
            if scaler is None:
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            opt.zero_grad(set_to_none=True)
        return with_backend(cand.backend, train_step)
    return build


def groups(cfg: Config) -> list[tuple[str, str]]:
    return [(name, mode) for name in cfg.models for mode in cfg.model_modes]


def run(cfg: Config, device, timer, bar=None, on_group=None) -> list[dict]:
    import fusedres

    def backends_for(dtype: str, fmt: str) -> list[str]:
        probe = torch.empty(2, 8, 4, 4, device=device, dtype=DTYPES[dtype]).contiguous(
            memory_format=MEMORY_FORMATS[fmt])
        return fusedres.available_backends(probe)

    rows = []
    base, base_name = None, None
    for name, mode in groups(cfg):
        if bar is not None:
            bar.set_description(f"{name} {mode}")
        if base_name != name:
            base, base_name = build_model(name, cfg.num_classes), name
        cands = plan(cfg, mode, backends_for, conv=conv_mode_for(name, cfg))
        size = image_size_for(name, cfg)
        results = measure({c.impl + "@" + c.dtype: candidate(base, c, mode, cfg.batch, cfg, device, size)
                           for c in cands}, timer, repeats=cfg.repeats, warmup=cfg.warmup,
                          target_ms=cfg.target_ms, max_iters=cfg.max_iters, memory=True)
        for c in cands:
            m = results[c.impl + "@" + c.dtype]
            m.impl = c.impl
            ips = None if m.ms is None else cfg.batch * 1e3 / m.ms
            rows.append(make_row(LEVEL, name, mode, c.impl, c.dtype, c.memory_format, cfg.batch, m,
                                 img_per_s=ips))
        del results
        timer.recover()
        if on_group is not None:
            on_group(rows)
        if bar is not None:
            bar.update()
    return rows
