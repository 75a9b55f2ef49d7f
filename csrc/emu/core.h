// effattn CUDA host emulator: kernel launch, the current emulated thread,
// block barriers and dynamic shared memory.
//
// A launch runs the blocks one after another; the threads of a block run as
// cooperative fibers (ucontext) on the calling OS thread, so a run is
// deterministic.  A fiber runs until it blocks (barrier, warp collective) or
// exits; see README.md.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <type_traits>

#include "error.h"
#include "include/vector_types.h"

namespace effattn::emu {

using KernelBody = void (*)(void*);

// Type-erased launch; use launch() below.
void launch_erased(const char* kernel_name, const void* kernel_id, dim3 grid, dim3 block,
                   size_t dynamic_smem_bytes, KernelBody body, void* body_ctx);

// Runs body() once per thread of every block.  kernel_id identifies the
// kernel for cudaFuncSetAttribute (pass the kernel's function pointer, or
// nullptr).  Throws EmuError if the configuration is invalid or any check
// fired while running; the process and later launches are unaffected.
template <class F>
void launch(const char* kernel_name, const void* kernel_id, dim3 grid, dim3 block,
            size_t dynamic_smem_bytes, F&& body) {
  using Fn = std::remove_reference_t<F>;
  launch_erased(kernel_name, kernel_id, grid, block, dynamic_smem_bytes,
                [](void* p) { (*static_cast<Fn*>(p))(); },
                const_cast<void*>(static_cast<const void*>(std::addressof(body))));
}

// ---- the current emulated thread (error outside a launch) ----
const uint3& thread_idx();
const uint3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();
unsigned linear_thread_id();  // x + y*bx + z*bx*by
unsigned lane_id();           // linear % 32
unsigned warp_id();           // linear / 32
bool in_kernel();             // running inside an emulated thread?

// ---- dynamic shared memory of the current block ----
// Exactly dynamic_smem_bytes long; its end touches a PROT_NONE page, it is
// refilled with 0xFF (a NaN for fp16/bf16/fp32) at the start of every block.
unsigned char* dynamic_smem();
size_t dynamic_smem_size();
// __cvta_generic_to_shared: byte offset of p in the block's dynamic shared
// memory (p may be the one-past-the-end pointer); anything else is an error.
size_t shared_offset(const void* p);
// The inverse, for code that keeps shared addresses as 32-bit offsets.
void* shared_ptr(size_t offset);

// __syncthreads(): every thread of the block must arrive; a thread that has
// exited while others wait (or vice versa) is a divergent-barrier error.
void syncthreads();

// Reports a kernel error: inside an emulated thread it records `what`
// (prefixed with kernel, block and thread), abandons the block and makes
// launch() throw; outside a launch it throws EmuError directly.
[[noreturn]] void fail(const std::string& what);

// Fiber stack size for later launches (default 512 KiB, minimum 64 KiB).
void set_fiber_stack_size(size_t bytes);

// The order the scheduler resumes a block's fibers in (process-wide). RoundRobin (default): every runnable
// fiber in thread order, so warps advance in near lockstep. WarpsAhead / WarpsBehind: always the lowest /
// highest warp that can run, until it blocks at __syncthreads or exits, so one warp runs as far ahead of
// the others as the barriers allow: a missing __syncthreads between a write to shared memory and another
// warp's read of it (or a write over what another warp still reads) shows as wrong data or NaN.
enum class Schedule { RoundRobin, WarpsAhead, WarpsBehind };
void set_schedule(Schedule s);
Schedule schedule();
size_t fiber_stack_size();

// ---- runtime-API state used by the cuda_runtime.h stand-in ----
constexpr size_t kDefaultMaxDynamicSmem = 48 * 1024;  // without opt-in
constexpr size_t kMaxDynamicSmemOptIn = 232448;       // 227 KiB (sm_80/sm_90)
// cudaFuncAttributeMaxDynamicSharedMemorySize; false if value is invalid.
bool set_func_max_dynamic_smem(const void* kernel_id, int value);
int func_max_dynamic_smem(const void* kernel_id);  // -1 if never set
void set_last_error(int code);
int get_last_error(bool clear);

}  // namespace effattn::emu
