// The micro-kernels of simd.h for AVX-512 (compiled with -mavx512f -mavx512bw -mavx512dq -mavx512vl -mfma
// -mf16c): 16 floats per vector, a 6 x 4-vector register tile (24 of the 32 zmm registers).
#define EA_ISA_NS avx512
#define EA_ISA "avx512"
#define EA_W 16
#define EA_MR 6
#define EA_NV 4
#define EA_DROP_NV 4
#include "simd_kernels.inc"

namespace effattn {
namespace cpu {
const Kernels& kernels_avx512() { return avx512::table(); }
}  // namespace cpu
}  // namespace effattn
