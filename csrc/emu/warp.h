// effattn CUDA host emulator: warp collectives.  Each is a rendezvous of the
// lanes named in its mask (all 32 for mma/ldmatrix, which are .aligned): a
// lane arrives with its operands and sleeps; the last lane to arrive computes
// every lane's result, as the instruction does, and wakes them all.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "core.h"

struct __half;
struct __nv_bfloat16;

namespace effattn::emu {

enum class ShflMode : int { Up = 0, Down = 1, Bfly = 2, Idx = 3 };

// shfl.sync.{up,down,bfly,idx} on up to 64 bits (CUDA's 64-bit overloads do
// two 32-bit shuffles with the same source lane: same result).  `b` is the
// lane/offset/xor operand, `width` the CUDA sub-section width.
uint64_t shfl_bits(ShflMode mode, unsigned mask, uint64_t bits, unsigned b, int width,
                   const char* what);

template <class T>
T shfl(ShflMode mode, unsigned mask, T var, unsigned b, int width, const char* what) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffle of an unsupported type");
  uint64_t bits = 0;
  std::memcpy(&bits, &var, sizeof(T));
  bits = shfl_bits(mode, mask, bits, b, width, what);
  T r;
  std::memcpy(&r, &bits, sizeof(T));
  return r;
}

enum class VoteKind : int { Ballot = 0, Any = 1, All = 2 };
unsigned vote(VoteKind kind, unsigned mask, bool pred, const char* what);
void syncwarp(unsigned mask);
// Lanes of the caller's warp that exist (the emulator has no notion of
// divergence, so it answers as for a converged warp).
unsigned activemask();

// mma.sync.aligned.m16n8k16.row.col.f32.T.T.f32 d, a, {b0,b1}, d
// (T = __half or __nv_bfloat16): fragments per the PTX ISA layouts.
void mma_16816_impl(bool bf16, float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <class T>
void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  constexpr bool kHalf = std::is_same_v<T, __half>;
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  static_assert(kHalf || kBf16, "mma_16816<T>: T must be __half or __nv_bfloat16");
  mma_16816_impl(kBf16, d, a, b0, b1);
}

// ldmatrix.sync.aligned.m8n8.x{1,2,4}{,.trans}.shared.b16 r, [row]
// Lanes 8i..8i+7 give the row addresses of matrix i (only lanes < 8*num are
// read, and checked: inside dynamic shared memory, 16 bytes, 16-aligned).
void ldmatrix_impl(int num, bool trans, uint32_t* r, const void* row);
inline void ldmatrix_x1(uint32_t (&r)[1], const void* row) { ldmatrix_impl(1, false, r, row); }
inline void ldmatrix_x2(uint32_t (&r)[2], const void* row) { ldmatrix_impl(2, false, r, row); }
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row) { ldmatrix_impl(4, false, r, row); }
inline void ldmatrix_x1_trans(uint32_t (&r)[1], const void* row) { ldmatrix_impl(1, true, r, row); }
inline void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row) { ldmatrix_impl(2, true, r, row); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) { ldmatrix_impl(4, true, r, row); }

}  // namespace effattn::emu
