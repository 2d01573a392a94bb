"""Training-mode single-pass blocks (`fusedres.convert(model, mode="conv")`): the MLPerf pattern in PyTorch.

In a `ConvBasicBlock` / `ConvBottleneck` (subclasses of the fused blocks, same attributes and state_dict keys):

* each conv but the last emits its raw output plus the BN batch statistics of that output (epilogue of the
  `conv_bn_act` kernel); no BN or ReLU pass over it;
* the next conv applies that BN + ReLU to its input tiles as it loads them (prologue), with
  (scale, shift) = (gamma / sqrt(var + eps), beta - mean * scale) computed from the statistics as a few
  per-channel ops, so autograd differentiates through the statistics exactly as BatchNorm does;
* the last conv (and a projection shortcut's conv) emit their statistics too, and the block tail (last BN +
  shortcut add [+ projection BN] + ReLU) is one `scale_shift_act` pass over the conv output(s), with the
  statistics as differentiable inputs (no separate statistics pass). When a tail BN uses running statistics
  (eval) the tail is the fused block's `bn_act` / `dual_bn_act` op.

Backward: `aten.convolution_backward` for dgrad/wgrad plus the per-channel prologue/epilogue derivatives; the
raw conv output is saved (it is the next conv's input anyway) and BN + ReLU are recomputed from it, so the
normalised activation is never stored. Running statistics, `momentum` (incl. None) and `num_batches_tracked`
follow nn.BatchNorm2d. In eval mode (or when a BN uses running statistics) the prologue uses the running
statistics. Blocks whose convs have a bias or non-zero padding modes run the parent fused forward.
"""
from __future__ import annotations

from torch import Tensor, nn

from fusedres.nn.batchnorm_act import _per_channel, _uses_batch_stats, batch_norm_args, gained_affine
from fusedres.nn.blocks import BasicBlock, Bottleneck, _is_conv_bn
from fusedres._layout import acc_dtype
from fusedres.ops._common import check_batch_size, scale_shift, update_running_stats
from fusedres.ops.bn_act import residual_args
from fusedres.ops.conv_bn_act import conv_bn_act
from fusedres.ops.scale_shift_act import scale_shift_act


def _plain_conv(conv) -> bool:
    return (type(conv) is nn.Conv2d and conv.bias is None and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str))


def _conv(conv: nn.Conv2d, x: Tensor, prologue, stats: bool):
    s, t = prologue if prologue is not None else (None, None)
    return conv_bn_act(x, conv.weight, stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                       groups=conv.groups, in_scale=s, in_shift=t, in_relu=prologue is not None, stats=stats)


def _bn_stats(bn: nn.BatchNorm2d, out, gain=None):
    """(mean, scale, shift) with gain * BN(c) = (c - mean) * scale + shift: from the batch statistics in
    out = (c, mean, var) (training; running statistics updated as nn.BatchNorm2d does) or from the running
    statistics (eval). The batch statistics stay differentiable; `gain` is an optional learned skip weight."""
    c = out[0]
    if _uses_batch_stats(bn):  # as nn.BatchNorm2d, before num_batches_tracked is touched
        check_batch_size(c, "the conv output")
    args = batch_norm_args(bn)  # num_batches_tracked bookkeeping, once per forward
    acc = acc_dtype(c.dtype)
    if args["training"]:
        _, mean, var = out
        update_running_stats(args["running_mean"], args["running_var"], mean.detach(), var.detach(),
                             c.shape[0] * c.shape[2] * c.shape[3], args["momentum"], args["num_batches_tracked"])
    else:
        mean, var = args["running_mean"].to(acc), args["running_var"].to(acc)
    _, scale, shift = scale_shift(mean, var, *gained_affine(bn, gain), bn.eps)
    return mean, scale, shift


def _bn_prologue(bn: nn.BatchNorm2d, out):
    """(scale, shift') of bn for the next conv's prologue: BN(c) = c * scale + shift'."""
    mean, scale, shift = _bn_stats(bn, out)
    return scale, shift - mean * scale


