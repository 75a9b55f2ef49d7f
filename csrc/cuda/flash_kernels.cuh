// Flash attention forward and backward on tensor cores (sm_80+): mma.sync m16n8k16 with fp32
// accumulators, ldmatrix fragments, cp.async double-buffered tiles (Dao 2023, FlashAttention-2).
//
// One template per (element type T = __half | __nv_bfloat16, padded head dim D = 64 | 128); every
// other feature is a runtime argument of AttnParams (window / causal diagonal, user mask, GQA, query
// pooling, block-sparse lists), read through the shared rules of common/attn_rules.h, which the C++
// CPU implementation runs too. Head dims below D are zero-padded in shared memory (only the real
// columns are stored). Scores are kept in the log2 domain (exp2), lse is stored in natural log.
//
// CTA = 4 warps; each warp owns 16 rows of the CTA's tile and keeps its accumulators in registers:
//   forward  : 64 query rows, key tiles of 64 streamed (double-buffered): S = Q K^T, online
//              softmax, O += P V with P reused from the S fragments as the A operand.
//   dK / dV  : 64 keys (one per warp row), query tiles of kBwdM streamed over the query heads of the
//              GQA group: S^T = K Q^T, P^T, dV += P^T dO, dP^T = V dO^T, dS^T, dK += dS^T Q.
//   dQ       : 64 query rows, key tiles of kDqN streamed: S, P, dP = dO V^T, dS, dQ += dS K;
//              pooled rows are carried back to the unpooled rows of their windows in the epilogue.
// No atomics: the backward is deterministic.
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "../common/attn_rules.h"
#include "cuda_check.cuh"
#include "device.cuh"
#include "launch.h"
#include "mma.cuh"


