// bn_act_backward.cu — backward kernels of bn_act and dual_bn_act.
//   backward_reduce: g = dy * relu'(z) (z recomputed from the saved inputs), per-channel sum(g),
//     sum(g*(x-mean)) [, sum(g*(xb-mean_b))] as per-block partials in a workspace, then a finalize kernel
//     folding the splits in a fixed order: no float atomics, bit-reproducible run to run. Optionally writes g
//     as the residual's gradient in the same pass.
//   backward_reduce_finalize: the same reduction kernels, and the last block of each grid column (the last
//     split of its channels to finish: an integer ticket, fr_cuda.cuh last_block_of_column) folds that
//     column's partials in bwd_finalize_kernel's order and finishes the channels (fold_finish): the backward
//     of a fused BatchNorm is two launches (this, then backward_apply) instead of three, with the same bits.
//   backward_apply: dx = k_g*g + k_x*(x-mean) + k_c (and dxb), elementwise.
// Same layout choice as the forward (see bn_act_forward.cu).
#include "fr_cuda.cuh"

namespace fr {

// ------------------------------------------------------------------------------------------------ reduce

template <int Q>
__device__ __forceinline__ void write_sums(float* ws, int split, int splits, int C, int c, const float (&v)[Q]) {
  for (int q = 0; q < Q; ++q) ws[ws_index(q, split, c, splits, C)] = v[q];
}

// NHWC rows; Q = 2 (x only) or 3 (with xb) quantities. sem non-null: the last block of each grid column also
// finalizes its bx*V channels (f; f.ws unused: the partials are read through ws).
template <class T, int V, int Q>
__global__ void __launch_bounds__(kBlock, kMinBlocksPerSm) bwd_reduce_rows_kernel(BwdArgs<T> a, i64 M, int C,
                                                                                  float* __restrict__ ws,
                                                                                  BwdFinalizeArgs f, unsigned* sem) {
  __shared__ float sh[3][kBlock];
  BwdReduceBody<T, V, Q == 3> body(a);
  const int cv = blockIdx.x * blockDim.x + threadIdx.x;
  rows_thread<V>(M, C, static_cast<i64>(blockIdx.y) * blockDim.y + threadIdx.y,
                 static_cast<i64>(gridDim.y) * blockDim.y, cv, body);
  for (int j = 0; j < V; ++j) {
    float v[Q];
    v[0] = body.sg[j];
    v[1] = body.sgx[j];
    if constexpr (Q == 3) v[2] = body.sgxb[j];
    block_sum_y<Q>(v, sh);
    if (threadIdx.y == 0 && cv * V < C) write_sums<Q>(ws, blockIdx.y, gridDim.y, C, cv * V + j, v);
  }
  if (sem && last_block_of_column(sem)) fold_finish<Q, true>(f, ws, C, blockIdx.x * blockDim.x * V, V, sh);
}

// NCHW: block (1, kBlock) for channel blockIdx.x, split blockIdx.y; lanes summed in lane order. Planes: V does
// not divide HW (plane_thread), else channel_thread. sem non-null: the last split finalizes the channel.
template <class T, int V, int Q, bool Planes>
__global__ void __launch_bounds__(kBlock, kMinBlocksPerSm) bwd_reduce_channels_kernel(BwdArgs<T> a, i64 N, i64 HW,
                                                                                      int C, float* __restrict__ ws,
                                                                                      BwdFinalizeArgs f,
                                                                                      unsigned* sem) {
  __shared__ float sh[3][kBlock];
  BwdReduceBody<T, V, Q == 3> body(a);
  const i64 v0 = static_cast<i64>(blockIdx.y) * kBlock + threadIdx.y, vs = static_cast<i64>(gridDim.y) * kBlock;
  if constexpr (Planes) {
    plane_thread<V>(N, HW, C, blockIdx.x, v0, vs, body);
  } else {
    channel_thread<V>(N, HW, C, blockIdx.x, v0, vs, body);
  }
  float v[Q];
  for (int q = 0; q < Q; ++q) v[q] = 0.f;
  for (int j = 0; j < V; ++j) {
    v[0] = v[0] + body.sg[j];
    v[1] = v[1] + body.sgx[j];
    if constexpr (Q == 3) v[2] = v[2] + body.sgxb[j];
  }
  block_sum_y<Q>(v, sh);
  if (threadIdx.y == 0) write_sums<Q>(ws, blockIdx.y, gridDim.y, C, blockIdx.x, v);
  if (sem && last_block_of_column(sem)) fold_finish<Q, true>(f, ws, C, blockIdx.x, 1, sh);
}

template <int Q>
__global__ void __launch_bounds__(kFinalBx* kFinalBy) sums_finalize_kernel(const float* __restrict__ ws,
                                                                           int splits, int C, float* out0,
                                                                           float* out1, float* out2) {
  __shared__ float sh[3][kBlock];
  const int c = blockIdx.x * kFinalBx + threadIdx.x;
  float v[Q];
  for (int q = 0; q < Q; ++q) v[q] = c < C ? sum_partials(ws, q, splits, C, c, threadIdx.y, kFinalBy) : 0.f;
  block_sum_y<Q>(v, sh);
  if (threadIdx.y == 0 && c < C) {
    out0[c] = v[0];
    out1[c] = v[1];
    if constexpr (Q == 3) out2[c] = v[2];
  }
}

void launch_sums_finalize(const float* ws, int quantities, int splits, int C, float* out0, float* out1,
                          float* out2, cudaStream_t st) {
  const dim3 block(kFinalBx, kFinalBy);
  const unsigned grid = static_cast<unsigned>(ceil_div(C, kFinalBx));
  if (quantities == 3) {
    sums_finalize_kernel<3><<<grid, block, 0, st>>>(ws, splits, C, out0, out1, out2);
  } else {
    sums_finalize_kernel<2><<<grid, block, 0, st>>>(ws, splits, C, out0, out1, out2);
  }
  check_launch("sums_finalize_kernel");
}

// sem null: partials only. Else also the fused finalize (f), sem: one zeroed counter per grid column (<= C).
template <class T, int V, int Q, bool Planes = false>
void launch_bwd_reduce(const Launch& L, const BwdArgs<T>& a, int splits, float* ws, const BwdFinalizeArgs& f,
                       unsigned* sem, cudaStream_t st) {
  if (L.channels_last) {
    const RowPlan p = row_plan(L.c, V, splits);
    // the fused finalize folds with the first kFinalBy rows of the block (row_plan: by = kBlock / bx >= 8)
    static_assert(kBlock / kMaxBx >= kFinalBy, "row blocks too short for the fused finalize");
    bwd_reduce_rows_kernel<T, V, Q><<<dim3(p.gx, p.gy), dim3(p.bx, p.by), 0, st>>>(a, L.n * L.hw, L.c, ws, f, sem);
    check_launch("bwd_reduce_rows_kernel");
  } else {
    const dim3 grid(static_cast<unsigned>(L.c), static_cast<unsigned>(splits));
    bwd_reduce_channels_kernel<T, V, Q, Planes><<<grid, dim3(1, kBlock), 0, st>>>(a, L.n, L.hw, L.c, ws, f, sem);
    check_launch("bwd_reduce_channels_kernel");
  }
}

namespace {

void reduce_launch(const Launch& L, const void* dy, const void* x, const float* scale, const float* shift,
                   const float* mean, const void* res, const void* xb, const float* scale_b, const float* shift_b,
                   const float* mean_b, bool relu, void* grad_res, float* ws, std::int64_t ws_numel, int splits,
                   const BwdFinalizeArgs& f, unsigned* sem) {
  DeviceGuard guard(L.device);
  const int Q = xb ? 3 : 2;
  if (splits < 1 || splits > kMaxSplits) throw std::runtime_error("fusedres._C: bad split count");
  check_workspace(ws_numel, static_cast<std::int64_t>(Q) * splits * L.c);
  const cudaStream_t st = stream_of(L);
  const bool al = aligned16({dy, x, res, xb, grad_res});
  dispatch_dtype(L.dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int VV = 16 / sizeof(T);
    BwdArgs<T> a{};
    a.dy = static_cast<const T*>(dy);
    a.x = static_cast<const T*>(x);
    a.res = static_cast<const T*>(res);
    a.xb = static_cast<const T*>(xb);
    a.scale = scale;
    a.shift = shift;
    a.mean = mean;
    a.scale_b = scale_b;
    a.shift_b = shift_b;
    a.mean_b = mean_b;
    a.grad_res = static_cast<T*>(grad_res);
    a.relu = relu;
    const Reduce kind = choose_reduce(L.channels_last, al, L.c, L.hw, VV);
    if (kind == Reduce::kRowsVec || kind == Reduce::kChannelsVec) {
      if (Q == 3) launch_bwd_reduce<T, VV, 3>(L, a, splits, ws, f, sem, st);
      else launch_bwd_reduce<T, VV, 2>(L, a, splits, ws, f, sem, st);
    } else if (kind == Reduce::kChannelsPlanes) {
      if (Q == 3) launch_bwd_reduce<T, VV, 3, true>(L, a, splits, ws, f, sem, st);
      else launch_bwd_reduce<T, VV, 2, true>(L, a, splits, ws, f, sem, st);
    } else {
      if (Q == 3) launch_bwd_reduce<T, 1, 3>(L, a, splits, ws, f, sem, st);
      else launch_bwd_reduce<T, 1, 2>(L, a, splits, ws, f, sem, st);
    }
  });
}

}  // namespace

