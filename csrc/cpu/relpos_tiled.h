// Relative-position ("band") attention on the CPU: the op behind Funnel-Transformer's fused layer
// (effattn.relpos_attention; semantics in effattn/reference.py, relpos_attention). float32, float16 and
// bfloat16 inputs, fp32 accumulation, dropout on the probabilities; see relpos_tiled.cpp.
#pragma once

#include <cstdint>

#include "../common/params.h"

namespace effattn {
namespace cpu {

// Arguments of the relative-position launchers: raw addresses and element strides, as AttnParams.
struct RelposParams {
  // -- inputs: q, qr (B, Hq, Tq, D); k (B, Hkv, Tk, D); v (B, Hkv, Tk, Dv); R (Hq, NR, D) with its
  // strides in (h, t, d) of a Strides4 (b unused); tt (B, Hq, Tq, 2) or 0; q_types (B, Tq), k_types
  // (B, Tk) int32 contiguous (with tt); key padding mask (B, Tk) uint8 contiguous (1 = keep) or 0 --
  int64_t q = 0, k = 0, v = 0, qr = 0, R = 0, tt = 0, q_types = 0, k_types = 0, kpm = 0;
  Strides4 sq, sk, sv, sqr, sR, stt;
  // -- forward outputs: out (B, Hq, Tq, Dv) in the input dtype, lse (B, Hq, Tq) float32 contiguous --
  int64_t o = 0, lse = 0;
  Strides4 so;
  // -- backward: dout (input dtype), delta = rowsum(dO * O) - dlse (B, Hq, Tq) float32 contiguous; the
  // gradients are float32 contiguous: dq, dqr (B, Hq, Tq, D), dk (B, Hkv, Tk, D), dv (B, Hkv, Tk, Dv),
  // dR (Hq, NR, D) summed over the batch, dtt (B, Hq, Tq, 2) (with tt) --
  int64_t dout = 0, delta = 0, dq = 0, dk = 0, dv = 0, dqr = 0, dR = 0, dtt = 0;
  Strides4 sdo;
  // -- sizes and rules --
  int B = 0, Hq = 0, Hkv = 0, Tq = 0, Tk = 0, NR = 0, D = 0, Dv = 0;
  int dtype = kFloat32;
  double scale = 1.0;
  int rel_stride = 1, separate_cls = 0, cls_type = 2;
  // dropout (common/philox.h) on the probabilities, 0 = none; keep bits from the Philox seed, drawn on
  // the counters (key, query row, b * Hq + h) as the dense kernels draw them
  double dropout_p = 0.0;
  uint64_t seed = 0;
  // tiles (query rows x keys) and threads (<= 0: the hardware's concurrency)
  int tile_m = 32, tile_n = 128, num_threads = 0;
};

void relpos_forward(const RelposParams& p);
void relpos_backward(const RelposParams& p);

}  // namespace cpu
}  // namespace effattn
