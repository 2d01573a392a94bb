"""What every fused op shares above the backends: input checks, per-channel math, running-stat updates."""
from __future__ import annotations

import numbers

import torch

from fusedres._layout import acc_dtype, dense, memory_format_of

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_activation(x, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"fusedres: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"fusedres: {name} must be 4-D [N, C, H, W] (BatchNorm2d input); "
                         f"got {x.dim()}-D tensor of shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"fusedres: {name} has dtype {x.dtype}; supported: float32, float16, bfloat16 "
                        f"(and float64, computed in float64)")
    if x.shape[1] == 0:
        raise ValueError(f"fusedres: {name} has 0 channels (shape {tuple(x.shape)}); expected C >= 1")


def check_like(t, x, name: str, x_name: str = "x") -> None:
    """t (a residual or a gradient) must match x in shape, dtype and device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"fusedres: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.shape != x.shape:
        raise ValueError(f"fusedres: {name} shape {tuple(t.shape)} does not match {x_name} shape {tuple(x.shape)}")
    if t.dtype != x.dtype:
        raise TypeError(f"fusedres: {name} dtype {t.dtype} does not match {x_name} dtype {x.dtype}")
    if t.device != x.device:
        raise ValueError(f"fusedres: {name} is on {t.device} but {x_name} is on {x.device}")


def check_channels(v, x, name: str) -> None:
    """v (weight, bias or a running statistic) must be a floating vector of C elements on x's device."""
    if v is None:
        return
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"fusedres: {name} must be a torch.Tensor or None, got {type(v).__name__}")
    c = x.shape[1]
    if v.dim() != 1 or v.numel() != c:
        raise ValueError(f"fusedres: {name} has shape {tuple(v.shape)} but the input has {c} channels "
                         f"(expected shape ({c},))")
    if not v.is_floating_point():
        raise TypeError(f"fusedres: {name} must be a floating tensor, got {v.dtype}")
    if v.device != x.device:
        raise ValueError(f"fusedres: {name} is on {v.device} but the input is on {x.device}")


def check_batch_size(x, name: str = "x") -> None:
    """Training refuses exactly one value per channel, as nn.BatchNorm2d does (an empty batch passes)."""
    if x.shape[0] * x.shape[2] * x.shape[3] == 1:
        raise ValueError(f"fusedres: expected more than 1 value per channel when training, got {name} of "
                         f"shape {tuple(x.shape)}")


def check_bn(x, name, weight, bias, mean=None, var=None) -> None:
    check_activation(x, name)
    for v, vname in ((weight, "weight"), (bias, "bias"), (mean, "running_mean"), (var, "running_var")):
        check_channels(v, x, f"{vname} (of {name})")


def check_flag(v, name: str) -> None:
    """A Python bool, as F.batch_norm requires of `training` (a string or tensor would be silently truthy)."""
    if not isinstance(v, bool):
        raise TypeError(f"fusedres: {name} must be a bool, got {type(v).__name__} {v!r}")


def check_number(v, name: str) -> None:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"fusedres: {name} must be a real number, got {type(v).__name__} {v!r}")


def check_eps(eps, training: bool, name: str = "eps") -> None:
    """As F.batch_norm: eps > 0 when normalising with batch statistics, eps >= 0 with running statistics."""
    check_number(eps, name)
    if training and eps <= 0:
        raise ValueError(f"fusedres: {name} must be positive when training (batch statistics), got {eps}")
    if eps < 0:
        raise ValueError(f"fusedres: {name} must be non-negative, got {eps}")


