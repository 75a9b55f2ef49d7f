// Philox-4x32-10 and the dropout rule of effattn, shared by the C++ CPU implementation and (later) the
// CUDA kernels: ``__host__ __device__`` under nvcc, plain ``inline`` for the host compiler.
//
// Semantics (effattn/reference.py): score (b, h, i, j) is kept iff
//     philox(seed; c0 = j, c1 = i, c2 = b * Hq + h, c3 = 0)[0] >> (32 - kDropoutBits) >= threshold
// with threshold = round(dropout_p * 2**kDropoutBits) (half to even, as Python's round), and a kept
// probability is scaled by 2**kDropoutBits / (2**kDropoutBits - threshold). ``i`` is the query row of
// the attention (the pooled row with query pooling), ``j`` the key. The first output word equals
// Triton's ``tl.philox(seed, c0, c1, c2, c3)[0]`` and reference.philox_randint bit for bit.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define EA_PHILOX_HD __host__ __device__ __forceinline__
#else
#define EA_PHILOX_HD inline
#endif

namespace effattn {

// Dropout compares the top kDropoutBits bits of a 32-bit Philox draw with a threshold.
constexpr int kDropoutBits = 24;
constexpr uint32_t kDropoutFull = uint32_t{1} << kDropoutBits;

// Philox-4x32-10 constants (Salmon et al. 2011), as Triton's tl.philox uses them.
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr int kPhiloxRounds = 10;

// First 32-bit output of Philox-4x32-10 keyed by ``seed`` (key words: its low and high halves) on
// the counters (c0, c1, c2, c3).
EA_PHILOX_HD uint32_t philox_first(uint64_t seed, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const uint64_t pb = static_cast<uint64_t>(kPhiloxRoundB) * c2;
    const uint64_t pa = static_cast<uint64_t>(kPhiloxRoundA) * c0;
    const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(pb);
    c3 = static_cast<uint32_t>(pa);
    c0 = n0;
    c2 = n2;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return c0;
}

// round(dropout_p * 2**kDropoutBits), ties to even (Python's round; the product is exact in double).
EA_PHILOX_HD uint32_t dropout_threshold(double dropout_p) {
  const double x = dropout_p * static_cast<double>(kDropoutFull);
  const double f = std::floor(x);
  const double frac = x - f;
  const bool up = frac > 0.5 || (frac == 0.5 && std::fmod(f, 2.0) != 0.0);
  return static_cast<uint32_t>(f) + (up ? 1u : 0u);
}

// The scale of a kept probability: the inverse of the exact keep rate of the threshold (< 2**24).
EA_PHILOX_HD double dropout_scale(uint32_t threshold) {
  return static_cast<double>(kDropoutFull) / static_cast<double>(kDropoutFull - threshold);
}

// Whether a draw keeps its score.
EA_PHILOX_HD bool dropout_kept(uint32_t bits, uint32_t threshold) { return (bits >> (32 - kDropoutBits)) >= threshold; }

}  // namespace effattn