namespace effattn {
namespace cuda {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kPreprocessThreads = 256;

template <class T, int D>
struct Traits {
  static_assert(D % 16 == 0, "padded head dim must be a multiple of 16");
  static constexpr int kStride = D + 8;  // shared row stride (elements): 16 bytes of padding, no ldmatrix bank conflicts
  static constexpr int kFwdM = 64, kFwdN = 64;
  static constexpr int kBwdN = 64;                 // keys owned by a dK/dV CTA
  static constexpr int kBwdM = D <= 64 ? 64 : 32;  // query rows per step of a dK/dV CTA (register budget)
  static constexpr int kDqM = 64;
  static constexpr int kDqN = D <= 64 ? 64 : 32;
  static constexpr size_t kFwdSmem = size_t(kFwdM + 4 * kFwdN) * kStride * sizeof(T);
  static constexpr size_t kBwdSmem = size_t(2 * kBwdN + 4 * kBwdM) * kStride * sizeof(T) + 4 * kBwdM * sizeof(float);
  static constexpr size_t kDqSmem = size_t(2 * kDqM + 4 * kDqN) * kStride * sizeof(T);
  static_assert(size_t(4 * kDqN) * kStride * sizeof(T) >= size_t(kDqM) * D * sizeof(float),
                "the pooled dQ epilogue reuses the K/V buffers for a float tile");
};

// Rows of a (T, dim) slice can be copied in 16-byte chunks: contiguous last dim, 16-byte aligned
// base, every other stride and the dim multiples of 8 elements.
__device__ __forceinline__ bool vec_ok(int64_t addr, const Strides4& s, int dim) {
  return (addr & 15) == 0 && s.d == 1 && (s.t & 7) == 0 && (s.h & 7) == 0 && (s.b & 7) == 0 && (dim & 7) == 0;
}

// Rows [r0, r0 + ROWS) x [0, D) of the (nrows, dim) matrix at g (strides st, sd) into shared s (row
// stride S), zero past nrows / dim. cp.async when vec (the caller commits and waits), else plain loads.
template <class T, int ROWS, int D, int S>
__device__ __forceinline__ void load_tile(T* s, const T* g, int64_t st, int64_t sd, int64_t r0, int64_t nrows,
                                          int dim, bool vec) {
  if (vec) {
    constexpr int kChunks = ROWS * (D / 8);
    for (int c = threadIdx.x; c < kChunks; c += kThreads) {
      const int r = c / (D / 8), col = (c % (D / 8)) * 8;
      const bool ok = r0 + r < nrows && col < dim;
      mma::cp_async_16(s + r * S + col, ok ? g + (r0 + r) * st + col : g, ok);
    }
  } else {
    for (int e = threadIdx.x; e < ROWS * D; e += kThreads) {
      const int r = e / D, col = e % D;
      const bool ok = r0 + r < nrows && col < dim;
      s[r * S + col] = ok ? g[(r0 + r) * st + col * sd] : mma::from_float<T>(0.f);
    }
  }
}

// Query rows [m0, m0 + ROWS) of one head: copied, or pooled on load (Funnel) in fp32 and rounded to T.
template <class T, int ROWS, int D, int S>
__device__ __forceinline__ void load_q_tile(T* s, const AttnParams& p, const T* q, int64_t m0) {
  if (p.pool_stride == 1 && !p.pool_cls) {
    load_tile<T, ROWS, D, S>(s, q, p.sq.t, p.sq.d, m0, p.Tq, p.Dqk, vec_ok(p.q, p.sq, p.Dqk));
    return;
  }
  const bool is_max = p.pool_mode == kPoolMax;
  for (int e = threadIdx.x; e < ROWS * D; e += kThreads) {
    const int r = e / D, col = e % D;
    const int64_t row = m0 + r;
    float acc = 0.f;
    if (row < p.Tq && col < p.Dqk) {
      acc = is_max ? -INFINITY : 0.f;
      int count = 0;
      for (int j = 0; j < p.pool_stride; ++j) {
        int64_t src;
        if (!pool_source(p, row, j, &src)) continue;
        ++count;
        const float x = mma::to_float(q[src * p.sq.t + col * p.sq.d]);
        acc = is_max ? fmaxf(acc, x) : acc + x;
      }
      if (!is_max) acc /= static_cast<float>(count > 0 ? count : 1);
    }
    s[r * S + col] = mma::from_float<T>(acc);
  }
}

// Key rows [n0, n0 + ROWS) of one KV head: K into shared ks, V into vs (as load_tile).
template <class T, int ROWS, int D, int S>
__device__ __forceinline__ void load_kv_tiles(T* ks, T* vs, const AttnParams& p, const T* k, const T* v, int64_t n0,
                                              bool vec_k, bool vec_v) {
  load_tile<T, ROWS, D, S>(ks, k, p.sk.t, p.sk.d, n0, p.Tk, p.Dqk, vec_k);
  load_tile<T, ROWS, D, S>(vs, v, p.sv.t, p.sv.d, n0, p.Tk, p.Dv, vec_v);
}

// The tiles of a walk, double-buffered: tile i is used from buffer i % 2 while tile i + 1 is copied
// (cp.async) into the other one. load(buf, start) issues the copies of the tile at `start` into
// buffer buf; body(buf, start, partial) runs once they have landed, between two __syncthreads(), so
// that the next load may overwrite what it read. Copies the caller committed before are waited for
// with tile 0; after an empty walk nothing has been waited for (the caller ends with cp_async_wait<0>).
template <class Load, class Body>
__device__ __forceinline__ void walk_double_buffered(const TileWalk& w, Load&& load, Body&& body) {
  bool partial;
  if (w.count > 0) load(0, walk_start(w, 0, &partial));
  mma::cp_async_commit();
  for (int64_t i = 0; i < w.count; ++i) {
    const int buf = static_cast<int>(i & 1);
    // -- prefetch the next tile into the other buffer while this one is used --
    if (i + 1 < w.count) {
      load(buf ^ 1, walk_start(w, i + 1, &partial));
      mma::cp_async_commit();
      mma::cp_async_wait<1>();
    } else {
      mma::cp_async_wait<0>();
    }
    __syncthreads();
    const int64_t start = walk_start(w, i, &partial);
    body(buf, start, partial);
    __syncthreads();
  }
}

// Log2-domain lse of query row `row` (+inf past Tq and for an empty row, so that P = exp2(s - lse) = 0).
__device__ __forceinline__ float row_lse2(const float* lse, int64_t row_base, int64_t row, int64_t Tq) {
  return row < Tq ? lse_shift(lse[row_base + row]) * static_cast<float>(kLog2e) : INFINITY;
}

// acc[NB][4] += A B^T: A = 16 x K rows of shared `a` (row-major), B = NB*8 x K rows of shared `b`.
template <class T, int K, int NB, int S>
__device__ __forceinline__ void gemm_nk(float (&acc)[NB][4], const T* a, const T* b, int lane) {
  static_assert(NB % 2 == 0 && K % 16 == 0, "tile shape");
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    uint32_t af[4];
    mma::ldmatrix_x4(af, a + (lane & 15) * S + kk * 16 + (lane >> 4) * 8);
#pragma unroll
    for (int np = 0; np < NB / 2; ++np) {
      uint32_t bf[4];
      mma::ldmatrix_x4(bf, b + (np * 16 + (lane & 7) + ((lane >> 4) << 3)) * S + kk * 16 + ((lane >> 3) & 1) * 8);
      mma::mma_16816<T>(acc[2 * np], af, bf[0], bf[1]);
      mma::mma_16816<T>(acc[2 * np + 1], af, bf[2], bf[3]);
    }
  }
}

// acc[NB][4] += A B: A = 16 x K from the C fragments `pf` (rounded to T), B = K x NB*8 stored
// row-major ([k][n]) in shared `b`, read transposed by ldmatrix.
template <class T, int K, int NB, int S>
__device__ __forceinline__ void gemm_kn(float (&acc)[NB][4], const float (&pf)[K / 8][4], const T* b, int lane) {
  static_assert(NB % 2 == 0 && K % 16 == 0, "tile shape");
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    const uint32_t af[4] = {mma::pack2<T>(pf[2 * kk][0], pf[2 * kk][1]), mma::pack2<T>(pf[2 * kk][2], pf[2 * kk][3]),
                            mma::pack2<T>(pf[2 * kk + 1][0], pf[2 * kk + 1][1]),
                            mma::pack2<T>(pf[2 * kk + 1][2], pf[2 * kk + 1][3])};
#pragma unroll
    for (int np = 0; np < NB / 2; ++np) {
      uint32_t bf[4];
      mma::ldmatrix_x4_trans(bf, b + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * S + np * 16 + (lane >> 4) * 8);
      mma::mma_16816<T>(acc[2 * np], af, bf[0], bf[1]);
      mma::mma_16816<T>(acc[2 * np + 1], af, bf[2], bf[3]);
    }
  }
}

