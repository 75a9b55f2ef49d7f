// C++ CPU implementation of effattn's tiled attention; see attn_cpu.h.
//
// float32, float16 and bfloat16 run the fast tiled path of attn_tiled.cpp (SIMD micro-kernels, a
// thread pool). float64 runs the scalar implementation below, single-threaded, with the tiles of
// params.tile_m x tile_n.
//
// The structure is that of the CUDA kernels (csrc/cuda/): the forward owns a tile of query rows and
// walks the key tiles it may see with an online softmax; the backward owns a key tile for dK/dV
// (walking the query tiles of every query head of its GQA group) and a query tile for dQ. Tile walks,
// visibility, pooling and softmax bookkeeping are the shared functions of common/attn_rules.h, the
// dropout draws those of common/philox.h. Accumulation is float64.
#include "attn_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "../common/attn_rules.h"
#include "../common/check.h"
#include "../common/philox.h"
#include "attn_tiled.h"
#include "varlen.h"
#include "host_types.h"

namespace effattn {
namespace {

inline double to_acc(double x) { return x; }
inline void store(double* d, double x) { *d = x; }

using cpu::cptr;
using cpu::mptr;

template <class T, class A>
struct Attention {
  const AttnParams& p;
  int group;
  uint32_t drop_threshold;  // dropout (when p.dropout_p > 0)
  A drop_scale;

  explicit Attention(const AttnParams& params)
      : p(params),
        group(params.Hq / params.Hkv),
        drop_threshold(dropout_threshold(params.dropout_p)),
        drop_scale(static_cast<A>(dropout_scale(drop_threshold))) {}

  // Dropout factor of score (b, h, row, col): 1 without dropout, else the kept scale or 0.
  A drop(int b, int h, int64_t row, int64_t col) const {
    if (p.dropout_p <= 0.0) return A(1);
    const uint32_t bits = philox_first(p.seed, static_cast<uint32_t>(col), static_cast<uint32_t>(row),
                                       static_cast<uint32_t>(static_cast<int64_t>(b) * p.Hq + h), 0);
    return dropout_kept(bits, drop_threshold) ? drop_scale : A(0);
  }

  int tile_m() const { return p.sparse ? std::min(p.tile_m, p.block_q) : p.tile_m; }
  int tile_n() const { return p.sparse ? std::min(p.tile_n, p.block_kv) : p.tile_n; }

  // Rows [m0, m0 + rows) of head h of q into buf (rows x Dqk), pooled on load with pooling.
  void load_q(int b, int h, int64_t m0, int rows, std::vector<A>& buf) const {
    const T* q = cptr<T>(p.q) + b * p.sq.b + h * p.sq.h;
    for (int r = 0; r < rows; ++r) {
      A* dst = &buf[static_cast<size_t>(r) * p.Dqk];
      const int64_t row = m0 + r;
      if (p.pool_stride == 1 && !p.pool_cls) {
        for (int d = 0; d < p.Dqk; ++d) dst[d] = to_acc(q[row * p.sq.t + d * p.sq.d]);
        continue;
      }
      const bool is_max = p.pool_mode == kPoolMax;
      for (int d = 0; d < p.Dqk; ++d) dst[d] = is_max ? neg_inf<A>() : A(0);
      int count = 0;
      for (int j = 0; j < p.pool_stride; ++j) {
        int64_t src;
        if (!pool_source(p, row, j, &src)) continue;
        ++count;
        for (int d = 0; d < p.Dqk; ++d) {
          const A x = to_acc(q[src * p.sq.t + d * p.sq.d]);
          dst[d] = is_max ? std::max(dst[d], x) : dst[d] + x;
        }
      }
      if (!is_max)
        for (int d = 0; d < p.Dqk; ++d) dst[d] /= A(std::max(count, 1));
    }
  }

  // Rows [r0, r0 + rows) of a (B, H, T, D) tensor at head h into buf (rows x D).
  static void load_rows(const T* base, const Strides4& s, int b, int h, int64_t r0, int rows, int D,
                        std::vector<A>& buf) {
    const T* x = base + b * s.b + h * s.h;
    for (int r = 0; r < rows; ++r)
      for (int d = 0; d < D; ++d) buf[static_cast<size_t>(r) * D + d] = to_acc(x[(r0 + r) * s.t + d * s.d]);
  }