void backward_partials(const Launch& L, const void* dy, const void* x, const float* scale, const float* shift,
                       const float* mean, const void* res, const void* xb, const float* scale_b,
                       const float* shift_b, const float* mean_b, bool relu, void* grad_res, float* ws,
                       std::int64_t ws_numel, int splits) {
  reduce_launch(L, dy, x, scale, shift, mean, res, xb, scale_b, shift_b, mean_b, relu, grad_res, ws, ws_numel,
                splits, BwdFinalizeArgs{}, nullptr);
}

void backward_reduce_finalize(const Launch& L, const void* dy, const void* x, const float* scale,
                              const float* shift, const float* mean, const void* res, const void* xb,
                              const float* scale_b, const float* shift_b, const float* mean_b, bool relu,
                              void* grad_res, float* ws, std::int64_t ws_numel, int splits,
                              const BwdFinalizeArgs& f, unsigned* sem, std::int64_t sem_numel) {
  if (!sem) throw std::runtime_error("fusedres._C: backward_reduce_finalize needs a semaphore buffer");
  if (sem_numel < L.c) {
    throw std::runtime_error("fusedres._C: the semaphore buffer has " + std::to_string(sem_numel) +
                             " counters, the launch needs " + std::to_string(L.c));
  }
  if ((f.mode_b != kSideNone) != (xb != nullptr))
    throw std::runtime_error("fusedres._C: backward_reduce_finalize: mode_b must be set exactly when xb is given");
  BwdFinalizeArgs g = f;
  g.ws = ws;
  g.splits = splits;
  g.scale = scale;
  g.scale_b = scale_b;
  reduce_launch(L, dy, x, scale, shift, mean, res, xb, scale_b, shift_b, mean_b, relu, grad_res, ws, ws_numel,
                splits, g, sem);
}

