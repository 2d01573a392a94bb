"""`BatchNormAct2d`: nn.BatchNorm2d [+ residual] [+ ReLU] as one fused op, and the two-BatchNorm block tail.

`BatchNormAct2d` subclasses `nn.BatchNorm2d` and keeps its parameters, buffers, state_dict keys and training
semantics (running statistics, `momentum=None`, `num_batches_tracked`, `affine=False`,
`track_running_stats=False`, eval with running statistics); only `forward` changes, to
`act(BN(x) [+ residual])` through `fusedres.ops.bn_act`. Because it *is* a BatchNorm2d, code that looks for
BatchNorm layers with isinstance (weight-decay filters, zero-init, freezing) keeps finding it. Code that
rebuilds BatchNorm layers by type (e.g. `nn.SyncBatchNorm.convert_sync_batchnorm`) would drop the fused
activation: run `fusedres.unconvert` first.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor, nn

from fusedres.ops import batch_stats as _batch_stats, bn_act, dual_bn_act  # noqa: F401  (bn_finalize)
from fusedres.ops._common import check_batch_size, check_bn, check_eps, check_like
from fusedres.ops.sync_bn_act import sync_bn_act, sync_dual_bn_act

ACTIVATIONS = (None, "relu")


def _check_act(act) -> Optional[str]:
    if act not in ACTIVATIONS:
        raise ValueError(f"fusedres: unsupported activation {act!r}; choose one of {ACTIVATIONS}")
    return act


def _check_input(bn: nn.modules.batchnorm._BatchNorm, x, name: str = "input") -> None:
    """Rank, channel count and dtype of a BatchNorm input, checked before any running statistic is touched."""
    what = f"{type(bn).__name__}({bn.num_features})"
    if not isinstance(x, Tensor):
        raise TypeError(f"{what}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{what}: expected 4D input [N, C, H, W] (got {x.dim()}D {name} of shape "
                         f"{tuple(x.shape)})")
    if x.shape[1] != bn.num_features:
        raise ValueError(f"{what}: {name} has {x.shape[1]} channels but the layer has num_features="
                         f"{bn.num_features} (shape {tuple(x.shape)})")
    check_bn(x, name, bn.weight, bn.bias, bn.running_mean, bn.running_var)  # dtype; parameters' device
    check_eps(bn.eps, _uses_batch_stats(bn))


def batch_norm_args(bn: nn.modules.batchnorm._BatchNorm, fused_count: bool = False) -> dict:
    """The running statistics, `training` flag and momentum that `_BatchNorm.forward` would pass to
    `F.batch_norm` for this call, after the same `num_batches_tracked` bookkeeping (call once per forward):
    incremented here, or with `fused_count` by the fused op's statistics launch (the dict then carries
    num_batches_tracked and increment_num_batches_tracked=True for bn_act / dual_bn_act). `momentum=None`
    gives the cumulative average 1 / num_batches_tracked, from a count kept on the host (no device-to-host copy
    per step); otherwise `num_batches_tracked` is None (the fused ops' device-side cumulative factor is for
    functional callers)."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    t = bn.num_batches_tracked
    fused = False
    if bn.training and bn.track_running_stats and t is not None:
        known = _host_count(bn)
        count = (known if known is not None else int(t)) + 1 if bn.momentum is None else None
        fused = fused_count
        if not fused:
            t.add_(1)
        if count is not None:
            if fused:  # cached with the version the op leaves: settle_count(bn) after it
                bn.__dict__["_fusedres_pending"] = count
            else:
                bn.__dict__["_fusedres_count"] = (t, t._version, count)
            factor = 1.0 / count
    use_buffers = not bn.training or bn.track_running_stats
    args = dict(running_mean=bn.running_mean if use_buffers else None,
                running_var=bn.running_var if use_buffers else None,
                training=_uses_batch_stats(bn), momentum=factor, num_batches_tracked=t if fused else None)
    if fused_count:
        args["increment_num_batches_tracked"] = fused
    return args


def settle_count(*bns) -> None:
    """After a fused op incremented num_batches_tracked (batch_norm_args(fused_count=True)), keep the host
    count valid for the buffer's new version."""
    for bn in bns:
        count = bn.__dict__.pop("_fusedres_pending", None)
        if count is not None:
            bn.__dict__["_fusedres_count"] = (bn.num_batches_tracked, bn.num_batches_tracked._version, count)


