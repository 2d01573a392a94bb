"""CUDA backend: the hand-written kernels of csrc/ (extension `fusedres._C`) behind the four primitives of
`fusedres.backends` (semantics: `fusedres.reference`).

The extension sees raw device pointers, sizes, a layout flag and the current torch stream only — no torch
headers — so one build serves every torch version. Everything torch-specific happens here: input checks,
layout of the secondary tensors, output and workspace allocation (`fusedres._layout.empty*`, so test poisoning
applies), the stream. Reductions write per-block partials to a workspace and fold them in a fixed order in a
second kernel, or (the fused BatchNorm's statistics and backward, batch_stats) in the last block of the same
kernel to finish its channels: results are deterministic (no float atomics; an integer ticket only picks which
block folds).

`fusedres._C` is imported on first use; when it is missing (no CUDA toolkit at install time) every input is
refused with the reason and the dispatcher falls back to Triton.
"""
from __future__ import annotations

import functools

import torch

from fusedres._counters import counters
from fusedres._layout import dense, empty, empty_like, is_channels_last, memory_format_of

_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # csrc/fr_api.h DType


@functools.cache
def _load():
    """The extension module, or the ImportError that explains why it cannot be used."""
    try:
        from fusedres import _C
    except ImportError as e:  # not built in this installation
        return e
    return _C


def extension():
    """`fusedres._C`, or None when it is not built."""
    ext = _load()
    return None if isinstance(ext, ImportError) else ext


def build_info() -> str:
    """Compiled CUDA runtime and architectures of the extension (or why it is unavailable)."""
    ext = _load()
    return f"not built: {ext}" if isinstance(ext, ImportError) else ext.build_info()


@functools.cache
def _device_reason(index: int) -> str | None:
    """Why the compiled kernels cannot run on GPU `index` (None when they can)."""
    ext = extension()
    return ext.device_unsupported(index) or None


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def not_supported_reasons(x: torch.Tensor) -> list[str]:
    reasons = []
    ext = _load()
    if isinstance(ext, ImportError):
        reasons.append("fusedres._C is not built (install fusedres with a CUDA toolkit to build it)")
    if x.device.type != "cuda":
        reasons.append(f"{x.device.type.upper()} tensor (the CUDA backend runs on CUDA tensors)")
    elif torch.version.hip is not None:
        reasons.append("ROCm device (the CUDA kernels are built for NVIDIA GPUs)")
    elif not reasons:
        why = _device_reason(x.device.index)
        if why:
            reasons.append(why)
    if x.dtype not in _DTYPES:
        reasons.append(f"dtype {str(x.dtype).removeprefix('torch.')} (CUDA kernels: float32, float16, bfloat16)")
    if x.dim() != 4:
        reasons.append(f"{x.dim()}-D input (expected [N, C, H, W])")
    elif not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        reasons.append("x is neither dense NCHW nor dense channels_last")
    if x.numel() == 0:
        reasons.append("empty tensor")
    return reasons