void backward_reduce(const Launch& L, const void* dy, const void* x, const float* scale, const float* shift,
                     const float* mean, const void* res, const void* xb, const float* scale_b,
                     const float* shift_b, const float* mean_b, bool relu, void* grad_res, float* sum_g,
                     float* sum_g_xc, float* sum_g_xbc, float* ws, std::int64_t ws_numel, int splits) {
  backward_partials(L, dy, x, scale, shift, mean, res, xb, scale_b, shift_b, mean_b, relu, grad_res, ws, ws_numel,
                    splits);
  DeviceGuard guard(L.device);
  launch_sums_finalize(ws, xb ? 3 : 2, splits, L.c, sum_g, sum_g_xc, sum_g_xbc, stream_of(L));
}

// ------------------------------------------------------------------------------------------------ apply

// Dual vectors (XB, V > 1) read their 6 backward coefficients from a shared-memory table (KT).
template <class T, int V, bool XB>
__global__ void __launch_bounds__(kBlock, kMinBlocksPerSm) bwd_apply_rows_kernel(BwdArgs<T> a, i64 M, int C) {
  constexpr bool KT = XB && V > 1;
  BwdApplyBody<T, V, false, XB, KT> body(a, 1, C);
  if constexpr (KT) {
    __shared__ float tab[6 * V * kMaxBx];
    fill_coef_table<T, V>(a, C, blockIdx.x * blockDim.x * V, blockDim.x, tab, threadIdx.y * blockDim.x + threadIdx.x,
                          blockDim.x * blockDim.y);
    __syncthreads();
    body.kt = tab + threadIdx.x;
    body.kts = blockDim.x;
  }
  rows_thread<V>(M, C, static_cast<i64>(blockIdx.y) * blockDim.y + threadIdx.y,
                 static_cast<i64>(gridDim.y) * blockDim.y, blockIdx.x * blockDim.x + threadIdx.x, body);
}

