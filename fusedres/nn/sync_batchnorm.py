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

import functools
from typing import Optional

import torch.distributed as dist
from torch import nn

from fusedres.nn._tree import swap_children
from fusedres.nn.batchnorm_act import BatchNormAct2d


class SyncBatchNormAct2d(BatchNormAct2d):
    """`BatchNormAct2d` with batch statistics over `process_group` (None: the default group, as in
    `torch.nn.SyncBatchNorm`) when training under torch.distributed. Same constructor as `BatchNormAct2d` plus
    `process_group`; same parameters, buffers and state_dict keys (so nn.BatchNorm2d / nn.SyncBatchNorm
    checkpoints load unchanged). As in `torch.nn.SyncBatchNorm`, the weight and bias gradients are this rank's
    own; DistributedDataParallel's gradient averaging completes them."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None, *,
                 act: Optional[str] = None, process_group=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, act=act)
        self.process_group = process_group
        # what `from_sync_bn` turns this layer back into: a class, and that class's extra plain attributes
        self._unsynced_cls, self._unsynced_attrs = (nn.BatchNorm2d if act is None else BatchNormAct2d), {}

    @classmethod
    def from_bn(cls, bn: nn.BatchNorm2d, act: Optional[str] = None,
                process_group=None) -> "SyncBatchNormAct2d":
        """A SyncBatchNormAct2d sharing bn's tensors and training mode; `process_group` defaults to bn's own
        (when bn is a SyncBatchNormAct2d), else None (the default group). It remembers bn's class (and a
        BatchNormAct2d subclass's extra attributes) for `from_sync_bn`."""
        new = super().from_bn(bn, act=act)
        new.process_group = process_group if process_group is not None else getattr(bn, "process_group", None)
        if isinstance(bn, SyncBatchNormAct2d):
            new._unsynced_cls, new._unsynced_attrs = bn._unsynced_cls, dict(bn._unsynced_attrs)
            if new._unsynced_cls is nn.BatchNorm2d and act is not None:
                new._unsynced_cls = BatchNormAct2d
            elif new._unsynced_cls is BatchNormAct2d and act is None:
                new._unsynced_cls = nn.BatchNorm2d
        elif isinstance(bn, BatchNormAct2d):
            new._unsynced_cls = type(bn)
            new._unsynced_attrs = {k: v for k, v in vars(bn).items() if k not in _base_attributes()}
        else:
            new._unsynced_cls, new._unsynced_attrs = nn.BatchNorm2d, {}
        return new

    def to_unsynced(self) -> nn.BatchNorm2d:
        """The layer this one was made from (its class and extra attributes: an nn.BatchNorm2d, BatchNormAct2d,
        or a BatchNormAct2d subclass), sharing this module's tensors; this module's own act is kept."""
        if self._unsynced_cls is nn.BatchNorm2d and self.act is None:
            return self.to_bn()
        cls = BatchNormAct2d if self._unsynced_cls is nn.BatchNorm2d else self._unsynced_cls
        new = cls.from_bn(self, act=self.act)
        new.__dict__.update(self._unsynced_attrs)
        return new

    def _syncs(self) -> bool:
        """True when this call's batch statistics are taken over the process group (as torch.nn.SyncBatchNorm
        decides: training, torch.distributed initialised, more than one process in the group)."""
        return (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size(self.process_group) > 1)


@functools.cache
def _base_attributes() -> frozenset:
    """Instance attribute names every BatchNormAct2d has (a subclass's others are its own state)."""
    return frozenset(vars(BatchNormAct2d(1, device="meta")))


def _syncable(m: nn.Module) -> bool:
    """A plain nn.BatchNorm2d, or a BatchNormAct2d (or subclass with its forward, e.g. TimmBatchNormAct2d)."""
    return type(m) is nn.BatchNorm2d or (isinstance(m, BatchNormAct2d) and not isinstance(m, SyncBatchNormAct2d)
                                         and type(m).forward is BatchNormAct2d.forward)


def _refuse_conv_mode(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if getattr(type(m), "local_batch_stats", False):  # conv-mode blocks and units
            raise TypeError(f"fusedres.to_sync_bn: {name or 'the model'} is a {type(m).__name__} "
                            f"(convert(mode='conv')), whose convolutions compute BatchNorm statistics on this "
                            f"process only; use mode='bn' for synchronised BatchNorm")


def _swap(model: nn.Module, fn) -> nn.Module:
    """Replace model (and, recursively, every child) by fn(m) where that returns a new module; returns the
    possibly new root."""
    new = fn(model)
    if new is not model:
        return new
    swap_children(model, fn)
    return model


def to_sync_bn(model: nn.Module, process_group=None) -> nn.Module:
    """Replace, in place, every `BatchNormAct2d` (its `act` kept; also subclasses that keep its forward, such as
    `TimmBatchNormAct2d`) and every plain `nn.BatchNorm2d` (act=None) in `model` — stem, fused blocks and
    downsample shortcuts included — by a `SyncBatchNormAct2d` over `process_group` (None: the default group)
    sharing its Parameters and buffers; returns the model (a new object only when `model` itself is such a
    BatchNorm). Existing SyncBatchNormAct2d layers, other BatchNorm subclasses and other norms are left alone.
    Apply it to a `convert`ed model before wrapping it in DistributedDataParallel (conv-mode blocks are refused:
    their statistics come from the conv kernels). `fusedres.convert(model, sync_bn=True)` does both steps."""
    _refuse_conv_mode(model)

    def fn(m):
        if not _syncable(m):
            return m
        return SyncBatchNormAct2d.from_bn(m, act=getattr(m, "act", None), process_group=process_group)

    return _swap(model, fn)


def from_sync_bn(model: nn.Module) -> nn.Module:
    """The inverse of `to_sync_bn`, in place: every `SyncBatchNormAct2d` becomes the layer it was made from (the
    same class: nn.BatchNorm2d, BatchNormAct2d or its subclass, with the same act), sharing its tensors;
    returns the model (a new object only when `model` itself is a SyncBatchNormAct2d). A SyncBatchNormAct2d
    built directly becomes a BatchNormAct2d, or an nn.BatchNorm2d when its act is None. For stock synchronised
    BatchNorm afterwards, run `torch.nn.SyncBatchNorm.convert_sync_batchnorm` on the `unconvert`ed model
    (`fusedres.unconvert` calls this function first)."""
    def fn(m):
        return m.to_unsynced() if isinstance(m, SyncBatchNormAct2d) else m

    return _swap(model, fn)
