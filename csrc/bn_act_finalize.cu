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
  stats_increment(a);
  if (a.ws) {  // the partials' merge: fold_finish (fr_cuda.cuh), as the statistics kernels' last block does it
    fold_finish<false>(a, a.ws, C, blockIdx.x * kFinalBx, 1, sh);
    return;
  }
  const int c = blockIdx.x * kFinalBx + threadIdx.x;
  if (threadIdx.y != 0 || c >= C) return;
  stats_finish_channel(a, c, a.mean[c], a.var[c], false);
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
