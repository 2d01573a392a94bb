// host_harness.cpp — fusedres._C_host: the CUDA kernels' per-thread code run on the CPU (host compiler only).
//
// The kernels in bn_act_forward.cu / bn_act_backward.cu are thin shells around fr_math.h (index arithmetic,
// launch planning, Welford/Chan, per-element BN math) and fr_bodies.h (what a thread does per vector). This
// module runs those same templates with T = float, emulating each kernel's grid and block: every thread's
// loop, the block tree over threadIdx.y in the kernels' order, the partials workspace, the finalize kernel.
// tests/test_cuda_host.py compares the results with numpy / fusedres.reference, so a broken index formula,
// vector tail, split partition or combine fails CI without a GPU.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "fr_bodies.h"
#include "fr_finalize.h"
#include "fr_math.h"

namespace py = pybind11;
using fr::i64;
using F32 = py::array_t<float, py::array::c_style | py::array::forcecast>;
using OptF32 = std::optional<F32>;

namespace {

const float* data(const F32& a) { return a.data(); }
const float* data(const OptF32& a) { return a ? a->data() : nullptr; }

F32 nan_array(i64 n) {
  F32 out(static_cast<py::ssize_t>(n));
  float* p = out.mutable_data();
  for (i64 i = 0; i < n; ++i) p[i] = std::numeric_limits<float>::quiet_NaN();
  return out;
}

struct Shape {
  i64 n, hw;
  int c;
  bool cl;
  i64 numel() const { return n * c * hw; }
};

void check_size(const F32& a, i64 want, const char* name) {
  if (a.size() != want) throw std::invalid_argument(std::string(name) + " has the wrong number of elements");
}

// Emulates the tree of block_reduce_y / block_sum_y: vals[ty*bx + tx], reduced over ty for every tx; the
// result of column tx lands in vals[tx]. Within a level the pairs are disjoint, so sequential == parallel.
template <class S, class Combine>
void tree_y(std::vector<S>& vals, int bx, int by, Combine combine) {
  for (int s = fr::tree_start(by); s > 0; s >>= 1)
    for (int ty = 0; ty < s && ty + s < by; ++ty)
      for (int tx = 0; tx < bx; ++tx) vals[ty * bx + tx] = combine(vals[ty * bx + tx], vals[(ty + s) * bx + tx]);
}

// ------------------------------------------------------------------------------------------------ statistics

// Emulates stats_rows_kernel / stats_channels_kernel + the merge of stats_params_kernel.
template <int V>
void stats_partials(const float* x, const Shape& s, bool vec_path, int splits, std::vector<float>& ws,
                    bool planes = false) {
  const int C = s.c;
  constexpr int kB = fr::kBlock;
  if (s.cl) {
    const i64 M = s.n * s.hw;
    if (vec_path) {
      const fr::RowPlan p = fr::row_plan(C, V, splits);
      for (int gyi = 0; gyi < p.gy; ++gyi) {
        for (int gxi = 0; gxi < p.gx; ++gxi) {
          std::vector<fr::StatsBody<float, V>> t;
          t.reserve(p.bx * p.by);
          for (int ty = 0; ty < p.by; ++ty) {
            for (int tx = 0; tx < p.bx; ++tx) {
              t.emplace_back(x);
              fr::rows_thread<V>(M, C, static_cast<i64>(gyi) * p.by + ty, static_cast<i64>(p.gy) * p.by,
                                 gxi * p.bx + tx, t.back());
            }
          }
          for (int j = 0; j < V; ++j) {
            std::vector<fr::Welford> w(t.size());
            for (size_t i = 0; i < t.size(); ++i) w[i] = t[i].lane(j);
            tree_y(w, p.bx, p.by, fr::welford_combine);
            for (int tx = 0; tx < p.bx; ++tx) {
              const int cv = gxi * p.bx + tx;
              if (cv * V >= C) continue;
              const int c = cv * V + j;
              ws[fr::ws_index(0, gyi, c, splits, C)] = w[tx].n;
              ws[fr::ws_index(1, gyi, c, splits, C)] = w[tx].mean;
              ws[fr::ws_index(2, gyi, c, splits, C)] = w[tx].m2;
            }
          }
        }
      }
    } else {
      stats_partials<1>(x, s, true, splits, ws);
    }
    return;
  }
  if (!vec_path) {
    stats_partials<1>(x, s, true, splits, ws);
    return;
  }
  for (int c = 0; c < C; ++c) {
    for (int gyi = 0; gyi < splits; ++gyi) {
      std::vector<fr::Welford> w;
      w.reserve(kB);
      for (int ty = 0; ty < kB; ++ty) {
        fr::StatsBody<float, V> b(x);
        const i64 v0 = static_cast<i64>(gyi) * kB + ty, vs = static_cast<i64>(splits) * kB;
        if (planes) {
          fr::plane_thread<V>(s.n, s.hw, C, c, v0, vs, b);
        } else {
          fr::channel_thread<V>(s.n, s.hw, C, c, v0, vs, b);
        }
        w.push_back(b.merged());
      }
      tree_y(w, 1, kB, fr::welford_combine);
      ws[fr::ws_index(0, gyi, c, splits, C)] = w[0].n;
      ws[fr::ws_index(1, gyi, c, splits, C)] = w[0].mean;
      ws[fr::ws_index(2, gyi, c, splits, C)] = w[0].m2;
    }
  }
}

// The statistics kernels' partials ws[3][splits][C] as stats_partials launches them; `v` is the vector width
// of the kernel chosen (1 for the scalar paths).
struct StatsPartials {
  std::vector<float> ws;
  int splits, v;
};

StatsPartials stats_ws(const F32& x, const Shape& s, int vec, bool aligned, int sm_count) {
  check_size(x, s.numel(), "x");
  const int c = s.c;
  const int splits = fr::reduce_splits(s.n, c, s.hw, s.cl, 16 / vec, sm_count);
  const fr::Reduce kind = fr::choose_reduce(s.cl, aligned, c, s.hw, vec);
  const bool planes = kind == fr::Reduce::kChannelsPlanes;
  const bool vp = kind == fr::Reduce::kRowsVec || kind == fr::Reduce::kChannelsVec || planes;
  StatsPartials r{std::vector<float>(3 * static_cast<size_t>(splits) * c, std::numeric_limits<float>::quiet_NaN()),
                  splits, vp ? vec : 1};
  switch (r.v) {
    case 1: stats_partials<1>(data(x), s, true, splits, r.ws); break;
    case 4: stats_partials<4>(data(x), s, true, splits, r.ws, planes); break;
    case 8: stats_partials<8>(data(x), s, true, splits, r.ws, planes); break;
    default: throw std::invalid_argument("vec must be 1, 4 or 8");
  }
  return r;
}

std::tuple<F32, F32, int> stats(const F32& x, i64 n, int c, i64 hw, bool cl, int vec, bool aligned, int sm_count) {
  const Shape s{n, hw, c, cl};
  StatsPartials r = stats_ws(x, s, vec, aligned, sm_count);
  const int splits = r.splits;
  std::vector<float>& ws = r.ws;
  // stats_params_kernel's merge: block (kFinalBx, kFinalBy) per 32 channels.
  F32 mean = nan_array(c), var = nan_array(c);
  for (int c0 = 0; c0 < c; c0 += fr::kFinalBx) {
    std::vector<fr::Welford> w(fr::kFinalBx * fr::kFinalBy, fr::Welford{0.f, 0.f, 0.f});
    for (int ty = 0; ty < fr::kFinalBy; ++ty)
      for (int tx = 0; tx < fr::kFinalBx; ++tx)
        if (c0 + tx < c) w[ty * fr::kFinalBx + tx] = fr::welford_partials(ws.data(), splits, c, c0 + tx, ty, fr::kFinalBy);
    tree_y(w, fr::kFinalBx, fr::kFinalBy, fr::welford_combine);
    for (int tx = 0; tx < fr::kFinalBx && c0 + tx < c; ++tx) {
      mean.mutable_data()[c0 + tx] = w[tx].mean;
      var.mutable_data()[c0 + tx] = w[tx].m2 / w[tx].n;
    }
  }
  return {mean, var, splits};
}

// Emulates the forward fold_finish (fr_cuda.cuh, StatsFinalizeArgs overload) in a block of bx threads per row
// (>= kFinalBy rows, the first kFinalBy take part): chunk k, thread (tx, ty) merges channel c_lo + k*bx + tx's
// splits ty, ty + kFinalBy, ... (welford_partials<true>), the tree folds the kFinalBy rows, then
// stats_finish_channel (fr_finalize.h) with the biased variance m2 / n.
void fold_finish_stats(const fr::StatsFinalizeArgs& a, const float* ws, int C, int c_lo, int chunks, int bx) {
  for (int k = 0; k < chunks; ++k) {
    std::vector<fr::Welford> w(static_cast<size_t>(bx) * fr::kFinalBy, fr::Welford{0.f, 0.f, 0.f});
    for (int ty = 0; ty < fr::kFinalBy; ++ty)
      for (int tx = 0; tx < bx; ++tx) {
        const int c = c_lo + k * bx + tx;
        if (c < C) w[ty * bx + tx] = fr::welford_partials<true>(ws, a.splits, C, c, ty, fr::kFinalBy);
      }
    tree_y(w, bx, fr::kFinalBy, fr::welford_combine);
    for (int tx = 0; tx < bx; ++tx) {
      const int c = c_lo + k * bx + tx;
      if (c < C) fr::stats_finish_channel(a, c, w[tx].mean, w[tx].m2 / w[tx].n, true);
    }
  }
}

// Emulates stats_reduce_finalize: the statistics kernels, then, for every grid column, its last block's
// fold_finish with that kernel's block shape (rows: bx channel vectors of V channels, V chunks; NCHW: one
// channel per block, bx = 1), and the one increment. Returns (mean, var, scale, shift, running_mean | None,
// running_var | None, num_batches_tracked + increments | None, splits).
py::tuple stats_reduce_finalize(const F32& x, i64 n, int c, i64 hw, bool cl, int vec, bool aligned, int sm_count,
                                const OptF32& weight, const OptF32& bias, float eps, const OptF32& running_mean,
                                const OptF32& running_var, std::optional<std::int64_t> nbt, float momentum,
                                float unbias, bool increment) {
  const Shape s{n, hw, c, cl};
  StatsPartials r = stats_ws(x, s, vec, aligned, sm_count);
  F32 mean = nan_array(c), var = nan_array(c), scale = nan_array(c), shift = nan_array(c);
  std::optional<F32> rm, rv;
  if (running_mean) {
    rm = F32(static_cast<py::ssize_t>(c), running_mean->data());
    rv = F32(static_cast<py::ssize_t>(c), running_var->data());
  }
  std::int64_t counter = nbt ? *nbt : 0;
  fr::StatsFinalizeArgs a;
  a.ws = r.ws.data();
  a.splits = r.splits;
  a.mean = mean.mutable_data();
  a.var = var.mutable_data();
  a.weight = data(weight);
  a.bias = data(bias);
  a.eps = eps;
  a.scale = scale.mutable_data();
  a.shift = shift.mutable_data();
  a.running_mean = rm ? rm->mutable_data() : nullptr;
  a.running_var = rv ? rv->mutable_data() : nullptr;
  a.num_batches_tracked = nbt && !increment ? &counter : nullptr;
  a.momentum = momentum;
  a.unbias = unbias;
  a.increment = increment ? &counter : nullptr;
  auto column = [&](int c_lo, int chunks, int bx, bool first) {
    if (first && a.increment) *a.increment += 1;  // stats_increment: the last block of column 0, thread (0, 0)
    fold_finish_stats(a, r.ws.data(), c, c_lo, chunks, bx);
  };
  if (cl) {
    const fr::RowPlan p = fr::row_plan(c, r.v, r.splits);
    for (int gxi = 0; gxi < p.gx; ++gxi) column(gxi * p.bx * r.v, r.v, p.bx, gxi == 0);
  } else {
    for (int ci = 0; ci < c; ++ci) column(ci, 1, 1, ci == 0);
  }
  py::object prm = rm ? py::object(*rm) : py::object(py::none());
  py::object prv = rv ? py::object(*rv) : py::object(py::none());
  py::object pn = nbt ? py::object(py::int_(counter)) : py::object(py::none());
  return py::make_tuple(mean, var, scale, shift, prm, prv, pn, r.splits);
}

// ------------------------------------------------------------------------------------------------ elementwise

// Emulates the grid of an elementwise launch (apply_* / bwd_apply_* kernels) with body type B<V[, U]>.
template <class MakeRows, class MakeFlatU, class MakeFlatL, class MakeFlat1>
void run_elementwise(const Shape& s, int vec, bool aligned, int sm_count, MakeRows rows, MakeFlatU flat_u,
                     MakeFlatL flat_l, MakeFlat1 flat_1) {
  const i64 E = s.numel();
  const i64 inner = s.cl ? 1 : s.hw;
  switch (fr::choose_elementwise(s.cl, aligned, s.c, s.hw, vec)) {
    case fr::Elementwise::kRows: {
      const i64 M = s.n * s.hw;
      const fr::RowPlan p = fr::row_plan(s.c, vec, fr::apply_row_splits(M, s.c, vec, sm_count));
      for (int gyi = 0; gyi < p.gy; ++gyi)
        for (int gxi = 0; gxi < p.gx; ++gxi)
          for (int ty = 0; ty < p.by; ++ty)
            for (int tx = 0; tx < p.bx; ++tx)
              rows(M, static_cast<i64>(gyi) * p.by + ty, static_cast<i64>(p.gy) * p.by, gxi * p.bx + tx);
      break;
    }
    case fr::Elementwise::kFlatUniform:
    case fr::Elementwise::kFlatLanes: {
      const bool uniform = fr::choose_elementwise(s.cl, aligned, s.c, s.hw, vec) == fr::Elementwise::kFlatUniform;
      const i64 nt = fr::flat_blocks(E, vec, sm_count) * fr::kBlock;
      for (i64 t = 0; t < nt; ++t) uniform ? flat_u(E, inner, t, nt) : flat_l(E, inner, t, nt);
      break;
    }
    case fr::Elementwise::kFlatScalar: {
      const i64 nt = fr::flat_blocks(E, 1, sm_count) * fr::kBlock;
      for (i64 t = 0; t < nt; ++t) flat_1(E, inner, t, nt);
      break;
    }
  }
}

template <int V, bool XB>
void apply_v(const fr::FwdArgs<float>& a, const Shape& s, bool aligned, int sm_count) {
  run_elementwise(
      s, V, aligned, sm_count,
      [&](i64 M, i64 r0, i64 rs, int cv) {
        fr::ApplyBody<float, V, false, XB> b(a, 1, s.c);
        fr::rows_thread<V>(M, s.c, r0, rs, cv, b);
      },
      [&](i64 E, i64 inner, i64 t, i64 nt) {
        fr::ApplyBody<float, V, true, XB> b(a, inner, s.c);
        fr::flat_thread<V>(E, inner, s.c, t, nt, b);
      },
      [&](i64 E, i64 inner, i64 t, i64 nt) {
        fr::ApplyBody<float, V, false, XB> b(a, inner, s.c);
        fr::flat_thread<V>(E, inner, s.c, t, nt, b);
      },
      [&](i64 E, i64 inner, i64 t, i64 nt) {
        fr::ApplyBody<float, 1, false, XB> b(a, inner, s.c);
        fr::flat_thread<1>(E, inner, s.c, t, nt, b);
      });
}

template <int V>
void apply_vx(const fr::FwdArgs<float>& a, const Shape& s, bool aligned, int sm_count) {
  if (a.xb) apply_v<V, true>(a, s, aligned, sm_count);
  else apply_v<V, false>(a, s, aligned, sm_count);
}

F32 apply(const F32& x, const F32& mean, const F32& scale, const F32& shift, const OptF32& res, const OptF32& xb,
          const OptF32& mean_b, const OptF32& scale_b, const OptF32& shift_b, bool relu, i64 n, int c, i64 hw,
          bool cl, int vec, bool aligned, int sm_count) {
  const Shape s{n, hw, c, cl};
  check_size(x, s.numel(), "x");
  F32 y = nan_array(s.numel());
  const fr::FwdArgs<float> a{data(x),      data(res),     data(xb),      data(mean),      data(scale), data(shift),
                             data(mean_b), data(scale_b), data(shift_b), y.mutable_data(), relu};
  switch (vec) {
    case 1: apply_vx<1>(a, s, aligned, sm_count); break;
    case 4: apply_vx<4>(a, s, aligned, sm_count); break;
    case 8: apply_vx<8>(a, s, aligned, sm_count); break;
    default: throw std::invalid_argument("vec must be 1, 4 or 8");
  }
  return y;
}

// ------------------------------------------------------------------------------------------------ backward

template <int V, int Q>
void bwd_partials(const fr::BwdArgs<float>& a, const Shape& s, int splits, std::vector<float>& ws, bool planes) {
  const int C = s.c;
  constexpr int kB = fr::kBlock;
  auto sum3 = [](std::array<float, 3> u, std::array<float, 3> w) {
    return std::array<float, 3>{u[0] + w[0], u[1] + w[1], u[2] + w[2]};
  };
  if (s.cl) {
    const i64 M = s.n * s.hw;
    const fr::RowPlan p = fr::row_plan(C, V, splits);
    for (int gyi = 0; gyi < p.gy; ++gyi) {
      for (int gxi = 0; gxi < p.gx; ++gxi) {
        std::vector<fr::BwdReduceBody<float, V, Q == 3>> t;
        t.reserve(p.bx * p.by);
        for (int ty = 0; ty < p.by; ++ty) {
          for (int tx = 0; tx < p.bx; ++tx) {
            t.emplace_back(a);
            fr::rows_thread<V>(M, C, static_cast<i64>(gyi) * p.by + ty, static_cast<i64>(p.gy) * p.by,
                               gxi * p.bx + tx, t.back());
          }
        }
        for (int j = 0; j < V; ++j) {
          std::vector<std::array<float, 3>> v(t.size());
          for (size_t i = 0; i < t.size(); ++i) v[i] = {t[i].sg[j], t[i].sgx[j], Q == 3 ? t[i].sgxb[j] : 0.f};
          tree_y(v, p.bx, p.by, sum3);
          for (int tx = 0; tx < p.bx; ++tx) {
            const int cv = gxi * p.bx + tx;
            if (cv * V >= C) continue;
            for (int q = 0; q < Q; ++q) ws[fr::ws_index(q, gyi, cv * V + j, splits, C)] = v[tx][q];
          }
        }
      }
    }
    return;
  }
  for (int c = 0; c < C; ++c) {
    for (int gyi = 0; gyi < splits; ++gyi) {
      std::vector<std::array<float, 3>> v;
      v.reserve(kB);
      for (int ty = 0; ty < kB; ++ty) {
        fr::BwdReduceBody<float, V, Q == 3> b(a);
        const i64 v0 = static_cast<i64>(gyi) * kB + ty, vs = static_cast<i64>(splits) * kB;
        if (planes) {
          fr::plane_thread<V>(s.n, s.hw, C, c, v0, vs, b);
        } else {
          fr::channel_thread<V>(s.n, s.hw, C, c, v0, vs, b);
        }
        std::array<float, 3> u{0.f, 0.f, 0.f};
        for (int j = 0; j < V; ++j) {
          u[0] = u[0] + b.sg[j];
          u[1] = u[1] + b.sgx[j];
          if (Q == 3) u[2] = u[2] + b.sgxb[j];
        }
        v.push_back(u);
      }
      tree_y(v, 1, kB, sum3);
      for (int q = 0; q < Q; ++q) ws[fr::ws_index(q, gyi, c, splits, C)] = v[0][q];
    }
  }
}

template <int V>
void bwd_partials_q(const fr::BwdArgs<float>& a, const Shape& s, int splits, std::vector<float>& ws, bool planes) {
  if (a.xb) bwd_partials<V, 3>(a, s, splits, ws, planes);
  else bwd_partials<V, 2>(a, s, splits, ws, planes);
}

// The reduction pass (bwd_reduce_*_kernel): partials ws[Q][splits][C] and grad_res.
struct Partials {
  std::vector<float> ws;
  int q = 2, splits = 1;
  fr::RowPlan plan{};  // the row kernel's grid (channels_last)
  std::optional<F32> grad_res;
};

Partials reduce_partials(const F32& dy, const F32& x, const F32& scale, const F32& shift, const F32& mean,
                         const OptF32& res, const OptF32& xb, const OptF32& scale_b, const OptF32& shift_b,
                         const OptF32& mean_b, bool relu, bool want_grad_res, const Shape& s, int vec, bool aligned,
                         int sm_count) {
  check_size(x, s.numel(), "x");
  check_size(dy, s.numel(), "dy");
  Partials r;
  if (want_grad_res) r.grad_res = nan_array(s.numel());
  fr::BwdArgs<float> a{};
  a.dy = data(dy);
  a.x = data(x);
  a.res = data(res);
  a.xb = data(xb);
  a.scale = data(scale);
  a.shift = data(shift);
  a.mean = data(mean);
  a.scale_b = data(scale_b);
  a.shift_b = data(shift_b);
  a.mean_b = data(mean_b);
  a.grad_res = r.grad_res ? r.grad_res->mutable_data() : nullptr;
  a.relu = relu;
  r.q = xb ? 3 : 2;
  r.splits = fr::reduce_splits(s.n, s.c, s.hw, s.cl, 16 / vec, sm_count);
  const fr::Reduce kind = fr::choose_reduce(s.cl, aligned, s.c, s.hw, vec);
  const bool planes = kind == fr::Reduce::kChannelsPlanes;
  const bool vp = kind == fr::Reduce::kRowsVec || kind == fr::Reduce::kChannelsVec || planes;
  r.ws.assign(static_cast<size_t>(r.q) * r.splits * s.c, std::numeric_limits<float>::quiet_NaN());
  const int v = vp ? vec : 1;
  if (s.cl) r.plan = fr::row_plan(s.c, v, r.splits);
  switch (v) {
    case 1: bwd_partials_q<1>(a, s, r.splits, r.ws, false); break;
    case 4: bwd_partials_q<4>(a, s, r.splits, r.ws, planes); break;
    case 8: bwd_partials_q<8>(a, s, r.splits, r.ws, planes); break;
    default: throw std::invalid_argument("vec must be 1, 4 or 8");
  }
  return r;
}

py::tuple backward_reduce(const F32& dy, const F32& x, const F32& scale, const F32& shift, const F32& mean,
                          const OptF32& res, const OptF32& xb, const OptF32& scale_b, const OptF32& shift_b,
                          const OptF32& mean_b, bool relu, bool want_grad_res, i64 n, int c, i64 hw, bool cl,
                          int vec, bool aligned, int sm_count) {
  const Shape s{n, hw, c, cl};
  const Partials r = reduce_partials(dy, x, scale, shift, mean, res, xb, scale_b, shift_b, mean_b, relu,
                                     want_grad_res, s, vec, aligned, sm_count);
  const int Q = r.q, splits = r.splits;
  const std::vector<float>& ws = r.ws;
  // sums_finalize_kernel
  std::vector<F32> out;
  for (int q = 0; q < Q; ++q) out.push_back(nan_array(c));
  for (int c0 = 0; c0 < c; c0 += fr::kFinalBx) {
    std::vector<std::array<float, 3>> v(fr::kFinalBx * fr::kFinalBy, std::array<float, 3>{0.f, 0.f, 0.f});
    for (int ty = 0; ty < fr::kFinalBy; ++ty)
      for (int tx = 0; tx < fr::kFinalBx; ++tx)
        if (c0 + tx < c)
          for (int q = 0; q < Q; ++q)
            v[ty * fr::kFinalBx + tx][q] = fr::sum_partials(ws.data(), q, splits, c, c0 + tx, ty, fr::kFinalBy);
    tree_y(v, fr::kFinalBx, fr::kFinalBy, [](std::array<float, 3> u, std::array<float, 3> w) {
      return std::array<float, 3>{u[0] + w[0], u[1] + w[1], u[2] + w[2]};
    });
    for (int tx = 0; tx < fr::kFinalBx && c0 + tx < c; ++tx)
      for (int q = 0; q < Q; ++q) out[q].mutable_data()[c0 + tx] = v[tx][q];
  }
  py::object third = Q == 3 ? py::object(out[2]) : py::object(py::none());
  py::object gr = r.grad_res ? py::object(*r.grad_res) : py::object(py::none());
  return py::make_tuple(out[0], out[1], third, gr, splits);
}

// Emulates fold_finish (fr_cuda.cuh) in a block of bx threads per row (and >= kFinalBy rows, of which the first
// kFinalBy take part): chunk k, thread (tx, ty) sums channel c_lo + k*bx + tx's splits ty, ty + kFinalBy, ...,
// the tree folds the kFinalBy rows, bwd_finish_channel writes the outputs. sums[q][c] records the folded sums.
template <int Q>
void fold_finish(const fr::BwdFinalizeArgs& a, const float* ws, int C, int c_lo, int chunks, int bx,
                 std::vector<F32>& sums) {
  for (int k = 0; k < chunks; ++k) {
    std::vector<std::array<float, 3>> v(static_cast<size_t>(bx) * fr::kFinalBy, std::array<float, 3>{0.f, 0.f, 0.f});
    for (int ty = 0; ty < fr::kFinalBy; ++ty)
      for (int tx = 0; tx < bx; ++tx) {
        const int c = c_lo + k * bx + tx;
        if (c < C)
          for (int q = 0; q < Q; ++q)
            v[ty * bx + tx][q] = fr::sum_partials<true>(ws, q, a.splits, C, c, ty, fr::kFinalBy);
      }
    tree_y(v, bx, fr::kFinalBy, [](std::array<float, 3> u, std::array<float, 3> w) {
      return std::array<float, 3>{u[0] + w[0], u[1] + w[1], u[2] + w[2]};
    });
    for (int tx = 0; tx < bx; ++tx) {
      const int c = c_lo + k * bx + tx;
      if (c >= C) continue;
      float vv[Q];
      for (int q = 0; q < Q; ++q) vv[q] = sums[q].mutable_data()[c] = v[tx][q];
      fr::bwd_finish_channel<Q>(a, c, vv);
    }
  }
}

// Emulates backward_reduce_finalize: the reduction kernels, then, for every grid column, its last block's
// fold_finish with that kernel's block shape (rows: bx channel vectors of V channels per block, V chunks;
// NCHW: one channel per block, bx = 1). Outputs: per side [4, C] (NaN where the mode writes nothing), the
// folded sums [Q][C], grad_res, splits.
py::tuple backward_reduce_finalize(const F32& dy, const F32& x, const F32& scale, const F32& shift, const F32& mean,
                                   const OptF32& res, const OptF32& xb, const OptF32& scale_b, const OptF32& shift_b,
                                   const OptF32& mean_b, bool relu, bool want_grad_res, i64 n, int c, i64 hw,
                                   bool cl, int vec, bool aligned, int sm_count, int mode_a, int mode_b,
                                   bool training, const OptF32& var, float eps, const OptF32& var_b, float eps_b) {
  const Shape s{n, hw, c, cl};
  const Partials r = reduce_partials(dy, x, scale, shift, mean, res, xb, scale_b, shift_b, mean_b, relu,
                                     want_grad_res, s, vec, aligned, sm_count);
  if ((mode_b != fr::kSideNone) != (r.q == 3)) throw std::invalid_argument("mode_b must be set exactly with xb");
  static const std::vector<int> written[4] = {{}, {0, 1, 2, 3}, {0, 1, 2}, {1}};  // fusedres.cuda._SIDE_OUTPUTS
  py::array_t<float> out_a({static_cast<py::ssize_t>(4), static_cast<py::ssize_t>(c)});
  py::array_t<float> out_b({static_cast<py::ssize_t>(4), static_cast<py::ssize_t>(c)});
  for (auto* o : {&out_a, &out_b}) {
    float* p = o->mutable_data();
    for (i64 i = 0; i < 4 * static_cast<i64>(c); ++i) p[i] = std::numeric_limits<float>::quiet_NaN();
  }
  fr::BwdFinalizeArgs a;
  a.ws = r.ws.data();
  a.splits = r.splits;
  a.mode_a = mode_a;
  a.mode_b = mode_b;
  a.training = training;
  a.count = static_cast<float>(n * hw);
  a.scale = data(scale);
  a.var = data(var);
  a.eps = eps;
  a.scale_b = data(scale_b);
  a.var_b = data(var_b);
  a.eps_b = eps_b;
  for (int i : written[mode_a]) a.out_a[i] = out_a.mutable_data() + static_cast<i64>(i) * c;
  for (int i : written[mode_b]) a.out_b[i] = out_b.mutable_data() + static_cast<i64>(i) * c;
  std::vector<F32> sums;
  for (int q = 0; q < r.q; ++q) sums.push_back(nan_array(c));
  auto column = [&](int c_lo, int chunks, int bx) {
    if (r.q == 3) fold_finish<3>(a, r.ws.data(), c, c_lo, chunks, bx, sums);
    else fold_finish<2>(a, r.ws.data(), c, c_lo, chunks, bx, sums);
  };
  if (cl) {
    for (int gxi = 0; gxi < r.plan.gx; ++gxi) column(gxi * r.plan.bx * r.plan.vec, r.plan.vec, r.plan.bx);
  } else {
    for (int ci = 0; ci < c; ++ci) column(ci, 1, 1);
  }
  py::list sl;
  for (auto& t : sums) sl.append(t);
  py::object ob = mode_b != fr::kSideNone ? py::object(out_b) : py::object(py::none());
  py::object gr = r.grad_res ? py::object(*r.grad_res) : py::object(py::none());
  return py::make_tuple(out_a, ob, sl, gr, r.splits);
}

template <int V, bool XB>
void bwd_apply_v(const fr::BwdArgs<float>& a, const Shape& s, bool aligned, int sm_count) {
  constexpr bool KT = XB && V > 1;  // as bwd_apply_rows_kernel: coefficients from the block's table
  run_elementwise(
      s, V, aligned, sm_count,
      [&](i64 M, i64 r0, i64 rs, int cv) {
        fr::BwdApplyBody<float, V, false, XB, KT> b(a, 1, s.c);
        std::vector<float> tab;
        if (KT) {
          const fr::RowPlan p = fr::row_plan(s.c, V, 1);
          const int gxi = cv / p.bx, tx = cv - gxi * p.bx;
          tab.assign(6 * V * p.bx, std::numeric_limits<float>::quiet_NaN());
          fr::fill_coef_table<float, V>(a, s.c, gxi * p.bx * V, p.bx, tab.data(), 0, 1);
          b.kt = tab.data() + tx;
          b.kts = p.bx;
        }
        fr::rows_thread<V>(M, s.c, r0, rs, cv, b);
      },
      [&](i64 E, i64 inner, i64 t, i64 nt) {
        fr::BwdApplyBody<float, V, true, XB> b(a, inner, s.c);
        fr::flat_thread<V>(E, inner, s.c, t, nt, b);
      },
      [&](i64 E, i64 inner, i64 t, i64 nt) {
        fr::BwdApplyBody<float, V, false, XB> b(a, inner, s.c);
        fr::flat_thread<V>(E, inner, s.c, t, nt, b);
      },
      [&](i64 E, i64 inner, i64 t, i64 nt) {
        fr::BwdApplyBody<float, 1, false, XB> b(a, inner, s.c);
        fr::flat_thread<1>(E, inner, s.c, t, nt, b);
      });
}

template <int V>
void bwd_apply_vx(const fr::BwdArgs<float>& a, const Shape& s, bool aligned, int sm_count) {
  if (a.xb) bwd_apply_v<V, true>(a, s, aligned, sm_count);
  else bwd_apply_v<V, false>(a, s, aligned, sm_count);
}

py::tuple backward_apply(const F32& dy, const F32& x, const F32& scale, const F32& shift, const OptF32& res,
                         const OptF32& xb, const OptF32& scale_b, const OptF32& shift_b, bool relu, const F32& mean,
                         const F32& k_g, const OptF32& k_x, const OptF32& k_c, const OptF32& mean_b,
                         const OptF32& k_g_b,
                         const OptF32& k_x_b, const OptF32& k_c_b, i64 n, int c, i64 hw, bool cl, int vec,
                         bool aligned, int sm_count) {
  const Shape s{n, hw, c, cl};
  check_size(x, s.numel(), "x");
  F32 dx = nan_array(s.numel());
  std::optional<F32> dxb;
  if (xb) dxb = nan_array(s.numel());
  fr::BwdArgs<float> a{};
  a.dy = data(dy);
  a.x = data(x);
  a.res = data(res);
  a.xb = data(xb);
  a.scale = data(scale);
  a.shift = data(shift);
  a.scale_b = data(scale_b);
  a.shift_b = data(shift_b);
  a.mean = data(mean);
  a.k_g = data(k_g);
  a.k_x = data(k_x);
  a.k_c = data(k_c);
  a.mean_b = data(mean_b);
  a.k_g_b = data(k_g_b);
  a.k_x_b = data(k_x_b);
  a.k_c_b = data(k_c_b);
  a.dx = dx.mutable_data();
  a.dxb = dxb ? dxb->mutable_data() : nullptr;
  a.relu = relu;
  switch (vec) {
    case 1: bwd_apply_vx<1>(a, s, aligned, sm_count); break;
    case 4: bwd_apply_vx<4>(a, s, aligned, sm_count); break;
    case 8: bwd_apply_vx<8>(a, s, aligned, sm_count); break;
    default: throw std::invalid_argument("vec must be 1, 4 or 8");
  }
  return py::make_tuple(dx, dxb ? py::object(*dxb) : py::object(py::none()));
}

// ------------------------------------------------------------------------------------------------ coverage

// Records, per element, how often a loop visits it and the channel the loop believes it has. U: the unroll
// of the loops (the kernels' bodies use 1, 2 or 4; the coverage tests try 1 to 4).
template <int U>
struct Recorder {
  static constexpr int kUnroll = U, kFlatUnroll = U;
  struct In {
    i64 off = -1;
    int j0 = 0, j1 = 0;
  };
  std::vector<int>* visits;
  std::vector<int>* chan;
  i64 inner;
  int C;
  bool uniform;  // flat kernels: lanes take the vector's channel (as ApplyBody<.., true>)
  int lanes = 1;
  int c0 = 0, lane_stride = 0;
  void setup(int c, int ls) {
    c0 = c;
    lane_stride = ls;
  }
  // the loads must come before their finish, each exactly once
  template <int NL>
  void load(In& in, i64 off) const {
    in.off = off;
    in.j0 = 0;
    in.j1 = NL;
  }
  void load_part(In& in, i64 off, int j0, int j1) const {
    in.off = off;
    in.j0 = j0;
    in.j1 = j1;
  }
  void visit(const In& in, i64 off, int j0, int j1, int c_of_lane0) {
    if (in.off != off || in.j0 > j0 || in.j1 < j1) throw std::logic_error("finish without its load");
    for (int j = j0; j < j1; ++j) {
      (*visits)[off + j] += 1;
      (*chan)[off + j] = c_of_lane0 + j * lane_stride;
    }
  }
  template <int NL>
  void finish(const In& in, i64 off) {
    visit(in, off, 0, NL, c0);
  }
  void finish_part(const In& in, i64 off, int j0, int j1) { visit(in, off, j0, j1, c0); }
  void run(i64 off) {
    const In in{off, 0, lanes};
    visit(in, off, 0, lanes, c0);
  }
  template <int NL>
  void finish_at(const In& in, i64 e, fr::ChanPos p) {
    if (in.off != e) throw std::logic_error("finish without its load");
    for (int j = 0; j < NL; ++j) {
      (*visits)[e + j] += 1;
      (*chan)[e + j] = p.c;
      if (!uniform || NL == 1) fr::chan_next(p, inner, C);
    }
  }
};

py::tuple to_arrays(const std::vector<int>& visits, const std::vector<int>& chan) {
  py::array_t<int> v(static_cast<py::ssize_t>(visits.size())), c(static_cast<py::ssize_t>(chan.size()));
  std::copy(visits.begin(), visits.end(), v.mutable_data());
  std::copy(chan.begin(), chan.end(), c.mutable_data());
  return py::make_tuple(v, c);
}

// Calls f(std::integral_constant<int, V>, std::integral_constant<int, U>) for run-time vec and unroll.
template <class F>
void with_vec_unroll(int vec, int unroll, F&& f) {
  auto u = [&](auto vt) {
    switch (unroll) {
      case 1: f(vt, std::integral_constant<int, 1>{}); break;
      case 2: f(vt, std::integral_constant<int, 2>{}); break;
      case 3: f(vt, std::integral_constant<int, 3>{}); break;
      case 4: f(vt, std::integral_constant<int, 4>{}); break;
      default: throw std::invalid_argument("unroll must be 1 to 4");
    }
  };
  switch (vec) {
    case 1: u(std::integral_constant<int, 1>{}); break;
    case 4: u(std::integral_constant<int, 4>{}); break;
    case 8: u(std::integral_constant<int, 8>{}); break;
    default: throw std::invalid_argument("vec must be 1, 4 or 8");
  }
}

// The flat loop's visits and lane channels for E elements, vector width vec, nthreads threads.
py::tuple flat_coverage(i64 E, i64 inner, int C, int vec, i64 nthreads, bool uniform, int unroll) {
  std::vector<int> visits(E, 0), chan(E, -1);
  with_vec_unroll(vec, unroll, [&](auto vt, auto ut) {
    Recorder<decltype(ut)::value> r{&visits, &chan, inner, C, uniform};
    for (i64 t = 0; t < nthreads; ++t) fr::flat_thread<decltype(vt)::value>(E, inner, C, t, nthreads, r);
  });
  return to_arrays(visits, chan);
}

// The row kernels' visits for x [M, C] with row splits gy.
py::tuple rows_coverage(i64 M, int C, int vec, int gy, int unroll) {
  std::vector<int> visits(M * C, 0), chan(M * C, -1);
  const fr::RowPlan p = fr::row_plan(C, vec, gy);
  with_vec_unroll(vec, unroll, [&](auto vt, auto ut) {
    Recorder<decltype(ut)::value> r{&visits, &chan, 1, C, false};
    r.lanes = vec;
    for (int gyi = 0; gyi < p.gy; ++gyi)
      for (int gxi = 0; gxi < p.gx; ++gxi)
        for (int ty = 0; ty < p.by; ++ty)
          for (int tx = 0; tx < p.bx; ++tx)
            fr::rows_thread<decltype(vt)::value>(M, C, static_cast<i64>(gyi) * p.by + ty,
                                                 static_cast<i64>(p.gy) * p.by, gxi * p.bx + tx, r);
  });
  return to_arrays(visits, chan);
}

// The channel kernels' visits for x [N, C, HW] with splits gy (planes: the plane path, V need not divide HW).
py::tuple channels_coverage(i64 N, i64 HW, int C, int vec, int gy, int unroll, bool planes) {
  std::vector<int> visits(N * C * HW, 0), chan(N * C * HW, -1);
  with_vec_unroll(vec, unroll, [&](auto vt, auto ut) {
    constexpr int VV = decltype(vt)::value;
    Recorder<decltype(ut)::value> r{&visits, &chan, HW, C, false};
    r.lanes = vec;
    for (int c = 0; c < C; ++c)
      for (int gyi = 0; gyi < gy; ++gyi)
        for (int ty = 0; ty < fr::kBlock; ++ty) {
          const i64 v0 = static_cast<i64>(gyi) * fr::kBlock + ty, vs = static_cast<i64>(gy) * fr::kBlock;
          if (planes) {
            fr::plane_thread<VV>(N, HW, C, c, v0, vs, r);
          } else {
            fr::channel_thread<VV>(N, HW, C, c, v0, vs, r);
          }
        }
  });
  return to_arrays(visits, chan);
}

// ------------------------------------------------------------------------------------------------ finalize

// stats_params_kernel after its merge (emulated by `stats`): per channel
// scale, shift and the running-statistics update. Optional vectors absent = null pointers, as in the kernel.
py::tuple stats_finalize(const F32& mean, const F32& var, const OptF32& weight, const OptF32& bias, float eps,
                         const OptF32& running_mean, const OptF32& running_var, std::optional<std::int64_t> nbt,
                         float momentum, float unbias) {
  const int c = static_cast<int>(mean.size());
  F32 scale = nan_array(c), shift = nan_array(c);
  std::optional<F32> rm, rv;
  if (running_mean) {
    rm = F32(static_cast<py::ssize_t>(c), running_mean->data());
    rv = F32(static_cast<py::ssize_t>(c), running_var->data());
  }
  for (int i = 0; i < c; ++i) {
    const fr::StatsOut o = fr::bn_finish(mean.data()[i], var.data()[i], eps, data(weight), data(bias), i);
    scale.mutable_data()[i] = o.scale;
    shift.mutable_data()[i] = o.shift;
    if (rm) {
      const float factor = nbt ? 1.f / static_cast<float>(*nbt) : momentum;
      fr::running_update(rm->mutable_data()[i], rv->mutable_data()[i], o.mean, o.var, unbias, factor);
    }
  }
  py::object prm = rm ? py::object(*rm) : py::object(py::none());
  py::object prv = rv ? py::object(*rv) : py::object(py::none());
  return py::make_tuple(scale, shift, prm, prv);
}

// bwd_finalize_kernel after its merge (sums_finalize_kernel's tree, emulated by `backward_reduce`): one side's
// four outputs per channel (NaN where the mode writes nothing).
py::array_t<float> side_grads(int mode, const F32& sum_g, const F32& sum_gx, const OptF32& scale, const OptF32& var,
                              float eps, float count, bool training) {
  const i64 c = sum_g.size();
  py::array_t<float> out({static_cast<py::ssize_t>(4), static_cast<py::ssize_t>(c)});
  auto o = out.mutable_unchecked<2>();
  for (i64 i = 0; i < c; ++i) {
    float v[4];
    for (float& x : v) x = std::numeric_limits<float>::quiet_NaN();
    fr::side_grads(mode, sum_g.data()[i], sum_gx.data()[i], fr::ldp0(data(scale), static_cast<int>(i)),
                   var ? var->data()[i] : 1.f, eps, count, training, v);
    for (int k = 0; k < 4; ++k) o(k, i) = v[k];
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(_C_host, m) {
  m.doc() = "CPU emulation of the fusedres CUDA kernels' shared per-thread code (tests only)";

  m.def("stats", &stats, py::arg("x"), py::arg("n"), py::arg("c"), py::arg("hw"), py::arg("channels_last"),
        py::arg("vec"), py::arg("aligned") = true, py::arg("sm_count") = 4,
        "batch_stats as the kernels compute it: (mean, biased var, splits).");
  m.def("stats_reduce_finalize", &stats_reduce_finalize, py::arg("x"), py::arg("n"), py::arg("c"), py::arg("hw"),
        py::arg("channels_last"), py::arg("vec"), py::arg("aligned") = true, py::arg("sm_count") = 4,
        py::arg("weight") = py::none(), py::arg("bias") = py::none(), py::arg("eps") = 1e-5f,
        py::arg("running_mean") = py::none(), py::arg("running_var") = py::none(),
        py::arg("num_batches_tracked") = py::none(), py::arg("momentum") = 0.1f, py::arg("unbias") = 1.f,
        py::arg("increment") = false,
        "the fused statistics + last-block finalize: (mean, var, scale, shift, running_mean | None, "
        "running_var | None, num_batches_tracked after | None, splits)");
  m.def("apply", &apply, py::arg("x"), py::arg("mean"), py::arg("scale"), py::arg("shift"), py::arg("res"),
        py::arg("xb"), py::arg("mean_b"), py::arg("scale_b"), py::arg("shift_b"), py::arg("relu"), py::arg("n"), py::arg("c"), py::arg("hw"),
        py::arg("channels_last"), py::arg("vec"), py::arg("aligned") = true, py::arg("sm_count") = 4);
  m.def("backward_reduce", &backward_reduce, py::arg("dy"), py::arg("x"), py::arg("scale"), py::arg("shift"),
        py::arg("mean"), py::arg("res"), py::arg("xb"), py::arg("scale_b"), py::arg("shift_b"), py::arg("mean_b"),
        py::arg("relu"), py::arg("want_grad_res"), py::arg("n"), py::arg("c"), py::arg("hw"),
        py::arg("channels_last"), py::arg("vec"), py::arg("aligned") = true, py::arg("sm_count") = 4,
        "(sum_g, sum_g_xc, sum_g_xbc | None, grad_res | None, splits)");
  m.def("backward_reduce_finalize", &backward_reduce_finalize, py::arg("dy"), py::arg("x"), py::arg("scale"),
        py::arg("shift"), py::arg("mean"), py::arg("res"), py::arg("xb"), py::arg("scale_b"), py::arg("shift_b"),
        py::arg("mean_b"), py::arg("relu"), py::arg("want_grad_res"), py::arg("n"), py::arg("c"), py::arg("hw"),
        py::arg("channels_last"), py::arg("vec"), py::arg("aligned") = true, py::arg("sm_count") = 4,
        py::arg("mode_a") = 1, py::arg("mode_b") = 0, py::arg("training") = true, py::arg("var") = py::none(),
        py::arg("eps") = 1e-5f, py::arg("var_b") = py::none(), py::arg("eps_b") = 1e-5f,
        "the fused reduction + last-block finalize: (out_a [4, C], out_b [4, C] | None, [sums per quantity], "
        "grad_res | None, splits)");
  m.def("backward_apply", &backward_apply, py::arg("dy"), py::arg("x"), py::arg("scale"), py::arg("shift"),
        py::arg("res"), py::arg("xb"), py::arg("scale_b"), py::arg("shift_b"), py::arg("relu"), py::arg("mean"),
        py::arg("k_g"), py::arg("k_x"), py::arg("k_c"), py::arg("mean_b"), py::arg("k_g_b"), py::arg("k_x_b"),
        py::arg("k_c_b"), py::arg("n"), py::arg("c"), py::arg("hw"), py::arg("channels_last"), py::arg("vec"),
        py::arg("aligned") = true, py::arg("sm_count") = 4, "(dx, dxb | None)");

  m.def("flat_coverage", &flat_coverage, py::arg("E"), py::arg("inner"), py::arg("C"), py::arg("vec"),
        py::arg("nthreads"), py::arg("uniform") = false, py::arg("unroll") = 1,
        "(visits per element, channel per element)");
  m.def("rows_coverage", &rows_coverage, py::arg("M"), py::arg("C"), py::arg("vec"), py::arg("splits"),
        py::arg("unroll") = 1);
  m.def("channels_coverage", &channels_coverage, py::arg("N"), py::arg("HW"), py::arg("C"), py::arg("vec"),
        py::arg("splits"), py::arg("unroll") = 1, py::arg("planes") = false);
  m.def("plane_slots", &fr::plane_slots);

  m.def("chan_pos", [](i64 e, i64 inner, int C) {
    const fr::ChanPos p = fr::chan_pos(e, inner, C);
    return py::make_tuple(p.c, p.s);
  });
  m.def("chan_walk", [](i64 e0, i64 step, i64 count, i64 inner, int C) {
    // positions of e0, e0+step, ... via chan_step/chan_advance (the flat kernels' grid stride)
    std::vector<int> cs;
    std::vector<i64> ss;
    fr::ChanPos p = fr::chan_pos(e0, inner, C);
    const fr::ChanStep st = fr::chan_step(step, inner, C);
    for (i64 k = 0; k < count; ++k) {
      cs.push_back(p.c);
      ss.push_back(p.s);
      fr::chan_advance(p, st, inner, C);
    }
    return py::make_tuple(cs, ss);
  });
  m.def("welford_combine", [](std::tuple<float, float, float> a, std::tuple<float, float, float> b) {
    const fr::Welford r = fr::welford_combine({std::get<0>(a), std::get<1>(a), std::get<2>(a)},
                                              {std::get<0>(b), std::get<1>(b), std::get<2>(b)});
    return std::make_tuple(r.n, r.mean, r.m2);
  });
  m.def("welford_sequence", [](const F32& v) {
    // one lane of a thread: the shared-count push the kernels use
    float n = 0.f, mean = 0.f, m2 = 0.f;
    for (py::ssize_t i = 0; i < v.size(); ++i) {
      n = n + 1.f;
      fr::welford_push(mean, m2, v.data()[i], 1.f / n);
    }
    return std::make_tuple(n, mean, m2);
  });
  m.def("tree_start", &fr::tree_start);
  m.def("tree_sum", [](std::vector<double> v) {
    // the kernels' block tree over one column, on exact values: each element must be counted once
    tree_y(v, 1, static_cast<int>(v.size()), [](double a, double b) { return a + b; });
    return v.empty() ? 0.0 : v[0];
  });
  m.def("row_plan", [](int C, int vec, int gy) {
    const fr::RowPlan p = fr::row_plan(C, vec, gy);
    return py::dict(py::arg("vec") = p.vec, py::arg("bx") = p.bx, py::arg("by") = p.by, py::arg("gx") = p.gx,
                    py::arg("gy") = p.gy);
  });
  m.def("reduce_splits", &fr::reduce_splits, py::arg("n"), py::arg("c"), py::arg("hw"), py::arg("channels_last"),
        py::arg("elem_size"), py::arg("sm_count"));
  m.def("flat_blocks", &fr::flat_blocks);
  m.def("choose_elementwise", [](bool cl, bool aligned, int C, i64 HW, int vec) {
    static const char* names[] = {"rows", "flat_uniform", "flat_lanes", "flat_scalar"};
    return std::string(names[static_cast<int>(fr::choose_elementwise(cl, aligned, C, HW, vec))]);
  });
  m.def("choose_reduce", [](bool cl, bool aligned, int C, i64 HW, int vec) {
    static const char* names[] = {"rows_vec", "rows_scalar", "channels_vec", "channels_scalar", "channels_planes"};
    return std::string(names[static_cast<int>(fr::choose_reduce(cl, aligned, C, HW, vec))]);
  });
  m.def("bn_backward_coefficients", [](float sum_g, float sum_g_xc, float invstd, float scale, float count,
                                       bool training) {
    const fr::BwdCoef k = fr::bn_backward_coefficients(sum_g, sum_g_xc, invstd, scale, count, training);
    return py::dict(py::arg("k_g") = k.k_g, py::arg("k_x") = k.k_x, py::arg("k_c") = k.k_c,
                    py::arg("grad_weight") = k.grad_weight, py::arg("grad_bias") = k.grad_bias);
  });
  m.def("stats_finalize", &stats_finalize, py::arg("mean"), py::arg("var"), py::arg("weight"), py::arg("bias"),
        py::arg("eps"), py::arg("running_mean"), py::arg("running_var"), py::arg("num_batches_tracked"),
        py::arg("momentum"), py::arg("unbias"),
        "stats_params_kernel's per-channel work: (scale, shift, new running_mean | None, new running_var | None)");
  m.def("side_grads", &side_grads, py::arg("mode"), py::arg("sum_g"), py::arg("sum_gx"), py::arg("scale"),
        py::arg("var"), py::arg("eps"), py::arg("count"), py::arg("training"),
        "bwd_finalize_kernel's per-channel work for one side: [4, C] (fr_finalize.h side_grads)");
  m.def("pre_activation", &fr::pre_activation);
  m.def("masked_grad", &fr::masked_grad);
  m.def("bn_input_grad", &fr::bn_input_grad);
}
