"""Fused counterparts of timm's ResNet modules, with timm's attribute names and state_dict keys.

* `TimmBasicBlock` / `TimmBottleneck` stand in for `timm.models.resnet.BasicBlock` / `Bottleneck` (post-activation
  ResNets: resnet18/26/34/50/101/152, the `d`/`t` variants with average-pool downsampling, resnext, wide).
  BatchNorm + ReLU pairs become one `BatchNormAct2d`; the tail `act(bn_last(out) + shortcut)` is one `bn_act`
  (identity shortcut) or one `dual_bn_act` (a downsample `Sequential` ending in a BatchNorm2d: timm's
  `(Conv2d, BN)` or avg-down `(AvgPool2d | Identity, Conv2d, BN)`; its leading modules run as they are).
  Under autocast the block's conv weights are cast in one launch each way, as in the torchvision blocks
  (`block_conv_weights`). A block converts only when that cannot change its result: the stock timm forward,
  plain `nn.BatchNorm2d` norms, `nn.ReLU` activations, and no drop-block, anti-aliasing, attention (SE, ...) or
  drop-path module (each absent, `None` or `nn.Identity`). The others stay stock.
* `TimmBatchNormAct2d` stands in for `timm.layers.BatchNormAct2d` with an `nn.ReLU` activation and no dropout
  (the norms of the pre-activation `resnetv2_*` family): the module's output is its own, so the swap is safe
  wherever it sits.

Every tensor is shared with the timm module (no copies); train/eval mode is kept; the ReLU / drop-block / aa
modules stay as children (unused in forward), so `named_modules` of a block is unchanged apart from the
BatchNorm classes. timm itself is optional: nothing here imports it until `to_timm` is called, and
`can_convert` looks only at modules already imported (a timm module cannot exist otherwise).
"""
from __future__ import annotations

import sys

from torch import Tensor, nn

from fusedres.nn._tree import fuse_bn_relu, unfuse_bn_relu
from fusedres.nn.batchnorm_act import BatchNormAct2d, _share_state
from fusedres.nn._autocast import run_conv
from fusedres.nn.blocks import SkipWeightMixin, _is_plain_bn, block_conv_weights, fused_tail


def _timm_attr(module: str, name: str):
    """timm's `module.name` if timm has been imported, else None (never imports timm)."""
    mod = sys.modules.get(module)
    return None if mod is None else getattr(mod, name, None)


def _absent(m) -> bool:
    return m is None or type(m) is nn.Identity


def _is_fusable_bn(m) -> bool:
    """A BatchNorm2d whose forward is exactly BN (no activation of its own)."""
    return _is_plain_bn(m) and getattr(m, "act", None) is None


