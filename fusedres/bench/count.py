"""Level `count`: what one training step and one inference forward cost, counted without running a kernel.

The model runs on fake tensors (`FakeTensorMode`: shapes, dtypes and layouts, no data) under a dispatch mode
that sees every aten op, and every fused op's own implementation with it: a `fusedres::*` op runs its real
Python body (backend choice, per-channel torch glue, launcher) on the fake tensors, and only the kernel launches
themselves are intercepted (Triton kernels of fusedres/triton/*.py, the `fusedres._C` entries of
fusedres/cuda.py), each counted with the traffic its launcher declares (fusedres.bench.traffic). So:

* launches: every aten compute op is one launch (ZERO_LAUNCH_OPS: views, metadata, allocation and no-op
  casts count zero), every kernel a launcher starts is one;
* bytes: aten ops move their distinct inputs and outputs once; kernels move what their launcher declares;
* FLOPs: torch.utils.flop_counter's formulas (a fused conv counts as its convolution);
* saved bytes: the distinct storages autograd keeps for backward (saved_tensors_hooks), and a modeled peak:
  the model's own tensors plus the most bytes alive at once during the step;
* a modeled time on a named GPU (GPU_SPECS): per launch max(bytes / bandwidth, FLOPs / peak) + a launch
  overhead. Modeled, not measured: these rows never carry a time (`ms` stays None).

`count_model(model, x, ...)` is the API (tests and CI call it); `run(args)` is the CLI level.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import time
import warnings
import weakref
from collections import Counter as _Tally
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from fusedres.bench import traffic

LEVEL = "count"
MODELED = "modeled, not measured"


@dataclass(frozen=True)
class GpuSpec:
    """Datasheet numbers (dense, no sparsity) and a per-launch overhead (launch latency and tail), all assumed."""
    name: str
    hbm_gbps: float
    bf16_tflops: float
    tf32_tflops: float
    launch_us: float
    sms: int


GPU_SPECS = {
    "H100 SXM": GpuSpec("H100 SXM", hbm_gbps=3350, bf16_tflops=989, tf32_tflops=494, launch_us=4.0, sms=132),
    "H200": GpuSpec("H200", hbm_gbps=4800, bf16_tflops=989, tf32_tflops=494, launch_us=4.0, sms=132),
    "A100": GpuSpec("A100 SXM 80GB", hbm_gbps=2039, bf16_tflops=312, tf32_tflops=156, launch_us=4.0, sms=108),
}
DEFAULT_GPU = "H200"

# aten ops that launch nothing: views and metadata, allocation without initialisation, device queries.
ZERO_LAUNCH_OPS = frozenset({
    "view", "_unsafe_view", "reshape", "_reshape_alias", "as_strided", "expand", "expand_as", "permute", "t",
    "transpose", "squeeze", "unsqueeze", "detach", "alias", "slice", "select", "split", "split_with_sizes",
    "unbind", "chunk", "narrow", "view_as", "lift_fresh", "lift_fresh_copy", "empty", "empty_like",
    "empty_strided", "new_empty", "new_empty_strided", "set_", "resize_", "sym_size", "sym_stride", "sym_numel",
    "sym_storage_offset", "is_same_size", "_has_compatible_shallow_copy_type", "is_contiguous", "stride", "size",
    "dim", "device", "_local_scalar_dense", "as_strided_", "squeeze_", "unsqueeze_", "t_", "transpose_", "detach_",
})
LOW_PRECISION = (torch.bfloat16, torch.float16)
# in-place ops that overwrite their first argument without reading it (and *_like ops read nothing)
OVERWRITE_OPS = frozenset({"copy_", "fill_", "zero_", "_foreach_copy_", "_foreach_zero_"})


@dataclass
class Launch:
    """One kernel launch: an aten op or a kernel started by a fused op's launcher."""
    name: str
    kind: str          # "aten", "triton" or "cuda"
    phase: str         # "fwd", "bwd" or "opt"
    category: str      # traffic.CATEGORIES
    bytes: int
    flops: int
    low_precision: bool
    inside: str | None = None   # the fused op it ran in
    detail: dict | None = None  # kernels, when asked for: the bound arguments

    def modeled_s(self, spec: GpuSpec) -> float:
        peak = (spec.bf16_tflops if self.low_precision else spec.tf32_tflops) * 1e12
        return max(self.bytes / (spec.hbm_gbps * 1e9), self.flops / peak) + spec.launch_us * 1e-6


