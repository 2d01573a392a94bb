"""Fused ResNet blocks: drop-in `BasicBlock` and `Bottleneck` with torchvision's constructor, attribute names
and state_dict keys.

Every BatchNorm becomes a `BatchNormAct2d`; the ones followed by a ReLU carry it (`act="relu"`), and the
last one also takes the shortcut as its residual, so a block's tail is one fused op:

* identity shortcut: `relu(bn_last(out) + x)` — `bn_act` with `residual`;
* torchvision-style downsample `Sequential(Conv2d, BatchNorm2d)`: `relu(bn_last(out) + bn_ds(conv_ds(x)))` —
  `dual_bn_act`, both BatchNorms in one pass (forward hooks on `downsample` itself are then not called);
* any other downsample module: it runs as is and its output is the residual.

Under autocast a block casts its float32 conv weights (and the downsample conv's) in one `cast_weights` launch
each way and runs each conv as `F.conv2d` with its cast weight, bitwise the module calls; a block whose convs
have hooks (or are not nn.Conv2d itself) calls its conv modules instead, each casting its own weight.

The fused tail saves the block input (already saved by conv1) instead of the block output, so a block keeps
one activation fewer alive for backward than the stock one. `self.relu` stays (an `nn.ReLU`, unused in
forward) for code that inspects torchvision blocks. torchvision is imported only by `to_torchvision`.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from fusedres.nn._autocast import block_weights, run_conv
from fusedres.nn.batchnorm_act import BatchNormAct2d, bn_act_module, dual_bn_act_modules
from fusedres.nn.sync_batchnorm import SyncBatchNormAct2d


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    """torchvision's conv3x3 (padding = dilation, no bias)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation, groups=groups,
                     bias=False, dilation=dilation)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """torchvision's conv1x1 (no bias)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


SKIP_KINDS = ("scalar", "channel")
SKIP_SIDES = ("branch", "shortcut")


def _is_plain_bn(m) -> bool:
    return type(m) in (nn.BatchNorm2d, BatchNormAct2d, SyncBatchNormAct2d)


def _with_act(bn: nn.BatchNorm2d, act: Optional[str]) -> BatchNormAct2d:
    """bn as a BatchNormAct2d with `act`, sharing its tensors; a SyncBatchNormAct2d stays one (same group)."""
    return (type(bn) if isinstance(bn, BatchNormAct2d) else BatchNormAct2d).from_bn(bn, act=act)


def _is_conv_bn(m) -> bool:
    """True for a torchvision-style downsample: Sequential(Conv2d, BatchNorm2d) with nothing else."""
    return type(m) is nn.Sequential and len(m) == 2 and isinstance(m[0], nn.Conv2d) and _is_plain_bn(m[1])


def _tail_runs_parts(downsample) -> bool:
    """Whether `fused_tail` runs `downsample`'s modules one by one and fuses its last BN (an `nn.Sequential` whose
    last module is a plain BatchNorm2d)."""
    return (type(downsample) is nn.Sequential and len(downsample) >= 2 and _is_plain_bn(downsample[-1])
            and getattr(downsample[-1], "act", None) is None)


def block_conv_weights(block: nn.Module, x: Tensor, names) -> dict:
    """Under autocast, {conv: weight cast to the autocast dtype} for the block's convs `names` and the convs
    `fused_tail` runs from its downsample (torchvision's `(Conv2d, BN)`), all in one `cast_weights` launch (one
    backward) where each conv would cast its own; {} (the block calls its conv modules) without autocast, with
    non-float32 weights, or when one of those convs is not an nn.Conv2d itself or has hooks (`block_weights`)."""
    ds = block.downsample
    shortcut = [m for m in list(ds)[:-1] if isinstance(m, nn.Conv2d)] if _tail_runs_parts(ds) else []
    return block_weights(x, [getattr(block, n) for n in names] + shortcut)


def fused_tail(bn: nn.BatchNorm2d, out: Tensor, x: Tensor, downsample: Optional[nn.Module], relu: bool,
               gain: Optional[Tensor] = None, residual_gain: Optional[Tensor] = None,
               weights: Optional[dict] = None) -> Tensor:
    """A post-activation block's tail `act(bn(out) + shortcut)`, shortcut = x or downsample(x), fused as far as
    the downsample allows: none -> `bn_act` with x as residual; an `nn.Sequential` whose last module is a plain
    BatchNorm2d (torchvision's `(Conv2d, BN)`, timm's avg-down `(AvgPool2d | Identity, Conv2d, BN)`) -> the
    modules before that BN run as they are, then `dual_bn_act` applies both BNs, the add and the ReLU in one
    pass; any other module runs as is and its output is the residual. Shared by the torchvision and timm
    blocks. `gain` / `residual_gain` (learned skip weights on the branch / the shortcut) ride in the same pass;
    a downsample conv found in `weights` (`block_conv_weights`) runs with that already cast weight."""
    if downsample is None:
        return bn_act_module(bn, out, x.to(out.dtype), relu, gain, residual_gain)
    if _tail_runs_parts(downsample):
        r = x
        for m in list(downsample)[:-1]:
            r = run_conv(m, r, weights)
        return dual_bn_act_modules(out, bn, r, downsample[-1], relu, gain, residual_gain)
    return bn_act_module(bn, out, downsample(x).to(out.dtype), relu, gain, residual_gain)


def _fused_norm(norm_layer, channels: int, act: Optional[str]) -> BatchNormAct2d:
    bn = (norm_layer or nn.BatchNorm2d)(channels)
    if not isinstance(bn, nn.BatchNorm2d) or not _is_plain_bn(bn):
        raise TypeError(f"fusedres blocks fuse nn.BatchNorm2d only; norm_layer built a {type(bn).__name__} "
                        f"(keep the torchvision block for other norms)")
    return _with_act(bn, act)


class SkipWeightMixin:
    """Optional learned skip weight of a post-activation block whose tail is `act(bn_last(out) + shortcut)`
    (torchvision-style and timm fused blocks); `_norms[-1]` names the last BN."""

    def skip_gains(self) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """(gain on the residual branch, gain on the shortcut): the learned skip weight on its side, else None."""
        w = getattr(self, "skip_weight", None)
        if w is None:
            return None, None
        return (w, None) if self.skip_on == "branch" else (None, w)

    def add_skip_weight(self, kind: str = "scalar", on: str = "branch", init: float = 1.0) -> "SkipWeightMixin":
        """Give the block a learned skip weight: `relu(a * BN(F(x)) + shortcut)` (on="branch"; ReZero/SkipInit
        style with init=0) or `relu(BN(F(x)) + b * shortcut)` (on="shortcut"), with one value (kind="scalar")
        or one per output channel (kind="channel"), registered as the Parameter `skip_weight`. It is folded
        into the tail's fused pass (no extra read or write of the activation)."""
        if kind not in SKIP_KINDS:
            raise ValueError(f"fusedres: skip weight kind must be one of {SKIP_KINDS}, got {kind!r}")
        if on not in SKIP_SIDES:
            raise ValueError(f"fusedres: skip weight side `on` must be one of {SKIP_SIDES}, got {on!r}")
        if getattr(self, "skip_weight", None) is not None:
            raise ValueError(f"fusedres: {type(self).__name__} already has a skip weight")
        last = getattr(self, self._norms[-1])
        ref = last.weight if last.weight is not None else last.running_mean
        channels = 1 if kind == "scalar" else last.num_features
        self.skip_weight = nn.Parameter(torch.full((channels,), float(init),
                                                   dtype=None if ref is None else ref.dtype,
                                                   device=None if ref is None else ref.device))
        self.skip_on = on
        return self

    def _refuse_unconvert(self, stock_name: str) -> None:
        if getattr(self, "skip_weight", None) is not None:
            raise ValueError(f"fusedres: this {type(self).__name__} has a learned skip weight, which {stock_name} "
                             f"has no place for; it cannot be unconverted")


