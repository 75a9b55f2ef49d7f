// Relative-position ("band") attention on the CPU, forward and backward (float32, float16, bfloat16;
// fp32 accumulation, inputs converted on load into per-thread tiles).
//
// Score of query row i and key j (effattn/reference.py, relpos_attention), exp2 domain:
//     s = c2 * (q_i . k_j + [extra] (qr_i . R[t(i, j)] + tt_i[same(i, j)])),   t(i, j) = rs * i - j + Tk - 1
// with c2 = scale * log2 e. For a tile of BM query rows (m0 ..) and BN keys (n0 ..) the table rows it
// reads form one contiguous band of rs * (BM - 1) + BN rows starting at t_min = rs * m0 - (n0 + BN - 1) +
// Tk - 1, and inside the band score (i, j) sits at band row t' = rs * r - c + (BN - 1) (r, c the row and
// key inside the tile). So a tile computes
//     S^T  = K Q^T                     (keys x rows: the layout of attn_tiled.cpp, rows side by side)
//     Pb^T = R_band qr^T               (band rows x rows, one GEMM)
//     S^T[c][r] += Pb^T[rs * r - c + BN - 1][r] (+ the token-type score), masks
// and then the online softmax and P V of FlashAttention-2 (attn_tiled.cpp's micro-kernels).
//
// Backward, one task per (batch, kv head): for every head of its GQA group and query tile, over the key
// tiles: P recomputed from lse, dP^T = V dO^T, dS^T = P * (dP^T - delta), dV += P^T dO, dK += dS^T Q,
// dQ += dS K, and for the position term the band gradient dPb^T[t'][r] = dS^T[c][r] (one key per band row
// of a query row: a scatter, no sums), dqr += dPb R_band, dR_b[band] += dPb^T qr. dR_b is the task's own
// (b, h) slice of a per-batch buffer; the batch is then summed in a fixed order (b = 0, 1, ...) by a second
// pass over (h, chunk of table rows). Every output element is written by one task, accumulated in a fixed
// order: the results do not depend on the number of threads (no atomics).
//
// Dropout (common/philox.h), as attn_tiled.cpp: P is multiplied by Z = keep / (1 - p), the keep bit of
// score (b, h, i, j) drawn from the Philox counters (j, i, b * Hq + h) in the tile, so that forward and
// backward draw the same bits and nothing is stored. The forward's m, l (hence lse) use the undropped P,
// and O += (P Z) V; the backward takes dV += (P Z)^T dO and dS = P * (dP Z - delta), which then feeds
// dQ, dK and the position and token-type gradients unchanged (delta = rowsum(dO * O) holds as before).
#include "relpos_tiled.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "../common/attn_rules.h"
#include "../common/check.h"
#include "../common/philox.h"
#include "host_types.h"
#include "simd.h"
#include "thread_pool.h"