// Scale a warp's 16 x NB*8 score fragments to the log2 domain and mask them. Rows start at row0 and
// columns at col0; TRANSPOSED: rows are keys and columns queries (the dK/dV kernel's S^T).
template <int NB, bool TRANSPOSED>
__device__ __forceinline__ void scale_mask(float (&s)[NB][4], const AttnParams& p, int b, int h, int64_t row0,
                                           int64_t col0, bool partial, bool check, float scale_log2, int lane) {
  const int g = lane >> 2, c = lane & 3;
#pragma unroll
  for (int nb = 0; nb < NB; ++nb)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if (!check) {
        s[nb][e] *= scale_log2;
        continue;
      }
      const int64_t r = row0 + g + (e >> 1) * 8, col = col0 + nb * 8 + 2 * c + (e & 1);
      const int64_t qi = TRANSPOSED ? col : r, kj = TRANSPOSED ? r : col;
      if (element_visible(p, b, h, qi, kj, partial)) {
        s[nb][e] = s[nb][e] * scale_log2;
        if (p.mask_kind == kMaskAdd) s[nb][e] += static_cast<float>(mask_bias(p, b, h, qi, kj) * kLog2e);
      } else {
        s[nb][e] = -INFINITY;
      }
    }
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// A tile needs the elementwise test: window or block rule, user mask, or ragged edges.
__device__ __forceinline__ bool needs_check(const AttnParams& p, bool partial, int64_t q0, int qrows, int64_t k0,
                                            int kcols) {
  const bool rule = p.sparse ? partial : (p.window_left >= 0 || p.window_right >= 0);
  return rule || p.mask_kind != kMaskNone || q0 + qrows > p.Tq || k0 + kcols > p.Tk;
}

