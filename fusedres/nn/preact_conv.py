"""Conv-mode pre-activation units (`fusedres.convert(preact_model, mode="conv")`): every BN + ReLU of a unit runs
in the prologue of the conv that consumes it, so the normalised activation is never stored.

`ConvPreActBottleneck` / `ConvPreActBasicBlock` subclass the fused units of `fusedres.nn.preact_blocks` (same
attributes, state_dict keys; `to_stock` / `fusedres.unconvert` give back the stock `fusedres.preact` units). A
training-mode bottleneck forward:

* bn1's batch statistics of the unit input x: one `fusedres.ops.batch_stats` pass, outside autograd (the
  consumers' BatchNorm prologues differentiate through them); running statistics, momentum incl. None and
  num_batches_tracked as nn.BatchNorm2d;
* conv1 = `conv_bn_act(x, prologue relu(bn1(.)), stats=True)`: its raw output c1 and bn2's statistics of it;
* conv2 = `conv_bn_act(c1, prologue relu(bn2(.)), stats=True)`; conv3 = `conv_bn_act(c2, prologue
  relu(bn3(.)))`;
* identity shortcut: the add of x is conv3's epilogue (`residual=x`), one write of the unit output; projection
  shortcut: `conv_bn_act(x, w_sc, prologue relu(bn1(.)))` (the pre-activated input, as stock) and a plain add.

Under autocast the unit's float32 conv weights are cast in one `cast_weights` launch (`autocast_weights`).
Each prologue is a BatchNorm prologue with the batch statistics: its backward is BatchNorm's, the
statistics' gradient included. What autograd keeps per unit: x, c1 and c2
(each conv saves its raw input and recomputes the prologue in backward) where stock keeps x, relu(bn1(x)), c1,
relu(bn2(c1)), c2, relu(bn3(c2)): about half the activation bytes. The basic unit is the same with two convs.

Eval mode (or a BN without running statistics switched off): the prologues use the running statistics. Units
whose convs have a bias or a non-zero padding mode, or whose norms are not the fused `BatchNormAct2d(relu)`,
run the parent (bn-mode) forward. The network's final BN + ReLU before pooling stays the bn-mode fused op.
"""
from __future__ import annotations

from torch import Tensor, nn

from fusedres.nn.batchnorm_act import BatchNormAct2d, _uses_batch_stats
from fusedres.nn._autocast import autocast_weights
from fusedres.nn.conv_blocks import _bn_prologue, _plain_conv
from fusedres.nn.conv_blocks import _conv as _block_conv
from fusedres.nn.preact_blocks import PreActBasicBlock, PreActBottleneck
from fusedres.ops.batch_stats import batch_stats


def _conv(conv: nn.Conv2d, x: Tensor, prologue, stats: bool, residual=None, weights=None):
    """conv(relu(prologue(x))) [+ residual] as a (y, mean, var) triple (mean / var None without stats)."""
    res = _block_conv(conv, x, prologue, stats, residual, weights)
    return res if stats else (res, None, None)


class _ConvPreActMixin:
    _pairs: tuple = ()  # (bn, conv) in order: each BN + ReLU runs in the prologue of the conv after it
    local_batch_stats = True  # its convs compute BN statistics on this process only (to_sync_bn refuses it)

    def _can_run(self, x) -> bool:
        convs = [getattr(self, c) for _, c in self._pairs]
        if self.downsample is not None:
            convs.append(self.downsample)
        bns = [getattr(self, b) for b, _ in self._pairs]
        return (x.dim() == 4 and all(_plain_conv(c) for c in convs)
                and all(type(bn) is BatchNormAct2d and bn.act == "relu" for bn in bns))

    def forward(self, x: Tensor) -> Tensor:
        if not self._can_run(x):
            return super().forward(x)
        convs = [getattr(self, c) for _, c in self._pairs]
        weights = autocast_weights(x, convs + ([self.downsample] if self.downsample is not None else []))
        bn1 = getattr(self, self._pairs[0][0])
        # statistics without autograd: the prologues' BatchNorm backward already differentiates through them
        first = (x, *batch_stats(x.detach())) if _uses_batch_stats(bn1) else (x, None, None)
        prologue = first_prologue = _bn_prologue(bn1, first)
        out = x
        for i, (_, conv_name) in enumerate(self._pairs[:-1]):
            next_bn = getattr(self, self._pairs[i + 1][0])
            res = _conv(getattr(self, conv_name), out, prologue, stats=_uses_batch_stats(next_bn), weights=weights)
            prologue = _bn_prologue(next_bn, res)
            out = res[0]
        last = getattr(self, self._pairs[-1][1])
        if self.downsample is None:  # the identity shortcut is added in the last conv's epilogue
            return _conv(last, out, prologue, stats=False, residual=x, weights=weights)[0]
        shortcut = _conv(self.downsample, x, first_prologue, stats=False, weights=weights)[0]
        return _conv(last, out, prologue, stats=False, weights=weights)[0] + shortcut

    @classmethod
    def from_fused(cls, unit: nn.Module) -> nn.Module:
        """The conv-mode unit running `unit`'s own modules (a fused `fusedres.nn.preact_blocks` unit)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for name, child in unit.named_children():
            setattr(new, name, child)
        if "downsample" not in new._modules:
            new.downsample = None
        new.stride = unit.stride
        new.training = unit.training
        return new


class ConvPreActBasicBlock(_ConvPreActMixin, PreActBasicBlock):
    """Pre-activation basic unit: conv1 (bn1 + ReLU prologue, + bn2 statistics) -> conv2 (bn2 + ReLU prologue)
    [+ x in its epilogue | + projection conv of relu(bn1(x))]."""
    _pairs = (("bn1", "conv1"), ("bn2", "conv2"))


class ConvPreActBottleneck(_ConvPreActMixin, PreActBottleneck):
    """Pre-activation bottleneck unit: conv1 -> conv2 -> conv3, each with the preceding BN + ReLU in its
    prologue and the next BN's statistics from its epilogue; the shortcut as in the basic unit."""
    _pairs = (("bn1", "conv1"), ("bn2", "conv2"), ("bn3", "conv3"))

