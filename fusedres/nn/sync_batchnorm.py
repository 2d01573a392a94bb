"""`SyncBatchNormAct2d`: a `BatchNormAct2d` whose training-mode batch statistics are those of the whole batch
across the processes of a `torch.distributed` group, and `to_sync_bn` / `from_sync_bn` to swap a model's
BatchNorm layers to it and back.

Under DistributedDataParallel each rank sees part of the batch; plain BatchNorm normalises with the statistics
of that part. `SyncBatchNormAct2d` (like `torch.nn.SyncBatchNorm`) normalises with the statistics of all ranks'
inputs together, and keeps the fused residual add + ReLU: one `torch.distributed.all_reduce` of
[sum, sum of squares, count] per layer forward and one of the two backward sums per layer backward
(`fusedres.ops.sync_bn_act`). Fused block tails (`bn_act_module`, `dual_bn_act_modules`) synchronise the same
way; a dual tail's two BNs share one all_reduce and must share their process group.

It synchronises only when training, with torch.distributed initialised and more than one process in the
group; otherwise (eval, a single process, no process group) it is exactly `BatchNormAct2d`.
"""
from __future__ import annotations

from typing import Optional

import torch.distributed as dist
from torch import nn

from fusedres.nn.batchnorm_act import BatchNormAct2d


class SyncBatchNormAct2d(BatchNormAct2d):
    """`BatchNormAct2d` with batch statistics over `process_group` (None: the default group, as in
    `torch.nn.SyncBatchNorm`) when training under torch.distributed. Same constructor as `BatchNormAct2d` plus
    `process_group`; same parameters, buffers and state_dict keys (so nn.BatchNorm2d / nn.SyncBatchNorm
    checkpoints load unchanged). As in `torch.nn.SyncBatchNorm`, the weight and bias gradients are this rank's
    own; DistributedDataParallel's gradient averaging completes them."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None, *,
                 act: Optional[str] = "relu", process_group=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, act=act)
        self.process_group = process_group

    @classmethod
    def from_bn(cls, bn: nn.BatchNorm2d, act: Optional[str] = "relu",
                process_group=None) -> "SyncBatchNormAct2d":
        """A SyncBatchNormAct2d sharing bn's tensors and training mode; `process_group` defaults to bn's own
        (when bn is a SyncBatchNormAct2d), else None (the default group)."""
        new = super().from_bn(bn, act=act)
        new.process_group = process_group if process_group is not None else getattr(bn, "process_group", None)
        return new

    def _syncs(self) -> bool:
        """True when this call's batch statistics are taken over the process group (as torch.nn.SyncBatchNorm
        decides: training, torch.distributed initialised, more than one process in the group)."""
        return (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size(self.process_group) > 1)


def _bn_types():
    return (nn.BatchNorm2d, BatchNormAct2d)


def _refuse_conv_mode(model: nn.Module) -> None:
    from fusedres.nn.conv_blocks import CONV_BLOCKS

    for name, m in model.named_modules():
        if isinstance(m, tuple(CONV_BLOCKS.values())):
            raise TypeError(f"fusedres.to_sync_bn: {name or 'the model'} is a {type(m).__name__} "
                            f"(convert(mode='conv')), whose convolutions compute BatchNorm statistics on this "
                            f"process only; use mode='bn' for synchronised BatchNorm")


def _swap(model: nn.Module, fn) -> nn.Module:
    """Replace model (and, recursively, every child) by fn(m) where that returns a new module; returns the
    possibly new root."""
    new = fn(model)
    if new is not model:
        return new
    for name, child in list(model.named_children()):
        new_child = _swap(child, fn)
        if new_child is not child:
            setattr(model, name, new_child)
    return model


def to_sync_bn(model: nn.Module, process_group=None) -> nn.Module:
    """Replace, in place, every `BatchNormAct2d` (its `act` kept) and every plain `nn.BatchNorm2d` (act=None)
    in `model` — stem, fused blocks and downsample shortcuts included — by a `SyncBatchNormAct2d` over
    `process_group` (None: the default group) sharing its Parameters and buffers; returns the model (a new
    object only when `model` itself is such a BatchNorm). Existing SyncBatchNormAct2d layers, BatchNorm
    subclasses and other norms are left alone. Apply it to a `convert`ed model before wrapping it in
    DistributedDataParallel (conv-mode blocks are refused: their statistics come from the conv kernels)."""
    _refuse_conv_mode(model)

    def fn(m):
        if type(m) not in _bn_types():
            return m
        return SyncBatchNormAct2d.from_bn(m, act=getattr(m, "act", None), process_group=process_group)

    return _swap(model, fn)


def from_sync_bn(model: nn.Module) -> nn.Module:
    """The inverse of `to_sync_bn`, in place: every `SyncBatchNormAct2d` becomes a `BatchNormAct2d` with the
    same act, or a plain `nn.BatchNorm2d` where act is None, sharing its tensors; returns the model (a new
    object only when `model` itself is a SyncBatchNormAct2d). For stock synchronised BatchNorm afterwards, run
    `torch.nn.SyncBatchNorm.convert_sync_batchnorm` on the `unconvert`ed model."""
    def fn(m):
        if not isinstance(m, SyncBatchNormAct2d):
            return m
        return m.to_bn() if m.act is None else BatchNormAct2d.from_bn(m, act=m.act)

    return _swap(model, fn)
