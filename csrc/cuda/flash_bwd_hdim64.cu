// Instantiations of the flash attention bwdward kernels for head dims up to 64 (fp16 and bf16);
// one file per (direction, head dim) so that ninja compiles them in parallel.
#include "flash_kernels.cuh"

namespace effattn {
namespace cuda {

template void launch_bwd<__half, 64>(const AttnParams&, cudaStream_t);
template void launch_bwd<__nv_bfloat16, 64>(const AttnParams&, cudaStream_t);

}  // namespace cuda
}  // namespace effattn
