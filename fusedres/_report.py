"""What `convert`, `fold` and `unconvert` did to a model: counted from the module tree after the call.

`Report` is the data (`fusedres.explain(model)` returns it); `Report.summary()` is the one line the three
functions log at INFO on the "fusedres" logger. Modules that look like a ResNet block but were left as they were
are listed by reason, so a model that converts only partly says why.
"""
from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass, field

from torch import nn

log = logging.getLogger("fusedres")

_BLOCK_NAME = re.compile(r"block|bottleneck|residual|preact", re.IGNORECASE)
_ACTS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.Hardswish, nn.Mish, nn.ELU, nn.PReLU, nn.Tanh,
         nn.Sigmoid, nn.Hardsigmoid)
_EXTRAS = ("drop_block", "aa", "se", "attn", "drop_path")
BARE_BN = "BatchNorm2d outside a ResNet block (a lone BN + ReLU is not fused: its output may have other users)"


@dataclass
class Report:
    """The outcome of `action` ("convert", "fold" or "unconvert") on a model.

    blocks, stems, bn_layers: for convert and fold, how many residual blocks, stem/head BN + ReLU pairs and
    BatchNorm layers run fused (folded) in the result; for unconvert, how many were turned back into stock
    modules. left: module names that stayed as they were, grouped by reason; bare_bn: stock BatchNorm2d layers
    outside any block (convert and fold leave them alone)."""
    action: str
    blocks: int = 0
    stems: int = 0
    bn_layers: int = 0
    left: dict[str, list[str]] = field(default_factory=dict)
    bare_bn: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.blocks or self.stems or self.bn_layers)

    def summary(self) -> str:
        """One line: what was done, then what was left and why."""
        verb = {"convert": "fused", "fold": "folded", "unconvert": "restored to stock"}[self.action]
        parts = [f"{self.blocks} block{_s(self.blocks)}", f"{self.stems} stem{_s(self.stems)}",
                 f"{self.bn_layers} BN layer{_s(self.bn_layers)}"]
        text = f"fusedres.{self.action}: {verb} " + ", ".join(parts)
        stay = "fused" if self.action == "unconvert" else "stock"
        left = [f"{len(names)} ({reason}: {_names(names)})" for reason, names in self.left.items()]
        if self.bare_bn and self.action != "unconvert":
            left.append(f"{len(self.bare_bn)} ({BARE_BN}: {_names(self.bare_bn)})")
        return text + (f"; left {stay}: " + ", ".join(left) if left else "")


def _s(n: int) -> str:
    return "" if n == 1 else "s"


def _names(names: list[str], most: int = 3) -> str:
    shown = ", ".join(n or "<model>" for n in names[:most])
    return shown + (f", ... {len(names) - most} more" if len(names) > most else "")


def _is_ours(m: nn.Module) -> bool:
    return type(m).__module__.startswith("fusedres.nn")


def _fused_block_types() -> tuple:
    from fusedres.nn.blocks import _FusedBlock
    from fusedres.nn.conv import _FoldedBlock
    from fusedres.nn.preact_blocks import _FusedPreAct
    from fusedres.nn.timm_blocks import _TimmFusedBlock

    return _FusedBlock, _TimmFusedBlock, _FusedPreAct, _FoldedBlock


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)) or "Norm" in type(m).__name__


def looks_like_block(m: nn.Module) -> bool:
    """A stock module that looks like a residual block: a known stock block class, or a class whose name says
    block / bottleneck / residual / preact with a convolution and a norm among its children."""
    if _is_ours(m):
        return False
    if _known_block(m) is not None:
        return True
    children = list(m.children())
    return (bool(_BLOCK_NAME.search(type(m).__name__)) and any(isinstance(c, nn.Conv2d) for c in children)
            and any(_is_norm(c) for c in children))


def _known_block(m: nn.Module):
    """The stock class `m` is an instance of, among those convert knows, or None."""
    from fusedres.nn.preact_blocks import PREACT_BLOCKS
    from fusedres.nn.timm_blocks import TIMM_BLOCKS

    candidates = []
    try:
        from torchvision.models import resnet
        candidates += [resnet.BasicBlock, resnet.Bottleneck]
    except ImportError:
        pass
    candidates += [c._timm_class() for c in TIMM_BLOCKS] + [c._stock_class() for c in PREACT_BLOCKS]
    return next((c for c in candidates if c is not None and isinstance(m, c)), None)


def why_stock(m: nn.Module) -> str:
    """Why `convert` leaves the block-like module `m` as it is."""
    for _, c in m.named_children():
        if _is_norm(c) and type(c) is not nn.BatchNorm2d and not _is_ours(c):
            return f"{type(c).__name__} norm (only nn.BatchNorm2d is fused)"
    for _, c in m.named_children():
        if isinstance(c, _ACTS) and type(c) is not nn.ReLU:
            return f"{type(c).__name__} activation (only ReLU is fused)"
    for name in _EXTRAS:
        c = getattr(m, name, None)
        if isinstance(c, nn.Module) and type(c) is not nn.Identity:
            return f"has {name} ({type(c).__name__}), not fused"
    known = _known_block(m)
    if known is not None and type(m).forward is not known.forward:
        return "overridden forward"
    if known is None:
        return f"unknown block class {type(m).__qualname__}"
    return f"{type(m).__qualname__} not convertible"


