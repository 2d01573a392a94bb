"""torchvision-signature ResNet constructors that return converted (fused) models.

Each builds the torchvision model with random initialisation (torchvision's own init, `zero_init_residual`
and every other keyword included) and runs `fusedres.convert` on it, so parameter names, shapes and
state_dict keys are torchvision's: `model.load_state_dict(torchvision_state_dict)` works unchanged, and
`fusedres.unconvert(model)` gives back a torchvision model. Pre-activation ResNets (`preact_resnet164`,
`preact_resnet1001`, `preact_resnet18/34/50/101/152`) build the plain-PyTorch `fusedres.preact` networks and
convert them unless `fused=False`.

`skip_weight=`, `skip_on=`, `skip_init=` go to `fusedres.convert` (learned skip weights); every other keyword
goes to torchvision: `weights=` (a torchvision weights enum such as `ResNet50_Weights.IMAGENET1K_V2`, its name
as a string, or None), `progress=` and the deprecated `pretrained=` are handled by torchvision's own loading
code (download into the torch hub cache, hash check, `num_classes` from the weights), and the loaded model is
converted afterwards.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from fusedres.convert import convert

__all__ = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2",
           "resnext50_32x4d", "preact_resnet164", "preact_resnet1001", "preact_resnet_cifar", "preact_resnet18",
           "preact_resnet34", "preact_resnet50", "preact_resnet101", "preact_resnet152"]


def _build(name: str, weights, progress: bool, kwargs: dict) -> nn.Module:
    import torchvision.models as tvm

    skip = {k: kwargs.pop(k) for k in ("skip_weight", "skip_on", "skip_init") if k in kwargs}
    if isinstance(weights, str):
        enum = tvm.get_model_weights(name)
        try:
            enum.verify(weights)
        except KeyError:
            raise ValueError(f"fusedres.models.{name}: unknown weights {weights!r}; choose from "
                             f"{', '.join(['DEFAULT'] + [w.name for w in enum])} (or a {enum.__name__} member)"
                             ) from None
    if "pretrained" in kwargs and weights is None:  # torchvision's legacy interface maps it to weights
        return convert(getattr(tvm, name)(progress=progress, **kwargs), **skip)
    return convert(getattr(tvm, name)(weights=weights, progress=progress, **kwargs), **skip)


def resnet18(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> nn.Module:
    """ResNet-18 (torchvision.models.resnet18) with fused BasicBlocks and stem."""
    return _build("resnet18", weights, progress, kwargs)


def resnet34(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> nn.Module:
    """ResNet-34 (torchvision.models.resnet34) with fused BasicBlocks and stem."""
    return _build("resnet34", weights, progress, kwargs)


def resnet50(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> nn.Module:
    """ResNet-50 v1.5 (torchvision.models.resnet50) with fused Bottlenecks and stem."""
    return _build("resnet50", weights, progress, kwargs)


def resnet101(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> nn.Module:
    """ResNet-101 (torchvision.models.resnet101) with fused Bottlenecks and stem."""
    return _build("resnet101", weights, progress, kwargs)


def resnet152(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> nn.Module:
    """ResNet-152 (torchvision.models.resnet152) with fused Bottlenecks and stem."""
    return _build("resnet152", weights, progress, kwargs)


def wide_resnet50_2(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> nn.Module:
    """Wide ResNet-50-2 (torchvision.models.wide_resnet50_2), fused."""
    return _build("wide_resnet50_2", weights, progress, kwargs)


def resnext50_32x4d(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> nn.Module:
    """ResNeXt-50 32x4d (torchvision.models.resnext50_32x4d), fused (grouped conv2)."""
    return _build("resnext50_32x4d", weights, progress, kwargs)


# Pre-activation ResNets ("Identity Mappings in Deep Residual Networks"): the stock networks are the plain-PyTorch
# `fusedres.preact.PreActResNet`; fused=True converts them (every BN -> ReLU pair one fused op; mode="conv":
# conv-mode units, `fusedres.nn.preact_conv`, each BN + ReLU in the next conv's prologue), fused=False returns the
# stock network. `fusedres.convert` / `unconvert` map between the two; state_dict keys are the same.

def _preact(model: nn.Module, fused: bool, mode: str = "bn") -> nn.Module:
    return convert(model, mode=mode) if fused else model


def preact_resnet_cifar(depth: int, num_classes: int = 10, fused: bool = True, *, mode: str = "bn") -> nn.Module:
    """CIFAR pre-activation bottleneck ResNet of depth 9n + 2 (3x3 stem, stages of 16/32/64 bottleneck widths)."""
    from fusedres.preact import preact_resnet_cifar as build

    return _preact(build(depth, num_classes), fused, mode)


def preact_resnet164(num_classes: int = 10, fused: bool = True, *, mode: str = "bn") -> nn.Module:
    """ResNet-164 of "Identity Mappings" (CIFAR, 18 bottleneck units per stage, 1.7M parameters)."""
    return preact_resnet_cifar(164, num_classes, fused, mode=mode)


def preact_resnet1001(num_classes: int = 10, fused: bool = True, *, mode: str = "bn") -> nn.Module:
    """ResNet-1001 of "Identity Mappings" (CIFAR, 111 bottleneck units per stage, 10.3M parameters)."""
    return preact_resnet_cifar(1001, num_classes, fused, mode=mode)


def _preact_imagenet(bottleneck: bool, layers, num_classes: int, fused: bool, mode: str) -> nn.Module:
    from fusedres.preact import PreActBasicBlock, PreActBottleneck, PreActResNet

    block = PreActBottleneck if bottleneck else PreActBasicBlock
    return _preact(PreActResNet(block, layers, [64, 128, 256, 512], num_classes, stem="imagenet", stem_width=64),
                   fused, mode)


def preact_resnet18(num_classes: int = 1000, fused: bool = True, *, mode: str = "bn") -> nn.Module:
    """ImageNet pre-activation ResNet-18 (basic units, torchvision's widths and depths)."""
    return _preact_imagenet(False, [2, 2, 2, 2], num_classes, fused, mode)


def preact_resnet34(num_classes: int = 1000, fused: bool = True, *, mode: str = "bn") -> nn.Module:
    """ImageNet pre-activation ResNet-34 (basic units)."""
    return _preact_imagenet(False, [3, 4, 6, 3], num_classes, fused, mode)


def preact_resnet50(num_classes: int = 1000, fused: bool = True, *, mode: str = "bn") -> nn.Module:
    """ImageNet pre-activation ResNet-50 (bottleneck units, stride on the 3x3 conv)."""
    return _preact_imagenet(True, [3, 4, 6, 3], num_classes, fused, mode)


def preact_resnet101(num_classes: int = 1000, fused: bool = True, *, mode: str = "bn") -> nn.Module:
    """ImageNet pre-activation ResNet-101 (bottleneck units)."""
    return _preact_imagenet(True, [3, 4, 23, 3], num_classes, fused, mode)


def preact_resnet152(num_classes: int = 1000, fused: bool = True, *, mode: str = "bn") -> nn.Module:
    """ImageNet pre-activation ResNet-152 (bottleneck units)."""
    return _preact_imagenet(True, [3, 8, 36, 3], num_classes, fused, mode)
