"""Cross-process (SyncBatchNorm) training versions of `bn_act` and `dual_bn_act`: batch statistics over every
process of a `torch.distributed` group, one `all_reduce` per layer forward and one per layer backward.

    sync_bn_act(x, running_mean, running_var, weight, bias, training, momentum, eps, residual, relu,
                residual_weight, process_group)    act(BN(x) [+ residual [* residual_weight]])
    sync_dual_bn_act(x, r, ..., process_group)     act(BN_a(x) + BN_b(r))

Same arguments and results as `bn_act` / `dual_bn_act`, except that with `training=True` the BatchNorm
statistics are those of the batch formed by all ranks' inputs together:

* forward: each rank computes its per-channel mean and biased variance with the backend's `batch_stats`, packs
  [n * mean, n * (var + mean^2)] (for both BNs of a dual tail) and its element count n per channel into ONE
  float64 buffer and all-reduces it (sum). Global mean = S / N, biased variance = Q / N - mean^2 (in float64,
  then cast to the accumulation dtype); the running statistics get the unbiased variance with the global N.
  Ranks may hold different batch sizes, including empty ones, as long as N > 1;
* backward: each rank reduces sum(g) and sum(g * (x - mean)) (and sum(g * (r - mean_r))) with the global
  statistics, ONE all_reduce of those, then the backend's `backward_apply` with coefficients from the global
  sums and N. grad_weight / grad_bias are this rank's own sums, as in `torch.nn.SyncBatchNorm`: under
  DistributedDataParallel the averaging of parameter gradients across ranks completes them (the same holds
  for residual_weight). The residual's gradient is local.

These are `torch.autograd.Function`s, not registered custom ops: the collective stays an ordinary
`torch.distributed` call in eager code, as in `torch.nn.SyncBatchNorm`. They run on the same dispatcher
primitives (`batch_stats`, `apply`, `backward_reduce`, `backward_apply`) as the single-process ops. The
collective is `torch.distributed.all_reduce` on whatever backend the group uses (NCCL for CUDA tensors, gloo
for CPU tensors). With `training=False` they are the single-process eval ops (running statistics, no
collective).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from fusedres import backends
from fusedres._layout import acc_dtype
from fusedres.ops._common import (cast_param_grad, channel_count, check_bn, check_like, densify,
                                  grad_coefficients, scale_shift, update_running_stats)
from fusedres.ops._transforms import transformed
from fusedres.ops.bn_act import _check as check_bn_act_args, residual_args, bn_act
from fusedres.ops.dual_bn_act import dual_bn_act


def _local_stats(backend, x):
    """This rank's per-channel (mean, biased var) in the accumulation dtype; zeros for an empty batch."""
    if x.numel() == 0:
        zeros = x.new_zeros((x.shape[1],), dtype=acc_dtype(x.dtype))
        return zeros, zeros
    return backend.batch_stats(x)


def _global_stats(x, stats, group):
    """One all_reduce of [n*mean, n*(var + mean^2)] for each (mean, var) in `stats` and n: per BN the global
    (mean, biased var) in x's accumulation dtype, and the global count per channel (a float64 0-d tensor)."""
    n = channel_count(x)
    parts = []
    for mean, var in stats:
        mean = mean.to(torch.float64)
        parts += [mean * n, (var.to(torch.float64) + mean * mean) * n]
    parts.append(torch.full((1,), float(n), dtype=torch.float64, device=x.device))
    buf = torch.cat(parts)
    dist.all_reduce(buf, group=group)
    count = buf[-1]
    if n <= 1 and count.item() <= 1:  # every rank has n <= 1 then, so every rank raises
        raise ValueError(f"fusedres: expected more than 1 value per channel when training, got {int(count)} "
                         f"over the process group (this rank's input has shape {tuple(x.shape)})")
    acc = acc_dtype(x.dtype)
    sums = buf[:-1].view(len(stats), 2, -1) / count
    mean, mean_sq = sums[:, 0], sums[:, 1]
    var = (mean_sq - mean * mean).clamp_min(0)
    return [(mean[i].to(acc), var[i].to(acc)) for i in range(len(stats))], count


def _all_reduce_grads(sums, group):
    """One all_reduce of the per-channel backward sums (float64), returned in their own dtype."""
    buf = torch.cat([s.to(torch.float64) for s in sums])
    dist.all_reduce(buf, group=group)
    return [t.to(s.dtype) for t, s in zip(buf.view(len(sums), -1), sums)]


