// fr_bodies.h — what one thread does with one vector of V elements, for each fused primitive.
//
// A body is driven by one of the loops of fr_math.h (rows_thread, channel_thread, flat_thread): `setup`
// loads the per-channel parameters of its lanes once, `run(offset)` handles V contiguous elements. The same
// templates run in the kernels (T = float, __half, __nv_bfloat16) and in the host harness (T = float), so
// the harness checks the kernels' own per-thread code. Element conversion goes through Cvt<T>, specialised
// for the half types in fr_cuda.cuh.
#pragma once

#include "fr_math.h"

namespace fr {

// Element type <-> float. Specialised per element type (class specialisations may follow this header).
template <class T>
struct Cvt;
template <>
struct Cvt<float> {
  static FR_HD float to(float v) { return v; }
  static FR_HD float from(float v) { return v; }
};

// V contiguous elements at p (16-byte aligned when V > 1 on the device: one 128-bit access).
template <class T, int V>
FR_HD void load_vec(const T* p, float (&out)[V]) {
#if defined(__CUDA_ARCH__)
  struct alignas(sizeof(T) * V) Pack {
    T v[V];
  };
  const Pack pk = *reinterpret_cast<const Pack*>(p);
  for (int j = 0; j < V; ++j) out[j] = Cvt<T>::to(pk.v[j]);
#else
  for (int j = 0; j < V; ++j) out[j] = Cvt<T>::to(p[j]);
#endif
}

// The first NL lanes at p (NL == V: one vector access; NL == 1: the scalar tail).
template <class T, int NL, int V>
FR_HD void load_lanes(const T* p, float (&out)[V]) {
  static_assert(NL == V || NL == 1, "a vector or a single lane");
  if constexpr (NL == V) {
    load_vec<T, V>(p, out);
  } else {
    out[0] = Cvt<T>::to(p[0]);
  }
}

template <class T, int NL, int V>
FR_HD void store_lanes(T* p, const float (&in)[V]) {
  static_assert(NL == V || NL == 1, "a vector or a single lane");
#if defined(__CUDA_ARCH__)
  if constexpr (NL == V && V > 1) {
    struct alignas(sizeof(T) * V) Pack {
      T v[V];
    };
    Pack pk;
    for (int j = 0; j < V; ++j) pk.v[j] = Cvt<T>::from(in[j]);
    *reinterpret_cast<Pack*>(p) = pk;
  } else {
    for (int j = 0; j < NL; ++j) p[j] = Cvt<T>::from(in[j]);
  }
#else
  for (int j = 0; j < NL; ++j) p[j] = Cvt<T>::from(in[j]);
#endif
}

// A per-channel parameter (read-only cache on the device).
FR_HD float ldp(const float* p) {
#if defined(__CUDA_ARCH__)
  return __ldg(p);
#else
  return *p;
#endif
}

// A float written by another block of the same launch (the last-block finalize of the backward reduction):
// __ldcg reads it from L2, never from a possibly stale L1 line; the host harness (plain C++) loads it plainly.
#if defined(__CUDA_ARCH__)
#define FR_LDCG(p) __ldcg(p)
#else
#define FR_LDCG(p) (*(p))
#endif

// An optional per-channel parameter: 0 where the vector is absent (null), e.g. mean_b and shift_b of a weighted
// residual xb * scale_b, or k_x and k_c of an affine (scale_shift_act) or weighted-residual side.
FR_HD float ldp0(const float* p, int c) { return p ? ldp(p + c) : 0.f; }

// Every body splits its work on one vector into `load<NL>(In&, off)` (the memory reads, into registers) and
// `finish<NL>(In&, off)` (the arithmetic and the stores), so the loops of fr_math.h issue the loads of U
// vectors before the first store: several 16-byte loads in flight per thread. `run(off)` is the two in a row.
// The channel-uniform bodies also take a partial vector: `load_part` / `finish_part` touch only lanes
// [j0, j1) (the NCHW plane path of the reductions, fr_math.h plane_thread).

// ------------------------------------------------------------------------------------------------
// batch_stats: Welford per lane, one shared count and one reciprocal per full vector; lanes of partial vectors
// go to a separate scalar Welford (n1, mean1, m21) merged last.
template <class T, int V>
struct StatsBody {
  static constexpr int kUnroll = V == 1 ? 4 : 2;
  struct In {
    float v[V];
  };
  const T* __restrict__ x;
  float n;
  float mean[V], m2[V];
  float n1, mean1, m21;

