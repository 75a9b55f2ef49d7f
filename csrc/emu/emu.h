// effattn CUDA host emulator: umbrella header.
//
// Build a kernel source with
//   g++ -std=c++17 -DEFFATTN_CUDA_EMU -I csrc -I csrc/emu/include ...
// and link csrc/emu/{core,memcheck,warp,cp_async}.cpp.  See README.md.
#pragma once

#include "include/cuda_runtime.h"
#include "include/cuda_fp16.h"
#include "include/cuda_bf16.h"

#include "core.h"
#include "cp_async.h"
#include "error.h"
#include "memcheck.h"
#include "warp.h"

#ifdef EFFATTN_CUDA_EMU
// Declares `unsigned char* const name` = the block's dynamic shared memory.
// Use it inside the kernel body (where the device declares
// `extern __shared__ __align__(16) unsigned char name[];`).
#define EA_DYNAMIC_SMEM(name) unsigned char* const name = ::effattn::emu::dynamic_smem()
#endif
