// bn_act_finalize.cu — the per-channel finalize kernels of a fused BatchNorm: everything between the
// reduction pass and the elementwise pass runs here, in one launch each way, instead of torch ops on
// C-element vectors (the math: fr_finalize.h, shared with the host harness).
//   stats_finalize:    partials (or given mean/var) -> mean, var, scale, shift; running statistics updated,
//                      num_batches_tracked incremented (nn.BatchNorm2d's bookkeeping, no launch of its own)
//   backward_finalize: partial sums -> per side k_x, k_c, grad_weight, grad_bias (BatchNorm) or grad_mean,
//                      grad_scale, grad_shift (affine) or grad_scale (weighted residual)
// Partials are folded in a fixed order (kFinalBy strided rows, then the block tree): deterministic, no atomics.
#include "fr_cuda.cuh"
#include "fr_finalize.h"

namespace fr {

// Block (kFinalBx, kFinalBy): channel blockIdx.x*kFinalBx + tx; rows of the partials ty, ty+kFinalBy, ...
__global__ void __launch_bounds__(kFinalBx* kFinalBy) stats_params_kernel(StatsFinalizeArgs a, int C) {
  __shared__ float sh[3][kBlock];
  const int c = blockIdx.x * kFinalBx + threadIdx.x;
  float mean = 0.f, var = 1.f;
  if (a.ws) {
    Welford w{0.f, 0.f, 0.f};
    if (c < C) w = welford_partials(a.ws, a.splits, C, c, threadIdx.y, kFinalBy);
    w = block_reduce_y(w, sh);
    mean = w.mean;
    var = w.m2 / w.n;
  } else if (c < C) {
    mean = a.mean[c];
    var = a.var[c];
  }
  if (a.increment && blockIdx.x == 0 && threadIdx.x == 0 && threadIdx.y == 0) *a.increment += 1;
  if (threadIdx.y != 0 || c >= C) return;
  const StatsOut o = bn_finish(mean, var, a.eps, a.weight, a.bias, c);
  if (a.ws) {
    a.mean[c] = o.mean;
    a.var[c] = o.var;
  }
  a.scale[c] = o.scale;
  a.shift[c] = o.shift;
  if (a.running_mean) {
    const float factor = a.num_batches_tracked ? 1.f / static_cast<float>(*a.num_batches_tracked) : a.momentum;
    float rm = a.running_mean[c], rv = a.running_var[c];
    running_update(rm, rv, o.mean, o.var, a.unbias, factor);
    a.running_mean[c] = rm;
    a.running_var[c] = rv;
  }
}

void stats_finalize(const Launch& L, const StatsFinalizeArgs& a) {
  DeviceGuard guard(L.device);
  if (a.ws && (a.splits < 1 || a.splits > kMaxSplits)) throw std::runtime_error("fusedres._C: bad split count");
  const dim3 block(kFinalBx, kFinalBy);
  stats_params_kernel<<<static_cast<unsigned>(ceil_div(L.c, kFinalBx)), block, 0, stream_of(L)>>>(a, L.c);
  check_launch("stats_params_kernel");
}

template <int Q>
__global__ void __launch_bounds__(kFinalBx* kFinalBy) bwd_finalize_kernel(BwdFinalizeArgs a, int C) {
  __shared__ float sh[3][kBlock];
  fold_finish<Q, false>(a, a.ws, C, blockIdx.x * kFinalBx, 1, sh);
}

void backward_finalize(const Launch& L, const BwdFinalizeArgs& a) {
  DeviceGuard guard(L.device);
  if (a.splits < 1 || a.splits > kMaxSplits) throw std::runtime_error("fusedres._C: bad split count");
  const dim3 block(kFinalBx, kFinalBy);
  const unsigned grid = static_cast<unsigned>(ceil_div(L.c, kFinalBx));
  if (a.mode_b != kSideNone) {
    bwd_finalize_kernel<3><<<grid, block, 0, stream_of(L)>>>(a, L.c);
  } else {
    bwd_finalize_kernel<2><<<grid, block, 0, stream_of(L)>>>(a, L.c);
  }
  check_launch("bwd_finalize_kernel");
}

}  // namespace fr