@dataclass
class Count:
    """The launches of one traced call and what autograd saved; summaries per phase."""
    launches: list[Launch] = field(default_factory=list)
    saved_bytes: int = 0
    resident_bytes: int = 0
    peak_live_bytes: int = 0
    batch: int = 1

    def of(self, *phases) -> list[Launch]:
        return [ln for ln in self.launches if not phases or ln.phase in phases]

    def summary(self, spec: GpuSpec | str = DEFAULT_GPU, phases=("fwd", "bwd")) -> dict:
        spec = GPU_SPECS[spec] if isinstance(spec, str) else spec
        sel = self.of(*phases)
        s = sum(ln.modeled_s(spec) for ln in sel)
        by_cat = {c: sum(ln.bytes for ln in sel if ln.category == c) for c in traffic.CATEGORIES}
        return {
            "launches": len(sel),
            "bytes": sum(ln.bytes for ln in sel),
            "flops": sum(ln.flops for ln in sel),
            "launches_by_kind": dict(_Tally(ln.kind for ln in sel)),
            "launches_by_category": {c: sum(1 for ln in sel if ln.category == c) for c in traffic.CATEGORIES},
            "bytes_by_category": by_cat,
            "modeled_ms": s * 1e3,
            "modeled_img_per_s": self.batch / s if s > 0 else None,
            "gpu_spec": spec.name,
        }

    @property
    def modeled_peak_bytes(self) -> int:
        return self.resident_bytes + self.peak_live_bytes


# ------------------------------------------------------------------------------------------------ the mode
def _tensors(tree) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_leaves

    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]


# ops that update their running statistics (arguments 3 and 4) in training without saying so in their schema
UNANNOTATED_WRITES = frozenset({"native_batch_norm", "cudnn_batch_norm", "miopen_batch_norm"})


def _written(func, args, kwargs) -> list[torch.Tensor]:
    """The arguments an op writes in place (self of add_, running statistics of a training batch norm)."""
    if func.overloadpacket.__name__ in UNANNOTATED_WRITES and len(args) > 5 and args[5]:
        return _tensors(args[3:5])
    out = []
    for i, a in enumerate(func._schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            v = args[i] if i < len(args) else kwargs.get(a.name)
            out += _tensors(v)
    return out


@functools.cache
def _flop_registry():
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False).flop_registry


def _is_alias(func, inputs, outputs) -> bool:
    """A non-mutating op whose every output is (a view of) one of its inputs: `to` / `contiguous` no-ops."""
    if func._schema.is_mutable or not outputs:
        return False
    storages = {t.untyped_storage()._cdata for t in inputs}
    return all(t.untyped_storage()._cdata in storages for t in outputs)


def launches_kernel(func, inputs, outputs) -> bool:
    """Whether an aten op is a launch: not in ZERO_LAUNCH_OPS, not a prim, not an alias of its input."""
    if func.namespace == "prim" or func.overloadpacket.__name__ in ZERO_LAUNCH_OPS:
        return False
    return not _is_alias(func, inputs, outputs)