namespace effattn {
namespace cpu {
namespace {

constexpr float kLog2eF = static_cast<float>(kLog2e);

inline void cvt_in(const Kernels&, const float* src, int64_t sd, int n, float* dst) {
  if (sd == 1) {
    std::memcpy(dst, src, sizeof(float) * static_cast<size_t>(n));
    return;
  }
  for (int i = 0; i < n; ++i) dst[i] = src[i * sd];
}
inline void cvt_in(const Kernels& kr, const Half* src, int64_t sd, int n, float* dst) {
  if (sd == 1) return kr.fp16_to_f32(reinterpret_cast<const uint16_t*>(src), dst, n);
  for (int i = 0; i < n; ++i) dst[i] = to_f32(src[i * sd]);
}
inline void cvt_in(const Kernels& kr, const BFloat16* src, int64_t sd, int n, float* dst) {
  if (sd == 1) return kr.bf16_to_f32(reinterpret_cast<const uint16_t*>(src), dst, n);
  for (int i = 0; i < n; ++i) dst[i] = to_f32(src[i * sd]);
}

template <class T>
inline void put_row(const float* src, int n, T* dst, int64_t sd) {
  for (int i = 0; i < n; ++i) put(&dst[i * sd], src[i]);
}

// A strided fp32 view: element (i, k) at ptr[i * si + k * sk].
struct View {
  const float* ptr;
  int64_t si, sk;
};

// dst[d * ldd + r] = src[r * lds + d] * a for r < rows, d < D; zero for rows <= r < ldd.
void transpose(const float* src, int64_t lds, int rows, int D, float* dst, int64_t ldd, float a) {
  for (int d = 0; d < D; ++d) {
    float* o = dst + d * ldd;
    for (int r = 0; r < rows; ++r) o[r] = src[r * lds + d] * a;
    for (int64_t r = rows; r < ldd; ++r) o[r] = 0.f;
  }
}

std::vector<float> buf(int64_t a, int64_t b) { return std::vector<float>(static_cast<size_t>(a * b), 0.f); }

template <class T>
struct Relpos {
  const RelposParams& p;
  const Kernels& kr;
  int group, BM, BN, Dp, Dvp, BMp, NB, threads, rs;
  float c2;
  bool dropout;      // dropout_p > 0
  DropoutTile drop;  // its seed, threshold and scale (the counters set per key by drop_at)

  explicit Relpos(const RelposParams& params)
      : p(params),
        kr(kernels()),
        group(params.Hq / params.Hkv),
        BM(params.tile_m),
        BN(params.tile_n),
        Dp(pad_to(params.D)),
        Dvp(pad_to(params.Dv)),
        BMp(pad_to(params.tile_m)),
        NB(params.rel_stride * (params.tile_m - 1) + params.tile_n),
        threads(resolve_threads(params.num_threads)),
        rs(params.rel_stride),
        c2(static_cast<float>(params.scale * kLog2e)),
        dropout(params.dropout_p > 0.0),
        drop{params.seed, dropout_threshold(params.dropout_p),
             static_cast<float>(dropout_scale(dropout_threshold(params.dropout_p))), 0, 0, 0} {}

  // The dropout draws of key ``key`` of head h of batch b for the query rows row, row + 1, ... (a column
  // of a transposed tile: kr.dropout with along_rows).
  DropoutTile drop_at(int b, int h, int64_t key, int64_t row) const {
    DropoutTile d = drop;
    d.key = static_cast<uint32_t>(key);
    d.row = static_cast<uint32_t>(row);
    d.bh = static_cast<uint32_t>(static_cast<int64_t>(b) * p.Hq + h);
    return d;
  }

  // Rows [r0, r0 + rows) of x (at base + off, row stride st, element stride sd) into dst (rows x ld, padded).
  void load(int64_t addr, int64_t off, int64_t st, int64_t sd, int rows, int D, float* dst, int ld) const {
    const T* x = cptr<T>(addr) + off;
    for (int r = 0; r < rows; ++r) {
      float* d = dst + static_cast<int64_t>(r) * ld;
      cvt_in(kr, x + r * st, sd, D, d);
      std::fill(d + D, d + ld, 0.f);
    }
  }

  // The same rows as an fp32 view: in place when fp32 (and, with ``row_major``, rows of contiguous
  // elements, a multiple of kPad of them, as the B operand of a GEMM needs), else converted into scratch.
  View view(int64_t addr, int64_t off, int64_t st, int64_t sd, int rows, int D, bool row_major, float* scratch) const {
    if constexpr (std::is_same<T, float>::value) {
      if (!row_major || (sd == 1 && D % kPad == 0)) return {cptr<float>(addr) + off, st, sd};
    }
    load(addr, off, st, sd, rows, D, scratch, pad_to(D));
    return {scratch, pad_to(D), 1};
  }

  int64_t off4(const Strides4& s, int b, int h, int64_t t) const { return b * s.b + h * s.h + t * s.t; }

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

