// bn_act_forward.cu — forward kernels of bn_act and dual_bn_act: per-channel batch statistics (Welford per
// thread, Chan across threads, blocks and splits; deterministic) and the fused apply
// y = act((x-mean)*scale + shift [+ res] [+ (xb-mean_b)*scale_b + shift_b]).
//
// Layout choice per call:
//   NHWC, C a multiple of the vector width, 16-byte aligned -> row kernels (16-byte accesses, each thread keeps
//                                                               its channels' parameters in registers)
//   NHWC otherwise (odd C)                                  -> scalar row kernels (stats) / flat kernel (apply)
//   NCHW                                                    -> channel kernels (stats) / flat kernel (apply),
//                                                              vectorised when H*W allows
#include "fr_cuda.cuh"

namespace fr {

// ------------------------------------------------------------------------------------------------ statistics

// Partial Welford of (split = blockIdx.y, channel) into ws[3][splits][C].
__device__ __forceinline__ void write_welford(float* ws, int split, int splits, int C, int c, Welford w) {
  ws[ws_index(0, split, c, splits, C)] = w.n;
  ws[ws_index(1, split, c, splits, C)] = w.mean;
  ws[ws_index(2, split, c, splits, C)] = w.m2;
}

// x [M, C] (NHWC). Block (bx, by): bx channel vectors x by rows; grid (channel tiles, splits). sem non-null:
// the last block of each grid column also finalizes its bx*V channels (f; f.ws unused: read through ws).
template <class T, int V>
__global__ void __launch_bounds__(kBlock, kMinBlocksPerSm) stats_rows_kernel(const T* __restrict__ x, i64 M, int C,
                                                                             float* __restrict__ ws,
                                                                             StatsFinalizeArgs f, unsigned* sem) {
  __shared__ float sh[3][kBlock];
  StatsBody<T, V> body(x);
  const int cv = blockIdx.x * blockDim.x + threadIdx.x;
  rows_thread<V>(M, C, static_cast<i64>(blockIdx.y) * blockDim.y + threadIdx.y,
                 static_cast<i64>(gridDim.y) * blockDim.y, cv, body);
  for (int j = 0; j < V; ++j) {
    const Welford w = block_reduce_y(body.lane(j), sh);
    if (threadIdx.y == 0 && cv * V < C) write_welford(ws, blockIdx.y, gridDim.y, C, cv * V + j, w);
  }
  if (sem && last_block_of_column(sem)) {
    stats_increment(f);
    fold_finish<true>(f, ws, C, blockIdx.x * blockDim.x * V, V, sh);
  }
}

// x [N, C, HW] (NCHW). Block (1, kBlock) reduces channel blockIdx.x over split blockIdx.y; Planes: V does not
// divide HW (plane_thread), else channel_thread. sem non-null: the last split finalizes the channel (f).
template <class T, int V, bool Planes>
__global__ void __launch_bounds__(kBlock, kMinBlocksPerSm) stats_channels_kernel(const T* __restrict__ x, i64 N,
                                                                                 i64 HW, int C,
                                                                                 float* __restrict__ ws,
                                                                                 StatsFinalizeArgs f, unsigned* sem) {
  __shared__ float sh[3][kBlock];
  StatsBody<T, V> body(x);
  const i64 v0 = static_cast<i64>(blockIdx.y) * kBlock + threadIdx.y, vs = static_cast<i64>(gridDim.y) * kBlock;
  if constexpr (Planes) {
    plane_thread<V>(N, HW, C, blockIdx.x, v0, vs, body);
  } else {
    channel_thread<V>(N, HW, C, blockIdx.x, v0, vs, body);
  }
  const Welford w = block_reduce_y(body.merged(), sh);
  if (threadIdx.y == 0) write_welford(ws, blockIdx.y, gridDim.y, C, blockIdx.x, w);
  if (sem && last_block_of_column(sem)) {
    stats_increment(f);
    fold_finish<true>(f, ws, C, blockIdx.x, 1, sh);
  }
}

namespace {

// sem null: partials only. Else also the fused finalize (f), sem: one zeroed counter per grid column (<= C).
void stats_launch(const Launch& L, const void* x, float* ws, std::int64_t ws_numel, int splits,
                  const StatsFinalizeArgs& f, unsigned* sem) {
  DeviceGuard guard(L.device);
  if (splits < 1 || splits > kMaxSplits) throw std::runtime_error("fusedres._C: bad split count");
  check_workspace(ws_numel, 3LL * splits * L.c);
  const cudaStream_t st = stream_of(L);
  // the fused finalize folds with the first kFinalBy rows of the block (row_plan: by = kBlock / bx >= 8)
  static_assert(kBlock / kMaxBx >= kFinalBy, "row blocks too short for the fused finalize");
  dispatch_dtype(L.dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int VV = 16 / sizeof(T);
    const T* xp = static_cast<const T*>(x);
    const i64 M = L.n * L.hw;
    const dim3 cgrid(static_cast<unsigned>(L.c), static_cast<unsigned>(splits));
    switch (choose_reduce(L.channels_last, aligned16({x}), L.c, L.hw, VV)) {
      case Reduce::kRowsVec: {
        const RowPlan p = row_plan(L.c, VV, splits);
        stats_rows_kernel<T, VV><<<dim3(p.gx, p.gy), dim3(p.bx, p.by), 0, st>>>(xp, M, L.c, ws, f, sem);
        break;
      }
      case Reduce::kRowsScalar: {
        const RowPlan p = row_plan(L.c, 1, splits);
        stats_rows_kernel<T, 1><<<dim3(p.gx, p.gy), dim3(p.bx, p.by), 0, st>>>(xp, M, L.c, ws, f, sem);
        break;
      }
      case Reduce::kChannelsVec:
        stats_channels_kernel<T, VV, false><<<cgrid, dim3(1, kBlock), 0, st>>>(xp, L.n, L.hw, L.c, ws, f, sem);
        break;
      case Reduce::kChannelsPlanes:
        stats_channels_kernel<T, VV, true><<<cgrid, dim3(1, kBlock), 0, st>>>(xp, L.n, L.hw, L.c, ws, f, sem);
        break;
      case Reduce::kChannelsScalar:
        stats_channels_kernel<T, 1, false><<<cgrid, dim3(1, kBlock), 0, st>>>(xp, L.n, L.hw, L.c, ws, f, sem);
        break;
    }
    check_launch("stats kernel");
  });
}

}  // namespace