class _FusedBlock(SkipWeightMixin, nn.Module):
    expansion: int = 1
    _torchvision_name: str = ""
    _norms: tuple = ()

    def _tail(self, x: Tensor, out: Tensor, bn: BatchNormAct2d, weights: Optional[dict] = None) -> Tensor:
        """act(bn(out) + shortcut(x)), fused as far as the shortcut allows; a skip weight rides along."""
        return fused_tail(bn, out, x, self.downsample, bn.act == "relu", *self.skip_gains(), weights=weights)

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

        self._refuse_unconvert(f"torchvision's {self._torchvision_name}")
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
            child = _with_act(child, "relu") if to_fused else _to_plain_bn(child)
        setattr(dst, name, child)
    if "downsample" not in dst._modules:
        dst.downsample = None


def _to_plain_bn(bn: nn.BatchNorm2d) -> nn.BatchNorm2d:
    if isinstance(bn, SyncBatchNormAct2d):
        return _with_act(bn, None)  # stays synchronised
    return bn.to_bn() if isinstance(bn, BatchNormAct2d) else bn


class BasicBlock(_FusedBlock):
    """torchvision's BasicBlock (same signature, attributes, state_dict keys) with fused BN + ReLU and a fused
    residual tail: bn1 carries conv1's ReLU, bn2 adds the shortcut then applies the block's final ReLU."""

    expansion: int = 1
    _torchvision_name = "BasicBlock"
    _norms = ("bn1", "bn2")

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1,
                 norm_layer: Optional[Callable[..., nn.Module]] = None, *, skip_weight: Optional[str] = None,
                 skip_on: str = "branch", skip_init: float = 1.0) -> None:
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
        if skip_weight is not None:
            self.add_skip_weight(skip_weight, skip_on, skip_init)

    def forward(self, x: Tensor) -> Tensor:
        w = block_conv_weights(self, x, ("conv1", "conv2"))  # {} outside autocast: the conv modules as before
        out = self.bn1(run_conv(self.conv1, x, w))
        return self._tail(x, run_conv(self.conv2, out, w), self.bn2, w)


class Bottleneck(_FusedBlock):
    """torchvision's Bottleneck (ResNet v1.5, stride on conv2; same signature, attributes, state_dict keys)
    with fused BN + ReLU: bn1 and bn2 carry their ReLUs, bn3 adds the shortcut then applies the final ReLU."""

    expansion: int = 4
    _torchvision_name = "Bottleneck"
    _norms = ("bn1", "bn2", "bn3")

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1,
                 norm_layer: Optional[Callable[..., nn.Module]] = None, *, skip_weight: Optional[str] = None,
                 skip_on: str = "branch", skip_init: float = 1.0) -> None:
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
        if skip_weight is not None:
            self.add_skip_weight(skip_weight, skip_on, skip_init)

    def forward(self, x: Tensor) -> Tensor:
        w = block_conv_weights(self, x, ("conv1", "conv2", "conv3"))  # {} outside autocast: the modules as before
        out = self.bn1(run_conv(self.conv1, x, w))
        out = self.bn2(run_conv(self.conv2, out, w))
        return self._tail(x, run_conv(self.conv3, out, w), self.bn3, w)