class Counter(TorchDispatchMode):
    """Records every launch of the code run inside it (see the module docstring); fused ops run their own
    implementation inside it, their kernels go to `kernel(...)` through the interceptors."""

    def __init__(self, keep_detail: bool = False):
        super().__init__()
        self.launches: list[Launch] = []
        self.phase = "fwd"
        self.inside: list[str] = []
        self.keep_detail = keep_detail
        self.live = 0
        self.peak = 0
        self._alive: dict[int, int] = {}

    # memory: every storage an op creates is alive until its last tensor dies
    def _track(self, outputs, inputs):
        old = {t.untyped_storage()._cdata for t in inputs}
        for t in outputs:
            s = t.untyped_storage()
            key = s._cdata
            if key in old or key in self._alive:
                continue
            self._alive[key] = s.nbytes()
            self.live += s.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(s, self._free, key)

    def _free(self, key):
        self.live -= self._alive.pop(key, 0)

    def reset_peak(self):
        self.peak = self.live

    def kernel(self, name, kind, reads, writes, flops=0, detail=None):
        tensors = [e[0] if isinstance(e, tuple) else e for e in list(reads) + list(writes)]
        tensors = [t for t in tensors if t is not None]
        nbytes = traffic.declared_bytes(reads) + traffic.declared_bytes(writes)
        low = any(t.dtype in LOW_PRECISION for t in tensors)
        cat = "convolution" if flops else "bn_add_relu" if any(t.dim() >= 4 for t in tensors) else "glue"
        self.launches.append(Launch(name, kind, self.phase, cat, nbytes, int(flops), low,
                                    self.inside[-1] if self.inside else None,
                                    detail if self.keep_detail else None))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "fusedres":
            return self._fused(func, args, kwargs)
        out = func(*args, **kwargs)
        inputs, outputs = _tensors((args, kwargs)), _tensors(out) + _written(func, args, kwargs)
        self._track(outputs, inputs)
        if launches_kernel(func, inputs, outputs):
            name = func.overloadpacket.__name__
            formula = _flop_registry().get(func.overloadpacket)
            flops = int(formula(*args, **kwargs, out_val=out)) if formula is not None else 0
            reads = [] if name.endswith("_like") else _tensors((args[1:], kwargs)) if name in OVERWRITE_OPS \
                else inputs
            nbytes = traffic.op_bytes(reads, outputs) + traffic.reread_bytes(name, args)
            low = any(t.dtype in LOW_PRECISION for t in inputs) if inputs else \
                any(t.dtype in LOW_PRECISION for t in outputs)
            cat = traffic.category(name, inputs + outputs, flops, inside_fused=bool(self.inside))
            self.launches.append(Launch(name, "aten", self.phase, cat, nbytes, flops, low,
                                        self.inside[-1] if self.inside else None))
        return out

    def _fused(self, func, args, kwargs):
        from torch._library.custom_ops import OPDEFS

        opdef = OPDEFS[func._schema.name]
        self.inside.append(func._schema.name.split("::")[-1])
        try:
            with self:
                return opdef._init_fn(*args, **kwargs)
        finally:
            self.inside.pop()


# ------------------------------------------------------------------------------------------------ kernels
def _kernel_objects(module):
    from triton.runtime.jit import KernelInterface

    return {name: obj for name, obj in vars(module).items() if isinstance(obj, KernelInterface)}


class _TritonLaunch:
    """Stands in for one @triton.jit kernel of a launcher module: records each launch with its declared traffic,
    then runs it (`run(kernel, grid, args, kwargs, launch)`) or not (run=None: fake tensors)."""

    def __init__(self, counter, module, name, kernel, run):
        self.counter, self.module, self.name, self.kernel, self.run = counter, module, name, kernel, run
        self.signature = inspect.signature(kernel.fn)

    def __call__(self, *args, **kwargs):  # a @triton.jit helper called from inside an interpreted kernel
        return self.kernel(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.kernel, name)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            declare = getattr(self.module, "TRAFFIC", {}).get(self.name)
            if declare is None:
                raise RuntimeError(f"{self.module.__name__}.{self.name} was launched but has no entry in "
                                   f"{self.module.__name__}.TRAFFIC: declare what it reads and writes")
            params = self.signature.parameters  # launch options (num_warps, num_stages, ...) are not arguments
            a = self.signature.bind_partial(*args, **{k: v for k, v in kwargs.items() if k in params}).arguments
            reads, writes = declare(a)
            flops_of = getattr(self.module, "FLOPS", {}).get(self.name)
            detail = {"args": a, "reads": reads, "writes": writes, "grid": grid}
            self.counter.kernel(self.name, "triton", reads, writes, flops_of(a) if flops_of else 0, detail)
            if self.run is not None:  # the interpreter's own copies are not launches
                from torch.utils._python_dispatch import _disable_current_modes

                with _disable_current_modes():
                    self.run(self.kernel, grid, args, kwargs, self.counter.launches[-1])
        return launch


