"""Training-mode single-pass blocks (`fusedres.convert(model, mode="conv")`): the MLPerf pattern in PyTorch.

In a `ConvBasicBlock` / `ConvBottleneck` (subclasses of the fused blocks, same attributes and state_dict keys):

* each conv but the last emits its raw output plus the BN batch statistics of that output (epilogue of the
  `conv_bn_act` kernel); no BN or ReLU pass over it;
* the next conv applies that BN + ReLU to its input tiles as it loads them (a BatchNorm prologue with the
  batch statistics; its backward is BatchNorm's, the statistics' gradient included);
* the last conv (and a projection shortcut's conv) emit their statistics too, and the block tail (last BN +
  shortcut add [+ projection BN] + ReLU) is one `stats_bn_act` pass over the conv output(s) with those
  statistics (no separate statistics pass; backward is BatchNorm's). When a tail BN uses running statistics
  (eval) the tail is the fused block's `bn_act` / `dual_bn_act` op.
* the torchvision stem's BN + ReLU + max-pool: `BatchNormActPool2d` (`fuse_stem_pool`), keeping only the
  stem conv's output; the stem conv itself becomes a `RecastConv2d`, which under autocast keeps the float32
  input image for backward instead of its low-precision copy.
* under autocast, a block casts all its float32 conv weights to the autocast dtype in one `cast_weights`
  launch (and their gradients back in one), where each conv would cast its own.

Backward: `aten.convolution_backward` for dgrad/wgrad plus the backends' BN backward kernels; each conv keeps
its raw input (the previous conv's output) and recomputes the prologue from it, so the normalised activation
is never stored (docs/conv_bn_act.md lists what each layer keeps). Running statistics, `momentum` (incl.
None) and `num_batches_tracked` follow nn.BatchNorm2d. In eval mode (or when a BN uses running statistics) the
prologue uses the running statistics. Blocks whose convs have a bias or non-zero padding modes run the parent
fused forward.
"""
from __future__ import annotations

from torch import Tensor, nn

import torch
from torch.nn.modules.utils import _pair

from fusedres.nn.batchnorm_act import (BatchNormAct2d, _check_input, _per_channel, _uses_batch_stats, batch_norm_args,
                                       finalize_batch, gained_affine)
from fusedres.nn._autocast import autocast_weights
from fusedres.nn.blocks import BasicBlock, Bottleneck, _is_conv_bn
from fusedres._layout import acc_dtype
from fusedres.ops import bn_act_pool as _bn_act_pool  # noqa: F401  (registers fusedres::bn_act_pool_train)
from fusedres.ops._common import check_batch_size, scale_shift
from fusedres.ops.conv_bn_act import conv_bn_act
from fusedres.ops.recast_conv import recast_conv
from fusedres.ops.stats_bn_act import stats_bn_act


def _plain_conv(conv) -> bool:
    return (type(conv) is nn.Conv2d and conv.bias is None and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str))


def _conv(conv: nn.Conv2d, x: Tensor, prologue, stats: bool, residual=None, weights=None):
    """conv(relu(prologue(x))) [+ residual]; (y, mean, var) of the raw output when `stats`, else y. `prologue`
    is None or the keyword arguments of `_bn_prologue`; `weights` maps convs to their already cast weight
    (`autocast_weights`)."""
    weight = conv.weight if weights is None else weights.get(conv, conv.weight)
    return conv_bn_act(x, weight, stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                       groups=conv.groups, in_relu=prologue is not None, residual=residual, stats=stats,
                       **(prologue or {}))


def _bn_stats(bn: nn.BatchNorm2d, out, centred: bool = False, affine=None):
    """The statistics BN normalises the conv output c with, out = (c, mean, var), and its (scale, shift): in
    training the batch statistics (returned as they are, for an op whose backward is BatchNorm's) with the
    (scale, shift) of the same launch that does nn.BatchNorm2d's bookkeeping (`finalize_batch`: `centred` form,
    `affine` instead of bn's weight and bias); in eval the running statistics and None. Returns (mean, var,
    params)."""
    c = out[0]
    if _uses_batch_stats(bn):  # as nn.BatchNorm2d, before num_batches_tracked is touched
        check_batch_size(c, "the conv output")
        _, mean, var = out
        return mean, var, finalize_batch(bn, c, mean, var, centred, affine)
    args = batch_norm_args(bn)
    acc = acc_dtype(c.dtype)
    return args["running_mean"].to(acc), args["running_var"].to(acc), None


