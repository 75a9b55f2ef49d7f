// effattn CUDA host emulator: launch, the fiber scheduler, block barriers,
// dynamic shared memory and the small runtime-API state.
//
// Scheduling: the threads of one block are fibers (ucontext) on the calling
// OS thread.  The scheduler resumes runnable fibers round-robin in thread
// order (or warp by warp, set_schedule: one warp as far ahead as the barriers
// allow); a fiber runs until it blocks at __syncthreads / a warp collective or
// exits.  If no fiber is runnable while some are still waiting, nothing can
// ever change: that is a deadlock and is reported (never a hang).  Errors are
// recorded by fail(), which jumps back to the scheduler and abandons the
// block's stacks (no unwinding: C++ exceptions can not cross swapcontext).
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <sstream>

#include "memcheck_internal.h"
#include "sched_internal.h"

namespace effattn::emu {
namespace detail {

thread_local LaunchState* tl_launch = nullptr;

namespace {

std::atomic<size_t> g_stack_size{512 * 1024};
std::atomic<int> g_schedule{static_cast<int>(Schedule::RoundRobin)};

size_t round_up(size_t v, size_t a) { return (v + a - 1) / a * a; }

// Fiber stacks of one OS thread, reused by every block and launch:
// [guard][stack][guard][stack]... so a stack overflow runs into PROT_NONE.
struct StackArena {
  unsigned char* base = nullptr;
  size_t total = 0, stride = 0, stack = 0;
  unsigned count = 0;
  int region = -1;