template <class T, int V, bool U, bool XB>
__global__ void __launch_bounds__(kBlock, kMinBlocksPerSm) bwd_apply_flat_kernel(BwdArgs<T> a, i64 E, i64 inner,
                                                                                 int C) {
  BwdApplyBody<T, V, U, XB> body(a, inner, C);
  flat_thread<V>(E, inner, C, static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x,
                 static_cast<i64>(gridDim.x) * blockDim.x, body);
}

template <class T, bool XB>
void launch_bwd_apply(const Launch& L, const BwdArgs<T>& a, bool al, cudaStream_t st) {
  constexpr int VV = 16 / sizeof(T);
  const i64 E = L.n * L.c * L.hw;
  const i64 inner = L.channels_last ? 1 : L.hw;
  const unsigned g = static_cast<unsigned>(flat_blocks(E, VV, L.sm_count));
  switch (choose_elementwise(L.channels_last, al, L.c, L.hw, VV)) {
    case Elementwise::kRows: {
      const i64 M = L.n * L.hw;
      const RowPlan p = row_plan(L.c, VV, apply_row_splits(M, L.c, VV, L.sm_count));
      bwd_apply_rows_kernel<T, VV, XB><<<dim3(p.gx, p.gy), dim3(p.bx, p.by), 0, st>>>(a, M, L.c);
      break;
    }
    case Elementwise::kFlatUniform:
      bwd_apply_flat_kernel<T, VV, true, XB><<<g, kBlock, 0, st>>>(a, E, inner, L.c);
      break;
    case Elementwise::kFlatLanes:
      bwd_apply_flat_kernel<T, VV, false, XB><<<g, kBlock, 0, st>>>(a, E, inner, L.c);
      break;
    case Elementwise::kFlatScalar:
      bwd_apply_flat_kernel<T, 1, false, XB>
          <<<static_cast<unsigned>(flat_blocks(E, 1, L.sm_count)), kBlock, 0, st>>>(a, E, inner, L.c);
      break;
  }
  check_launch("backward_apply kernel");
}

void backward_apply(const Launch& L, const void* dy, const void* x, const float* scale, const float* shift,
                    const void* res, const void* xb, const float* scale_b, const float* shift_b, bool relu,
                    const float* mean, const float* k_g, const float* k_x, const float* k_c, const float* mean_b,
                    const float* k_g_b, const float* k_x_b, const float* k_c_b, void* dx, void* dxb) {
  DeviceGuard guard(L.device);
  const cudaStream_t st = stream_of(L);
  const bool al = aligned16({dy, x, res, xb, dx, dxb});
  dispatch_dtype(L.dtype, [&](auto tag) {
    using T = decltype(tag);
    BwdArgs<T> a{};
    a.dy = static_cast<const T*>(dy);
    a.x = static_cast<const T*>(x);
    a.res = static_cast<const T*>(res);
    a.xb = static_cast<const T*>(xb);
    a.scale = scale;
    a.shift = shift;
    a.mean = mean;
    a.scale_b = scale_b;
    a.shift_b = shift_b;
    a.mean_b = mean_b;
    a.k_g = k_g;
    a.k_x = k_x;
    a.k_c = k_c;
    a.k_g_b = k_g_b;
    a.k_x_b = k_x_b;
    a.k_c_b = k_c_b;
    a.dx = static_cast<T*>(dx);
    a.dxb = static_cast<T*>(dxb);
    a.relu = relu;
    if (xb) {
      launch_bwd_apply<T, true>(L, a, al, st);
    } else {
      launch_bwd_apply<T, false>(L, a, al, st);
    }
  });
}

}  // namespace fr