class _TimmFusedBlock(SkipWeightMixin, nn.Module):
    _timm_name: str = ""
    _norms: tuple = ()           # BatchNorms, each followed by a ReLU in timm's forward
    _acts: tuple = ()            # those ReLU modules (kept, unused)
    _optional: tuple = ("drop_block", "aa", "se", "drop_path")   # must be absent / Identity

    @classmethod
    def _timm_class(cls):
        return _timm_attr("timm.models.resnet", cls._timm_name)

    @classmethod
    def can_convert(cls, block: nn.Module) -> bool:
        """True when `block` is timm's block (stock forward) with plain BatchNorm2d norms, nn.ReLU activations
        and no drop-block, anti-aliasing, attention or drop-path module."""
        timm_cls = cls._timm_class()
        return (timm_cls is not None and isinstance(block, timm_cls) and type(block).forward is timm_cls.forward
                and all(_is_fusable_bn(getattr(block, n, None)) for n in cls._norms)
                and all(type(getattr(block, n, None)) is nn.ReLU for n in cls._acts)
                and all(_absent(getattr(block, n, None)) for n in cls._optional))

    @classmethod
    def from_timm(cls, block: nn.Module) -> "_TimmFusedBlock":
        """The fused block running `block`'s own modules, Parameters and buffers (no copies); its BatchNorms are
        wrapped as BatchNormAct2d sharing their tensors; plain attributes (stride, dilation, se=None, ...) and
        the training mode are kept."""
        if not cls.can_convert(block):
            raise TypeError(f"fusedres: {cls.__name__}.from_timm needs a timm {cls._timm_name} with "
                            f"nn.BatchNorm2d norms, nn.ReLU activations, the stock forward and no drop-block, "
                            f"anti-aliasing, attention or drop-path, got {type(block).__name__}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        _copy_state(block, new, cls._norms, to_fused=True)
        return new

    def to_timm(self) -> nn.Module:
        """timm's block running this block's modules and tensors (BatchNormAct2d -> BatchNorm2d)."""
        self._refuse_unconvert(f"timm's {self._timm_name}")
        import timm.models.resnet  # noqa: F401  (the class must exist to rebuild it)

        timm_cls = self._timm_class()
        old = timm_cls.__new__(timm_cls)
        nn.Module.__init__(old)
        _copy_state(self, old, self._norms, to_fused=False)
        return old

    def zero_init_last(self) -> None:
        """timm's hook (called by `ResNet.init_weights(zero_init_last=True)`): zero the last BN's weight."""
        bn = getattr(self, self._norms[-1])
        if bn.weight is not None:
            nn.init.zeros_(bn.weight)

    def _fused_tail(self, x: Tensor, out: Tensor, bn: BatchNormAct2d, weights: dict) -> Tensor:
        return fused_tail(bn, out, x, self.downsample, True, *self.skip_gains(), weights=weights)


def _copy_state(src: nn.Module, dst: nn.Module, norms, to_fused: bool) -> None:
    """dst gets src's children in src's order (state_dict key order kept; norms re-wrapped sharing tensors) and
    its plain public attributes (stride, dilation, and the None-valued se / downsample / drop_path)."""
    for name, child in src.named_children():
        if name in norms:
            child = BatchNormAct2d.from_bn(child, act="relu") if to_fused else _plain_bn(child)
        setattr(dst, name, child)
    for name, value in vars(src).items():
        if not name.startswith("_") and name != "training" and name not in vars(dst):
            setattr(dst, name, value)
    dst.training = src.training


def _plain_bn(bn: nn.BatchNorm2d) -> nn.BatchNorm2d:
    return bn.to_bn() if isinstance(bn, BatchNormAct2d) else bn


class TimmBasicBlock(_TimmFusedBlock):
    """timm.models.resnet.BasicBlock with fused BN + ReLU: bn1 carries act1, bn2 adds the shortcut and applies
    act2 (`bn_act` or, with a `(..., Conv2d, BN)` downsample, `dual_bn_act`)."""

    expansion: int = 1
    _timm_name = "BasicBlock"
    _norms = ("bn1", "bn2")
    _acts = ("act1", "act2")

    def forward(self, x: Tensor) -> Tensor:
        w = block_conv_weights(self, x, ("conv1", "conv2"))  # under autocast: one cast launch (blocks.py)
        out = self.bn1(run_conv(self.conv1, x, w))          # drop_block, aa: Identity
        return self._fused_tail(x, run_conv(self.conv2, out, w), self.bn2, w)


class TimmBottleneck(_TimmFusedBlock):
    """timm.models.resnet.Bottleneck with fused BN + ReLU: bn1 and bn2 carry act1 / act2, bn3 adds the
    shortcut and applies act3."""

    expansion: int = 4
    _timm_name = "Bottleneck"
    _norms = ("bn1", "bn2", "bn3")
    _acts = ("act1", "act2", "act3")

    def forward(self, x: Tensor) -> Tensor:
        w = block_conv_weights(self, x, ("conv1", "conv2", "conv3"))
        out = self.bn1(run_conv(self.conv1, x, w))
        out = self.bn2(run_conv(self.conv2, out, w))        # drop_block, aa: Identity
        return self._fused_tail(x, run_conv(self.conv3, out, w), self.bn3, w)


TIMM_BLOCKS = (TimmBasicBlock, TimmBottleneck)


class TimmBatchNormAct2d(BatchNormAct2d):
    """`fusedres.nn.BatchNormAct2d(act="relu")` converted from a `timm.layers.BatchNormAct2d` (nn.ReLU
    activation, Identity drop): same parameters, buffers and state_dict keys, BN + ReLU as one fused op.
    `relu_inplace` remembers the timm ReLU's `inplace` flag so `to_timm` rebuilds the same module."""

    relu_inplace: bool = True

    @staticmethod
    def can_convert(m: nn.Module) -> bool:
        timm_cls = _timm_attr("timm.layers.norm_act", "BatchNormAct2d")
        return (timm_cls is not None and type(m) is timm_cls and type(getattr(m, "act", None)) is nn.ReLU
                and type(getattr(m, "drop", None)) is nn.Identity)

    @classmethod
    def from_timm(cls, m: nn.Module) -> "TimmBatchNormAct2d":
        """The fused module sharing m's tensors (no copies) and training mode."""
        if not cls.can_convert(m):
            raise TypeError(f"fusedres: TimmBatchNormAct2d.from_timm needs a timm BatchNormAct2d with an nn.ReLU "
                            f"activation and no dropout, got {type(m).__name__}")
        new = cls.from_bn(m, act="relu")
        new.relu_inplace = m.act.inplace
        return new

    def to_timm(self) -> nn.Module:
        """A timm.layers.BatchNormAct2d (ReLU, no dropout) sharing this module's tensors."""
        from timm.layers import BatchNormAct2d as TimmBNAct

        old = TimmBNAct(self.num_features, self.eps, self.momentum, self.weight is not None,
                        self.track_running_stats, act_layer=nn.ReLU, inplace=self.relu_inplace, device="meta")
        _share_state(self, old)
        return old


def is_stock_timm_resnet(model: nn.Module) -> bool:
    """A timm.models.resnet.ResNet whose forward path (stem included) is timm's own."""
    resnet_cls = _timm_attr("timm.models.resnet", "ResNet")
    return (resnet_cls is not None and isinstance(model, resnet_cls)
            and all(getattr(type(model), f) is getattr(resnet_cls, f)
                    for f in ("forward", "forward_features", "forward_intermediates")))


def _stem_pairs(model: nn.Module):
    """(container, bn name, act name) of every BatchNorm2d -> ReLU pair of a timm ResNet's stem: bn1 -> act1,
    and consecutive pairs inside a Sequential deep stem (`conv1`) or conv stem pool (`maxpool`)."""
    pairs = [(model, "bn1", "act1")]
    for name in ("conv1", "maxpool"):
        seq = getattr(model, name, None)
        if type(seq) is nn.Sequential:
            keys = list(seq._modules)
            pairs += [(seq, a, b) for a, b in zip(keys, keys[1:])]
    return pairs


def fuse_timm_stem(model: nn.Module) -> None:
    """In a stock timm ResNet, each stem BatchNorm2d followed by a ReLU becomes BatchNormAct2d(act="relu") and
    the ReLU nn.Identity (the BN output feeds only that ReLU in timm's forward). Idempotent."""
    if not is_stock_timm_resnet(model):
        return
    for parent, bn_name, act_name in _stem_pairs(model):
        fuse_bn_relu(parent, bn_name, act_name)


def unfuse_timm_stem(model: nn.Module) -> None:
    """The inverse of `fuse_timm_stem`: BatchNormAct2d(relu) + Identity back to BatchNorm2d + ReLU(inplace=True)."""
    if not is_stock_timm_resnet(model):
        return
    for parent, bn_name, act_name in _stem_pairs(model):
        unfuse_bn_relu(parent, bn_name, act_name)
