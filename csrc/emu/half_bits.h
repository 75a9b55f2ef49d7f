// Bit-exact float <-> fp16 / bf16 conversions, written with integer
// operations (not the compiler's _Float16) so the result is the device's
// cvt.rn result on every host: round to nearest even, subnormals kept,
// overflow to inf (fp16), NaN in -> canonical NaN 0x7fff out.
#pragma once

#include <cstdint>
#include <cstring>

namespace effattn::emu::fp {

inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float bits_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint16_t f32_to_f16_rn(float f) {
  const uint32_t x = f32_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return 0x7fffu;  // NaN
  // 65520 = halfway between 65504 (max finite, odd mantissa) and 2^16:
  // ties-to-even goes up, so everything >= 65520 (and inf) becomes inf.
  if (ax >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);
  if (ax >= 0x38800000u) {  // result is a normal fp16 (>= 2^-14)
    uint32_t h = (((ax >> 23) - 112u) << 10) | ((ax >> 13) & 0x3ffu);
    const uint32_t rem = ax & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // carry may bump the exponent: correct
    return static_cast<uint16_t>(sign | h);
  }
  // Subnormal fp16: value / 2^-24 rounded to an integer.  2^-25 is the tie
  // between 0 and the smallest subnormal and goes to (even) zero.
  if (ax <= 0x33000000u) return static_cast<uint16_t>(sign);
  const uint32_t e = ax >> 23;                        // 102..112
  const uint32_t mant = (ax & 0x7fffffu) | 0x800000u;  // 24 significant bits
  const uint32_t shift = 126u - e;                    // 14..24
  uint32_t h = mant >> shift;
  const uint32_t rem = mant & ((1u << shift) - 1u);
  const uint32_t halfway = 1u << (shift - 1u);
  if (rem > halfway || (rem == halfway && (h & 1u))) ++h;  // may become 0x400 = min normal: correct
  return static_cast<uint16_t>(sign | h);
}

inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu;
  uint32_t m = h & 0x3ffu;
  uint32_t bits;
  if (e == 0x1fu) {
    bits = sign | 0x7f800000u | (m << 13);  // inf, or NaN with its payload
  } else if (e != 0) {
    bits = sign | ((e + 112u) << 23) | (m << 13);
  } else if (m == 0) {
    bits = sign;
  } else {  // subnormal: normalise (exact in fp32)
    uint32_t ee = 113u;
    while (!(m & 0x400u)) {
      m <<= 1;
      --ee;
    }
    bits = sign | (ee << 23) | ((m & 0x3ffu) << 13);
  }
  return bits_f32(bits);
}

inline uint16_t f32_to_bf16_rn(float f) {
  uint32_t x = f32_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;  // NaN
  x += 0x7fffu + ((x >> 16) & 1u);                      // RNE on the low 16 bits; overflows to inf
  return static_cast<uint16_t>(x >> 16);
}

inline float bf16_to_f32(uint16_t b) { return bits_f32(static_cast<uint32_t>(b) << 16); }

}  // namespace effattn::emu::fp