// ------------------------------------------------------------------------------------------------
// forward
// ------------------------------------------------------------------------------------------------
template <class T, int D>
__global__ void __launch_bounds__(kThreads) flash_fwd_kernel(const __grid_constant__ AttnParams p) {
  using Tr = Traits<T, D>;
  constexpr int BM = Tr::kFwdM, BN = Tr::kFwdN, S = Tr::kStride;
  EA_DYNAMIC_SMEM(smem_raw);
  T* Qs = reinterpret_cast<T*>(smem_raw);
  T* Ks = Qs + BM * S;     // two buffers
  T* Vs = Ks + 2 * BN * S;  // two buffers
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int b = blockIdx.z, h = blockIdx.y, kvh = h / (p.Hq / p.Hkv);
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t m1 = imin(m0 + BM, p.Tq);
  const T* q = reinterpret_cast<const T*>(p.q) + b * p.sq.b + h * p.sq.h;
  const T* k = reinterpret_cast<const T*>(p.k) + b * p.sk.b + kvh * p.sk.h;
  const T* v = reinterpret_cast<const T*>(p.v) + b * p.sv.b + kvh * p.sv.h;
  const bool vec_k = vec_ok(p.k, p.sk, p.Dqk), vec_v = vec_ok(p.v, p.sv, p.Dv);

  // -- the query tile (pooled on load); the key/value tiles stream through two buffers --
  load_q_tile<T, BM, D, S>(Qs, p, q, m0);
  mma::cp_async_commit();
  const TileWalk w = kv_walk(p, b, h, m0, m1, BN);
  float acc[D / 8][4] = {};
  float m_i[2] = {-INFINITY, -INFINITY}, l_i[2] = {0.f, 0.f};
  const float scale_log2 = static_cast<float>(p.scale * kLog2e);
  walk_double_buffered(w, [&](int buf, int64_t n0) {
    load_kv_tiles<T, BN, D, S>(Ks + buf * BN * S, Vs + buf * BN * S, p, k, v, n0, vec_k, vec_v);
  }, [&](int buf, int64_t n0, bool partial) {
    // -- S = Q K^T (log2 domain), masked --
    float s[BN / 8][4] = {};
    gemm_nk<T, D, BN / 8, S>(s, Qs + warp * 16 * S, Ks + buf * BN * S, lane);
    scale_mask<BN / 8, false>(s, p, b, h, m0 + warp * 16, n0, partial, needs_check(p, partial, m0, BM, n0, BN),
                              scale_log2, lane);
    // -- online softmax: rows g and g + 8 of the warp, reduced over the 4 lanes of a quad --
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = m_i[r];
#pragma unroll
      for (int nb = 0; nb < BN / 8; ++nb) mx = fmaxf(mx, fmaxf(s[nb][2 * r], s[nb][2 * r + 1]));
      mx = quad_max(mx);
      const float shift = softmax_shift(mx);
      const float alpha = exp2f(m_i[r] - shift);
      float sum = 0.f;
#pragma unroll
      for (int nb = 0; nb < BN / 8; ++nb) {
        s[nb][2 * r] = exp2f(s[nb][2 * r] - shift);
        s[nb][2 * r + 1] = exp2f(s[nb][2 * r + 1] - shift);
        sum += s[nb][2 * r] + s[nb][2 * r + 1];
      }
      l_i[r] = l_i[r] * alpha + sum;  // this lane's partial sum; reduced over the quad at the end
#pragma unroll
      for (int db = 0; db < D / 8; ++db) {
        acc[db][2 * r] *= alpha;
        acc[db][2 * r + 1] *= alpha;
      }
      m_i[r] = mx;
    }
    // -- O += P V --
    gemm_kn<T, BN, D / 8, S>(acc, s, Vs + buf * BN * S, lane);
  });
  mma::cp_async_wait<0>();

  // -- epilogue: normalise; a row with no visible key gets out = 0 and lse = -inf --
  T* o = reinterpret_cast<T*>(p.o) + b * p.so.b + h * p.so.h;
  float* lse = reinterpret_cast<float*>(p.lse) + (static_cast<int64_t>(b) * p.Hq + h) * p.Tq;
  const int g = lane >> 2, c = lane & 3;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float l = quad_sum(l_i[r]);
    const float f = row_scale(l);
    const int64_t row = m0 + warp * 16 + g + r * 8;
    if (row >= p.Tq) continue;
