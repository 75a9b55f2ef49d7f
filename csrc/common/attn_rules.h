// The scalar rules of effattn's attention, shared by the CUDA kernels and the C++ CPU implementation.
//
// Everything here is ``__host__ __device__`` (plain ``inline`` for the host compiler), so the CPU
// implementation, which the tests run on machines without a GPU, exercises the same code as the GPU
// kernels for: the visibility rule (window with the bottom-right diagonal offset, pooled query
// positions, block-sparse rule, user mask), the pooling windows of Funnel's query pooling, the key /
// query ranges a tile visits, the block-list traversal of a BlockMask, and the online-softmax update.
// Semantics: effattn/reference.py and effattn/block_mask.py.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "params.h"

#if defined(__CUDACC__)
#define EA_HD __host__ __device__ __forceinline__
#else
#define EA_HD inline
#endif

namespace effattn {

constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

template <class A>
EA_HD A neg_inf() {
  return -static_cast<A>(INFINITY);
}

EA_HD int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
EA_HD int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
EA_HD int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
EA_HD int64_t ceil_div(int64_t a, int64_t b) { return -floor_div(-a, b); }

// ------------------------------------------------------------------------------------------------
// element conversions (bit-exact, host and device): fp16 / bf16 storage <-> float
// ------------------------------------------------------------------------------------------------
EA_HD float bits_as_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

EA_HD uint32_t float_as_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

EA_HD float bf16_bits_to_float(uint16_t h) { return bits_as_float(static_cast<uint32_t>(h) << 16); }

EA_HD float fp16_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0x1fu) return bits_as_float(sign | 0x7f800000u | (mant << 13));  // inf / nan
  if (exp != 0) return bits_as_float(sign | ((exp + 112u) << 23) | (mant << 13));
  if (mant == 0) return bits_as_float(sign);
  // subnormal: normalise
  int e = -1;
  do {
    ++e;
    mant <<= 1;
  } while ((mant & 0x400u) == 0);
  return bits_as_float(sign | ((112u - static_cast<uint32_t>(e)) << 23) | ((mant & 0x3ffu) << 13));
}

