"""convert / fold / unconvert say what they did: one INFO line on the "fusedres" logger, a warning when nothing
changed, convert(strict=True) refusing a partial conversion, and fusedres.explain returning the same report."""
import logging

import pytest
import torch
import torchvision
from torch import nn

import fusedres
from fusedres.nn.blocks import BasicBlock as FusedBasicBlock

# torchvision resnet18: 8 BasicBlocks; BatchNorms: stem 1 + 2 per block + 3 downsample = 20
RESNET18 = dict(blocks=8, stems=1, bn_layers=20)


def counts(report):
    return dict(blocks=report.blocks, stems=report.stems, bn_layers=report.bn_layers)


def info_lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "fusedres" and r.levelno == logging.INFO]


def test_convert_logs_one_line_and_explain_returns_it_as_data(caplog):
    model = torchvision.models.resnet18()
    report = fusedres.explain(model)
    assert counts(report) == RESNET18 and report.left == {} and report.bare_bn == []
    assert type(model.layer1[0]) is torchvision.models.resnet.BasicBlock  # explain changed nothing
    caplog.set_level(logging.INFO, logger="fusedres")
    fusedres.convert(model)
    assert info_lines(caplog) == [report.summary()]
    assert report.summary() == "fusedres.convert: fused 8 blocks, 1 stem, 20 BN layers"
    assert counts(fusedres.explain(model)) == RESNET18  # idempotent: the converted model reports the same


def test_unknown_models_warn_that_nothing_was_converted():
    seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    with pytest.warns(UserWarning, match="Nothing in this model was converted") as record:
        assert fusedres.convert(seq) is seq
    assert "1 (BatchNorm2d outside a ResNet block" in str(record[0].message)
    with torch.device("meta"):
        vgg, dense = torchvision.models.vgg11_bn(), torchvision.models.densenet121()
    for model, n_bn in ((vgg, 8), (dense, 121)):
        with pytest.warns(UserWarning, match="Nothing in this model was converted"):
            fusedres.convert(model)
        report = fusedres.explain(model)
        assert not report.changed and report.left == {} and len(report.bare_bn) == n_bn
    with pytest.warns(UserWarning, match="Nothing was folded"):
        fusedres.fold(vgg.eval(), inplace=True)


class OwnForward(torchvision.models.resnet.BasicBlock):
    def forward(self, x):
        return super().forward(x) * 1.0


def partly_stock_resnet18():
    model = torchvision.models.resnet18()
    model.layer1[0].bn1 = nn.GroupNorm(8, 64)
    model.layer2[1] = OwnForward(128, 128)
    return model


def test_left_stock_blocks_are_grouped_by_reason_and_strict_raises(caplog):
    report = fusedres.explain(partly_stock_resnet18())
    assert report.left == {"GroupNorm norm (only nn.BatchNorm2d is fused)": ["layer1.0"],
                           "overridden forward": ["layer2.1"]}
    assert counts(report) == dict(blocks=6, stems=1, bn_layers=16)
    assert report.summary().endswith("; left stock: 1 (GroupNorm norm (only nn.BatchNorm2d is fused): layer1.0), "
                                     "1 (overridden forward: layer2.1)")
    caplog.set_level(logging.INFO, logger="fusedres")
    fusedres.convert(partly_stock_resnet18())
    assert info_lines(caplog) == [report.summary()]
    with pytest.raises(ValueError, match=r"strict=True.*GroupNorm norm.*layer1\.0.*overridden forward: layer2\.1"):
        fusedres.convert(partly_stock_resnet18(), strict=True)
    assert isinstance(fusedres.convert(torchvision.models.resnet18(), strict=True).layer1[0], FusedBasicBlock)


def test_a_block_of_unknown_class_counts_as_left_stock():
    class ResidualUnit(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x):
            return torch.relu(self.bn(self.conv(x)) + x)

    model = nn.Sequential(ResidualUnit(), ResidualUnit())
    with pytest.warns(UserWarning, match="Nothing in this model was converted"):
        fusedres.convert(model)
    assert fusedres.explain(model).left == {
        "unknown block class test_a_block_of_unknown_class_counts_as_left_stock.<locals>.ResidualUnit": ["0", "1"]}
    with pytest.raises(ValueError, match="unknown block class"), pytest.warns(UserWarning):
        fusedres.convert(model, strict=True)


def test_fold_and_unconvert_report(caplog):
    caplog.set_level(logging.INFO, logger="fusedres")
    folded = fusedres.fold(torchvision.models.resnet18().eval())
    assert info_lines(caplog) == ["fusedres.fold: folded 8 blocks, 1 stem, 20 BN layers"]
    assert counts(fusedres.explain(torchvision.models.resnet18().eval(), "fold")) == RESNET18
    with pytest.warns(UserWarning, match=r"Nothing was restored") as record:
        assert fusedres.unconvert(folded) is folded
    assert "left fused: 10 (folded (fold is one way" in str(record[0].message)  # 8 blocks, stem conv + bn1
    caplog.clear()
    restored = fusedres.unconvert(fusedres.convert(torchvision.models.resnet18()))
    assert info_lines(caplog)[-1] == "fusedres.unconvert: restored to stock 8 blocks, 1 stem, 20 BN layers"
    assert type(restored.layer1[0]) is torchvision.models.resnet.BasicBlock


def test_skip_weight_blocks_are_reported_by_fold():
    model = fusedres.convert(torchvision.models.resnet18(), skip_weight="scalar").eval()
    report = fusedres.explain(model, "fold")
    assert report.left == {"learned skip weight": [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]}
    assert (report.blocks, report.stems) == (0, 1)
    with pytest.raises(ValueError, match="learned skip weight"):
        fusedres.explain(model, "unconvert")


def test_explain_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown action 'fuse'"):
        fusedres.explain(nn.Linear(2, 2), "fuse")
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        fusedres.explain("resnet18")
    with pytest.raises(TypeError, match=r"unexpected keyword\(s\) \['mode'\] for action 'fold'"):
        fusedres.explain(nn.Linear(2, 2), "fold", mode="conv")
