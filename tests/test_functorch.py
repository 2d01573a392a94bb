"""torch.func transforms (jvp, vmap, grad) and torch.autograd.forward_ad over every public fused op and module:
the same answer as stock PyTorch's own ops (float64, so any real difference shows), or a clear error.

The public functions see the transform and run stock's ops (`fusedres.ops._transforms`); the stock side here is
written with F.batch_norm / F.conv2d / torch.relu directly, not with fusedres.reference. The registered ops
themselves refuse forward-mode AD (no jvp formula) instead of dropping the tangent."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import forward_ad
from torch.func import functional_call, grad, jvp, vmap

import fusedres
from fusedres.nn import BatchNormAct2d
from fusedres.ops.batch_stats import batch_stats
from fusedres.ops.sync_bn_act import sync_bn_act

C = 3
SHAPE = (4, C, 3, 2)
D = torch.float64


def _rand(*shape):
    return torch.randn(*shape, dtype=D)


def _ch(v):
    return v.view(1, -1, 1, 1)


def _stats():
    return torch.randn(C, dtype=D) * 0.1, torch.rand(C, dtype=D) + 0.5


# Each case: (fused, stock, primals). Both functions are pure in the primals (running statistics are fresh
# copies made inside), return one tensor, and are differentiable in every primal.
def _bn_act_case(training, with_stats):
    stats = _stats()

    def make(fn):
        def f(x, w, b, r, rw):
            rm, rv = (stats[0].clone(), stats[1].clone()) if with_stats else (None, None)
            return fn(x, rm, rv, w, b, r, rw)
        return f

    fused = make(lambda x, rm, rv, w, b, r, rw: fusedres.bn_act(x, rm, rv, w, b, training, 0.1, 1e-5, r, True, rw))
    stock = make(lambda x, rm, rv, w, b, r, rw: torch.relu(F.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5)
                                                           + r * _ch(rw)))
    return fused, stock, (_rand(*SHAPE), torch.rand(C, dtype=D) + 0.5, _rand(C), _rand(*SHAPE), _rand(C))


def _dual_case(training):
    stats = _stats() + _stats()

    def make(fn):
        def f(x, r, w, b, w2, b2):
            return fn(x, r, w, b, w2, b2, *(t.clone() for t in stats))
        return f

    def fused(x, r, w, b, w2, b2, rm, rv, rm2, rv2):
        return fusedres.dual_bn_act(x, r, weight=w, bias=b, running_mean=rm, running_var=rv, weight_r=w2,
                                    bias_r=b2, running_mean_r=rm2, running_var_r=rv2, training=training)

    def stock(x, r, w, b, w2, b2, rm, rv, rm2, rv2):
        return torch.relu(F.batch_norm(x, rm, rv, w, b, training) + F.batch_norm(r, rm2, rv2, w2, b2, training))
    primals = (_rand(*SHAPE), _rand(*SHAPE), torch.rand(C, dtype=D) + .5, _rand(C), torch.rand(C, dtype=D) + .5,
               _rand(C))
    return make(fused), make(stock), primals


def _scale_shift_case():
    def fused(x, m, s, t, xb, mb, sb, tb):
        return fusedres.scale_shift_act(x, m, s, t, xb=xb, mean_b=mb, scale_b=sb, shift_b=tb, relu=True)

    def stock(x, m, s, t, xb, mb, sb, tb):
        return torch.relu((x - _ch(m)) * _ch(s) + _ch(t) + (xb - _ch(mb)) * _ch(sb) + _ch(tb))
    return fused, stock, (_rand(*SHAPE), _rand(C), _rand(C), _rand(C), _rand(*SHAPE), _rand(C), _rand(C),
                          _rand(C))


def _conv_case():
    def fused(x, w, si, ti, so, to, r):
        y, mean, var = fusedres.conv_bn_act(x, w, padding=1, in_scale=si, in_shift=ti, in_relu=True, out_scale=so,
                                            out_shift=to, residual=r, relu=True, stats=True)
        return y + _ch(mean + var)

    def stock(x, w, si, ti, so, to, r):
        c = F.conv2d(torch.relu(x * _ch(si) + _ch(ti)), w, padding=1)
        var, mean = torch.var_mean(c, dim=(0, 2, 3), unbiased=False)
        return torch.relu(c * _ch(so) + _ch(to) + r) + _ch(mean + var)
    return fused, stock, (_rand(*SHAPE), _rand(5, C, 3, 3), _rand(C), _rand(C), _rand(5), _rand(5),
                          _rand(SHAPE[0], 5, *SHAPE[2:]))


def _batch_stats_case():
    def stock(x):
        var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
        return mean * var

    return lambda x: torch.mul(*batch_stats(x)), stock, (_rand(*SHAPE),)


def _module_case(training, act):
    stock_bn = nn.BatchNorm2d(C, dtype=D)
    with torch.no_grad():
        stock_bn.weight.uniform_(0.5, 1.5), stock_bn.bias.normal_(), stock_bn.running_mean.normal_()
    fused_bn = BatchNormAct2d.from_bn(copy.deepcopy(stock_bn), act=act)

    def fused(x, w, b, r):
        return functional_call(copy.deepcopy(fused_bn).train(training), {"weight": w, "bias": b}, (x, r))

    def stock(x, w, b, r):
        y = functional_call(copy.deepcopy(stock_bn).train(training), {"weight": w, "bias": b}, (x,)) + r
        return torch.relu(y) if act else y
    return fused, stock, (_rand(*SHAPE), torch.rand(C, dtype=D) + 0.5, _rand(C), _rand(*SHAPE))


CASES = {
    "bn_act_train": lambda: _bn_act_case(True, True),
    "bn_act_train_no_stats": lambda: _bn_act_case(True, False),
    "bn_act_eval": lambda: _bn_act_case(False, True),
    "dual_bn_act_train": lambda: _dual_case(True),
    "dual_bn_act_eval": lambda: _dual_case(False),
    "scale_shift_act": _scale_shift_case,
    "conv_bn_act": _conv_case,
    "batch_stats": _batch_stats_case,
    "module_train_relu": lambda: _module_case(True, "relu"),
    "module_eval_none": lambda: _module_case(False, None),
}


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", CASES)
def test_jvp(case):
    fused, stock, primals = CASES[case]()
    tangents = tuple(torch.randn_like(p) for p in primals)
    _close(jvp(fused, primals, tangents), jvp(stock, primals, tangents))


@pytest.mark.parametrize("case", CASES)
def test_forward_ad(case):
    fused, stock, primals = CASES[case]()
    tangents = tuple(torch.randn_like(p) for p in primals)
    with forward_ad.dual_level():
        outs = [forward_ad.unpack_dual(fn(*(forward_ad.make_dual(p, t) for p, t in zip(primals, tangents))))
                for fn in (fused, stock)]
    assert outs[0].tangent is not None
    _close(tuple(outs[0]), tuple(outs[1]))


@pytest.mark.parametrize("case", CASES)
def test_grad(case):
    fused, stock, primals = CASES[case]()
    argnums = tuple(range(len(primals)))
    loss = lambda fn: lambda *a: (fn(*a) ** 2).sum()  # noqa: E731
    _close(grad(loss(fused), argnums)(*primals), grad(loss(stock), argnums)(*primals))


VMAP_CASES = [c for c in CASES if "train" not in c or "no_stats" in c]


@pytest.mark.parametrize("case", VMAP_CASES)
def test_vmap(case):
    """vmap over a new leading dimension of every primal: one independent call per slice (for a training
    BatchNorm without running statistics, each slice is its own batch, as for stock)."""
    fused, stock, primals = CASES[case]()
    batched = tuple(torch.stack([p, torch.randn_like(p)]) for p in primals)
    _close(vmap(fused)(*batched), vmap(stock)(*batched))


@pytest.mark.parametrize("case", ["bn_act_train", "dual_bn_act_train", "module_train_relu"])
def test_vmap_training_with_running_stats_errors_as_stock(case):
    """Unbatched running statistics cannot take per-slice updates: stock raises, and so does fusedres (the same
    error, since the fused function runs stock's ops under vmap)."""
    fused, stock, primals = CASES[case]()
    batched = tuple(torch.stack([p, torch.randn_like(p)]) for p in primals)
    with pytest.raises(RuntimeError) as stock_error:
        vmap(stock)(*batched)
    with pytest.raises(RuntimeError) as fused_error:
        vmap(fused)(*batched)
    assert str(fused_error.value) == str(stock_error.value)


def test_running_stats_under_forward_ad_as_stock():
    """A training step under forward-mode AD updates the running statistics and num_batches_tracked as stock."""
    stock = nn.BatchNorm2d(C, momentum=None, dtype=D)
    fused = BatchNormAct2d.from_bn(copy.deepcopy(stock))
    x, t = _rand(*SHAPE), _rand(*SHAPE)
    with forward_ad.dual_level():
        ys = [forward_ad.unpack_dual(m(forward_ad.make_dual(x, t))) for m in (stock, fused)]
    _close(tuple(ys[0]), tuple(ys[1]))
    for name, v in stock.state_dict().items():
        _close(fused.state_dict()[name], v)


def test_registered_ops_refuse_forward_ad():
    """Reached directly, a registered op raises under forward-mode AD instead of silently losing the tangent."""
    x, w, b, (rm, rv) = _rand(*SHAPE), _rand(C), _rand(C), _stats()
    op = torch.ops.fusedres.bn_act_eval
    with pytest.raises(RuntimeError, match="bn_act_eval has no forward-mode AD .* call the public function"):
        jvp(lambda x: op(x, w, b, None, rm, rv, 1e-5, True), (x,), (x,))
    with forward_ad.dual_level(), pytest.raises(RuntimeError, match="forward-mode AD"):
        op(forward_ad.make_dual(x, x), w, b, None, rm, rv, 1e-5, True)


def test_registered_op_vmap_loops_per_sample():
    """vmap over a registered op runs PyTorch's per-sample fallback: the stock answer, one call per slice."""
    x, w, b, (rm, rv) = _rand(2, *SHAPE), _rand(C), _rand(C), _stats()
    got = vmap(lambda x: torch.ops.fusedres.bn_act_eval(x, w, b, None, rm, rv, 1e-5, True))(x)
    _close(got, torch.relu(F.batch_norm(x.flatten(0, 1), rm, rv, w, b, False)).view_as(x))


def test_sync_training_refuses_transforms():
    x, t = _rand(*SHAPE), _rand(*SHAPE)
    with pytest.raises(RuntimeError, match="synchronised BatchNorm training .* torch.func transforms"):
        jvp(lambda x: sync_bn_act(x, None, None, training=True), (x,), (t,))
    with pytest.raises(RuntimeError, match="does not support torch.func"):
        vmap(lambda x: sync_bn_act(x, None, None, training=True))(torch.stack([x, t]))