def _why_not_folded(m: nn.Module) -> str:
    if getattr(m, "skip_weight", None) is not None:
        return "learned skip weight"
    for c in m.children():
        if isinstance(c, nn.BatchNorm2d) and c.running_mean is None:
            return "BatchNorm without running statistics"
    from fusedres.nn.conv import folded_class

    if folded_class(m) is None and not _is_ours(m) and _known_block(m) is not None:
        reason = why_stock(m)
        if not reason.endswith("not convertible"):
            return reason
    return "not a torchvision-style block (fold handles torchvision BasicBlock / Bottleneck and their fused forms)"


def _why_still_fused(m: nn.Module) -> str:
    from fusedres.nn.conv import FoldedBatchNorm2d, FoldedConv2d, _FoldedBlock

    if isinstance(m, (_FoldedBlock, FoldedConv2d, FoldedBatchNorm2d)):
        return "folded (fold is one way: build the stock model and load this model's state_dict)"
    return f"{type(m).__name__} not made by convert"


def _count_bn(m: nn.Module) -> int:
    """BatchNorm layers inside a fused block: all of them run fused (a downsample BN in the block tail's pass)."""
    return sum(1 for c in m.modules() if isinstance(c, nn.BatchNorm2d))


def _tree(model: nn.Module):
    """(name, module) in pre-order; the caller's visit returns True to skip a module's descendants."""
    stack = [("", model)]
    while stack:
        name, m = stack.pop()
        skip = yield name, m
        if not skip:
            kids = [(f"{name}.{n}" if name else n, c) for n, c in m.named_children()]
            stack.extend(reversed(kids))


def _walk(model: nn.Module, visit) -> None:
    gen = _tree(model)
    try:
        item = next(gen)
        while True:
            item = gen.send(bool(visit(*item)))
    except StopIteration:
        pass


def census_convert(model: nn.Module) -> Report:
    """Fused blocks, stem/head pairs and BN layers in `model`, and the block-like modules left stock."""
    from fusedres.nn.batchnorm_act import BatchNormAct2d

    r = Report("convert")
    fused_blocks = _fused_block_types()

    def visit(name, m):
        if isinstance(m, fused_blocks):
            r.blocks += 1
            r.bn_layers += _count_bn(m)
            return True
        if looks_like_block(m):
            norms = [c for c in m.children() if _is_norm(c)]
            if norms and all(_is_ours(c) for c in norms):  # a stock unit whose norms were fused (timm resnetv2)
                r.blocks += 1
                r.bn_layers += len(norms)
            else:
                r.left.setdefault(why_stock(m), []).append(name)
            return True
        if isinstance(m, nn.BatchNorm2d):
            if _is_ours(m):
                r.bn_layers += 1
                r.stems += isinstance(m, BatchNormAct2d) and m.act == "relu"
            else:
                r.bare_bn.append(name)
            return True
        return False

    _walk(model, visit)
    return r


def census_fold(model: nn.Module) -> Report:
    """Folded blocks, folded stems and folded BN layers in `model`, and the blocks left unfolded."""
    from fusedres.nn.conv import FoldedBatchNorm2d, FoldedConv2d, _FoldedBlock

    r = Report("fold")
    fused_blocks = _fused_block_types()

    def visit(name, m):
        if isinstance(m, _FoldedBlock):
            r.blocks += 1
            r.bn_layers += _count_bn(m)
            return True
        if isinstance(m, fused_blocks) or looks_like_block(m):
            r.left.setdefault(_why_not_folded(m), []).append(name)
            return True
        if isinstance(m, FoldedConv2d):
            r.stems += 1
            return True
        if isinstance(m, nn.BatchNorm2d):
            if isinstance(m, FoldedBatchNorm2d):
                r.bn_layers += 1
            else:
                r.bare_bn.append(name)
            return True
        return False

    _walk(model, visit)
    return r


def census_fused(model: nn.Module) -> dict[str, list[str]]:
    """fusedres modules in `model` (blocks, BN layers, folded convs), grouped by why unconvert keeps them."""
    from fusedres.nn.conv import FoldedConv2d

    left: dict[str, list[str]] = {}
    fused_blocks = _fused_block_types()

    def visit(name, m):
        if isinstance(m, fused_blocks) or (_is_ours(m) and isinstance(m, (nn.BatchNorm2d, FoldedConv2d))):
            left.setdefault(_why_still_fused(m), []).append(name)
            return True
        return False

    _walk(model, visit)
    return left


def unconvert_report(before: Report, model: nn.Module) -> Report:
    """What unconvert restored: the fused counts before minus those after, and the fusedres modules kept."""
    after = census_convert(model)
    return Report("unconvert", blocks=max(before.blocks - after.blocks, 0), stems=max(before.stems - after.stems, 0),
                  bn_layers=max(before.bn_layers - after.bn_layers, 0), left=census_fused(model))


def announce(report: Report, nothing: str | None) -> Report:
    """Log the summary at INFO; warn (UserWarning) with `nothing` appended when the call changed nothing."""
    log.info(report.summary())
    if nothing is not None:
        warnings.warn(f"{report.summary()}. {nothing}", UserWarning, stacklevel=3)
    return report
