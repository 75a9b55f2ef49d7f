// The fast C++ CPU attention (float32, float16, bfloat16): FlashAttention-2 on host memory.
//
// Forward, per (batch, head, tile of query rows), over the key tiles the tile may see (the shared
// tile walks of common/attn_rules.h: dense ranges from the window rule, or the PARTIAL and FULL block
// lists of a BlockMask), in exp2-domain scores (Q pre-scaled by scale * log2 e):
//     S = Q K^T + mask * log2(e), -inf where invisible
//     m' = max(m, rowmax S);  P = exp2(S - m');  l = l * exp2(m - m') + rowsum P
//     O = O * exp2(m - m') + P V
// then out = O / l and lse = (m + log2 l) * ln 2 (out 0, lse -inf for a row that sees no key).
// The score modifiers act on S before the masks, in the same domain: the soft cap S = c t with
// t = tanh(S / c), c = softcap * log2 e (the cap of the natural-log scores), then ALiBi's
// -slope * log2(e) * |pos - key| (pos: the row's position on the key grid, as the window rule's).
// Backward, with delta = rowsum(dO * O) - dlse and P = exp2(S - lse * log2(e)) recomputed:
//     dP = dO V^T,  dS = P * (dP - delta)  (times 1 - t^2 under a soft cap, t recomputed with S)
//     per (batch, kv head, key tile), over the query tiles of every head of its GQA group:
//         dV += P^T dO,  dK += dS^T Q * scale
//     per (batch, head, query tile), over its key tiles:
//         dQ += dS K * scale   (scattered back through the query pooling)
// or, fused, per (batch, kv head): its key tiles in order, each adding dS K to dQ accumulators of the
// head's rows (5 GEMMs per pair of tiles instead of 7), when there are enough kv heads to feed the
// threads (fused_backward). Every output element is written by exactly one task and accumulated in a
// fixed order, so the results do not depend on the number of threads (no atomics).
//
// Dropout (common/philox.h) multiplies P by Z = keep / (1 - p) element by element, the keep bits drawn
// in the tile from the Philox counters (key, query row, b * Hq + h) of the element, so that the forward
// and every backward pass draw the same bits and nothing is stored: the forward's m, l (hence lse) use
// the undropped P and O += (P Z) V; the backward takes dV += (P Z)^T dO and dS = P * (dP Z - delta).
//
// Layouts. A task packs the tile it owns once, transposed where a GEMM needs it as its B operand, and
// reads the tiles it walks through strided views (the GEMM's A operand takes any strides), in place
// when they are fp32. Hence the forward and dQ compute S^T = K Q^T (key c, row r at S^T[c][r]): the
// softmax of a row runs down a column, rows side by side in a vector, with no horizontal reduction;
// dK/dV compute S = Q K^T with K^T packed once per key tile. P V, dS K, P^T dO and dS^T Q then read
// P or dS through strides, never transposed. Masks and rules are applied element by element only in
// the tiles that need them (a dense tile entirely inside the window skips the rule; a FULL block of a
// BlockMask skips its rule; a tile the window proves empty is skipped altogether).
//
// fp16 / bf16 inputs are converted to fp32 on load into per-thread tiles (F16C / shifts, never whole
// tensors), outputs on store. Tile widths are padded with zeros to a multiple of kPad, so the SIMD
// micro-kernels of simd.h never see a ragged edge; padded rows or columns of S are computed but never
// read. The tiles are chosen here (pass_tiles; params.tile_m / tile_n are the tiles of the scalar
// float64 path only); in sparse mode they are capped to divisors of the BlockMask block sizes, so
// that a tile never straddles two blocks.
#include "attn_tiled.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <utility>
#include <vector>

#include "../common/attn_rules.h"
#include "../common/check.h"
#include "../common/philox.h"
#include "host_types.h"
#include "simd.h"
#include "thread_pool.h"
#include "varlen.h"

namespace effattn {
namespace cpu {
namespace {

// n elements at stride sd of src into dst (fp32, contiguous).
inline void convert_in(const Kernels&, const float* src, int64_t sd, int n, float* dst) {
  if (sd == 1) {
    std::memcpy(dst, src, sizeof(float) * static_cast<size_t>(n));
    return;
  }
  for (int i = 0; i < n; ++i) dst[i] = src[i * sd];
}
inline void convert_in(const Kernels& kr, const Half* src, int64_t sd, int n, float* dst) {
  if (sd == 1) return kr.fp16_to_f32(reinterpret_cast<const uint16_t*>(src), dst, n);
  for (int i = 0; i < n; ++i) dst[i] = to_f32(src[i * sd]);
}
inline void convert_in(const Kernels& kr, const BFloat16* src, int64_t sd, int n, float* dst) {
  if (sd == 1) return kr.bf16_to_f32(reinterpret_cast<const uint16_t*>(src), dst, n);
  for (int i = 0; i < n; ++i) dst[i] = to_f32(src[i * sd]);
}

// n fp32 values into dst at stride sd.
inline void convert_out(const Kernels&, const float* src, int n, float* dst, int64_t sd) {
  if (sd == 1) {
    std::memcpy(dst, src, sizeof(float) * static_cast<size_t>(n));
    return;
  }
  for (int i = 0; i < n; ++i) dst[i * sd] = src[i];
}
inline void convert_out(const Kernels& kr, const float* src, int n, Half* dst, int64_t sd) {
  if (sd == 1) return kr.f32_to_fp16(src, reinterpret_cast<uint16_t*>(dst), n);
  for (int i = 0; i < n; ++i) put(&dst[i * sd], src[i]);
}
inline void convert_out(const Kernels& kr, const float* src, int n, BFloat16* dst, int64_t sd) {
  if (sd == 1) return kr.f32_to_bf16(src, reinterpret_cast<uint16_t*>(dst), n);
  for (int i = 0; i < n; ++i) put(&dst[i * sd], src[i]);
}

constexpr float kLog2eF = static_cast<float>(kLog2e);
// Decoding (Tiled::decodes): at most this many query rows per head, and at least this many keys per
// part of a split-KV task.
constexpr int kDecodeMaxQ = 16;
constexpr int64_t kDecodeMinKeys = 512;

// Largest divisor of ``block`` that is at most ``cap`` (a tile must not straddle two blocks).
int tile_within(int block, int cap) {
  for (int t = std::min(block, cap); t > 1; --t)
    if (block % t == 0) return t;
  return 1;
}

// What the visibility rule says of a whole tile.
enum TileKind { kTileEmpty, kTileFull, kTileRule };

// dst[d * ldd + r] = src[r * lds + d] * a for r < rows, d < D; zero for rows <= r < rows_pad.
void transpose(const float* src, int64_t lds, int rows, int D, float* dst, int64_t ldd, int rows_pad, float a) {
  constexpr int kB = 16;
  for (int r0 = 0; r0 < rows; r0 += kB)
    for (int d0 = 0; d0 < D; d0 += kB) {
      const int r1 = std::min(rows, r0 + kB), d1 = std::min(D, d0 + kB);
      for (int d = d0; d < d1; ++d)
        for (int r = r0; r < r1; ++r) dst[d * ldd + r] = src[r * lds + d] * a;
    }
  for (int d = 0; d < D; ++d)
    for (int r = rows; r < rows_pad; ++r) dst[d * ldd + r] = 0.f;
}

// A strided fp32 view of a tile: element (i, k) at ptr[i * si + k * sk].
struct View {
  const float* ptr;
  int64_t si, sk;
};

template <class T>
struct Tiled {
  const AttnParams& p;
  const Kernels& kr;
  int group, BM, BN, Dp, Dvp, BMp, BNp, threads;
  float c2;  // scale * log2(e): scores in the exp2 domain
  bool dropout;      // dropout_p > 0
  DropoutTile drop;  // its seed, threshold and scale (the counters set per row by drop_at)
  float cap2;        // softcap * log2(e), the cap of the exp2-domain scores; 0 = none
  bool alibi;        // ALiBi slopes given
  bool score_mods;   // a soft cap or ALiBi: tiles pass through modify_tile(_t) before the masks
  std::vector<float> key_index;  // 0, 1, ..., BNp - 1: the keys of a row of a plain-layout tile (ALiBi)

