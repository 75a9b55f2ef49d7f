// Host entry points of the CUDA kernels (implemented in launch.cu, compiled by nvcc). Plain C++: the
// bindings include this header without CUDA headers.
#pragma once

#include <stdexcept>
#include <string>

#include "../common/params.h"

namespace effattn {

// A failed CUDA call or launch: the message holds the CUDA error name and string.
class CudaError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// out, lse on the stream ``p.stream`` of device ``p.device`` (asynchronous, like any kernel launch).
void cuda_forward(const AttnParams& p);
// delta, then dk/dv and dq, on ``p.stream``.
void cuda_backward(const AttnParams& p);
// Number of CUDA devices; throws CudaError when the runtime cannot find any (no driver, no GPU).
int cuda_device_count();
// CUDA runtime version the extension was built with, e.g. 13000.
int cuda_runtime_version();

}  // namespace effattn
