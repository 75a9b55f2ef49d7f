// Argument checks of the launchers (host only): the Python side validates tensors first; these
// checks make sure a raw-pointer launcher never runs on arguments that would read out of bounds.
#pragma once

#include <stdexcept>
#include <string>

#include "params.h"

namespace effattn {

inline void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("effattn extension: " + what);
}

inline void check_common(const AttnParams& p) {
  require(p.B >= 0 && p.Hq >= 0 && p.Hkv >= 1 && p.Tq >= 0 && p.Tk >= 0 && p.T_in >= 0,
          "sizes must be non-negative (Hkv >= 1)");
  require(p.Hq % p.Hkv == 0, "Hq must be a multiple of Hkv");
  require(p.Dqk >= 1 && p.Dv >= 1, "head dims must be >= 1");
  require(p.dtype >= kFloat32 && p.dtype <= kFloat64, "unknown dtype code " + std::to_string(p.dtype));
  require(p.q != 0 && p.k != 0 && p.v != 0, "q, k, v addresses must be set");
  require(p.pool_stride >= 1, "pool_stride must be >= 1");
  require(p.pool_mode == kPoolMean || p.pool_mode == kPoolMax, "pool_mode must be 0 (mean) or 1 (max)");
  if (p.pool_stride > 1 || p.pool_cls) {
    require(!p.sparse, "query pooling and block-sparse attention cannot be combined");
    require(p.T_src >= 0 && p.Tq == (p.T_src + p.pool_stride - 1) / p.pool_stride,
            "Tq must be ceil(T_src / pool_stride)");
  } else {
    require(p.T_in == p.Tq, "without pooling T_in must equal Tq");
  }
  require(p.mask_kind >= kMaskNone && p.mask_kind <= kMaskAdd, "unknown mask kind");
  require(p.mask_kind == kMaskNone || p.mask != 0, "mask address must be set");
  require(p.mask_kind != kMaskBool || p.mask_dtype == kBool, "a bool mask must have dtype code kBool");
  require(p.mask_kind != kMaskAdd || p.mask_dtype <= kFloat64, "an additive mask must be a float dtype");
  if (p.sparse) {
    require(p.block_q >= 1 && p.block_kv >= 1, "block sizes must be >= 1");
    require(p.kv_partial.num && p.kv_partial.idx && p.kv_full.num && p.kv_full.idx, "kv block lists must be set");
    require(p.q_seg == 0 || p.kv_seg != 0, "kv segment ids must be set with q segment ids");
  }
}

inline void check_forward(const AttnParams& p) {
  check_common(p);
  require(p.o != 0 && p.lse != 0, "out and lse addresses must be set");
}

inline void check_backward(const AttnParams& p) {
  check_common(p);
  require(p.o != 0 && p.lse != 0 && p.dout != 0 && p.delta != 0, "out, lse, dout, delta addresses must be set");
  require(p.dq != 0 && p.dk != 0 && p.dv != 0, "dq, dk, dv addresses must be set");
  if (p.sparse)
    require(p.q_partial.num && p.q_partial.idx && p.q_full.num && p.q_full.idx, "q block lists must be set");
}

}  // namespace effattn
