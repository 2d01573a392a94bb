"""Fused pre-activation units: `PreActBasicBlock` / `PreActBottleneck` with the attribute names and state_dict
keys of the stock `fusedres.preact` units, each `BN -> ReLU` pair run as one `BatchNormAct2d(act="relu")` op.

A pre-activation unit adds the shortcut *after* its last conv, with no BatchNorm or ReLU after the add, so there
is no residual to fuse: what fusion buys here is one pass per BN + ReLU instead of two. The projection shortcut
(stage entry) reads the fused `relu(bn1(x))`, as in stock. `self.relu` stays (unused in forward) for code that
inspects the units. A unit converts when it is exactly the stock class (stock forward) with plain BatchNorm2d
norms and an nn.ReLU.
"""
from __future__ import annotations

from torch import Tensor, nn

from fusedres.nn._tree import fuse_bn_relu, unfuse_bn_relu
from fusedres.nn.batchnorm_act import BatchNormAct2d
from fusedres.nn.blocks import _is_plain_bn


def _is_fusable_bn(m) -> bool:
    return _is_plain_bn(m) and getattr(m, "act", None) is None


class _FusedPreAct(nn.Module):
    expansion: int = 1
    _stock_name: str = ""
    _norms: tuple = ()

    @classmethod
    def _stock_class(cls):
        from fusedres import preact

        return getattr(preact, cls._stock_name)

    @classmethod
    def can_convert(cls, block: nn.Module) -> bool:
        stock = cls._stock_class()
        return (isinstance(block, stock) and type(block).forward is stock.forward
                and type(getattr(block, "relu", None)) is nn.ReLU
                and all(_is_fusable_bn(getattr(block, n, None)) for n in cls._norms))

    @classmethod
    def from_stock(cls, block: nn.Module) -> "_FusedPreAct":
        """The fused unit running `block`'s own convs, Parameters and buffers (no copies; BatchNorms wrapped as
        BatchNormAct2d sharing their tensors), training mode kept."""
        if not cls.can_convert(block):
            raise TypeError(f"fusedres: {cls.__name__}.from_stock needs a fusedres.preact.{cls._stock_name} with "
                            f"nn.BatchNorm2d norms and the stock forward, got {type(block).__name__}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        _copy(block, new, cls._norms, to_fused=True)
        return new

    def to_stock(self) -> nn.Module:
        """The stock `fusedres.preact` unit running this unit's modules and tensors."""
        stock = self._stock_class()
        old = stock.__new__(stock)
        nn.Module.__init__(old)
        _copy(self, old, self._norms, to_fused=False)
        return old

    def _preact(self, x: Tensor):
        out = self.bn1(x)
        return out, (x if self.downsample is None else self.downsample(out))


def _copy(src: nn.Module, dst: nn.Module, norms, to_fused: bool) -> None:
    for name, child in src.named_children():
        if name in norms:
            child = BatchNormAct2d.from_bn(child, act="relu") if to_fused else (
                child.to_bn() if isinstance(child, BatchNormAct2d) else child)
        setattr(dst, name, child)
    if "downsample" not in dst._modules:
        dst.downsample = None
    dst.stride = src.stride
    dst.training = src.training


class PreActBasicBlock(_FusedPreAct):
    """Fused `fusedres.preact.PreActBasicBlock`: bn1 and bn2 carry the ReLU."""

    expansion: int = 1
    _stock_name = "PreActBasicBlock"
    _norms = ("bn1", "bn2")

    def forward(self, x: Tensor) -> Tensor:
        out, shortcut = self._preact(x)
        out = self.conv2(self.bn2(self.conv1(out)))
        return out + shortcut


class PreActBottleneck(_FusedPreAct):
    """Fused `fusedres.preact.PreActBottleneck`: bn1, bn2 and bn3 carry the ReLU."""

    expansion: int = 4
    _stock_name = "PreActBottleneck"
    _norms = ("bn1", "bn2", "bn3")

    def forward(self, x: Tensor) -> Tensor:
        out, shortcut = self._preact(x)
        out = self.bn2(self.conv1(out))
        out = self.conv3(self.bn3(self.conv2(out)))
        return out + shortcut


PREACT_BLOCKS = (PreActBasicBlock, PreActBottleneck)


def is_stock_preact_resnet(model: nn.Module) -> bool:
    from fusedres.preact import PreActResNet

    return isinstance(model, PreActResNet) and type(model).forward is PreActResNet.forward


def fuse_preact_head(model: nn.Module) -> None:
    """The final BN -> ReLU of a stock PreActResNet as one BatchNormAct2d (relu -> nn.Identity). Idempotent."""
    if is_stock_preact_resnet(model):
        fuse_bn_relu(model, "bn", "relu")


def unfuse_preact_head(model: nn.Module) -> None:
    if is_stock_preact_resnet(model):
        unfuse_bn_relu(model, "bn", "relu")