  FR_HD explicit StatsBody(const T* x_) : x(x_), n(0.f), n1(0.f), mean1(0.f), m21(0.f) {
    for (int j = 0; j < V; ++j) mean[j] = m2[j] = 0.f;
  }
  FR_HD void setup(int, int) {}
  template <int NL>
  FR_HD void load(In& in, i64 off) const {
    static_assert(NL == V, "statistics take whole vectors");
    load_vec<T, V>(x + off, in.v);
  }
  // Partial vectors loop over all lanes with a mask: a run-time lane index would put the arrays in local memory.
  FR_HD void load_part(In& in, i64 off, int j0, int j1) const {
    for (int j = 0; j < V; ++j) in.v[j] = j >= j0 && j < j1 ? Cvt<T>::to(x[off + j]) : 0.f;
  }
  template <int NL>
  FR_HD void finish(const In& in, i64) {
    n = n + 1.f;
    const float inv = 1.f / n;
    for (int j = 0; j < V; ++j) welford_push(mean[j], m2[j], in.v[j], inv);
  }
  FR_HD void finish_part(const In& in, i64, int j0, int j1) {
    for (int j = 0; j < V; ++j) {
      if (j >= j0 && j < j1) {
        n1 = n1 + 1.f;
        welford_push(mean1, m21, in.v[j], 1.f / n1);
      }
    }
  }
  FR_HD void run(i64 off) {
    In in;
    load<V>(in, off);
    finish<V>(in, off);
  }
  FR_HD Welford lane(int j) const { return Welford{n, mean[j], m2[j]}; }
  // All lanes merged in lane order, then the partial-vector lanes (channel kernels: one channel per thread).
  FR_HD Welford merged() const {
    Welford w = lane(0);
    for (int j = 1; j < V; ++j) w = welford_combine(w, lane(j));
    return welford_combine(w, Welford{n1, mean1, m21});
  }
};

// ------------------------------------------------------------------------------------------------
// apply: y = act((x-mean)*scale + shift [+ res] [+ (xb-mean_b)*scale_b + shift_b]).
template <class T>
struct FwdArgs {
  const T* __restrict__ x;        // [N, C, H, W] input
  const T* __restrict__ res;      // same shape, or null: residual added after BN
  const T* __restrict__ xb;       // same shape, or null: second BN input (projection shortcut)
  const float* __restrict__ mean;     // [C] centre of x (batch or running mean)
  const float* __restrict__ scale;    // [C] weight * invstd
  const float* __restrict__ shift;    // [C] bias
  const float* __restrict__ mean_b;   // [C] (xb only)
  const float* __restrict__ scale_b;  // [C] (xb only)
  const float* __restrict__ shift_b;  // [C] (xb only)
  T* __restrict__ y;              // output, x's layout
  bool relu;
};

// Kuniform: in flat kernels, all lanes of a vector share one channel (NCHW with V | H*W). XB: xb is given
// (a compile-time flag, so the single-input kernels hold no second set of parameters in registers).
template <class T, int V, bool Kuniform = false, bool XB = false>
struct ApplyBody {
  static constexpr int kUnroll = V == 1 ? 4 : 2;
  // flat kernels: vectors whose lanes take their own channels load 3-6 parameters per lane, so one at a time
  static constexpr int kFlatUnroll = V == 1 ? 4 : (Kuniform ? 2 : 1);
  struct In {
    float x[V], r[V], b[V];
  };
  FwdArgs<T> a;
  i64 inner;
  int C;
  float mu[V], sc[V], sh[V], mub[V], scb[V], shb[V];

