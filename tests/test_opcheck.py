"""`torch.library.opcheck` on every registered op (`torch.ops.fusedres.*`), backward ops included, over each
argument pattern the forward and backward passes really use: with and without affine parameters, a second
input (plain, weighted or a second BN), ReLU, training / eval, residual gradient wanted or not, the conv's
prologue and epilogue and statistics on or off, both memory formats, and an empty batch. opcheck runs the op
for real (the backend the dispatcher picks: Triton through its interpreter here) and with fake tensors, and
checks the schema (no aliasing outputs, no undeclared mutation), the fake implementation's metadata and the
autograd registration. The list of ops is checked against the `fusedres` namespace so a new op must be added."""
import importlib
import pkgutil

import pytest
import torch

import fusedres.ops
from helpers import channel_params

for _module in pkgutil.iter_modules(fusedres.ops.__path__):  # importing an op's module registers it
    importlib.import_module(f"fusedres.ops.{_module.name}")
ops = torch.ops.fusedres
C = 3
SHAPE = (2, C, 3, 2)


def _act(channels_last, shape=SHAPE, grad=True):
    t = torch.randn(shape)
    t = t.contiguous(memory_format=torch.channels_last) if channels_last else t
    return t.requires_grad_(grad)


def _params(grad=True):
    w, b, rm, rv = channel_params(C, "cpu")
    return w.requires_grad_(grad), b.requires_grad_(grad), rm, rv


def _stats(w, b, eps=1e-5):
    """(mean, var, scale, shift) as `bn_stats` returns them, for statistics (mean, var) given here."""
    mean, var = torch.randn(C), torch.rand(C) + 0.5
    scale = torch.rsqrt(var + eps) * (1 if w is None else w.detach())
    return mean, var, scale, torch.zeros(C) if b is None else b.detach().clone()


def _bn_act_cases(cl, shape):
    x, r, g = _act(cl, shape), _act(cl, shape), _act(cl, shape, grad=False)
    w, b, rm, rv = _params()
    rw = torch.rand(C).add_(0.5).requires_grad_()
    xd, rd, wd, bd, rwd = (t.detach() for t in (x, r, w, b, rw))
    st, st_plain = _stats(w, b), _stats(None, None, 1e-3)
    mean, var = st[:2]
    return {
        "bn_stats_running": (ops.bn_stats, (xd, wd, bd, rm.clone(), rv.clone(), None, 0.1, 1e-5)),
        "bn_stats_cumulative": (ops.bn_stats, (xd, None, None, rm.clone(), rv.clone(), torch.tensor(3), None,
                                               1e-3)),
        "bn_stats_no_running": (ops.bn_stats, (xd, wd, None, None, None, None, 0.1, 1e-5)),
        "bn_stats_increment": (ops.bn_stats, (xd, wd, bd, rm.clone(), rv.clone(), torch.tensor(3), 0.1, 1e-5, True)),
        "bn_params": (ops.bn_params, (xd, mean, var, wd, bd, 1e-5)),
        "bn_params_plain": (ops.bn_params, (xd, mean, var, None, None, 1e-3)),
        "bn_finalize": (ops.bn_finalize, (xd, mean, var, wd, bd, 1e-5, rm.clone(), rv.clone(), torch.tensor(3), 0.1,
                                          False)),
        "bn_finalize_centred_no_count": (ops.bn_finalize, (xd, mean, var, None, None, 1e-3, rm.clone(), rv.clone(),
                                                           None, 0.5, True)),
        "bn_finalize_params_only": (ops.bn_finalize, (xd, mean, var, wd, bd, 1e-5, None, None, None, 0.0, True)),
        "train_plain": (ops.bn_act_train, (x, None, None, None, *st_plain, 1e-3, False)),
        "train_affine_relu": (ops.bn_act_train, (x, w, b, None, *st, 1e-5, True)),
        "train_residual_relu": (ops.bn_act_train, (x, w, b, r, *st, 1e-5, True)),
        "train_residual_weighted": (ops.bn_act_train, (x, w, b, r, *st, 1e-5, False, rw)),
        "eval_plain": (ops.bn_act_eval, (x, None, None, None, rm, rv, 1e-5, False)),
        "eval_residual_relu": (ops.bn_act_eval, (x, w, b, r, rm, rv, 1e-5, True)),
        "eval_residual_weighted_relu": (ops.bn_act_eval, (x, w, b, r, rm, rv, 1e-5, True, rw)),
        "backward_plain": (ops.bn_act_backward, (g, xd, None, None, None, *st_plain, 1e-5, False, True, False)),
        "backward_relu": (ops.bn_act_backward, (g, xd, wd, bd, None, *st, 1e-5, True, True, False)),
        "backward_residual_relu": (ops.bn_act_backward, (g, xd, wd, bd, rd, *st, 1e-5, True, True, True)),
        "backward_residual_no_grad": (ops.bn_act_backward,
                                      (g, xd, wd, bd, rd, *st, 1e-5, True, False, False)),
        "backward_weighted": (ops.bn_act_backward, (g, xd, wd, bd, rd, *st, 1e-5, False, True, True, rwd)),
        "backward_weighted_no_grad": (ops.bn_act_backward,
                                      (g, xd, wd, bd, rd, *st, 1e-5, True, True, False, rwd)),
        "backward_eval": (ops.bn_act_backward, (g, xd, wd, bd, rd, mean, var, None, None, 1e-5, True, False, True)),
    }


