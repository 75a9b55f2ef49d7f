// Internal to the emulator: the state of one launch and of its fibers, shared
// by core.cpp (scheduler), warp.cpp (warp rendezvous), cp_async.cpp and
// memcheck.cpp (the SIGSEGV handler reads the current thread's ids).
#pragma once

#include <ucontext.h>

#include <cstdint>
#include <deque>
#include <string>
#include <vector>

#include "core.h"

namespace effattn::emu::detail {

enum class FiberState : uint8_t { Runnable, Waiting, Exited };
enum class WaitKind : uint8_t { None, Block, Warp };

// One 16-byte cp.async in flight: the source snapshot taken at issue time.
struct CpAsyncCopy {
  unsigned char* dst;
  unsigned char data[16];
  bool landed;  // already written (checking mode off)
};

struct CpAsyncState {
  std::vector<CpAsyncCopy> uncommitted;
  std::deque<std::vector<CpAsyncCopy>> committed;  // oldest first
  size_t pending() const {
    size_t n = uncommitted.size();
    for (const auto& g : committed) n += g.size();
    return n;
  }
};

// What a lane waiting at a warp collective has put on the table.
struct WarpWait {
  int op = 0;                // instruction (and variant); lanes meet only on equal op+mask
  unsigned mask = 0;         // participating lanes
  const void* in = nullptr;  // this lane's operands (on its own stack)
  void* out = nullptr;       // where its results go
  const char* what = nullptr;
};

struct Fiber {
  ucontext_t ctx;
  uint3 tid;
  unsigned linear = 0;
  FiberState state = FiberState::Runnable;
  WaitKind wait = WaitKind::None;
  WarpWait warp;
  CpAsyncState cp;
};

// Written by the SIGSEGV handler (plain data only: async-signal-safe).
struct FaultInfo {
  bool valid = false;
  int kind = 0;    // RegionKind
  int access = 0;  // 0 unknown, 1 read, 2 write
  uintptr_t addr = 0;
  uintptr_t buf_begin = 0, buf_end = 0;
  char name[64] = {};
  bool in_thread = false;
  uint3 block{0, 0, 0}, thread{0, 0, 0};
  unsigned stack_index = 0;
};

constexpr unsigned kNoFiber = ~0u;
constexpr int kMaxOpenedPages = 64;

struct LaunchState {
  const char* name = "";
  const void* id = nullptr;
  dim3 grid, block;
  size_t smem_bytes = 0;
  unsigned char* smem = nullptr;
  uint3 block_idx{0, 0, 0};
  unsigned nthreads = 0;
  std::vector<Fiber> fibers;
  unsigned cur = kNoFiber;  // running fiber, kNoFiber while the scheduler runs
  ucontext_t sched_ctx;
  unsigned exited = 0;
  unsigned barrier_waiting = 0;
  bool abort = false;
  std::string error;  // first error recorded by fail()
  KernelBody body = nullptr;
  void* body_ctx = nullptr;
  FaultInfo fault;
  uintptr_t opened_pages[kMaxOpenedPages] = {};
  int n_opened = 0;
};

extern thread_local LaunchState* tl_launch;

inline Fiber* current_fiber() {
  LaunchState* L = tl_launch;
  return (L && L->cur != kNoFiber) ? &L->fibers[L->cur] : nullptr;
}

// The current fiber, or EmuError ("<what> called outside a kernel").
Fiber& require_fiber(const char* what);
// Switch back to the scheduler; returns when this fiber is scheduled again.
void yield_to_scheduler();
// "kernel 'K', block (x,y,z), thread (x,y,z)"
std::string where(const LaunchState& L, const Fiber& f);
std::string fmt_uint3(uint3 v);
std::string hex(uintptr_t v);
// Checks that [p, p+n) lies in the block's dynamic shared memory and that p
// is `align`-aligned; fail()s with a message naming `what` otherwise.
void check_shared(const void* p, size_t n, size_t align, const char* what);

// warp.cpp: a lane that exits while lanes of its warp wait for it at a
// collective is an error; returns the message or "".
std::string warp_exit_check(const LaunchState& L, const Fiber& f);

}  // namespace effattn::emu::detail
