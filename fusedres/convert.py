"""`convert` / `unconvert`: swap torchvision ResNet blocks for fused ones and back, sharing every tensor.

What `convert` changes (everything else is left alone):

* every torchvision `BasicBlock` / `Bottleneck` (isinstance, stock `forward`, plain `nn.BatchNorm2d` norms)
  becomes `fusedres.nn.BasicBlock` / `Bottleneck`, running the same conv modules, Parameters and buffers;
  blocks with other norms (FrozenBatchNorm2d, SyncBatchNorm, GroupNorm) or an overridden forward stay stock;
* the stem of a torchvision `ResNet` (stock `forward`): `bn1` becomes `BatchNormAct2d(act="relu")` and
  `relu` becomes `nn.Identity`, so `conv1 -> bn1 -> relu` runs as conv + one fused op.
* timm (optional; never imported by fusedres): `timm.models.resnet.BasicBlock` / `Bottleneck` become
  `fusedres.nn.timm_blocks.TimmBasicBlock` / `TimmBottleneck` when they have plain BatchNorm2d norms, ReLU
  activations and no drop-block / anti-aliasing / attention / drop-path module (else they stay stock); a
  stock-forward timm `ResNet`'s stem BN + ReLU pairs (`bn1`/`act1`, deep-stem `conv1`) are fused; every
  `timm.layers.BatchNormAct2d` with an nn.ReLU and no dropout (the pre-activation `resnetv2_*` norms)
  becomes `TimmBatchNormAct2d`;
* `fusedres.preact` pre-activation units become `fusedres.nn.preact_blocks` units, and a stock-forward
  `PreActResNet`'s final `bn` + `relu` one fused op.

A bare BatchNorm2d followed by a ReLU elsewhere is not converted: whether the BN output is used anywhere else
cannot be told from the module tree. state_dict keys, train/eval mode, device, dtype and memory format are
unchanged because no tensor is created or copied. Forward hooks registered on replaced modules (the blocks,
the stem BN and ReLU) are not carried over; hooks on the conv layers and everything else are (in bn mode a
block whose conv has hooks calls its conv modules; mode="conv" runs its convs through `conv_bn_act` with the
conv modules' weights, so hooks on those convs do not fire).
"""
from __future__ import annotations

import copy

from torch import nn

from fusedres import _report
from fusedres.nn.blocks import SKIP_KINDS, SKIP_SIDES, BasicBlock, Bottleneck, SkipWeightMixin, _FusedBlock
from fusedres.nn._tree import fuse_bn_relu, swap_children, unfuse_bn_relu
from fusedres.nn.conv_blocks import ConvBasicBlock, ConvBottleneck, fuse_stem_pool, unfuse_stem_pool
from fusedres.nn.sync_batchnorm import from_sync_bn, to_sync_bn
from fusedres.nn.preact_blocks import (PREACT_BLOCKS, PreActBasicBlock, PreActBottleneck, _FusedPreAct,
                                       fuse_preact_head, unfuse_preact_head)
from fusedres.nn.preact_conv import ConvPreActBasicBlock, ConvPreActBottleneck
from fusedres.nn.timm_blocks import (TIMM_BLOCKS, TimmBatchNormAct2d, _TimmFusedBlock, fuse_timm_stem,
                                     unfuse_timm_stem)

_FUSED_BLOCKS = (BasicBlock, Bottleneck)
# mode="conv": each fused block's conv-mode class (same modules and state_dict keys)
CONV_BLOCKS = {BasicBlock: ConvBasicBlock, Bottleneck: ConvBottleneck, PreActBasicBlock: ConvPreActBasicBlock,
               PreActBottleneck: ConvPreActBottleneck}


def _is_stock_resnet(model: nn.Module) -> bool:
    from torchvision.models.resnet import ResNet

    return (isinstance(model, ResNet) and type(model).forward is ResNet.forward
            and type(model)._forward_impl is ResNet._forward_impl)


def _convert_module(m: nn.Module) -> nn.Module:
    """The fused replacement of m, or m itself (then with a timm ResNet stem / PreActResNet head fused in place,
    and its children visited next)."""
    for fused in _FUSED_BLOCKS:
        if fused.can_convert(m):
            return fused.from_torchvision(m)
    for fused in TIMM_BLOCKS:
        if fused.can_convert(m):
            return fused.from_timm(m)
    if TimmBatchNormAct2d.can_convert(m):
        return TimmBatchNormAct2d.from_timm(m)
    for fused in PREACT_BLOCKS:
        if fused.can_convert(m):
            return fused.from_stock(m)
    fuse_timm_stem(m)
    fuse_preact_head(m)
    return m


