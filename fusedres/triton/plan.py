"""Count, without a GPU, the distinct Triton compilations a run asks for.

Inside `Plan(...)` every `*_kernel` of the fusedres.triton modules records each launch instead of running it:
the kernel, its constexprs, num_warps / num_stages, and the specialisation Triton gives the other arguments at
launch (dtype and 16-byte alignment of tensors; integers equal to 1, divisible by 16, or neither, unless the
kernel opts out with `do_not_specialize`; 32- or 64-bit). A distinct record is one compilation. The conv
launcher behaves as on a GPU of compute capability `major`: with `autotune` it launches every candidate config
`prune_configs` keeps for a new tune key (what timing would compile), else the heuristic config.
"""
from __future__ import annotations

import importlib

import torch

_MODULES = ("fusedres.triton.bn_act", "fusedres.triton.conv_bn_act")


def _spec(name, value, no_spec):
    if isinstance(value, torch.Tensor):
        return (str(value.dtype), value.data_ptr() % 16 == 0)
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        width = "i32" if -2**31 <= value < 2**31 else "i64"
        if name in no_spec:
            return width
        return (width, "1" if value == 1 else "D" if value % 16 == 0 else "")
    if isinstance(value, float):
        return "fp32"
    return repr(value)


class _Recorder:
    def __init__(self, plan, fn, name):
        self.plan, self.fn, self.name = plan, fn, name
        self.arg_names = list(getattr(fn, "arg_names", None) or fn.fn.__code__.co_varnames[:fn.fn.__code__.co_argcount])
        # the kernel's own opt-outs: a JITFunction's attribute, an InterpretedFunction's decorator kwargs
        dns = getattr(fn, "do_not_specialize", None) or getattr(fn, "kwargs", {}).get("do_not_specialize") or ()
        self.no_spec = {self.arg_names[a] if isinstance(a, int) else a for a in dns}

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            no_spec = self.no_spec
            opts = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
            named = dict(zip(self.arg_names, args))
            spec = tuple((k, _spec(k, v, no_spec)) for k, v in named.items())
            consts = tuple(sorted((k, repr(v)) for k, v in kwargs.items()))
            warps_stages = (opts.get("num_warps", 4), opts.get("num_stages", 3))
            self.plan.compiles.add((self.name, spec, consts, warps_stages))
            self.plan.launches += 1
        return launch


class Plan:
    """Context manager: count compilations (`compiles`, a set of records; `launches`) instead of running
    kernels. `major`: the simulated GPU's compute capability major; `smem`: its shared memory per block;
    `autotune`: whether the conv kernel is tuned (else its heuristic config)."""

    def __init__(self, major: int = 9, smem: int = 227 * 1024, autotune: bool = True):
        self.major, self.smem = major, smem
        self.choice = "autotune" if autotune else "heuristic"
        self.compiles: set = set()
        self.launches = 0
        self.tuned: dict = {}
        self._saved: list = []

    def tune(self, key, candidates, launch):
        """What autotuning compiles for a new key: every candidate; the first stands in for the winner."""
        if key not in self.tuned:
            for cfg in candidates:
                launch(cfg)
            self.tuned[key] = candidates[0]
        return self.tuned[key]

    def count(self, kernel: str | None = None) -> int:
        return sum(1 for c in self.compiles if kernel is None or c[0] == kernel)

    def __enter__(self):
        for modname in _MODULES:
            mod = importlib.import_module(modname)
            for name in list(vars(mod)):
                obj = getattr(mod, name)
                if name.endswith("_kernel") and hasattr(obj, "__getitem__") and hasattr(obj, "fn"):
                    self._saved.append((mod, name, obj))
                    setattr(mod, name, _Recorder(self, obj, name))
        conv = importlib.import_module("fusedres.triton.conv_bn_act")
        self._saved.append((conv, "_PLAN", conv._PLAN))
        conv._PLAN = self
        return self

    def __exit__(self, *exc):
        for mod, name, obj in reversed(self._saved):
            setattr(mod, name, obj)
        self._saved.clear()