void stats_partials(const Launch& L, const void* x, float* ws, std::int64_t ws_numel, int splits) {
  stats_launch(L, x, ws, ws_numel, splits, StatsFinalizeArgs{}, nullptr);
}

void stats_reduce_finalize(const Launch& L, const void* x, float* ws, std::int64_t ws_numel, int splits,
                           const StatsFinalizeArgs& f, unsigned* sem, std::int64_t sem_numel) {
  if (!sem) throw std::runtime_error("fusedres._C: stats_reduce_finalize needs a semaphore buffer");
  if (sem_numel < L.c) {
    throw std::runtime_error("fusedres._C: the semaphore buffer has " + std::to_string(sem_numel) +
                             " counters, the launch needs " + std::to_string(L.c));
  }
  if (!f.mean || !f.var) throw std::runtime_error("fusedres._C: stats_reduce_finalize needs mean and var");
  if (f.running_mean && !f.running_var) throw std::runtime_error("fusedres._C: running_var missing");
  if (f.increment && f.num_batches_tracked)
    throw std::runtime_error("fusedres._C: increment and the cumulative factor exclude each other");
  StatsFinalizeArgs g = f;
  g.ws = ws;
  g.splits = splits;
  stats_launch(L, x, ws, ws_numel, splits, g, sem);
}

// ------------------------------------------------------------------------------------------------ apply

template <class T, int V, bool XB>
__global__ void __launch_bounds__(kBlock, kMinBlocksPerSm) apply_rows_kernel(FwdArgs<T> a, i64 M, int C) {
  ApplyBody<T, V, false, XB> body(a, 1, C);
  rows_thread<V>(M, C, static_cast<i64>(blockIdx.y) * blockDim.y + threadIdx.y,
                 static_cast<i64>(gridDim.y) * blockDim.y, blockIdx.x * blockDim.x + threadIdx.x, body);
}