  // Per-row data of a query tile: the token-type scores (times c2) of a key of a different / the same
  // type, the row's token type, and, for the last key type asked for, the rows' score and "same" flag
  // (1 / 0) for a key of that type: keys come in runs of one type, so a column's token-type term is
  // one contiguous vector add (``for_key``), computed once per run.
  struct RowInfo {
    std::vector<float> diff, same;
    std::vector<int32_t> type;
    std::vector<float> score, is_same;  // for key type ``key_type``
    int32_t key_type = 0;
    bool cached = false;

    void resize(int n) {
      diff.assign(n, 0.f);
      same.assign(n, 0.f);
      type.assign(n, 0);
      score.assign(n, 0.f);
      is_same.assign(n, 0.f);
    }
    // The rows' token-type scores for a key of type ``kt`` (rows < ``rows``; [cls] is of every type).
    const float* for_key(int32_t kt, int32_t cls_type, int rows) {
      if (kt == cls_type) return same.data();
      if (!cached || kt != key_type) {
        for (int r = 0; r < rows; ++r) {
          const bool s = type[r] == kt || type[r] == cls_type;
          is_same[r] = s ? 1.f : 0.f;
          score[r] = s ? same[r] : diff[r];
        }
        key_type = kt;
        cached = true;
      }
      return score.data();
    }
  };

  void load_row_info(int b, int h, int64_t m0, int rows, RowInfo& ri) const {
    ri.cached = false;
    if (!p.tt) return;
    const T* tt = cptr<T>(p.tt) + off4(p.stt, b, h, m0);
    const int32_t* qt = cptr<int32_t>(p.q_types) + static_cast<int64_t>(b) * p.Tq + m0;
    for (int r = 0; r < rows; ++r) {
      ri.diff[r] = to_f32(tt[r * p.stt.t]) * c2;
      ri.same[r] = to_f32(tt[r * p.stt.t + p.stt.d]) * c2;
      ri.type[r] = qt[r];
    }
  }

  // The scores of tile (m0, n0) in St (cols x BMp): content already there, the band Pb (nb x BMp) and the
  // token-type term added where the pair is not a [cls] pair, then the key padding mask.
  void add_relpos(float* St, const float* Pb, RowInfo& ri, int b, int64_t m0, int rows, int64_t n0,
                  int cols) const {
    const int r_lo = (p.separate_cls && m0 == 0) ? 1 : 0;
    const int c_lo = (p.separate_cls && n0 == 0) ? 1 : 0;
    const int32_t* kt = p.tt ? cptr<int32_t>(p.k_types) + static_cast<int64_t>(b) * p.Tk + n0 : nullptr;
    const int64_t step = static_cast<int64_t>(rs) * BMp + 1;  // band element (r + 1, c) minus (r, c)
    for (int c = c_lo; c < cols; ++c) {
      float* s = St + static_cast<int64_t>(c) * BMp;
      const float* pb = Pb + static_cast<int64_t>(cols - 1 - c) * BMp;
      for (int r = r_lo; r < rows; ++r) s[r] += pb[r * step];
      if (kt) {
        const float* a = ri.for_key(kt[c], p.cls_type, rows);
        for (int r = r_lo; r < rows; ++r) s[r] += a[r];
      }
    }
    if (p.kpm) {
      const uint8_t* mk = cptr<uint8_t>(p.kpm) + static_cast<int64_t>(b) * p.Tk + n0;
      const float ninf = neg_inf<float>();
      for (int c = 0; c < cols; ++c)
        if (!mk[c]) std::fill(St + static_cast<int64_t>(c) * BMp, St + static_cast<int64_t>(c + 1) * BMp, ninf);
    }
  }

  // First table row of tile (m0, n0) with ``cols`` keys, and its number of band rows.
  int64_t band_start(int64_t m0, int64_t n0, int cols) const { return rs * m0 - (n0 + cols - 1) + p.Tk - 1; }
  int band_rows(int rows, int cols) const { return rs * (rows - 1) + cols; }

  // ------------------------------------------------------------------------------------------------
  // forward: per (b, h, query tile)
  // ------------------------------------------------------------------------------------------------
  struct FwdScratch {
    std::vector<float> q, qt, qr, qrt, k, v, rb, st, pb, acc, m, l, alpha;
    RowInfo ri;
  };