  static A dot(const A* a, const A* b, int D) {
    A s = 0;
    for (int d = 0; d < D; ++d) s += a[d] * b[d];
    return s;
  }

  // Masked score of (row, col), or -inf when not visible: s = scale * q.k, soft-capped to
  // softcap * tanh(s / softcap), plus ALiBi's -slope * distance, plus the additive mask. ``dcap``, unless
  // null, gets the derivative of the cap there, 1 - tanh^2 (left alone without a cap).
  A score(int b, int h, int64_t row, int64_t col, bool partial, const A* qr, const A* kc, A* dcap = nullptr) const {
    if (!element_visible(p, b, h, row, col, partial)) return neg_inf<A>();
    A s = dot(qr, kc, p.Dqk) * static_cast<A>(p.scale);
    if (p.softcap > 0.0) {
      const A cap = static_cast<A>(p.softcap);
      const A t = std::tanh(s / cap);
      s = cap * t;
      if (dcap) *dcap = A(1) - t * t;
    }
    if (p.alibi) s -= cptr<A>(p.alibi)[b * p.alibi_sb + h] * static_cast<A>(alibi_distance(p, row, col));
    return s + static_cast<A>(mask_bias(p, b, h, row, col));
  }

  void forward() const {
    const int BM = tile_m(), BN = tile_n();
    std::vector<A> qt(static_cast<size_t>(BM) * p.Dqk), kt(static_cast<size_t>(BN) * p.Dqk),
        vt(static_cast<size_t>(BN) * p.Dv), s(BN), acc(static_cast<size_t>(BM) * p.Dv), m(BM), l(BM);
    T* out = mptr<T>(p.o);
    A* lse = mptr<A>(p.lse);
    for (int b = 0; b < p.B; ++b)
      for (int h = 0; h < p.Hq; ++h) {
        const int kvh = h / group;
        for (int64_t m0 = 0; m0 < p.Tq; m0 += BM) {
          const int rows = static_cast<int>(std::min<int64_t>(BM, p.Tq - m0));
          load_q(b, h, m0, rows, qt);
          std::fill(m.begin(), m.end(), neg_inf<A>());
          std::fill(l.begin(), l.end(), A(0));
          std::fill(acc.begin(), acc.end(), A(0));
          const TileWalk w = kv_walk(p, b, h, m0, m0 + rows, BN);
          for (int64_t i = 0; i < w.count; ++i) {
            bool partial;
            const int64_t n0 = walk_start(w, i, &partial);
            if (n0 >= p.Tk) continue;
            const int cols = static_cast<int>(std::min<int64_t>(BN, p.Tk - n0));
            load_rows(cptr<T>(p.k), p.sk, b, kvh, n0, cols, p.Dqk, kt);
            load_rows(cptr<T>(p.v), p.sv, b, kvh, n0, cols, p.Dv, vt);
            for (int r = 0; r < rows; ++r) {
              // -- scores of the row, then the online softmax update --
              A mx = m[r];
              for (int c = 0; c < cols; ++c) {
                s[c] = score(b, h, m0 + r, n0 + c, partial, &qt[static_cast<size_t>(r) * p.Dqk],
                             &kt[static_cast<size_t>(c) * p.Dqk]);
                mx = std::max(mx, s[c]);
              }
              const A shift = softmax_shift(mx);
              const A alpha = std::exp(m[r] - shift);
              A* ar = &acc[static_cast<size_t>(r) * p.Dv];
              for (int d = 0; d < p.Dv; ++d) ar[d] *= alpha;
              A sum = 0;
              for (int c = 0; c < cols; ++c) {
                const A pr = std::exp(s[c] - shift);
                sum += pr;
                const A pz = pr * drop(b, h, m0 + r, n0 + c);  // O sums the dropped P, l the undropped
                if (pz != A(0))
                  for (int d = 0; d < p.Dv; ++d) ar[d] += pz * vt[static_cast<size_t>(c) * p.Dv + d];
              }
              l[r] = l[r] * alpha + sum;
              m[r] = mx;
            }
          }
          // -- epilogue: normalise; an empty row gives out = 0, lse = -inf --
          T* o = out + b * p.so.b + h * p.so.h;
          for (int r = 0; r < rows; ++r) {
            const A f = row_scale(l[r]);
            for (int d = 0; d < p.Dv; ++d) store(&o[(m0 + r) * p.so.t + d * p.so.d], acc[static_cast<size_t>(r) * p.Dv + d] * f);
            lse[(static_cast<int64_t>(b) * p.Hq + h) * p.Tq + m0 + r] = row_lse(m[r], l[r], false);
          }
        }
      }
  }