def check_bn_call(x, running_mean, running_var, weight, bias, training, momentum, eps, name: str = "x",
                  suffix: str = "") -> None:
    """Every argument of one F.batch_norm-style call, checked before any kernel runs or running statistic is
    touched: x, the C-element vectors (floating, on x's device), running statistics both given or both None
    (and given when not training), training a bool, eps and momentum numbers with F.batch_norm's eps rule.
    `suffix` names the second BN's arguments of dual_bn_act ("_r")."""
    check_activation(x, name)
    check_flag(training, "training")
    rm, rv = f"running_mean{suffix}", f"running_var{suffix}"
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"fusedres: {rm} and {rv} must both be tensors or both be None, got "
                         f"{type(running_mean).__name__} and {type(running_var).__name__}")
    if not training and running_mean is None:
        raise ValueError(f"fusedres: training=False needs {rm} and {rv} (it normalises with running "
                         f"statistics), got None")
    for v, vname in ((weight, f"weight{suffix}"), (bias, f"bias{suffix}"), (running_mean, rm), (running_var, rv)):
        check_channels(v, x, f"{vname} (of {name})")
    check_eps(eps, training, f"eps{suffix}")
    if training and running_mean is not None:
        check_number(momentum, f"momentum{suffix}")
    if training:
        check_batch_size(x, name)


def channel_count(x) -> int:
    return x.shape[0] * x.shape[2] * x.shape[3]


def densify(x, *others):
    """x and the tensors in `others` (None allowed) as dense tensors in x's kernel layout."""
    fmt = memory_format_of(x)
    return (dense(x, fmt),) + tuple(dense(t, fmt) for t in others)


def scale_shift(mean, var, weight, bias, eps: float):
    """invstd, and the per-channel (scale, shift) with BN(x) = (x - mean) * scale + shift."""
    invstd = torch.rsqrt(var + eps)
    scale = invstd if weight is None else weight.to(invstd.dtype) * invstd
    shift = torch.zeros_like(mean) if bias is None else bias.to(invstd.dtype)
    return invstd, scale, shift


def grad_coefficients(sum_g, sum_g_xc, invstd, scale, count: int, training: bool):
    """BN backward as dx = k_g * g + k_x * (x - mean) + k_c, and (grad_weight, grad_bias) before casting."""
    grad_weight = sum_g_xc * invstd
    grad_bias = sum_g
    if training:
        k_x = -scale * invstd * invstd * sum_g_xc / count
        k_c = -scale * sum_g / count
    else:
        k_x = torch.zeros_like(scale)
        k_c = k_x
    return scale, k_x, k_c, grad_weight, grad_bias


def cast_param_grad(grad, param):
    return None if param is None else grad.to(param.dtype)


@torch.no_grad()
def update_running_stats(running_mean, running_var, mean, var, count, momentum, num_batches_tracked=None) -> None:
    """nn.BatchNorm2d's update: exponential average of the batch mean and the unbiased batch variance
    (momentum None: the cumulative average, factor 1 / num_batches_tracked as a device tensor, no host sync).
    For the paths that do not run a finalize kernel (sync_bn's global statistics, conv mode's epilogue). None for
    an empty batch (count 0), as stock."""
    if running_mean is None or count == 0:
        return
    factor = momentum if momentum is not None else 1.0 / num_batches_tracked.to(mean.dtype)
    running_mean.lerp_(mean.to(running_mean.dtype), factor)
    running_var.lerp_((var * (count / (count - 1))).to(running_var.dtype), factor)


def fake_like(x):
    """Fake-tensor output with the layout the real kernels produce for x (an empty x's own strides, as stock)."""
    if x.numel() == 0:
        return torch.empty_like(x)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=memory_format_of(x))


def fake_channels(x):
    return x.new_empty((x.shape[1],), dtype=acc_dtype(x.dtype))


def is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def int_pair(v, op: str, name: str) -> list[int]:
    """An int or a sequence of one or two ints (as F.conv2d takes stride / padding / dilation) as [h, w]; string
    padding modes are refused."""
    if is_int(v):
        return [int(v), int(v)]
    if isinstance(v, (str, bytes)) or not isinstance(v, (tuple, list, torch.Size)) or not all(is_int(i) for i in v):
        raise TypeError(f"fusedres: {op} {name} must be an int or a pair of ints, got {v!r}")
    v = [int(i) for i in v]
    if len(v) == 1:
        return v * 2
    if len(v) != 2:
        raise ValueError(f"fusedres: {op} {name} must be an int or a pair of ints, got {len(v)} values {v}")
    return v
