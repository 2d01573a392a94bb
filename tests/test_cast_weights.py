"""`fusedres::cast_weights`: several weights cast in one launch, gradients cast back in one; bitwise the per-weight
`.to` forward and backward. Conv-mode blocks use it under autocast (`autocast_weights`): a converted model
trains bitwise as with one cast per conv, and the count shows one cast launch per block and direction."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import Bottleneck, conv1x1

import fusedres
from fusedres.nn import conv_blocks
from fusedres.ops.cast_weights import cast_weights
from helpers import aten_ops_seen, mixed_resnet, train_bf16_autocast

LOW = [torch.bfloat16, torch.float16]


def _weights(requires_grad=(True, True, True)):
    ws = [torch.randn(6, 4, 3, 3), torch.randn(8, 6, 1, 1).contiguous(memory_format=torch.channels_last),
          torch.randn(5, 8, 3, 3)[:, :, 1:, :]]  # the last one not dense
    return [w.requires_grad_(g) for w, g in zip(ws, requires_grad)]


@pytest.mark.parametrize("dtype", LOW)
def test_forward_bitwise_like_to(dtype):
    ws = _weights()
    outs = cast_weights(ws, dtype)
    for w, o in zip(ws, outs):
        ref = w.to(dtype)
        assert o.dtype == dtype and o.shape == ref.shape and o.stride() == ref.stride()
        assert torch.equal(o, ref)
        assert o.untyped_storage().data_ptr() != w.untyped_storage().data_ptr()


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("used,requires_grad", [((0, 1, 2), (True, True, True)), ((0, 2), (True, True, True)),
                                                ((0, 1, 2), (True, False, True))], ids=["all", "one_unused", "frozen"])
def test_backward_bitwise_like_to(dtype, used, requires_grad):
    """Per-weight gradients of `.to` bitwise; an unused output (no gradient) or a frozen weight gives None."""
    ws = _weights(requires_grad)
    refs = [w.detach().clone().requires_grad_(w.requires_grad) for w in ws]
    gs = {i: torch.randn(w.shape, dtype=dtype).contiguous(memory_format=torch.channels_last) for i, w in
          enumerate(ws)}
    outs = cast_weights(ws, dtype)
    torch.autograd.backward([outs[i] for i in used], [gs[i] for i in used])
    live = [i for i in used if requires_grad[i]]
    torch.autograd.backward([refs[i].to(dtype) for i in live], [gs[i] for i in live])
    for i, (w, r) in enumerate(zip(ws, refs)):
        if r.grad is None:
            assert w.grad is None, i
        else:
            assert w.grad.dtype == torch.float32 and w.grad.stride() == r.grad.stride()
            assert torch.equal(w.grad, r.grad), i


def test_opcheck():
    torch.library.opcheck(torch.ops.fusedres.cast_weights.default, (_weights(), torch.bfloat16))
    torch.library.opcheck(torch.ops.fusedres.cast_weights.default, (_weights((True, False, True))[:2], torch.float16))


@pytest.mark.parametrize("weights,dtype,err,match", [
    ([], torch.bfloat16, ValueError, "non-empty list"),
    ([torch.zeros(2, dtype=torch.int64)], torch.bfloat16, TypeError, "floating tensor"),
    ([torch.zeros(2), torch.zeros(2, device="meta")], torch.bfloat16, ValueError, "one device"),
    ([torch.zeros(2)], torch.int32, TypeError, "floating torch.dtype"),
    ([torch.zeros(2), 3.0], torch.bfloat16, TypeError, r"weights\[1\] must be a torch.Tensor"),
])
def test_refuses_bad_input(weights, dtype, err, match):
    with pytest.raises(err, match=match):
        cast_weights(weights, dtype)
    if weights and all(isinstance(w, torch.Tensor) for w in weights):
        with pytest.raises(err, match=match):
            torch.ops.fusedres.cast_weights(weights, dtype)


def test_transforms_take_plain_to():
    w = torch.randn(4, 3)
    g = torch.func.grad(lambda w: cast_weights([w, 2 * w], torch.bfloat16)[1].float().sum())(w)
    assert torch.equal(g, torch.full_like(w, 2.0))
    _, t = torch.func.jvp(lambda w: cast_weights([w], torch.bfloat16)[0], (w,), (torch.ones_like(w),))
    assert t.dtype == torch.bfloat16 and torch.equal(t, torch.ones_like(t))


def _block():
    return Bottleneck(8, 2, 2, downsample=nn.Sequential(conv1x1(8, 8, 2), nn.BatchNorm2d(8)))


def test_block_casts_its_weights_once_under_autocast(monkeypatch):
    """All four convs of a projection Bottleneck (conv1..conv3, the shortcut's): one cast each way instead of four;
    nothing changes without autocast."""
    block = fusedres.convert(_block(), mode="conv")
    x = torch.randn(2, 8, 6, 6)

    def step(amp):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            y = block(x)
        y.float().sum().backward()

    new = aten_ops_seen(lambda: step(True))
    assert new.count("cast_weights") == 1 and new.count("_foreach_copy_") == 1  # the op, then its backward
    assert "cast_weights" not in aten_ops_seen(lambda: step(False))
    with monkeypatch.context() as m:
        _old_path(m)
        old = aten_ops_seen(lambda: step(True))
    assert "_foreach_copy_" not in old
    assert new.count("_to_copy") == old.count("_to_copy") - 8  # 4 weights, 2 directions


def _old_path(monkeypatch):
    """conv mode as before cast_weights and recast_conv: each conv casts its own weight, the stem is F.conv2d."""
    from fusedres.nn import preact_conv

    for module in (conv_blocks, preact_conv):  # each imported the name
        monkeypatch.setattr(module, "autocast_weights", lambda x, convs: {})
    monkeypatch.setattr(conv_blocks, "recast_conv", F.conv2d)


def _tiny_preact():
    from fusedres import preact

    return preact.PreActResNet(preact.PreActBasicBlock, [2, 2], [4, 8], num_classes=5, stem_width=4)


@pytest.mark.parametrize("make", [mixed_resnet, _tiny_preact], ids=["torchvision", "preact"])
def test_converted_resnet_trains_bitwise_as_before(monkeypatch, make):
    """Two bf16-autocast SGD steps of a converted tiny ResNet (torchvision: both block kinds, projection shortcuts;
    pre-activation units): outputs, gradients, parameters and running statistics bitwise those of one weight cast
    per conv and the stock stem conv (the casts round the same; the stem's backward sees the same bf16 input)."""
    stock = make()
    xs = [torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last) for _ in range(2)]
    targets = [torch.randint(0, 5, (2,)) for _ in range(2)]
    model = fusedres.convert(copy.deepcopy(stock), mode="conv")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert "cast_weights" in aten_ops_seen(lambda: copy.deepcopy(model)(xs[0]))
    new = train_bf16_autocast(model, xs, targets)
    with monkeypatch.context() as m:
        _old_path(m)
        old_model = fusedres.convert(copy.deepcopy(stock), mode="conv")
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert "cast_weights" not in aten_ops_seen(lambda: copy.deepcopy(old_model)(xs[0]))
        old = train_bf16_autocast(old_model, xs, targets)
    for step in range(2):
        assert torch.equal(new[0][step], old[0][step]), step
        for k, g in old[1][step].items():
            assert torch.equal(new[1][step][k], g), (step, k)
    for k, v in old[2].items():
        assert torch.equal(new[2][k], v), k


def test_compiled_block_under_autocast_fullgraph():
    """torch.compile(fullgraph=True) of a conv-mode Bottleneck with a projection shortcut under CPU bf16
    autocast: the graph keeps the one cast_weights call and matches eager."""
    from torch._dynamo.testing import CompileCounterWithBackend

    stock = _block()
    eager, compiled = fusedres.convert(copy.deepcopy(stock), mode="conv"), fusedres.convert(stock, mode="conv")
    x = torch.randn(2, 8, 6, 6)
    counter = CompileCounterWithBackend("aot_eager")
    fn = torch.compile(compiled, fullgraph=True, backend=counter)
    outs = []
    for block, f in ((eager, eager), (compiled, fn)):
        xg = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = f(xg)
        y.float().square().sum().backward()
        outs.append((y, xg.grad, block.conv2.weight.grad, block.downsample[0].weight.grad))
    assert counter.frame_count == 1
    assert any("fusedres.cast_weights" in str(n.target) for g in counter.graphs for n in g.graph.nodes)
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)


def test_count_one_cast_per_block_and_direction():
    """Counted (fake tensors) bf16 conv-mode resnet18 training step: the block weights cast by one
    `_foreach_copy_` per block forward and one backward; no `_to_copy` left in a block."""
    from fusedres.bench.count import Impl, build, build_model, count_model

    base = build_model("resnet18")
    x = torch.empty(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    c = count_model(build(base, Impl("conv", "bf16", "channels_last", "cuda", "conv")), x, mode="train",
                    backend="cuda", amp_dtype=torch.bfloat16)
    for phase in ("fwd", "bwd"):
        assert sum(ln.name == "_foreach_copy_" for ln in c.of(phase)) == 8, phase  # resnet18's 8 blocks
    # what is left, 5 each way: the stem's input and weight (its input cast again in backward: recast_conv),
    # the fc's weight and bias, the logits (stock: 24 forward, 23 backward)
    for phase in ("fwd", "bwd"):
        assert sum(ln.name in ("_to_copy", "to") for ln in c.of(phase)) == 5, phase