def _unconvert_module(m: nn.Module) -> nn.Module:
    if isinstance(m, _FusedBlock):
        return m.to_torchvision()
    if isinstance(m, (_TimmFusedBlock, TimmBatchNormAct2d)):
        return m.to_timm()
    if isinstance(m, _FusedPreAct):
        return m.to_stock()
    unfuse_timm_stem(m)
    unfuse_preact_head(m)
    return m


def convert(model: nn.Module, inplace: bool = True, mode: str = "bn", *, sync_bn: bool = False,
            process_group=None, skip_weight: str | None = None, skip_on: str = "branch",
            skip_init: float = 1.0, strict: bool = False) -> nn.Module:
    """Replace torchvision ResNet blocks (and a torchvision ResNet's stem BN + ReLU) in `model` by fused ones
    that share their Parameters and buffers; returns the converted model (a new object only when `model`
    itself is a block). `inplace=False` converts a deep copy and leaves `model` untouched.
    Idempotent: converting a converted model changes nothing.

    mode="bn" (default): fused BatchNorm + add + ReLU elementwise ops after stock convolutions.
    mode="conv": additionally run each block as single-pass convolutions (`fusedres.nn.conv_blocks`): convs
    emit BN statistics, the next conv applies BN + ReLU in its input prologue, the tail is one bn_act pass.
    A torchvision stem's conv1 becomes a `RecastConv2d` (the same module object), which under autocast keeps the
    float32 input for backward instead of a low-precision copy. Same modules, tensors and state_dict keys;
    `unconvert` undoes either mode.

    skip_weight="scalar" | "channel": give every fused post-activation block (torchvision or timm) a learned
    skip weight (`add_skip_weight`), on the residual branch (skip_on="branch": relu(a * BN(F(x)) + x); with
    skip_init=0 each block starts as the identity, ReZero/SkipInit style) or on the shortcut
    (skip_on="shortcut": relu(BN(F(x)) + b * x)). It adds one Parameter per block (state_dict key
    `<block>.skip_weight`) and is folded into the block tail's fused pass.

    sync_bn=True (mode="bn" only): every BatchNorm becomes a `fusedres.nn.SyncBatchNormAct2d` computing batch
    statistics over `process_group` (None: the default group) with one all_reduce per layer forward and one
    per layer backward, like torch.nn.SyncBatchNorm but still fused (`fusedres.nn.to_sync_bn`).

    Logs one line at INFO on the "fusedres" logger (fused blocks, stems, BN layers; block-like modules left stock,
    grouped by reason; `fusedres.explain` returns it as data) and warns when nothing in the model runs fused.
    strict=True raises ValueError when a module that looks like a ResNet block was left stock (the convertible
    ones are converted by then)."""
    model = _convert(model, inplace, mode, sync_bn, process_group, skip_weight, skip_on, skip_init)
    report = _report.census_convert(model)
    _report.announce(report, None if report.changed else
                     "Nothing in this model was converted: convert knows torchvision, timm and fusedres.preact "
                     "ResNet blocks and stems (see fusedres.explain(model)).")
    if strict and report.left:
        raise ValueError("fusedres.convert(strict=True): modules that look like ResNet blocks were left stock: "
                         + "; ".join(f"{reason}: {', '.join(n or '<model>' for n in names)}"
                                     for reason, names in report.left.items()))
    return model