#pragma unroll
    for (int db = 0; db < D / 8; ++db)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = db * 8 + 2 * c + e;
        if (col < p.Dv) o[row * p.so.t + col * p.so.d] = mma::from_float<T>(acc[db][2 * r + e] * f);
      }
    if (c == 0) lse[row] = row_lse(m_i[r], l, true);
  }
}

// ------------------------------------------------------------------------------------------------
// backward: delta = rowsum(dO * O) - dlse
// ------------------------------------------------------------------------------------------------
template <class T>
__global__ void __launch_bounds__(kPreprocessThreads) bwd_preprocess_kernel(const __grid_constant__ AttnParams p) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= static_cast<int64_t>(p.B) * p.Hq * p.Tq) return;
  const int64_t i = idx % p.Tq, bh = idx / p.Tq;
  const int h = static_cast<int>(bh % p.Hq), b = static_cast<int>(bh / p.Hq);
  const T* o = reinterpret_cast<const T*>(p.o) + b * p.so.b + h * p.so.h + i * p.so.t;
  const T* dout = reinterpret_cast<const T*>(p.dout) + b * p.sdo.b + h * p.sdo.h + i * p.sdo.t;
  float s = 0.f;
  for (int d = 0; d < p.Dv; ++d) s += mma::to_float(o[d * p.so.d]) * mma::to_float(dout[d * p.sdo.d]);
  if (p.dlse) s -= reinterpret_cast<const float*>(p.dlse)[idx];
  reinterpret_cast<float*>(p.delta)[idx] = s;
}

