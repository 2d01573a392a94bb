"""fusedres.fold: BN folded into each conv, conv + BN (+ residual) + ReLU as one kernel, for stock and converted
torchvision ResNets in eval mode: same outputs, same state_dict, no separate batch_norm / add / relu ops."""
import collections

import pytest
import torch
import torchvision
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fusedres
from fusedres.fold import fold
from fusedres.nn.conv import FoldedBasicBlock, FoldedBottleneck, FoldedConv2d
from helpers import assert_close, mixed_resnet, randomise_bns


@pytest.fixture(autouse=True)
def _on_device(on_test_device):
    pass


def tiny_resnet():
    return mixed_resnet(randomise_running_stats=True).eval()


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket).split(".")[-1] if "fusedres" not in str(func) else "conv_bn_act"] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("convert,channels_last", [(None, False), (None, True), ("bn", True), ("conv", False)],
                         ids=["stock-nchw", "stock-nhwc", "converted-nhwc", "conv_mode-nchw"])
def test_tiny_resnet_matches_stock(convert, channels_last):
    stock = tiny_resnet()
    model = fusedres.convert(stock, inplace=False, mode=convert).eval() if convert else stock
    folded = fold(model)
    assert isinstance(folded.layer1[0], FoldedBasicBlock) and isinstance(folded.layer3[0], FoldedBottleneck)
    assert isinstance(folded.conv1, FoldedConv2d)
    x = torch.randn(2, 3, 32, 32)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = stock.double()(x.double())
        y = folded(x)
    assert_close(y, ref, torch.float32, "folded output")


def test_low_precision_bf16():
    stock = tiny_resnet()
    folded = fold(stock).bfloat16()
    for m in folded.modules():
        if isinstance(m, FoldedConv2d):
            m.refold()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = stock.double()(x.double())
        y = folded(x.bfloat16())
    # bf16 activations through ~10 layers: compare relative to the output's magnitude
    torch.testing.assert_close(y.double(), ref, rtol=0.1, atol=0.1 * ref.abs().max().item())


def test_resnet50_runs_no_separate_bn_add_relu():
    stock = randomise_bns(torchvision.models.resnet50()).eval()
    folded = fold(stock)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad(), fusedres.use_backend("reference"):  # the op, not the kernel, is counted (fast on CPU)
        ref = stock(x)
        with OpCounter() as counter:
            y = folded(x)
    n_convs = sum(isinstance(m, nn.Conv2d) for m in stock.modules())
    assert n_convs == 53
    assert counter.counts["conv_bn_act"] == n_convs
    forbidden = {"batch_norm", "native_batch_norm", "_native_batch_norm_legit_no_training", "cudnn_batch_norm",
                 "add", "add_", "relu", "relu_", "threshold", "clamp_min", "convolution", "mul", "mul_"}
    assert not forbidden & set(counter.counts), counter.counts
    assert set(counter.counts) <= {"conv_bn_act", "max_pool2d_with_indices", "mean", "view", "t", "addmm"}, \
        counter.counts
    assert_close(y, ref, torch.float32, "resnet50 folded")


def test_state_dict_semantics_and_refold():
    stock = tiny_resnet()
    folded = fold(stock)
    sd, sd_f = stock.state_dict(), folded.state_dict()
    assert list(sd) == list(sd_f)
    for k in sd:
        assert torch.equal(sd[k], sd_f[k]), k
    other = tiny_resnet()  # different random tensors
    folded.load_state_dict(other.state_dict())
    fold(folded, inplace=True)  # recompute the folded constants
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad(), fusedres.use_backend("reference"):
        assert_close(folded(x), other(x), torch.float32, "after load_state_dict + refold")
    assert stock.conv1.weight.is_contiguous()  # fold (not inplace) left the source model alone


def test_training_mode_refused():
    stock = tiny_resnet()
    with pytest.raises(ValueError, match="eval"):
        fold(stock.train())
    folded = fold(stock.eval())
    folded.train()
    with pytest.raises(RuntimeError, match="inference"):
        folded(torch.randn(2, 3, 16, 16))
