// Arguments of every effattn launcher (CPU and CUDA): raw addresses, element strides, sizes, flags.
//
// The struct is plain data, filled field by field from Python (pybind11 exposes each member), so the
// extension never sees a torch tensor and does not link against libtorch. Addresses are integers
// (``tensor.data_ptr()``); strides are in elements; a stride of 0 broadcasts.
#pragma once

#include <cstdint>

namespace effattn {

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3, kBool = 4 };
enum MaskKind : int { kMaskNone = 0, kMaskBool = 1, kMaskAdd = 2 };
enum PoolMode : int { kPoolMean = 0, kPoolMax = 1 };

// Element strides of a 4-D tensor (B, H, T, D); for a mask (B, H, Tq, Tk).
struct Strides4 {
  int64_t b = 0, h = 0, t = 0, d = 0;
};

// A compressed block list of a BlockMask: per (b, h, block) a count and the indices of the blocks it
// keeps, ``num (B, H, nblocks)`` and ``idx (B, H, nblocks, n)``, int32, broadcast by stride 0.
struct BlockList {
  int64_t num = 0, idx = 0;
  int64_t num_sb = 0, num_sh = 0, num_sm = 0;
  int64_t idx_sb = 0, idx_sh = 0, idx_sm = 0, idx_sn = 0;
};

struct AttnParams {
  // -- forward inputs and outputs --
  int64_t q = 0, k = 0, v = 0, o = 0;
  Strides4 sq, sk, sv, so;
  int64_t lse = 0;  // (B, Hq, Tq) contiguous, float32 (float64 for float64 inputs)
  // user mask, broadcast to (B, Hq, Tq, Tk) by its strides: bool (True = keep) or additive float
  int64_t mask = 0;
  Strides4 smask;
  int mask_kind = kMaskNone;
  int mask_dtype = kBool;
  // -- backward --
  int64_t dout = 0, dq = 0, dk = 0, dv = 0;
  Strides4 sdo, sdq, sdk, sdv;
  int64_t delta = 0;  // (B, Hq, Tq) contiguous, accumulation dtype: rowsum(dO * O) - dlse
  int64_t dlse = 0;   // (B, Hq, Tq) contiguous, like lse; 0 = none
  int64_t stat_sh = 0;  // head stride of lse, delta and dlse in elements (varlen: total_q); 0 = Tq
  // -- sizes --
  int B = 0, Hq = 0, Hkv = 0;
  int Tq = 0;     // query rows of the attention (the pooled length with pooling)
  int Tk = 0;     // keys
  int T_in = 0;   // rows of the q tensor (unpooled length with pooling, else Tq)
  int T_src = 0;  // length of the pooled source sequence x' (see QueryPool.source_len)
  int Dqk = 0, Dv = 0;
  int dtype = kFloat32;  // of q, k, v, o, dout and the gradients
  double scale = 1.0;
  // -- window rule (dense): -window_left <= key - pos(row) <= window_right, negative = unbounded --
  int64_t window_left = -1, window_right = -1, diag_offset = 0;
  // -- score modifiers (dense), applied to scale * q.k before the masks, in this order --
  double softcap = 0.0;  // > 0: softcap * tanh(s / softcap) (the soft cap of Gemma-2); 0 = none
  // ALiBi: -slope[b, h] * |pos(row) - key|, pos the window rule's query position; slopes (B, Hq) in the
  // accumulation dtype (float32, float64 for float64 inputs), heads contiguous; 0 = none
  int64_t alibi = 0;
  int64_t alibi_sb = 0;
  // -- query pooling (Funnel): stride 1 = none --
  int pool_stride = 1, pool_mode = kPoolMean, pool_cls = 0;
  // -- block-sparse (BlockMask): blocks of block_q x block_kv, lists, and the rule of PARTIAL blocks --
  int sparse = 0;
  int block_q = 0, block_kv = 0;
  BlockList kv_partial, kv_full;  // per query block: its key blocks (forward, dQ)
  BlockList q_partial, q_full;    // per key block: its query blocks (dK, dV)
  int64_t rule_window_left = -1, rule_window_right = -1, rule_diag_offset = 0, rule_n_global = 0;
  int64_t q_seg = 0, kv_seg = 0;  // int32 segment ids (B, Tq) / (B, Tk); 0 = no segments
  int64_t q_seg_sb = 0, q_seg_st = 0, kv_seg_sb = 0, kv_seg_st = 0;
  // -- varlen (effattn.varlen_attention; C++ CPU only): B sequences, int32 (B,) arrays; vl_q_len 0 = dense --
  // Sequence s: rows [q_start, q_start + q_len) of entry 0 of q, o, dout, dq and of lse, delta, dlse
  // ((1, Hq, Tq), stat_sh = Tq) against keys [k_start, k_start + k_len) of entry s of k, v, dk, dv
  // (vl_cached: KV caches) or of entry 0 (packed); causal and windows aligned bottom-right per sequence
  // (diag_offset + k_len - q_len), dropout seeded with seed + s, ALiBi slopes of row s.
  int64_t vl_q_start = 0, vl_q_len = 0, vl_k_start = 0, vl_k_len = 0;
  int vl_cached = 0;
  // -- dropout (common/philox.h): on the probabilities, 0 = none; keep bits from the Philox seed --
  double dropout_p = 0.0;
  uint64_t seed = 0;
  // -- execution --
  int64_t stream = 0;  // cudaStream_t as an integer (CUDA launchers)
  int device = 0;      // CUDA device index
  int tile_m = 32, tile_n = 32;  // CPU implementation's tile sizes (the CUDA kernels fix their own)
  int num_threads = 0;           // CPU implementation's threads; 0 = the hardware's concurrency
};

}  // namespace effattn