  void forward() const {
    const int64_t nqt = (p.Tq + BM - 1) / BM;
    parallel(
        static_cast<int64_t>(p.B) * p.Hq * nqt,
        [&] {
          FwdScratch w;
          w.q = buf(BM, Dp);
          w.qt = buf(p.D, BMp);
          w.qr = buf(BM, Dp);
          w.qrt = buf(p.D, BMp);
          w.k = buf(BN, Dp);
          w.v = buf(BN, Dvp);
          w.rb = buf(NB, Dp);
          w.st = buf(BN, BMp);
          w.pb = buf(NB, BMp);
          w.acc = buf(BM, Dvp);
          w.m = buf(1, BMp);
          w.l = buf(1, BMp);
          w.alpha = buf(1, BMp);
          w.ri.resize(BM);
          return w;
        },
        [&](FwdScratch& w, int64_t task) {
          const int64_t bh = task / nqt;
          forward_tile(w, static_cast<int>(bh / p.Hq), static_cast<int>(bh % p.Hq), (task % nqt) * BM);
        });
  }

  void forward_tile(FwdScratch& w, int b, int h, int64_t m0) const {
    const int kvh = h / group;
    const int rows = static_cast<int>(std::min<int64_t>(BM, p.Tq - m0));
    load(p.q, off4(p.sq, b, h, m0), p.sq.t, p.sq.d, rows, p.D, w.q.data(), Dp);
    transpose(w.q.data(), Dp, rows, p.D, w.qt.data(), BMp, c2);
    load(p.qr, off4(p.sqr, b, h, m0), p.sqr.t, p.sqr.d, rows, p.D, w.qr.data(), Dp);
    transpose(w.qr.data(), Dp, rows, p.D, w.qrt.data(), BMp, c2);
    load_row_info(b, h, m0, rows, w.ri);
    std::fill(w.m.begin(), w.m.end(), neg_inf<float>());
    std::fill(w.l.begin(), w.l.end(), 0.f);
    std::fill(w.acc.begin(), w.acc.end(), 0.f);
    float* St = w.st.data();
    float* Pb = w.pb.data();
    for (int64_t n0 = 0; n0 < p.Tk; n0 += BN) {
      const int cols = static_cast<int>(std::min<int64_t>(BN, p.Tk - n0));
      const View K = view(p.k, off4(p.sk, b, kvh, n0), p.sk.t, p.sk.d, cols, p.D, false, w.k.data());
      kr.gemm(cols, BMp, p.D, K.ptr, K.si, K.sk, w.qt.data(), BMp, St, BMp, false);
      const int nb = band_rows(rows, cols);
      const View Rb = view(p.R, h * p.sR.h + band_start(m0, n0, cols) * p.sR.t, p.sR.t, p.sR.d, nb, p.D, false,
                           w.rb.data());
      kr.gemm(nb, BMp, p.D, Rb.ptr, Rb.si, Rb.sk, w.qrt.data(), BMp, Pb, BMp, false);
      add_relpos(St, Pb, w.ri, b, m0, rows, n0, cols);
      kr.softmax_t(St, cols, BMp, BMp, w.m.data(), w.l.data(), w.alpha.data());
      if (dropout)
        for (int c = 0; c < cols; ++c)
          kr.dropout(St + static_cast<int64_t>(c) * BMp, BMp, drop_at(b, h, n0 + c, m0), true);
      for (int r = 0; r < rows; ++r)
        if (w.alpha[r] != 1.f) kr.scale(w.acc.data() + static_cast<int64_t>(r) * Dvp, Dvp, w.alpha[r]);
      const View V = view(p.v, off4(p.sv, b, kvh, n0), p.sv.t, p.sv.d, cols, p.Dv, true, w.v.data());
      kr.gemm(rows, Dvp, cols, St, 1, BMp, V.ptr, V.si, w.acc.data(), Dvp, true);
    }
    T* o = mptr<T>(p.o) + off4(p.so, b, h, m0);
    float* lse = mptr<float>(p.lse) + (static_cast<int64_t>(b) * p.Hq + h) * p.Tq + m0;
    for (int r = 0; r < rows; ++r) {
      float* a = w.acc.data() + static_cast<int64_t>(r) * Dvp;
      kr.scale(a, Dvp, row_scale(w.l[r]));
      put_row(a, p.Dv, o + r * p.so.t, p.so.d);
      lse[r] = row_lse(w.m[r], w.l[r], true);
    }
  }

