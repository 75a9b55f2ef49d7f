// The fast C++ CPU attention: tiled, SIMD, multi-threaded (float32, float16 and bfloat16 inputs; see
// attn_tiled.cpp). The float64 path is the scalar implementation of attn_cpu.cpp.
#pragma once

#include "../common/params.h"

namespace effattn {
namespace cpu {

// Tiles of query rows x keys (before the cap by the BlockMask block sizes in sparse mode).
constexpr int kTileM = 64;
constexpr int kTileN = 64;

void tiled_forward(const AttnParams& p);
void tiled_backward(const AttnParams& p);

}  // namespace cpu
}  // namespace effattn