class _SyncBnAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps, relu, residual_weight, group):
        xd, residual_d = densify(x, residual)
        backend = backends.select(xd)
        [(mean, var)], count = _global_stats(xd, [_local_stats(backend, xd)], group)
        _, scale, shift = scale_shift(mean, var, weight, bias, eps)
        if xd.numel() == 0:
            y = torch.empty_like(xd)
        else:
            y = backend.apply(xd, mean, scale, shift, *residual_args(xd, residual_d, residual_weight), relu)
        ctx.mark_non_differentiable(mean, var, count)
        keep_residual = relu or residual_weight is not None
        ctx.save_for_backward(x, weight, bias, residual if keep_residual else None, mean, var, count,
                              residual_weight)
        ctx.eps, ctx.relu, ctx.group, ctx.has_residual = eps, relu, group, residual is not None
        return y, mean, var, count

    @staticmethod
    def backward(ctx, grad_y, _grad_mean, _grad_var, _grad_count):
        x, weight, bias, residual, mean, var, count, residual_weight = ctx.saved_tensors
        weighted = residual_weight is not None
        want_x = ctx.needs_input_grad[0]
        want_res = ctx.has_residual and ctx.needs_input_grad[3]
        check_like(grad_y, x, "grad_y")
        x, grad_y, residual = densify(x, grad_y, residual)
        backend = backends.select(x)
        invstd, scale, shift = scale_shift(mean, var, weight, bias, ctx.eps)
        res_args = residual_args(x, residual, residual_weight)
        if x.numel() == 0:
            sum_g = sum_g_xc = sum_g_r = torch.zeros_like(mean)
            d_res = torch.empty_like(x) if want_res else None
        else:
            sum_g, sum_g_xc, sum_g_r, d_res = backend.backward_reduce(grad_y, x, mean, scale, shift, *res_args,
                                                                      ctx.relu, want_res and not weighted)
        _, _, _, d_w, d_b = grad_coefficients(sum_g, sum_g_xc, invstd, scale, count, True)
        dx = None
        # Every rank builds the same graph, so every rank joins this collective or none does.
        if want_x or (weighted and want_res):
            all_g, all_g_xc = _all_reduce_grads([sum_g, sum_g_xc], ctx.group)
            k_g, k_x, k_c, _, _ = grad_coefficients(all_g, all_g_xc, invstd, scale, count, True)
            # a weighted residual's gradient w * g comes out of the second-input path: coefficients (w, 0, 0)
            k_b = (res_args[3], res_args[2], res_args[2]) if weighted and want_res else (None, None, None)
            if x.numel() == 0:
                dx = torch.empty_like(x)
            else:
                dx, d_res_w = backend.backward_apply(grad_y, x, mean, scale, shift, *res_args, ctx.relu,
                                                     k_g, k_x, k_c, *k_b)
                if weighted:
                    d_res = d_res_w
        d_rw = cast_param_grad(sum_g_r, residual_weight) if weighted else None
        return (dx if want_x else None, cast_param_grad(d_w, weight), cast_param_grad(d_b, bias),
                d_res if want_res else None, None, None, d_rw, None)


class _SyncDualBnAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, r, weight_r, bias_r, eps_r, relu, group):
        xd, rd = densify(x, r)
        backend = backends.select(xd)
        stats = [_local_stats(backend, xd), _local_stats(backend, rd)]
        [(mean, var), (mean_r, var_r)], count = _global_stats(xd, stats, group)
        _, scale, shift = scale_shift(mean, var, weight, bias, eps)
        _, scale_r, shift_r = scale_shift(mean_r, var_r, weight_r, bias_r, eps_r)
        if xd.numel() == 0:
            y = torch.empty_like(xd)
        else:
            y = backend.apply(xd, mean, scale, shift, None, rd, mean_r, scale_r, shift_r, relu)
        ctx.mark_non_differentiable(mean, var, mean_r, var_r, count)
        ctx.save_for_backward(x, weight, bias, mean, var, r, weight_r, bias_r, mean_r, var_r, count)
        ctx.eps, ctx.eps_r, ctx.relu, ctx.group = eps, eps_r, relu, group
        return y, mean, var, mean_r, var_r, count

    @staticmethod
    def backward(ctx, grad_y, *_grad_stats):
        x, weight, bias, mean, var, r, weight_r, bias_r, mean_r, var_r, count = ctx.saved_tensors
        want_inputs = ctx.needs_input_grad[0] or ctx.needs_input_grad[4]
        check_like(grad_y, x, "grad_y")
        x, grad_y, r = densify(x, grad_y, r)
        backend = backends.select(x)
        invstd, scale, shift = scale_shift(mean, var, weight, bias, ctx.eps)
        invstd_r, scale_r, shift_r = scale_shift(mean_r, var_r, weight_r, bias_r, ctx.eps_r)
        if x.numel() == 0:
            sum_g = sum_g_xc = sum_g_rc = torch.zeros_like(mean)
        else:
            sum_g, sum_g_xc, sum_g_rc, _ = backend.backward_reduce(grad_y, x, mean, scale, shift, None, r, mean_r,
                                                                   scale_r, shift_r, ctx.relu, False)
        _, _, _, d_w, d_b = grad_coefficients(sum_g, sum_g_xc, invstd, scale, count, True)
        _, _, _, d_w_r, d_b_r = grad_coefficients(sum_g, sum_g_rc, invstd_r, scale_r, count, True)
        dx = dr = None
        if want_inputs:  # every rank builds the same graph, so every rank skips or joins this collective
            all_g, all_g_xc, all_g_rc = _all_reduce_grads([sum_g, sum_g_xc, sum_g_rc], ctx.group)
            k_g, k_x, k_c, _, _ = grad_coefficients(all_g, all_g_xc, invstd, scale, count, True)
            k_g_r, k_x_r, k_c_r, _, _ = grad_coefficients(all_g, all_g_rc, invstd_r, scale_r, count, True)
            if x.numel() == 0:
                dx, dr = torch.empty_like(x), torch.empty_like(r)
            else:
                dx, dr = backend.backward_apply(grad_y, x, mean, scale, shift, None, r, mean_r, scale_r, shift_r,
                                                ctx.relu, k_g, k_x, k_c, k_g_r, k_x_r, k_c_r)
        return (dx, cast_param_grad(d_w, weight), cast_param_grad(d_b, bias), None,
                dr, cast_param_grad(d_w_r, weight_r), cast_param_grad(d_b_r.clone(), bias_r), None, None, None)