  FR_HD ApplyBody(const FwdArgs<T>& a_, i64 inner_, int C_) : a(a_), inner(inner_), C(C_) {
    for (int j = 0; j < V; ++j) mu[j] = sc[j] = sh[j] = mub[j] = scb[j] = shb[j] = 0.f;
  }
  FR_HD void param(int j, int c) {
    mu[j] = ldp(a.mean + c);
    sc[j] = ldp(a.scale + c);
    sh[j] = ldp(a.shift + c);
    if constexpr (XB) {
      mub[j] = ldp0(a.mean_b, c);
      scb[j] = ldp(a.scale_b + c);
      shb[j] = ldp0(a.shift_b, c);
    }
  }
  // Lane j is channel c0 + j*lane_stride.
  FR_HD void setup(int c0, int lane_stride) {
    for (int j = 0; j < V; ++j) param(j, c0 + j * lane_stride);
  }
  template <int NL>
  FR_HD void load(In& in, i64 off) const {
    for (int j = 0; j < V; ++j) in.r[j] = in.b[j] = 0.f;
    load_lanes<T, NL>(a.x + off, in.x);
    if (a.res) load_lanes<T, NL>(a.res + off, in.r);
    if constexpr (XB) load_lanes<T, NL>(a.xb + off, in.b);
  }
  template <int NL>
  FR_HD void finish(const In& in, i64 off) {
    float y[V];
    for (int j = 0; j < NL; ++j) {
      const float z = pre_activation(in.x[j], mu[j], sc[j], sh[j], a.res != nullptr, in.r[j], XB, in.b[j], mub[j],
                                     scb[j], shb[j]);
      y[j] = a.relu ? relu_f(z) : z;
    }
    store_lanes<T, NL>(a.y + off, y);
  }
  FR_HD void run(i64 off) {
    In in;
    load<V>(in, off);
    finish<V>(in, off);
  }
  // Flat kernels: the NL lanes starting at element e, whose position is p.
  template <int NL>
  FR_HD void finish_at(const In& in, i64 e, ChanPos p) {
    if constexpr (Kuniform && NL == V) {
      setup(p.c, 0);
    } else {
      for (int j = 0; j < NL; ++j) {
        param(j, p.c);
        chan_next(p, inner, C);
      }
    }
    finish<NL>(in, e);
  }
};

// ------------------------------------------------------------------------------------------------
// Backward: g = dy * relu'(z); reduce sums, then dx = k_g*g + k_x*(x-mean) + k_c (and dxb likewise).
template <class T>
struct BwdArgs {
  const T* __restrict__ dy;   // [N, C, H, W] gradient of y
  const T* __restrict__ x;    // BN input
  const T* __restrict__ res;  // residual (read only with relu: it only enters the ReLU mask), or null
  const T* __restrict__ xb;   // second BN input, or null
  const float *__restrict__ scale, *__restrict__ shift, *__restrict__ mean;        // [C] BN of x
  const float *__restrict__ scale_b, *__restrict__ shift_b, *__restrict__ mean_b;  // [C] BN of xb
  const float *__restrict__ k_g, *__restrict__ k_x, *__restrict__ k_c;  // [C] backward_apply coefficients for x
  const float *__restrict__ k_g_b, *__restrict__ k_x_b, *__restrict__ k_c_b;  // [C] ... for xb
  T* __restrict__ grad_res;   // backward_reduce: g, or null
  T* __restrict__ dx;         // backward_apply outputs
  T* __restrict__ dxb;
  bool relu;
};

// The inputs of one vector of the backward: dy, x (and res / xb when needed).
template <int V>
struct BwdIn {
  float dy[V], x[V], r[V], b[V];
};

template <class T, int NL, int V, bool XB>
FR_HD void load_grad_inputs(const BwdArgs<T>& a, i64 off, BwdIn<V>& in) {
  for (int j = 0; j < V; ++j) in.r[j] = in.b[j] = 0.f;
  load_lanes<T, NL>(a.dy + off, in.dy);
  load_lanes<T, NL>(a.x + off, in.x);
  if constexpr (XB) load_lanes<T, NL>(a.xb + off, in.b);
  if (a.relu && a.res) load_lanes<T, NL>(a.res + off, in.r);
}

// g of lane j (its parameters in lane j of the arrays).
template <class T, int V, bool XB>
FR_HD float lane_grad(const BwdArgs<T>& a, const BwdIn<V>& in, int j, const float (&mu)[V], const float (&sc)[V],
                      const float (&sh)[V], const float (&mub)[V], const float (&scb)[V], const float (&shb)[V]) {
  if (!a.relu) return in.dy[j];
  const float z = pre_activation(in.x[j], mu[j], sc[j], sh[j], a.res != nullptr, in.r[j], XB, in.b[j], mub[j],
                                 scb[j], shb[j]);
  return masked_grad(in.dy[j], z, true);
}

template <class T, int V, bool XB = false>
struct BwdReduceBody {
  static constexpr int kUnroll = V == 1 ? 4 : (XB ? 1 : 2);
  using In = BwdIn<V>;
  BwdArgs<T> a;
  float sc[V], sh[V], mu[V], scb[V], shb[V], mub[V];
  float sg[V], sgx[V], sgxb[V];  // per lane: sum g, sum g*(x-mean), sum g*(xb-mean_b)

