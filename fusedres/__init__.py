"""fusedres: fused BatchNorm + residual add + ReLU kernels (Triton, CUDA) and drop-in ResNet blocks.

The public names load on first use (PEP 562), all together, so `python -m fusedres.bench --help` parses its
arguments without importing torch, while `import fusedres` followed by any public name behaves as an eager
import (every op registered).
"""
import sys as _sys
import types as _types

__version__ = "0.1.0"
# public name -> the module it comes from (ops, nn and models are the subpackages themselves)
_SOURCES = {
    "ops": "fusedres.ops", "nn": "fusedres.nn", "models": "fusedres.models",
    "bn_act": "fusedres.ops", "dual_bn_act": "fusedres.ops",
    "use_backend": "fusedres.backends", "available_backends": "fusedres.backends",
    "not_supported_reasons": "fusedres.backends", "poison_outputs": "fusedres._layout",
    "convert": "fusedres.convert", "unconvert": "fusedres.convert", "explain": "fusedres.convert",
    "conv_bn_act": "fusedres.ops.conv_bn_act", "scale_shift_act": "fusedres.ops.scale_shift_act",
    "fold": "fusedres.fold", "tune": "fusedres.autotune",
}
__all__ = list(_SOURCES)
_SUBPACKAGES = ("ops", "nn", "models")


class _Package(_types.ModuleType):
    def __setattr__(self, name, value):
        if name in _SOURCES and name not in _SUBPACKAGES and isinstance(value, _types.ModuleType):
            return  # importing fusedres.convert / fusedres.fold must not hide the functions of those names
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    if name not in _SOURCES:
        raise AttributeError(f"module 'fusedres' has no attribute {name!r}")
    import importlib

    modules = {src: importlib.import_module(src) for src in dict.fromkeys(_SOURCES.values())}
    for key, src in _SOURCES.items():  # after every import: loading fusedres.fold sets fusedres.fold to the module
        globals()[key] = modules[src] if src == f"fusedres.{key}" and key in _SUBPACKAGES \
            else getattr(modules[src], key)
    return globals()[name]


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