// Round to nearest even, as torch's conversions do.
EA_HD uint16_t float_to_bf16_bits(float f) {
  const uint32_t u = float_as_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet nan
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

EA_HD uint16_t float_to_fp16_bits(float f) {
  const uint32_t u = float_as_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // nan
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to inf (>= 65520)
  if (a < 0x38800000u) {                                               // subnormal or zero in fp16
    if (a < 0x33000000u) return sign;                                  // below half the smallest subnormal
    const uint32_t e = a >> 23;
    const uint32_t mant = (a & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - e;  // 14 .. 24 - 1
    const uint32_t q = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1u);
    const uint32_t r = q + ((rem > half || (rem == half && (q & 1u))) ? 1u : 0u);
    return static_cast<uint16_t>(sign | r);
  }
  const uint32_t r = a + 0xfffu + ((a >> 13) & 1u) - 0x38000000u;
  return static_cast<uint16_t>(sign | (r >> 13));
}

// Element ``i`` of a tensor of dtype ``dt`` at address ``base``, as a float (masks of any float dtype).
EA_HD double load_as_double(int64_t base, int dt, int64_t i) {
  switch (dt) {
    case kFloat32: return reinterpret_cast<const float*>(base)[i];
    case kFloat16: return fp16_bits_to_float(reinterpret_cast<const uint16_t*>(base)[i]);
    case kBFloat16: return bf16_bits_to_float(reinterpret_cast<const uint16_t*>(base)[i]);
    case kFloat64: return reinterpret_cast<const double*>(base)[i];
    default: return reinterpret_cast<const uint8_t*>(base)[i] != 0 ? 1.0 : 0.0;
  }
}

// ------------------------------------------------------------------------------------------------
// positions and visibility
// ------------------------------------------------------------------------------------------------
// Key-grid position of query row ``row``: ``row * stride + diag_offset`` (the pooled [cls] row at 0).
EA_HD int64_t query_pos(const AttnParams& p, int64_t row) {
  const int64_t pos = row * p.pool_stride + p.diag_offset;
  return p.pool_cls ? imax(pos, 0) : pos;
}

// ALiBi's distance of key ``col`` from query row ``row``: measured from the row's position on the key
// grid, the one the window rule uses.
EA_HD int64_t alibi_distance(const AttnParams& p, int64_t row, int64_t col) {
  const int64_t d = query_pos(p, row) - col;
  return d < 0 ? -d : d;
}

// ``-left <= d <= right`` with a negative bound unbounded.
EA_HD bool window_ok(int64_t d, int64_t left, int64_t right) {
  return (left < 0 || d >= -left) && (right < 0 || d <= right);
}

// The BlockMask rule inside PARTIAL blocks: (window and segment) or global.
EA_HD bool rule_visible(const AttnParams& p, int b, int64_t row, int64_t col) {
  if (p.rule_n_global > 0 && (row < p.rule_n_global || col < p.rule_n_global)) return true;
  if (!window_ok(col - row - p.rule_diag_offset, p.rule_window_left, p.rule_window_right)) return false;
  if (p.q_seg != 0) {
    const int32_t qs = reinterpret_cast<const int32_t*>(p.q_seg)[b * p.q_seg_sb + row * p.q_seg_st];
    const int32_t ks = reinterpret_cast<const int32_t*>(p.kv_seg)[b * p.kv_seg_sb + col * p.kv_seg_st];
    return qs == ks;
  }
  return true;
}

EA_HD int64_t mask_offset(const AttnParams& p, int b, int h, int64_t row, int64_t col) {
  return b * p.smask.b + h * p.smask.h + row * p.smask.t + col * p.smask.d;
}

// Visibility of key ``col`` for query row ``row`` of head ``h`` (bounds, window or block rule, bool
// mask). ``partial``: in a PARTIAL block of a block mask (the rule applies); ignored when dense.
EA_HD bool element_visible(const AttnParams& p, int b, int h, int64_t row, int64_t col, bool partial) {
  if (row >= p.Tq || col >= p.Tk) return false;
  if (p.sparse) {
    if (partial && !rule_visible(p, b, row, col)) return false;
  } else if (!window_ok(col - query_pos(p, row), p.window_left, p.window_right)) {
    return false;
  }
  if (p.mask_kind == kMaskBool)
    return reinterpret_cast<const uint8_t*>(p.mask)[mask_offset(p, b, h, row, col)] != 0;
  return true;
}

// Additive mask value (natural-log units) of a visible element; 0 without an additive mask.
EA_HD double mask_bias(const AttnParams& p, int b, int h, int64_t row, int64_t col) {
  if (p.mask_kind != kMaskAdd) return 0.0;
  return load_as_double(p.mask, p.mask_dtype, mask_offset(p, b, h, row, col));
}

// ------------------------------------------------------------------------------------------------
// query pooling (Funnel): window element j of pooled row ``row``
// ------------------------------------------------------------------------------------------------
// Row ``m = row * stride + j`` of x' (x itself, or [x_0] + x with separate_cls, whose row m is row
// max(m - 1, 0) of x). Returns false when it is past the end of x' (a short last window).
EA_HD bool pool_source(const AttnParams& p, int64_t row, int j, int64_t* src) {
  const int64_t m = row * p.pool_stride + j;
  *src = p.pool_cls ? imax(m - 1, 0) : m;
  return row < p.Tq && m < p.T_src;
}

// Number of rows in the pooling window of pooled row ``row`` (the mean's divisor).
EA_HD int pool_count(const AttnParams& p, int64_t row) {
  return static_cast<int>(imax(imin(p.T_src - row * p.pool_stride, p.pool_stride), 0));
}

// Share of pooled row ``row``'s gradient that window element ``j`` carries under mean pooling (0 if
// it carries none). With separate_cls, elements 0 and 1 of window 0 are both x_0: element 0 carries
// both shares and element 1 none, so that every row of x is written exactly once.
EA_HD double pool_mean_share(const AttnParams& p, int64_t row, int j) {
  const int count = pool_count(p, row);
  if (count <= 0) return 0.0;
  double share = 1.0 / count;
  if (p.pool_cls && row == 0) {
    if (j == 1) return 0.0;
    if (j == 0) share *= (p.T_src < 2 ? p.T_src : 2);
  }
  return share;
}

// Whether window element ``j`` of pooled row ``row`` writes its unpooled row in the dQ epilogue.
EA_HD bool pool_writes(const AttnParams& p, int64_t row, int j) {
  int64_t src;
  return pool_source(p, row, j, &src) && !(p.pool_cls && row == 0 && j == 1);
}

// ------------------------------------------------------------------------------------------------
// ranges a tile visits (dense): keys for a block of query rows, query rows for a block of keys
// ------------------------------------------------------------------------------------------------
// Keys ``[*lo, *hi)`` that some row of ``[m0, m1)`` may see; ``*lo`` is a multiple of ``block_n``.
EA_HD void kv_range(const AttnParams& p, int64_t m0, int64_t m1, int block_n, int64_t* lo, int64_t* hi) {
  const int64_t pos_first = query_pos(p, m0), pos_last = query_pos(p, m1 - 1);
  int64_t a = p.window_left >= 0 ? pos_first - p.window_left : 0;
  int64_t z = p.window_right >= 0 ? pos_last + p.window_right + 1 : p.Tk;
  a = imax(a, 0);
  z = imin(z, p.Tk);
  a = (a / block_n) * block_n;
  *lo = a;
  *hi = imax(z, a);
}

// Query rows ``[*lo, *hi)`` that may see some key of ``[n0, n1)``; ``*lo`` is a multiple of ``block_m``.
EA_HD void q_range(const AttnParams& p, int64_t n0, int64_t n1, int block_m, int64_t* lo, int64_t* hi) {
  const int64_t n_last = n1 - 1;
  int64_t a = 0, z = p.Tq;
  if (p.pool_stride == 1) {
    if (p.window_right >= 0) a = n0 - p.diag_offset - p.window_right;
    if (p.window_left >= 0) z = n_last - p.diag_offset + p.window_left + 1;
  } else {
    // rows i with n0 - right <= i * stride + diag_offset <= n_last + left (row 0 at 0 with [cls])
    if (p.window_right >= 0) {
      a = ceil_div(imax(n0 - p.window_right - p.diag_offset, 0), p.pool_stride);
      if (p.pool_cls && n0 - p.window_right <= 0) a = 0;
    }
    if (p.window_left >= 0) {
      const int64_t x = n_last + p.window_left - p.diag_offset;
      z = x >= 0 ? x / p.pool_stride + 1 : 0;
      if (p.pool_cls) z = imax(z, 1);
    }
  }
  a = imax(a, 0);
  z = imin(z, p.Tq);
  a = (a / block_m) * block_m;
  *lo = a;
  *hi = imax(z, a);
}

// ------------------------------------------------------------------------------------------------
// tile walks: the tiles of one axis that a tile of the other axis visits, dense or from block lists
// ------------------------------------------------------------------------------------------------
struct TileWalk {
  int64_t count = 0;  // tiles to visit
  // dense: tile i starts at lo + i * tile
  int64_t lo = 0;
  int tile = 0;
  // sparse: n_part PARTIAL blocks then the FULL ones, each cut into `sub` tiles
  int sparse = 0;
  int64_t n_part = 0;
  int sub = 1, block = 0;
  const int32_t* part_idx = nullptr;
  const int32_t* full_idx = nullptr;
  int64_t part_sn = 0, full_sn = 0;
};

EA_HD int64_t list_count(const BlockList& l, int b, int h, int64_t blk) {
  return reinterpret_cast<const int32_t*>(l.num)[b * l.num_sb + h * l.num_sh + blk * l.num_sm];
}

EA_HD const int32_t* list_row(const BlockList& l, int b, int h, int64_t blk) {
  return reinterpret_cast<const int32_t*>(l.idx) + (b * l.idx_sb + h * l.idx_sh + blk * l.idx_sm);
}

// Tiles of ``tile`` elements along one axis, for the tile ``[x0, x1)`` of the other axis, from the
// lists ``part`` / ``full`` of the block holding x0 (``own_block`` elements per block of the owning
// axis, ``block`` per block of the walked axis; tile divides block). Dense: ``[lo, hi)``.
EA_HD TileWalk sparse_walk(const BlockList& part, const BlockList& full, int b, int h, int64_t x0, int own_block,
                           int block, int tile) {
  TileWalk w;
  const int64_t blk = x0 / own_block;
  w.sparse = 1;
  w.tile = tile;
  w.block = block;
  w.sub = block / tile;
  w.n_part = list_count(part, b, h, blk);
  const int64_t n_full = list_count(full, b, h, blk);
  w.part_idx = list_row(part, b, h, blk);
  w.full_idx = list_row(full, b, h, blk);
  w.part_sn = part.idx_sn;
  w.full_sn = full.idx_sn;
  w.count = (w.n_part + n_full) * w.sub;
  return w;
}

EA_HD TileWalk dense_walk(int64_t lo, int64_t hi, int tile) {
  TileWalk w;
  w.lo = lo;
  w.tile = tile;
  w.count = hi > lo ? (hi - lo + tile - 1) / tile : 0;
  return w;
}

// First element of tile ``i``; ``*partial``: whether the block rule applies there.
EA_HD int64_t walk_start(const TileWalk& w, int64_t i, bool* partial) {
  if (!w.sparse) {
    *partial = true;
    return w.lo + i * w.tile;
  }
  const int64_t li = i / w.sub, s = i % w.sub;
  *partial = li < w.n_part;
  const int64_t blk = *partial ? w.part_idx[li * w.part_sn] : w.full_idx[(li - w.n_part) * w.full_sn];
  return blk * w.block + s * w.tile;
}

// Key tiles visited by query rows ``[m0, m1)`` of head ``h``.
EA_HD TileWalk kv_walk(const AttnParams& p, int b, int h, int64_t m0, int64_t m1, int tile_n) {
  if (p.sparse) return sparse_walk(p.kv_partial, p.kv_full, b, h, m0, p.block_q, p.block_kv, tile_n);
  int64_t lo, hi;
  kv_range(p, m0, m1, tile_n, &lo, &hi);
  return dense_walk(lo, hi, tile_n);
}

// Query tiles of head ``h`` that see some key of ``[n0, n1)``.
EA_HD TileWalk q_walk(const AttnParams& p, int b, int h, int64_t n0, int64_t n1, int tile_m) {
  if (p.sparse) return sparse_walk(p.q_partial, p.q_full, b, h, n0, p.block_kv, p.block_q, tile_m);
  int64_t lo, hi;
  q_range(p, n0, n1, tile_m, &lo, &hi);
  return dense_walk(lo, hi, tile_m);
}

// ------------------------------------------------------------------------------------------------
// online softmax (FlashAttention-2): running max m and sum l per row
// ------------------------------------------------------------------------------------------------
// The max that exponents are taken against: a row that has seen no visible key keeps m = -inf, and
// is shifted by 0 so that exp(-inf - 0) = 0 rather than NaN.
template <class A>
EA_HD A softmax_shift(A m) {
  return m == neg_inf<A>() ? A(0) : m;
}

// The log-sum-exp (natural log) of a finished row, from its running max ``m`` and sum ``l``: -inf for
// a row with no visible key. ``base2``: m and l are of exp2 of log2-domain scores (the CUDA kernels).
template <class A>
EA_HD A row_lse(A m, A l, bool base2) {
  if (l == A(0)) return neg_inf<A>();
  const double md = static_cast<double>(m), ld = static_cast<double>(l);
  return static_cast<A>(base2 ? (md + ::log2(ld)) * kLn2 : md + ::log(ld));
}

// Factor of the finished output row: 1 / l, or 0 for a row with no visible key (its output is 0).
template <class A>
EA_HD A row_scale(A l) {
  return l == A(0) ? A(0) : A(1) / l;
}

// The probability of a score against a stored lse: 0 where the row saw no key (lse = -inf).
template <class A>
EA_HD A lse_shift(A lse) {
  return lse == neg_inf<A>() ? static_cast<A>(INFINITY) : lse;
}

}  // namespace effattn