def _convert(model, inplace, mode, sync_bn, process_group, skip_weight, skip_on, skip_init) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"fusedres.convert: model must be a torch.nn.Module, got {type(model).__name__}")
    if mode not in ("bn", "conv"):
        raise ValueError(f"fusedres.convert: unknown mode {mode!r}; choose 'bn' or 'conv'")
    if sync_bn and mode == "conv":
        raise ValueError("fusedres.convert: sync_bn=True needs mode='bn': in conv mode the convolutions compute "
                         "the BatchNorm statistics of one process only")
    if skip_weight is not None and (skip_weight not in SKIP_KINDS or skip_on not in SKIP_SIDES):
        raise ValueError(f"fusedres.convert: skip_weight must be None or one of {SKIP_KINDS} and skip_on one of "
                         f"{SKIP_SIDES}; got skip_weight={skip_weight!r}, skip_on={skip_on!r}")
    if not inplace:
        model = copy.deepcopy(model)
    root = _convert_module(model)
    if root is not model:  # model was a single block
        if skip_weight is not None:
            _add_skip_weights(root, skip_weight, skip_on, skip_init)
        root = _to_conv_mode(root) if mode == "conv" else root
        return to_sync_bn(root, process_group) if sync_bn else root
    swap_children(model, _convert_module)
    if skip_weight is not None:
        _add_skip_weights(model, skip_weight, skip_on, skip_init)
    if mode == "conv":
        swap_children(model, _to_conv_mode)
    if _is_stock_resnet(model):
        fuse_bn_relu(model, "bn1", "relu")
        if mode == "conv":  # BN + ReLU + max-pool keep only the conv output, the conv only the float32 input
            fuse_stem_pool(model)
    return to_sync_bn(model, process_group) if sync_bn else model


def _add_skip_weights(model: nn.Module, kind: str, on: str, init: float) -> None:
    """A skip weight on every fused block that has none yet (so converting twice changes nothing)."""
    blocks = [m for m in model.modules() if isinstance(m, SkipWeightMixin)]
    if not blocks:
        raise ValueError("fusedres.convert: skip_weight was requested but the model has no fused post-activation "
                         "block (torchvision or timm BasicBlock / Bottleneck) to put it on")
    for block in blocks:
        if getattr(block, "skip_weight", None) is None:
            block.add_skip_weight(kind, on, init)


def _to_conv_mode(m: nn.Module) -> nn.Module:
    cls = CONV_BLOCKS.get(type(m))
    return m if cls is None else cls.from_fused(m)


def unconvert(model: nn.Module, inplace: bool = True) -> nn.Module:
    """The inverse of `convert`: fused blocks back to torchvision's classes and a converted ResNet stem back
    to `bn1: BatchNorm2d`, `relu: ReLU(inplace=True)`, sharing every tensor. Other BatchNormAct2d layers are
    left as they are. Logs what it restored and what stayed fused (and why) at INFO; warns when fusedres modules
    remain and nothing was restored (folded models, learned skip weights)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fusedres.unconvert: model must be a torch.nn.Module, got {type(model).__name__}")
    before = _report.census_convert(model)
    model = _unconvert(model, inplace)
    report = _report.unconvert_report(before, model)
    _report.announce(report, "Nothing was restored to stock." if report.left and not report.changed else None)
    return model


def _unconvert(model: nn.Module, inplace: bool) -> nn.Module:
    if not inplace:
        model = copy.deepcopy(model)
    model = from_sync_bn(model)
    root = _unconvert_module(model)
    if root is not model:
        return root
    swap_children(model, _unconvert_module)
    if _is_stock_resnet(model):
        unfuse_stem_pool(model)
        unfuse_bn_relu(model, "bn1", "relu")
    return model


def explain(model: nn.Module, action: str = "convert", **kwargs) -> "_report.Report":
    """What `fusedres.<action>(model, **kwargs)` does ("convert", "fold" or "unconvert"), as a `Report`: the same
    counts and reasons those functions log. Runs the action on a deep copy; `model` is not changed."""
    actions = {"convert": lambda m: _convert(m, False, kwargs.get("mode", "bn"), kwargs.get("sync_bn", False),
                                             kwargs.get("process_group"), kwargs.get("skip_weight"),
                                             kwargs.get("skip_on", "branch"), kwargs.get("skip_init", 1.0)),
               "fold": None, "unconvert": lambda m: _unconvert(m, False)}
    if action not in actions:
        raise ValueError(f"fusedres.explain: unknown action {action!r}; choose convert, fold or unconvert")
    if not isinstance(model, nn.Module):
        raise TypeError(f"fusedres.explain: model must be a torch.nn.Module, got {type(model).__name__}")
    unknown = set(kwargs) - ({"mode", "sync_bn", "process_group", "skip_weight", "skip_on", "skip_init"}
                             if action == "convert" else set())
    if unknown:
        raise TypeError(f"fusedres.explain: unexpected keyword(s) {sorted(unknown)} for action {action!r}")
    if action == "fold":
        from fusedres.fold import _fold

        return _report.census_fold(_fold(model, False))
    if action == "unconvert":
        return _report.unconvert_report(_report.census_convert(model), actions["unconvert"](model))
    return _report.census_convert(actions["convert"](model))