  // ``bm`` x ``bn``: the tiles before the cap by the block sizes of a BlockMask.
  Tiled(const AttnParams& params, int bm, int bn)
      : p(params),
        kr(kernels()),
        group(params.Hq / params.Hkv),
        BM(params.sparse ? tile_within(params.block_q, bm) : bm),
        BN(params.sparse ? tile_within(params.block_kv, bn) : bn),
        Dp(pad_to(params.Dqk)),
        Dvp(pad_to(params.Dv)),
        BMp(pad_to(BM)),
        BNp(pad_to(BN)),
        threads(resolve_threads(params.num_threads)),
        c2(static_cast<float>(params.scale * kLog2e)),
        dropout(params.dropout_p > 0.0),
        drop{params.seed, dropout_threshold(params.dropout_p),
             static_cast<float>(dropout_scale(dropout_threshold(params.dropout_p))), 0, 0, 0},
        cap2(static_cast<float>(params.softcap * kLog2e)),
        alibi(params.alibi != 0),
        score_mods(params.softcap > 0.0 || alibi),
        key_index(alibi ? BNp : 0) {
    std::iota(key_index.begin(), key_index.end(), 0.f);
  }

  // The dropout draws of a row of a tile whose element 0 is (key, row) of head h of batch b.
  DropoutTile drop_at(int b, int h, int64_t key, int64_t row) const {
    DropoutTile d = drop;
    d.key = static_cast<uint32_t>(key);
    d.row = static_cast<uint32_t>(row);
    d.bh = static_cast<uint32_t>(static_cast<int64_t>(b) * p.Hq + h);
    return d;
  }

  bool pooled() const { return p.pool_stride != 1 || p.pool_cls; }

  // Offset of the (b, h) row of lse, delta and dlse ((B, Hq, stat_sh), stat_sh = Tq unless set).
  int64_t stat_at(int b, int h) const {
    return (static_cast<int64_t>(b) * p.Hq + h) * (p.stat_sh ? p.stat_sh : p.Tq);
  }

  // Rows [r0, r0 + rows) of a (B, H, T, D) tensor at (b, h) into dst (rows x ld, zero-padded to ld).
  void load_rows(int64_t base, const Strides4& s, int b, int h, int64_t r0, int rows, int D, float* dst,
                 int ld) const {
    const T* x = cptr<T>(base) + b * s.b + h * s.h;
    for (int r = 0; r < rows; ++r) {
      float* d = dst + static_cast<int64_t>(r) * ld;
      convert_in(kr, x + (r0 + r) * s.t, s.d, D, d);
      std::fill(d + D, d + ld, 0.f);
    }
  }

  // The same rows as an fp32 view: the tensor in place when it is fp32 (and, with ``row_major``,
  // contiguous rows of a multiple of kPad, as the B operand of a GEMM needs), else converted into
  // ``scratch`` (rows x pad(D)).
  View rows_view(int64_t base, const Strides4& s, int b, int h, int64_t r0, int rows, int D, bool row_major,
                 float* scratch) const {
    if constexpr (std::is_same<T, float>::value) {
      if (!row_major || (s.d == 1 && D % kPad == 0))
        return {cptr<float>(base) + b * s.b + h * s.h + r0 * s.t, s.t, s.d};
    }
    load_rows(base, s, b, h, r0, rows, D, scratch, pad_to(D));
    return {scratch, pad_to(D), 1};
  }

  // Query rows [m0, m0 + rows) of head h into dst (rows x Dp), pooled on load with pooling.
  void load_q(int b, int h, int64_t m0, int rows, float* dst, float* tmp) const {
    if (!pooled()) return load_rows(p.q, p.sq, b, h, m0, rows, p.Dqk, dst, Dp);
    const T* q = cptr<T>(p.q) + b * p.sq.b + h * p.sq.h;
    const bool is_max = p.pool_mode == kPoolMax;
    for (int r = 0; r < rows; ++r) {
      float* d = dst + static_cast<int64_t>(r) * Dp;
      const int64_t row = m0 + r;
      std::fill(d, d + Dp, 0.f);
      if (is_max) std::fill(d, d + p.Dqk, neg_inf<float>());
      int count = 0;
      for (int j = 0; j < p.pool_stride; ++j) {
        int64_t src;
        if (!pool_source(p, row, j, &src)) continue;
        ++count;
        convert_in(kr, q + src * p.sq.t, p.sq.d, p.Dqk, tmp);
        for (int e = 0; e < p.Dqk; ++e) d[e] = is_max ? std::max(d[e], tmp[e]) : d[e] + tmp[e];
      }
      if (!is_max) {
        const float n = static_cast<float>(std::max(count, 1));
        for (int e = 0; e < p.Dqk; ++e) d[e] /= n;
      }
    }
  }

  // The query tile as an operand: pooled on load, or the tensor in place when possible.
  View q_view(int b, int h, int64_t m0, int rows, bool row_major, float* scratch, float* tmp) const {
    if (!pooled()) return rows_view(p.q, p.sq, b, h, m0, rows, p.Dqk, row_major, scratch);
    load_q(b, h, m0, rows, scratch, tmp);
    return {scratch, Dp, 1};
  }

  // Dense window rule over a tile: empty, fully visible, or to be applied element by element.
  TileKind classify(bool partial, int64_t m0, int rows, int64_t n0, int cols) const {
    if (p.sparse) return partial ? kTileRule : kTileFull;
    const int64_t d_min = n0 - query_pos(p, m0 + rows - 1);
    const int64_t d_max = n0 + cols - 1 - query_pos(p, m0);
    if ((p.window_left >= 0 && d_max < -p.window_left) || (p.window_right >= 0 && d_min > p.window_right))
      return kTileEmpty;
    if ((p.window_left < 0 || d_min >= -p.window_left) && (p.window_right < 0 || d_max <= p.window_right))
      return kTileFull;
    return kTileRule;
  }

  bool needs_mask(TileKind kind) const { return kind == kTileRule || p.mask_kind != kMaskNone; }

  // -inf in a row of scores s (key n0 + c at s[c * sc]) outside the window -left <= key - pos <= right
  // (a negative bound is unbounded), except at keys below ``keep_below`` (global tokens).
  static void window_cut(float* s, int64_t sc, int64_t n0, int cols, int64_t pos, int64_t left, int64_t right,
                         int64_t keep_below) {
    const float ninf = neg_inf<float>();
    const int64_t lo = left >= 0 ? imin(imax(pos - left - n0, 0), cols) : 0;
    const int64_t hi = right >= 0 ? imax(imin(pos + right - n0 + 1, cols), lo) : cols;
    for (int64_t c = imax(keep_below - n0, 0); c < lo; ++c) s[c * sc] = ninf;
    for (int64_t c = imax(hi, keep_below - n0); c < cols; ++c) s[c * sc] = ninf;
  }

  // ALiBi's slope of head h of batch b, for exp2-domain scores.
  float slope2(int b, int h) const { return cptr<float>(p.alibi)[b * p.alibi_sb + h] * kLog2eF; }