class _CudaExtension:
    """Stands in for `fusedres._C`: each entry call records the kernels fusedres.cuda.KERNELS declares for it,
    with the pointers resolved to the tensors they came from (`pointers`)."""

    def __init__(self, counter, pointers, real):
        self._counter, self._pointers, self._real = counter, pointers, real

    def reduce_splits(self, n, c, hw, channels_last, elem_size, sm_count):
        if self._real is not None:
            return self._real.reduce_splits(n, c, hw, channels_last, elem_size, sm_count)
        return 1

    def __getattr__(self, entry):
        from fusedres import cuda

        declare = cuda.KERNELS.get(entry)
        if declare is None:
            raise RuntimeError(f"fusedres._C.{entry} was called but fusedres.cuda.KERNELS does not declare it")
        signature = inspect.signature(declare)

        def call(*args):
            resolved = [[self._pointers.resolve(v) for v in a] if isinstance(a, list) else self._pointers.resolve(a)
                        for a in args]  # a list argument: pointers (backward_finalize's outputs)
            bound = signature.bind(*resolved).arguments
            for kernel, reads, writes in declare(*resolved):
                self._counter.kernel(kernel, "cuda", reads, writes, 0, {"entry": entry, "args": bound,
                                                                      "reads": reads, "writes": writes})
        return call


class _Pointers:
    """Tensor.data_ptr() during a CUDA-backend count: a distinct fake address per live tensor memory, resolvable
    back to the tensor (weakly: the count must not keep activations alive)."""
    BASE = 1 << 44

    def __init__(self):
        self._by_key, self._tensors, self._next = {}, weakref.WeakValueDictionary(), 0

    def address(self, t) -> int:
        key = traffic.storage_key(t)
        addr = self._by_key.get(key)
        if addr is None or addr not in self._tensors:  # new, or the memory was freed and reused
            self._next += 1
            addr = self._by_key[key] = self.BASE + 256 * self._next
        self._tensors[addr] = t
        return addr

    def resolve(self, a):
        if isinstance(a, bool) or not isinstance(a, int):
            return a
        if a == 0:
            return None
        return self._tensors.get(a, a)


