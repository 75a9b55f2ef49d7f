// Varlen calls on the CPU (AttnParams' vl_* fields): sequence s as a dense problem of its own.
#pragma once

#include <cstdint>
#include <string>

#include "../common/check.h"
#include "../common/params.h"

namespace effattn {
namespace cpu {

inline int64_t element_size(int dtype) { return dtype == kFloat64 ? 8 : dtype == kFloat32 ? 4 : 2; }

// The per-sequence arrays' checks: lengths >= 0 and every sequence inside q (and its entry of k).
inline void check_varlen(const AttnParams& p) {
  if (p.vl_q_len == 0) return;
  require(p.vl_q_start && p.vl_k_start && p.vl_k_len, "varlen: q_start, k_start and k_len must be set");
  require(p.dtype != kFloat64, "varlen: the C++ CPU kernels take float32, float16 and bfloat16");
  require(p.pool_stride == 1 && !p.pool_cls && !p.sparse && p.mask_kind == kMaskNone,
          "varlen: no query pooling, block mask or user mask");
  const auto* qs = reinterpret_cast<const int32_t*>(p.vl_q_start);
  const auto* ql = reinterpret_cast<const int32_t*>(p.vl_q_len);
  const auto* ks = reinterpret_cast<const int32_t*>(p.vl_k_start);
  const auto* kl = reinterpret_cast<const int32_t*>(p.vl_k_len);
  for (int s = 0; s < p.B; ++s)
    require(qs[s] >= 0 && ql[s] >= 0 && int64_t{qs[s]} + ql[s] <= p.Tq && ks[s] >= 0 && kl[s] >= 0 &&
                int64_t{ks[s]} + kl[s] <= p.Tk,
            "varlen: sequence " + std::to_string(s) + " (rows " + std::to_string(qs[s]) + " + " +
                std::to_string(ql[s]) + ", keys " + std::to_string(ks[s]) + " + " + std::to_string(kl[s]) +
                ") lies outside q (" + std::to_string(p.Tq) + " rows) or k (" + std::to_string(p.Tk) + " keys)");
}

// Sequence s of a varlen call as a dense problem (B = 1): its rows of q, o, dout, dq, lse, delta and
// dlse, its keys of k, v, dk, dv; bottom-right alignment, seed + s, its ALiBi slopes.
inline AttnParams sequence_params(const AttnParams& p, int s) {
  const int64_t qs = reinterpret_cast<const int32_t*>(p.vl_q_start)[s];
  const int64_t ql = reinterpret_cast<const int32_t*>(p.vl_q_len)[s];
  const int64_t ks = reinterpret_cast<const int32_t*>(p.vl_k_start)[s];
  const int64_t kl = reinterpret_cast<const int32_t*>(p.vl_k_len)[s];
  const int64_t e = element_size(p.dtype), a = 4;  // lse, delta, dlse and the slopes are float32
  const int64_t kb = p.vl_cached ? s : 0;
  const auto at = [](int64_t base, int64_t elements, int64_t size) { return base ? base + elements * size : 0; };
  AttnParams q = p;
  q.vl_q_start = q.vl_q_len = q.vl_k_start = q.vl_k_len = 0;
  q.vl_cached = 0;
  q.B = 1;
  q.Tq = q.T_in = q.T_src = static_cast<int>(ql);
  q.Tk = static_cast<int>(kl);
  q.q = at(p.q, qs * p.sq.t, e);
  q.o = at(p.o, qs * p.so.t, e);
  q.dout = at(p.dout, qs * p.sdo.t, e);
  q.dq = at(p.dq, qs * p.sdq.t, e);
  q.k = at(p.k, kb * p.sk.b + ks * p.sk.t, e);
  q.v = at(p.v, kb * p.sv.b + ks * p.sv.t, e);
  q.dk = at(p.dk, kb * p.sdk.b + ks * p.sdk.t, e);
  q.dv = at(p.dv, kb * p.sdv.b + ks * p.sdv.t, e);
  q.lse = at(p.lse, qs, a);
  q.delta = at(p.delta, qs, a);
  q.dlse = at(p.dlse, qs, a);
  q.stat_sh = p.stat_sh ? p.stat_sh : p.Tq;
  q.diag_offset = p.diag_offset + kl - ql;
  q.seed = p.seed + static_cast<uint64_t>(s);
  q.alibi = at(p.alibi, s * p.alibi_sb, a);
  return q;
}

}  // namespace cpu
}  // namespace effattn