  // The score modifiers on the exp2-domain tile (m0, n0) of the transposed layout (key c, row r at
  // St[c * BMp + r]), before its masks: the soft cap, its derivative 1 - t^2 into dcap (same layout)
  // unless null, then ALiBi. ``dist``: BMp floats of scratch.
  void modify_tile_t(float* St, int b, int h, int64_t m0, int64_t n0, int cols, float* dcap, float* dist) const {
    if (cap2 > 0.f)
      for (int c = 0; c < cols; ++c) {
        const int64_t at = static_cast<int64_t>(c) * BMp;
        kr.softcap(St + at, BMp, cap2, dcap ? dcap + at : nullptr);
      }
    if (alibi) {
      // the rows' distances from key n0 (exact in fp32 below 2^24), then from key n0 + c, column by column
      for (int r = 0; r < BMp; ++r) dist[r] = static_cast<float>(query_pos(p, m0 + r) - n0);
      const float slope = slope2(b, h);
      for (int c = 0; c < cols; ++c)
        kr.alibi(St + static_cast<int64_t>(c) * BMp, dist, static_cast<float>(c), slope, BMp);
    }
  }

  // The same on the plain layout (row r, key c at S[r * BNp + c]); dcap as S, written when capped.
  void modify_tile(float* S, int b, int h, int64_t m0, int rows, int64_t n0, float* dcap) const {
    if (cap2 > 0.f)
      for (int r = 0; r < rows; ++r) {
        const int64_t at = static_cast<int64_t>(r) * BNp;
        kr.softcap(S + at, BNp, cap2, dcap + at);
      }
    if (alibi) {
      const float slope = slope2(b, h);
      for (int r = 0; r < rows; ++r) {
        const float pos = static_cast<float>(query_pos(p, m0 + r) - n0);  // the row's, from key n0
        kr.alibi(S + static_cast<int64_t>(r) * BNp, key_index.data(), pos, slope, BNp);
      }
    }
  }

  // Exp2-domain scores of tile (m0, n0), element (r, c) at S[r * sr + c * sc]: -inf where the rule or
  // the bool mask hides a key, the additive mask added (in log2 units).
  void mask_tile(float* S, int64_t sr, int64_t sc, int b, int h, int64_t m0, int rows, int64_t n0, int cols,
                 TileKind kind) const {
    const float ninf = neg_inf<float>();
    for (int r = 0; r < rows; ++r) {
      float* s = S + r * sr;
      const int64_t row = m0 + r;
      if (kind == kTileRule) {
        if (!p.sparse) {
          window_cut(s, sc, n0, cols, query_pos(p, row), p.window_left, p.window_right, 0);
        } else if (p.q_seg != 0) {
          for (int c = 0; c < cols; ++c)
            if (!rule_visible(p, b, row, n0 + c)) s[c * sc] = ninf;
        } else if (row >= p.rule_n_global) {  // rule_visible without segments: global rows see everything
          window_cut(s, sc, n0, cols, row + p.rule_diag_offset, p.rule_window_left, p.rule_window_right,
                     p.rule_n_global);
        }
      }
      if (p.mask_kind == kMaskBool) {
        const uint8_t* mk = cptr<uint8_t>(p.mask) + mask_offset(p, b, h, row, n0);
        for (int c = 0; c < cols; ++c)
          if (!mk[c * p.smask.d]) s[c * sc] = ninf;
      } else if (p.mask_kind == kMaskAdd) {
        const int64_t off = mask_offset(p, b, h, row, n0);
        if (p.mask_dtype == kFloat32) {
          const float* mk = cptr<float>(p.mask) + off;
          for (int c = 0; c < cols; ++c) s[c * sc] += mk[c * p.smask.d] * kLog2eF;
        } else {
          for (int c = 0; c < cols; ++c)
            s[c * sc] += static_cast<float>(load_as_double(p.mask, p.mask_dtype, off + c * p.smask.d) * kLog2e);
        }
      }
    }
  }

  // n tasks shared by the pool through an atomic counter; ``make()`` builds a worker's scratch,
  // ``task(scratch, i)`` runs task i.
  template <class Make, class Task>
  void parallel(int64_t n, Make make, Task task) const {
    if (n <= 0) return;
    std::atomic<int64_t> next{0};
    const int t = static_cast<int>(std::min<int64_t>(threads, n));
    run_parallel(t, [&](int) {
      auto scratch = make();
      for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n;) task(scratch, i);
    });
  }

  static std::vector<float> buf(int64_t a, int64_t b) { return std::vector<float>(static_cast<size_t>(a * b)); }

  // A task per (batch, head, query tile), the last query tiles first (under a causal rule they are the
  // longest): ``tile(scratch, b, h, m0)``, the scratch built by ``make()`` once per worker.
  template <class Make, class Tile>
  void per_query_tile(Make make, Tile tile) const {
    parallel(query_tile_tasks(), make, [&](auto& w, int64_t task) { query_tile_at(task, w, tile); });
  }

  int64_t query_tile_tasks() const { return static_cast<int64_t>(p.B) * p.Hq * ((p.Tq + BM - 1) / BM); }

  template <class W, class Tile>
  void query_tile_at(int64_t task, W& w, Tile tile) const {
    const int64_t nqt = (p.Tq + BM - 1) / BM;
    const int64_t qi = nqt - 1 - task % nqt;
    const int64_t bh = task / nqt;
    tile(w, static_cast<int>(bh / p.Hq), static_cast<int>(bh % p.Hq), qi * BM);
  }

  // The query tile [m0, m0 + rows) of head h as Q^T * scale * log2 e into qt (Dqk x BMp), via q (BM x Dp).
  void load_qt(int b, int h, int64_t m0, int rows, float* q, float* qt, float* tmp) const {
    load_q(b, h, m0, rows, q, tmp);
    transpose(q, Dp, rows, p.Dqk, qt, BMp, BMp, c2);
  }

  // The key tiles that query tile [m0, m0 + rows) of head h may see, in walk order:
  // ``visit(n0, cols, kind)``; tiles the rule proves empty are skipped.
  template <class Visit>
  void walk_key_tiles(int b, int h, int64_t m0, int rows, Visit visit) const {
    const TileWalk walk = kv_walk(p, b, h, m0, m0 + rows, BN);
    for (int64_t i = 0; i < walk.count; ++i) {
      bool partial;
      const int64_t n0 = walk_start(walk, i, &partial);
      if (n0 >= p.Tk) continue;
      const int cols = static_cast<int>(std::min<int64_t>(BN, p.Tk - n0));
      const TileKind kind = classify(partial, m0, rows, n0, cols);
      if (kind != kTileEmpty) visit(n0, cols, kind);
    }
  }

  // ------------------------------------------------------------------------------------------------
  // forward: the transposed layout, S^T = K (Q^T scale log2 e), so that the softmax of a query row
  // runs down a column (rows of the tile side by side in a vector, no horizontal reductions), and
  // K, V are read in place when they are fp32
  // ------------------------------------------------------------------------------------------------
  struct FwdScratch {
    std::vector<float> q, qt, k, v, st, acc, m, l, alpha, tmp, dist;
  };

  FwdScratch make_fwd() const {
    FwdScratch w;
    w.q = buf(BM, Dp);
    w.qt = buf(p.Dqk, BMp);
    w.k = buf(BN, Dp);
    w.v = buf(BN, Dvp);
    w.st = buf(BN, BMp);
    w.acc = buf(BM, Dvp);
    w.m = buf(1, BMp);
    w.l = buf(1, BMp);
    w.alpha = buf(1, BMp);
    w.tmp = buf(1, std::max(Dp, Dvp));
    w.dist = buf(1, alibi ? BMp : 0);
    return w;
  }

  void forward() const {
    if (decodes()) return decode();
    per_query_tile([&] { return make_fwd(); },
                   [&](FwdScratch& w, int b, int h, int64_t m0) { forward_tile(w, b, h, m0); });
  }

