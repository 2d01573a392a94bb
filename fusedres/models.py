"""torchvision-signature ResNet constructors that return converted (fused) models.

Each builds the torchvision model with random initialisation (torchvision's own init, `zero_init_residual`
and every other keyword included) and runs `fusedres.convert` on it, so parameter names, shapes and
state_dict keys are torchvision's: `model.load_state_dict(torchvision_state_dict)` works unchanged, and
`fusedres.unconvert(model)` gives back a torchvision model.

Pretrained `weights` are refused rather than downloaded: these constructors never touch the network. Load
weights yourself, e.g. `model.load_state_dict(torch.load(path))`, or build
`torchvision.models.resnet50(weights=...)` and pass it to `fusedres.convert`.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from fusedres.convert import convert

__all__ = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2",
           "resnext50_32x4d"]


def _build(name: str, weights, progress: bool, kwargs: dict) -> nn.Module:
    if weights is not None:
        raise ValueError(
            f"fusedres.models.{name}: weights={weights!r} is not supported; these constructors never download. "
            f"Build the model with weights=None and load a state_dict (torchvision checkpoints load "
            f"unchanged), or convert a pretrained torchvision model: "
            f"fusedres.convert(torchvision.models.{name}(weights=...)).")
    import torchvision.models as tvm

    return convert(getattr(tvm, name)(weights=None, progress=progress, **kwargs))


def resnet18(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> nn.Module:
    """ResNet-18 (torchvision.models.resnet18) with fused BasicBlocks and stem; weights must be None."""
    return _build("resnet18", weights, progress, kwargs)


def resnet34(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> nn.Module:
    """ResNet-34 (torchvision.models.resnet34) with fused BasicBlocks and stem; weights must be None."""
    return _build("resnet34", weights, progress, kwargs)


def resnet50(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> nn.Module:
    """ResNet-50 v1.5 (torchvision.models.resnet50) with fused Bottlenecks and stem; weights must be None."""
    return _build("resnet50", weights, progress, kwargs)


def resnet101(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> nn.Module:
    """ResNet-101 (torchvision.models.resnet101) with fused Bottlenecks and stem; weights must be None."""
    return _build("resnet101", weights, progress, kwargs)


def resnet152(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> nn.Module:
    """ResNet-152 (torchvision.models.resnet152) with fused Bottlenecks and stem; weights must be None."""
    return _build("resnet152", weights, progress, kwargs)


def wide_resnet50_2(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> nn.Module:
    """Wide ResNet-50-2 (torchvision.models.wide_resnet50_2), fused; weights must be None."""
    return _build("wide_resnet50_2", weights, progress, kwargs)


def resnext50_32x4d(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> nn.Module:
    """ResNeXt-50 32x4d (torchvision.models.resnext50_32x4d), fused (grouped conv2); weights must be None."""
    return _build("resnext50_32x4d", weights, progress, kwargs)
