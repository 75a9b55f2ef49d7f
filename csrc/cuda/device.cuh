// What differs between the device build of the CUDA kernels (nvcc) and their host build on the emulator
// of csrc/emu (the host compiler with -DEFFATTN_CUDA_EMU, backend "cuda-emu"): the declaration of the
// dynamic shared memory and the kernel launch. Everything else is the same source.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <utility>

#ifdef EFFATTN_CUDA_EMU
#include "../emu/emu.h"
#else
// `EA_DYNAMIC_SMEM(name);` declares `name`, the block's dynamic shared memory (16-byte aligned bytes).
#define EA_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace effattn {
namespace cuda {

// kernel<<<grid, block, smem, stream>>>(args...), or its run on the emulator (blocks one after another,
// the threads of a block as fibers; `name` appears in the emulator's reports).
template <class... Params, class... Args>
void launch_kernel(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                   cudaStream_t stream, Args&&... args) {
#ifdef EFFATTN_CUDA_EMU
  (void)stream;
  ::effattn::emu::launch(name, reinterpret_cast<const void*>(kernel), grid, block, smem, [&] { kernel(args...); });
#else
  (void)name;
  kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
#endif
}

}  // namespace cuda
}  // namespace effattn
