"""`fold(model)`: inference mode — every BatchNorm folded into its convolution, each conv + BN (+ residual add)
(+ ReLU) run as one `fusedres::conv_bn_act` kernel.

Accepts an eval-mode torchvision ResNet (or any module containing torchvision / fusedres `BasicBlock` and
`Bottleneck` blocks), converted by `fusedres.convert` (either mode) or not; blocks with a learned skip
weight are left as they are. What changes:

* each block becomes `fusedres.nn.conv.FoldedBasicBlock` / `FoldedBottleneck`: conv1 (and conv2 of a
  bottleneck) run conv + BN + ReLU; the last conv runs conv + BN + shortcut add + ReLU; a torchvision
  downsample `Sequential(Conv2d, BatchNorm2d)` runs as one conv + BN kernel whose output is that residual;
* a torchvision ResNet's stem: `conv1` runs conv + bn1 + ReLU, `bn1` becomes an identity
  `FoldedBatchNorm2d`, `relu` becomes `nn.Identity`; maxpool, avgpool and fc are unchanged.

state_dict: keys and values are those of the input model (conv weights are kept unscaled, the BN tensors are
kept in `FoldedBatchNorm2d` modules; the folded per-channel scale and shift are non-persistent buffers), so a
folded model saves and loads the same checkpoints as the stock one. After `load_state_dict` call
`fold(model, inplace=True)` again to recompute the folded constants. Conv weights are made channels_last
(values unchanged) so the kernel reads them without a copy. A folded model is inference-only: its modules
raise in training mode.
"""
from __future__ import annotations

import copy

from torch import nn

from fusedres.nn.conv import FoldedBatchNorm2d, FoldedConv2d, _FoldedBlock, folded_class


def _fold_module(m: nn.Module) -> nn.Module:
    if isinstance(m, _FoldedBlock):
        for child in m.modules():
            if isinstance(child, FoldedConv2d):
                child.refold()
        return m
    cls = folded_class(m)
    return m if cls is None else cls.from_block(m)


def _swap(model: nn.Module) -> None:
    for name, child in list(model.named_children()):
        new = _fold_module(child)
        if new is not child:
            setattr(model, name, new)
        elif not isinstance(child, _FoldedBlock):
            _swap(child)


def _fold_stem(model: nn.Module) -> None:
    from torchvision.models.resnet import ResNet

    if not (isinstance(model, ResNet) and type(model)._forward_impl is ResNet._forward_impl
            and type(model).forward is ResNet.forward):
        return
    if isinstance(model.conv1, FoldedConv2d):
        model.conv1.refold()
        return
    from fusedres.nn.batchnorm_act import BatchNormAct2d
    from fusedres.nn.conv_blocks import unfuse_stem_pool

    unfuse_stem_pool(model)  # a conv-mode stem's pool goes back to maxpool, its conv1 to nn.Conv2d
    bn, relu = model.bn1, model.relu

    if type(bn) is nn.BatchNorm2d and type(relu) is nn.ReLU:
        act = True
    elif isinstance(bn, BatchNormAct2d) and type(relu) is nn.Identity:
        act = bn.act == "relu"
    else:
        return
    if bn.running_mean is None:
        return
    fbn = FoldedBatchNorm2d.from_bn(bn)
    model.conv1 = FoldedConv2d.from_conv_bn(model.conv1, fbn, act)
    model.bn1 = fbn
    model.relu = nn.Identity()


def fold(model: nn.Module, inplace: bool = False) -> nn.Module:
    """The inference-folded model (see the module docstring); a deep copy unless `inplace`. The model must be
    in eval mode. Folding a folded model recomputes its folded constants from its current tensors.
    Logs one line at INFO (folded blocks, stems, BN layers; blocks left unfolded and why) and warns when
    nothing was folded."""
    from fusedres import _report

    model = _fold(model, inplace)
    report = _report.census_fold(model)
    _report.announce(report, None if report.changed else
                     "Nothing was folded: fold handles torchvision-style ResNet blocks and stems "
                     "(see fusedres.explain(model, 'fold')).")
    return model


def _fold(model: nn.Module, inplace: bool) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"fusedres.fold: model must be a torch.nn.Module, got {type(model).__name__}")
    if model.training:
        raise ValueError("fusedres.fold folds BatchNorm running statistics: put the model in eval mode first "
                         "(model.eval())")
    if not inplace:
        model = copy.deepcopy(model)
    root = _fold_module(model)
    if root is not model:
        return root
    _swap(model)
    _fold_stem(model)
    return model