  void forward_tile(FwdScratch& w, int b, int h, int64_t m0) const {
    const int kvh = h / group;
    const int rows = static_cast<int>(std::min<int64_t>(BM, p.Tq - m0));
    load_qt(b, h, m0, rows, w.q.data(), w.qt.data(), w.tmp.data());
    std::fill(w.m.begin(), w.m.end(), neg_inf<float>());
    std::fill(w.l.begin(), w.l.end(), 0.f);
    std::fill(w.acc.begin(), w.acc.end(), 0.f);
    float* St = w.st.data();
    walk_key_tiles(b, h, m0, rows, [&](int64_t n0, int cols, TileKind kind) {
      // -- S^T = K Q^T, modified, masked --
      const View K = rows_view(p.k, p.sk, b, kvh, n0, cols, p.Dqk, false, w.k.data());
      kr.gemm(cols, BMp, p.Dqk, K.ptr, K.si, K.sk, w.qt.data(), BMp, St, BMp, false);
      if (score_mods) modify_tile_t(St, b, h, m0, n0, cols, nullptr, w.dist.data());
      if (needs_mask(kind)) mask_tile(St, 1, BMp, b, h, m0, rows, n0, cols, kind);
      // -- online softmax (m, l of the undropped P), dropout, then O = O * alpha + (P Z) V --
      kr.softmax_t(St, cols, BMp, BMp, w.m.data(), w.l.data(), w.alpha.data());
      if (dropout)
        for (int c = 0; c < cols; ++c)
          kr.dropout(St + static_cast<int64_t>(c) * BMp, BMp, drop_at(b, h, n0 + c, m0), true);
      for (int r = 0; r < rows; ++r)
        if (w.alpha[r] != 1.f) kr.scale(w.acc.data() + static_cast<int64_t>(r) * Dvp, Dvp, w.alpha[r]);
      const View V = rows_view(p.v, p.sv, b, kvh, n0, cols, p.Dv, true, w.v.data());
      kr.gemm(rows, Dvp, cols, St, 1, BMp, V.ptr, V.si, w.acc.data(), Dvp, true);
    });
    // -- epilogue: normalise; an empty row gives out = 0, lse = -inf --
    T* o = mptr<T>(p.o) + b * p.so.b + h * p.so.h;
    float* lse = mptr<float>(p.lse) + stat_at(b, h);
    for (int r = 0; r < rows; ++r) {
      float* a = w.acc.data() + static_cast<int64_t>(r) * Dvp;
      kr.scale(a, Dvp, row_scale(w.l[r]));
      convert_out(kr, a, p.Dv, o + (m0 + r) * p.so.t, p.so.d);
      lse[m0 + r] = row_lse(w.m[r], w.l[r], true);
    }
  }

  // ------------------------------------------------------------------------------------------------
  // decoding: a few query rows against many keys (flash-decoding on the host). A task owns one kv
  // head and a range of its keys, and stacks the rows of every query head of its GQA group into one
  // tile (group * Tq rows, padded to kPad, not BM): the cache is read once per kv head, not once per
  // query head, and no GEMM column is spent on padding rows. With several ranges (split-KV) each part
  // keeps its normalised rows and their lse, and decode_merge weighs the parts by exp2(lse - max).
  // ------------------------------------------------------------------------------------------------
  int decode_rows() const { return group * p.Tq; }

  // Whether the forward runs as decoding: no pooling, block mask, user mask or dropout, at most
  // kDecodeMaxQ query rows per head, and the group's stacked rows fit the tile.
  bool decodes() const {
    return !pooled() && !p.sparse && p.mask_kind == kMaskNone && !dropout && p.Tq <= kDecodeMaxQ &&
           decode_rows() <= BM;
  }

  // Floats of one part of a split task: per stacked row its normalised output, then its lse (log2).
  int64_t decode_part_size() const { return static_cast<int64_t>(decode_rows()) * (p.Dv + 1); }

  // Keys of one part: ``splits`` parts of whole key tiles; ``tasks`` kv-head tasks before splitting
  // (all sequences of a varlen call) are split until there are about 4 per hardware thread (a
  // property of the machine, never of num_threads, so the results do not depend on it), each part
  // holding at least kDecodeMinKeys keys. $EFFATTN_CPU_DECODE_SPLITS forces the number (tests).
  int64_t decode_chunk(int64_t tasks) const {
    const char* env = std::getenv("EFFATTN_CPU_DECODE_SPLITS");
    const int64_t want = (4 * static_cast<int64_t>(resolve_threads(0)) + tasks - 1) / std::max<int64_t>(tasks, 1);
    const int64_t splits = env ? std::max<int64_t>(1, std::atoll(env))
                               : std::clamp<int64_t>(want, 1, std::max<int64_t>(1, p.Tk / kDecodeMinKeys));
    const int64_t tiles = (p.Tk + BN - 1) / BN;
    return std::max<int64_t>(1, (tiles + splits - 1) / splits) * BN;
  }

  int64_t decode_splits(int64_t chunk) const { return std::max<int64_t>(1, (p.Tk + chunk - 1) / chunk); }

  // Keys [k_lo, k_hi) of kv head kvh of batch b for the group's stacked rows (row r: head
  // kvh * group + r / Tq, query row r % Tq). ``part`` null: the rows' out and lse are written; else
  // the part (decode_part_size floats).
  void decode_task(FwdScratch& w, int b, int kvh, int64_t k_lo, int64_t k_hi, float* part) const {
    const int nq = p.Tq, R = decode_rows(), Rp = pad_to(R);
    for (int g = 0; g < group; ++g)
      load_rows(p.q, p.sq, b, kvh * group + g, 0, nq, p.Dqk, w.q.data() + static_cast<int64_t>(g) * nq * Dp, Dp);
    transpose(w.q.data(), Dp, R, p.Dqk, w.qt.data(), Rp, Rp, c2);
    std::fill(w.m.begin(), w.m.begin() + Rp, neg_inf<float>());
    std::fill(w.l.begin(), w.l.begin() + Rp, 0.f);
    std::fill(w.acc.begin(), w.acc.begin() + static_cast<int64_t>(R) * Dvp, 0.f);
    float* St = w.st.data();
    for (int64_t n0 = k_lo; n0 < k_hi; n0 += BN) {
      const int cols = static_cast<int>(std::min<int64_t>(BN, k_hi - n0));
      const TileKind kind = classify(false, 0, nq, n0, cols);
      if (kind == kTileEmpty) continue;
      // -- S^T = K Q^T (Rp columns), the score modifiers and the window per stacked row --
      const View K = rows_view(p.k, p.sk, b, kvh, n0, cols, p.Dqk, false, w.k.data());
      kr.gemm(cols, Rp, p.Dqk, K.ptr, K.si, K.sk, w.qt.data(), Rp, St, Rp, false);
      if (cap2 > 0.f)
        for (int c = 0; c < cols; ++c) kr.softcap(St + static_cast<int64_t>(c) * Rp, Rp, cap2, nullptr);
      if (alibi || kind == kTileRule)
        for (int r = 0; r < R; ++r) {
          const int64_t pos = query_pos(p, r % nq);
          if (alibi) {
            const float slope = slope2(b, kvh * group + r / nq);
            for (int c = 0; c < cols; ++c)
              St[static_cast<int64_t>(c) * Rp + r] -= slope * static_cast<float>(std::llabs(pos - n0 - c));
          }
          if (kind == kTileRule) window_cut(St + r, Rp, n0, cols, pos, p.window_left, p.window_right, 0);
        }
      // -- online softmax, O = O * alpha + P V --
      kr.softmax_t(St, cols, Rp, Rp, w.m.data(), w.l.data(), w.alpha.data());
      for (int r = 0; r < R; ++r)
        if (w.alpha[r] != 1.f) kr.scale(w.acc.data() + static_cast<int64_t>(r) * Dvp, Dvp, w.alpha[r]);
      const View V = rows_view(p.v, p.sv, b, kvh, n0, cols, p.Dv, true, w.v.data());
      kr.gemm(R, Dvp, cols, St, 1, Rp, V.ptr, V.si, w.acc.data(), Dvp, true);
    }
    for (int r = 0; r < R; ++r) {
      float* a = w.acc.data() + static_cast<int64_t>(r) * Dvp;
      kr.scale(a, Dvp, row_scale(w.l[r]));
      const float lse2 = w.l[r] == 0.f ? neg_inf<float>() : w.m[r] + std::log2(w.l[r]);
      if (part) {
        float* out = part + static_cast<int64_t>(r) * (p.Dv + 1);
        std::copy(a, a + p.Dv, out);
        out[p.Dv] = lse2;
      } else {
        store_decoded_row(a, b, kvh * group + r / nq, r % nq, lse2);
      }
    }
  }