def finalize_batch(bn: nn.modules.batchnorm._BatchNorm, x: Tensor, mean: Tensor, var: Tensor, centred: bool,
                   affine=None) -> tuple[Tensor, Tensor]:
    """A training-mode BatchNorm's per-channel work on batch statistics (mean, biased var) of x computed
    elsewhere (a conv epilogue's), in one launch (`fusedres::bn_finalize`): its (scale, shift) (`centred`: BN(x)
    = x * scale + shift, the conv prologue's form) and nn.BatchNorm2d's bookkeeping (running statistics with
    momentum, or momentum=None's 1 / num_batches_tracked from the host count as `batch_norm_args`; the
    num_batches_tracked increment). `affine`: the (weight, bias) the params use instead of bn's (a learned skip
    gain folded in)."""
    weight, bias = affine if affine is not None else (bn.weight, bn.bias)
    args = batch_norm_args(bn, fused_count=True)
    params = torch.ops.fusedres.bn_finalize(x.detach(), mean.detach(), var.detach(), _detached(weight),
                                            _detached(bias), float(bn.eps), args["running_mean"],
                                            args["running_var"], args["num_batches_tracked"],
                                            float(args["momentum"]), centred)
    settle_count(bn)
    return params


def _detached(t):
    return None if t is None else t.detach()


def _host_count(bn) -> int | None:
    """num_batches_tracked as a Python int kept on the host next to the buffer, so momentum=None needs no
    device-to-host copy each step; None (read it once) when something else wrote the buffer since (a loaded
    state_dict, a reset: the tensor's version counter moved) or it was never read."""
    cached = bn.__dict__.get("_fusedres_count")
    t = bn.num_batches_tracked
    if cached is None or cached[0] is not t or cached[1] != t._version:
        return None
    return cached[2]


def _uses_batch_stats(bn) -> bool:
    """True when the forward normalises with batch statistics (training, or eval without running buffers)."""
    return bn.training or (bn.running_mean is None and bn.running_var is None)


class BatchNormAct2d(nn.BatchNorm2d):
    """Drop-in `nn.BatchNorm2d` that also adds an optional residual and applies an optional ReLU, fused:
    `forward(x, residual=None) = act(BatchNorm2d(x) + residual)`.

    Same constructor as `nn.BatchNorm2d` plus `act` ("relu" or None, default None: `BatchNormAct2d(C)` computes
    exactly what `nn.BatchNorm2d(C)` does); same parameters, buffers and state_dict keys, so BatchNorm2d
    checkpoints load unchanged. An empty batch behaves as in stock (empty output, running statistics unchanged,
    `num_batches_tracked` still counts). `residual` must have x's shape, dtype and
    device. The fused op saves x (and the residual when act is on) for backward and recomputes the ReLU
    mask, so unlike BatchNorm2d + ReLU the output is never kept alive by autograd.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None, *,
                 act: Optional[str] = None, **kwargs) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **kwargs)
        self.act = _check_act(act)

    @classmethod
    def from_bn(cls, bn: nn.BatchNorm2d, act: Optional[str] = None) -> "BatchNormAct2d":
        """A BatchNormAct2d sharing bn's Parameter and buffer tensors (no copies) and its training mode."""
        if not isinstance(bn, nn.BatchNorm2d):
            raise TypeError(f"fusedres: from_bn needs an nn.BatchNorm2d, got {type(bn).__name__}")
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.weight is not None, bn.track_running_stats,
                  device="meta", act=act)
        _share_state(bn, new)
        return new

    def to_bn(self) -> nn.BatchNorm2d:
        """A plain nn.BatchNorm2d sharing this module's tensors (the activation is dropped)."""
        bn = nn.BatchNorm2d(self.num_features, self.eps, self.momentum, self.weight is not None,
                            self.track_running_stats, device="meta")
        _share_state(self, bn)
        return bn

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        return bn_act_module(self, x, residual, self.act == "relu")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, act={self.act}"

    def _syncs(self) -> bool:
        """Whether this call takes batch statistics over a process group (`SyncBatchNormAct2d` overrides it)."""
        return False


def _syncs(bn) -> bool:
    return isinstance(bn, BatchNormAct2d) and bn._syncs()


def _share_state(src: nn.Module, dst: nn.Module) -> None:
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        setattr(dst, name, getattr(src, name))
    dst.train(src.training)