template <class T, int V, bool U, bool XB>
__global__ void __launch_bounds__(kBlock, kMinBlocksPerSm) apply_flat_kernel(FwdArgs<T> a, i64 E, i64 inner, int C) {
  ApplyBody<T, V, U, XB> body(a, inner, C);
  flat_thread<V>(E, inner, C, static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x,
                 static_cast<i64>(gridDim.x) * blockDim.x, body);
}

template <class T, bool XB>
void launch_apply(const Launch& L, const FwdArgs<T>& a, bool al, cudaStream_t st) {
  constexpr int VV = 16 / sizeof(T);
  const i64 E = L.n * L.c * L.hw;
  const i64 inner = L.channels_last ? 1 : L.hw;
  const unsigned g = static_cast<unsigned>(flat_blocks(E, VV, L.sm_count));
  switch (choose_elementwise(L.channels_last, al, L.c, L.hw, VV)) {
    case Elementwise::kRows: {
      const i64 M = L.n * L.hw;
      const RowPlan p = row_plan(L.c, VV, apply_row_splits(M, L.c, VV, L.sm_count));
      apply_rows_kernel<T, VV, XB><<<dim3(p.gx, p.gy), dim3(p.bx, p.by), 0, st>>>(a, M, L.c);
      break;
    }
    case Elementwise::kFlatUniform:
      apply_flat_kernel<T, VV, true, XB><<<g, kBlock, 0, st>>>(a, E, inner, L.c);
      break;
    case Elementwise::kFlatLanes:
      apply_flat_kernel<T, VV, false, XB><<<g, kBlock, 0, st>>>(a, E, inner, L.c);
      break;
    case Elementwise::kFlatScalar:
      apply_flat_kernel<T, 1, false, XB>
          <<<static_cast<unsigned>(flat_blocks(E, 1, L.sm_count)), kBlock, 0, st>>>(a, E, inner, L.c);
      break;
  }
  check_launch("apply kernel");
}

// Row kernels when NHWC, C % V == 0 and aligned; else flat (uniform-channel vectors for NCHW with V | HW).
void apply(const Launch& L, const void* x, const float* mean, const float* scale, const float* shift,
           const void* res, const void* xb, const float* mean_b, const float* scale_b, const float* shift_b,
           void* y, bool relu) {
  DeviceGuard guard(L.device);
  const cudaStream_t st = stream_of(L);
  const bool al = aligned16({x, res, xb, y});
  dispatch_dtype(L.dtype, [&](auto tag) {
    using T = decltype(tag);
    const FwdArgs<T> a{static_cast<const T*>(x), static_cast<const T*>(res), static_cast<const T*>(xb), mean,
                       scale, shift, mean_b, scale_b, shift_b, static_cast<T*>(y), relu};
    if (xb) {
      launch_apply<T, true>(L, a, al, st);
    } else {
      launch_apply<T, false>(L, a, al, st);
    }
  });
}

#ifndef FR_CUDA_ARCHS
#define FR_CUDA_ARCHS "?"
#endif
#define FR_STR2(x) #x
#define FR_STR(x) FR_STR2(x)

const char* build_info() { return "CUDA runtime " FR_STR(CUDART_VERSION) ", archs " FR_CUDA_ARCHS; }

std::string device_unsupported(int device) {
  try {
    DeviceGuard guard(device);
    cudaFuncAttributes attr;
    const cudaError_t e = cudaFuncGetAttributes(&attr, apply_flat_kernel<float, 1, false, false>);
    if (e != cudaSuccess) {
      cudaGetLastError();  // clear the sticky-free error so later launches do not report it
      return std::string("the compiled kernels (archs " FR_CUDA_ARCHS ") cannot run on this GPU: ") +
             cudaGetErrorString(e);
    }
  } catch (const std::exception& ex) {
    return ex.what();
  }
  return "";
}

}  // namespace fr