  // Row ``row`` of head h (fp32, Dv values) into out, and its lse (natural log) from log2 units.
  void store_decoded_row(const float* a, int b, int h, int64_t row, float lse2) const {
    T* o = mptr<T>(p.o) + b * p.so.b + h * p.so.h;
    convert_out(kr, a, p.Dv, o + row * p.so.t, p.so.d);
    mptr<float>(p.lse)[stat_at(b, h) + row] = lse2 == neg_inf<float>() ? lse2 : lse2 * static_cast<float>(kLn2);
  }

  // The stacked rows of kv head kvh of batch b from ``splits`` parts: o = sum_i w_i o_i / sum_i w_i
  // with w_i = exp2(lse_i - max_i lse_i), lse = max + log2(sum_i w_i); 0 and -inf where no part saw a key.
  void decode_merge(const float* parts, int64_t splits, int b, int kvh, float* acc) const {
    const int nq = p.Tq, stride = p.Dv + 1;
    const int64_t size = decode_part_size();
    for (int r = 0; r < decode_rows(); ++r) {
      float top = neg_inf<float>();
      for (int64_t i = 0; i < splits; ++i) top = std::max(top, parts[i * size + r * stride + p.Dv]);
      std::fill(acc, acc + p.Dv, 0.f);
      float sum = 0.f;
      if (top != neg_inf<float>())
        for (int64_t i = 0; i < splits; ++i) {
          const float* part = parts + i * size + r * stride;
          const float wgt = std::exp2(part[p.Dv] - top);
          sum += wgt;
          for (int d = 0; d < p.Dv; ++d) acc[d] += wgt * part[d];
        }
      const float inv = sum > 0.f ? 1.f / sum : 0.f;
      for (int d = 0; d < p.Dv; ++d) acc[d] *= inv;
      store_decoded_row(acc, b, kvh * group + r / nq, r % nq, sum > 0.f ? top + std::log2(sum) : neg_inf<float>());
    }
  }

  // How the keys of a decoding problem are split (decode_chunk), and its tasks: B * Hkv * splits.
  struct DecodePlan {
    int64_t chunk, splits;
  };
  DecodePlan decode_plan(int64_t tasks) const {
    const int64_t chunk = decode_chunk(tasks);
    return {chunk, decode_splits(chunk)};
  }
  int64_t decode_tasks(const DecodePlan& d) const { return static_cast<int64_t>(p.B) * p.Hkv * d.splits; }

  // Task t of the plan; ``parts``: decode_tasks(d) parts when d.splits > 1.
  void decode_at(FwdScratch& w, const DecodePlan& d, int64_t t, float* parts) const {
    const int64_t bk = t / d.splits, lo = (t % d.splits) * d.chunk;
    decode_task(w, static_cast<int>(bk / p.Hkv), static_cast<int>(bk % p.Hkv), lo, std::min<int64_t>(p.Tk, lo + d.chunk),
                d.splits > 1 ? parts + t * decode_part_size() : nullptr);
  }

  // The merge of (batch, kv head) bk's parts.
  void decode_merge_at(const DecodePlan& d, int64_t bk, const float* parts, float* acc) const {
    decode_merge(parts + bk * d.splits * decode_part_size(), d.splits, static_cast<int>(bk / p.Hkv),
                 static_cast<int>(bk % p.Hkv), acc);
  }

  void decode() const {
    const DecodePlan d = decode_plan(static_cast<int64_t>(p.B) * p.Hkv);
    std::vector<float> parts(d.splits > 1 ? static_cast<size_t>(decode_tasks(d) * decode_part_size()) : 0);
    parallel(decode_tasks(d), [&] { return make_fwd(); },
             [&](FwdScratch& w, int64_t t) { decode_at(w, d, t, parts.data()); });
    if (d.splits > 1)
      parallel(static_cast<int64_t>(p.B) * p.Hkv, [&] { return buf(1, Dvp); },
               [&](std::vector<float>& acc, int64_t bk) { decode_merge_at(d, bk, parts.data(), acc.data()); });
  }

  // ------------------------------------------------------------------------------------------------
  // backward
  // ------------------------------------------------------------------------------------------------
  // delta = rowsum(dO * O) - dlse, per (b, h) in parallel.
  void preprocess() const {
    parallel(
        static_cast<int64_t>(p.B) * p.Hq, [&] { return buf(2, Dvp); },
        [&](std::vector<float>& tmp, int64_t bh) { preprocess_at(bh, tmp.data()); });
  }

  // delta of the rows of (batch, head) bh; ``tmp``: 2 * Dvp floats.
  void preprocess_at(int64_t bh, float* tmp) const {
    const float* dlse = p.dlse ? cptr<float>(p.dlse) : nullptr;
    float* delta = mptr<float>(p.delta);
    const int b = static_cast<int>(bh / p.Hq), h = static_cast<int>(bh % p.Hq);
    const T* o = cptr<T>(p.o) + b * p.so.b + h * p.so.h;
    const T* dout = cptr<T>(p.dout) + b * p.sdo.b + h * p.sdo.h;
    float* x = tmp;
    float* y = x + Dvp;
    for (int64_t i = 0; i < p.Tq; ++i) {
      convert_in(kr, o + i * p.so.t, p.so.d, p.Dv, x);
      convert_in(kr, dout + i * p.sdo.t, p.sdo.d, p.Dv, y);
      float s = 0.f;
      for (int d = 0; d < p.Dv; ++d) s += x[d] * y[d];
      const int64_t at = stat_at(b, h) + i;
      delta[at] = s - (dlse ? dlse[at] : 0.f);
    }
  }

  // lse * log2 e (+inf for a row without keys: its P is 0) and delta of rows [m0, m0 + rows), zero-padded.
  void row_stats(int b, int h, int64_t m0, int rows, float* lse2, float* delta) const {
    const int64_t base = stat_at(b, h) + m0;
    for (int r = 0; r < BMp; ++r) {
      lse2[r] = r < rows ? lse_shift(cptr<float>(p.lse)[base + r]) * kLog2eF : 0.f;
      delta[r] = r < rows ? cptr<float>(p.delta)[base + r] : 0.f;
    }
  }

  // dK, dV per key tile in the plain layout, S = Q (K^T scale log2 e): K^T and V^T are packed once per
  // task, Q and dO are read in place when they are fp32.
  struct DkdvScratch {
    std::vector<float> k, kt, v, vt, q, dout, s, dp, dk, dv, lse2, delta, tmp, dcap;
  };