def dual_bn_act_modules(x: Tensor, bn: nn.BatchNorm2d, r: Tensor, bn_r: nn.BatchNorm2d,
                        relu: bool = True, gain: Optional[Tensor] = None,
                        residual_gain: Optional[Tensor] = None) -> Tensor:
    """`act(bn(x) + bn_r(r))` — a downsampling block's tail (last BN of the main branch plus the shortcut's
    BN) — as one fused op, with each module's own momentum, eps, running-stat and num_batches_tracked
    bookkeeping. r is cast to x's dtype first (as stock `out += identity` casts the sum). When the two BNs
    disagree on batch vs running statistics (one in eval, or without running buffers), bn_r runs on its own
    and its output is added as a plain residual. `gain` / `residual_gain` (1 or C values) scale bn's / bn_r's
    output: learned skip weights, folded into the BN affine parameters so they cost no extra pass."""
    _check_input(bn, x, "x")
    _check_input(bn_r, r, "r (the shortcut input)")
    r = r.to(x.dtype)
    check_like(r, x, "r (the shortcut input)")
    if _uses_batch_stats(bn) != _uses_batch_stats(bn_r):
        return bn_act_module(bn, x, bn_act_module(bn_r, r, None, False, gain=residual_gain), relu, gain=gain)
    sync = _syncs(bn)
    if (sync or _syncs(bn_r)) and not (sync and _syncs(bn_r) and bn.process_group is bn_r.process_group):
        raise ValueError(f"fusedres: the two BatchNorms of a fused dual tail share one all_reduce, so both must be "
                         f"SyncBatchNormAct2d with the same process_group; got {_describe_sync(bn)} and "
                         f"{_describe_sync(bn_r)} (fusedres.nn.to_sync_bn converts a whole model)")
    if _uses_batch_stats(bn) and not sync:  # a synchronised batch is checked over the group
        check_batch_size(x)
    a, b = batch_norm_args(bn, not sync), batch_norm_args(bn_r, not sync)
    weight, bias = gained_affine(bn, gain)
    weight_r, bias_r = gained_affine(bn_r, residual_gain)
    fused = functools.partial(sync_dual_bn_act, process_group=bn.process_group) if sync else dual_bn_act
    out = fused(x, r, weight=weight, bias=bias, running_mean=a["running_mean"],
                 running_var=a["running_var"], momentum=a["momentum"], eps=bn.eps,
                 weight_r=weight_r, bias_r=bias_r, running_mean_r=b["running_mean"],
                 running_var_r=b["running_var"], momentum_r=b["momentum"], eps_r=bn_r.eps,
                 training=a["training"], relu=relu, num_batches_tracked=a["num_batches_tracked"],
                 num_batches_tracked_r=b["num_batches_tracked"],
                 **({} if sync else dict(increment_num_batches_tracked=a["increment_num_batches_tracked"]
                                         or b["increment_num_batches_tracked"])))
    settle_count(bn, bn_r)
    return out


def _describe_sync(bn) -> str:
    return (f"{type(bn).__name__}(process_group={bn.process_group!r})" if _syncs(bn)
            else f"{type(bn).__name__} (not synchronised)")


def bn_act_module(bn: nn.BatchNorm2d, x: Tensor, residual: Optional[Tensor], relu: bool,
                  gain: Optional[Tensor] = None, residual_gain: Optional[Tensor] = None) -> Tensor:
    """act(gain * bn(x) + residual_gain * residual) with bn's parameters and bookkeeping, for any BatchNorm2d
    (a BatchNormAct2d's own `act` is ignored; `relu` decides). The optional gains (1 or C values, learned skip
    weights) ride in the same fused pass. Inputs are checked before any running statistic is updated."""
    _check_input(bn, x)
    if residual is not None:
        check_like(residual, x, "residual", "the BatchNorm input")
    sync = _syncs(bn)
    if _uses_batch_stats(bn) and not sync:  # a synchronised batch is checked over the group
        check_batch_size(x, "input")
    weight, bias = gained_affine(bn, gain)
    fused = functools.partial(sync_bn_act, process_group=bn.process_group) if sync else bn_act
    out = fused(x, weight=weight, bias=bias, eps=bn.eps, residual=residual, relu=relu,
                residual_weight=None if residual_gain is None else _per_channel(residual_gain, x.shape[1]),
                **batch_norm_args(bn, fused_count=not sync))
    settle_count(bn)
    return out


def _per_channel(gain: Tensor, channels: int) -> Tensor:
    if gain.dim() != 1 or gain.numel() not in (1, channels):
        raise ValueError(f"fusedres: a skip weight must have 1 or {channels} values (one per channel), got shape "
                         f"{tuple(gain.shape)}")
    return gain.expand(channels)


def gained_affine(bn: nn.BatchNorm2d, gain: Optional[Tensor]):
    """(weight, bias) of `gain * bn(.)`: gain * gamma and gain * beta (gain alone when bn has no affine)."""
    if gain is None:
        return bn.weight, bn.bias
    g = _per_channel(gain, bn.num_features)
    return (g if bn.weight is None else bn.weight * g), (None if bn.bias is None else bn.bias * g)