  void preprocess() const {
    A* delta = mptr<A>(p.delta);
    const A* dlse = p.dlse ? cptr<A>(p.dlse) : nullptr;
    const T* o = cptr<T>(p.o);
    const T* dout = cptr<T>(p.dout);
    for (int b = 0; b < p.B; ++b)
      for (int h = 0; h < p.Hq; ++h)
        for (int64_t i = 0; i < p.Tq; ++i) {
          A s = 0;
          for (int d = 0; d < p.Dv; ++d)
            s += to_acc(o[b * p.so.b + h * p.so.h + i * p.so.t + d * p.so.d]) *
                 to_acc(dout[b * p.sdo.b + h * p.sdo.h + i * p.sdo.t + d * p.sdo.d]);
          const int64_t at = (static_cast<int64_t>(b) * p.Hq + h) * p.Tq + i;
          delta[at] = s - (dlse ? dlse[at] : A(0));
        }
  }

  // dK, dV: one key tile at a time, over the query tiles of every head of its GQA group.
  void backward_dkdv() const {
    const int BM = tile_m(), BN = tile_n();
    std::vector<A> kt(static_cast<size_t>(BN) * p.Dqk), vt(static_cast<size_t>(BN) * p.Dv),
        qt(static_cast<size_t>(BM) * p.Dqk), dot_(static_cast<size_t>(BM) * p.Dv),
        dk(static_cast<size_t>(BN) * p.Dqk), dv(static_cast<size_t>(BN) * p.Dv);
    const A* lse = cptr<A>(p.lse);
    const A* delta = cptr<A>(p.delta);
    for (int b = 0; b < p.B; ++b)
      for (int kvh = 0; kvh < p.Hkv; ++kvh)
        for (int64_t n0 = 0; n0 < p.Tk; n0 += BN) {
          const int cols = static_cast<int>(std::min<int64_t>(BN, p.Tk - n0));
          load_rows(cptr<T>(p.k), p.sk, b, kvh, n0, cols, p.Dqk, kt);
          load_rows(cptr<T>(p.v), p.sv, b, kvh, n0, cols, p.Dv, vt);
          std::fill(dk.begin(), dk.end(), A(0));
          std::fill(dv.begin(), dv.end(), A(0));
          for (int g = 0; g < group; ++g) {
            const int h = kvh * group + g;
            const int64_t row_base = (static_cast<int64_t>(b) * p.Hq + h) * p.Tq;
            const TileWalk w = q_walk(p, b, h, n0, n0 + cols, BM);
            for (int64_t i = 0; i < w.count; ++i) {
              bool partial;
              const int64_t m0 = walk_start(w, i, &partial);
              if (m0 >= p.Tq) continue;
              const int rows = static_cast<int>(std::min<int64_t>(BM, p.Tq - m0));
              load_q(b, h, m0, rows, qt);
              load_rows(cptr<T>(p.dout), p.sdo, b, h, m0, rows, p.Dv, dot_);
              for (int r = 0; r < rows; ++r) {
                const A shift = lse_shift(lse[row_base + m0 + r]);
                const A dl = delta[row_base + m0 + r];
                const A* qr = &qt[static_cast<size_t>(r) * p.Dqk];
                const A* dor = &dot_[static_cast<size_t>(r) * p.Dv];
                for (int c = 0; c < cols; ++c) {
                  A dcap = 1;
                  const A sc = score(b, h, m0 + r, n0 + c, partial, qr, &kt[static_cast<size_t>(c) * p.Dqk], &dcap);
                  const A pr = std::exp(sc - shift);
                  if (pr == A(0)) continue;
                  // -- dV += (P Z)^T dO; dP = dO V^T; dS = P (dP Z - delta) (1 - tanh^2); dK += dS^T Q --
                  const A z = drop(b, h, m0 + r, n0 + c);
                  const A dp = dot(dor, &vt[static_cast<size_t>(c) * p.Dv], p.Dv);
                  const A ds = pr * (dp * z - dl) * dcap;
                  const A pz = pr * z;
                  for (int d = 0; d < p.Dv; ++d) dv[static_cast<size_t>(c) * p.Dv + d] += pz * dor[d];
                  for (int d = 0; d < p.Dqk; ++d) dk[static_cast<size_t>(c) * p.Dqk + d] += ds * qr[d];
                }
              }
            }
          }
          T* dkp = mptr<T>(p.dk) + b * p.sdk.b + kvh * p.sdk.h;
          T* dvp = mptr<T>(p.dv) + b * p.sdv.b + kvh * p.sdv.h;
          const A scale = static_cast<A>(p.scale);
          for (int c = 0; c < cols; ++c) {
            for (int d = 0; d < p.Dqk; ++d)
              store(&dkp[(n0 + c) * p.sdk.t + d * p.sdk.d], dk[static_cast<size_t>(c) * p.Dqk + d] * scale);
            for (int d = 0; d < p.Dv; ++d) store(&dvp[(n0 + c) * p.sdv.t + d * p.sdv.d], dv[static_cast<size_t>(c) * p.Dv + d]);
          }
        }
  }