  DkdvScratch make_dkdv() const {
    DkdvScratch w;
    w.k = buf(BN, Dp);
    w.kt = buf(p.Dqk, BNp);
    w.v = buf(BN, Dvp);
    w.vt = buf(p.Dv, BNp);
    w.q = buf(BM, Dp);
    w.dout = buf(BM, Dvp);
    w.s = buf(BM, BNp);
    w.dp = buf(BM, BNp);
    w.dk = buf(BN, Dp);
    w.dv = buf(BN, Dvp);
    w.lse2 = buf(1, BMp);
    w.delta = buf(1, BMp);
    w.tmp = buf(1, std::max(Dp, Dvp));
    w.dcap = buf(cap2 > 0.f ? BM : 0, BNp);
    return w;
  }

  void backward_dkdv() const {
    parallel(key_tile_tasks(), [&] { return make_dkdv(); }, [&](DkdvScratch& w, int64_t task) { dkdv_at(w, task); });
  }

  int64_t key_tile_tasks() const { return static_cast<int64_t>(p.B) * p.Hkv * ((p.Tk + BN - 1) / BN); }

  void dkdv_at(DkdvScratch& w, int64_t task) const {
    const int64_t nkt = (p.Tk + BN - 1) / BN;
    const int64_t bk = task / nkt;
    dkdv_tile(w, static_cast<int>(bk / p.Hkv), static_cast<int>(bk % p.Hkv), (task % nkt) * BN);
  }

  // ``dq``: null, or (fused backward) the dQ accumulators of the group's heads, group x Tq x Dp, to
  // which this key tile adds dS K.
  void dkdv_tile(DkdvScratch& w, int b, int kvh, int64_t n0, float* dq = nullptr) const {
    const int cols = static_cast<int>(std::min<int64_t>(BN, p.Tk - n0));
    load_rows(p.k, p.sk, b, kvh, n0, cols, p.Dqk, w.k.data(), Dp);
    transpose(w.k.data(), Dp, cols, p.Dqk, w.kt.data(), BNp, BNp, c2);
    load_rows(p.v, p.sv, b, kvh, n0, cols, p.Dv, w.v.data(), Dvp);
    transpose(w.v.data(), Dvp, cols, p.Dv, w.vt.data(), BNp, BNp, 1.f);
    std::fill(w.dk.begin(), w.dk.end(), 0.f);
    std::fill(w.dv.begin(), w.dv.end(), 0.f);
    float* S = w.s.data();
    float* dP = w.dp.data();
    for (int g = 0; g < group; ++g) {
      const int h = kvh * group + g;
      const TileWalk walk = q_walk(p, b, h, n0, n0 + cols, BM);
      for (int64_t i = 0; i < walk.count; ++i) {
        bool partial;
        const int64_t m0 = walk_start(walk, i, &partial);
        if (m0 >= p.Tq) continue;
        const int rows = static_cast<int>(std::min<int64_t>(BM, p.Tq - m0));
        const TileKind kind = classify(partial, m0, rows, n0, cols);
        if (kind == kTileEmpty) continue;
        const View Q = q_view(b, h, m0, rows, true, w.q.data(), w.tmp.data());
        const View dO = rows_view(p.dout, p.sdo, b, h, m0, rows, p.Dv, true, w.dout.data());
        row_stats(b, h, m0, rows, w.lse2.data(), w.delta.data());
        // -- S = Q K^T, P = exp2(S - lse), dP = dO V^T, dS = P (dP Z - delta) (1 - t^2), P Z in place of P --
        kr.gemm(rows, BNp, p.Dqk, Q.ptr, Q.si, Q.sk, w.kt.data(), BNp, S, BNp, false);
        if (score_mods) modify_tile(S, b, h, m0, rows, n0, w.dcap.data());
        if (needs_mask(kind)) mask_tile(S, BNp, 1, b, h, m0, rows, n0, cols, kind);
        kr.gemm(rows, BNp, p.Dv, dO.ptr, dO.si, dO.sk, w.vt.data(), BNp, dP, BNp, false);
        for (int r = 0; r < rows; ++r) {
          float* s = S + static_cast<int64_t>(r) * BNp;
          float* dp = dP + static_cast<int64_t>(r) * BNp;
          kr.exp2_sub(s, BNp, w.lse2[r]);
          if (dropout)
            kr.dropout_dsoftmax(dp, s, BNp, w.delta[r], drop_at(b, h, n0, m0 + r));
          else
            kr.dsoftmax(dp, s, BNp, w.delta[r]);
        }
        if (cap2 > 0.f)
          for (int r = 0; r < rows; ++r) kr.mul(dP + static_cast<int64_t>(r) * BNp, w.dcap.data() + r * BNp, BNp);
        // -- dV += (P Z)^T dO, dK += dS^T Q --
        kr.gemm(cols, Dvp, rows, S, 1, BNp, dO.ptr, dO.si, w.dv.data(), Dvp, true);
        kr.gemm(cols, Dp, rows, dP, 1, BNp, Q.ptr, Q.si, w.dk.data(), Dp, true);
        if (dq) kr.gemm(rows, Dp, cols, dP, BNp, 1, w.k.data(), Dp, dq + (g * p.Tq + m0) * Dp, Dp, true);
      }
    }
    T* dk = mptr<T>(p.dk) + b * p.sdk.b + kvh * p.sdk.h;
    T* dv = mptr<T>(p.dv) + b * p.sdv.b + kvh * p.sdv.h;
    const float scale = static_cast<float>(p.scale);
    for (int c = 0; c < cols; ++c) {
      float* a = w.dk.data() + static_cast<int64_t>(c) * Dp;
      kr.scale(a, Dp, scale);
      convert_out(kr, a, p.Dqk, dk + (n0 + c) * p.sdk.t, p.sdk.d);
      convert_out(kr, w.dv.data() + static_cast<int64_t>(c) * Dvp, p.Dv, dv + (n0 + c) * p.sdv.t, p.sdv.d);
    }
  }

  // The fused backward: a task owns a whole kv head and walks its key tiles in order, adding dS K of
  // every tile to per-task dQ accumulators (group x Tq x Dp) as it goes: 5 GEMMs per pair of tiles
  // instead of the 7 of backward_dkdv + backward_dq, and still no atomics. Used when there are
  // enough (batch, kv head) tasks to feed the machine (fused_backward).
  void backward_fused() const {
    parallel(
        static_cast<int64_t>(p.B) * p.Hkv,
        [&] {
          std::pair<DkdvScratch, std::vector<float>> w{make_dkdv(), buf(static_cast<int64_t>(group) * p.Tq, Dp)};
          return w;
        },
        [&](std::pair<DkdvScratch, std::vector<float>>& w, int64_t bk) {
          const int b = static_cast<int>(bk / p.Hkv), kvh = static_cast<int>(bk % p.Hkv);
          float* dq = w.second.data();
          std::fill(w.second.begin(), w.second.end(), 0.f);
          for (int64_t n0 = 0; n0 < p.Tk; n0 += BN) dkdv_tile(w.first, b, kvh, n0, dq);
          for (int g = 0; g < group; ++g)
            for (int64_t m0 = 0; m0 < p.Tq; m0 += BM)
              store_dq_rows(dq + (g * p.Tq + m0) * Dp, w.first.tmp.data(), b, kvh * group + g, m0,
                            static_cast<int>(std::min<int64_t>(BM, p.Tq - m0)));
        });
  }

  // dQ per query tile in the transposed layout, S^T = K (Q^T scale log2 e): Q^T and dO^T are packed
  // once per task, K and V are read in place when they are fp32.
  struct DqScratch {
    std::vector<float> q, qt, dout, dot, k, v, st, dpt, dq, lse2, delta, tmp, dcap, dist;
  };

