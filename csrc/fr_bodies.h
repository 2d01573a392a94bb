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

// ------------------------------------------------------------------------------------------------
// batch_stats: Welford per lane, one shared count and one reciprocal per vector.
template <class T, int V>
struct StatsBody {
  const T* x;
  float n;
  float mean[V], m2[V];

  FR_HD explicit StatsBody(const T* x_) : x(x_), n(0.f) {
    for (int j = 0; j < V; ++j) mean[j] = m2[j] = 0.f;
  }
  FR_HD void setup(int, int) {}
  FR_HD void run(i64 off) {
    float v[V];
    load_vec<T, V>(x + off, v);
    n = n + 1.f;
    const float inv = 1.f / n;
    for (int j = 0; j < V; ++j) welford_push(mean[j], m2[j], v[j], inv);
  }
  FR_HD Welford lane(int j) const { return Welford{n, mean[j], m2[j]}; }
  // All lanes merged in lane order (channel kernels: every lane belongs to the same channel).
  FR_HD Welford merged() const {
    Welford w = lane(0);
    for (int j = 1; j < V; ++j) w = welford_combine(w, lane(j));
    return w;
  }
};

// ------------------------------------------------------------------------------------------------
// apply: y = act((x-mean)*scale + shift [+ res] [+ (xb-mean_b)*scale_b + shift_b]).
template <class T>
struct FwdArgs {
  const T* x;          // [N, C, H, W] input
  const T* res;        // same shape, or null: residual added after BN
  const T* xb;         // same shape, or null: second BN input (projection shortcut)
  const float* mean;   // [C] centre of x (batch or running mean)
  const float* scale;  // [C] weight * invstd
  const float* shift;  // [C] bias
  const float* mean_b;   // [C] (xb only)
  const float* scale_b;  // [C] (xb only)
  const float* shift_b;  // [C] (xb only)
  T* y;                // output, x's layout
  bool relu;
};

// Kuniform: in flat kernels, all lanes of a vector share one channel (NCHW with V | H*W).
template <class T, int V, bool Kuniform = false>
struct ApplyBody {
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
    if (a.xb) {
      mub[j] = ldp(a.mean_b + c);
      scb[j] = ldp(a.scale_b + c);
      shb[j] = ldp(a.shift_b + c);
    }
  }
  // Lane j is channel c0 + j*lane_stride.
  FR_HD void setup(int c0, int lane_stride) {
    for (int j = 0; j < V; ++j) param(j, c0 + j * lane_stride);
  }
  template <int NL>
  FR_HD void compute(i64 off) {
    float x[V], r[V], b[V], y[V];
    for (int j = 0; j < V; ++j) r[j] = b[j] = 0.f;
    load_lanes<T, NL>(a.x + off, x);
    if (a.res) load_lanes<T, NL>(a.res + off, r);
    if (a.xb) load_lanes<T, NL>(a.xb + off, b);
    for (int j = 0; j < NL; ++j) {
      const float z = pre_activation(x[j], mu[j], sc[j], sh[j], a.res != nullptr, r[j], a.xb != nullptr, b[j], mub[j],
                                     scb[j], shb[j]);
      y[j] = a.relu ? relu_f(z) : z;
    }
    store_lanes<T, NL>(a.y + off, y);
  }
  FR_HD void run(i64 off) { compute<V>(off); }
  // Flat kernels: NL lanes starting at element e, whose position is p.
  template <int NL>
  FR_HD void vec(i64 e, ChanPos p) {
    if constexpr (Kuniform && NL == V) {
      setup(p.c, 0);
    } else {
      for (int j = 0; j < NL; ++j) {
        param(j, p.c);
        chan_next(p, inner, C);
      }
    }
    compute<NL>(e);
  }
};

// ------------------------------------------------------------------------------------------------
// Backward: g = dy * relu'(z); reduce sums, then dx = k_g*g + k_x*(x-mean) + k_c (and dxb likewise).
template <class T>
struct BwdArgs {
  const T* dy;         // [N, C, H, W] gradient of y
  const T* x;          // BN input
  const T* res;        // residual (read only with relu: it only enters the ReLU mask), or null
  const T* xb;         // second BN input, or null
  const float *scale, *shift, *mean;        // [C] BN of x: (x - mean)*scale + shift
  const float *scale_b, *shift_b, *mean_b;  // [C] BN of xb
  const float *k_g, *k_x, *k_c;             // [C] backward_apply coefficients for x
  const float *k_g_b, *k_x_b, *k_c_b;       // [C] ... for xb
  T* grad_res;         // backward_reduce: g, or null
  T* dx;               // backward_apply outputs
  T* dxb;
  bool relu;
};

