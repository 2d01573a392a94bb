// fr_cuda.cuh — device-side pieces shared by the kernel files: half-type conversions, the block reduction
// over threadIdx.y, the partial-writing and finalize kernels, launch helpers (device guard, error check,
// dtype dispatch, alignment).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "fr_api.h"
#include "fr_bodies.h"
#include "fr_finalize.h"

namespace fr {

template <>
struct Cvt<__half> {
  static FR_HD float to(__half v) { return __half2float(v); }
  static FR_HD __half from(float v) { return __float2half_rn(v); }
};
template <>
struct Cvt<__nv_bfloat16> {
  static FR_HD float to(__nv_bfloat16 v) { return __bfloat162float(v); }
  static FR_HD __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
};

// ------------------------------------------------------------------------------------------------ device

// Every main kernel is compiled for at least this many resident blocks of kBlock threads per SM (at most
// 65536 / (kBlock * kMinBlocksPerSm) = 128 registers per thread).
constexpr int kMinBlocksPerSm = 2;

// Combine the values of all threadIdx.y of each threadIdx.x column (tree_start order; the result is valid in
// every thread afterwards). sh: 3 x blockDim.x*blockDim.y floats. Ends with a barrier, so sh can be reused.
// block_reduce_rows: the same over the first `rows` rows of threads only (rows <= blockDim.y; the others take
// part in the barriers), so the association depends on `rows` alone.
__device__ __forceinline__ Welford block_reduce_rows(Welford w, float (*sh)[kBlock], int rows) {
  const int tx = threadIdx.x, ty = threadIdx.y, bx = blockDim.x;
  const int t = ty * bx + tx;
  sh[0][t] = w.n;
  sh[1][t] = w.mean;
  sh[2][t] = w.m2;
  __syncthreads();
  for (int s = tree_start(rows); s > 0; s >>= 1) {
    if (ty < s && ty + s < rows) {
      const int u = t + s * bx;
      const Welford r = welford_combine(Welford{sh[0][t], sh[1][t], sh[2][t]}, Welford{sh[0][u], sh[1][u], sh[2][u]});
      sh[0][t] = r.n;
      sh[1][t] = r.mean;
      sh[2][t] = r.m2;
    }
    __syncthreads();
  }
  const Welford r{sh[0][tx], sh[1][tx], sh[2][tx]};
  __syncthreads();
  return r;
}

__device__ __forceinline__ Welford block_reduce_y(Welford w, float (*sh)[kBlock]) {
  return block_reduce_rows(w, sh, blockDim.y);
}

// The same tree for up to 3 plain sums (backward), over the first `rows` rows of threads (rows <= blockDim.y;
// the others take part in the barriers only): the association depends on `rows` alone, so a block of any
// height folds like one that is `rows` high.
template <int Q>
__device__ __forceinline__ void block_sum_rows(float (&v)[Q], float (*sh)[kBlock], int rows) {
  const int tx = threadIdx.x, ty = threadIdx.y, bx = blockDim.x;
  const int t = ty * bx + tx;
  for (int q = 0; q < Q; ++q) sh[q][t] = v[q];
  __syncthreads();
  for (int s = tree_start(rows); s > 0; s >>= 1) {
    if (ty < s && ty + s < rows) {
      for (int q = 0; q < Q; ++q) sh[q][t] = sh[q][t] + sh[q][t + s * bx];
    }
    __syncthreads();
  }
  for (int q = 0; q < Q; ++q) v[q] = sh[q][tx];
  __syncthreads();
}

template <int Q>
__device__ __forceinline__ void block_sum_y(float (&v)[Q], float (*sh)[kBlock]) {
  block_sum_rows<Q>(v, sh, blockDim.y);
}

// The backward finalize of the channels c_lo + k*blockDim.x + threadIdx.x (k < chunks, c < C): per channel,
// thread row ty < kFinalBy sums the partials ws[q][ty], ws[q][ty + kFinalBy], ... (sum_partials), the first
// kFinalBy rows are folded by the block tree, then bwd_finish_channel (fr_finalize.h). The order of the
// additions depends on kFinalBy and `splits` only, not on the block shape: bwd_finalize_kernel (block
// (kFinalBx, kFinalBy), one chunk) and the last block of a reduction kernel (any block of >= kFinalBy rows)
// give bitwise the same results. L2: the partials come from other blocks of this launch (read with __ldcg).
template <int Q, bool L2>
__device__ __forceinline__ void fold_finish(const BwdFinalizeArgs& a, const float* ws, int C, int c_lo, int chunks,
                                            float (*sh)[kBlock]) {
  for (int k = 0; k < chunks; ++k) {
    const int c = c_lo + k * static_cast<int>(blockDim.x) + static_cast<int>(threadIdx.x);
    const bool live = c < C && threadIdx.y < kFinalBy;
    float v[Q];
    for (int q = 0; q < Q; ++q)
      v[q] = live ? sum_partials<L2>(ws, q, a.splits, C, c, threadIdx.y, kFinalBy) : 0.f;
    block_sum_rows<Q>(v, sh, kFinalBy);
    if (threadIdx.y == 0 && c < C) bwd_finish_channel<Q>(a, c, v);
  }
}

// The forward counterpart (statistics partials ws[3][splits][C] -> StatsFinalizeArgs outputs): per channel,
// thread row ty < kFinalBy merges the Welford partials of splits ty, ty + kFinalBy, ... (welford_partials), the
// first kFinalBy rows are combined by the block tree (block_reduce_rows), then stats_finish_channel with the
// biased variance m2 / n. stats_params_kernel (block (kFinalBx, kFinalBy), one chunk) and the last block of a
// statistics kernel (any block of >= kFinalBy rows) give bitwise the same results.
template <bool L2>
__device__ __forceinline__ void fold_finish(const StatsFinalizeArgs& a, const float* ws, int C, int c_lo,
                                            int chunks, float (*sh)[kBlock]) {
  for (int k = 0; k < chunks; ++k) {
    const int c = c_lo + k * static_cast<int>(blockDim.x) + static_cast<int>(threadIdx.x);
    const bool live = c < C && threadIdx.y < kFinalBy;
    Welford w{0.f, 0.f, 0.f};
    if (live) w = welford_partials<L2>(ws, a.splits, C, c, threadIdx.y, kFinalBy);
    w = block_reduce_rows(w, sh, kFinalBy);
    if (threadIdx.y == 0 && c < C) stats_finish_channel(a, c, w.mean, w.m2 / w.n, true);
  }
}

// num_batches_tracked += 1 (a.increment) by one thread of the launch: thread (0, 0) of the block(s) with
// blockIdx.x == 0 that call it (stats_params_kernel: block 0; a statistics kernel: the last block of column 0).
__device__ __forceinline__ void stats_increment(const StatsFinalizeArgs& a) {
  if (a.increment && blockIdx.x == 0 && threadIdx.x == 0 && threadIdx.y == 0) *a.increment += 1;
}

// The "last block" of a grid column (threadFenceReduction): called by every thread of the block after its
// partials are stored. Each block of column blockIdx.x takes a ticket from sem[blockIdx.x]; the one that takes
// gridDim.y - 1 finishes last and sees every other block's partials (their __threadfence precedes their
// ticket). That block returns true after its own fence, and resets sem[blockIdx.x] to 0 for the next launch
// (every ticket of this launch is taken by then).
__device__ __forceinline__ bool last_block_of_column(unsigned* sem) {
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0 && threadIdx.y == 0) {
    const unsigned ticket = atomicAdd(sem + blockIdx.x, 1u);
    last = ticket == gridDim.y - 1;
    if (last) sem[blockIdx.x] = 0u;
  }
  __syncthreads();
  if (!last) return false;
  __threadfence();
  return true;
}