# ------------------------------------------------------------------------------------------------ helpers
def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _like(t: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """An activation (residual, xb, dy) as a dense tensor in x's kernel layout."""
    return dense(t, memory_format_of(x))


def _vec(v: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """A per-channel vector as contiguous float32 on x's device."""
    if v is None:
        return None
    return v.to(device=x.device, dtype=torch.float32).contiguous()


def _launch(ext, x: torch.Tensor):
    n, c, h, w = x.shape
    index = x.device.index
    return ext.Launch(n, c, h * w, is_channels_last(x), _DTYPES[x.dtype], index, _sm_count(index),
                      torch.cuda.current_stream(x.device).cuda_stream)


def _channels(x: torch.Tensor) -> torch.Tensor:
    return empty((x.shape[1],), dtype=torch.float32, device=x.device)


def _workspace(ext, x: torch.Tensor, quantities: int) -> tuple[torch.Tensor, int]:
    """Float32 workspace [quantities, splits, C] for a reduction's per-block partials, and splits."""
    n, c, h, w = x.shape
    splits = ext.reduce_splits(n, c, h * w, is_channels_last(x), x.element_size(), _sm_count(x.device.index))
    return torch.empty(quantities * splits * c, dtype=torch.float32, device=x.device), splits


# The counters of the last-block finalizes (stats_reduce_finalize, backward_reduce_finalize; csrc/fr_cuda.cuh
# last_block_of_column): fusedres/_counters.py says why one zero-filled buffer per (device, stream) suffices.
# Kernels still in flight on the stream keep an outgrown buffer's memory valid (the caching allocator reuses it
# only in that stream's order).
def _semaphore(x: torch.Tensor, n: int) -> torch.Tensor | None:
    """At least n zeroed counters for a launch on x's device and the current stream (fusedres._counters); None
    where nothing runs (not a real CUDA tensor: the launch-counting fakes of fusedres.bench.count)."""
    from torch._subclasses.fake_tensor import is_fake

    if x.device.type != "cuda" or is_fake(x):
        return None
    return counters(x, n)


# ------------------------------------------------------------------------------------------------ primitives
def batch_stats(x: torch.Tensor):
    """Per-channel mean and biased variance (float32) of x [N, C, H, W]: one stats_reduce_finalize launch (the
    statistics kernel's last block per channel tile merges the partials)."""
    ext = _load()
    mean, var = _channels(x), _channels(x)
    ws, splits = _workspace(ext, x, 3)
    sem = _semaphore(x, x.shape[1])
    ext.stats_reduce_finalize(_launch(ext, x), x.data_ptr(), ws.data_ptr(), ws.numel(), splits, mean.data_ptr(),
                              var.data_ptr(), 0, 0, 0.0, 0, 0, 0, 0, 0, 0.0, 1.0, 0, _ptr(sem),
                              0 if sem is None else sem.numel())
    return mean, var


def apply(x, mean, scale, shift, residual, xb, mean_b, scale_b, shift_b, relu):
    """y = act((x - mean) * scale + shift [+ residual | + (xb - mean_b) * scale_b + shift_b]), per channel, in
    x's dtype."""
    ext = _load()
    residual, xb = _like(residual, x), _like(xb, x)
    mean, scale, shift, mean_b, scale_b, shift_b = (_vec(v, x) for v in (mean, scale, shift, mean_b, scale_b,
                                                                         shift_b))
    y = empty_like(x)
    ext.apply(_launch(ext, x), x.data_ptr(), mean.data_ptr(), scale.data_ptr(), shift.data_ptr(), _ptr(residual),
              _ptr(xb), _ptr(mean_b), _ptr(scale_b), _ptr(shift_b), y.data_ptr(), bool(relu))
    return y


def backward_reduce(dy, x, mean, scale, shift, residual, xb, mean_b, scale_b, shift_b, relu, want_grad_residual):
    """g = dy * relu'(z); per channel sum(g), sum(g * (x - mean)) [and for xb]; grad_residual = g."""
    ext = _load()
    dy, residual, xb = _like(dy, x), _like(residual, x), _like(xb, x)
    scale, shift, mean, scale_b, shift_b, mean_b = (_vec(v, x) for v in (scale, shift, mean, scale_b, shift_b,
                                                                         mean_b))
    sum_g, sum_g_xc = _channels(x), _channels(x)
    sum_g_xbc = _channels(x) if xb is not None else None
    grad_residual = empty_like(x) if want_grad_residual else None
    ws, splits = _workspace(ext, x, 3 if xb is not None else 2)
    ext.backward_reduce(_launch(ext, x), dy.data_ptr(), x.data_ptr(), scale.data_ptr(), shift.data_ptr(),
                        mean.data_ptr(), _ptr(residual), _ptr(xb), _ptr(scale_b), _ptr(shift_b), _ptr(mean_b),
                        bool(relu), _ptr(grad_residual), sum_g.data_ptr(), sum_g_xc.data_ptr(), _ptr(sum_g_xbc),
                        ws.data_ptr(), ws.numel(), splits)
    return sum_g, sum_g_xc, sum_g_xbc, grad_residual


def backward_apply(dy, x, mean, scale, shift, residual, xb, mean_b, scale_b, shift_b, relu,
                   k_g, k_x, k_c, k_g_b, k_x_b, k_c_b):
    """dx = k_g * g + k_x * (x - mean) + k_c per channel (and the same for xb with its own coefficients)."""
    ext = _load()
    dy, residual, xb = _like(dy, x), _like(residual, x), _like(xb, x)
    vecs = (_vec(v, x) for v in (scale, shift, scale_b, shift_b, mean, k_g, k_x, k_c, mean_b, k_g_b, k_x_b, k_c_b))
    scale, shift, scale_b, shift_b, mean, k_g, k_x, k_c, mean_b, k_g_b, k_x_b, k_c_b = vecs
    dx = empty_like(x)
    dxb = empty_like(xb) if xb is not None else None
    ext.backward_apply(_launch(ext, x), dy.data_ptr(), x.data_ptr(), _ptr(scale), _ptr(shift), _ptr(residual),
                       _ptr(xb), _ptr(scale_b), _ptr(shift_b), bool(relu), mean.data_ptr(), k_g.data_ptr(),
                       k_x.data_ptr(), k_c.data_ptr(), _ptr(mean_b), _ptr(k_g_b), _ptr(k_x_b), _ptr(k_c_b),
                       dx.data_ptr(), _ptr(dxb))
    return dx, dxb


# ------------------------------------------------------------------------------- fused BatchNorm (2 + 2 launches)
def _f32_buffer(t: torch.Tensor | None) -> bool:
    return t is None or (t.dtype == torch.float32 and t.is_contiguous())


def _finalize(ext, L, x, ws, splits, mean, var, weight, bias, eps, running_mean=None, running_var=None,
              momentum=None, num_batches_tracked=None, increment=None, fused=False):
    """(scale, shift) [and mean, var from the partials when ws is given]; the running statistics are updated in
    the same launch (float32 buffers; others get torch's lerp_) and `increment` (a num_batches_tracked; momentum
    then numeric) gets its one added. One stats_finalize launch, or with `fused` (ws given, not yet written) the
    statistics launch itself: stats_reduce_finalize, whose last block per channel tile does the same work."""
    if increment is not None and momentum is None:
        raise ValueError("fusedres: the finalize increments num_batches_tracked only with a numeric momentum")
    scale, shift = _channels(x), _channels(x)
    weight, bias = _vec(weight, x), _vec(bias, x)
    in_kernel = _f32_buffer(running_mean) and _f32_buffer(running_var)
    count = x.shape[0] * x.shape[2] * x.shape[3]
    unbias = count / (count - 1) if count > 1 else 1.0
    cumulative = running_mean is not None and momentum is None
    params = (mean.data_ptr(), var.data_ptr(), _ptr(weight), _ptr(bias), float(eps), scale.data_ptr(),
              shift.data_ptr(), _ptr(running_mean) if in_kernel else 0, _ptr(running_var) if in_kernel else 0,
              _ptr(num_batches_tracked) if cumulative else 0, float(momentum or 0.0), unbias, _ptr(increment))
    if fused:
        sem = _semaphore(x, x.shape[1])
        ext.stats_reduce_finalize(L, x.data_ptr(), ws.data_ptr(), ws.numel(), splits, *params, _ptr(sem),
                                  0 if sem is None else sem.numel())
    else:
        ext.stats_finalize(L, _ptr(ws), splits, *params)
    if running_mean is not None and not in_kernel:
        factor = momentum if momentum is not None else 1.0 / num_batches_tracked.to(torch.float32)
        with torch.no_grad():
            running_mean.lerp_(mean.to(running_mean.dtype), factor)
            running_var.lerp_((var * unbias).to(running_var.dtype), factor)
    return scale, shift


def bn_stats(x, weight, bias, eps, running_mean, running_var, momentum, num_batches_tracked, increment=None):
    """(mean, biased var, scale, shift) in one launch (stats_reduce_finalize: the statistics kernel, whose last
    block per channel tile merges the partials exactly as stats_finalize would and also updates the running
    statistics: momentum, or 1 / num_batches_tracked read on the device when momentum is None, and adds one to
    `increment`)."""
    ext = _load()
    L = _launch(ext, x)
    mean, var = _channels(x), _channels(x)
    ws, splits = _workspace(ext, x, 3)
    scale, shift = _finalize(ext, L, x, ws, splits, mean, var, weight, bias, eps, running_mean, running_var,
                             momentum, num_batches_tracked, increment, fused=True)
    return mean, var, scale, shift


def bn_params(x, mean, var, weight, bias, eps):
    """(scale, shift) from a given mean and variance (eval): one stats_finalize launch."""
    ext = _load()
    return _finalize(ext, _launch(ext, x), x, None, 0, _vec(mean, x), _vec(var, x), weight, bias, eps)


def bn_finalize(x, mean, var, weight, bias, eps, running_mean, running_var, momentum, num_batches_tracked,
                centred):
    """(scale, shift), running statistics and num_batches_tracked from given batch statistics (conv mode's epilogue
    statistics): the Triton finalize kernel, one launch (the CUDA finalize has no centred form); torch ops where
    Triton is not installed."""
    try:
        from fusedres.triton import bn_act as backend
    except ImportError:
        from fusedres import reference as backend
    return backend.bn_finalize(x, mean, var, weight, bias, eps, running_mean, running_var, momentum,
                               num_batches_tracked, centred)


_SIDE_OUTPUTS = {0: (), 1: (2, 3), 2: (0, 1, 2), 3: (1,)}


def _side(present, var, mean) -> int:
    """backward_finalize's mode of one side (csrc/fr_finalize.h SideMode)."""
    if not present:
        return 0
    return 1 if var is not None else 2 if mean is not None else 3


def backward(dy, x, mean, scale, shift, var, eps, residual, xb, mean_b, scale_b, shift_b, var_b, eps_b, relu,
             training, want_grad_residual):
    """The backward of act(side_a(x) [+ residual | + side_b(xb)]) in two launches: backward_reduce_finalize (the
    reduction, whose last block per channel tile computes the coefficients and parameter gradients exactly as
    backward_finalize would), backward_apply. Same contract as `fusedres.triton.bn_act.backward`."""
    ext = _load()
    L = _launch(ext, x)
    dy, residual, xb = _like(dy, x), _like(residual, x), _like(xb, x)
    mean, scale, shift, var, mean_b, scale_b, shift_b, var_b = (
        _vec(v, x) for v in (mean, scale, shift, var, mean_b, scale_b, shift_b, var_b))
    grad_residual = empty_like(x) if want_grad_residual else None
    ws, splits = _workspace(ext, x, 3 if xb is not None else 2)
    mode_a, mode_b = _side(True, var, mean), _side(xb is not None, var_b, mean_b)
    outs_a = [_channels(x) if i in _SIDE_OUTPUTS[mode_a] or mode_a == 1 else None for i in range(4)]
    outs_b = [_channels(x) if i in _SIDE_OUTPUTS[mode_b] or mode_b == 1 else None for i in range(4)]
    sem = _semaphore(x, x.shape[1])
    ext.backward_reduce_finalize(L, dy.data_ptr(), x.data_ptr(), scale.data_ptr(), shift.data_ptr(),
                                 mean.data_ptr(), _ptr(residual), _ptr(xb), _ptr(scale_b), _ptr(shift_b),
                                 _ptr(mean_b), bool(relu), _ptr(grad_residual), ws.data_ptr(), ws.numel(), splits,
                                 mode_a, mode_b, bool(training), float(x.shape[0] * x.shape[2] * x.shape[3]),
                                 _ptr(var), float(eps), _ptr(var_b), float(eps_b), [_ptr(t) for t in outs_a],
                                 [_ptr(t) for t in outs_b], _ptr(sem), 0 if sem is None else sem.numel())
    dx = empty_like(x)
    dxb = empty_like(xb) if xb is not None else None
    bn_a, bn_b = mode_a == 1, mode_b == 1
    ext.backward_apply(L, dy.data_ptr(), x.data_ptr(), scale.data_ptr(), shift.data_ptr(), _ptr(residual), _ptr(xb),
                       _ptr(scale_b), _ptr(shift_b), bool(relu), mean.data_ptr(), scale.data_ptr(),
                       _ptr(outs_a[0]) if bn_a else 0, _ptr(outs_a[1]) if bn_a else 0, _ptr(mean_b), _ptr(scale_b),
                       _ptr(outs_b[0]) if bn_b else 0, _ptr(outs_b[1]) if bn_b else 0, dx.data_ptr(), _ptr(dxb))
    return (dx, dxb, grad_residual, tuple(outs_a[i] for i in _SIDE_OUTPUTS[mode_a]),
            tuple(outs_b[i] for i in _SIDE_OUTPUTS[mode_b]))


# ------------------------------------------------------------------------------------------------ traffic
# The kernels each `fusedres._C` entry launches (csrc/*.cu: a main kernel, then a finalize kernel for the
# reductions), each as (kernel, reads, writes) from the entry's arguments with pointers resolved to their tensors
# (None for 0): fusedres.bench.count counts launches and bytes from these; tests/test_count.py checks that every
# pointer the wrappers above pass is declared.
def _apply_kernels(launch, x, mean, scale, shift, res, xb, mean_b, scale_b, shift_b, y, relu):
    return [("apply_kernel", [x, mean, scale, shift, res, xb, mean_b, scale_b, shift_b], [y])]


def _bwd_reduce_kernels(launch, dy, x, scale, shift, mean, res, xb, scale_b, shift_b, mean_b, relu, grad_res, sum_g,
                        sum_g_xc, sum_g_xbc, ws, ws_numel, splits):
    reads = [dy, x, mean, xb, mean_b] + ([scale, shift, res, scale_b, shift_b] if relu else [])
    return [("bwd_reduce_kernel", reads, [grad_res, ws]),
            ("sums_finalize_kernel", [ws], [sum_g, sum_g_xc, sum_g_xbc])]


def _bwd_apply_kernels(launch, dy, x, scale, shift, res, xb, scale_b, shift_b, relu, mean, k_g, k_x, k_c, mean_b,
                       k_g_b, k_x_b, k_c_b, dx, dxb):
    reads = [dy, x, mean, k_g, k_x, k_c] + ([xb, mean_b, k_g_b, k_x_b, k_c_b] if xb is not None else []) \
        + ([scale, shift, res, scale_b, shift_b] if relu else [])
    return [("bwd_apply_kernel", reads, [dx, dxb])]


def _stats_partials_kernels(launch, x, ws, ws_numel, splits):
    return [("stats_kernel", [x], [ws])]


def _stats_params_kernels(launch, ws, splits, mean, var, weight, bias, eps, scale, shift, running_mean, running_var,
                          num_batches_tracked, momentum, unbias, increment=None):
    reads = ([ws] if ws is not None else [mean, var]) + [weight, bias, running_mean, running_var, num_batches_tracked,
                                                         increment]
    return [("stats_params_kernel", reads, ([mean, var] if ws is not None else []) + [scale, shift, running_mean,
                                                                                       running_var, increment])]


def _stats_reduce_finalize_kernels(launch, x, ws, ws_numel, splits, mean, var, weight, bias, eps, scale, shift,
                                   running_mean, running_var, num_batches_tracked, momentum, unbias, increment, sem,
                                   sem_numel):
    """One kernel: the statistics pass (partials into ws), then the last block of each channel tile reads the
    tile's partials back and writes stats_params_kernel's outputs; sem (None when counting) is read and written
    once per block."""
    return [("stats_reduce_finalize_kernel",
             [x, ws, weight, bias, running_mean, running_var, num_batches_tracked, increment, sem],
             [ws, sem, mean, var, scale, shift, running_mean, running_var, increment])]


def _bwd_partials_kernels(launch, dy, x, scale, shift, mean, res, xb, scale_b, shift_b, mean_b, relu, grad_res, ws,
                          ws_numel, splits):
    reads = [dy, x, mean, xb, mean_b] + ([scale, shift, res, scale_b, shift_b] if relu else [])
    return [("bwd_reduce_kernel", reads, [grad_res, ws])]


def _bwd_finalize_kernels(launch, ws, splits, mode_a, mode_b, training, count, scale, var, eps, scale_b, var_b,
                          eps_b, out_a, out_b):
    return [("bwd_finalize_kernel", [ws, scale, var, scale_b, var_b], [t for t in out_a + out_b if t is not None])]


def _bwd_reduce_finalize_kernels(launch, dy, x, scale, shift, mean, res, xb, scale_b, shift_b, mean_b, relu,
                                 grad_res, ws, ws_numel, splits, mode_a, mode_b, training, count, var, eps, var_b,
                                 eps_b, out_a, out_b, sem, sem_numel):
    """One kernel: the reduction (partials into ws), then the last block of each channel tile reads the tile's
    partials back and writes the finalize's outputs; sem (None when counting: not allocated) is read and
    written once per block."""
    reads = [dy, x, mean, xb, mean_b] + ([scale, shift, res, scale_b, shift_b] if relu else [])
    return [("bwd_reduce_finalize_kernel", reads + [ws, scale, var, scale_b, var_b, sem],
             [grad_res, ws, sem] + [t for t in out_a + out_b if t is not None])]


KERNELS = {"apply": _apply_kernels, "backward_reduce": _bwd_reduce_kernels,
           "backward_apply": _bwd_apply_kernels, "stats_partials": _stats_partials_kernels,
           "stats_finalize": _stats_params_kernels, "backward_partials": _bwd_partials_kernels,
           "backward_finalize": _bwd_finalize_kernels, "backward_reduce_finalize": _bwd_reduce_finalize_kernels,
           "stats_reduce_finalize": _stats_reduce_finalize_kernels}