  // dQ: one query tile at a time, over the key tiles it sees; pooled rows are carried back to the
  // unpooled rows of their windows (mean: shared evenly; max: to the first arg-max element).
  void backward_dq() const {
    const int BM = tile_m(), BN = tile_n();
    std::vector<A> qt(static_cast<size_t>(BM) * p.Dqk), dot_(static_cast<size_t>(BM) * p.Dv),
        kt(static_cast<size_t>(BN) * p.Dqk), vt(static_cast<size_t>(BN) * p.Dv), dq(static_cast<size_t>(BM) * p.Dqk);
    const A* lse = cptr<A>(p.lse);
    const A* delta = cptr<A>(p.delta);
    const A scale = static_cast<A>(p.scale);
    for (int b = 0; b < p.B; ++b)
      for (int h = 0; h < p.Hq; ++h) {
        const int kvh = h / group;
        const int64_t row_base = (static_cast<int64_t>(b) * p.Hq + h) * p.Tq;
        for (int64_t m0 = 0; m0 < p.Tq; m0 += BM) {
          const int rows = static_cast<int>(std::min<int64_t>(BM, p.Tq - m0));
          load_q(b, h, m0, rows, qt);
          load_rows(cptr<T>(p.dout), p.sdo, b, h, m0, rows, p.Dv, dot_);
          std::fill(dq.begin(), dq.end(), A(0));
          const TileWalk w = kv_walk(p, b, h, m0, m0 + rows, BN);
          for (int64_t i = 0; i < w.count; ++i) {
            bool partial;
            const int64_t n0 = walk_start(w, i, &partial);
            if (n0 >= p.Tk) continue;
            const int cols = static_cast<int>(std::min<int64_t>(BN, p.Tk - n0));
            load_rows(cptr<T>(p.k), p.sk, b, kvh, n0, cols, p.Dqk, kt);
            load_rows(cptr<T>(p.v), p.sv, b, kvh, n0, cols, p.Dv, vt);
            for (int r = 0; r < rows; ++r) {
              const A shift = lse_shift(lse[row_base + m0 + r]);
              const A dl = delta[row_base + m0 + r];
              const A* qr = &qt[static_cast<size_t>(r) * p.Dqk];
              for (int c = 0; c < cols; ++c) {
                const A* kc = &kt[static_cast<size_t>(c) * p.Dqk];
                A dcap = 1;
                const A pr = std::exp(score(b, h, m0 + r, n0 + c, partial, qr, kc, &dcap) - shift);
                if (pr == A(0)) continue;
                const A dp = dot(&dot_[static_cast<size_t>(r) * p.Dv], &vt[static_cast<size_t>(c) * p.Dv], p.Dv);
                const A ds = pr * (dp * drop(b, h, m0 + r, n0 + c) - dl) * dcap;
                for (int d = 0; d < p.Dqk; ++d) dq[static_cast<size_t>(r) * p.Dqk + d] += ds * kc[d];
              }
            }
          }
          store_dq(b, h, m0, rows, dq, scale);
        }
      }
  }

