"""Whole-model checks shared by the timm and pre-activation tests: a fused model against its stock twin over
momentum-SGD steps (float64, tight), a float32 error budget against a float64 reference, and the
convert / unconvert / state_dict / pickling invariants."""
import copy
import io

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def randomise(model, seed=0):
    """Non-trivial BN affine tensors and running statistics (stock init is weight 1, bias 0, mean 0, var 1)
    and non-zero last-BN / last-conv weights (timm zero-inits them), so every path carries signal."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            if m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
            if m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
        elif isinstance(m, nn.Conv2d) and not m.weight.any():
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.1)
    return model


def rel_error(actual, expected):
    """Norm-wise relative error."""
    a, e = actual.detach().double(), expected.detach().double()
    return ((a - e).norm() / e.norm().clamp_min(1e-300)).item()


def assert_close(actual, expected, tol, what=""):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    a, e = actual.detach().double(), expected.detach().double()
    scale = max(e.abs().max().item(), 1e-30)
    torch.testing.assert_close(a, e, rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


def error_bound(stock_err, dtype, factor=2.0, ulps=8):
    """The most a fused result may differ from float64: `factor` x stock's own error, plus a few units of
    rounding of `dtype` (`ulps` x its eps) for the case where stock happens to be (nearly) exact."""
    return factor * stock_err + ulps * torch.finfo(dtype).eps


def assert_like_stock(fused, stock, ref, what="", factor=2.0, ulps=8):
    """Norm-wise relative error of `fused` against the float64 `ref` within `error_bound` of stock's; the message
    gives both errors and the bound."""
    assert fused.shape == stock.shape == ref.shape, (what, fused.shape, stock.shape, ref.shape)
    err_f, err_s = rel_error(fused, ref), rel_error(stock, ref)
    bound = error_bound(err_s, stock.dtype, factor, ulps)
    assert err_f <= bound, (f"{what}: fused error against float64 {err_f:.3e} > bound {bound:.3e} "
                            f"({factor:g}x stock's {err_s:.3e} + {ulps:g} eps of {stock.dtype})")


def flat(named):
    """One vector of many (name, tensor) pairs, in name order (so a fused model and its stock twin line up):
    their joint norm-wise error is a stable quantity where a single small gradient's error, in a tiny
    ill-conditioned network, fluctuates from seed to seed."""
    return torch.cat([t.detach().reshape(-1).double() for _, t in sorted(named, key=lambda item: item[0])])


def assert_runs_like_stock(stock, fused, run, factor=2.0, what=""):
    """`run(model, dtype) -> {name: tensor}` on `stock`, on `fused` (both in `dtype`, the dtype of stock's first
    parameter) and on a float64 copy of stock made first: each fused result within `error_bound` of stock's own
    error against float64. Returns {name: (stock error, fused error)} for callers that report them."""
    dtype = next(stock.parameters()).dtype
    ref = copy.deepcopy(stock).double()
    r, s, f = run(ref, torch.float64), run(stock, dtype), run(fused, dtype)
    errors = {}
    for name in r:
        assert_like_stock(f[name], s[name], r[name], f"{what}{name}", factor)
        errors[name] = (rel_error(s[name], r[name]), rel_error(f[name], r[name]))
    return errors


def train_and_compare(stock, fused, *, tol, steps=2, shape=(4, 3, 32, 32), num_classes=5, dtype=torch.float64,
                      device="cpu", memory_format=torch.contiguous_format, lr=0.05):
    """`steps` momentum-SGD steps on both from the same state; outputs, every gradient (the input's too) at each
    step, every buffer after, then eval-mode outputs, all within `tol` (elementwise, relative to the max)."""
    opt_s = torch.optim.SGD(stock.parameters(), lr=lr, momentum=0.9)
    opt_f = torch.optim.SGD(fused.parameters(), lr=lr, momentum=0.9)
    stock.train()
    fused.train()

    def batch():
        return torch.randn(shape, dtype=dtype, device=device).contiguous(memory_format=memory_format)

    for step in range(steps):
        x = batch()
        target = torch.randint(0, num_classes, (shape[0],), device=device)
        xs, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_s, out_f = stock(xs), fused(xf)
        assert_close(out_f, out_s, tol, f"train output, step {step}")
        F.cross_entropy(out_s, target).backward()
        F.cross_entropy(out_f, target).backward()
        assert_close(xf.grad, xs.grad, tol, f"input grad, step {step}")
        for (name, pf), (_, ps) in zip(fused.named_parameters(), stock.named_parameters()):
            assert_close(pf.grad, ps.grad, tol, f"grad {name}, step {step}")
        opt_s.step()
        opt_f.step()
        opt_s.zero_grad()
        opt_f.zero_grad()
    for (name, bf), (_, bs) in zip(fused.named_buffers(), stock.named_buffers()):
        if name.endswith("num_batches_tracked"):
            assert bf.item() == bs.item() == steps, name
        else:
            assert_close(bf, bs, tol, name)
    stock.eval()
    fused.eval()
    with torch.no_grad():
        x = batch()
        assert_close(fused(x), stock(x), tol, "eval output")


def float32_errors(stock32, fused32, shape=(4, 3, 32, 32)):
    """One training step of fp32 stock and fp32 fused against a float64 copy of stock: norm-wise errors of the
    output, the input gradient, the worst parameter gradient and the worst running statistic, then the
    eval-mode output; returns {name: (stock error, fused error)}."""
    ref = copy.deepcopy(stock32).double()
    x = torch.randn(shape, dtype=torch.float64)
    w = None
    errors = {}
    runs = {}
    for tag, model in (("ref", ref), ("stock", stock32), ("fused", fused32)):
        model.train()
        xi = x.to(next(model.parameters()).dtype).clone().requires_grad_()
        out = model(xi)
        if w is None:
            w = torch.randn(out.shape, dtype=torch.float64)
        (out * w.to(out.dtype)).sum().backward()
        model.eval()
        with torch.no_grad():
            eval_out = model(x.to(xi.dtype))
        runs[tag] = (out, xi.grad, [p.grad for p in model.parameters()],
                     [b for b in model.buffers() if b.is_floating_point()], eval_out)
    for tag in ("stock", "fused"):
        out, gx, grads, bufs, ev = runs[tag]
        r_out, r_gx, r_grads, r_bufs, r_ev = runs["ref"]
        errors.setdefault("output", []).append(rel_error(out, r_out))
        errors.setdefault("input grad", []).append(rel_error(gx, r_gx))
        errors.setdefault("param grads", []).append(max(rel_error(g, rg) for g, rg in zip(grads, r_grads)))
        errors.setdefault("running stats", []).append(max(rel_error(b, rb) for b, rb in zip(bufs, r_bufs)))
        errors.setdefault("eval output", []).append(rel_error(ev, r_ev))
    return {k: tuple(v) for k, v in errors.items()}


def assert_float32_like_stock(errors, dtype=torch.float32, factor=2.0):
    """`errors` from `float32_errors`: each fused error against float64 within `error_bound` of stock's (2x stock
    float32's own error + 8 float32 eps, the rule of `assert_like_stock`). The 8 eps (9.5e-7 relative) matter
    only where stock's error is itself at rounding level: the running statistics and eval outputs (1e-7..8e-7
    in the tiny models here)."""
    for key, (stock_err, fused_err) in errors.items():
        bound = error_bound(stock_err, dtype, factor)
        assert fused_err <= bound, (f"{key}: fused fp32 error against float64 {fused_err:.3e} > bound {bound:.3e} "
                                    f"({factor:g}x stock's {stock_err:.3e} + 8 eps); all (stock, fused): {errors}")


def structure(model):
    return [(name, type(m)) for name, m in model.named_modules()]


def tensor_ptrs(model):
    return {k: v.data_ptr() for k, v in model.state_dict(keep_vars=True).items()}


def save_load(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def saved_bytes(model, x, activations_only=False):
    """Bytes of the unique storages autograd saves for backward in one training forward (the model's own
    tensors and the input excluded); `activations_only` leaves out per-channel vectors (tensors of < 2 dims)."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), x]}
    saved = {}

    def pack(t):
        if activations_only and t.dim() < 2:
            return t
        if t.untyped_storage().data_ptr() not in own:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(saved.values())
