"""The count level (fusedres.bench.count): declared kernel traffic against what really runs, fake-tensor counts
against real runs (per op, and a converted Bottleneck's whole training step in bn and conv mode), one Bottleneck
counted by hand, and the CLI path.

Honesty: every fused op runs on small CPU tensors with each Triton launch executed by the interpreter while its
loads and stores are recorded; the bytes its launcher declares (TRAFFIC) must equal the distinct bytes it
touched. The CUDA backend cannot run here: `fusedres._C` is replaced by a recorder, and every pointer the
wrappers pass must be declared (KERNELS), with the same activation traffic the Triton kernels really have.
Then the same op on fake tensors must count the same launches and bytes as the real run.
"""
from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import fusedres
from fusedres.bench import count as C
from fusedres.bench import traffic

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="runs the Triton interpreter on CPU tensors")


@pytest.fixture(autouse=True)
def _tiles(small_tiles):
    pass


# ------------------------------------------------------------------------------------------------ tracing
class _Touched:
    """Distinct addresses an interpreted kernel loads and stores, as bytes."""

    def __init__(self):
        self.loads, self.stores = {}, {}

    @staticmethod
    def _add(table, ptrs, mask):
        size = ptrs.get_element_ty().primitive_bitwidth // 8
        addrs = np.broadcast_to(ptrs.data, np.broadcast_shapes(ptrs.data.shape, mask.data.shape))
        hit = addrs[np.broadcast_to(mask.data, addrs.shape)]
        table.setdefault(size, set()).update(hit.ravel().tolist())

    def bytes(self, table):
        return sum(size * len(addrs) for size, addrs in table.items())


@contextlib.contextmanager
def _trace(touched):
    from triton.runtime import interpreter

    b = interpreter.interpreter_builder
    load, store = b.create_masked_load, b.create_masked_store

    def masked_load(ptrs, mask, other, *rest):
        touched._add(touched.loads, ptrs, mask)
        return load(ptrs, mask, other, *rest)

    def masked_store(ptrs, value, mask, *rest):
        touched._add(touched.stores, ptrs, mask)
        return store(ptrs, value, mask, *rest)

    b.create_masked_load, b.create_masked_store = masked_load, masked_store
    try:
        yield
    finally:
        del b.create_masked_load, b.create_masked_store


def _traced_run(kernel, grid, args, kwargs, launch):
    touched = _Touched()
    with _trace(touched):
        kernel[grid](*args, **kwargs)
    launch.detail["traced"] = (touched.bytes(touched.loads), touched.bytes(touched.stores))


# ------------------------------------------------------------------------------------------------ op cases
def _act(shape, cl, g=True):
    x = torch.randn(shape)
    x = x.contiguous(memory_format=torch.channels_last) if cl else x
    return x.requires_grad_(g)


def _vec(c, g=True):
    return (torch.rand(c) + 0.5).requires_grad_(g)


def _bn(shape, cl, training, residual=False, relu=True, weighted=False):
    def run():
        c = shape[1]
        x, w, b = _act(shape, cl), _vec(c), _vec(c)
        r = _act(shape, cl) if residual else None
        rw = _vec(c) if weighted else None
        y = fusedres.bn_act(x, torch.zeros(c), torch.ones(c), w, b, training, 0.1, 1e-5, r, relu, rw)
        y.backward(torch.randn_like(y))
    return run


def _dual(shape, cl, training):
    def run():
        c = shape[1]
        x, r = _act(shape, cl), _act(shape, cl)
        y = fusedres.dual_bn_act(x, r, weight=_vec(c), bias=_vec(c), running_mean=torch.zeros(c),
                                 running_var=torch.ones(c), weight_r=_vec(c), bias_r=_vec(c),
                                 running_mean_r=torch.zeros(c), running_var_r=torch.ones(c), training=training)
        y.backward(torch.randn_like(y))
    return run


def _scale_shift(shape, cl, second):
    def run():
        from fusedres.ops.scale_shift_act import scale_shift_act

        c = shape[1]
        x = _act(shape, cl)
        kw = dict(xb=_act(shape, cl), mean_b=_vec(c), scale_b=_vec(c), shift_b=_vec(c)) if second else \
            dict(residual=_act(shape, cl))
        y = scale_shift_act(x, _vec(c), _vec(c), _vec(c), relu=True, **kw)
        y.backward(torch.randn_like(y))
    return run