  void store_dq(int b, int h, int64_t m0, int rows, const std::vector<A>& dq, A scale) const {
    T* out = mptr<T>(p.dq) + b * p.sdq.b + h * p.sdq.h;
    if (p.pool_stride == 1 && !p.pool_cls) {
      for (int r = 0; r < rows; ++r)
        for (int d = 0; d < p.Dqk; ++d)
          store(&out[(m0 + r) * p.sdq.t + d * p.sdq.d], dq[static_cast<size_t>(r) * p.Dqk + d] * scale);
      return;
    }
    const T* q = cptr<T>(p.q) + b * p.sq.b + h * p.sq.h;
    for (int r = 0; r < rows; ++r) {
      const int64_t row = m0 + r;
      for (int d = 0; d < p.Dqk; ++d) {
        const A g = dq[static_cast<size_t>(r) * p.Dqk + d] * scale;
        A best = neg_inf<A>();
        if (p.pool_mode == kPoolMax)
          for (int j = 0; j < p.pool_stride; ++j) {
            int64_t src;
            if (pool_source(p, row, j, &src)) best = std::max(best, to_acc(q[src * p.sq.t + d * p.sq.d]));
          }
        bool taken = false;
        for (int j = 0; j < p.pool_stride; ++j) {
          int64_t src;
          if (!pool_source(p, row, j, &src)) continue;
          A val;
          if (p.pool_mode == kPoolMax) {
            const bool arg = !taken && to_acc(q[src * p.sq.t + d * p.sq.d]) == best;
            taken = taken || arg;
            val = arg ? g : A(0);
          } else {
            val = g * static_cast<A>(pool_mean_share(p, row, j));
          }
          if (pool_writes(p, row, j)) store(&out[src * p.sdq.t + d * p.sdq.d], val);
        }
      }
    }
  }
};

// Dropout arguments: p in [0, 1) with a threshold below 2**24 (so that the kept scale is finite), and
// not with block-sparse attention (whose semantics have no dropout).
void check_dropout(const AttnParams& p) {
  require(p.dropout_p >= 0.0 && p.dropout_p < 1.0 && dropout_threshold(p.dropout_p) < kDropoutFull,
          "dropout_p must be in [0, 1 - 2**-25), got " + std::to_string(p.dropout_p));
  require(p.dropout_p == 0.0 || !p.sparse, "dropout is not supported with block-sparse attention");
}

// Score modifiers: a finite soft cap >= 0, and neither it nor ALiBi with block-sparse attention (whose
// semantics have neither).
void check_score_mods(const AttnParams& p) {
  require(std::isfinite(p.softcap) && p.softcap >= 0.0,
          "softcap must be finite and >= 0, got " + std::to_string(p.softcap));
  require((p.softcap == 0.0 && p.alibi == 0) || !p.sparse,
          "softcap and ALiBi are not supported with block-sparse attention");
}

}  // namespace

void cpu_forward(const AttnParams& p) {
  check_forward(p);
  check_dropout(p);
  check_score_mods(p);
  cpu::check_varlen(p);
  if (p.dtype != kFloat64) return cpu::tiled_forward(p);
  require(p.tile_m >= 1 && p.tile_n >= 1, "tile sizes must be >= 1");
  Attention<double, double>(p).forward();
}

void cpu_backward(const AttnParams& p) {
  check_backward(p);
  check_dropout(p);
  check_score_mods(p);
  cpu::check_varlen(p);
  if (p.dtype != kFloat64) return cpu::tiled_backward(p);
  require(p.tile_m >= 1 && p.tile_n >= 1, "tile sizes must be >= 1");
  const Attention<double, double> a(p);
  a.preprocess();
  a.backward_dkdv();
  a.backward_dq();
}

}  // namespace effattn
