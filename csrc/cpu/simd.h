// SIMD micro-kernels of the C++ CPU attention (csrc/cpu/attn_tiled.cpp), one table per instruction set.
//
// The same source (simd_kernels.inc) is compiled three times with its own flags: AVX-512
// (simd_avx512.cpp), AVX2 + FMA (simd_avx2.cpp) and a portable build with the compiler's baseline
// flags (simd_portable.cpp). The table is chosen once at run time from what the CPU supports
// (``__builtin_cpu_supports``) and can be forced for tests (``set_isa``).
//
// Layout conventions of the kernels: fp32 row-major tiles with a leading dimension in elements; the
// width ``N`` of every output tile is a multiple of kPad (the tiles are padded with zeros), so that a
// kernel never needs a masked tail along N. ``M`` (rows) and ``K`` (the reduction) are any size >= 0.
#pragma once

#include <cstdint>

namespace effattn {
namespace cpu {

// Tile widths (keys, head dims) are padded to a multiple of this many floats (one AVX-512 vector).
constexpr int kPad = 16;

inline int pad_to(int n) { return (n + kPad - 1) / kPad * kPad; }

// Dropout of one row of a tile (common/philox.h): the Philox counters of its element 0 (key, query
// row, b * Hq + h), the seed, the threshold on the top bits and the scale of a kept element.
struct DropoutTile {
  uint64_t seed;
  uint32_t threshold;
  float scale;
  uint32_t key, row, bh;
};

struct Kernels {
  const char* name;
  // C[M, N] (+)= A[M, K] . B[K, N]: accumulate into C when ``acc``, else overwrite. A is read through
  // strides (element (i, k) at A[i * sa_i + k * sa_k]: a row-major tile, its transpose, or a tensor in
  // place); B and C are row-major with N % kPad == 0.
  void (*gemm)(int M, int N, int K, const float* A, int64_t sa_i, int64_t sa_k, const float* B, int64_t ldb,
               float* C, int64_t ldc, bool acc);
  // x[i] *= a  (n % kPad == 0)
  void (*scale)(float* x, int n, float a);
  // One key tile of the online softmax, transposed layout: s[c * ld + r] is the exp2-domain score of
  // key c for row r (c < cols, r < n, n % kPad == 0). Per row: m' = max(m, max_c s), alpha =
  // exp2(m - m'), s = exp2(s - m'), l = l * alpha + sum_c s, m = m' (shifts of rows with m' = -inf
  // are 0, so that exp2(-inf) = 0).
  void (*softmax_t)(float* s, int cols, int n, int64_t ld, float* m, float* l, float* alpha);
  // x[i] = exp2(x[i] - shift)  (n % kPad == 0; exp2(-inf) = 0)
  void (*exp2_sub)(float* x, int n, float shift);
  // x[i] = exp2(x[i] - shift[i])
  void (*exp2_sub_vec)(float* x, const float* shift, int n);
  // dp[i] = p[i] * (dp[i] - delta)
  void (*dsoftmax)(float* dp, const float* p, int n, float delta);
  // dp[i] = p[i] * (dp[i] - delta[i])
  void (*dsoftmax_vec)(float* dp, const float* p, const float* delta, int n);
  // contiguous conversions of n elements (any n): fp16 / bf16 bits <-> float, round to nearest even
  void (*fp16_to_f32)(const uint16_t* src, float* dst, int n);
  void (*bf16_to_f32)(const uint16_t* src, float* dst, int n);
  void (*f32_to_fp16)(const float* src, uint16_t* dst, int n);
  void (*f32_to_bf16)(const float* src, uint16_t* dst, int n);
  // Dropout, n % kPad == 0: x[i] *= (kept ? d.scale : 0) for the draw of key d.key + i of row d.row
  // (``along_rows`` false: the keys of a row side by side), or of key d.key of row d.row + i (true).
  void (*dropout)(float* x, int n, const DropoutTile& d, bool along_rows);
  // The backward's row pass under dropout, keys side by side (as ``dropout`` with along_rows false):
  // with z the kept scale, dp[i] = p[i] * (dp[i] * z - delta), then p[i] *= z.
  void (*dropout_dsoftmax)(float* dp, float* p, int n, float delta, const DropoutTile& d);
  // The soft cap, n % kPad == 0: t = tanh(x[i] / cap), x[i] = cap * t, and, unless dcap is null, its
  // derivative dcap[i] = 1 - t^2.
  void (*softcap)(float* x, int n, float cap, float* dcap);
  // ALiBi's bias, n % kPad == 0: x[i] -= slope * |a[i] - b| (a[i], b: a row's position and a key, or a key and
  // a row's position, both counted from the tile's first key).
  void (*alibi)(float* x, const float* a, float b, float slope, int n);
  // x[i] *= y[i]  (n % kPad == 0)
  void (*mul)(float* x, const float* y, int n);
};

// The tables compiled into the extension (the AVX ones only on x86-64 with a compiler that has them).
const Kernels& kernels_portable();
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define EFFATTN_X86_SIMD 1
const Kernels& kernels_avx2();
const Kernels& kernels_avx512();
#endif

// The table in use: the best the CPU supports, unless forced with set_isa.
const Kernels& kernels();
// Force "avx512", "avx2" or "portable", or "auto" (the best supported); false if this CPU or build
// cannot run the one asked for.
bool set_isa(const char* name);
// Name of the table in use.
const char* isa_name();

}  // namespace cpu
}  // namespace effattn