  DqScratch make_dq() const {
    DqScratch w;
    w.q = buf(BM, Dp);
    w.qt = buf(p.Dqk, BMp);
    w.dout = buf(BM, Dvp);
    w.dot = buf(p.Dv, BMp);
    w.k = buf(BN, Dp);
    w.v = buf(BN, Dvp);
    w.st = buf(BN, BMp);
    w.dpt = buf(BN, BMp);
    w.dq = buf(BM, Dp);
    w.lse2 = buf(1, BMp);
    w.delta = buf(1, BMp);
    w.tmp = buf(1, std::max(Dp, Dvp));
    w.dcap = buf(cap2 > 0.f ? BN : 0, BMp);
    w.dist = buf(1, alibi ? BMp : 0);
    return w;
  }

  void backward_dq() const {
    per_query_tile([&] { return make_dq(); }, [&](DqScratch& w, int b, int h, int64_t m0) { dq_tile(w, b, h, m0); });
  }

  void dq_tile(DqScratch& w, int b, int h, int64_t m0) const {
    const int kvh = h / group;
    const int rows = static_cast<int>(std::min<int64_t>(BM, p.Tq - m0));
    load_qt(b, h, m0, rows, w.q.data(), w.qt.data(), w.tmp.data());
    load_rows(p.dout, p.sdo, b, h, m0, rows, p.Dv, w.dout.data(), Dvp);
    transpose(w.dout.data(), Dvp, rows, p.Dv, w.dot.data(), BMp, BMp, 1.f);
    row_stats(b, h, m0, rows, w.lse2.data(), w.delta.data());
    std::fill(w.dq.begin(), w.dq.end(), 0.f);
    float* St = w.st.data();
    float* dPt = w.dpt.data();
    walk_key_tiles(b, h, m0, rows, [&](int64_t n0, int cols, TileKind kind) {
      // -- S^T = K Q^T, P^T = exp2(S^T - lse), dP^T = V dO^T, dS^T = P^T (dP^T Z - delta) (1 - t^2) --
      const View K = rows_view(p.k, p.sk, b, kvh, n0, cols, p.Dqk, true, w.k.data());
      const View V = rows_view(p.v, p.sv, b, kvh, n0, cols, p.Dv, false, w.v.data());
      kr.gemm(cols, BMp, p.Dqk, K.ptr, K.si, K.sk, w.qt.data(), BMp, St, BMp, false);
      if (score_mods) modify_tile_t(St, b, h, m0, n0, cols, w.dcap.data(), w.dist.data());
      if (needs_mask(kind)) mask_tile(St, 1, BMp, b, h, m0, rows, n0, cols, kind);
      kr.gemm(cols, BMp, p.Dv, V.ptr, V.si, V.sk, w.dot.data(), BMp, dPt, BMp, false);
      for (int c = 0; c < cols; ++c) {
        float* s = St + static_cast<int64_t>(c) * BMp;
        float* dp = dPt + static_cast<int64_t>(c) * BMp;
        kr.exp2_sub_vec(s, w.lse2.data(), BMp);
        if (dropout) kr.dropout(dp, BMp, drop_at(b, h, n0 + c, m0), true);
        kr.dsoftmax_vec(dp, s, w.delta.data(), BMp);
      }
      if (cap2 > 0.f)
        for (int c = 0; c < cols; ++c) kr.mul(dPt + static_cast<int64_t>(c) * BMp, w.dcap.data() + c * BMp, BMp);
      // -- dQ += dS K --
      kr.gemm(rows, Dp, cols, dPt, 1, BMp, K.ptr, K.si, w.dq.data(), Dp, true);
    });
    store_dq(w, b, h, m0, rows);
  }

  // dQ of pooled rows goes back to the unpooled rows of their windows (mean: shared as
  // pool_mean_share says; max: to the first arg-max element).
  void store_dq(DqScratch& w, int b, int h, int64_t m0, int rows) const {
    store_dq_rows(w.dq.data(), w.tmp.data(), b, h, m0, rows);
  }

