// fr_finalize.h — the per-channel work of a fused BatchNorm, done by the two finalize kernels
// (bn_act_finalize.cu) instead of torch ops on C-element vectors, and by the host harness (T = float) that
// checks them on the CPU:
//   forward:  merge the statistics partials into (mean, biased var), form (scale, shift) with
//             BN(x) = (x - mean) * scale + shift, update the running statistics (momentum, or the cumulative
//             factor 1 / num_batches_tracked read on the device);
//   backward: merge the reduction partials into sum(g), sum(g*(x-mean)) [, sum(g*(xb-mean_b))] and turn them
//             into the apply pass's coefficients and the parameter gradients, per side (x, and xb)
//             (bwd_finish_channel: also run by the last block of the fused reduction, bn_act_backward.cu).
// Plain FR_HD C++ on floats (IEEE sqrt and division: the kernels are built without fast-math), in the
// operation order of fusedres.reference / fusedres.ops._common.
#pragma once

#include <cmath>

#include "fr_api.h"
#include "fr_bodies.h"
#include "fr_math.h"

namespace fr {

// 1 / sqrt(var + eps), correctly rounded steps (torch.rsqrt may differ by an ulp).
FR_HD float bn_invstd(float var, float eps) { return 1.f / sqrtf(var + eps); }

// torch.lerp's formula: a + w*(b-a) for w < 0.5, else b - (b-a)*(1-w).
FR_HD float lerp_f(float a, float b, float w) { return w < 0.5f ? a + w * (b - a) : b - (b - a) * (1.f - w); }

// One channel of the forward finalize. weight / bias / running pointers may be null (absent).
struct StatsOut {
  float mean, var, scale, shift;
};

FR_HD StatsOut bn_finish(float mean, float var, float eps, const float* weight, const float* bias, int c) {
  StatsOut o;
  o.mean = mean;
  o.var = var;
  const float invstd = bn_invstd(var, eps);
  o.scale = weight ? weight[c] * invstd : invstd;
  o.shift = bias ? bias[c] : 0.f;
  return o;
}

// nn.BatchNorm2d's running update: lerp towards the batch mean and the unbiased variance var * unbias.
FR_HD void running_update(float& rm, float& rv, float mean, float var, float unbias, float factor) {
  rm = lerp_f(rm, mean, factor);
  rv = lerp_f(rv, var * unbias, factor);
}

// Everything the forward finalize does with channel c once its (mean, biased var) are known: (scale, shift)
// where a.scale / a.shift are given, (mean, var) stored when `store_stats` (they came from the partials), the
// running statistics updated when a.running_mean is given (factor: momentum, or 1 / *num_batches_tracked).
// Shared by stats_params_kernel (bn_act_finalize.cu), the last-block finalize of the statistics kernels
// (bn_act_forward.cu) and the host harness.
FR_HD void stats_finish_channel(const StatsFinalizeArgs& a, int c, float mean, float var, bool store_stats) {
  const StatsOut o = bn_finish(mean, var, a.eps, a.weight, a.bias, c);
  if (store_stats) {
    a.mean[c] = o.mean;
    a.var[c] = o.var;
  }
  if (a.scale) a.scale[c] = o.scale;
  if (a.shift) a.shift[c] = o.shift;
  if (a.running_mean) {
    const float factor = a.num_batches_tracked ? 1.f / static_cast<float>(*a.num_batches_tracked) : a.momentum;
    float rm = a.running_mean[c], rv = a.running_var[c];
    running_update(rm, rv, o.mean, o.var, a.unbias, factor);
    a.running_mean[c] = rm;
    a.running_var[c] = rv;
  }
}

// Backward finalize, one side. Modes: 0 absent; 1 BatchNorm: out = (k_x, k_c, grad_weight, grad_bias);
// 2 affine (scale_shift_act): out = (grad_mean, grad_scale, grad_shift); 3 weighted residual: out[1] =
// grad_scale. k_g is the side's scale itself (the apply pass reads it directly).
enum SideMode : int { kSideNone = 0, kSideBn = 1, kSideAffine = 2, kSideScale = 3 };

FR_HD void side_grads(int mode, float sum_g, float sum_gx, float scale, float var, float eps, float count,
                      bool training, float (&out)[4]) {
  if (mode == kSideBn) {
    const BwdCoef k = bn_backward_coefficients(sum_g, sum_gx, bn_invstd(var, eps), scale, count, training);
    out[0] = k.k_x;
    out[1] = k.k_c;
    out[2] = k.grad_weight;
    out[3] = k.grad_bias;
  } else if (mode == kSideAffine) {
    out[0] = -scale * sum_g;
    out[1] = sum_gx;
    out[2] = sum_g;
  } else if (mode == kSideScale) {
    out[1] = sum_gx;
  }
}

// Everything the backward finalize does with one channel c once its sums v = (sum g, sum g*(x-mean)
// [, sum g*(xb-mean_b)]) are folded: both sides' outputs, written where a.out_* is non-null. Shared by
// bwd_finalize_kernel (bn_act_finalize.cu), the last-block finalize of the reduction kernels
// (bn_act_backward.cu) and the host harness.
template <int Q>
FR_HD void bwd_finish_channel(const BwdFinalizeArgs& a, int c, const float (&v)[Q]) {
  float out[4];
  side_grads(a.mode_a, v[0], v[1], ldp0(a.scale, c), a.var ? a.var[c] : 1.f, a.eps, a.count, a.training, out);
  for (int i = 0; i < 4; ++i)
    if (a.out_a[i]) a.out_a[i][c] = out[i];
  if constexpr (Q == 3) {
    side_grads(a.mode_b, v[0], v[2], ldp0(a.scale_b, c), a.var_b ? a.var_b[c] : 1.f, a.eps_b, a.count, a.training,
               out);
    for (int i = 0; i < 4; ++i)
      if (a.out_b[i]) a.out_b[i][c] = out[i];
  }
}

}  // namespace fr
