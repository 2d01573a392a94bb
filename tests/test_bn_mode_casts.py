"""bn mode (the default `fusedres.convert`) under autocast: a fused block casts its float32 conv weights (conv1..conv3
and a `(Conv2d, BN)` downsample's conv) in one `fusedres::cast_weights` launch each way and runs each conv as
`F.conv2d` with its cast weight. A converted model trains bitwise as with one cast per conv (the module calls);
a block whose convs have hooks calls its modules (the hooks fire); the count shows one cast per block and
direction."""
import copy

import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1

import fusedres
from fusedres.nn import blocks, timm_blocks
from helpers import aten_ops_seen, mixed_resnet, randomise_bns, train_bf16_autocast


def _old_path(monkeypatch):
    """bn mode as before: every conv module called, each casting its own weight."""
    monkeypatch.setattr(blocks, "block_conv_weights", lambda block, x, names: {})
    monkeypatch.setattr(timm_blocks, "block_conv_weights", lambda block, x, names: {})


def _tiny_resnet18():
    """torchvision resnet18's layout (BasicBlocks, two per stage, projection shortcuts) at toy widths."""
    import torchvision

    m = torchvision.models.resnet18(num_classes=5)
    m.conv1, m.bn1 = nn.Conv2d(3, 4, 7, 2, 3, bias=False), nn.BatchNorm2d(4)
    widths, prev = (4, 6, 8, 8), 4
    for i, w in enumerate(widths):
        stride = 1 if i == 0 else 2
        ds = None if stride == 1 and prev == w else nn.Sequential(conv1x1(prev, w, stride), nn.BatchNorm2d(w))
        setattr(m, f"layer{i + 1}", nn.Sequential(BasicBlock(prev, w, stride, ds), BasicBlock(w, w)))
        prev = w
    m.fc = nn.Linear(prev, 5)
    return randomise_bns(m, False)


def _tiny_resnet50():
    """torchvision resnet50's layout (Bottlenecks, a projection shortcut opening each stage) at toy widths."""
    import torchvision

    m = torchvision.models.resnet18(num_classes=5)
    m.conv1, m.bn1 = nn.Conv2d(3, 8, 7, 2, 3, bias=False), nn.BatchNorm2d(8)
    prev = 8
    for i, planes in enumerate((2, 3)):
        stride = 1 if i == 0 else 2
        ds = nn.Sequential(conv1x1(prev, planes * 4, stride), nn.BatchNorm2d(planes * 4))
        setattr(m, f"layer{i + 1}", nn.Sequential(Bottleneck(prev, planes, stride, ds), Bottleneck(planes * 4, planes)))
        prev = planes * 4
    m.layer3 = m.layer4 = nn.Identity()
    m.fc = nn.Linear(prev, 5)
    return randomise_bns(m, False)


def _tiny_timm():
    """timm resnet50d's layout (deep stem, avg-down shortcuts `(AvgPool2d | Identity, Conv2d, BN)`) at toy widths."""
    timm = pytest.importorskip("timm")
    from timm.models import resnet as tr

    model = tr.ResNet(tr.Bottleneck, [1, 1, 1, 1], channels=(2, 3, 4, 4), stem_width=8, stem_type="deep",
                      avg_down=True, num_classes=5)
    assert timm is not None
    return randomise_bns(model, False)


def _blocks_of(model):
    kinds = (blocks.BasicBlock, blocks.Bottleneck, timm_blocks.TimmBasicBlock, timm_blocks.TimmBottleneck)
    return [m for m in model.modules() if type(m) in kinds]


def _assert_same(new, old):
    for step in range(2):
        assert torch.equal(new[0][step], old[0][step]), step
        for k, g in old[1][step].items():
            assert torch.equal(new[1][step][k], g), (step, k)
    for k, v in old[2].items():
        assert torch.equal(new[2][k], v), k


@pytest.mark.parametrize("make", [_tiny_resnet18, _tiny_resnet50, mixed_resnet, _tiny_timm],
                         ids=["resnet18", "resnet50", "mixed", "timm-resnet50d"])
def test_converted_resnet_trains_bitwise_as_before(monkeypatch, make):
    """Two bf16-autocast SGD steps of a bn-mode ResNet: outputs, gradients, parameters and running statistics
    (state_dict) bitwise those of the module calls, each conv casting its own weight; one cast_weights call per
    block."""
    stock = make()
    xs = [torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last) for _ in range(2)]
    targets = [torch.randint(0, 5, (2,)) for _ in range(2)]
    model = fusedres.convert(copy.deepcopy(stock))
    n_blocks = len(_blocks_of(model))
    assert n_blocks >= 2
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert aten_ops_seen(lambda: copy.deepcopy(model)(xs[0])).count("cast_weights") == n_blocks
    new = train_bf16_autocast(model, xs, targets)
    with monkeypatch.context() as m:
        _old_path(m)
        old_model = fusedres.convert(copy.deepcopy(stock))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert "cast_weights" not in aten_ops_seen(lambda: copy.deepcopy(old_model)(xs[0]))
        old = train_bf16_autocast(old_model, xs, targets)
    _assert_same(new, old)


def _block():
    return fusedres.convert(Bottleneck(8, 2, 2, downsample=nn.Sequential(conv1x1(8, 8, 2), nn.BatchNorm2d(8))))