  // dq: rows x Dp, unscaled (scaled here, in place); tmp: Dp floats.
  void store_dq_rows(float* dq, float* tmp, int b, int h, int64_t m0, int rows) const {
    T* out = mptr<T>(p.dq) + b * p.sdq.b + h * p.sdq.h;
    const float scale = static_cast<float>(p.scale);
    for (int r = 0; r < rows; ++r) kr.scale(dq + static_cast<int64_t>(r) * Dp, Dp, scale);
    if (!pooled()) {
      for (int r = 0; r < rows; ++r)
        convert_out(kr, dq + static_cast<int64_t>(r) * Dp, p.Dqk, out + (m0 + r) * p.sdq.t, p.sdq.d);
      return;
    }
    const T* q = cptr<T>(p.q) + b * p.sq.b + h * p.sq.h;
    float* val = tmp;
    std::vector<float> best(p.Dqk), x(p.Dqk);
    std::vector<char> taken(p.Dqk);
    for (int r = 0; r < rows; ++r) {
      const int64_t row = m0 + r;
      const float* g = dq + static_cast<int64_t>(r) * Dp;
      if (p.pool_mode == kPoolMax) {
        std::fill(best.begin(), best.end(), neg_inf<float>());
        for (int j = 0; j < p.pool_stride; ++j) {
          int64_t src;
          if (!pool_source(p, row, j, &src)) continue;
          convert_in(kr, q + src * p.sq.t, p.sq.d, p.Dqk, x.data());
          for (int d = 0; d < p.Dqk; ++d) best[d] = std::max(best[d], x[d]);
        }
        std::fill(taken.begin(), taken.end(), 0);
      }
      for (int j = 0; j < p.pool_stride; ++j) {
        int64_t src;
        if (!pool_source(p, row, j, &src)) continue;
        if (p.pool_mode == kPoolMax) {
          convert_in(kr, q + src * p.sq.t, p.sq.d, p.Dqk, x.data());
          for (int d = 0; d < p.Dqk; ++d) {
            const bool arg = !taken[d] && x[d] == best[d];
            taken[d] = taken[d] || arg;
            val[d] = arg ? g[d] : 0.f;
          }
        } else {
          const float share = static_cast<float>(pool_mean_share(p, row, j));
          for (int d = 0; d < p.Dqk; ++d) val[d] = g[d] * share;
        }
        if (pool_writes(p, row, j)) convert_out(kr, val, p.Dqk, out + src * p.sdq.t, p.sdq.d);
      }
    }
  }
};

// Tiles of a pass. fp32 operands are read in place, so 64 x 64 suffices; fp16 / bf16 tiles are
// converted on load, once per pair of tiles for the tile of the side a task does not own, so that
// side's tile is doubled, halving the conversions per FLOP.
struct Tiles {
  int own, other;
};
Tiles pass_tiles(const AttnParams& p) {
  return p.dtype == kFloat32 ? Tiles{kTileM, kTileN} : Tiles{2 * kTileM, kTileN};
}

template <class T>
void forward_as(const AttnParams& p) {
  const Tiles t = pass_tiles(p);
  Tiled<T>(p, t.own, t.other).forward();
}

// Whether the backward runs fused (a task per (batch, kv head): fewer GEMMs) or split (tasks per key
// tile for dK, dV and per query tile for dQ: more parallelism). The choice depends on the shape and
// the machine, never on params.num_threads, so that the results do not depend on the thread count.
// $EFFATTN_CPU_BACKWARD = "fused" or "split" forces one (tests).
bool fused_backward(const AttnParams& p) {
  const char* env = std::getenv("EFFATTN_CPU_BACKWARD");
  if (env && std::strcmp(env, "fused") == 0) return true;
  if (env && std::strcmp(env, "split") == 0) return false;
  const int64_t tasks = static_cast<int64_t>(p.B) * p.Hkv;
  const int64_t dq_bytes = static_cast<int64_t>(p.Hq / p.Hkv) * p.Tq * pad_to(p.Dqk) * 4;
  return tasks >= 2 * static_cast<int64_t>(resolve_threads(0)) && dq_bytes <= (int64_t{64} << 20);
}

template <class T>
void backward_as(const AttnParams& p) {
  const Tiles t = pass_tiles(p);
  const Tiled<T> by_keys(p, t.other, t.own);  // dK, dV: a task owns a key tile
  by_keys.preprocess();
  if (fused_backward(p)) return by_keys.backward_fused();
  by_keys.backward_dkdv();
  Tiled<T>(p, t.own, t.other).backward_dq();  // dQ: a task owns a query tile
}

// ------------------------------------------------------------------------------------------------
// varlen: one dense problem per sequence (sequence_params), their tasks run as one list
// ------------------------------------------------------------------------------------------------
// Runs the tasks of several passes as one list shared by the pool (pass i has counts[i] tasks):
// ``run(scratch, i, t)``, the scratch built by ``make()`` once per worker.
template <class Make, class Run>
void parallel_passes(int threads, const std::vector<int64_t>& counts, Make make, Run run) {
  std::vector<int64_t> start(counts.size() + 1, 0);
  std::partial_sum(counts.begin(), counts.end(), start.begin() + 1);
  const int64_t n = start.back();
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  run_parallel(static_cast<int>(std::min<int64_t>(threads, n)), [&](int) {
    auto scratch = make();
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n;) {
      const size_t pass = static_cast<size_t>(std::upper_bound(start.begin(), start.end(), i) - start.begin() - 1);
      run(scratch, pass, i - start[pass]);
    }
  });
}

// The sequences of a varlen call that have rows and keys, as dense problems, the most work first.
std::vector<AttnParams> varlen_sequences(const AttnParams& p) {
  std::vector<AttnParams> seqs;
  for (int s = 0; s < p.B; ++s) {
    AttnParams q = sequence_params(p, s);
    if (q.Tq > 0 && q.Tk > 0) seqs.push_back(q);
  }
  std::stable_sort(seqs.begin(), seqs.end(), [](const AttnParams& a, const AttnParams& b) {
    return static_cast<int64_t>(a.Tq) * a.Tk > static_cast<int64_t>(b.Tq) * b.Tk;
  });
  return seqs;
}

// One Tiled pass per sequence (the vector of params outlives them: a Tiled holds a reference).
template <class T>
std::vector<Tiled<T>> passes_of(const std::vector<AttnParams>& seqs, int bm, int bn) {
  std::vector<Tiled<T>> passes;
  passes.reserve(seqs.size());
  for (const AttnParams& q : seqs) passes.emplace_back(q, bm, bn);
  return passes;
}

// Forward: query-tile tasks of the sequences that do not decode, kv-head (x split) tasks of those that
// do, in one list; then the merges of split sequences.
template <class T>
void varlen_forward_as(const AttnParams& p) {
  const Tiles t = pass_tiles(p);
  const std::vector<AttnParams> seqs = varlen_sequences(p);
  if (seqs.empty()) return;
  const std::vector<Tiled<T>> passes = passes_of<T>(seqs, t.own, t.other);
  int64_t decode_heads = 0;  // kv-head tasks of the decoding sequences before splitting
  for (const auto& x : passes)
    if (x.decodes()) decode_heads += x.p.Hkv;
  std::vector<typename Tiled<T>::DecodePlan> plans;
  std::vector<int64_t> counts, parts_at, merges;
  int64_t parts_size = 0;
  for (const auto& x : passes) {
    const bool dec = x.decodes();
    plans.push_back(dec ? x.decode_plan(decode_heads) : typename Tiled<T>::DecodePlan{0, 0});
    counts.push_back(dec ? x.decode_tasks(plans.back()) : x.query_tile_tasks());
    const bool split = dec && plans.back().splits > 1;
    parts_at.push_back(parts_size);
    parts_size += split ? counts.back() * x.decode_part_size() : 0;
    merges.push_back(split ? x.p.Hkv : 0);
  }
  std::vector<float> parts(static_cast<size_t>(parts_size));
  const int threads = resolve_threads(p.num_threads);
  parallel_passes(threads, counts, [&] { return passes[0].make_fwd(); },
                  [&](typename Tiled<T>::FwdScratch& w, size_t i, int64_t task) {
                    if (plans[i].splits > 0)
                      return passes[i].decode_at(w, plans[i], task, parts.data() + parts_at[i]);
                    passes[i].query_tile_at(task, w, [&](auto& ws, int b, int h, int64_t m0) {
                      passes[i].forward_tile(ws, b, h, m0);
                    });
                  });
  parallel_passes(threads, merges, [&] { return Tiled<T>::buf(1, passes[0].Dvp); },
                  [&](std::vector<float>& acc, size_t i, int64_t kvh) {
                    passes[i].decode_merge_at(plans[i], kvh, parts.data() + parts_at[i], acc.data());
                  });
}

// Backward (split, never fused): delta per (sequence, head), then dK/dV per (sequence, kv head, key
// tile), then dQ per (sequence, head, query tile), each a list over all sequences.
template <class T>
void varlen_backward_as(const AttnParams& p) {
  const Tiles t = pass_tiles(p);
  const std::vector<AttnParams> seqs = varlen_sequences(p);
  if (seqs.empty()) return;
  const std::vector<Tiled<T>> by_keys = passes_of<T>(seqs, t.other, t.own), by_q = passes_of<T>(seqs, t.own, t.other);
  const int threads = resolve_threads(p.num_threads);
  std::vector<int64_t> heads, key_tiles, query_tiles;
  for (size_t i = 0; i < seqs.size(); ++i) {
    heads.push_back(p.Hq);
    key_tiles.push_back(by_keys[i].key_tile_tasks());
    query_tiles.push_back(by_q[i].query_tile_tasks());
  }
  parallel_passes(threads, heads, [&] { return Tiled<T>::buf(2, by_keys[0].Dvp); },
                  [&](std::vector<float>& tmp, size_t i, int64_t h) { by_keys[i].preprocess_at(h, tmp.data()); });
  parallel_passes(threads, key_tiles, [&] { return by_keys[0].make_dkdv(); },
                  [&](typename Tiled<T>::DkdvScratch& w, size_t i, int64_t task) { by_keys[i].dkdv_at(w, task); });
  parallel_passes(threads, query_tiles, [&] { return by_q[0].make_dq(); },
                  [&](typename Tiled<T>::DqScratch& w, size_t i, int64_t task) {
                    by_q[i].query_tile_at(task, w, [&](auto& ws, int b, int h, int64_t m0) { by_q[i].dq_tile(ws, b, h, m0); });
                  });
}

}  // namespace

void tiled_forward(const AttnParams& p) {
  const bool varlen = p.vl_q_len != 0;
  switch (p.dtype) {
    case kFloat32: return varlen ? varlen_forward_as<float>(p) : forward_as<float>(p);
    case kFloat16: return varlen ? varlen_forward_as<Half>(p) : forward_as<Half>(p);
    case kBFloat16: return varlen ? varlen_forward_as<BFloat16>(p) : forward_as<BFloat16>(p);
    default: require(false, "the tiled CPU path runs float32, float16 and bfloat16");
  }
}

void tiled_backward(const AttnParams& p) {
  const bool varlen = p.vl_q_len != 0;
  switch (p.dtype) {
    case kFloat32: return varlen ? varlen_backward_as<float>(p) : backward_as<float>(p);
    case kFloat16: return varlen ? varlen_backward_as<Half>(p) : backward_as<Half>(p);
    case kBFloat16: return varlen ? varlen_backward_as<BFloat16>(p) : backward_as<BFloat16>(p);
    default: require(false, "the tiled CPU path runs float32, float16 and bfloat16");
  }
}

}  // namespace cpu
}  // namespace effattn
