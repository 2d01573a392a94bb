"""Inference modules with BatchNorm folded into the convolution (`fusedres.fold`): every conv + BN (+ residual
add) (+ ReLU) runs as one `fusedres.ops.conv_bn_act` kernel.

* `FoldedConv2d` — an `nn.Conv2d` (same weight/bias Parameters, same state_dict keys) whose forward is
  `act(conv(x) * scale + shift [+ residual])`, with (scale, shift) = the eval-mode BN that followed it, held as
  non-persistent buffers computed by `refold()`.
* `FoldedBatchNorm2d` — an `nn.BatchNorm2d` keeping the folded BN's tensors (so state_dict keys and values are
  unchanged) whose forward is the identity: its work happens in the preceding `FoldedConv2d`.
* `FoldedBasicBlock` / `FoldedBottleneck` — ResNet blocks with torchvision's attribute names; the last conv
  takes the shortcut (identity, or the downsample's folded conv output) as its residual.

Folded modules are inference-only: forward raises in training mode. After loading a state_dict (or changing
conv/BN tensors) call `fusedres.fold(model, inplace=True)` again (or `refold()` on each FoldedConv2d) to
recompute the folded constants.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from fusedres.ops.conv_bn_act import conv_bn_act


def _check_eval(module: nn.Module) -> None:
    if module.training:
        raise RuntimeError(f"fusedres: {type(module).__name__} is a folded inference module; it cannot run in "
                           f"training mode (fold a model in eval mode and keep it in eval mode)")


class FoldedConv2d(nn.Conv2d):
    """nn.Conv2d + a folded eval-mode BatchNorm (+ residual) (+ ReLU) in one kernel. forward(x, residual=None)."""

    @classmethod
    def from_conv_bn(cls, conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d], relu: bool) -> "FoldedConv2d":
        if type(conv) not in (nn.Conv2d, FoldedConv2d) or conv.padding_mode != "zeros" \
                or isinstance(conv.padding, str):
            raise TypeError(f"fusedres: cannot fold {conv!r} (needs nn.Conv2d with int padding, zeros mode)")
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                  conv.groups, conv.bias is not None, device="meta")
        new.weight = conv.weight
        new.bias = conv.bias
        with torch.no_grad():  # kernels read [C_out, KH, KW, C_in/g]: keep the weight channels_last
            new.weight.data = new.weight.data.contiguous(memory_format=torch.channels_last)
        new.fold_relu = relu
        new._folded_bn = (bn,)  # a tuple: not a registered child, so state_dict keys are the conv's own
        new.register_buffer("fold_scale", None, persistent=False)
        new.register_buffer("fold_shift", None, persistent=False)
        new.refold()
        new.train(conv.training)
        return new

    @torch.no_grad()
    def refold(self) -> None:
        """Recompute (scale, shift) from the BN's current running statistics and parameters (float32; float64
        for a float64 model)."""
        bn = self._folded_bn[0]
        w = self.weight
        acc = torch.float64 if w.dtype == torch.float64 else torch.float32
        c = self.out_channels
        if bn is None:
            scale = None
            shift = self.bias.to(acc) if self.bias is not None else None
        else:
            if bn.running_mean is None:
                raise ValueError("fusedres: cannot fold a BatchNorm without running statistics")
            scale = torch.rsqrt(bn.running_var.to(acc) + bn.eps)
            if bn.weight is not None:
                scale = scale * bn.weight.to(acc)
            shift = -bn.running_mean.to(acc) * scale
            if bn.bias is not None:
                shift = shift + bn.bias.to(acc)
            if self.bias is not None:
                shift = shift + self.bias.to(acc) * scale
        self.fold_scale = None if scale is None else scale.to(w.device).reshape(c).contiguous()
        self.fold_shift = None if shift is None else shift.to(w.device).reshape(c).contiguous()

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        _check_eval(self)
        if x.dtype != self.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"fusedres: input dtype {x.dtype} != weight dtype {self.weight.dtype}")
        return conv_bn_act(x, self.weight, stride=self.stride, padding=self.padding, dilation=self.dilation,
                           groups=self.groups, out_scale=self.fold_scale, out_shift=self.fold_shift,
                           residual=residual, relu=self.fold_relu)

    def extra_repr(self) -> str:
        bn = self._folded_bn[0]
        return f"{super().extra_repr()}, folded_bn={bn is not None}, relu={self.fold_relu}"


class FoldedBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d folded into the preceding FoldedConv2d: same tensors and state_dict keys, identity forward."""

    @classmethod
    def from_bn(cls, bn: nn.BatchNorm2d) -> "FoldedBatchNorm2d":
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.weight is not None, bn.track_running_stats,
                  device="meta")
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            setattr(new, name, getattr(bn, name))
        new.train(bn.training)
        return new

    def forward(self, x: Tensor) -> Tensor:
        _check_eval(self)
        return x