// Loads dy, x (and res/xb when needed) and forms g for NL lanes.
template <class T, int NL, int V>
FR_HD void grad_lanes(const BwdArgs<T>& a, i64 off, const float (&mu)[V], const float (&sc)[V],
                      const float (&sh)[V], const float (&mub)[V], const float (&scb)[V], const float (&shb)[V],
                      float (&x)[V], float (&b)[V], float (&g)[V]) {
  float dy[V], r[V];
  for (int j = 0; j < V; ++j) r[j] = b[j] = 0.f;
  load_lanes<T, NL>(a.dy + off, dy);
  load_lanes<T, NL>(a.x + off, x);
  if (a.xb) load_lanes<T, NL>(a.xb + off, b);
  if (a.relu) {
    if (a.res) load_lanes<T, NL>(a.res + off, r);
    for (int j = 0; j < NL; ++j) {
      const float z = pre_activation(x[j], mu[j], sc[j], sh[j], a.res != nullptr, r[j], a.xb != nullptr, b[j],
                                     mub[j], scb[j], shb[j]);
      g[j] = masked_grad(dy[j], z, true);
    }
  } else {
    for (int j = 0; j < NL; ++j) g[j] = dy[j];
  }
}

template <class T, int V>
struct BwdReduceBody {
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
      if (a.xb) {
        scb[j] = ldp(a.scale_b + c);
        shb[j] = ldp(a.shift_b + c);
        mub[j] = ldp(a.mean_b + c);
      }
    }
  }
  FR_HD void run(i64 off) {
    float x[V], b[V], g[V];
    grad_lanes<T, V>(a, off, mu, sc, sh, mub, scb, shb, x, b, g);
    for (int j = 0; j < V; ++j) {
      sg[j] = sg[j] + g[j];
      sgx[j] = sgx[j] + g[j] * (x[j] - mu[j]);
      if (a.xb) sgxb[j] = sgxb[j] + g[j] * (b[j] - mub[j]);
    }
    if (a.grad_res) store_lanes<T, V>(a.grad_res + off, g);
  }
};

template <class T, int V, bool Kuniform = false>
struct BwdApplyBody {
  BwdArgs<T> a;
  i64 inner;
  int C;
  float sc[V], sh[V], scb[V], shb[V], mu[V], kg[V], kx[V], kc[V], mub[V], kgb[V], kxb[V], kcb[V];

  FR_HD BwdApplyBody(const BwdArgs<T>& a_, i64 inner_, int C_) : a(a_), inner(inner_), C(C_) {
    for (int j = 0; j < V; ++j)
      sc[j] = sh[j] = scb[j] = shb[j] = mu[j] = kg[j] = kx[j] = kc[j] = mub[j] = kgb[j] = kxb[j] = kcb[j] = 0.f;
  }
  FR_HD void param(int j, int c) {
    if (a.relu) {
      sc[j] = ldp(a.scale + c);
      sh[j] = ldp(a.shift + c);
    }
    mu[j] = ldp(a.mean + c);
    kg[j] = ldp(a.k_g + c);
    kx[j] = ldp(a.k_x + c);
    kc[j] = ldp(a.k_c + c);
    if (a.xb) {
      if (a.relu) {
        scb[j] = ldp(a.scale_b + c);
        shb[j] = ldp(a.shift_b + c);
      }
      mub[j] = ldp(a.mean_b + c);
      kgb[j] = ldp(a.k_g_b + c);
      kxb[j] = ldp(a.k_x_b + c);
      kcb[j] = ldp(a.k_c_b + c);
    }
  }
  FR_HD void setup(int c0, int lane_stride) {
    for (int j = 0; j < V; ++j) param(j, c0 + j * lane_stride);
  }
  template <int NL>
  FR_HD void compute(i64 off) {
    float x[V], b[V], g[V], d[V];
    grad_lanes<T, NL>(a, off, mu, sc, sh, mub, scb, shb, x, b, g);
    for (int j = 0; j < NL; ++j) d[j] = bn_input_grad(g[j], x[j], mu[j], kg[j], kx[j], kc[j]);
    store_lanes<T, NL>(a.dx + off, d);
    if (a.xb) {
      for (int j = 0; j < NL; ++j) d[j] = bn_input_grad(g[j], b[j], mub[j], kgb[j], kxb[j], kcb[j]);
      store_lanes<T, NL>(a.dxb + off, d);
    }
  }
  FR_HD void run(i64 off) { compute<V>(off); }
  template <int NL>
  FR_HD void vec(i64 e, ChanPos p) {
    if constexpr (Kuniform && NL == V) {
      setup(p.c, 0);
    } else {
      for (int j = 0; j < NL; ++j) {
        param(j, p.c);
        chan_next(p, inner, C);
      }
    }
    compute<NL>(e);
  }
};

// ------------------------------------------------------------------------------------------------
// Partials: workspace ws[q][split][c] (q = quantity). Finalize thread (c, p0) folds splits p0, p0+pstep, ...

FR_HD i64 ws_index(int q, int split, int c, int splits, int C) {
  return (static_cast<i64>(q) * splits + split) * C + c;
}

FR_HD Welford welford_partials(const float* ws, int splits, int C, int c, int p0, int pstep) {
  Welford w{0.f, 0.f, 0.f};
  for (int p = p0; p < splits; p += pstep) {
    const Welford b{ws[ws_index(0, p, c, splits, C)], ws[ws_index(1, p, c, splits, C)],
                    ws[ws_index(2, p, c, splits, C)]};
    w = welford_combine(w, b);
  }
  return w;
}

FR_HD float sum_partials(const float* ws, int q, int splits, int C, int c, int p0, int pstep) {
  float s = 0.f;
  for (int p = p0; p < splits; p += pstep) s = s + ws[ws_index(q, p, c, splits, C)];
  return s;
}

}  // namespace fr