@contextlib.contextmanager
def _patched(obj, **attrs):
    old = {k: getattr(obj, k) for k in attrs}
    for k, v in attrs.items():
        setattr(obj, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(obj, k, v)


@contextlib.contextmanager
def intercept(counter: Counter, backend: str, run=None, spec: GpuSpec | None = None,
              gpu_geometry: bool | None = None):
    """Route the fused ops' kernel launches to `counter`, backend `backend` ('cuda' or 'triton') forced.

    Triton kernels are recorded and then executed by `run` (None: not executed, for fake tensors). The CUDA
    extension is replaced by a recorder, so CUDA-backend launchers run on any device (their kernels never
    execute). gpu_geometry (default: when nothing runs) gives the Triton conv the GPU's statistics row groups
    (the size of its partials) instead of the interpreter's."""
    from fusedres.bench.common import force_backend
    from fusedres.triton import bn_act as tbn
    from fusedres.triton import conv_bn_act as tconv

    spec = spec or GPU_SPECS[DEFAULT_GPU]
    stack = contextlib.ExitStack()
    with stack:
        for module in (tbn, tconv):
            kernels = {name: _TritonLaunch(counter, module, name, k, run)
                       for name, k in _kernel_objects(module).items()}
            stack.enter_context(_patched(module, _INTERPRET=True, **kernels))
        if run is None if gpu_geometry is None else gpu_geometry:
            stack.enter_context(_patched(tconv, INTERPRET_STAT_ROWS=tconv.GPU_STAT_ROWS,  # the GPU's partials and
                                         INTERPRET_MERGE_CHUNKS=tconv.MERGE_CHUNKS,  # statistics chunks
                                         INTERPRET_CHUNK_UNIT=tconv.CHUNK_UNIT))
        if backend == "cuda":
            from fusedres import cuda

            real = cuda._load()
            pointers = _Pointers()
            ext = _CudaExtension(counter, pointers, None if isinstance(real, ImportError) else real)
            stack.enter_context(_patched(
                cuda, _load=lambda: ext, not_supported_reasons=lambda x: [], _sm_count=lambda index: spec.sms,
                _launch=lambda ext_, x: (tuple(x.shape), x.dtype, x.is_contiguous(memory_format=torch.channels_last))))
            stack.enter_context(_patched(torch.Tensor, data_ptr=lambda t: pointers.address(t)))
        stack.enter_context(force_backend(backend))
        yield


# ------------------------------------------------------------------------------------------------ model runs
def _fake_state(model, fake_mode):
    """Fake copies of the model's parameters (leaves requiring grad as before) and buffers, by name."""
    state = {}
    for name, p in model.named_parameters():
        f = fake_mode.from_tensor(p.detach())
        state[name] = f.requires_grad_(p.requires_grad)
    for name, b in model.named_buffers():
        state[name] = fake_mode.from_tensor(b)
    return state


def _default_loss(out):
    if out.dim() == 2:
        return F.cross_entropy(out, torch.zeros(out.shape[0], dtype=torch.long))
    return out.sum()


def _storage_keys(tensors) -> set:
    return {t.untyped_storage()._cdata for t in tensors}


def count_model(model: torch.nn.Module, x: torch.Tensor, *, mode: str = "train", backend: str = "cuda",
                amp_dtype: torch.dtype | None = None, optimizer: bool = True, loss=None,
                spec: GpuSpec | str = DEFAULT_GPU, keep_detail: bool = False) -> Count:
    """Count one step of `model` on an input shaped like `x` (its shape, dtype and memory format; the data is
    never read) without running a kernel.

    mode "train": forward, `loss(output)` (default: cross-entropy against labels for a [N, classes] output,
    else the sum), backward, with launches in phases "fwd" and "bwd", then (optimizer=True) the second step of
    SGD with momentum (foreach, as on a GPU) in phase "opt". mode "infer": an eval-mode forward under no_grad.
    `amp_dtype` runs under torch.autocast (CPU autocast: the fake tensors are CPU tensors). Fused ops run on `backend`
    ('cuda' or 'triton'; the conv kernel is Triton on both). The model is not modified (its tensors are
    swapped for fake copies through torch.func.functional_call); its train/eval flag is restored."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    spec = GPU_SPECS[spec] if isinstance(spec, str) else spec
    if mode not in ("train", "infer"):
        raise ValueError(f"count_model: mode must be 'train' or 'infer', got {mode!r}")
    if backend not in ("cuda", "triton"):
        raise ValueError(f"count_model: backend must be 'cuda' or 'triton', got {backend!r}")
    fake_mode = FakeTensorMode(allow_non_fake_inputs=False)
    state = _fake_state(model, fake_mode)
    fx = fake_mode.from_tensor(x)
    own = _storage_keys(list(state.values()) + [fx])
    result = Count(batch=x.shape[0])
    result.resident_bytes = sum(t.untyped_storage().nbytes() for t in
                                {t.untyped_storage()._cdata: t for t in list(state.values()) + [fx]}.values())
    counter = Counter(keep_detail=keep_detail)
    saved = {}

    def pack(t):
        s = t.untyped_storage()
        if s._cdata not in own:
            saved[s._cdata] = s.nbytes()
        return t

    was_training = model.training
    amp = torch.autocast("cpu", dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    try:
        model.train(mode == "train")
        with fake_mode, intercept(counter, backend, spec=spec):
            if mode == "infer":
                with torch.no_grad(), counter, amp:
                    torch.func.functional_call(model, state, (fx,))
            else:
                with counter:
                    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), amp:
                        out = torch.func.functional_call(model, state, (fx,))
                        value = (loss or _default_loss)(out)
                    counter.phase = "bwd"
                    value.backward()
                    del out, value
                result.saved_bytes = sum(saved.values())
                if optimizer:
                    params = [t for t in state.values() if t.requires_grad and t.grad is not None]
                    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, foreach=True)
                    opt.step()  # creates the momentum buffers; the counted step is a steady-state one
                    counter.phase = "opt"
                    with counter:
                        opt.step()
                    del opt, params
        result.launches = counter.launches
        result.peak_live_bytes = counter.peak
    finally:
        model.train(was_training)
    return result


# ------------------------------------------------------------------------------------------------ impls
@dataclass(frozen=True)
class Impl:
    name: str
    dtype: str
    memory_format: str
    backend: str | None = None   # None: stock
    variant: str = "bn"          # "bn", "conv" or "fold"

    @property
    def modes(self) -> tuple[str, ...]:
        return ("infer",) if self.variant == "fold" else ("train", "infer")


def plan(dtype: str, patterns: tuple[str, ...] = ()) -> list[Impl]:
    """stock fp32 NCHW, stock `dtype` channels_last + autocast, fusedres bn / conv / folded-inference on the
    backend --impl names (patterns over the impl names; default: the cuda backend, what a GPU runs)."""
    from fusedres.bench.common import glob_match

    out = [Impl("eager", "fp32", "contiguous"), Impl("eager", dtype, "channels_last")]
    for b in ("cuda", "triton"):
        out += [Impl(f"fusedres[{b}]", dtype, "channels_last", b, "bn"),
                Impl(f"fusedres[{b}]+conv", dtype, "channels_last", b, "conv"),
                Impl(f"fusedres[{b}]+fold", dtype, "channels_last", b, "fold")]
    if patterns:
        return [i for i in out if any(glob_match(i.name, p) for p in patterns)]
    return [i for i in out if i.backend != "triton"]


def build(base: torch.nn.Module, impl: Impl) -> torch.nn.Module:
    """The model one impl runs: stock, fusedres.convert (bn or conv mode) or fusedres.fold."""
    import fusedres

    model = copy.deepcopy(base)
    if impl.memory_format == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    if impl.variant == "fold":
        model.eval()
        with warnings.catch_warnings():  # a model fold cannot change is reported by applies(), not warned about
            warnings.simplefilter("ignore", UserWarning)
            return fusedres.fold(fusedres.convert(model))
    if impl.backend is not None:
        model = fusedres.convert(model, mode=impl.variant)
    return model


VARIANT_MODULES = {"conv": ("fusedres.nn.conv_blocks", "fusedres.nn.preact_conv"), "fold": ("fusedres.nn.conv",)}


def applies(model: torch.nn.Module, impl: Impl) -> bool:
    """Whether conversion changed something for this variant (conv mode and fold skip blocks they do not know,
    e.g. timm's: such a row would repeat bn mode's under another name)."""
    wanted = VARIANT_MODULES.get(impl.variant)
    if impl.backend is None or wanted is None:
        return True
    return any(type(m).__module__ in wanted for m in model.modules())


def build_model(name: str, num_classes: int = 1000) -> torch.nn.Module:
    """torchvision / fusedres.preact models by name, timm models as 'timm/<name>'."""
    if name.startswith("timm/"):
        import timm

        return timm.create_model(name[len("timm/"):], pretrained=False, num_classes=num_classes)
    from fusedres.bench.models import build_model as tv

    return tv(name, num_classes)


def count_rows(name: str, base: torch.nn.Module, impls, batch: int, size: int, spec: GpuSpec,
               log=None) -> list[dict]:
    """One row per (impl, mode): the count fields of fusedres.bench.results rows, level 'count'."""
    from fusedres.bench.common import DTYPES, MEMORY_FORMATS
    from fusedres.bench.results import make_row

    rows = []
    for impl in impls:
        model = None
        for mode in impl.modes:
            t0 = time.perf_counter()
            try:
                if model is None:
                    model = build(base, impl)
                    if not applies(model, impl):
                        if log is not None:
                            log(f"  {name} {impl.name}: not applicable (no block of this model has that form)")
                        break
                x = torch.empty(batch, 3, size, size).contiguous(memory_format=MEMORY_FORMATS[impl.memory_format])
                amp = DTYPES[impl.dtype] if impl.dtype != "fp32" else None
                c = count_model(model, x, mode=mode, backend=impl.backend or "cuda", amp_dtype=amp, spec=spec)
            except Exception as exc:  # one impl that cannot be counted is reported; the others still are
                from fusedres.bench.common import describe_error

                rows.append(make_row(LEVEL, name, mode, impl.name, impl.dtype, impl.memory_format, batch,
                                     error=describe_error(exc, 1000), note=MODELED))
                continue
            s = c.summary(spec)
            extra = dict(s, saved_bytes=c.saved_bytes if mode == "train" else 0,
                         modeled_peak_bytes=c.modeled_peak_bytes, image_size=size, note=MODELED,
                         count_s=round(time.perf_counter() - t0, 2))
            if mode == "train":
                extra["phases"] = {p: c.summary(spec, (p,)) for p in ("fwd", "bwd", "opt")}
            rows.append(make_row(LEVEL, name, mode, impl.name, impl.dtype, impl.memory_format, batch, **extra))
            if log is not None:
                log(f"  {name} {mode} {impl.name} {impl.dtype}: {s['launches']} launches, "
                    f"{s['bytes'] / 1e9:.1f} GB, {extra['count_s']:.1f} s to count")
    return rows


# ------------------------------------------------------------------------------------------------ minimum
def minimum(model: torch.nn.Module, x: torch.Tensor, amp_dtype=None, spec: GpuSpec | str = DEFAULT_GPU) -> dict:
    """The traffic floor of one training step: every convolution (its BN, add and ReLU fused into it) reads its
    input and weights and writes its output once in the forward; the backward reads the output gradient and the
    input and writes the input gradient (not for the first layer) and the weight gradient once. Modeled time:
    per layer and direction max(bytes / bandwidth, FLOPs / peak) + one launch overhead."""
    spec = GPU_SPECS[spec] if isinstance(spec, str) else spec
    convs = _conv_shapes(model, x, amp_dtype)
    total, seconds, flops = 0, 0.0, 0
    peak = (spec.bf16_tflops if amp_dtype in LOW_PRECISION else spec.tf32_tflops) * 1e12
    for i, (act_in, act_out, weight, f) in enumerate(convs):
        fwd = act_in + weight + act_out
        bwd = act_out + act_in + weight + (act_in if i else 0) + weight
        total += fwd + bwd
        flops += 3 * f
        seconds += max(fwd / (spec.hbm_gbps * 1e9), f / peak) + max(bwd / (spec.hbm_gbps * 1e9), 2 * f / peak)
        seconds += 2 * spec.launch_us * 1e-6
    return {"bytes": total, "flops": flops, "layers": len(convs), "modeled_ms": seconds * 1e3,
            "modeled_img_per_s": x.shape[0] / seconds, "gpu_spec": spec.name}


def _conv_shapes(model, x, amp_dtype):
    """(input bytes, output bytes, weight bytes, forward FLOPs) of every convolution in a stock forward."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import conv_flop_count

    fake_mode = FakeTensorMode()
    state = _fake_state(model, fake_mode)
    shapes = []

    class Convs(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket.__name__ == "convolution":
                a, w = args[0], args[1]
                shapes.append((traffic.tensor_nbytes(a), traffic.tensor_nbytes(out),
                               w.numel() * a.element_size(),
                               conv_flop_count(list(a.shape), list(w.shape), list(out.shape), transposed=False)))
            return out

    amp = torch.autocast("cpu", dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    was = model.training
    model.train()
    try:
        with fake_mode, torch.no_grad(), Convs(), amp:
            torch.func.functional_call(model, state, (fake_mode.from_tensor(x),))
    finally:
        model.train(was)
    return shapes


# ------------------------------------------------------------------------------------------------ output
def table(rows: list[dict], minimum_row: dict | None = None) -> str:
    """Markdown: launches, GB per step, MB per image, saved GB, modeled img/s (and the minimum, when given)."""
    from fusedres.bench.results import fmt_num, markdown_table

    cells = []
    for r in rows:
        if r.get("level") != LEVEL:
            continue
        if r.get("error"):
            cells.append([r["name"], r["mode"], r["impl"], r["dtype"], r["memory_format"], "error: " + r["error"][:60],
                          "", "", "", "", ""])
            continue
        b = r["batch"]
        cells.append([r["name"], r["mode"], r["impl"], r["dtype"], r["memory_format"], f"{r['launches']:,}",
                      fmt_num(r["bytes"] / 1e9, 3), fmt_num(r["bytes"] / b / 1e6, 3),
                      fmt_num(r["saved_bytes"] / 1e9, 3) if r["mode"] == "train" else "",
                      fmt_num(r["modeled_ms"], 3), fmt_num(r["modeled_img_per_s"], 4)])
    if minimum_row:
        m = minimum_row
        cells.append([m["name"], "train", "minimum (derived)", m["dtype"], "", f"{2 * m['layers']:,}",
                      fmt_num(m["bytes"] / 1e9, 3), fmt_num(m["bytes"] / m["batch"] / 1e6, 3), "",
                      fmt_num(m["modeled_ms"], 3), fmt_num(m["modeled_img_per_s"], 4)])
    spec = next((r.get("gpu_spec") for r in rows if r.get("gpu_spec")), DEFAULT_GPU)
    headers = ["model", "mode", "impl", "dtype", "format", "launches", "GB/step", "MB/image", "saved GB",
               f"modeled ms ({spec})", f"modeled img/s ({spec})"]
    return markdown_table(headers, cells, ["l"] * 5 + ["r"] * 6)


def notes(spec: GpuSpec) -> str:
    return (f"Counted without running a kernel (fake tensors), {MODELED}: launches = aten compute ops + fused "
            f"kernels; GB/step = bytes every launch must move through DRAM (train: forward + backward, optimizer "
            f"apart); saved GB = activations autograd keeps for backward; modeled time on {spec.name} "
            f"({spec.hbm_gbps:g} GB/s, {spec.bf16_tflops:g} bf16 / {spec.tf32_tflops:g} tf32 TFLOP/s dense, "
            f"{spec.launch_us:g} us per launch): sum over launches of max(bytes / bandwidth, FLOPs / peak) + "
            "overhead.")


def plot(rows: list[dict], path, log=print):
    """Stacked bars: bytes per image by category, one bar per (model, mode, impl)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("count: matplotlib is not installed, no plot")
        return None
    rows = [r for r in rows if r.get("level") == LEVEL and not r.get("error")]
    if not rows:
        return None
    labels = [f"{r['name']} {r['mode']}\n{r['impl']} {r['dtype']}" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(2 * max(6, 0.6 * len(rows) + 2), 5.5))
    panels = ((axes[0], "bytes_by_category", lambda r, v: v / r["batch"] / 1e6, "MB per image",
               "DRAM bytes per image by category"),
              (axes[1], "launches_by_category", lambda r, v: v, "launches", "launches by category"))
    for ax, key, scale, ylabel, title in panels:
        bottom = [0.0] * len(rows)
        for cat in traffic.CATEGORIES:
            vals = [scale(r, r[key][cat]) for r in rows]
            ax.bar(range(len(rows)), vals, bottom=bottom, label=traffic.CATEGORY_LABELS[cat])
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title} ({MODELED})", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(args, log=print) -> int:
    """The CLI level: count every --models model for every impl, write <stem>.json / .md / .png under --out."""
    from pathlib import Path

    from fusedres.bench.common import CIFAR_MODELS, describe_error
    from fusedres.bench.env import environment, result_stem
    from fusedres.bench.results import document, write_json

    spec = GPU_SPECS[getattr(args, "gpu", None) or DEFAULT_GPU]
    models = args.models or ("resnet50",)
    batch = args.batch or 256
    dtype = (args.dtype or ("bf16",))[0]
    size_arg = getattr(args, "size", None)
    impls = plan(dtype, tuple(args.impl))
    t0 = time.perf_counter()
    log(f"count level ({MODELED}): {', '.join(models)}, batch {batch}, {dtype}, GPU model {spec.name}")
    rows, minima, errors = [], [], {}
    for name in models:
        size = CIFAR_MODELS.get(name, size_arg or 224)
        try:
            base = build_model(name)
        except Exception as exc:
            errors[name] = describe_error(exc)
            log(f"  {name}: cannot build: {errors[name]}")
            continue
        rows += count_rows(name, base, impls, batch, size, spec, log=log)
        if dtype != "fp32" and not name.startswith("timm/"):
            x = torch.empty(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
            m = minimum(base.to(memory_format=torch.channels_last), x, amp_dtype=DTYPES_LOW[dtype], spec=spec)
            minima.append(dict(m, name=name, batch=batch, dtype=dtype))
    meta = environment()
    meta.update(levels=[LEVEL], note=MODELED, gpu_spec=vars(spec), minimum=minima, count_errors=errors,
                count_seconds=round(time.perf_counter() - t0, 1))
    from fusedres.bench.env import default_out

    out = Path(args.out) if args.out else default_out()
    stem = out / result_stem(meta)
    text = "### count\n\n" + notes(spec) + "\n\n" + "\n\n".join(
        table([r for r in rows if r["name"] == name], next((m for m in minima if m["name"] == name), None))
        for name in dict.fromkeys(r["name"] for r in rows)) + "\n"
    paths = [write_json(document(meta, rows), f"{stem}.json")]
    Path(f"{stem}.md").write_text(text)
    paths.append(Path(f"{stem}.md"))
    if not getattr(args, "no_plots", False):
        p = plot(rows, f"{stem}.png", log=log)
        if p:
            paths.append(Path(p))
    log(text)
    log(f"counted in {time.perf_counter() - t0:.1f} s; results: " + ", ".join(str(p) for p in paths))
    return 1 if errors or any(r.get("error") for r in rows) else 0


DTYPES_LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}
