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
