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
__device__ __forceinline__ Welford block_reduce_y(Welford w, float (*sh)[kBlock]) {
  const int tx = threadIdx.x, ty = threadIdx.y, bx = blockDim.x, by = blockDim.y;
  const int t = ty * bx + tx;
  sh[0][t] = w.n;
  sh[1][t] = w.mean;
  sh[2][t] = w.m2;
  __syncthreads();
  for (int s = tree_start(by); s > 0; s >>= 1) {
    if (ty < s && ty + s < by) {
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

// The same tree for up to 3 plain sums (backward).
template <int Q>
__device__ __forceinline__ void block_sum_y(float (&v)[Q], float (*sh)[kBlock]) {
  const int tx = threadIdx.x, ty = threadIdx.y, bx = blockDim.x, by = blockDim.y;
  const int t = ty * bx + tx;
  for (int q = 0; q < Q; ++q) sh[q][t] = v[q];
  __syncthreads();
  for (int s = tree_start(by); s > 0; s >>= 1) {
    if (ty < s && ty + s < by) {
      for (int q = 0; q < Q; ++q) sh[q][t] = sh[q][t] + sh[q][t + s * bx];
    }
    __syncthreads();
  }
  for (int q = 0; q < Q; ++q) v[q] = sh[q][tx];
  __syncthreads();
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
void launch_stats_finalize(const float* ws, int splits, int C, float* mean, float* var, cudaStream_t st);
void launch_sums_finalize(const float* ws, int quantities, int splits, int C, float* out0, float* out1,
                          float* out2, cudaStream_t st);

}  // namespace fr