// ------------------------------------------------------------------------------------------------
// backward: dK, dV of one key tile, over the query heads of its GQA group
// ------------------------------------------------------------------------------------------------
template <class T, int D>
__global__ void __launch_bounds__(kThreads) flash_bwd_dkdv_kernel(const __grid_constant__ AttnParams p) {
  using Tr = Traits<T, D>;
  constexpr int BN = Tr::kBwdN, BM = Tr::kBwdM, S = Tr::kStride;
  EA_DYNAMIC_SMEM(smem_raw);
  T* Ks = reinterpret_cast<T*>(smem_raw);
  T* Vs = Ks + BN * S;
  T* Qs = Vs + BN * S;     // two buffers
  T* dOs = Qs + 2 * BM * S;  // two buffers
  float* lse_s = reinterpret_cast<float*>(dOs + 2 * BM * S);  // two buffers: log2-domain lse (+inf: empty row)
  float* delta_s = lse_s + 2 * BM;                            // two buffers
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int b = blockIdx.z, kvh = blockIdx.y, group = p.Hq / p.Hkv;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * BN;
  const int64_t n1 = imin(n0 + BN, p.Tk);
  const T* k = reinterpret_cast<const T*>(p.k) + b * p.sk.b + kvh * p.sk.h;
  const T* v = reinterpret_cast<const T*>(p.v) + b * p.sv.b + kvh * p.sv.h;
  load_kv_tiles<T, BN, D, S>(Ks, Vs, p, k, v, n0, vec_ok(p.k, p.sk, p.Dqk), vec_ok(p.v, p.sv, p.Dv));
  mma::cp_async_commit();

  float dk[D / 8][4] = {}, dv[D / 8][4] = {};
  const float scale_log2 = static_cast<float>(p.scale * kLog2e);
  const bool vec_do = vec_ok(p.dout, p.sdo, p.Dv);
  const float* lse = reinterpret_cast<const float*>(p.lse);
  const float* delta = reinterpret_cast<const float*>(p.delta);
  for (int gi = 0; gi < group; ++gi) {
    const int h = kvh * group + gi;
    const T* q = reinterpret_cast<const T*>(p.q) + b * p.sq.b + h * p.sq.h;
    const T* dout = reinterpret_cast<const T*>(p.dout) + b * p.sdo.b + h * p.sdo.h;
    const int64_t row_base = (static_cast<int64_t>(b) * p.Hq + h) * p.Tq;
    const TileWalk w = q_walk(p, b, h, n0, n1, BM);
    walk_double_buffered(w, [&](int buf, int64_t m0) {
      load_q_tile<T, BM, D, S>(Qs + buf * BM * S, p, q, m0);
      load_tile<T, BM, D, S>(dOs + buf * BM * S, dout, p.sdo.t, p.sdo.d, m0, p.Tq, p.Dv, vec_do);
      for (int t = threadIdx.x; t < BM; t += kThreads) {
        const int64_t row = m0 + t;
        lse_s[buf * BM + t] = row_lse2(lse, row_base, row, p.Tq);
        delta_s[buf * BM + t] = row < p.Tq ? delta[row_base + row] : 0.f;
      }
    }, [&](int buf, int64_t m0, bool partial) {
      const T* Qb = Qs + buf * BM * S;
      const T* dOb = dOs + buf * BM * S;
      const float* lse_b = lse_s + buf * BM;
      const float* delta_b = delta_s + buf * BM;
      // -- P^T = exp2(S^T - lse): rows are this warp's 16 keys, columns the BM queries --
      float pt[BM / 8][4] = {};
      gemm_nk<T, D, BM / 8, S>(pt, Ks + warp * 16 * S, Qb, lane);
      scale_mask<BM / 8, true>(pt, p, b, h, n0 + warp * 16, m0, partial, needs_check(p, partial, m0, BM, n0, BN),
                               scale_log2, lane);
      const int c = lane & 3;
#pragma unroll
      for (int nb = 0; nb < BM / 8; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) pt[nb][e] = exp2f(pt[nb][e] - lse_b[nb * 8 + 2 * c + (e & 1)]);
      // -- dV += P^T dO --
      gemm_kn<T, BM, D / 8, S>(dv, pt, dOb, lane);
      // -- dP^T = V dO^T; dS^T = P^T (dP^T - delta) --
      float dst[BM / 8][4] = {};
      gemm_nk<T, D, BM / 8, S>(dst, Vs + warp * 16 * S, dOb, lane);
#pragma unroll
      for (int nb = 0; nb < BM / 8; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) dst[nb][e] = pt[nb][e] * (dst[nb][e] - delta_b[nb * 8 + 2 * c + (e & 1)]);
      // -- dK += dS^T Q --
      gemm_kn<T, BM, D / 8, S>(dk, dst, Qb, lane);
    });
  }
  mma::cp_async_wait<0>();

  T* dkp = reinterpret_cast<T*>(p.dk) + b * p.sdk.b + kvh * p.sdk.h;
  T* dvp = reinterpret_cast<T*>(p.dv) + b * p.sdv.b + kvh * p.sdv.h;
  const float scale = static_cast<float>(p.scale);
  const int g = lane >> 2, c = lane & 3;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t key = n0 + warp * 16 + g + r * 8;
    if (key >= p.Tk) continue;
#pragma unroll
    for (int db = 0; db < D / 8; ++db)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = db * 8 + 2 * c + e;
        if (col < p.Dqk) dkp[key * p.sdk.t + col * p.sdk.d] = mma::from_float<T>(dk[db][2 * r + e] * scale);
        if (col < p.Dv) dvp[key * p.sdv.t + col * p.sdv.d] = mma::from_float<T>(dv[db][2 * r + e]);
      }
  }
}