def test_block_casts_its_weights_once_under_autocast(monkeypatch):
    """A projection Bottleneck's four conv weights: one cast each way instead of four; nothing changes without
    autocast or with weights that are not float32."""
    block, x = _block(), torch.randn(2, 8, 6, 6)

    def step(amp, block=block, x=x):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            y = block(x)
        y.float().sum().backward()

    new = aten_ops_seen(lambda: step(True))
    assert new.count("cast_weights") == 1 and new.count("_foreach_copy_") == 1  # the op, then its backward
    off = aten_ops_seen(lambda: step(False))
    assert "cast_weights" not in off and "_foreach_copy_" not in off
    dbl = _block().double()
    assert "cast_weights" not in aten_ops_seen(lambda: step(True, dbl, x.double()))
    with monkeypatch.context() as m:
        _old_path(m)
        old = aten_ops_seen(lambda: step(True))
    assert "cast_weights" not in old
    assert new.count("_to_copy") == old.count("_to_copy") - 8  # 4 weights, 2 directions


@pytest.mark.parametrize("hook", ["forward", "forward_pre", "full_backward", "global_forward"])
def test_hooked_conv_makes_its_block_call_its_modules(monkeypatch, hook):
    """A hook on conv1 (or a global module hook) is called; that block runs the old path (no cast_weights), the
    others still cast once; the values are bitwise those of the old path."""
    stock = mixed_resnet()
    model = fusedres.convert(copy.deepcopy(stock))
    hooked_block = model.layer3[0]
    calls = []
    handle = None
    if hook == "forward":
        handle = hooked_block.conv1.register_forward_hook(lambda m, i, o: calls.append(o.dtype))
    elif hook == "forward_pre":
        handle = hooked_block.conv1.register_forward_pre_hook(lambda m, i: calls.append(torch.bfloat16))
    elif hook == "full_backward":
        handle = hooked_block.conv1.register_full_backward_hook(lambda m, gi, go: calls.append(go[0].dtype))
    x = torch.randn(2, 3, 32, 32)

    def run(m):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x)
        y.float().sum().backward()
        return y.detach()

    try:
        if hook == "global_forward":
            handle = torch.nn.modules.module.register_module_forward_hook(
                lambda m, i, o: calls.append(o.dtype) if m is hooked_block.conv1 else None)
        seen = aten_ops_seen(lambda: run(model))
        y = run(model)
    finally:
        handle.remove()
    n_blocks = len(_blocks_of(model))
    assert seen.count("cast_weights") == (0 if hook == "global_forward" else n_blocks - 1)
    assert calls and all(d == torch.bfloat16 for d in calls)
    with monkeypatch.context() as m:
        _old_path(m)
        old_model = fusedres.convert(copy.deepcopy(stock))
        assert torch.equal(run(old_model), y)
    calls.clear()
    run(model)  # the hook removed: the block casts again, and nothing calls the hook
    assert not calls


def test_reflect_padding_conv_is_called_as_a_module(monkeypatch):
    """A conv with padding_mode="reflect" keeps its module call (its own cast); the block's others are cast
    together; bitwise the old path."""
    stock = Bottleneck(8, 2, 2, downsample=nn.Sequential(conv1x1(8, 8, 2), nn.BatchNorm2d(8)))
    stock.conv2.padding_mode = "reflect"
    x = torch.randn(2, 8, 6, 6)

    def run(block):
        xg = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = block(xg)
        y.float().square().sum().backward()
        return [y, xg.grad] + [p.grad for p in block.parameters()]

    block = fusedres.convert(copy.deepcopy(stock))
    seen = []
    real = blocks.block_weights

    def spy(x, convs):
        out = real(x, convs)
        seen.append(list(out))
        return out

    monkeypatch.setattr(blocks, "block_weights", spy)
    new = run(block)
    assert seen == [[block.conv1, block.conv3, block.downsample[0]]]
    with monkeypatch.context() as m:
        _old_path(m)
        old = run(fusedres.convert(copy.deepcopy(stock)))
    for a, b in zip(new, old):
        assert torch.equal(a, b)


def test_compiled_block_under_autocast_fullgraph():
    """torch.compile(fullgraph=True) of a bn-mode projection Bottleneck under CPU bf16 autocast: one graph with
    the one cast_weights call, matching eager."""
    from torch._dynamo.testing import CompileCounterWithBackend

    eager = _block()
    compiled = copy.deepcopy(eager)
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
    assert sum("fusedres.cast_weights" in str(n.target) for g in counter.graphs for n in g.graph.nodes) == 1
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)


def test_count_one_cast_per_block_and_direction():
    """Counted (fake tensors) bf16 bn-mode resnet18 training step: the block weights cast by one `_foreach_copy_`
    per block forward and one backward; no `_to_copy` left in a block."""
    from fusedres.bench.count import Impl, build, build_model, count_model

    base = build_model("resnet18")
    x = torch.empty(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    c = count_model(build(base, Impl("bn", "bf16", "channels_last", "cuda", "bn")), x, mode="train",
                    backend="cuda", amp_dtype=torch.bfloat16)
    for phase in ("fwd", "bwd"):
        assert sum(ln.name == "_foreach_copy_" for ln in c.of(phase)) == 8, phase  # resnet18's 8 blocks
    # what is left: the stem conv's input (forward only: the image needs no gradient) and weight, the fc's weight
    # and bias, the logits
    for phase, n in (("fwd", 5), ("bwd", 4)):
        assert sum(ln.name in ("_to_copy", "to") for ln in c.of(phase)) == n, phase