def _stats(shape, cl):
    def run():
        from fusedres.ops.batch_stats import batch_stats

        mean, var = batch_stats(_act(shape, cl))
        (mean.sum() + var.sum()).backward()
    return run


def _conv(shape, cl, k, stride, prologue=False, epilogue=False, stats=True, groups=1, c_out=6):
    def run():
        from fusedres.ops.conv_bn_act import conv_bn_act

        c = shape[1]
        x = _act(shape, cl)
        w = (torch.randn(c_out, c // groups, k, k) * 0.3).requires_grad_()
        kw = dict(stride=stride, padding=k // 2, groups=groups, stats=stats)
        if prologue:
            kw.update(in_scale=_vec(c), in_shift=_vec(c), in_relu=True)
        if epilogue:
            oh = (shape[2] + 2 * (k // 2) - k) // stride + 1
            ow = (shape[3] + 2 * (k // 2) - k) // stride + 1
            kw.update(out_scale=_vec(c_out), out_shift=_vec(c_out), relu=True,
                      residual=_act((shape[0], c_out, oh, ow), True), res_scale=_vec(c_out), res_shift=_vec(c_out))
        out = conv_bn_act(x, w, **kw)
        y, mean, var = out if stats else (out, None, None)
        loss = (y * torch.randn_like(y)).sum() + (mean.sum() + var.sum() if stats else 0)
        loss.backward()
    return run


S = (2, 8, 5, 6)
CASES = {
    "bn_act train": _bn(S, True, True),
    "bn_act train nchw": _bn(S, False, True),
    "bn_act train no relu": _bn(S, True, True, relu=False),
    "bn_act train residual": _bn(S, True, True, residual=True),
    "bn_act train residual no relu": _bn(S, False, True, residual=True, relu=False),
    "bn_act train residual weight": _bn(S, True, True, residual=True, weighted=True),
    "bn_act eval residual": _bn(S, True, False, residual=True),
    "dual_bn_act train": _dual(S, True, True),
    "dual_bn_act eval nchw": _dual(S, False, False),
    "scale_shift_act residual": _scale_shift(S, True, False),
    "scale_shift_act second": _scale_shift(S, False, True),
    "batch_stats": _stats(S, True),
    "conv 3x3 stats": _conv(S, True, 3, 1),
    "conv 1x1 stride 2 prologue": _conv(S, False, 1, 2, prologue=True),
    "conv 3x3 stride 2 epilogue": _conv((2, 8, 7, 5), True, 3, 2, epilogue=True, stats=False),
    "conv grouped prologue stats": _conv(S, True, 3, 1, prologue=True, groups=2),
}


def _record(case, backend, run=None, fake=False):
    counter = C.Counter(keep_detail=True)
    torch.manual_seed(0)
    mode = FakeTensorMode() if fake else contextlib.nullcontext()
    with mode, C.intercept(counter, backend, run=run, gpu_geometry=False), counter:
        CASES[case]()
    return counter.launches


def _summary(launches):
    return [(ln.name, ln.kind, ln.phase, ln.bytes, ln.flops) for ln in launches]


def _activation_bytes(launches):
    """Bytes of 4-D tensors the kernels declare: the activation traffic, the same on every backend."""
    total = 0
    for ln in launches:
        if ln.kind == "aten":
            continue
        for side in ("reads", "writes"):
            total += traffic.declared_bytes([e for e in ln.detail[side]
                                             if e is not None and (e[0] if isinstance(e, tuple) else e).dim() == 4])
    return total


@pytest.mark.parametrize("case", sorted(CASES))
def test_triton_declared_traffic_is_what_runs(case):
    launches = _record(case, "triton", run=_traced_run)
    kernels = [ln for ln in launches if ln.kind == "triton"]
    assert kernels, f"{case}: no Triton launch recorded"
    for ln in kernels:
        declared = (traffic.declared_bytes(ln.detail["reads"]), traffic.declared_bytes(ln.detail["writes"]))
        assert declared == ln.detail["traced"], (
            f"{case}: {ln.name} declares (read, written) bytes {declared}, the interpreter touched "
            f"{ln.detail['traced']}")
    assert _summary(_record(case, "triton", fake=True)) == _summary(launches), \
        f"{case}: the fake-tensor count differs from the real run"


@pytest.mark.parametrize("case", sorted(c for c in CASES if not c.startswith("conv")))
def test_cuda_declared_kernels_match_the_triton_traffic(case):
    launches = _record(case, "cuda")
    kernels = [ln for ln in launches if ln.kind == "cuda"]
    assert kernels, f"{case}: no fusedres._C call recorded"
    assert not [ln for ln in launches if ln.kind == "triton"]
    for ln in kernels:
        args = [v for a in ln.detail["args"].values() for v in (a if isinstance(a, list) else [a])]
        passed = {traffic.storage_key(t) for t in args if isinstance(t, torch.Tensor)}
        declared = [e[0] if isinstance(e, tuple) else e for e in ln.detail["reads"] + ln.detail["writes"]]
        assert all(traffic.storage_key(t) in passed for t in declared if t is not None), \
            f"{case}: {ln.name} declares a tensor fusedres._C.{ln.detail['entry']} was not given"
    triton = _record(case, "triton", run=_traced_run)
    assert _activation_bytes(kernels) == _activation_bytes(triton), \
        f"{case}: the CUDA kernels declare other activation traffic than the Triton kernels really have"
    assert _summary(_record(case, "cuda", fake=True)) == _summary(launches), \
        f"{case}: the fake-tensor count differs from the real run"


def test_undeclared_kernel_is_an_error(monkeypatch):
    from fusedres.triton import bn_act as tbn

    monkeypatch.delitem(tbn.TRAFFIC, "_apply_kernel")
    with pytest.raises(RuntimeError, match="_apply_kernel was launched but has no entry"):
        _record("bn_act eval residual", "triton", fake=True)


# ------------------------------------------------------------------------------------------------ by hand
def test_bottleneck_counted_by_hand():
    """torchvision Bottleneck(16, 4), x [2, 16, 8, 8] float32 NCHW, training step with loss = sum(output)."""
    from torchvision.models.resnet import Bottleneck

    block = Bottleneck(16, 4)
    c = C.count_model(block, torch.empty(2, 16, 8, 8), loss=lambda y: y.sum(), optimizer=False)
    e16, e4 = 2 * 16 * 64 * 4, 2 * 4 * 64 * 4        # activation bytes, 16 and 4 channels
    v16, v4 = 16 * 4, 4 * 4                          # one per-channel vector
    w1, w2, w3 = 4 * 16 * 4, 4 * 4 * 9 * 4, 16 * 4 * 4  # conv weights
    nbt = 8 + 8                                      # num_batches_tracked += 1 (int64, read + write)
    # x twice (statistics, then normalise), w, b, running stats in; y, save_mean, save_invstd, running stats out
    bn = lambda e, v: (2 * e + 4 * v) + (e + 2 * v + 2 * v)  # noqa: E731
    fwd = [("convolution", e16 + w1 + e4, 2 * 128 * 4 * 16), ("add_", nbt, 0), ("native_batch_norm", bn(e4, v4), 0),
           ("relu_", 2 * e4, 0),
           ("convolution", e4 + w2 + e4, 2 * 128 * 4 * 4 * 9), ("add_", nbt, 0),
           ("native_batch_norm", bn(e4, v4), 0), ("relu_", 2 * e4, 0),
           ("convolution", e4 + w3 + e16, 2 * 128 * 16 * 4), ("add_", nbt, 0),
           ("native_batch_norm", bn(e16, v16), 0),
           ("add_", 3 * e16, 0), ("relu_", 2 * e16, 0), ("sum", e16 + 4, 0)]
    got = [(ln.name, ln.bytes, ln.flops) for ln in c.of("fwd")]
    assert got == fwd
    thr = lambda e: 3 * e  # noqa: E731  grad and ReLU output in, grad out
    bnb = lambda e, v: 2 * (e + e) + 5 * v + e + 2 * v  # noqa: E731  (dy, x) twice, 5 vectors; dx, dw, db
    bwd = [("ones_like", 4, 0), ("threshold_backward", 4 + 2 * e16, 0),  # d sum: a broadcast scalar
           ("native_batch_norm_backward", bnb(e16, v16), 0),
           ("convolution_backward", e16 + e4 + w3 + e4 + w3, 2 * 2 * 128 * 16 * 4),
           ("threshold_backward", thr(e4), 0), ("native_batch_norm_backward", bnb(e4, v4), 0),
           ("convolution_backward", e4 + e4 + w2 + e4 + w2, 2 * 2 * 128 * 4 * 4 * 9),
           ("threshold_backward", thr(e4), 0), ("native_batch_norm_backward", bnb(e4, v4), 0),
           ("convolution_backward", e4 + e16 + w1 + w1, 2 * 128 * 4 * 16)]  # x needs no gradient
    assert [(ln.name, ln.bytes, ln.flops) for ln in c.of("bwd")] == bwd
    # saved for backward: conv2/conv3 inputs (relu outputs), the three conv outputs (BN inputs), the block
    # output (ReLU mask) and 2 x 3 per-channel statistics; x, weights and buffers are the model's own
    assert c.saved_bytes == 2 * e4 + (e4 + e4 + e16) + e16 + 2 * (v4 + v4 + v16)
    s = c.summary("H200")
    assert s["launches"] == len(fwd) + len(bwd) and s["bytes"] == sum(ln.bytes for ln in c.of("fwd", "bwd"))
    spec = C.GPU_SPECS["H200"]
    assert s["modeled_ms"] == pytest.approx(1e3 * sum(
        max(ln.bytes / (spec.hbm_gbps * 1e9), ln.flops / (spec.tf32_tflops * 1e12)) + spec.launch_us * 1e-6
        for ln in c.of("fwd", "bwd")))


def test_minimum_by_hand():
    """Bottleneck(16, 4) float32: forward I + W + O per conv, backward O + I + 2W (+ I but for the first)."""
    from torchvision.models.resnet import Bottleneck

    e16, e4 = 2 * 16 * 64 * 4, 2 * 4 * 64 * 4
    convs = [(e16, e4, 4 * 16 * 4), (e4, e4, 4 * 4 * 9 * 4), (e4, e16, 16 * 4 * 4)]
    want = sum(i + w + o + o + i + 2 * w for i, o, w in convs) + sum(i for i, _, _ in convs[1:])
    m = C.minimum(Bottleneck(16, 4), torch.empty(2, 16, 8, 8))
    assert m["bytes"] == want and m["layers"] == 3
    assert m["flops"] == 3 * 2 * 128 * (4 * 16 + 4 * 4 * 9 + 16 * 4)


def test_count_model_leaves_the_model_alone():
    from torchvision.models.resnet import BasicBlock

    block = BasicBlock(8, 8).eval()
    before = {k: v.clone() for k, v in block.state_dict().items()}
    c = C.count_model(block, torch.empty(2, 8, 6, 6), loss=lambda y: y.sum())
    assert not block.training and c.of("opt")
    for k, v in block.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in block.parameters())


@pytest.mark.parametrize("mode", ["bn", "conv"])
def test_block_count_is_what_an_interpreted_step_launches(mode):
    """A converted Bottleneck with a projection shortcut, one training step (issue 11: the counts confirmed by an
    instrumented run): the count level on fake tensors makes the launches the same step makes in the interpreter
    on real tensors, phase by phase, and each of those Triton launches touches exactly the bytes it declares."""
    import copy

    from torch import nn
    from torchvision.models.resnet import Bottleneck, conv1x1

    torch.manual_seed(0)
    stock = Bottleneck(16, 4, stride=2, downsample=nn.Sequential(conv1x1(16, 16, 2), nn.BatchNorm2d(16)))
    block = fusedres.convert(stock.to(memory_format=torch.channels_last), mode=mode).train()
    x = torch.randn(2, 16, 6, 6).contiguous(memory_format=torch.channels_last)
    loss = lambda y: (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum()  # noqa: E731
    with fusedres.poison_outputs(False):  # the suite's output poisoning is a test-only fill per output
        fake = C.count_model(copy.deepcopy(block), x, backend="triton", loss=loss, optimizer=False)
    def step(keep_detail, run):
        counter = C.Counter(keep_detail=keep_detail)
        real = copy.deepcopy(block)
        with fusedres.poison_outputs(False), C.intercept(counter, "triton", run=run, gpu_geometry=False), counter:
            value = loss(real(x))
            counter.phase = "bwd"
            value.backward()
        return counter.launches

    names = lambda launches: [(ln.phase, ln.kind, ln.name) for ln in launches if ln.phase in ("fwd", "bwd")]  # noqa: E731
    # (a run that keeps each launch's tensors makes autograd copy parameter gradients it would otherwise steal)
    real = step(False, lambda kernel, grid, args, kwargs, launch: kernel[grid](*args, **kwargs))
    assert names(fake.launches) == names(real), "the fake-tensor count differs from the real step"
    kernels = [ln for ln in step(True, _traced_run) if ln.kind == "triton"]
    assert len(kernels) == sum(1 for ln in real if ln.kind == "triton") >= (10 if mode == "conv" else 8)
    for ln in kernels:
        declared = (traffic.declared_bytes(ln.detail["reads"]), traffic.declared_bytes(ln.detail["writes"]))
        assert declared == ln.detail["traced"], (ln.name, declared, ln.detail["traced"])


def test_fused_block_counts_its_kernels():
    """A converted block's kernels come from the launchers' declarations (no hard-coded totals): bn mode has
    kernels and fewer BN-category bytes than stock at the same dtype."""
    from torchvision.models.resnet import BasicBlock

    x = torch.empty(4, 8, 8, 8).contiguous(memory_format=torch.channels_last)
    stock = BasicBlock(8, 8).to(memory_format=torch.channels_last)
    fused = fusedres.convert(BasicBlock(8, 8).to(memory_format=torch.channels_last))
    for backend in ("cuda", "triton"):
        c = C.count_model(fused, x, backend=backend, loss=lambda y: y.sum())
        assert {ln.kind for ln in c.launches} >= {"aten", backend}
        s = c.summary()
        assert s["bytes_by_category"]["bn_add_relu"] < \
            C.count_model(stock, x, loss=lambda y: y.sum()).summary()["bytes_by_category"]["bn_add_relu"]


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_count_level(tmp_path):
    from fusedres.bench.cli import main
    from fusedres.bench.results import load_json

    rc = main(["--level", "count", "--models", "resnet18", "--batch", "2", "--size", "32", "--out", str(tmp_path)])
    assert rc == 0
    [path] = tmp_path.glob("*_count.json")
    doc = load_json(path)
    rows = doc["rows"]
    want = {("eager", "fp32", "train"), ("eager", "bf16", "train"), ("fusedres[cuda]", "bf16", "train"),
            ("fusedres[cuda]+conv", "bf16", "train"), ("fusedres[cuda]+fold", "bf16", "infer")}
    assert want <= {(r["impl"], r["dtype"], r["mode"]) for r in rows}
    for r in rows:
        assert r["level"] == "count" and r["ms"] is None and r["note"] == C.MODELED and not r.get("error")
        for key in ("launches", "bytes", "flops", "saved_bytes", "modeled_ms", "modeled_img_per_s", "gpu_spec"):
            assert r[key] is not None, key
        assert sum(r["bytes_by_category"].values()) == r["bytes"]
    assert json.loads(path.read_text())["minimum"][0]["name"] == "resnet18"
    assert (tmp_path / path.name.replace(".json", ".png")).exists()
    assert "modeled" in (tmp_path / path.name.replace(".json", ".md")).read_text()


def test_variants_that_change_nothing_are_not_rows():
    import timm

    model = timm.create_model("resnet18", num_classes=4)
    for impl in C.plan("bf16"):
        built = C.build(model, impl)
        assert C.applies(built, impl) == (impl.variant == "bn"), impl.name
    tv = C.build_model("resnet18", 4)
    assert all(C.applies(C.build(tv, impl), impl) for impl in C.plan("bf16"))


def test_auto_level_counts_without_a_gpu():
    from fusedres.bench.cli import resolve_levels

    assert resolve_levels(("auto",), cuda=False) == ["demo", "count"]
    assert "count" not in resolve_levels(("auto",), cuda=True)