class _FoldedBlock(nn.Module):
    _convs: tuple = ()  # (conv, bn) attribute pairs, the last one takes the shortcut

    @classmethod
    def from_block(cls, block: nn.Module) -> "_FoldedBlock":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        pairs = dict(cls._convs)
        last = cls._convs[-1][0]
        bns = {}
        for name, child in block.named_children():  # keep the source's child order (state_dict key order)
            if name in pairs.values():
                child = bns[name] = FoldedBatchNorm2d.from_bn(child)
            setattr(new, name, child)
        for conv_name, bn_name in cls._convs:
            setattr(new, conv_name, FoldedConv2d.from_conv_bn(getattr(block, conv_name), bns[bn_name], True))
        ds = getattr(block, "downsample", None)
        if ds is not None and type(ds) is nn.Sequential and len(ds) == 2 and isinstance(ds[0], nn.Conv2d) \
                and isinstance(ds[1], nn.BatchNorm2d):
            fbn = FoldedBatchNorm2d.from_bn(ds[1])
            new.downsample = nn.Sequential(FoldedConv2d.from_conv_bn(ds[0], fbn, False), fbn)
        elif "downsample" not in new._modules:
            new.downsample = ds
        new.stride = block.stride
        new._last = last
        new.train(block.training)
        return new

    def forward(self, x: Tensor) -> Tensor:
        _check_eval(self)
        identity = x if self.downsample is None else self.downsample(x).to(x.dtype)
        out = x
        for conv_name, _ in self._convs[:-1]:
            out = getattr(self, conv_name)(out)
        return getattr(self, self._convs[-1][0])(out, identity)


class FoldedBasicBlock(_FoldedBlock):
    """BasicBlock with bn1/bn2 folded: relu(conv1·bn1) then relu(conv2·bn2 + shortcut), two kernels."""
    _convs = (("conv1", "bn1"), ("conv2", "bn2"))


class FoldedBottleneck(_FoldedBlock):
    """Bottleneck with bn1..bn3 folded: three kernels (the last adds the shortcut), plus one for a projection."""
    _convs = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))


def folded_class(m: nn.Module):
    """The folded block class `m` becomes under `fusedres.fold` (a torchvision BasicBlock / Bottleneck, or its
    fused bn- or conv-mode form, with running statistics everywhere), or None."""
    from torchvision.models import resnet

    from fusedres.nn.blocks import BasicBlock, Bottleneck
    from fusedres.nn.conv_blocks import ConvBasicBlock, ConvBottleneck

    pairs = ((resnet.BasicBlock, FoldedBasicBlock), (resnet.Bottleneck, FoldedBottleneck),
             (BasicBlock, FoldedBasicBlock), (Bottleneck, FoldedBottleneck),
             (ConvBasicBlock, FoldedBasicBlock), (ConvBottleneck, FoldedBottleneck))
    if getattr(m, "skip_weight", None) is not None:
        return None  # a learned skip weight: left as is (its fused eval path is already one pass per tail)
    for src, dst in pairs:
        if isinstance(m, src) and type(m).forward is src.forward:
            if all(isinstance(getattr(m, bn), nn.BatchNorm2d) and getattr(m, bn).running_mean is not None
                   for _, bn in dst._convs):
                return dst
    return None