def _refuse_transforms(*tensors) -> None:
    if transformed(*tensors):
        raise RuntimeError("fusedres: synchronised BatchNorm training (SyncBatchNormAct2d, sync_bn_act, "
                           "sync_dual_bn_act: statistics all-reduced over a process group) does not support "
                           "torch.func transforms (vmap, grad, jvp, ...) or forward-mode AD, as "
                           "torch.nn.SyncBatchNorm does not; use eval mode, or fusedres.nn.from_sync_bn(model) "
                           "for per-process BatchNormAct2d layers, which support them")


def sync_bn_act(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, training: bool = True,
                momentum: Optional[float] = 0.1, eps: float = 1e-5, residual: Optional[Tensor] = None,
                relu: bool = False, residual_weight: Optional[Tensor] = None, process_group=None,
                num_batches_tracked: Optional[Tensor] = None) -> Tensor:
    """`bn_act` with the batch statistics of all ranks of `process_group` (None: the default group) when
    training; `training=False` is `bn_act` with running statistics (no collective). The gradient of
    `residual_weight`, like those of weight and bias, is this rank's own."""
    if not training:
        return bn_act(x, running_mean, running_var, weight, bias, False, momentum, eps, residual, relu,
                      residual_weight, num_batches_tracked)
    _refuse_transforms(x, weight, bias, residual, residual_weight)
    # the batch-size rule is checked on the global count, inside the Function
    check_bn_act_args(x, weight, bias, residual, running_mean, running_var, training=False,
                      residual_weight=residual_weight)
    y, mean, var, count = _SyncBnAct.apply(x, weight, bias, residual, eps, relu, residual_weight, process_group)
    update_running_stats(running_mean, running_var, mean, var, count, momentum, num_batches_tracked)
    return y


def sync_dual_bn_act(x: Tensor, r: Tensor, *, weight: Optional[Tensor], bias: Optional[Tensor],
                     running_mean: Optional[Tensor], running_var: Optional[Tensor],
                     momentum: Optional[float] = 0.1, eps: float = 1e-5, weight_r: Optional[Tensor],
                     bias_r: Optional[Tensor], running_mean_r: Optional[Tensor], running_var_r: Optional[Tensor],
                     momentum_r: Optional[float] = 0.1, eps_r: float = 1e-5, training: bool = True,
                     relu: bool = True, process_group=None, num_batches_tracked: Optional[Tensor] = None,
                     num_batches_tracked_r: Optional[Tensor] = None) -> Tensor:
    """`dual_bn_act` with both BNs' batch statistics taken over all ranks of `process_group` (None: the
    default group) in one all_reduce when training; `training=False` is `dual_bn_act` (no collective)."""
    if not training:
        return dual_bn_act(x, r, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var,
                           momentum=momentum, eps=eps, weight_r=weight_r, bias_r=bias_r,
                           running_mean_r=running_mean_r, running_var_r=running_var_r, momentum_r=momentum_r,
                           eps_r=eps_r, training=False, relu=relu, num_batches_tracked=num_batches_tracked,
                           num_batches_tracked_r=num_batches_tracked_r)
    _refuse_transforms(x, r, weight, bias, weight_r, bias_r)
    check_bn(x, "x", weight, bias, running_mean, running_var)
    check_like(r, x, "r (the shortcut input)")
    check_bn(r, "r", weight_r, bias_r, running_mean_r, running_var_r)
    y, mean, var, mean_r, var_r, count = _SyncDualBnAct.apply(x, weight, bias, eps, r, weight_r, bias_r, eps_r,
                                                              relu, process_group)
    update_running_stats(running_mean, running_var, mean, var, count, momentum, num_batches_tracked)
    update_running_stats(running_mean_r, running_var_r, mean_r, var_r, count, momentum_r, num_batches_tracked_r)
    return y