def _bn_prologue(bn: nn.BatchNorm2d, out):
    """conv_bn_act keyword arguments for bn + ReLU in the next conv's prologue: a BatchNorm prologue with the
    batch statistics (training: its backward is BatchNorm's, statistics gradient folded in; its x * in_scale +
    in_shift form comes with them, from the finalize launch), else the running statistics as (in_scale,
    in_shift) with BN(c) = c * in_scale + in_shift."""
    mean, var, params = _bn_stats(bn, out, centred=True)
    if params is not None:
        return dict(in_stats=(mean, var), in_weight=bn.weight, in_bias=bn.bias, in_eps=bn.eps, in_scale=params[0],
                    in_shift=params[1])
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (bn.weight, bn.bias)):
        _, scale, shift = scale_shift(mean, var, bn.weight, bn.bias, bn.eps)  # differentiable in the affine
        return dict(in_scale=scale, in_shift=shift - mean * scale)
    scale, shift = torch.ops.fusedres.bn_finalize(out[0], mean, var, bn.weight, bn.bias, float(bn.eps), None, None,
                                                  None, 0.0, True)  # one launch
    return dict(in_scale=scale, in_shift=shift)


class _ConvTrainMixin:
    _chain: tuple = ()  # (conv, bn) pairs whose BN + ReLU move into the next conv's prologue
    local_batch_stats = True  # its convs compute BN statistics on this process only (to_sync_bn refuses it)

    def _can_run(self, x) -> bool:
        convs = [getattr(self, c) for c, _ in self._chain] + [getattr(self, self._last_conv)]
        return all(_plain_conv(c) for c in convs) and x.dim() == 4

    def _fused_shortcut(self) -> bool:
        """Whether the projection shortcut's conv runs through conv_bn_act (its BN in the tail's pass)."""
        ds = self.downsample
        return _is_conv_bn(ds) and _plain_conv(ds[0]) and _uses_batch_stats(ds[1])

    def forward(self, x: Tensor) -> Tensor:
        if not self._can_run(x):
            return super().forward(x)
        convs = [getattr(self, c) for c, _ in self._chain] + [getattr(self, self._last_conv)]
        if _uses_batch_stats(getattr(self, self._last_bn)) and self._fused_shortcut():
            convs.append(self.downsample[0])
        weights = autocast_weights(x, convs)
        out, prologue = x, None
        for conv_name, bn_name in self._chain:
            bn = getattr(self, bn_name)
            res = _conv(getattr(self, conv_name), out, prologue, stats=_uses_batch_stats(bn), weights=weights)
            if not isinstance(res, tuple):
                res = (res, None, None)
            prologue = _bn_prologue(bn, res)
            out = res[0]
        last_conv, last_bn = getattr(self, self._last_conv), getattr(self, self._last_bn)
        if not _uses_batch_stats(last_bn):
            return self._tail(x, _conv(last_conv, out, prologue, stats=False, weights=weights), last_bn)
        # the last conv emits its statistics too; the tail is one stats_bn_act pass over its output
        res = _conv(last_conv, out, prologue, stats=True, weights=weights)
        gain, res_gain = self.skip_gains()  # learned skip weights fold into the tail's BN affine
        weight, bias = gained_affine(last_bn, gain)
        mean, var, params = _bn_stats(last_bn, res, affine=(weight, bias))
        c = res[0]
        relu = getattr(last_bn, "act", "relu") == "relu"
        ds = self.downsample
        if self._fused_shortcut():
            res_b = _conv(ds[0], x, None, stats=True, weights=weights)
            weight_b, bias_b = gained_affine(ds[1], res_gain)
            mean_b, var_b, params_b = _bn_stats(ds[1], res_b, affine=(weight_b, bias_b))
            return stats_bn_act(c, mean, var, weight, bias, last_bn.eps, xb=res_b[0].to(c.dtype),
                                stats_b=(mean_b, var_b), weight_b=weight_b, bias_b=bias_b, eps_b=ds[1].eps,
                                relu=relu, params=params, params_b=params_b)
        residual = (x if ds is None else ds(x)).to(c.dtype)
        res_weight = None if res_gain is None else _per_channel(res_gain, c.shape[1])
        return stats_bn_act(c, mean, var, weight, bias, last_bn.eps, residual=residual,
                            residual_weight=res_weight, relu=relu, params=params)

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