def _dual_cases(cl, shape):
    x, r, g = _act(cl, shape), _act(cl, shape), _act(cl, shape, grad=False)
    (w, b, rm, rv), (w2, b2, rm2, rv2) = _params(), _params()
    xd, rd, wd, bd, w2d, b2d = (t.detach() for t in (x, r, w, b, w2, b2))
    sa, sb, sa0, sb0 = _stats(w, b), _stats(w2, b2, 1e-3), _stats(None, None), _stats(None, None)
    m, v, m2, v2 = sa0[0], sa0[1], sb0[0], sb0[1]
    return {
        "dual_train_relu": (ops.dual_bn_act_train, (x, w, b, *sa, 1e-5, r, w2, b2, *sb, 1e-3, True)),
        "dual_train_no_affine": (ops.dual_bn_act_train, (x, None, None, *sa0, 1e-5, r, None, None, *sb0, 1e-5,
                                                         False)),
        "dual_eval_relu": (ops.dual_bn_act_eval, (x, w, b, rm, rv, 1e-5, r, w2, b2, rm2, rv2, 1e-5, True)),
        "dual_eval_no_affine": (ops.dual_bn_act_eval,
                                (x, None, None, rm, rv, 1e-5, r, None, None, rm2, rv2, 1e-5, False)),
        "dual_backward_train": (ops.dual_bn_act_backward,
                                (g, xd, wd, bd, *sa, 1e-5, rd, w2d, b2d, *sb, 1e-3, True, True)),
        "dual_backward_eval_no_affine": (ops.dual_bn_act_backward,
                                         (g, xd, None, None, m, v, None, None, 1e-5, rd, None, None, m2, v2, None,
                                          None, 1e-5, False, False)),
    }


def _scale_shift_cases(cl, shape):
    x, r, xb, g = _act(cl, shape), _act(cl, shape), _act(cl, shape), _act(cl, shape, grad=False)
    v = [torch.randn(C, requires_grad=True) for _ in range(6)]
    xd, rd, xbd = x.detach(), r.detach(), xb.detach()
    vd = [t.detach() for t in v]
    return {
        "ssa_alone": (ops.scale_shift_act, (x, *v[:3], None, None, None, None, None, False)),
        "ssa_residual_relu": (ops.scale_shift_act, (x, *v[:3], r, None, None, None, None, True)),
        "ssa_xb_relu": (ops.scale_shift_act, (x, *v[:3], None, xb, *v[3:], True)),
        "ssa_xb_weighted": (ops.scale_shift_act, (x, *v[:3], None, xb, None, v[4], None, False)),
        "ssa_backward_alone": (ops.scale_shift_act_backward, (g, xd, *vd[:3], None, None, None, None, None, True)),
        "ssa_backward_residual": (ops.scale_shift_act_backward,
                                  (g, xd, *vd[:3], rd, None, None, None, None, True)),
        "ssa_backward_xb": (ops.scale_shift_act_backward, (g, xd, *vd[:3], None, xbd, *vd[3:], False)),
        "ssa_backward_xb_weighted": (ops.scale_shift_act_backward,
                                     (g, xd, *vd[:3], None, xbd, None, vd[4], None, True)),
        "batch_stats": (ops.batch_stats, (x,)),
    }


def _conv_mode_cases(cl, shape):
    """The conv-mode block tail (BatchNorm with statistics the conv epilogue computed) and stem (BN + ReLU +
    max-pool keeping only the conv output)."""
    x, r, xb = _act(cl, shape), _act(cl, shape), _act(cl, shape)
    (w, b, _, _), (w2, b2, _, _) = _params(), _params()
    rw = torch.rand(C).add_(0.5).requires_grad_()
    m, v, m2, v2 = torch.randn(C), torch.rand(C) + 0.5, torch.randn(C), torch.rand(C) + 0.5
    none_b = (None, None, None, None, None, 1e-5)
    return {
        "stats_bn_act_plain": (ops.stats_bn_act, (x, None, None, m, v, 1e-5, None, None, *none_b, False)),
        "stats_bn_act_residual_relu": (ops.stats_bn_act, (x, w, b, m, v, 1e-5, r, None, *none_b, True)),
        "stats_bn_act_residual_weighted": (ops.stats_bn_act, (x, w, b, m, v, 1e-5, r, rw, *none_b, True)),
        "stats_bn_act_dual_relu": (ops.stats_bn_act, (x, w, b, m, v, 1e-5, None, None, xb, w2, b2, m2, v2, 1e-3,
                                                       True)),
        "bn_act_pool_train": (ops.bn_act_pool_train, (x, w, b, 1e-5, True, [3, 3], [2, 2], [1, 1], [1, 1], False)),
    }