class _ConvTrainMixin:
    _chain: tuple = ()  # (conv, bn) pairs whose BN + ReLU move into the next conv's prologue

    def _can_run(self, x) -> bool:
        convs = [getattr(self, c) for c, _ in self._chain] + [getattr(self, self._last_conv)]
        return all(_plain_conv(c) for c in convs) and x.dim() == 4

    def forward(self, x: Tensor) -> Tensor:
        if not self._can_run(x):
            return super().forward(x)
        out, prologue = x, None
        for conv_name, bn_name in self._chain:
            bn = getattr(self, bn_name)
            res = _conv(getattr(self, conv_name), out, prologue, stats=_uses_batch_stats(bn))
            if not isinstance(res, tuple):
                res = (res, None, None)
            prologue = _bn_prologue(bn, res)
            out = res[0]
        last_conv, last_bn = getattr(self, self._last_conv), getattr(self, self._last_bn)
        if not _uses_batch_stats(last_bn):
            return self._tail(x, _conv(last_conv, out, prologue, stats=False), last_bn)
        # the last conv emits its statistics too; the tail is one scale_shift_act pass over its output
        res = _conv(last_conv, out, prologue, stats=True)
        gain, res_gain = self.skip_gains()  # learned skip weights fold into the tail's per-channel vectors
        mean, scale, shift = _bn_stats(last_bn, res, gain)
        c = res[0]
        relu = getattr(last_bn, "act", "relu") == "relu"
        ds = self.downsample
        if _is_conv_bn(ds) and _plain_conv(ds[0]) and _uses_batch_stats(ds[1]):
            res_b = _conv(ds[0], x, None, stats=True)
            mean_b, scale_b, shift_b = _bn_stats(ds[1], res_b, res_gain)
            return scale_shift_act(c, mean, scale, shift, xb=res_b[0].to(c.dtype), mean_b=mean_b, scale_b=scale_b,
                                   shift_b=shift_b, relu=relu)
        residual = (x if ds is None else ds(x)).to(c.dtype)
        res_weight = None if res_gain is None else _per_channel(res_gain, c.shape[1])
        return scale_shift_act(c, mean, scale, shift, *residual_args(c, residual, res_weight), relu=relu)

    @classmethod
    def from_fused(cls, block: nn.Module) -> nn.Module:
        """The conv-mode block running `block`'s own modules (a fusedres BasicBlock / Bottleneck)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for name, child in block.named_children():
            setattr(new, name, child)
        for name, param in block._parameters.items():  # a learned skip weight
            new.register_parameter(name, param)
        if hasattr(block, "skip_on"):
            new.skip_on = block.skip_on
        if "downsample" not in new._modules:
            new.downsample = None
        new.stride = block.stride
        new.training = block.training
        return new


class ConvBasicBlock(_ConvTrainMixin, BasicBlock):
    """BasicBlock: conv1 (+ bn1 statistics) -> conv2 with bn1 + ReLU in its prologue -> bn2 + shortcut + ReLU."""
    _chain = (("conv1", "bn1"),)
    _last_conv, _last_bn = "conv2", "bn2"


class ConvBottleneck(_ConvTrainMixin, Bottleneck):
    """Bottleneck: conv1 (+ stats) -> conv2 (bn1 + ReLU prologue, + stats) -> conv3 (bn2 + ReLU prologue)
    -> bn3 + shortcut (+ projection BN) + ReLU."""
    _chain = (("conv1", "bn1"), ("conv2", "bn2"))
    _last_conv, _last_bn = "conv3", "bn3"


CONV_BLOCKS = {BasicBlock: ConvBasicBlock, Bottleneck: ConvBottleneck}

# The conv-mode pre-activation units (built on the helpers above) add themselves to CONV_BLOCKS on import.
import fusedres.nn.preact_conv  # noqa: E402,F401