// ------------------------------------------------------------------------------------------------
// backward: dQ of one query tile
// ------------------------------------------------------------------------------------------------
template <class T, int D>
__global__ void __launch_bounds__(kThreads) flash_bwd_dq_kernel(const __grid_constant__ AttnParams p) {
  using Tr = Traits<T, D>;
  constexpr int BM = Tr::kDqM, BN = Tr::kDqN, S = Tr::kStride;
  EA_DYNAMIC_SMEM(smem_raw);
  T* Qs = reinterpret_cast<T*>(smem_raw);
  T* dOs = Qs + BM * S;
  T* Ks = dOs + BM * S;     // two buffers
  T* Vs = Ks + 2 * BN * S;  // two buffers
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane >> 2, c = lane & 3;
  const int b = blockIdx.z, h = blockIdx.y, kvh = h / (p.Hq / p.Hkv);
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t m1 = imin(m0 + BM, p.Tq);
  const T* q = reinterpret_cast<const T*>(p.q) + b * p.sq.b + h * p.sq.h;
  const T* dout = reinterpret_cast<const T*>(p.dout) + b * p.sdo.b + h * p.sdo.h;
  const T* k = reinterpret_cast<const T*>(p.k) + b * p.sk.b + kvh * p.sk.h;
  const T* v = reinterpret_cast<const T*>(p.v) + b * p.sv.b + kvh * p.sv.h;
  const bool vec_k = vec_ok(p.k, p.sk, p.Dqk), vec_v = vec_ok(p.v, p.sv, p.Dv);

  load_q_tile<T, BM, D, S>(Qs, p, q, m0);
  load_tile<T, BM, D, S>(dOs, dout, p.sdo.t, p.sdo.d, m0, p.Tq, p.Dv, vec_ok(p.dout, p.sdo, p.Dv));
  mma::cp_async_commit();
  // lse (log2 domain, +inf for an empty row) and delta of this lane's two rows
  const int64_t row_base = (static_cast<int64_t>(b) * p.Hq + h) * p.Tq;
  float lse2[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t row = m0 + warp * 16 + g + r * 8;
    lse2[r] = row_lse2(reinterpret_cast<const float*>(p.lse), row_base, row, p.Tq);
    delta[r] = row < p.Tq ? reinterpret_cast<const float*>(p.delta)[row_base + row] : 0.f;
  }
  const TileWalk w = kv_walk(p, b, h, m0, m1, BN);
  float dq[D / 8][4] = {};
  const float scale_log2 = static_cast<float>(p.scale * kLog2e);
  walk_double_buffered(w, [&](int buf, int64_t n0) {
    load_kv_tiles<T, BN, D, S>(Ks + buf * BN * S, Vs + buf * BN * S, p, k, v, n0, vec_k, vec_v);
  }, [&](int buf, int64_t n0, bool partial) {
    // -- P = exp2(S - lse) --
    float s[BN / 8][4] = {};
    gemm_nk<T, D, BN / 8, S>(s, Qs + warp * 16 * S, Ks + buf * BN * S, lane);
    scale_mask<BN / 8, false>(s, p, b, h, m0 + warp * 16, n0, partial, needs_check(p, partial, m0, BM, n0, BN),
                              scale_log2, lane);
#pragma unroll
    for (int nb = 0; nb < BN / 8; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nb][e] = exp2f(s[nb][e] - lse2[e >> 1]);
    // -- dP = dO V^T; dS = P (dP - delta) --
    float ds[BN / 8][4] = {};
    gemm_nk<T, D, BN / 8, S>(ds, dOs + warp * 16 * S, Vs + buf * BN * S, lane);
#pragma unroll
    for (int nb = 0; nb < BN / 8; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) ds[nb][e] = s[nb][e] * (ds[nb][e] - delta[e >> 1]);
    // -- dQ += dS K --
    gemm_kn<T, BN, D / 8, S>(dq, ds, Ks + buf * BN * S, lane);
  });
  mma::cp_async_wait<0>();

  const float scale = static_cast<float>(p.scale);
  T* dqp = reinterpret_cast<T*>(p.dq) + b * p.sdq.b + h * p.sdq.h;
  if (p.pool_stride == 1 && !p.pool_cls) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t row = m0 + warp * 16 + g + r * 8;
      if (row >= p.Tq) continue;
#pragma unroll
      for (int db = 0; db < D / 8; ++db)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = db * 8 + 2 * c + e;
          if (col < p.Dqk) dqp[row * p.sdq.t + col * p.sdq.d] = mma::from_float<T>(dq[db][2 * r + e] * scale);
        }
    }
    return;
  }
  // -- pooled rows: stage dQ in shared memory (over the K/V buffers), then carry each element back to
  //    the unpooled rows of its window (mean: its share; max: the first arg-max element) --
  __syncthreads();
  float* dq_s = reinterpret_cast<float*>(Ks);