  ~StackArena() { release(); }
  void release() {
    if (region >= 0) unregister_region(region);
    region = -1;
    if (base) munmap(base, total);
    base = nullptr;
    count = 0;
  }
  void ensure(unsigned n, size_t stack_size) {
    stack_size = round_up(stack_size, page_size());
    if (base && n <= count && stack_size == stack) return;
    if (base && stack_size == stack && n < count) n = count;
    release();
    stack = stack_size;
    stride = kGuardBytes + stack;
    total = stride * n;
    void* p = mmap(nullptr, total, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw EmuError("effattn emu: mmap of " + std::to_string(total) + " bytes of fiber stacks failed");
    base = static_cast<unsigned char*>(p);
    count = n;
    for (unsigned i = 0; i < n; ++i) {
      if (mprotect(base + i * stride + kGuardBytes, stack, PROT_READ | PROT_WRITE) != 0) {
        release();
        throw EmuError("effattn emu: mprotect of a fiber stack failed");
      }
    }
    region = register_stack_region(reinterpret_cast<uintptr_t>(base), total, stride, kGuardBytes);
  }
  unsigned char* stack_lo(unsigned i) const { return base + i * stride + kGuardBytes; }
};

thread_local StackArena tl_stacks;
thread_local int tl_last_error = 0;

std::mutex g_attr_mutex;
std::map<const void*, int>& attr_map() {
  static std::map<const void*, int> m;
  return m;
}

std::string range_list(const std::vector<unsigned>& ids) {
  std::string s;
  for (size_t i = 0; i < ids.size();) {
    size_t j = i;
    while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
    if (!s.empty()) s += ",";
    s += std::to_string(ids[i]);
    if (j > i) s += "-" + std::to_string(ids[j]);
    i = j + 1;
  }
  return s;
}

std::string deadlock_report(const LaunchState& L) {
  // Group the stuck threads by what they wait at.
  std::map<std::string, std::vector<unsigned>> groups;
  std::vector<unsigned> exited;
  for (const Fiber& f : L.fibers) {
    if (f.state == FiberState::Exited) {
      exited.push_back(f.linear);
    } else if (f.wait == WaitKind::Block) {
      groups["__syncthreads()"].push_back(f.linear);
    } else if (f.wait == WaitKind::Warp) {
      groups["warp " + std::to_string(f.linear / 32) + ": " + (f.warp.what ? f.warp.what : "?") +
             " (mask " + hex(f.warp.mask) + ")"]
          .push_back(f.linear);
    }
  }
  std::ostringstream os;
  os << "deadlock in kernel '" << L.name << "', block " << fmt_uint3(L.block_idx)
     << ": every live thread waits and none can proceed;";
  for (const auto& [what, ids] : groups) os << " threads " << range_list(ids) << " wait at " << what << ";";
  if (!exited.empty()) os << " threads " << range_list(exited) << " have exited;";
  os << " (thread numbers are linear ids x + y*blockDim.x + z*blockDim.x*blockDim.y)";
  return os.str();
}

[[noreturn]] void exit_fiber();

void fiber_entry() {
  LaunchState* L = tl_launch;
  std::string escaped;
  try {
    L->body(L->body_ctx);
  } catch (const std::exception& e) {
    escaped = std::string("C++ exception escaped the kernel: ") + e.what();
  } catch (...) {
    escaped = "unknown C++ exception escaped the kernel";
  }
  // fail() only after the handler has finished, so the C++ runtime's
  // per-thread "caught exceptions" state is clean when we jump away.
  if (!escaped.empty()) fail(escaped);
  exit_fiber();
}

void exit_fiber() {
  LaunchState& L = *tl_launch;
  Fiber& f = L.fibers[L.cur];
  if (size_t n = f.cp.pending()) {
    fail("cp.async groups never waited: thread exits with " + std::to_string(n) + " cp.async cop" +
         (n == 1 ? "y" : "ies") + " pending (" + std::to_string(f.cp.committed.size()) +
         " committed group(s) not completed by cp.async.wait_group, " + std::to_string(f.cp.uncommitted.size()) +
         " cop(ies) never committed)");
  }
  if (L.barrier_waiting > 0) {
    fail("divergent barrier: thread exits while " + std::to_string(L.barrier_waiting) +
         " thread(s) of the block wait at __syncthreads()");
  }
  std::string w = warp_exit_check(L, f);
  if (!w.empty()) fail(w);
  f.state = FiberState::Exited;
  f.wait = WaitKind::None;
  ++L.exited;
  setcontext(&L.sched_ctx);
  std::abort();  // unreachable
}

// Separate (not inlined) so getcontext's returns-twice nature does not leak
// into the caller's loop; the saved context is only used via makecontext.
__attribute__((noinline)) void init_context(ucontext_t& ctx, void* stack_lo, size_t size) {
  if (getcontext(&ctx) != 0) throw EmuError("effattn emu: getcontext failed");
  ctx.uc_stack.ss_sp = stack_lo;
  ctx.uc_stack.ss_size = size;
  ctx.uc_link = nullptr;  // fibers never return from fiber_entry
  makecontext(&ctx, fiber_entry, 0);
}

// Runs the fibers of the current block to completion (or error/deadlock).
void run_block(LaunchState& L, StackArena& stacks) {
  L.exited = 0;
  L.barrier_waiting = 0;
  for (unsigned i = 0; i < L.nthreads; ++i) {
    Fiber& f = L.fibers[i];
    f.state = FiberState::Runnable;
    f.wait = WaitKind::None;
    f.warp = WarpWait{};
    f.cp = CpAsyncState{};
    init_context(f.ctx, stacks.stack_lo(i), stacks.stack);
  }
  const auto order = static_cast<Schedule>(g_schedule.load());
  const unsigned warps = (L.nthreads + 31) / 32;
  for (;;) {
    bool ran = false;
    // RoundRobin: one pass over every fiber; otherwise only the fibers of the first warp (lowest or
    // highest) that has a runnable one, so that warp runs until it blocks at a barrier or exits.
    for (unsigned wi = 0; wi < warps && !(ran && order != Schedule::RoundRobin); ++wi) {
      const unsigned w = order == Schedule::WarpsBehind ? warps - 1 - wi : wi;
      for (unsigned i = 32 * w; i < L.nthreads && i < 32 * (w + 1); ++i) {
        if (L.fibers[i].state != FiberState::Runnable) continue;
        ran = true;
        L.cur = i;
        swapcontext(&L.sched_ctx, &L.fibers[i].ctx);
        L.cur = kNoFiber;
        if (L.abort) return;
      }
    }
    if (L.exited == L.nthreads) return;
    if (!ran) {
      L.error = deadlock_report(L);
      L.abort = true;
      return;
    }
  }
}

}  // namespace

std::string fmt_uint3(uint3 v) {
  return "(" + std::to_string(v.x) + "," + std::to_string(v.y) + "," + std::to_string(v.z) + ")";
}

std::string hex(uintptr_t v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

std::string where(const LaunchState& L, const Fiber& f) {
  return "kernel '" + std::string(L.name) + "', block " + fmt_uint3(L.block_idx) + ", thread " + fmt_uint3(f.tid);
}

Fiber& require_fiber(const char* what) {
  Fiber* f = current_fiber();
  if (!f) throw EmuError(std::string("effattn emu: ") + what + " used outside an emulated kernel thread");
  return *f;
}

void yield_to_scheduler() {
  LaunchState& L = *tl_launch;
  swapcontext(&L.fibers[L.cur].ctx, &L.sched_ctx);
}

void check_shared(const void* p, size_t n, size_t align, const char* what) {
  LaunchState& L = *tl_launch;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  const uintptr_t b = reinterpret_cast<uintptr_t>(L.smem);
  if (a < b || a - b > L.smem_bytes || L.smem_bytes - (a - b) < n) {
    std::string rel = a >= b ? "offset " + std::to_string(a - b) : std::to_string(b - a) + " bytes before its start";
    fail(std::string(what) + ": address " + hex(a) + " (" + std::to_string(n) +
         " bytes) is not inside the block's dynamic shared memory (" + std::to_string(L.smem_bytes) +
         " bytes at " + hex(b) + "; " + rel + ")");
  }
  if (align > 1 && a % align != 0) {
    fail(std::string(what) + ": shared address " + hex(a) + " (offset " + std::to_string(a - b) +
         ") is not " + std::to_string(align) + "-byte aligned");
  }
}

}  // namespace detail

using namespace detail;

void launch_erased(const char* kernel_name, const void* kernel_id, dim3 grid, dim3 block,
                   size_t dynamic_smem_bytes, KernelBody body, void* body_ctx) {
  const char* name = kernel_name ? kernel_name : "?";
  if (tl_launch) {
    if (current_fiber()) fail("a kernel launch from inside a kernel is not supported");
    throw EmuError("effattn emu: launch() re-entered on the same OS thread");
  }
  auto config_error = [&](int code, const std::string& msg) {
    set_last_error(code);
    throw EmuError("launch of kernel '" + std::string(name) + "' failed: " + msg);
  };
  const unsigned long long nthreads = 1ull * block.x * block.y * block.z;
  if (block.x == 0 || block.y == 0 || block.z == 0 || nthreads > 1024 || block.x > 1024 || block.y > 1024 ||
      block.z > 64)
    config_error(9, "invalid block " + fmt_uint3(block) + " (at most 1024 threads, z <= 64)");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535)
    config_error(9, "invalid grid " + fmt_uint3(grid));
  if (dynamic_smem_bytes > kMaxDynamicSmemOptIn)
    config_error(1, std::to_string(dynamic_smem_bytes) + " bytes of dynamic shared memory exceed the device limit of " +
                        std::to_string(kMaxDynamicSmemOptIn) + " bytes");
  if (dynamic_smem_bytes > kDefaultMaxDynamicSmem) {
    const int opt_in = func_max_dynamic_smem(kernel_id);
    if (opt_in < 0 || dynamic_smem_bytes > static_cast<size_t>(opt_in))
      config_error(1, std::to_string(dynamic_smem_bytes) +
                          " bytes of dynamic shared memory need cudaFuncSetAttribute(kernel, "
                          "cudaFuncAttributeMaxDynamicSharedMemorySize, >= that) first (recorded: " +
                          (opt_in < 0 ? std::string("none") : std::to_string(opt_in)) + ")");
  }
  if (!body) throw EmuError("effattn emu: launch with a null body");

