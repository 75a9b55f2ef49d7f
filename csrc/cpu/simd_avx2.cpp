// The micro-kernels of simd.h for AVX2 + FMA (compiled with -mavx2 -mfma -mf16c): 8 floats per vector,
// a 6 x 2-vector register tile (12 of the 16 ymm registers).
#define EA_ISA_NS avx2
#define EA_ISA "avx2"
#define EA_W 8
#define EA_MR 6
#define EA_NV 2
#include "simd_kernels.inc"

namespace effattn {
namespace cpu {
const Kernels& kernels_avx2() { return avx2::table(); }
}  // namespace cpu
}  // namespace effattn
