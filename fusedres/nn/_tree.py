"""Module-tree surgery shared by `convert` / `unconvert` and `to_sync_bn` / `from_sync_bn`."""
from __future__ import annotations

from torch import nn


def swap_children(model: nn.Module, fn) -> None:
    """In place: every child of `model` becomes fn(child); a child fn leaves as it is is visited recursively
    (a replaced one is not)."""
    for name, child in list(model.named_children()):
        new = fn(child)
        if new is not child:
            setattr(model, name, new)
        else:
            swap_children(child, fn)


def fuse_bn_relu(parent: nn.Module, bn_name: str, act_name: str) -> None:
    """`parent.<bn_name>: BatchNorm2d` followed by `parent.<act_name>: ReLU` (a stem or head pair whose BN output
    feeds only that ReLU) become BatchNormAct2d(act="relu") + nn.Identity, sharing the BN's tensors. Idempotent."""
    from fusedres.nn.batchnorm_act import BatchNormAct2d

    bn, act = getattr(parent, bn_name), getattr(parent, act_name)
    if type(bn) is nn.BatchNorm2d and type(act) is nn.ReLU:
        setattr(parent, bn_name, BatchNormAct2d.from_bn(bn, act="relu"))
        setattr(parent, act_name, nn.Identity())


def unfuse_bn_relu(parent: nn.Module, bn_name: str, act_name: str) -> None:
    """The inverse of `fuse_bn_relu`: BatchNorm2d + ReLU(inplace=True) again, same tensors."""
    from fusedres.nn.batchnorm_act import BatchNormAct2d

    bn, act = getattr(parent, bn_name), getattr(parent, act_name)
    if type(bn) is BatchNormAct2d and bn.act == "relu" and type(act) is nn.Identity:
        setattr(parent, bn_name, bn.to_bn())
        setattr(parent, act_name, nn.ReLU(inplace=True))