  ensure_fault_handler();
  tl_stacks.ensure(static_cast<unsigned>(nthreads), g_stack_size.load());
  GuardedMapping smem(dynamic_smem_bytes, /*end_at_guard=*/true, 16, kRegionShared, "dynamic shared memory");

  LaunchState L;
  L.name = name;
  L.id = kernel_id;
  L.grid = grid;
  L.block = block;
  L.smem_bytes = dynamic_smem_bytes;
  L.smem = smem.begin;
  L.nthreads = static_cast<unsigned>(nthreads);
  L.body = body;
  L.body_ctx = body_ctx;
  L.fibers.resize(L.nthreads);
  for (unsigned i = 0; i < L.nthreads; ++i) {
    L.fibers[i].linear = i;
    L.fibers[i].tid = uint3{i % block.x, (i / block.x) % block.y, i / (block.x * block.y)};
  }

  struct Reset {
    LaunchState& L;
    ~Reset() {
      tl_launch = nullptr;
      close_opened_pages(L);
    }
  } reset{L};
  tl_launch = &L;

  std::string slack_error;
  for (unsigned z = 0; z < grid.z && !L.abort && !L.fault.valid && slack_error.empty(); ++z) {
    for (unsigned y = 0; y < grid.y && !L.abort && !L.fault.valid && slack_error.empty(); ++y) {
      for (unsigned x = 0; x < grid.x && !L.abort && !L.fault.valid && slack_error.empty(); ++x) {
        L.block_idx = uint3{x, y, z};
        if (L.smem_bytes) std::memset(L.smem, 0xFF, L.smem_bytes);
        smem.fill_canary();
        run_block(L, tl_stacks);
        long long off = 0;
        if (!L.fault.valid && !L.abort && smem.find_corrupt_slack(&off)) {
          slack_error = "Invalid __shared__ write detected after block " + fmt_uint3(L.block_idx) + " of kernel '" +
                        name + "': a byte " +
                        (off < 0 ? std::to_string(-off) + " bytes before the start"
                                 : std::to_string(off - static_cast<long long>(L.smem_bytes)) + " bytes after the end") +
                        " of dynamic shared memory (" + std::to_string(L.smem_bytes) +
                        " bytes) was modified (alignment slack; the thread is unknown)";
        }
      }
    }
  }
  tl_launch = nullptr;
  close_opened_pages(L);