#pragma unroll
  for (int r = 0; r < 2; ++r)
#pragma unroll
    for (int db = 0; db < D / 8; ++db)
#pragma unroll
      for (int e = 0; e < 2; ++e)
        dq_s[(warp * 16 + g + r * 8) * D + db * 8 + 2 * c + e] = dq[db][2 * r + e] * scale;
  __syncthreads();
  for (int idx = threadIdx.x; idx < BM * D; idx += kThreads) {
    const int r = idx / D, col = idx % D;
    const int64_t row = m0 + r;
    if (row >= p.Tq || col >= p.Dqk) continue;
    const float gval = dq_s[idx];
    float best = -INFINITY;
    if (p.pool_mode == kPoolMax)
      for (int j = 0; j < p.pool_stride; ++j) {
        int64_t src;
        if (pool_source(p, row, j, &src)) best = fmaxf(best, mma::to_float(q[src * p.sq.t + col * p.sq.d]));
      }
    bool taken = false;
    for (int j = 0; j < p.pool_stride; ++j) {
      int64_t src;
      if (!pool_source(p, row, j, &src)) continue;
      float val;
      if (p.pool_mode == kPoolMax) {
        const bool arg = !taken && mma::to_float(q[src * p.sq.t + col * p.sq.d]) == best;
        taken = taken || arg;
        val = arg ? gval : 0.f;
      } else {
        val = gval * static_cast<float>(pool_mean_share(p, row, j));
      }
      if (pool_writes(p, row, j)) dqp[src * p.sdq.t + col * p.sdq.d] = mma::from_float<T>(val);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// launchers (explicitly instantiated per head dim in flash_{fwd,bwd}_hdim*.cu)
// ------------------------------------------------------------------------------------------------
template <class K>
void set_smem(K kernel, size_t bytes) {
  EA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

inline unsigned blocks(int64_t n, int per) { return static_cast<unsigned>((n + per - 1) / per); }

template <class T, int D>
void launch_fwd(const AttnParams& p, cudaStream_t stream) {
  using Tr = Traits<T, D>;
  auto kernel = flash_fwd_kernel<T, D>;
  set_smem(kernel, Tr::kFwdSmem);
  launch_kernel("flash_fwd_kernel", kernel, dim3(blocks(p.Tq, Tr::kFwdM), p.Hq, p.B), dim3(kThreads), Tr::kFwdSmem,
                stream, p);
  EA_CUDA_CHECK(cudaGetLastError());
}

template <class T, int D>
void launch_bwd(const AttnParams& p, cudaStream_t stream) {
  using Tr = Traits<T, D>;
  const int64_t rows = static_cast<int64_t>(p.B) * p.Hq * p.Tq;
  launch_kernel("bwd_preprocess_kernel", bwd_preprocess_kernel<T>, dim3(blocks(rows, kPreprocessThreads)),
                dim3(kPreprocessThreads), 0, stream, p);
  EA_CUDA_CHECK(cudaGetLastError());
  auto dkdv = flash_bwd_dkdv_kernel<T, D>;
  set_smem(dkdv, Tr::kBwdSmem);
  launch_kernel("flash_bwd_dkdv_kernel", dkdv, dim3(blocks(p.Tk, Tr::kBwdN), p.Hkv, p.B), dim3(kThreads),
                Tr::kBwdSmem, stream, p);
  EA_CUDA_CHECK(cudaGetLastError());
  auto dq = flash_bwd_dq_kernel<T, D>;
  set_smem(dq, Tr::kDqSmem);
  launch_kernel("flash_bwd_dq_kernel", dq, dim3(blocks(p.Tq, Tr::kDqM), p.Hq, p.B), dim3(kThreads), Tr::kDqSmem,
                stream, p);
  EA_CUDA_CHECK(cudaGetLastError());
}

}  // namespace cuda
}  // namespace effattn