  FR_HD explicit BwdReduceBody(const BwdArgs<T>& a_) : a(a_) {
    for (int j = 0; j < V; ++j) sc[j] = sh[j] = mu[j] = scb[j] = shb[j] = mub[j] = sg[j] = sgx[j] = sgxb[j] = 0.f;
  }
  FR_HD void setup(int c0, int lane_stride) {
    for (int j = 0; j < V; ++j) {
      const int c = c0 + j * lane_stride;
      sc[j] = ldp(a.scale + c);
      sh[j] = ldp(a.shift + c);
      mu[j] = ldp(a.mean + c);
      if constexpr (XB) {
        scb[j] = ldp(a.scale_b + c);
        shb[j] = ldp0(a.shift_b, c);
        mub[j] = ldp0(a.mean_b, c);
      }
    }
  }
  template <int NL>
  FR_HD void load(In& in, i64 off) const {
    load_grad_inputs<T, NL, V, XB>(a, off, in);
  }
  FR_HD void load_part(In& in, i64 off, int j0, int j1) const {
    for (int j = 0; j < V; ++j) {
      const bool in_plane = j >= j0 && j < j1;
      in.dy[j] = in_plane ? Cvt<T>::to(a.dy[off + j]) : 0.f;
      in.x[j] = in_plane ? Cvt<T>::to(a.x[off + j]) : 0.f;
      in.r[j] = in_plane && a.relu && a.res ? Cvt<T>::to(a.res[off + j]) : 0.f;
      in.b[j] = in_plane && XB ? Cvt<T>::to(a.xb[off + j]) : 0.f;
    }
  }
  FR_HD float accumulate(const In& in, int j) {
    const float g = lane_grad<T, V, XB>(a, in, j, mu, sc, sh, mub, scb, shb);
    sg[j] = sg[j] + g;
    sgx[j] = sgx[j] + g * (in.x[j] - mu[j]);
    if constexpr (XB) sgxb[j] = sgxb[j] + g * (in.b[j] - mub[j]);
    return g;
  }
  template <int NL>
  FR_HD void finish(const In& in, i64 off) {
    static_assert(NL == V, "reductions take whole vectors");
    float g[V];
    for (int j = 0; j < V; ++j) g[j] = accumulate(in, j);
    if (a.grad_res) store_lanes<T, V>(a.grad_res + off, g);
  }
  FR_HD void finish_part(const In& in, i64 off, int j0, int j1) {
    for (int j = 0; j < V; ++j) {
      if (j >= j0 && j < j1) {
        const float g = accumulate(in, j);
        if (a.grad_res) a.grad_res[off + j] = Cvt<T>::from(g);
      }
    }
  }
  FR_HD void run(i64 off) {
    In in;
    load<V>(in, off);
    finish<V>(in, off);
  }
};

// KT: the coefficients k_g, k_x, k_c, k_g_b, k_x_b, k_c_b come from a table the block fills first (shared
// memory; fill_coef_table) instead of registers: the dual row kernel then fits 2 blocks per SM without spills.
template <class T, int V, bool Kuniform = false, bool XB = false, bool KT = false>
struct BwdApplyBody {
  static constexpr int kUnroll = V == 1 ? 4 : (XB ? 1 : 2);
  static constexpr int kFlatUnroll = V == 1 ? 4 : (Kuniform && !XB ? 2 : 1);
  using In = BwdIn<V>;
  BwdArgs<T> a;
  i64 inner;
  int C;
  float sc[V], sh[V], scb[V], shb[V], mu[V], kg[V], kx[V], kc[V], mub[V], kgb[V], kxb[V], kcb[V];
  const float* kt = nullptr;  // KT: this thread's column of the table, coefficient q of lane j at kt[(q*V + j)*kts]
  int kts = 0;