  std::string msg;
  if (L.fault.valid) msg = describe_fault(L.fault, name);
  if (!L.error.empty()) msg += (msg.empty() ? "" : "\nalso: ") + L.error;
  if (msg.empty()) msg = slack_error;
  if (msg.empty()) {
    std::string g = check_global_canaries();
    if (!g.empty()) msg = g + " (after kernel '" + name + "')";
  }
  if (!msg.empty()) throw EmuError(msg);
}

const uint3& thread_idx() { return require_fiber("threadIdx").tid; }
const uint3& block_idx() {
  require_fiber("blockIdx");
  return tl_launch->block_idx;
}
const dim3& block_dim() {
  require_fiber("blockDim");
  return tl_launch->block;
}
const dim3& grid_dim() {
  require_fiber("gridDim");
  return tl_launch->grid;
}
unsigned linear_thread_id() { return require_fiber("thread id").linear; }
unsigned lane_id() { return require_fiber("lane id").linear % 32u; }
unsigned warp_id() { return require_fiber("warp id").linear / 32u; }
bool in_kernel() { return current_fiber() != nullptr; }

unsigned char* dynamic_smem() {
  require_fiber("dynamic shared memory");
  return tl_launch->smem;
}
size_t dynamic_smem_size() {
  require_fiber("dynamic shared memory");
  return tl_launch->smem_bytes;
}

size_t shared_offset(const void* p) {
  require_fiber("__cvta_generic_to_shared");
  check_shared(p, 0, 1, "__cvta_generic_to_shared");
  return static_cast<size_t>(reinterpret_cast<uintptr_t>(p) - reinterpret_cast<uintptr_t>(tl_launch->smem));
}

void* shared_ptr(size_t offset) {
  require_fiber("shared_ptr");
  if (offset > tl_launch->smem_bytes)
    fail("shared offset " + std::to_string(offset) + " is beyond the dynamic shared memory (" +
         std::to_string(tl_launch->smem_bytes) + " bytes)");
  return tl_launch->smem + offset;
}

void syncthreads() {
  Fiber& f = require_fiber("__syncthreads");
  LaunchState& L = *tl_launch;
  if (L.exited > 0) {
    std::string ex;
    for (const Fiber& g : L.fibers)
      if (g.state == FiberState::Exited) {
        ex = fmt_uint3(g.tid);
        break;
      }
    fail("divergent barrier: __syncthreads() reached while " + std::to_string(L.exited) +
         " thread(s) of the block have already exited (first: thread " + ex + ")");
  }
  f.state = FiberState::Waiting;
  f.wait = WaitKind::Block;
  if (++L.barrier_waiting == L.nthreads) {  // last to arrive releases everyone, continues
    for (Fiber& g : L.fibers) {
      if (g.wait == WaitKind::Block) {
        g.state = FiberState::Runnable;
        g.wait = WaitKind::None;
      }
    }
    L.barrier_waiting = 0;
    return;
  }
  yield_to_scheduler();
}

[[noreturn]] void fail(const std::string& what) {
  LaunchState* L = tl_launch;
  if (L && L->cur != kNoFiber) {
    if (L->error.empty()) L->error = where(*L, L->fibers[L->cur]) + ": " + what;
    L->abort = true;
    setcontext(&L->sched_ctx);  // abandon this fiber's stack
    std::abort();               // unreachable
  }
  throw EmuError(what);
}

void set_schedule(Schedule s) { g_schedule = static_cast<int>(s); }
Schedule schedule() { return static_cast<Schedule>(g_schedule.load()); }

void set_fiber_stack_size(size_t bytes) { g_stack_size = bytes < 64 * 1024 ? 64 * 1024 : bytes; }
size_t fiber_stack_size() { return g_stack_size.load(); }

bool set_func_max_dynamic_smem(const void* kernel_id, int value) {
  if (value < 0 || static_cast<size_t>(value) > kMaxDynamicSmemOptIn) return false;
  std::lock_guard<std::mutex> lock(g_attr_mutex);
  attr_map()[kernel_id] = value;
  return true;
}

int func_max_dynamic_smem(const void* kernel_id) {
  std::lock_guard<std::mutex> lock(g_attr_mutex);
  auto it = attr_map().find(kernel_id);
  return it == attr_map().end() ? -1 : it->second;
}

void set_last_error(int code) { tl_last_error = code; }
int get_last_error(bool clear) {
  const int e = tl_last_error;
  if (clear) tl_last_error = 0;
  return e;
}

}  // namespace effattn::emu