  // ------------------------------------------------------------------------------------------------
  // backward: per (b, kv head)
  // ------------------------------------------------------------------------------------------------
  struct BwdScratch {
    std::vector<float> q, qt, qr, qrt, dout, doutt, k, v, rb, rbm, st, dpt, pb, dpb, lse2, delta, z, dq, dqr,
        dtt, dk, dv;
    RowInfo ri;
  };

  void backward() const {
    const int64_t NRp = static_cast<int64_t>(p.NR) * Dp;
    // the batch's partial dR, (B, Hq, NR, Dp); with one batch element the result is written directly
    std::vector<float> part(p.B > 1 ? static_cast<size_t>(static_cast<int64_t>(p.B) * p.Hq * NRp) : 0);
    std::vector<float> single(p.B == 1 ? static_cast<size_t>(static_cast<int64_t>(p.Hq) * NRp) : 0);
    float* dR_part = p.B > 1 ? part.data() : single.data();
    parallel(
        static_cast<int64_t>(p.B) * p.Hkv,
        [&] {
          BwdScratch w;
          w.q = buf(BM, Dp);
          w.qt = buf(p.D, BMp);
          w.qr = buf(BM, Dp);
          w.qrt = buf(p.D, BMp);
          w.dout = buf(BM, Dvp);
          w.doutt = buf(p.Dv, BMp);
          w.k = buf(BN, Dp);
          w.v = buf(BN, Dvp);
          w.rb = buf(NB, Dp);
          w.rbm = buf(NB, Dp);
          w.st = buf(BN, BMp);
          w.dpt = buf(BN, BMp);
          w.pb = buf(NB, BMp);
          w.dpb = buf(NB, BMp);
          w.lse2 = buf(1, BMp);
          w.delta = buf(1, BMp);
          w.z = buf(1, BMp);
          w.dq = buf(BM, Dp);
          w.dqr = buf(BM, Dp);
          w.dtt = buf(BM, 2);
          w.dk = buf(p.Tk, Dp);
          w.dv = buf(p.Tk, Dvp);
          w.ri.resize(BM);
          return w;
        },
        [&](BwdScratch& w, int64_t task) {
          const int b = static_cast<int>(task / p.Hkv), kvh = static_cast<int>(task % p.Hkv);
          std::fill(w.dk.begin(), w.dk.end(), 0.f);
          std::fill(w.dv.begin(), w.dv.end(), 0.f);
          for (int h = kvh * group; h < (kvh + 1) * group; ++h) {
            float* dR = dR_part + (static_cast<int64_t>(p.B > 1 ? b : 0) * p.Hq + h) * NRp;
            std::fill(dR, dR + NRp, 0.f);
            for (int64_t m0 = 0; m0 < p.Tq; m0 += BM) backward_tile(w, b, h, m0, dR);
          }
          const float sc = static_cast<float>(p.scale);
          float* dk = mptr<float>(p.dk) + (static_cast<int64_t>(b) * p.Hkv + kvh) * p.Tk * p.D;
          float* dv = mptr<float>(p.dv) + (static_cast<int64_t>(b) * p.Hkv + kvh) * p.Tk * p.Dv;
          for (int64_t j = 0; j < p.Tk; ++j) {
            for (int d = 0; d < p.D; ++d) dk[j * p.D + d] = w.dk[j * Dp + d] * sc;
            std::memcpy(dv + j * p.Dv, w.dv.data() + j * Dvp, sizeof(float) * static_cast<size_t>(p.Dv));
          }
        });
    // dR = scale * sum_b dR_b, batch elements added in order, by (head, chunk of table rows)
    constexpr int64_t kChunk = 256;
    const int64_t nchunk = (p.NR + kChunk - 1) / kChunk;
    const float sc = static_cast<float>(p.scale);
    parallel(
        static_cast<int64_t>(p.Hq) * nchunk, [] { return 0; },
        [&](int, int64_t task) {
          const int h = static_cast<int>(task / nchunk);
          const int64_t t0 = (task % nchunk) * kChunk, t1 = std::min<int64_t>(p.NR, t0 + kChunk);
          float* out = mptr<float>(p.dR) + static_cast<int64_t>(h) * p.NR * p.D;
          for (int64_t t = t0; t < t1; ++t)
            for (int d = 0; d < p.D; ++d) {
              float s = 0.f;
              for (int b = 0; b < p.B; ++b) s += dR_part[(static_cast<int64_t>(b) * p.Hq + h) * NRp + t * Dp + d];
              out[t * p.D + d] = s * sc;
            }
        });
  }