class BatchNormActPool2d(BatchNormAct2d):
    """A conv-mode torchvision stem's `bn1`: BatchNorm + ReLU + the stem's max-pool (`self.pool`, the model's
    former `maxpool`, now `nn.Identity`) in training as `fusedres::bn_act_pool_train`, which keeps only the conv
    output for backward (stock keeps it, the ReLU output and the pool's int64 indices). Same parameters,
    buffers and state_dict keys as `bn1`; eval runs bn_act then the pool."""

    def forward(self, x: Tensor) -> Tensor:
        if not _uses_batch_stats(self):
            return self.pool(super().forward(x))
        _check_input(self, x)
        check_batch_size(x, "input")
        p = self.pool
        stride = p.stride if p.stride is not None else p.kernel_size
        y, mean, var = torch.ops.fusedres.bn_act_pool_train(
            x, self.weight, self.bias, self.eps, self.act == "relu", list(_pair(p.kernel_size)), list(_pair(stride)),
            list(_pair(p.padding)), list(_pair(p.dilation)), p.ceil_mode)
        finalize_batch(self, x, mean, var, centred=False)  # the bookkeeping (its params are not needed)
        return y


class RecastConv2d(nn.Conv2d):
    """A conv-mode torchvision stem's `conv1`: under autocast with a float32 input it runs as
    `fusedres::recast_conv`, which keeps the float32 input (the caller's own tensor) for backward and casts it
    again there, where F.conv2d keeps a low-precision copy of it (at batch 256, 224x224 bf16: 77 MB the step
    does not need; one more launch in backward). Same values as nn.Conv2d; elsewhere it is nn.Conv2d.
    `fuse_stem_pool` makes the stem's own module one (its class changes, so its Parameters, state_dict keys and
    hooks stay), `unfuse_stem_pool` makes it an nn.Conv2d again."""

    def forward(self, x: Tensor) -> Tensor:
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            return super().forward(x)
        return recast_conv(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def fuse_stem_pool(model: nn.Module) -> None:
    """A converted torchvision stem (`bn1: BatchNormAct2d`, `relu: Identity`, `maxpool: MaxPool2d`) gets a
    `BatchNormActPool2d` bn1 running the pool, and `maxpool: Identity`; an nn.Conv2d `conv1` becomes a
    `RecastConv2d` in place. Idempotent; `unfuse_stem_pool` undoes it."""
    if type(getattr(model, "conv1", None)) is nn.Conv2d:
        model.conv1.__class__ = RecastConv2d
    bn, pool = model.bn1, model.maxpool
    if (type(bn) is BatchNormAct2d and type(model.relu) is nn.Identity and type(pool) is nn.MaxPool2d
            and not pool.return_indices):
        new = BatchNormActPool2d.from_bn(bn, act=bn.act)
        new.pool = pool
        model.bn1, model.maxpool = new, nn.Identity()


def unfuse_stem_pool(model: nn.Module) -> None:
    if type(getattr(model, "conv1", None)) is RecastConv2d:
        model.conv1.__class__ = nn.Conv2d
    bn = getattr(model, "bn1", None)
    if type(bn) is BatchNormActPool2d and type(getattr(model, "maxpool", None)) is nn.Identity:
        model.maxpool = bn.pool
        model.bn1 = BatchNormAct2d.from_bn(bn, act=bn.act)
