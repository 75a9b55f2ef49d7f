// Host-side helpers of the C++ CPU implementation (attn_cpu.cpp, attn_tiled.cpp): typed pointers from
// the integer addresses of AttnParams, and the fp16 / bf16 storage types with their scalar conversions
// (the bit-exact ones of common/attn_rules.h).
#pragma once

#include <cstdint>

#include "../common/attn_rules.h"

namespace effattn {
namespace cpu {

// fp16 / bf16 elements as their storage bits.
struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

inline float to_f32(float x) { return x; }
inline float to_f32(Half x) { return fp16_bits_to_float(x.bits); }
inline float to_f32(BFloat16 x) { return bf16_bits_to_float(x.bits); }
inline void put(float* d, float x) { *d = x; }
inline void put(Half* d, float x) { d->bits = float_to_fp16_bits(x); }
inline void put(BFloat16* d, float x) { d->bits = float_to_bf16_bits(x); }

// An AttnParams address as a typed pointer.
template <class T>
const T* cptr(int64_t a) {
  return reinterpret_cast<const T*>(a);
}
template <class T>
T* mptr(int64_t a) {
  return reinterpret_cast<T*>(a);
}

}  // namespace cpu
}  // namespace effattn
