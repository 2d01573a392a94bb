"""Training mode `fusedres.convert(model, mode="conv")`: convs emit BN statistics, the next conv applies BN + ReLU
in its prologue, the tail is one bn_act/dual_bn_act pass. Outputs, gradients and running statistics must match
stock torchvision over SGD steps (float64 exactly, float32 through the Triton kernels)."""
import copy

import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1

import fusedres
from fusedres.nn.conv_blocks import ConvBasicBlock, ConvBottleneck
from helpers import mixed_resnet


@pytest.fixture(autouse=True)
def _on_device(on_test_device):
    pass


def tiny_resnet(dtype):
    m = mixed_resnet()
    m.layer4[0].bn2.momentum = None  # cumulative average
    return m.to(dtype)


def _step(model, opt, x, target):
    opt.zero_grad()
    out = model(x)
    loss = nn.functional.cross_entropy(out, target)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    opt.step()
    return out.detach(), grads


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 2e-4)], ids=["fp64", "fp32"])
def test_two_sgd_steps_match_stock(dtype, tol):
    stock = tiny_resnet(dtype).train()
    model = fusedres.convert(copy.deepcopy(stock), mode="conv")
    assert type(model.layer1[0]) is ConvBasicBlock and type(model.layer3[0]) is ConvBottleneck
    assert list(model.state_dict()) == list(stock.state_dict())
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (stock, model)]
    for step in range(2):
        x = torch.randn(2, 3, 32, 32, dtype=dtype).contiguous(memory_format=torch.channels_last)
        target = torch.randint(0, 5, (2,))
        ref_out, ref_grads = _step(stock, opts[0], x, target)
        out, grads = _step(model, opts[1], x, target)
        torch.testing.assert_close(out, ref_out, rtol=tol, atol=tol, msg=lambda m: f"step {step} output: {m}")
        for k in ref_grads:
            scale = max(1.0, ref_grads[k].abs().max().item())
            torch.testing.assert_close(grads[k], ref_grads[k], rtol=tol, atol=tol * scale,
                                       msg=lambda m: f"step {step} grad {k}: {m}")
    sd, ref_sd = model.state_dict(), stock.state_dict()
    for k in ref_sd:  # parameters after two steps, running statistics, num_batches_tracked
        torch.testing.assert_close(sd[k], ref_sd[k], rtol=tol, atol=tol, msg=lambda m: f"state {k}: {m}")
    # eval mode uses the running statistics in the prologue
    stock.eval()
    model.eval()
    x = torch.randn(2, 3, 32, 32, dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(model(x), stock(x), rtol=tol, atol=tol)


def test_conv_mode_round_trip_and_errors():
    stock = tiny_resnet(torch.float32)
    model = fusedres.convert(copy.deepcopy(stock), mode="conv")
    assert fusedres.convert(model, mode="conv") is model  # idempotent
    back = fusedres.unconvert(model)
    assert type(back.layer1[0]) is BasicBlock and type(back.layer4[0]) is Bottleneck
    with pytest.raises(ValueError, match="mode"):
        fusedres.convert(stock, mode="nope")
    block = fusedres.convert(Bottleneck(8, 2), mode="conv")  # a bare block converts too
    assert type(block) is ConvBottleneck


def test_block_convs_run_fused_in_training():
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    model = fusedres.convert(tiny_resnet(torch.float32).train(), mode="conv")
    x = torch.randn(2, 3, 32, 32)
    with Record():
        model(x)
    names = [s.split(".")[-1] for s in seen]
    assert names.count("conv_bn_act") == 12            # every block conv, downsample convs included
    assert names.count("convolution") == 1             # the stem
    assert not any("batch_norm" in n for n in names)   # BN: statistics in the conv epilogues
    assert names.count("bn_act_pool_train") == 1       # the stem's BN + ReLU + max-pool
    assert names.count("stats_bn_act") == 4            # one tail pass per block
    assert "dual_bn_act_train" not in names


def test_conv_mode_block_compiles_fullgraph():
    """torch.compile (Inductor, fullgraph) of a conv-mode Bottleneck with a projection shortcut, in training."""
    stock = Bottleneck(8, 2, 2, downsample=nn.Sequential(conv1x1(8, 8, 2), nn.BatchNorm2d(8)))
    block = fusedres.convert(copy.deepcopy(stock), mode="conv")
    x = torch.randn(2, 8, 6, 6)
    xs, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = torch.compile(block, fullgraph=True)(xs)
    ref = stock(xr)
    g = torch.randn_like(ref)
    y.backward(g)
    ref.backward(g)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(xs.grad, xr.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(block.conv2.weight.grad, stock.conv2.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(block.downsample[1].running_var, stock.downsample[1].running_var)
    assert int(block.bn1.num_batches_tracked) == 1


@pytest.mark.parametrize("arch,bound", [("resnet18", 0.65), ("resnet50", 0.80)])
def test_conv_mode_saved_activation_bytes(arch, bound):
    """What autograd keeps for one training forward, by unique storage: conv mode keeps the stem's conv output
    and per block its conv inputs and the last conv's output (+ the projection's), nothing else (measured
    0.633x / 0.785x of stock for resnet18 / resnet50 at 224x224; docs/conv_bn_act.md). Activations only: at this
    tiny input the per-channel (scale, shift) vectors conv mode keeps to save a launch each way weigh ~2 % of
    the total; at batch 256, 224x224 they are < 0.01 %."""
    import torchvision

    from model_compare import saved_bytes

    x = torch.randn(2, 3, 64, 64)
    with fusedres.use_backend("reference"):
        stock = saved_bytes(getattr(torchvision.models, arch)(num_classes=10).train(), x, activations_only=True)
        conv = saved_bytes(fusedres.convert(getattr(torchvision.models, arch)(num_classes=10).train(), mode="conv"),
                           x, activations_only=True)
    assert conv <= bound * stock, f"{arch}: conv mode saves {conv / stock:.3f}x stock's bytes"


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("shape,pool", [((2, 5, 9, 9), dict(kernel_size=3, stride=2, padding=1)),
                                        ((3, 4, 6, 7), dict(kernel_size=2, stride=2, ceil_mode=True))])
def test_stem_bn_act_pool_like_stock(dtype, tol, shape, pool):
    """The conv-mode stem's BatchNormActPool2d against nn.BatchNorm2d + ReLU + MaxPool2d: output, gradients,
    running statistics (both layouts)."""
    from fusedres.nn.conv_blocks import BatchNormActPool2d

    for fmt in (torch.contiguous_format, torch.channels_last):
        bn = nn.BatchNorm2d(shape[1]).to(dtype)
        nn.init.normal_(bn.weight)
        nn.init.normal_(bn.bias)
        stock = nn.Sequential(bn, nn.ReLU(), nn.MaxPool2d(**pool))
        ours = BatchNormActPool2d.from_bn(copy.deepcopy(bn), act="relu")
        ours.pool = nn.MaxPool2d(**pool)
        x = (torch.randn(shape, dtype=dtype) * 2 + 1).contiguous(memory_format=fmt)
        xs, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
        ys, yo = stock(xs), ours(xo)
        gy = torch.randn_like(ys)
        (ys * gy).sum().backward()
        (yo * gy).sum().backward()
        for a, b, what in ((yo, ys, "y"), (xo.grad, xs.grad, "grad x"), (ours.weight.grad, bn.weight.grad, "grad w"),
                           (ours.bias.grad, bn.bias.grad, "grad b"), (ours.running_var, bn.running_var, "var")):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(1.0, b.abs().max().item()),
                                       msg=lambda m: f"{what}: {m}")
