"""Fused ResNet blocks: drop-in `BasicBlock` and `Bottleneck` with torchvision's constructor, attribute names
and state_dict keys.

Every BatchNorm becomes a `BatchNormAct2d`; the ones followed by a ReLU carry it (`act="relu"`), and the
last one also takes the shortcut as its residual, so a block's tail is one fused op:

* identity shortcut: `relu(bn_last(out) + x)` — `bn_act` with `residual`;
* torchvision-style downsample `Sequential(Conv2d, BatchNorm2d)`: `relu(bn_last(out) + bn_ds(conv_ds(x)))` —
  `dual_bn_act`, both BatchNorms in one pass (forward hooks on `downsample` itself are then not called);
* any other downsample module: it runs as is and its output is the residual.

The fused tail saves the block input (already saved by conv1) instead of the block output, so a block keeps
one activation fewer alive for backward than the stock one. `self.relu` stays (an `nn.ReLU`, unused in
forward) for code that inspects torchvision blocks. torchvision is imported only by `to_torchvision`.
"""
from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor, nn

from fusedres.nn.batchnorm_act import BatchNormAct2d, bn_act_module, dual_bn_act_modules


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    """torchvision's conv3x3 (padding = dilation, no bias)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation, groups=groups,
                     bias=False, dilation=dilation)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """torchvision's conv1x1 (no bias)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


def _is_plain_bn(m) -> bool:
    return type(m) in (nn.BatchNorm2d, BatchNormAct2d)


def _is_conv_bn(m) -> bool:
    """True for a torchvision-style downsample: Sequential(Conv2d, BatchNorm2d) with nothing else."""
    return type(m) is nn.Sequential and len(m) == 2 and isinstance(m[0], nn.Conv2d) and _is_plain_bn(m[1])


def _fused_norm(norm_layer, channels: int, act: Optional[str]) -> BatchNormAct2d:
    bn = (norm_layer or nn.BatchNorm2d)(channels)
    if not isinstance(bn, nn.BatchNorm2d) or not _is_plain_bn(bn):
        raise TypeError(f"fusedres blocks fuse nn.BatchNorm2d only; norm_layer built a {type(bn).__name__} "
                        f"(keep the torchvision block for other norms)")
    return BatchNormAct2d.from_bn(bn, act=act)


class _FusedBlock(nn.Module):
    expansion: int = 1
    _torchvision_name: str = ""
    _norms: tuple = ()

    def _tail(self, x: Tensor, out: Tensor, bn: BatchNormAct2d) -> Tensor:
        """act(bn(out) + shortcut(x)), fused as far as the shortcut allows."""
        relu = bn.act == "relu"
        ds = self.downsample
        if ds is None:
            return bn_act_module(bn, out, x.to(out.dtype), relu)
        if _is_conv_bn(ds):
            return dual_bn_act_modules(out, bn, ds[0](x), ds[1], relu)
        return bn_act_module(bn, out, ds(x).to(out.dtype), relu)

    @classmethod
    def can_convert(cls, block: nn.Module) -> bool:
        """True when `block` is the matching torchvision block with plain BatchNorm2d norms and stock forward."""
        from torchvision.models import resnet

        tv_cls = getattr(resnet, cls._torchvision_name)
        return (isinstance(block, tv_cls) and type(block).forward is tv_cls.forward
                and all(_is_plain_bn(getattr(block, name)) for name in cls._norms))

    @classmethod
    def from_torchvision(cls, block: nn.Module) -> "_FusedBlock":
        """The fused block running `block`'s own modules, Parameters and buffers (no copies); its BatchNorms
        are wrapped as BatchNormAct2d sharing their tensors, the training mode is kept."""
        if not cls.can_convert(block):
            raise TypeError(f"fusedres: {cls.__name__}.from_torchvision needs a torchvision {cls._torchvision_name}"
                            f" with nn.BatchNorm2d norms and the stock forward, got {type(block).__name__}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        _copy_children(block, new, cls._norms)
        new.stride = block.stride
        new.training = block.training
        return new

    def to_torchvision(self) -> nn.Module:
        """The torchvision block running this block's modules and tensors (BatchNormAct2d -> BatchNorm2d)."""
        from torchvision.models import resnet

        tv_cls = getattr(resnet, self._torchvision_name)
        old = tv_cls.__new__(tv_cls)
        nn.Module.__init__(old)
        _copy_children(self, old, self._norms)
        old.stride = self.stride
        old.training = self.training
        return old


def _copy_children(src: nn.Module, dst: nn.Module, norms) -> None:
    """dst gets src's children in src's order (so state_dict key order is kept); norms are re-wrapped."""
    to_fused = not isinstance(src, _FusedBlock)
    for name, child in src.named_children():
        if name in norms:
            child = BatchNormAct2d.from_bn(child, act="relu") if to_fused else _to_plain_bn(child)
        setattr(dst, name, child)
    if "downsample" not in dst._modules:
        dst.downsample = None


def _to_plain_bn(bn: nn.BatchNorm2d) -> nn.BatchNorm2d:
    return bn.to_bn() if isinstance(bn, BatchNormAct2d) else bn


class BasicBlock(_FusedBlock):
    """torchvision's BasicBlock (same signature, attributes, state_dict keys) with fused BN + ReLU and a fused
    residual tail: bn1 carries conv1's ReLU, bn2 adds the shortcut then applies the block's final ReLU."""

    expansion: int = 1
    _torchvision_name = "BasicBlock"
    _norms = ("bn1", "bn2")

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1,
                 norm_layer: Optional[Callable[..., nn.Module]] = None) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = _fused_norm(norm_layer, planes, "relu")
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = _fused_norm(norm_layer, planes, "relu")
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn1(self.conv1(x))
        return self._tail(x, self.conv2(out), self.bn2)


class Bottleneck(_FusedBlock):
    """torchvision's Bottleneck (ResNet v1.5, stride on conv2; same signature, attributes, state_dict keys)
    with fused BN + ReLU: bn1 and bn2 carry their ReLUs, bn3 adds the shortcut then applies the final ReLU."""

    expansion: int = 4
    _torchvision_name = "Bottleneck"
    _norms = ("bn1", "bn2", "bn3")

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1,
                 norm_layer: Optional[Callable[..., nn.Module]] = None) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = _fused_norm(norm_layer, width, "relu")
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = _fused_norm(norm_layer, width, "relu")
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = _fused_norm(norm_layer, planes * self.expansion, "relu")
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn1(self.conv1(x))
        out = self.bn2(self.conv2(out))
        return self._tail(x, self.conv3(out), self.bn3)