def _conv_cases():
    x = _act(True, (2, 4, 5, 5))
    w = torch.randn(6, 4, 3, 3, requires_grad=True)
    s_in, t_in, s_out, t_out, s_r, t_r = (torch.randn(n, requires_grad=True) for n in (4, 4, 6, 6, 6, 6))
    r = _act(True, (2, 6, 3, 3))
    conv = (1, 1), (0, 0), (1, 1), 1

    def args(pro=None, epi=None, res=(None, None, None), in_relu=False, relu=False, stats=False):
        pro = pro or (None, None)
        epi = epi or (None, None)
        return (x, w, *pro, *epi, *res, *map(list, conv[:3]), conv[3], in_relu, relu, stats, False)
    return {
        "conv_plain": (ops.conv_bn_act, args()),
        "conv_stats": (ops.conv_bn_act, args(stats=True)),
        "conv_prologue_relu_stats": (ops.conv_bn_act, args(pro=(s_in, t_in), in_relu=True, stats=True)),
        "conv_shift_prologue_residual_relu": (ops.conv_bn_act, args(pro=(None, t_in), epi=(s_out, t_out),
                                                                    res=(r, None, None), relu=True)),
        "conv_residual_bn_all": (ops.conv_bn_act, args(pro=(s_in, t_in), epi=(s_out, t_out), res=(r, s_r, t_r),
                                                       in_relu=True, relu=True, stats=True)),
    }


def _cast_cases():
    """Conv mode under autocast: a block's weights cast in one launch, the stem conv keeping its float32 input."""
    ws = [torch.randn(6, 4, 3, 3, requires_grad=True), torch.randn(6, 6, 1, 1, requires_grad=True)]
    x = _act(True, (2, 3, 9, 9))
    w, b = (torch.randn(s, dtype=torch.bfloat16, requires_grad=True) for s in ((4, 3, 3, 3), (4,)))
    return {
        "cast_weights": (ops.cast_weights, (ws, torch.bfloat16)),
        "recast_conv": (ops.recast_conv, (x, w, None, [2, 2], [1, 1], [1, 1], 1)),
        "recast_conv_bias": (ops.recast_conv, (x.detach(), w, b, [1, 1], [0, 0], [1, 1], 1)),
    }


def _all_cases():
    cases = {}
    for cl in (False, True):  # bn_act in both layouts; the others share its layout code: channels_last only
        tag = "cl" if cl else "nchw"
        for factory in (_bn_act_cases, _dual_cases, _scale_shift_cases, _conv_mode_cases) if cl else \
                (_bn_act_cases,):
            cases.update({f"{k}-{tag}": v for k, v in factory(cl, SHAPE).items()})
    for factory in (_bn_act_cases, _dual_cases, _scale_shift_cases):
        cases.update({f"{k}-empty": v for k, v in factory(False, (0, C, 3, 2)).items() if "batch_stats" not in k})
    cases.update(_conv_cases())
    cases.update(_cast_cases())
    return cases


CASE_NAMES = list(_all_cases())


@pytest.mark.parametrize("name", CASE_NAMES)
def test_opcheck(name, monkeypatch):
    monkeypatch.setenv("FUSEDRES_CONV_AUTOTUNE", "0")  # one conv config: opcheck runs the op many times
    torch.manual_seed(0)
    op, args = _all_cases()[name]
    torch.library.opcheck(op.default, args)


def test_every_registered_op_is_covered():
    covered = {op._qualified_op_name.split("::")[1] for op, _ in _all_cases().values()}
    registered = {name for name in dir(ops) if isinstance(getattr(ops, name), torch._ops.OpOverloadPacket)}
    assert covered == registered


def test_scale_shift_act_backward_fake_outputs_do_not_alias():
    """The fake implementation allocates one tensor per output (an earlier one returned one empty tensor for
    the three absent second-input gradients, which opcheck rejects as aliasing)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(SHAPE)
        v = torch.empty(C)
        outs = ops.scale_shift_act_backward(x, x, v, v, v, None, None, None, None, None, True)
    storages = [o.untyped_storage()._cdata for o in outs]
    assert len(set(storages)) == len(outs)
