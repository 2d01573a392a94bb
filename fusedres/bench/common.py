"""Vocabulary shared by the benchmark levels: dtype and layout names, impl names, backend forcing, filters."""
from __future__ import annotations

import contextlib
import os
import re
import sys
from dataclasses import dataclass, field

import torch

from fusedres.bench.vocab import CIFAR_MODELS, EXTRA_MODELS, LEVELS, MODELS  # noqa: F401  (re-exported)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
# The reference backend is the fallback, not a contender: whole blocks and models only run it when asked.
DEFAULT_EXCLUDE = {"kernels": (), "blocks": ("fusedres[reference]*",),
                   "models": ("fusedres[reference]*", "*+conv+compile*")}


@dataclass
class Config:
    """Everything a level needs to know about the run (the CLI fills it; tests build small ones)."""
    batch: int = 128
    dtypes: tuple[str, ...] = ("bf16",)
    memory_formats: tuple[str, ...] = ("channels_last",)
    models: tuple[str, ...] = MODELS
    impls: tuple[str, ...] = ()
    repeats: int = 10
    warmup: int = 3
    quick: bool = False
    cuda_graphs: bool = False
    target_ms: float = 25.0
    max_iters: int = 200
    image_size: int = 224
    num_classes: int = 1000
    kernel_modes: tuple[str, ...] = ("fwd", "bwd", "infer")
    block_modes: tuple[str, ...] = ("fwd", "train")
    model_modes: tuple[str, ...] = ("train", "infer")
    kernel_specs: list | None = None
    block_specs: list | None = None
    extra: dict = field(default_factory=dict)


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    return str(dtype).replace("torch.", "")


def fused_impl(backend: str, compile_mode: str | None = None, graphs: bool = False) -> str:
    """The impl name of fusedres on `backend`, optionally under torch.compile or CUDA graphs."""
    return "fusedres[" + backend + "]" + compile_suffix(compile_mode) + ("+cudagraphs" if graphs else "")


def compile_suffix(compile_mode: str | None) -> str:
    if compile_mode is None:
        return ""
    return "+compile" if compile_mode == "default" else f"+compile[{compile_mode}]"


def backend_of(impl: str) -> str | None:
    """'triton' for 'fusedres[triton]+compile'; None for impls that are not fusedres."""
    if not impl.startswith("fusedres["):
        return None
    return impl[len("fusedres["):impl.index("]")]


def glob_match(name: str, pattern: str) -> bool:
    """Shell-style match where only * and ? are wildcards: brackets in impl names are literal."""
    regex = re.escape(pattern).replace(r"\*", ".*").replace(r"\?", ".")
    return re.fullmatch(regex, name) is not None


def keep_impl(impl: str, level: str, patterns: tuple[str, ...]) -> bool:
    """--impl patterns (any may match) when given, else the level's default exclusions."""
    if patterns:
        return any(glob_match(impl, p) for p in patterns)
    return not any(glob_match(impl, p) for p in DEFAULT_EXCLUDE.get(level, ()))


@contextlib.contextmanager
def force_backend(name: str | None):
    """Force a fusedres backend for the ops run inside, backward included.

    The env var covers autograd's device worker threads, where `use_backend`'s context variable is not set.
    """
    import fusedres

    if name is None:
        yield
        return
    old = os.environ.get("FUSEDRES_BACKEND")
    os.environ["FUSEDRES_BACKEND"] = name
    try:
        with fusedres.use_backend(name):
            yield
    finally:
        if old is None:
            os.environ.pop("FUSEDRES_BACKEND", None)
        else:
            os.environ["FUSEDRES_BACKEND"] = old


def with_backend(name: str | None, fn):
    def run():
        with force_backend(name):
            return fn()
    return run


def amp(dtype: torch.dtype, device: torch.device, cache_enabled: bool = True):
    """Autocast to `dtype` (the AMP recipe: fp32 weights, low-precision compute); nothing for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=cache_enabled)


def get_convert():
    """`fusedres.convert(model)` (module or function, whichever the package exposes)."""
    import importlib

    import fusedres

    obj = getattr(fusedres, "convert", None)
    if obj is None or not callable(obj):
        obj = importlib.import_module("fusedres.convert")
    if not callable(obj):
        obj = obj.convert
    return obj


def convert_model(model: torch.nn.Module, convert=None) -> torch.nn.Module:
    """The fused model; raises when conversion replaced nothing, so a no-op is never timed as 'fused'."""
    convert = convert or get_convert()
    out = convert(model)
    out = model if out is None else out
    if not any(type(m).__module__.startswith("fusedres") for m in out.modules()):
        raise RuntimeError("fusedres.convert replaced no module with a fused one")
    return out


def ensure_interpreter() -> bool:
    """Without CUDA, make Triton run kernels in its interpreter on CPU tensors (TRITON_INTERPRET=1).

    Returns False when triton was imported before and the setting cannot take effect any more.
    """
    if torch.cuda.is_available():
        return True
    if "triton" in sys.modules:
        return os.environ.get("TRITON_INTERPRET") == "1"
    os.environ.setdefault("TRITON_INTERPRET", "1")
    return os.environ["TRITON_INTERPRET"] == "1"


def describe_error(exc: BaseException, limit: int = 300) -> str:
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}".strip().rstrip(":")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def raise_recompile_limits() -> None:
    """The harness compiles many shapes of one function; keep dynamo from falling back to eager silently."""
    try:
        import torch._dynamo.config as dynamo_config
    except ImportError:
        return
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                 "accumulated_cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), 512))
