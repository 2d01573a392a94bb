// fr_math.h — the arithmetic every fusedres CUDA kernel shares with the host test harness.
//
// Everything here is plain C++ on floats and 64-bit integers, marked FR_HD (__host__ __device__ under nvcc,
// inline otherwise), so the same index arithmetic, launch planning, per-thread loops and Welford/Chan
// statistics compile into the kernels (csrc/*.cu) and into the CPU-only module fusedres._C_host that
// tests/test_cuda_host.py drives. The kernels are built with --fmad=false and use no fast-math, so a value
// computed here on the host is bit-identical to the one a kernel computes, and to the separate torch ops of
// fusedres.reference (mul, then add).
//
// Layout model: a dense 4-D activation [N, C, H, W] is a flat array of E = N*C*H*W elements seen as
// [outer, C, inner]: NCHW has inner = H*W, NHWC (channels_last) has inner = 1. Element e lies in channel
// (e / inner) % C.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FR_HD __host__ __device__ __forceinline__
#else
#define FR_HD inline
#endif
#if defined(__CUDA_ARCH__)
#define FR_UNROLL _Pragma("unroll")
#else
#define FR_UNROLL
#endif

namespace fr {

using i64 = std::int64_t;

constexpr int kBlock = 256;       // threads per block of every main kernel
constexpr int kMaxBx = 32;        // channel vectors per block row in the row (NHWC) kernels
constexpr int kFinalBx = 32;      // finalize kernels: channels per block ...
constexpr int kFinalBy = 8;       // ... and partial rows combined in parallel per channel
constexpr int kMaxSplits = 65535; // gridDim.y limit

// ------------------------------------------------------------------------------------------------
// Per-element BatchNorm math (fp32), in the reference's operation order.

// z = (x-mean)*scale + shift [+ r] [+ (xb-mean_b)*scale_b + shift_b], left to right as fusedres.reference
// computes it. Centring first keeps precision when |mean| >> std.
FR_HD float pre_activation(float x, float mean, float scale, float shift, bool has_res, float r, bool has_b,
                           float xb, float mean_b, float scale_b, float shift_b) {
  float z = (x - mean) * scale + shift;
  if (has_res) z = z + r;
  if (has_b) z = (z + (xb - mean_b) * scale_b) + shift_b;
  return z;
}

// ReLU that lets NaN through, like torch.relu.
FR_HD float relu_f(float z) { return z < 0.f ? 0.f : z; }

// g = dy * relu'(z): the gradient reaching the BN output(s) and the residual. As torch.relu's backward
// (threshold_backward: 0 where z <= 0), a NaN z passes the gradient.
FR_HD float masked_grad(float dy, float z, bool relu) { return (relu && z <= 0.f) ? 0.f : dy; }

// BN input gradient as an affine function of g and the centred input: dx = k_g*g + k_x*(x - mean) + k_c. The
// centred term is exactly 0 where k_x == 0 (eval mode): stock's eval gradient has no such term, so an inf or
// NaN x must not turn it into 0 * inf = NaN.
FR_HD float bn_input_grad(float g, float x, float mean, float k_g, float k_x, float k_c) {
  const float centred = k_x == 0.f ? 0.f : (x - mean) * k_x;
  return (g * k_g + centred) + k_c;
}

// Per-channel backward coefficients from the reduced sums (mirrors fusedres.ops._common.grad_coefficients;
// the harness checks the whole backward with it): with scale = weight*invstd, k_g = scale, k_x = -scale*invstd^2*sum(g*(x-mean))/count, k_c = -scale*sum(g)/count.
struct BwdCoef {
  float k_g, k_x, k_c, grad_weight, grad_bias;
};
FR_HD BwdCoef bn_backward_coefficients(float sum_g, float sum_g_xc, float invstd, float scale, float count,
                                       bool training) {
  BwdCoef k;
  k.grad_weight = sum_g_xc * invstd;
  k.grad_bias = sum_g;
  k.k_g = scale;
  k.k_x = training ? (-scale * invstd * invstd * sum_g_xc) / count : 0.f;
  k.k_c = training ? (-scale * sum_g) / count : 0.f;
  return k;
}

// ------------------------------------------------------------------------------------------------
// Welford / Chan statistics. A thread runs Welford over its values (several lanes share one count, so one
// reciprocal per row serves all lanes); threads, blocks and splits merge with Chan's pairwise formula, which
// stays accurate for data far from zero (1000 + randn) where sum/sum-of-squares cancels catastrophically.

struct Welford {
  float n, mean, m2;  // count, mean, sum of squared deviations
};

// Add value x to a lane whose (shared) count was just incremented; inv_n = 1 / new count.
FR_HD void welford_push(float& mean, float& m2, float x, float inv_n) {
  const float d = x - mean;
  mean = mean + d * inv_n;
  m2 = m2 + d * (x - mean);
}

// Chan et al.: statistics of the union of two disjoint sets. Exact identities for empty inputs.
FR_HD Welford welford_combine(Welford a, Welford b) {
  const float n = a.n + b.n;
  if (n == 0.f) return a;
  const float d = b.mean - a.mean;
  const float wb = b.n / n;
  Welford r;
  r.n = n;
  r.mean = a.mean + d * wb;
  r.m2 = (a.m2 + b.m2) + d * d * a.n * wb;
  return r;
}

// Block reductions combine pairs (t, t+s) for s = tree_start(n), tree_start(n)/2, ..., 1 while t+s < n;
// tree_start is half the smallest power of two >= n (0 for n <= 1).
FR_HD int tree_start(int n) {
  int p = 1;
  while (p < n) p *= 2;
  return p / 2;
}

// ------------------------------------------------------------------------------------------------
// Channel positions for the flat (elementwise) kernels: thread `tid` of `nthreads` handles vectors
// tid, tid + nthreads, ... and tracks (channel, offset-in-inner) incrementally instead of dividing per
// element.

struct ChanPos {
  i64 s;  // offset within the inner extent, [0, inner)
  int c;  // channel, [0, C)
};

FR_HD ChanPos chan_pos(i64 e, i64 inner, int C) {
  const i64 q = e / inner;
  ChanPos p;
  p.s = e - q * inner;
  p.c = static_cast<int>(q % C);
  return p;
}

// A fixed stride of `step` elements decomposed once: ds inner positions plus dc channels.
struct ChanStep {
  i64 ds;
  int dc;
};

FR_HD ChanStep chan_step(i64 step, i64 inner, int C) {
  const i64 q = step / inner;
  ChanStep st;
  st.ds = step - q * inner;
  st.dc = static_cast<int>(q % C);
  return st;
}

// p := position of (element of p) + step.
FR_HD void chan_advance(ChanPos& p, ChanStep st, i64 inner, int C) {
  p.s += st.ds;
  int carry = 0;
  if (p.s >= inner) {
    p.s -= inner;
    carry = 1;
  }
  int c = p.c + st.dc + carry;  // < 2C
  if (c >= C) c -= C;
  p.c = c;
}

// p := position of the next element (the next lane of a vector).
FR_HD void chan_next(ChanPos& p, i64 inner, int C) {
  if (++p.s == inner) {
    p.s = 0;
    if (++p.c == C) p.c = 0;
  }
}

// Flat loop of one thread: full vectors of V elements first, U at a time (the loads of all U, then
// body.finish_at for each), then its share of the scalar tail, the last E % V elements (NL = 1).
template <int V, class Body, int U = Body::kFlatUnroll>
FR_HD void flat_thread(i64 E, i64 inner, int C, i64 tid, i64 nthreads, Body& body) {
  using In = typename Body::In;
  const i64 ev = E / V;
  if (tid < ev) {
    ChanPos p = chan_pos(tid * V, inner, C);
    const ChanStep st = chan_step(nthreads * V, inner, C);
    i64 i = tid;
    for (; i + (U - 1) * nthreads < ev; i += U * nthreads) {
      In in[U];
      ChanPos ps[U];
      FR_UNROLL
      for (int u = 0; u < U; ++u) {
        ps[u] = p;
        body.template load<V>(in[u], (i + u * nthreads) * V);
        chan_advance(p, st, inner, C);
      }
      FR_UNROLL
      for (int u = 0; u < U; ++u) body.template finish_at<V>(in[u], (i + u * nthreads) * V, ps[u]);
    }
    for (; i < ev; i += nthreads) {
      In in;
      body.template load<V>(in, i * V);
      body.template finish_at<V>(in, i * V, p);
      chan_advance(p, st, inner, C);
    }
  }
  if (V > 1) {
    for (i64 e = ev * V + tid; e < E; e += nthreads) {
      In in;
      body.template load<1>(in, e);
      body.template finish_at<1>(in, e, chan_pos(e, inner, C));
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Row kernels (NHWC, [M, C] with M = N*H*W): block (bx, by) = (channel vectors, rows); grid (gx, gy).
// Thread (tx, ty) of block (bx_i, by_i) owns channel vector cv = bx_i*bx + tx (channels cv*V .. cv*V+V-1)
// for all of its rows by_i*by + ty + k*gy*by, so its per-channel parameters stay in registers.

struct RowPlan {
  int vec;     // lanes per thread: 16 bytes worth, or 1
  int bx, by;  // block shape
  int gx, gy;  // grid: channel tiles, row splits
};

FR_HD RowPlan row_plan(int C, int vec, int gy) {
  RowPlan p;
  p.vec = vec;
  const int cv = C / vec;
  p.bx = cv < kMaxBx ? cv : kMaxBx;
  p.by = kBlock / p.bx;
  p.gx = (cv + p.bx - 1) / p.bx;
  p.gy = gy;
  return p;
}

FR_HD i64 ceil_div(i64 a, i64 b) { return (a + b - 1) / b; }
FR_HD i64 clamp64(i64 v, i64 lo, i64 hi) { return v < lo ? lo : (v > hi ? hi : v); }

// Row splits: enough blocks for `blocks_per_sm` per SM, but at least `min_rows` rows per thread.
FR_HD int row_splits(i64 M, int C, int vec, int sm_count, int blocks_per_sm, int min_rows) {
  const RowPlan p = row_plan(C, vec, 1);
  const i64 want = ceil_div(static_cast<i64>(sm_count) * blocks_per_sm, p.gx);
  const i64 cap = ceil_div(M, static_cast<i64>(p.by) * min_rows);
  return static_cast<int>(clamp64(want < cap ? want : cap, 1, kMaxSplits));
}

// Row loop of one thread: body.setup(c0, 1) once (lane j is channel c0 + j), then its rows U at a time (the
// loads of U rows, then body.finish for each), the remaining rows one by one.
template <int V, class Body, int U = Body::kUnroll>
FR_HD void rows_thread(i64 M, int C, i64 row0, i64 row_step, int cv, Body& body) {
  using In = typename Body::In;
  const int c0 = cv * V;
  if (c0 >= C) return;
  body.setup(c0, 1);
  i64 r = row0;
  for (; r + (U - 1) * row_step < M; r += U * row_step) {
    In in[U];
    FR_UNROLL
    for (int u = 0; u < U; ++u) body.template load<V>(in[u], (r + u * row_step) * C + c0);
    FR_UNROLL
    for (int u = 0; u < U; ++u) body.template finish<V>(in[u], (r + u * row_step) * C + c0);
  }
  for (; r < M; r += row_step) body.run(r * C + c0);
}

// ------------------------------------------------------------------------------------------------
// Channel kernels (NCHW reductions): block (c, split) reduces channel c over its N planes of HW elements;
// thread t of split k takes vectors t + k*kBlock, stepping by gy*kBlock vectors; V divides HW, so no vector
// crosses a plane. The plane index n and offset s advance by a precomputed (dn, ds), with a carry.

FR_HD int channel_splits(i64 N, i64 HW, int C, int vec, int sm_count, int blocks_per_sm, int min_vecs) {
  const i64 want = ceil_div(static_cast<i64>(sm_count) * blocks_per_sm, C);
  const i64 cap = ceil_div(N * HW / vec, static_cast<i64>(kBlock) * min_vecs);
  return static_cast<int>(clamp64(want < cap ? want : cap, 1, kMaxSplits));
}

// (n, s) := the position `step` = (dn, ds) elements further along channel c's planes.
FR_HD void plane_advance(i64& n, i64& s, i64 dn, i64 ds, i64 HW) {
  s += ds;
  n += dn;
  if (s >= HW) {
    s -= HW;
    ++n;
  }
}

// body.setup(c, 0) once (every lane is channel c), then the thread's vectors of channel c, U at a time.
template <int V, class Body, int U = Body::kUnroll>
FR_HD void channel_thread(i64 N, i64 HW, int C, int c, i64 v0, i64 v_step, Body& body) {
  using In = typename Body::In;
  const i64 L = N * HW;
  const i64 e0 = v0 * V;
  if (e0 >= L) return;
  body.setup(c, 0);
  i64 n = e0 / HW, s = e0 - n * HW;
  const i64 step = v_step * V;
  const i64 dn = step / HW, ds = step - dn * HW;
  i64 e = e0;
  for (; e + (U - 1) * step < L; e += U * step) {
    In in[U];
    i64 off[U];
    FR_UNROLL
    for (int u = 0; u < U; ++u) {
      off[u] = (n * C + c) * HW + s;
      body.template load<V>(in[u], off[u]);
      plane_advance(n, s, dn, ds, HW);
    }
    FR_UNROLL
    for (int u = 0; u < U; ++u) body.template finish<V>(in[u], off[u]);
  }
  for (; e < L; e += step) {
    body.run((n * C + c) * HW + s);
    plane_advance(n, s, dn, ds, HW);
  }
}

// ------------------------------------------------------------------------------------------------
// Plane kernels (NCHW reductions when V does not divide H*W, e.g. 7x7 and 14x14): channel c's N planes are
// rows of HW elements whose starts are not 16-byte aligned. Plane n is covered by the W = plane_slots(HW, V)
// aligned V-vectors that touch it (slot k: vector floor(b/V) + k, b the plane's first element); a vector
// partly outside the plane is still read with one 16-byte access when it lies inside the tensor, and only its
// lanes [j0, j1) inside the plane count (body.finish_part). Slots past the plane's end are empty.

FR_HD i64 plane_slots(i64 HW, int V) { return (HW + V - 2) / V + 1; }

struct Slot {
  i64 off;     // first element of the aligned vector
  int j0, j1;  // its lanes inside the plane (j0 == j1: empty slot)
};

FR_HD Slot plane_slot(i64 n, i64 k, i64 HW, int C, int c, int V) {
  const i64 b = (n * C + c) * HW;
  const i64 gv = (b / V + k) * V;
  const i64 lo = b > gv ? b : gv;
  const i64 hi = b + HW < gv + V ? b + HW : gv + V;
  Slot sl;
  sl.off = gv;
  sl.j0 = lo < hi ? static_cast<int>(lo - gv) : 0;
  sl.j1 = lo < hi ? static_cast<int>(hi - gv) : 0;
  return sl;
}

// Thread v0 of channel c takes slots v0, v0 + v_step, ... of the N*W slots (n = slot / W, k = slot % W), U at
// a time. E: elements of the whole tensor (a vector reaching past it is read lane by lane).
template <int V, class Body, int U = Body::kUnroll>
FR_HD void plane_thread(i64 N, i64 HW, int C, int c, i64 v0, i64 v_step, Body& body) {
  using In = typename Body::In;
  const i64 W = plane_slots(HW, V);
  const i64 S = N * W, E = N * C * HW;
  if (v0 >= S) return;
  body.setup(c, 0);
  i64 n = v0 / W, k = v0 - n * W;
  const i64 dn = v_step / W, dk = v_step - dn * W;
  i64 v = v0;
  while (v < S) {
    const int u_n = v + (U - 1) * v_step < S ? U : 1;
    In in[U];
    Slot sl[U];
    FR_UNROLL
    for (int u = 0; u < U; ++u) {
      if (u < u_n) {
        sl[u] = plane_slot(n, k, HW, C, c, V);
        if (sl[u].j1 - sl[u].j0 == V || (sl[u].j1 > sl[u].j0 && sl[u].off + V <= E)) {
          body.template load<V>(in[u], sl[u].off);
        } else {
          body.load_part(in[u], sl[u].off, sl[u].j0, sl[u].j1);
        }
        plane_advance(n, k, dn, dk, W);
      }
    }
    FR_UNROLL
    for (int u = 0; u < U; ++u) {
      if (u < u_n) {
        if (sl[u].j1 - sl[u].j0 == V) {
          body.template finish<V>(in[u], sl[u].off);
        } else {
          body.finish_part(in[u], sl[u].off, sl[u].j0, sl[u].j1);
        }
      }
    }
    v += u_n * v_step;
  }
}

// Launch-planning constants shared by the launchers and the harness.
constexpr int kReduceBlocksPerSm = 8;  // reductions: a wave of 8 blocks of 256 threads per SM (loads in flight)
constexpr int kReduceMinRows = 8;      // ... but at least 8 rows (vectors) per thread
constexpr int kApplyBlocksPerSm = 8;   // elementwise: 2048 threads per SM

// Vector width for element size `elem` (16 bytes' worth), and whether a layout can use it.
FR_HD int vec_for(int elem) { return 16 / elem; }

// The row splits of a reduction over x [N, C, H, W]: planned with the vector width the shape allows (the
// launcher keeps this split count even when pointer alignment forces scalar loads), so Python can size the
// workspace [quantities, splits, C] before the launch. NCHW with V not dividing H*W plans its plane slots.
FR_HD int reduce_splits(i64 N, int C, i64 HW, bool channels_last, int elem, int sm_count) {
  const int v = vec_for(elem);
  if (channels_last) {
    const int vec = (C % v == 0) ? v : 1;
    return row_splits(N * HW, C, vec, sm_count, kReduceBlocksPerSm, kReduceMinRows);
  }
  const i64 span = HW % v == 0 ? HW : plane_slots(HW, v) * v;
  return channel_splits(N, span, C, v, sm_count, kReduceBlocksPerSm, kReduceMinRows);
}

// Which kernel a launch uses. `aligned`: every tensor pointer of the call is 16-byte aligned.
enum class Elementwise { kRows, kFlatUniform, kFlatLanes, kFlatScalar };
enum class Reduce { kRowsVec, kRowsScalar, kChannelsVec, kChannelsScalar, kChannelsPlanes };

FR_HD Elementwise choose_elementwise(bool channels_last, bool aligned, int C, i64 HW, int vec) {
  if (!aligned || vec == 1) return Elementwise::kFlatScalar;
  if (channels_last) return C % vec == 0 ? Elementwise::kRows : Elementwise::kFlatLanes;
  return HW % vec == 0 ? Elementwise::kFlatUniform : Elementwise::kFlatLanes;
}

FR_HD Reduce choose_reduce(bool channels_last, bool aligned, int C, i64 HW, int vec) {
  if (channels_last) return (aligned && C % vec == 0) ? Reduce::kRowsVec : Reduce::kRowsScalar;
  if (!aligned || vec == 1) return Reduce::kChannelsScalar;
  return HW % vec == 0 ? Reduce::kChannelsVec : Reduce::kChannelsPlanes;
}

// Grid of the flat kernels: one thread per vector, capped at kApplyBlocksPerSm blocks per SM (threads then
// take further vectors with a grid stride).
FR_HD i64 flat_blocks(i64 elements, int vec, int sm_count) {
  const i64 want = ceil_div(ceil_div(elements, vec), kBlock);
  const i64 cap = static_cast<i64>(sm_count < 1 ? 1 : sm_count) * kApplyBlocksPerSm;
  return clamp64(want, 1, cap);
}

// Row splits of the elementwise row kernels (at least 4 rows per thread).
FR_HD int apply_row_splits(i64 M, int C, int vec, int sm_count) {
  return row_splits(M, C, vec, sm_count, kApplyBlocksPerSm, 4);
}

}  // namespace fr
