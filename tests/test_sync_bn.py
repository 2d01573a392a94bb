"""Synchronised BatchNorm: `SyncBatchNormAct2d`, the fused sync ops and `to_sync_bn` under 2 processes on gloo
(CPU), against one process that sees the whole batch (stock PyTorch in float64).

One `torch.multiprocessing.spawn` of two ranks runs every distributed check (each spawn costs seconds of
imports); each rank records each check's outcome and `test_distributed` reports them one by one. The checks
without a process group run in the pytest process itself.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # spawned ranks import this module: before any triton import

import contextlib  # noqa: E402
import copy  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import pytest  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import fusedres  # noqa: E402
from fusedres.nn.batchnorm_act import BatchNormAct2d, bn_act_module, dual_bn_act_modules  # noqa: E402
from fusedres.nn.sync_batchnorm import SyncBatchNormAct2d, from_sync_bn, to_sync_bn  # noqa: E402
from fusedres.ops.sync_bn_act import sync_bn_act  # noqa: E402
from helpers import mixed_resnet, randomise_bns  # noqa: E402

WORLD = 2
C, H, W = 5, 3, 4
# (rtol, atol) against stock float64 on the same rounded inputs; atol scales with the reference's magnitude
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 2e-5), torch.bfloat16: (1e-2, 2e-2)}


def _param_dtype(dtype):
    """Module dtype for activations of `dtype`: low-precision activations come from autocast, BN stays fp32."""
    return torch.float32 if dtype == torch.bfloat16 else dtype


# ------------------------------------------------------------------------------------------ rank-side helpers
class _CountingAllReduce:
    """Stands in for torch.distributed.all_reduce and counts the calls the fused sync ops make."""

    def __init__(self, real):
        self.real, self.calls = real, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.real(*args, **kwargs)


_COUNTER: list = [None]
_GROUPS: dict = {}
# In a rank, numerical mismatches are collected here and reported after the check instead of raised at once: a
# rank that stopped mid-check would leave the other rank's next collective unmatched.
_MISMATCHES: list = [None]


def _sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().clone()
    _COUNTER[0].real(t)  # not counted
    return t


def _expect(ok: bool, what: str) -> None:
    if _MISMATCHES[0] is None:
        assert ok, what
    elif not ok:
        _MISMATCHES[0].append(what)


def _close(actual, expected, dtype, what):
    rtol, atol = TOL[dtype]
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    try:
        torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol * scale,
                                   msg=lambda m: f"{what}: {m}")
    except AssertionError as e:
        _expect(False, str(e))


def _rows(sizes, rank):
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _fmt(t, channels_last):
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t.contiguous()


@contextlib.contextmanager
def _small_tiles():
    """Shrink the Triton tiles so the tiny shapes span several programs and masked tails (as tests/helpers)."""
    from fusedres.triton import bn_act as tbn
    old = tbn.TILE_ELEMENTS, tbn.FLAT_BLOCK
    tbn.TILE_ELEMENTS = tbn.FLAT_BLOCK = 64
    try:
        yield
    finally:
        tbn.TILE_ELEMENTS, tbn.FLAT_BLOCK = old


def _stock_bn(momentum, affine, track, generator_seed):
    torch.manual_seed(generator_seed)
    bn = nn.BatchNorm2d(C, momentum=momentum, affine=affine, track_running_stats=track).double()
    with torch.no_grad():
        if affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.5)
        if track:
            bn.running_mean.normal_(0, 0.3)
            bn.running_var.uniform_(0.5, 1.5)
    return bn


def _synced_copy(bn: nn.BatchNorm2d, dtype, act, process_group=None) -> SyncBatchNormAct2d:
    s = SyncBatchNormAct2d(C, momentum=bn.momentum, affine=bn.affine, track_running_stats=bn.track_running_stats,
                           act=act, process_group=process_group, dtype=dtype)
    s.load_state_dict(bn.state_dict())
    return s


def _compare_bn_state(sync_bn, ref_bn, dtype, what):
    for name, t in ref_bn.state_dict().items():
        got = sync_bn.state_dict()[name]
        if t.is_floating_point():
            _close(got, t, dtype, f"{what} {name}")
        else:
            _expect(torch.equal(got, t), f"{what} {name}: {got} != {t}")


def _check_layer(rank, dtype, channels_last, sizes, residual=True, act="relu", momentum=0.1, affine=True,
                 track=True, steps=2, residual_gain=False):
    """A SyncBatchNormAct2d on this rank's rows of each batch == nn.BatchNorm2d (+ residual, ReLU) on the whole
    batch: outputs and input gradients of these rows, weight/bias gradients summed over ranks, running
    statistics and num_batches_tracked; two training steps."""
    ref = _stock_bn(momentum, affine, track, 7).to(_param_dtype(dtype)).double()  # same rounded values
    sync = _synced_copy(ref, _param_dtype(dtype), act)
    gain = torch.rand(C, dtype=torch.float64) + 0.5 if residual_gain else None
    rows, n = _rows(sizes, rank), sum(sizes)
    for step in range(steps):
        x = (torch.randn(n, C, H, W, dtype=torch.float64) * 2 + 0.5).to(dtype)
        r = torch.randn(n, C, H, W, dtype=torch.float64).to(dtype)
        g = torch.randn(n, C, H, W, dtype=torch.float64).to(dtype)

        xr, rr = x.clone().double().requires_grad_(), r.clone().double().requires_grad_()
        gr = None if gain is None else gain.clone().requires_grad_()
        yr = ref(xr)
        if residual:
            yr = yr + (rr if gr is None else rr * gr.view(1, -1, 1, 1))
        yr = torch.relu(yr) if act == "relu" else yr
        (yr * g.double()).sum().backward()

        xl = _fmt(x[rows], channels_last).requires_grad_()
        rl = _fmt(r[rows], channels_last).requires_grad_() if residual else None
        gl = None if gain is None else gain.to(dtype).clone().requires_grad_()
        if gl is None:
            y = sync(xl, rl)
        else:
            y = bn_act_module(sync, xl, rl, act == "relu", residual_gain=gl)
        (y * g[rows]).sum().backward()

        what = f"step {step}"
        _expect(y.dtype == dtype, f"{what}: y has dtype {y.dtype}")
        _close(y, yr[rows], dtype, f"{what} y")
        _close(xl.grad, xr.grad[rows], dtype, f"{what} grad x")
        if residual:
            _close(rl.grad, rr.grad[rows], dtype, f"{what} grad residual")
        if affine:
            _close(_sum_over_ranks(sync.weight.grad), ref.weight.grad, dtype, f"{what} grad weight (summed)")
            _close(_sum_over_ranks(sync.bias.grad), ref.bias.grad, dtype, f"{what} grad bias (summed)")
            sync.zero_grad(), ref.zero_grad()
        if gl is not None:
            _close(_sum_over_ranks(gl.grad), gr.grad, dtype, f"{what} grad residual gain (summed)")
        _compare_bn_state(sync, ref, dtype, what)


def _check_dual(rank, dtype, channels_last, sizes, process_group=None, steps=2):
    """relu(bn(x) + bn_r(r)) through dual_bn_act_modules with two SyncBatchNormAct2d == stock on the whole
    batch, as `_check_layer`."""
    pdt = _param_dtype(dtype)
    ref, ref_r = (_stock_bn(m, True, True, seed).to(pdt).double() for m, seed in ((0.1, 3), (None, 4)))
    bn, bn_r = _synced_copy(ref, pdt, "relu", process_group), _synced_copy(ref_r, pdt, None, process_group)
    rows, n = _rows(sizes, rank), sum(sizes)
    for step in range(steps):
        x = (torch.randn(n, C, H, W, dtype=torch.float64) * 1.5 - 0.5).to(dtype)
        r = (torch.randn(n, C, H, W, dtype=torch.float64) + 1.0).to(dtype)
        g = torch.randn(n, C, H, W, dtype=torch.float64).to(dtype)
        xr, rr = x.clone().double().requires_grad_(), r.clone().double().requires_grad_()
        yr = torch.relu(ref(xr) + ref_r(rr))
        (yr * g.double()).sum().backward()
        xl, rl = _fmt(x[rows], channels_last).requires_grad_(), _fmt(r[rows], channels_last).requires_grad_()
        y = dual_bn_act_modules(xl, bn, rl, bn_r, relu=True)
        (y * g[rows]).sum().backward()
        what = f"step {step}"
        _close(y, yr[rows], dtype, f"{what} y")
        _close(xl.grad, xr.grad[rows], dtype, f"{what} grad x")
        _close(rl.grad, rr.grad[rows], dtype, f"{what} grad r")
        for name, s, t in (("bn", bn, ref), ("bn_r", bn_r, ref_r)):
            _close(_sum_over_ranks(s.weight.grad), t.weight.grad, dtype, f"{what} {name} grad weight (summed)")
            _close(_sum_over_ranks(s.bias.grad), t.bias.grad, dtype, f"{what} {name} grad bias (summed)")
            _compare_bn_state(s, t, dtype, f"{what} {name}")
            s.zero_grad(), t.zero_grad()


# ------------------------------------------------------------------------------------------ distributed checks
def check_layer_float64(rank):
    for channels_last in (False, True):
        _check_layer(rank, torch.float64, channels_last, sizes=[3, 2])
    _check_layer(rank, torch.float64, False, sizes=[1, 4], residual=False, act=None, momentum=None)
    _check_layer(rank, torch.float64, True, sizes=[2, 2], affine=False, track=False, steps=1)


def check_layer_float32(rank):
    for channels_last in (False, True):
        _check_layer(rank, torch.float32, channels_last, sizes=[2, 3])


def check_layer_bfloat16(rank):
    """bfloat16 activations (as from autocast) with a float32 module, both memory formats, and the dual tail."""
    for channels_last in (False, True):
        _check_layer(rank, torch.bfloat16, channels_last, sizes=[2, 3], steps=1)
    _check_dual(rank, torch.bfloat16, True, sizes=[3, 2], steps=1)


def check_layer_residual_gain(rank):
    """A learned per-channel shortcut weight (bn_act_module's residual_gain) rides the sync path too."""
    _check_layer(rank, torch.float64, False, sizes=[3, 2], residual_gain=True)


def check_layer_empty_rank(rank):
    """A rank with no samples still joins the collectives; the other rank's rows get the full-batch result."""
    _check_layer(rank, torch.float64, False, sizes=[4, 0])
    _check_dual(rank, torch.float64, True, sizes=[0, 3], steps=1)


def check_too_few_values_raises_on_every_rank(rank):
    sync = SyncBatchNormAct2d(C, dtype=torch.float64)
    x = torch.randn([1, 0][rank], C, 1, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        sync(x)


def check_dual_float64(rank):
    for channels_last in (False, True):
        _check_dual(rank, torch.float64, channels_last, sizes=[2, 3])
    _check_dual(rank, torch.float64, False, sizes=[2, 2], process_group=_GROUPS["pair"], steps=1)


def check_dual_float32(rank):
    for channels_last in (False, True):
        _check_dual(rank, torch.float32, channels_last, sizes=[3, 1])


def check_dual_needs_one_process_group(rank):
    x, r = torch.randn(2, C, H, W), torch.randn(2, C, H, W)
    for bn_r in (BatchNormAct2d(C, act=None), SyncBatchNormAct2d(C, act=None, process_group=_GROUPS["pair"])):
        with pytest.raises(ValueError, match="same process_group"):
            dual_bn_act_modules(x, SyncBatchNormAct2d(C), r, bn_r)


def check_one_all_reduce_per_layer(rank):
    counter = _COUNTER[0]
    with _small_tiles():
        x = torch.randn(3, C, H, W, requires_grad=True)
        r = torch.randn(3, C, H, W, requires_grad=True)
        counter.calls = 0
        y = SyncBatchNormAct2d(C)(x, r)
        assert counter.calls == 1, f"bn_act forward: {counter.calls} all_reduce calls"
        y.sum().backward()
        assert counter.calls == 2, f"bn_act forward + backward: {counter.calls} all_reduce calls"
        counter.calls = 0
        y = dual_bn_act_modules(x, SyncBatchNormAct2d(C), r, SyncBatchNormAct2d(C, act=None))
        assert counter.calls == 1, f"dual_bn_act forward: {counter.calls} all_reduce calls"
        y.sum().backward()
        assert counter.calls == 2, f"dual_bn_act forward + backward: {counter.calls} all_reduce calls"

    model = fusedres.convert(mixed_resnet(), sync_bn=True)
    # 13 BatchNorms: stem 1, BasicBlock 2, BasicBlock + downsample 3, Bottleneck + downsample 4, Bottleneck 3;
    # the two downsampling tails run their two BNs in one dual op -> 11 fused layers
    assert sum(isinstance(m, SyncBatchNormAct2d) for m in model.modules()) == 13
    with fusedres.use_backend("reference"):  # the count does not depend on the backend; this one is fast here
        counter.calls = 0
        out = model(torch.randn(2, 3, 16, 16))
        assert counter.calls == 11, f"model forward: {counter.calls} all_reduce calls, expected 11"
        out.sum().backward()
        assert counter.calls == 22, f"model forward + backward: {counter.calls} all_reduce calls, expected 22"


def check_no_collective_in_eval_or_alone(rank):
    """Eval mode, or a group of one process: no collective, exactly BatchNormAct2d's results."""
    counter = _COUNTER[0]
    ref = _stock_bn(0.1, True, True, 11)
    x = torch.randn(2 + rank, C, H, W, dtype=torch.float64)
    r = torch.randn(2 + rank, C, H, W, dtype=torch.float64)
    for group, training in ((None, False), (_GROUPS["self"], True), (_GROUPS["self"], False)):
        plain = BatchNormAct2d.from_bn(copy.deepcopy(ref)).train(training)
        sync = SyncBatchNormAct2d.from_bn(copy.deepcopy(ref), process_group=group).train(training)
        xs, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
        counter.calls = 0
        ys = sync(xs, r)
        ys.sum().backward()
        assert counter.calls == 0, f"group={group}, training={training}: {counter.calls} all_reduce calls"
        yp = plain(xp, r)
        yp.sum().backward()
        what = f"group={group}, training={training}"
        _expect(torch.equal(ys, yp) and torch.equal(xs.grad, xp.grad), f"{what}: y or grad x differ")
        _expect(torch.equal(sync.weight.grad, plain.weight.grad), f"{what}: grad weight differs")
        _compare_bn_state(sync, plain, torch.float64, f"group={group}, training={training}")
        counter.calls = 0
        dual = dual_bn_act_modules(x, sync, r, SyncBatchNormAct2d.from_bn(copy.deepcopy(ref), act=None,
                                                                           process_group=group).train(training))
        assert counter.calls == 0 and torch.isfinite(dual).all()


def _train(model, batches, rank=None):
    """SGD steps, one per batch; with `rank`, on this rank's half of each batch, loss = mean over that half."""
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, weight_decay=1e-3)
    for x, target in batches:
        if rank is not None:
            half = x.shape[0] // WORLD
            x, target = x[rank * half:(rank + 1) * half], target[rank * half:(rank + 1) * half]
        opt.zero_grad()
        F.cross_entropy(model(x), target).backward()
        opt.step()


def _check_ddp(rank, build, size, channels_last, backend=None, steps=2):
    """`build()` converted, made synchronised and trained under DistributedDataParallel, each rank on half of
    each batch == the stock model trained on the whole batches in one process: every parameter and buffer."""
    torch.manual_seed(5)
    stock = randomise_bns(build().double(), running_stats=True)
    fused = fusedres.convert(copy.deepcopy(stock), sync_bn=True)
    assert not any(type(m) is nn.BatchNorm2d for m in fused.modules())
    if channels_last:
        fused = fused.to(memory_format=torch.channels_last)
    batches = [(torch.randn(4 * WORLD, 3, size, size, dtype=torch.float64), torch.randint(0, 5, (4 * WORLD,)))
               for _ in range(steps)]
    if channels_last:
        batches = [(x.contiguous(memory_format=torch.channels_last), t) for x, t in batches]
    _train(stock, batches)
    with fusedres.use_backend(backend):
        _train(torch.nn.parallel.DistributedDataParallel(fused), batches, rank)
    expected = stock.state_dict()
    got = fused.state_dict()
    assert list(got) == list(expected)
    for name, t in expected.items():
        if t.is_floating_point():
            try:
                torch.testing.assert_close(got[name], t, rtol=1e-9, atol=1e-11, msg=lambda m: f"{name}: {m}")
            except AssertionError as e:
                _expect(False, str(e))
        else:
            _expect(torch.equal(got[name], t), f"{name}: {got[name]} != {t}")


def check_ddp_mixed_resnet(rank):
    """Stem, BasicBlocks and Bottlenecks, identity and projection (dual) tails; NCHW."""
    _check_ddp(rank, mixed_resnet, 16, channels_last=False)


def check_ddp_resnet_basicblock(rank):
    """torchvision ResNet(BasicBlock, [1, 1, 1, 1]) (64 to 512 channels), channels_last, 3 steps. On the
    reference backend: its wide layers would take ~10 s per rank in the Triton interpreter, and the Triton
    kernels run the same sync ops in every other check."""
    from torchvision.models.resnet import BasicBlock, ResNet

    _check_ddp(rank, lambda: ResNet(BasicBlock, [1, 1, 1, 1], num_classes=5), 16, channels_last=True,
               backend="reference", steps=3)


CHECKS = {name[len("check_"):]: fn for name, fn in list(globals().items()) if name.startswith("check_")}


def _rank_main(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    _COUNTER[0] = dist.all_reduce = _CountingAllReduce(dist.all_reduce)
    # every rank creates every group, in the same order
    _GROUPS["self"] = [dist.new_group([i]) for i in range(WORLD)][rank]
    _GROUPS["pair"] = dist.new_group(list(range(WORLD)))
    results = {}
    with fusedres.poison_outputs():
        for name, check in CHECKS.items():
            torch.manual_seed(1234)  # the same data on every rank; each takes its rows
            start = time.perf_counter()
            _MISMATCHES[0] = []
            try:
                check(rank)
            except (Exception, pytest.fail.Exception):
                _MISMATCHES[0].append(traceback.format_exc())
            results[name] = "\n".join(_MISMATCHES[0])
            print(f"rank {rank} {name}: {time.perf_counter() - start:.1f} s", flush=True)
            with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:  # kept should a later check crash
                json.dump(results, f)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    """Per rank {check: "" or what failed}, and why the ranks stopped early (None when they did not)."""
    tmp = tmp_path_factory.mktemp("sync_bn")
    crash = None
    try:
        mp.spawn(_rank_main, args=(str(tmp / "store"), str(tmp)), nprocs=WORLD, join=True)
    except Exception as e:  # noqa: BLE001  (a rank died, e.g. gloo aborting on mismatched collectives)
        crash = f"{type(e).__name__}: {e}"
    results = [json.loads(p.read_text()) if p.exists() else {} for p in (tmp / f"rank{r}.json" for r in range(WORLD))]
    return results, crash


@pytest.mark.parametrize("check", list(CHECKS))
def test_distributed(distributed_results, check):
    results, crash = distributed_results
    failures = [f"rank {rank}: stopped before finishing this check ({crash})" if check not in res
                else f"rank {rank}:\n{res[check]}" for rank, res in enumerate(results) if res.get(check, True)]
    assert not failures, "\n".join(failures)


# ------------------------------------------------------------------------------------------ single process
def test_without_process_group_is_batchnormact(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("all_reduce called without a process group")

    monkeypatch.setattr(dist, "all_reduce", refuse)
    assert not dist.is_initialized()
    ref = _stock_bn(0.1, True, True, 2).float()
    plain = BatchNormAct2d.from_bn(copy.deepcopy(ref), act="relu")
    sync = SyncBatchNormAct2d.from_bn(copy.deepcopy(ref), act="relu")
    x, r = torch.randn(3, C, H, W), torch.randn(3, C, H, W)
    for training in (True, False):
        plain.train(training), sync.train(training)
        xs, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
        ys, yp = sync(xs, r), plain(xp, r)
        ys.sum().backward(), yp.sum().backward()
        assert torch.equal(ys, yp) and torch.equal(xs.grad, xp.grad)
    _compare_bn_state(sync, plain, torch.float32, "state")
    y = sync_bn_act(x, plain.running_mean, plain.running_var, plain.weight, plain.bias, training=False,
                    residual=r, relu=True)
    assert torch.equal(y, plain.eval()(x, r))


def _bns(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}


def test_to_sync_bn_and_back_share_everything():
    stock = mixed_resnet()
    model = fusedres.convert(copy.deepcopy(stock))
    before = _bns(model)
    keys = list(model.state_dict())
    ptrs = {k: t.data_ptr() for k, t in model.state_dict().items()}
    group = object()  # any process group handle; only stored
    assert to_sync_bn(model, process_group=group) is model
    after = _bns(model)
    assert list(after) == list(before)
    for name, bn in after.items():
        assert type(bn) is SyncBatchNormAct2d and bn.process_group is group
        assert bn.act == getattr(before[name], "act", None)
    assert after["layer2.0.downsample.1"].act is None and after["layer3.0.bn3"].act == "relu"
    assert list(model.state_dict()) == keys
    assert {k: t.data_ptr() for k, t in model.state_dict().items()} == ptrs
    assert to_sync_bn(model) is model and _bns(model) == after  # idempotent

    assert from_sync_bn(model) is model
    back = _bns(model)
    for name, bn in back.items():
        assert type(bn) is type(before[name]) and getattr(bn, "act", None) == getattr(before[name], "act", None)
    assert {k: t.data_ptr() for k, t in model.state_dict().items()} == ptrs
    plain = fusedres.unconvert(model)
    assert [type(m) for m in plain.modules()] == [type(m) for m in stock.modules()]

    single = nn.BatchNorm2d(4)
    synced = to_sync_bn(single)
    assert type(synced) is SyncBatchNormAct2d and synced.act is None and synced.weight is single.weight
    assert type(from_sync_bn(synced)) is nn.BatchNorm2d


def test_to_sync_bn_subclasses():
    """A BatchNormAct2d subclass keeping its forward (TimmBatchNormAct2d) is synchronised and comes back as
    itself, extra attributes included; one with its own forward, and other BatchNorm subclasses, are left."""
    from fusedres.nn.timm_blocks import TimmBatchNormAct2d

    class OwnForward(BatchNormAct2d):
        def forward(self, x, residual=None):
            return super().forward(x, residual) * 2

    timm_bn = TimmBatchNormAct2d.from_bn(nn.BatchNorm2d(4), act="relu")
    timm_bn.relu_inplace = False
    model = nn.Sequential(timm_bn, OwnForward(4), nn.SyncBatchNorm(4), BatchNormAct2d(4, act=None))
    to_sync_bn(model)
    assert [type(m) for m in model] == [SyncBatchNormAct2d, OwnForward, nn.SyncBatchNorm, SyncBatchNormAct2d]
    assert model[0].act == "relu" and model[0].weight is timm_bn.weight
    from_sync_bn(model)
    assert [type(m) for m in model] == [TimmBatchNormAct2d, OwnForward, nn.SyncBatchNorm, BatchNormAct2d]
    assert model[0].relu_inplace is False and model[0].running_var is timm_bn.running_var
    assert model[3].act is None
    direct = from_sync_bn(nn.Sequential(SyncBatchNormAct2d(4, act="relu"), SyncBatchNormAct2d(4, act=None)))
    assert [type(m) for m in direct] == [BatchNormAct2d, nn.BatchNorm2d]


def test_to_sync_bn_before_convert():
    """A stock model made synchronised first still converts to fused blocks, which keep the synced BNs."""
    model = to_sync_bn(mixed_resnet())
    fusedres.convert(model)
    assert type(model.layer3[0]) is fusedres.nn.Bottleneck
    bns = _bns(model)
    assert all(type(bn) is SyncBatchNormAct2d for bn in bns.values())
    assert bns["layer3.0.bn3"].act == "relu" and bns["layer3.0.downsample.1"].act is None
    stock = fusedres.unconvert(model)  # back to stock classes throughout, synced layers included
    assert all(type(bn) is nn.BatchNorm2d for bn in _bns(stock).values())


def test_to_sync_bn_refuses_conv_mode():
    model = fusedres.convert(mixed_resnet(), mode="conv")
    with pytest.raises(TypeError, match="mode='bn'"):
        to_sync_bn(model)


def test_convert_sync_bn_wiring():
    """convert(sync_bn=True) puts a SyncBatchNormAct2d wherever a BatchNorm was (state_dict keys unchanged);
    unconvert gives back the stock classes with the same tensors; conv mode is refused up front."""
    stock = mixed_resnet()
    keys = list(stock.state_dict())
    model = fusedres.convert(copy.deepcopy(stock), sync_bn=True)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(isinstance(m, SyncBatchNormAct2d) for m in bns)
    assert list(model.state_dict()) == keys
    back = fusedres.unconvert(model)
    assert [type(m) for m in back.modules()] == [type(m) for m in stock.modules()]
    assert all(a.data_ptr() == b.data_ptr() for a, b in zip(back.state_dict().values(), model.state_dict().values()))
    with pytest.raises(ValueError, match="sync_bn=True needs mode='bn'"):
        fusedres.convert(copy.deepcopy(stock), mode="conv", sync_bn=True)
