// fr_api.h — host entry points of the CUDA kernels, called by bindings.cpp (plain C++: no CUDA or torch
// headers, so the binding compiles with the host compiler alone). Pointers are raw device addresses of dense
// tensors allocated by Python; a null optional pointer means "absent". Per-channel vectors are float32 [C].
// Errors (bad launch, bad workspace) throw std::runtime_error.
#pragma once

#include <cstdint>
#include <string>

namespace fr {

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// What every launch needs to know about x [N, C, H, W].
struct Launch {
  std::int64_t n = 0, hw = 0;  // N and H*W
  int c = 0;                   // C
  bool channels_last = false;  // dense NHWC (else dense NCHW)
  int dtype = kFloat32;        // DType of every activation tensor of the call
  int device = 0;              // CUDA device index
  int sm_count = 1;            // multiprocessors of that device (launch planning)
  std::uintptr_t stream = 0;   // cudaStream_t of torch.cuda.current_stream()
};

// y = act((x-mean)*scale + shift [+ res] [+ (xb-mean_b)*scale_b + shift_b]).
void apply(const Launch& L, const void* x, const float* mean, const float* scale, const float* shift,
           const void* res, const void* xb, const float* mean_b, const float* scale_b, const float* shift_b,
           void* y, bool relu);

// Per-channel sum(g), sum(g*(x-mean)) [, sum(g*(xb-mean_b))] with g = dy*relu'(z); grad_res := g when
// non-null. ws: float32, (xb ? 3 : 2) * splits * C elements. Deterministic: fixed partition and order.
void backward_reduce(const Launch& L, const void* dy, const void* x, const float* scale, const float* shift,
                     const float* mean, const void* res, const void* xb, const float* scale_b,
                     const float* shift_b, const float* mean_b, bool relu, void* grad_res, float* sum_g,
                     float* sum_g_xc, float* sum_g_xbc, float* ws, std::int64_t ws_numel, int splits);

// dx = k_g*g + k_x*(x-mean) + k_c, and dxb likewise when xb is given.
void backward_apply(const Launch& L, const void* dy, const void* x, const float* scale, const float* shift,
                    const void* res, const void* xb, const float* scale_b, const float* shift_b, bool relu,
                    const float* mean, const float* k_g, const float* k_x, const float* k_c, const float* mean_b,
                    const float* k_g_b, const float* k_x_b, const float* k_c_b, void* dx, void* dxb);

// The statistics pass alone: per-split Welford partials of x into ws[3][splits][C] (a float32 workspace of
// 3 * splits * C elements, splits from fr::reduce_splits, fr_math.h), for stats_finalize.
void stats_partials(const Launch& L, const void* x, float* ws, std::int64_t ws_numel, int splits);

// Forward finalize (one launch): per channel mean, biased var (from the partials ws[3][splits][C], or read from
// mean / var when ws is null), scale = weight * invstd, shift = bias (weight / bias null: 1 / 0), and, when
// running_mean is given, the running statistics (float32) updated with momentum, or with the factor
// 1 / *num_batches_tracked (int64 on the device) when that pointer is given. unbias = count / (count - 1).
struct StatsFinalizeArgs {
  const float* ws = nullptr;
  int splits = 0;
  float *mean = nullptr, *var = nullptr;
  const float *weight = nullptr, *bias = nullptr;
  float eps = 0.f;
  float *scale = nullptr, *shift = nullptr;
  float *running_mean = nullptr, *running_var = nullptr;
  const std::int64_t* num_batches_tracked = nullptr;
  float momentum = 0.f, unbias = 1.f;
  std::int64_t* increment = nullptr;  // a num_batches_tracked to add one to (never also read for the factor)
};
void stats_finalize(const Launch& L, const StatsFinalizeArgs& a);

// stats_partials and stats_finalize (with partials) in one launch: the statistics kernels write their partials
// into ws, and the last block to finish each channel tile (an atomic ticket in sem) merges that tile's partials
// exactly as stats_finalize does (same order, same bits) and writes the outputs of f: mean and var (required),
// scale and shift (null: not written), the running statistics, f.increment (+1 by one thread). f.ws and
// f.splits are taken from ws and splits. sem: as backward_reduce_finalize (>= C zeroed uint32 counters, zero
// again when the launch completes).
void stats_reduce_finalize(const Launch& L, const void* x, float* ws, std::int64_t ws_numel, int splits,
                           const StatsFinalizeArgs& f, unsigned* sem, std::int64_t sem_numel);

// The reduction pass of backward_reduce alone (its first launch): partials into ws[(xb ? 3 : 2)][splits][C].
void backward_partials(const Launch& L, const void* dy, const void* x, const float* scale, const float* shift,
                       const float* mean, const void* res, const void* xb, const float* scale_b,
                       const float* shift_b, const float* mean_b, bool relu, void* grad_res, float* ws,
                       std::int64_t ws_numel, int splits);

// Backward finalize (one launch): the partial sums into each side's outputs (fr_finalize.h side_grads; modes
// fr::SideMode). out_* entries may be null (not written).
struct BwdFinalizeArgs {
  const float* ws = nullptr;
  int splits = 0;
  int mode_a = 1, mode_b = 0;
  bool training = true;
  float count = 0.f;
  const float *scale = nullptr, *var = nullptr;
  float eps = 0.f;
  const float *scale_b = nullptr, *var_b = nullptr;
  float eps_b = 0.f;
  float* out_a[4] = {nullptr, nullptr, nullptr, nullptr};
  float* out_b[4] = {nullptr, nullptr, nullptr, nullptr};
};
void backward_finalize(const Launch& L, const BwdFinalizeArgs& a);

// backward_partials and backward_finalize in one launch: the reduction kernels write their partials into ws,
// and the last block to finish each channel tile (an atomic ticket in sem) folds that tile's partials exactly
// as backward_finalize does (same order, same bits) and writes the outputs of f. f.ws, f.splits, f.scale and
// f.scale_b are taken from ws, splits, scale and scale_b; f.mode_b must be set exactly when xb is given.
// sem: uint32 counters, at least C of them, all zero; they are zero again when the launch completes
// (self-cleaning), so one buffer serves every launch that is stream-ordered after it — not two launches that
// may run concurrently (fusedres/cuda.py keeps one per device and stream).
void backward_reduce_finalize(const Launch& L, const void* dy, const void* x, const float* scale,
                              const float* shift, const float* mean, const void* res, const void* xb,
                              const float* scale_b, const float* shift_b, const float* mean_b, bool relu,
                              void* grad_res, float* ws, std::int64_t ws_numel, int splits,
                              const BwdFinalizeArgs& f, unsigned* sem, std::int64_t sem_numel);

// Build facts for fusedres.cuda (compiled architectures, CUDA runtime version).
const char* build_info();

// Empty when the compiled kernels can run on `device`, else why not (e.g. no image for its architecture).
std::string device_unsupported(int device);

}  // namespace fr