  FR_HD BwdApplyBody(const BwdArgs<T>& a_, i64 inner_, int C_) : a(a_), inner(inner_), C(C_) {
    for (int j = 0; j < V; ++j)
      sc[j] = sh[j] = scb[j] = shb[j] = mu[j] = kg[j] = kx[j] = kc[j] = mub[j] = kgb[j] = kxb[j] = kcb[j] = 0.f;
  }
  // with_kb = false: all but xb's coefficients (k_g_b, k_x_b, k_c_b), which param_kb loads.
  FR_HD void param(int j, int c, bool with_kb = true) {
    if (a.relu) {
      sc[j] = ldp(a.scale + c);
      sh[j] = ldp(a.shift + c);
    }
    mu[j] = ldp(a.mean + c);
    if constexpr (!KT) {
      kg[j] = ldp(a.k_g + c);
      kx[j] = ldp0(a.k_x, c);
      kc[j] = ldp0(a.k_c, c);
    }
    if constexpr (XB) {
      if (a.relu) {
        scb[j] = ldp(a.scale_b + c);
        shb[j] = ldp0(a.shift_b, c);
      }
      mub[j] = ldp0(a.mean_b, c);
      if (with_kb) param_kb(j, c);
    }
  }
  FR_HD void param_kb(int j, int c) {
    if constexpr (XB && !KT) {
      kgb[j] = ldp(a.k_g_b + c);
      kxb[j] = ldp0(a.k_x_b, c);
      kcb[j] = ldp0(a.k_c_b, c);
    }
  }
  FR_HD float coef(int q, int j, const float (&reg)[V]) const {
    if constexpr (KT) {
      return kt[(q * V + j) * kts];
    } else {
      return reg[j];
    }
  }
  FR_HD void setup(int c0, int lane_stride) {
    for (int j = 0; j < V; ++j) param(j, c0 + j * lane_stride);
  }
  template <int NL>
  FR_HD void load(In& in, i64 off) const {
    load_grad_inputs<T, NL, V, XB>(a, off, in);
  }
  // Lane j: its dx (and dxb) from its parameters.
  FR_HD void lane_out(const In& in, int j, float& d, float& db) const {
    const float g = lane_grad<T, V, XB>(a, in, j, mu, sc, sh, mub, scb, shb);
    d = bn_input_grad(g, in.x[j], mu[j], coef(0, j, kg), coef(1, j, kx), coef(2, j, kc));
    if constexpr (XB) db = bn_input_grad(g, in.b[j], mub[j], coef(3, j, kgb), coef(4, j, kxb), coef(5, j, kcb));
  }
  template <int NL>
  FR_HD void finish(const In& in, i64 off) {
    float d[V], db[V];
    for (int j = 0; j < NL; ++j) lane_out(in, j, d[j], db[j]);
    store_lanes<T, NL>(a.dx + off, d);
    if constexpr (XB) store_lanes<T, NL>(a.dxb + off, db);
  }
  FR_HD void run(i64 off) {
    In in;
    load<V>(in, off);
    finish<V>(in, off);
  }
  // Flat kernels. Lanes of their own channels load their parameters lane by lane, and dxb's coefficients only
  // after dx is stored (fewer values live at once).
  template <int NL>
  FR_HD void finish_at(const In& in, i64 e, ChanPos p) {
    if constexpr (Kuniform && NL == V) {
      setup(p.c, 0);
      finish<NL>(in, e);
    } else {
      float g[V], d[V];
      const ChanPos p0 = p;
      for (int j = 0; j < NL; ++j) {
        param(j, p.c, false);
        g[j] = lane_grad<T, V, XB>(a, in, j, mu, sc, sh, mub, scb, shb);
        d[j] = bn_input_grad(g[j], in.x[j], mu[j], kg[j], kx[j], kc[j]);
        chan_next(p, inner, C);
      }
      store_lanes<T, NL>(a.dx + e, d);
      if constexpr (XB) {
        p = p0;
        for (int j = 0; j < NL; ++j) {
          param_kb(j, p.c);
          d[j] = bn_input_grad(g[j], in.b[j], mub[j], kgb[j], kxb[j], kcb[j]);
          chan_next(p, inner, C);
        }
        store_lanes<T, NL>(a.dxb + e, d);
      }
    }
  }
};

// The KT table of a row-kernel block whose first channel is c_base and whose rows are bx threads wide:
// [6][V][bx] floats, entry (q, j, tx) = coefficient q of channel c_base + tx*V + j (0 past C). Threads t0,
// t0 + tstep, ... fill it.
template <class T, int V>
FR_HD void fill_coef_table(const BwdArgs<T>& a, int C, int c_base, int bx, float* tab, int t0, int tstep) {
  const int per_q = V * bx;
  for (int i = t0; i < 6 * per_q; i += tstep) {
    const int q = i / per_q, r = i - q * per_q;
    const int j = r / bx, tx = r - j * bx;
    const int c = c_base + tx * V + j;
    const float* src = q == 0 ? a.k_g : q == 1 ? a.k_x : q == 2 ? a.k_c : q == 3 ? a.k_g_b : q == 4 ? a.k_x_b : a.k_c_b;
    tab[i] = c < C ? ldp0(src, c) : 0.f;  // absent k_x / k_c (null): 0
  }
}

// ------------------------------------------------------------------------------------------------
// Partials: workspace ws[q][split][c] (q = quantity). Finalize thread (c, p0) folds splits p0, p0+pstep, ...

FR_HD i64 ws_index(int q, int split, int c, int splits, int C) {
  return (static_cast<i64>(q) * splits + split) * C + c;
}

// L2: the partials were written by other blocks of this launch (FR_LDCG); else by an earlier launch.
template <bool L2 = false>
FR_HD Welford welford_partials(const float* ws, int splits, int C, int c, int p0, int pstep) {
  Welford w{0.f, 0.f, 0.f};
  for (int p = p0; p < splits; p += pstep) {
    const float* q0 = ws + ws_index(0, p, c, splits, C);
    const float* q1 = ws + ws_index(1, p, c, splits, C);
    const float* q2 = ws + ws_index(2, p, c, splits, C);
    const Welford b = L2 ? Welford{FR_LDCG(q0), FR_LDCG(q1), FR_LDCG(q2)} : Welford{*q0, *q1, *q2};
    w = welford_combine(w, b);
  }
  return w;
}

// As welford_partials, for one plain sum (quantity q).
template <bool L2 = false>
FR_HD float sum_partials(const float* ws, int q, int splits, int C, int c, int p0, int pstep) {
  float s = 0.f;
  for (int p = p0; p < splits; p += pstep) {
    const float* w = ws + ws_index(q, p, c, splits, C);
    s = s + (L2 ? FR_LDCG(w) : *w);
  }
  return s;
}

}  // namespace fr