// ------------------------------------------------------------------------------------------------ host

inline void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    throw std::runtime_error(std::string("fusedres._C: ") + what + ": " + cudaGetErrorName(e) + ": " +
                             cudaGetErrorString(e));
  }
}

// Makes L.device current for the launch and restores the caller's device afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check(cudaGetDevice(&prev_), "cudaGetDevice");
    if (prev_ != device) check(cudaSetDevice(device), "cudaSetDevice");
    device_ = device;
  }
  ~DeviceGuard() {
    if (prev_ != device_) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0, device_ = 0;
};

inline cudaStream_t stream_of(const Launch& L) { return reinterpret_cast<cudaStream_t>(L.stream); }

// True when every non-null pointer is 16-byte aligned (vector access allowed).
inline bool aligned16(std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs) {
    if (p && (reinterpret_cast<std::uintptr_t>(p) & 15u) != 0) return false;
  }
  return true;
}

inline void check_workspace(std::int64_t have, std::int64_t need) {
  if (have < need) {
    throw std::runtime_error("fusedres._C: workspace has " + std::to_string(have) + " floats, the launch needs " +
                             std::to_string(need));
  }
}

inline void check_launch(const char* kernel) { check(cudaGetLastError(), kernel); }

// Calls f(T{}) with T the element type of L.dtype.
template <class F>
void dispatch_dtype(int dtype, F&& f) {
  switch (dtype) {
    case kFloat32:
      f(float{});
      break;
    case kFloat16:
      f(__half{});
      break;
    case kBFloat16:
      f(__nv_bfloat16{});
      break;
    default:
      throw std::runtime_error("fusedres._C: unsupported dtype code " + std::to_string(dtype));
  }
}

// The finalize kernels (one thread column per channel, kFinalBy splits folded in parallel).
void launch_sums_finalize(const float* ws, int quantities, int splits, int C, float* out0, float* out1,
                          float* out2, cudaStream_t st);

}  // namespace fr
