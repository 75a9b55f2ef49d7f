// EA_CUDA_CHECK(call): throw effattn::CudaError with the CUDA error name and string when a CUDA
// runtime call (or, through cudaGetLastError, a launch) fails.
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "launch.h"

#define EA_CUDA_CHECK(call)                                                                             \
  do {                                                                                                  \
    const cudaError_t ea_err_ = (call);                                                                 \
    if (ea_err_ != cudaSuccess)                                                                         \
      throw ::effattn::CudaError(std::string(cudaGetErrorName(ea_err_)) + ": " +                        \
                                 cudaGetErrorString(ea_err_) + " (in " #call ")");                      \
  } while (0)