  // One key's column of the backward under dropout, rows side by side: dp = P * (dp * z - delta), then
  // P *= z, with z (BMp floats of scratch) the column's Z, drawn once for both.
  void dropout_dsoftmax_col(float* dp, float* P, const float* delta, const DropoutTile& d, float* z) const {
    std::fill(z, z + BMp, 1.f);
    kr.dropout(z, BMp, d, true);
    for (int r = 0; r < BMp; ++r) {
      dp[r] = P[r] * (dp[r] * z[r] - delta[r]);
      P[r] *= z[r];
    }
  }

  void backward_tile(BwdScratch& w, int b, int h, int64_t m0, float* dR) const {
    const int kvh = h / group;
    const int rows = static_cast<int>(std::min<int64_t>(BM, p.Tq - m0));
    load(p.q, off4(p.sq, b, h, m0), p.sq.t, p.sq.d, rows, p.D, w.q.data(), Dp);
    transpose(w.q.data(), Dp, rows, p.D, w.qt.data(), BMp, c2);
    load(p.qr, off4(p.sqr, b, h, m0), p.sqr.t, p.sqr.d, rows, p.D, w.qr.data(), Dp);
    transpose(w.qr.data(), Dp, rows, p.D, w.qrt.data(), BMp, c2);
    load(p.dout, off4(p.sdo, b, h, m0), p.sdo.t, p.sdo.d, rows, p.Dv, w.dout.data(), Dvp);
    transpose(w.dout.data(), Dvp, rows, p.Dv, w.doutt.data(), BMp, 1.f);
    load_row_info(b, h, m0, rows, w.ri);
    const int64_t base = (static_cast<int64_t>(b) * p.Hq + h) * p.Tq + m0;
    for (int r = 0; r < BMp; ++r) {
      w.lse2[r] = r < rows ? lse_shift(cptr<float>(p.lse)[base + r]) * kLog2eF : 0.f;
      w.delta[r] = r < rows ? cptr<float>(p.delta)[base + r] : 0.f;
    }
    std::fill(w.dq.begin(), w.dq.end(), 0.f);
    std::fill(w.dqr.begin(), w.dqr.end(), 0.f);
    std::fill(w.dtt.begin(), w.dtt.end(), 0.f);
    float* St = w.st.data();
    float* dSt = w.dpt.data();
    const int r_lo = (p.separate_cls && m0 == 0) ? 1 : 0;
    const int64_t step = static_cast<int64_t>(rs) * BMp + 1;
    for (int64_t n0 = 0; n0 < p.Tk; n0 += BN) {
      const int cols = static_cast<int>(std::min<int64_t>(BN, p.Tk - n0));
      const int nb = band_rows(rows, cols);
      const int64_t t0 = band_start(m0, n0, cols);
      // -- P, recomputed --
      const View K = view(p.k, off4(p.sk, b, kvh, n0), p.sk.t, p.sk.d, cols, p.D, true, w.k.data());
      kr.gemm(cols, BMp, p.D, K.ptr, K.si, K.sk, w.qt.data(), BMp, St, BMp, false);
      const View Rb = view(p.R, h * p.sR.h + t0 * p.sR.t, p.sR.t, p.sR.d, nb, p.D, true, w.rb.data());
      kr.gemm(nb, BMp, p.D, Rb.ptr, Rb.si, Rb.sk, w.qrt.data(), BMp, w.pb.data(), BMp, false);
      add_relpos(St, w.pb.data(), w.ri, b, m0, rows, n0, cols);
      for (int c = 0; c < cols; ++c) kr.exp2_sub_vec(St + static_cast<int64_t>(c) * BMp, w.lse2.data(), BMp);
      // -- dP^T = V dO^T, dS^T = P * (dP^T Z - delta), P Z in place of P --
      const View V = view(p.v, off4(p.sv, b, kvh, n0), p.sv.t, p.sv.d, cols, p.Dv, false, w.v.data());
      kr.gemm(cols, BMp, p.Dv, V.ptr, V.si, V.sk, w.doutt.data(), BMp, dSt, BMp, false);
      for (int c = 0; c < cols; ++c) {
        float* s = St + static_cast<int64_t>(c) * BMp;
        float* dp = dSt + static_cast<int64_t>(c) * BMp;
        if (dropout)
          dropout_dsoftmax_col(dp, s, w.delta.data(), drop_at(b, h, n0 + c, m0), w.z.data());
        else
          kr.dsoftmax_vec(dp, s, w.delta.data(), BMp);
      }
      // -- dV += (P Z)^T dO, dK += dS^T Q, dQ += dS K --
      kr.gemm(cols, Dvp, rows, St, BMp, 1, w.dout.data(), Dvp, w.dv.data() + n0 * Dvp, Dvp, true);
      kr.gemm(cols, Dp, rows, dSt, BMp, 1, w.q.data(), Dp, w.dk.data() + n0 * Dp, Dp, true);
      kr.gemm(rows, Dp, cols, dSt, 1, BMp, K.ptr, K.si, w.dq.data(), Dp, true);
      // -- the position and token-type terms: dPb^T (scatter of dS^T), dqr, dR, dtt --
      float* dPb = w.dpb.data();
      std::fill(dPb, dPb + static_cast<int64_t>(nb) * BMp, 0.f);
      const int c_lo = (p.separate_cls && n0 == 0) ? 1 : 0;
      const int32_t* kt = p.tt ? cptr<int32_t>(p.k_types) + static_cast<int64_t>(b) * p.Tk + n0 : nullptr;
      float* dtt_diff = w.dtt.data();
      float* dtt_same = w.dtt.data() + BM;
      for (int c = c_lo; c < cols; ++c) {
        const float* ds = dSt + static_cast<int64_t>(c) * BMp;
        float* pb = dPb + static_cast<int64_t>(cols - 1 - c) * BMp;
        for (int r = r_lo; r < rows; ++r) pb[r * step] = ds[r];
        if (kt) {
          if (kt[c] == p.cls_type) {
            for (int r = r_lo; r < rows; ++r) dtt_same[r] += ds[r];
          } else {
            w.ri.for_key(kt[c], p.cls_type, rows);
            const float* m = w.ri.is_same.data();
            for (int r = r_lo; r < rows; ++r) {
              dtt_same[r] += m[r] * ds[r];
              dtt_diff[r] += (1.f - m[r]) * ds[r];
            }
          }
        }
      }
      kr.gemm(rows, Dp, nb, dPb, 1, BMp, Rb.ptr, Rb.si, w.dqr.data(), Dp, true);
      kr.gemm(nb, Dp, rows, dPb, BMp, 1, w.qr.data(), Dp, dR + t0 * Dp, Dp, true);
    }
    const float sc = static_cast<float>(p.scale);
    const int64_t row0 = (static_cast<int64_t>(b) * p.Hq + h) * p.Tq + m0;
    float* dq = mptr<float>(p.dq) + row0 * p.D;
    float* dqr = mptr<float>(p.dqr) + row0 * p.D;
    for (int r = 0; r < rows; ++r)
      for (int d = 0; d < p.D; ++d) {
        dq[static_cast<int64_t>(r) * p.D + d] = w.dq[static_cast<int64_t>(r) * Dp + d] * sc;
        dqr[static_cast<int64_t>(r) * p.D + d] = w.dqr[static_cast<int64_t>(r) * Dp + d] * sc;
      }
    if (p.dtt) {
      float* dtt = mptr<float>(p.dtt) + row0 * 2;
      for (int r = 0; r < rows; ++r) {
        dtt[2 * r] = w.dtt[r] * sc;
        dtt[2 * r + 1] = w.dtt[BM + r] * sc;
      }
    }
  }
};

void check(const RelposParams& p, bool backward) {
  require(p.B >= 0 && p.Hq >= 1 && p.Hkv >= 1 && p.Tq >= 0 && p.Tk >= 0, "relpos: sizes must be non-negative");
  require(p.Hq % p.Hkv == 0, "relpos: Hq must be a multiple of Hkv");
  require(p.D >= 1 && p.Dv >= 1, "relpos: head dims must be >= 1");
  require(p.dtype == kFloat32 || p.dtype == kFloat16 || p.dtype == kBFloat16,
          "relpos: dtype must be float32, float16 or bfloat16, got code " + std::to_string(p.dtype));
  require(p.rel_stride >= 1, "relpos: rel_stride must be >= 1");
  require(p.tile_m >= 1 && p.tile_n >= 1, "relpos: tiles must be >= 1");
  require(p.dropout_p >= 0.0 && p.dropout_p < 1.0 && dropout_threshold(p.dropout_p) < kDropoutFull,
          "relpos: dropout_p must be in [0, 1 - 2**-25), got " + std::to_string(p.dropout_p));
  require(p.Tq == 0 || p.Tk == 0 || static_cast<int64_t>(p.NR) == static_cast<int64_t>(p.rel_stride) * (p.Tq - 1) + p.Tk,
          "relpos: NR must be rel_stride * (Tq - 1) + Tk");
  require(p.q && p.k && p.v && p.qr && p.R && p.lse, "relpos: q, k, v, qr, R and lse addresses must be set");
  require(!p.tt || (p.q_types && p.k_types), "relpos: tt needs q_types and k_types");
  if (backward) {
    require(p.dout && p.delta && p.dq && p.dk && p.dv && p.dqr && p.dR, "relpos: backward addresses must be set");
    require(!p.tt || p.dtt, "relpos: dtt must be set with tt");
  } else {
    require(p.o != 0, "relpos: the out address must be set");
  }
}

template <template <class> class F>
void dispatch(const RelposParams& p) {
  if (p.dtype == kFloat32) return F<float>::run(p);
  if (p.dtype == kFloat16) return F<Half>::run(p);
  return F<BFloat16>::run(p);
}

template <class T>
struct Fwd {
  static void run(const RelposParams& p) { Relpos<T>(p).forward(); }
};
template <class T>
struct Bwd {
  static void run(const RelposParams& p) { Relpos<T>(p).backward(); }
};

}  // namespace

void relpos_forward(const RelposParams& p) {
  check(p, false);
  if (p.B == 0 || p.Tq == 0) return;
  require(p.Tk >= 1, "relpos: Tk must be >= 1 (the caller handles empty keys)");
  dispatch<Fwd>(p);
}

void relpos_backward(const RelposParams& p) {
  check(p, true);
  if (p.B == 0 || p.Tq == 0) return;
  require(p.Tk >= 1, "relpos: Tk must be >= 1 (the caller handles empty keys)");
  dispatch<Bwd>(p);
}

}  // namespace cpu
}  // namespace effattn
