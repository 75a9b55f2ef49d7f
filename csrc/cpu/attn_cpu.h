// C++ CPU implementation of effattn's tiled attention (forward and backward; dense, pooled-query and
// block-sparse): the algorithm of the CUDA kernels, tile by tile, on host memory.
#pragma once

#include "../common/params.h"

namespace effattn {

// out, lse from q, k, v (and the mask / pooling / block lists in ``p``).
void cpu_forward(const AttnParams& p);
// delta = rowsum(dout * out) - dlse, then dq, dk, dv. The caller zeroes dq rows that no pooled row reads.
void cpu_backward(const AttnParams& p);

}  // namespace effattn
