// effattn CUDA host emulator: guard pages, the SIGSEGV handler, GuardedBuffer
// and the registered global ranges.
//
// The handler must be async-signal-safe, so the registry of guard regions is
// a fixed array of slots published with atomics, and the handler only copies
// plain data into the current launch's FaultInfo; messages are formatted
// after the launch.  A fault in a buffer's guard page is recorded, the page
// is opened (PROT_READ|WRITE) and the instruction re-executes and succeeds,
// so the kernel runs on; launch() re-protects the page and throws.  A fault in
// a fiber stack's guard (stack overflow) cannot continue: the handler jumps
// back to the scheduler, abandoning that block.  Any other fault goes to the
// previously installed handler (default: the process dies as usual).
#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <vector>

#include "memcheck.h"
#include "memcheck_internal.h"

namespace effattn::emu {
namespace detail {

size_t page_size() {
  static const size_t p = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return p;
}

namespace {

size_t round_up(size_t v, size_t a) { return (v + a - 1) / a * a; }

// ---------------------------------------------------------------- registry
constexpr int kMaxRegions = 4096;

struct Region {
  std::atomic<int> state{0};  // 0 free, 1 being written, 2 published
  int kind = 0;
  uintptr_t lo_b = 0, lo_e = 0, hi_b = 0, hi_e = 0;  // guard ranges
  uintptr_t buf_b = 0, buf_e = 0;                    // the buffer (stacks: the arena)
  uintptr_t data_lo = 0, data_hi = 0;                // accessible pages (canary slack around buf)
  size_t stride = 0, guard = 0;                      // stacks only
  char name[64] = {};
};

Region g_regions[kMaxRegions];

int claim_slot() {
  for (int i = 0; i < kMaxRegions; ++i) {
    int expected = 0;
    if (g_regions[i].state.compare_exchange_strong(expected, 1)) return i;
  }
  return -1;
}

struct Hit {
  int kind;
  uintptr_t buf_b, buf_e;
  const char* name;
  unsigned stack_index;
};

bool lookup(uintptr_t a, Hit* h) {
  for (int i = 0; i < kMaxRegions; ++i) {
    Region& r = g_regions[i];
    if (r.state.load(std::memory_order_acquire) != 2) continue;
    if (r.kind == kRegionStack) {
      if (a >= r.buf_b && a < r.buf_e && (a - r.buf_b) % r.stride < r.guard) {
        *h = Hit{r.kind, r.buf_b, r.buf_e, r.name, static_cast<unsigned>((a - r.buf_b) / r.stride)};
        return true;
      }
    } else if ((a >= r.lo_b && a < r.lo_e) || (a >= r.hi_b && a < r.hi_e)) {
      *h = Hit{r.kind, r.buf_b, r.buf_e, r.name, 0};
      return true;
    }
  }
  return false;
}

// ----------------------------------------------------------------- handler
std::mutex g_install_mutex;
struct sigaction g_prev;
bool g_have_prev = false;

void write_str(const char* s) {
  ssize_t r = write(2, s, std::strlen(s));
  (void)r;
}

void write_hex(uintptr_t v) {
  char buf[2 + 16 + 1];
  int n = 0;
  buf[n++] = '0';
  buf[n++] = 'x';
  bool started = false;
  for (int sh = 60; sh >= 0; sh -= 4) {
    const unsigned d = (v >> sh) & 15u;
    if (d || started || sh == 0) {
      buf[n++] = "0123456789abcdef"[d];
      started = true;
    }
  }
  buf[n] = 0;
  write_str(buf);
}

void chain_previous(int sig, siginfo_t* si, void* uc) {
  if (g_have_prev && (g_prev.sa_flags & SA_SIGINFO) && g_prev.sa_sigaction) {
    g_prev.sa_sigaction(sig, si, uc);
    return;
  }
  if (g_have_prev && !(g_prev.sa_flags & SA_SIGINFO) && g_prev.sa_handler != SIG_DFL &&
      g_prev.sa_handler != SIG_IGN) {
    g_prev.sa_handler(sig);
    return;
  }
  // Default action: restore it and return; the faulting instruction runs
  // again and the process dies the ordinary way (core dump etc).
  struct sigaction dfl;
  std::memset(&dfl, 0, sizeof dfl);
  dfl.sa_handler = SIG_DFL;
  sigemptyset(&dfl.sa_mask);
  sigaction(sig, &dfl, nullptr);
}

int access_kind(void* ucv) {
#if defined(__x86_64__)
  // Page-fault error code: bit 1 set = write access.
  const ucontext_t* uc = static_cast<const ucontext_t*>(ucv);
  return (uc->uc_mcontext.gregs[REG_ERR] & 2) ? 2 : 1;
#else
  (void)ucv;
  return 0;
#endif
}

void segv_handler(int sig, siginfo_t* si, void* uc) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(si->si_addr);
  LaunchState* L = tl_launch;
  Hit h;
  if (L && si->si_code > 0 && lookup(a, &h)) {
    FaultInfo& f = L->fault;
    if (!f.valid) {
      f.valid = true;
      f.kind = h.kind;
      f.access = access_kind(uc);
      f.addr = a;
      f.buf_begin = h.buf_b;
      f.buf_end = h.buf_e;
      std::memcpy(f.name, h.name, sizeof f.name);
      f.in_thread = L->cur != kNoFiber;
      if (f.in_thread) f.thread = L->fibers[L->cur].tid;
      f.block = L->block_idx;
      f.stack_index = h.stack_index;
    }
    if (h.kind == kRegionStack) {
      // Cannot go on on an exhausted stack: abandon the block.
      if (L->cur != kNoFiber) {
        L->abort = true;
        setcontext(&L->sched_ctx);
      }
    } else {
      const uintptr_t page = a & ~(static_cast<uintptr_t>(page_size()) - 1);
      if (mprotect(reinterpret_cast<void*>(page), page_size(), PROT_READ | PROT_WRITE) == 0) {
        if (L->n_opened < kMaxOpenedPages) {
          L->opened_pages[L->n_opened++] = page;
        } else if (L->cur != kNoFiber) {  // cannot re-protect more: stop here
          L->abort = true;
          setcontext(&L->sched_ctx);
        }
        return;
      }
    }
  }
  if (L && si->si_code > 0) {
    write_str("effattn emu: SIGSEGV at ");
    write_hex(a);
    write_str(" (not in a guard page) in kernel '");
    write_str(L->name);
    write_str("'\n");
  }
  chain_previous(sig, si, uc);
}

struct AltStack {
  void* mem = nullptr;
  size_t size = 0;
  ~AltStack() {
    if (!mem) return;
    stack_t cur;
    if (sigaltstack(nullptr, &cur) == 0 && cur.ss_sp == mem) {
      stack_t off;
      std::memset(&off, 0, sizeof off);
      off.ss_flags = SS_DISABLE;
      sigaltstack(&off, nullptr);
    }
    munmap(mem, size);
  }
};
thread_local AltStack tl_altstack;

}  // namespace

int register_region(RegionKind kind, uintptr_t lo_b, uintptr_t lo_e, uintptr_t hi_b, uintptr_t hi_e,
                    uintptr_t buf_b, uintptr_t buf_e, const char* name) {
  const int i = claim_slot();
  if (i < 0) return -1;
  Region& r = g_regions[i];
  r.kind = kind;
  r.lo_b = lo_b;
  r.lo_e = lo_e;
  r.hi_b = hi_b;
  r.hi_e = hi_e;
  r.buf_b = buf_b;
  r.buf_e = buf_e;
  r.data_lo = lo_e;
  r.data_hi = hi_b;
  r.stride = r.guard = 0;
  std::memset(r.name, 0, sizeof r.name);
  if (name) std::strncpy(r.name, name, sizeof r.name - 1);
  r.state.store(2, std::memory_order_release);
  return i;
}

int register_stack_region(uintptr_t base, size_t total, size_t stride, size_t guard) {
  const int i = claim_slot();
  if (i < 0) return -1;
  Region& r = g_regions[i];
  r.kind = kRegionStack;
  r.lo_b = r.lo_e = r.hi_b = r.hi_e = r.data_lo = r.data_hi = 0;
  r.buf_b = base;
  r.buf_e = base + total;
  r.stride = stride;
  r.guard = guard;
  std::memset(r.name, 0, sizeof r.name);
  std::strncpy(r.name, "fiber stacks", sizeof r.name - 1);
  r.state.store(2, std::memory_order_release);
  return i;
}

void unregister_region(int slot) {
  if (slot >= 0 && slot < kMaxRegions) g_regions[slot].state.store(0, std::memory_order_release);
}

void ensure_fault_handler() {
  {
    std::lock_guard<std::mutex> lock(g_install_mutex);
    struct sigaction cur;
    sigaction(SIGSEGV, nullptr, &cur);
    const bool ours = (cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == segv_handler;
    if (!ours) {
      g_prev = cur;  // chain to whoever was there (e.g. Python's faulthandler)
      g_have_prev = true;
      struct sigaction sa;
      std::memset(&sa, 0, sizeof sa);
      sa.sa_sigaction = segv_handler;
      sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
      sigemptyset(&sa.sa_mask);
      sigaction(SIGSEGV, &sa, nullptr);
    }
  }
  // The handler must run on an alternate stack: a stack overflow leaves none.
  stack_t cur;
  if (sigaltstack(nullptr, &cur) == 0 && !(cur.ss_flags & SS_DISABLE) && cur.ss_size >= 32 * 1024) return;
  if (!tl_altstack.mem) {
    tl_altstack.size = 64 * 1024;
    void* p = mmap(nullptr, tl_altstack.size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw EmuError("effattn emu: mmap of the signal stack failed");
    tl_altstack.mem = p;
  }
  stack_t ss;
  std::memset(&ss, 0, sizeof ss);
  ss.ss_sp = tl_altstack.mem;
  ss.ss_size = tl_altstack.size;
  sigaltstack(&ss, nullptr);
}

void close_opened_pages(LaunchState& L) {
  for (int i = 0; i < L.n_opened; ++i)
    mprotect(reinterpret_cast<void*>(L.opened_pages[i]), page_size(), PROT_NONE);
  L.n_opened = 0;
}

std::string check_global_canaries() {
  for (int i = 0; i < kMaxRegions; ++i) {
    Region& r = g_regions[i];
    if (r.state.load(std::memory_order_acquire) != 2 || r.kind != kRegionGlobal) continue;
    const unsigned char* lo = reinterpret_cast<const unsigned char*>(r.data_lo);
    const unsigned char* b = reinterpret_cast<const unsigned char*>(r.buf_b);
    const unsigned char* e = reinterpret_cast<const unsigned char*>(r.buf_e);
    const unsigned char* hi = reinterpret_cast<const unsigned char*>(r.data_hi);
    for (const unsigned char* p = e; p < hi; ++p)
      if (*p != kCanary)
        return "Invalid __global__ write: byte " + std::to_string(p - e) + " after the end of buffer '" +
               std::string(r.name) + "' (" + std::to_string(e - b) + " bytes at " + hex(r.buf_b) +
               ") was modified (alignment slack, found by canary; the thread is unknown)";
    for (const unsigned char* p = lo; p < b; ++p)
      if (*p != kCanary)
        return "Invalid __global__ write: byte " + std::to_string(b - p) + " bytes before the start of buffer '" +
               std::string(r.name) + "' (" + std::to_string(e - b) + " bytes at " + hex(r.buf_b) +
               ") was modified (slack, found by canary; the thread is unknown)";
  }
  return "";
}

std::string describe_fault(const FaultInfo& f, const char* kernel) {
  const std::string who = f.in_thread ? "thread " + fmt_uint3(f.thread) + " in block " + fmt_uint3(f.block)
                                      : "the emulator itself, block " + fmt_uint3(f.block);
  if (f.kind == kRegionStack) {
    return "Stack overflow in kernel '" + std::string(kernel) + "', " + who + ": the fiber stack of " +
           std::to_string(fiber_stack_size()) + " bytes is exhausted (fault at " + hex(f.addr) +
           " in its guard page); raise it with effattn::emu::set_fiber_stack_size()";
  }
  const char* space = f.kind == kRegionShared ? "__shared__" : "__global__";
  const char* acc = f.access == 2 ? "write" : f.access == 1 ? "read" : "access";
  const size_t size = f.buf_end - f.buf_begin;
  std::string rel;
  if (f.addr >= f.buf_end)
    rel = std::to_string(f.addr - f.buf_end) + " bytes after the end";
  else
    rel = std::to_string(f.buf_begin - f.addr) + " bytes before the start";
  const std::string what = f.kind == kRegionShared ? std::string("dynamic shared memory")
                                                   : "buffer '" + std::string(f.name) + "'";
  return "Invalid " + std::string(space) + " " + acc + " at " + hex(f.addr) + " (offset " +
         std::to_string(static_cast<long long>(f.addr) - static_cast<long long>(f.buf_begin)) + "): " + rel +
         " of " + what + " (" + std::to_string(size) + " bytes at " + hex(f.buf_begin) + "); kernel '" + kernel +
         "', " + who + " [first fault only; access size not known]";
}

// ---------------------------------------------------------- GuardedMapping
GuardedMapping::GuardedMapping(size_t n, bool end_at_guard, size_t align, RegionKind kind, const char* name)
    : bytes(n) {
  const size_t pg = page_size();
  if (align == 0 || (align & (align - 1))) throw EmuError("effattn emu: alignment must be a power of two");
  if (align > pg) throw EmuError("effattn emu: alignment above the page size is not supported");
  const size_t data = round_up(n, pg);
  map_len = kGuardBytes + data + kGuardBytes;
  void* p = mmap(nullptr, map_len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) throw EmuError("effattn emu: mmap of " + std::to_string(map_len) + " bytes failed");
  map_base = static_cast<unsigned char*>(p);
  data_lo = map_base + kGuardBytes;
  data_hi = data_lo + data;
  if (data && mprotect(data_lo, data, PROT_READ | PROT_WRITE) != 0) {
    munmap(map_base, map_len);
    throw EmuError("effattn emu: mprotect failed");
  }
  if (end_at_guard) {
    const uintptr_t b = (reinterpret_cast<uintptr_t>(data_hi) - n) & ~(static_cast<uintptr_t>(align) - 1);
    begin = reinterpret_cast<unsigned char*>(b);
  } else {
    begin = data_lo;
  }
  fill_canary();
  region = register_region(kind, reinterpret_cast<uintptr_t>(map_base), reinterpret_cast<uintptr_t>(data_lo),
                           reinterpret_cast<uintptr_t>(data_hi), reinterpret_cast<uintptr_t>(data_hi) + kGuardBytes,
                           reinterpret_cast<uintptr_t>(begin), reinterpret_cast<uintptr_t>(begin) + n, name);
}

GuardedMapping::~GuardedMapping() {
  unregister_region(region);
  if (map_base) munmap(map_base, map_len);
}

void GuardedMapping::fill_canary() {
  std::memset(data_lo, kCanary, static_cast<size_t>(begin - data_lo));
  std::memset(begin + bytes, kCanary, static_cast<size_t>(data_hi - (begin + bytes)));
}

bool GuardedMapping::find_corrupt_slack(long long* offset) const {
  for (const unsigned char* p = data_lo; p < begin; ++p)
    if (*p != kCanary) {
      *offset = -static_cast<long long>(begin - p);
      return true;
    }
  for (const unsigned char* p = begin + bytes; p < data_hi; ++p)
    if (*p != kCanary) {
      *offset = static_cast<long long>(p - begin);
      return true;
    }
  return false;
}

}  // namespace detail

// ------------------------------------------------------------ GuardedBuffer
GuardedBuffer::GuardedBuffer(size_t bytes, std::string name, Placement placement, size_t align)
    : m_(std::make_unique<detail::GuardedMapping>(bytes, placement == Placement::EndAtGuard, align,
                                                  detail::kRegionGlobal, name.c_str())),
      name_(std::move(name)) {
  if (bytes) std::memset(m_->begin, 0xFF, bytes);
  detail::ensure_fault_handler();
}

GuardedBuffer::~GuardedBuffer() = default;
GuardedBuffer::GuardedBuffer(GuardedBuffer&&) noexcept = default;
GuardedBuffer& GuardedBuffer::operator=(GuardedBuffer&&) noexcept = default;

void* GuardedBuffer::data() { return m_->begin; }
const void* GuardedBuffer::data() const { return m_->begin; }
size_t GuardedBuffer::size() const { return m_->bytes; }
const std::string& GuardedBuffer::name() const { return name_; }

void GuardedBuffer::copy_in(const void* src, size_t n, size_t offset) {
  if (offset > size() || n > size() - offset)
    throw EmuError("GuardedBuffer '" + name_ + "': copy_in of " + std::to_string(n) + " bytes at offset " +
                   std::to_string(offset) + " exceeds its " + std::to_string(size()) + " bytes");
  if (n) std::memcpy(m_->begin + offset, src, n);
}

void GuardedBuffer::copy_out(void* dst, size_t n, size_t offset) const {
  if (offset > size() || n > size() - offset)
    throw EmuError("GuardedBuffer '" + name_ + "': copy_out of " + std::to_string(n) + " bytes at offset " +
                   std::to_string(offset) + " exceeds its " + std::to_string(size()) + " bytes");
  if (n) std::memcpy(dst, m_->begin + offset, n);
}

void GuardedBuffer::fill(unsigned char byte) {
  if (size()) std::memset(m_->begin, byte, size());
}

// ------------------------------------------------------------ global ranges
namespace {
struct GlobalRange {
  uintptr_t b, e;
  std::string name;
};
std::mutex g_ranges_mutex;
std::vector<GlobalRange>& ranges() {
  static std::vector<GlobalRange> r;
  return r;
}
}  // namespace

void register_global_range(const void* ptr, size_t bytes, const std::string& name) {
  std::lock_guard<std::mutex> lock(g_ranges_mutex);
  const uintptr_t b = reinterpret_cast<uintptr_t>(ptr);
  ranges().push_back(GlobalRange{b, b + bytes, name});
}

void unregister_global_range(const void* ptr) {
  std::lock_guard<std::mutex> lock(g_ranges_mutex);
  auto& r = ranges();
  const uintptr_t b = reinterpret_cast<uintptr_t>(ptr);
  r.erase(std::remove_if(r.begin(), r.end(), [b](const GlobalRange& g) { return g.b == b; }), r.end());
}

void clear_global_ranges() {
  std::lock_guard<std::mutex> lock(g_ranges_mutex);
  ranges().clear();
}

void check_global_range(const void* p, size_t n, const char* what) {
  std::string msg;
  {
    std::lock_guard<std::mutex> lock(g_ranges_mutex);
    const auto& r = ranges();
    if (r.empty()) return;
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    const GlobalRange* nearest = nullptr;
    uintptr_t best = ~uintptr_t(0);
    for (const GlobalRange& g : r) {
      if (a >= g.b && a <= g.e && g.e - a >= n) return;
      const uintptr_t d = a < g.b ? g.b - a : a - g.e;
      if (d < best) {
        best = d;
        nearest = &g;
      }
    }
    msg = std::string(what) + ": global address " + detail::hex(a) + " (" + std::to_string(n) +
          " bytes) is outside every registered global range";
    if (nearest) {
      msg += "; nearest: '" + nearest->name + "' (" + std::to_string(nearest->e - nearest->b) + " bytes at " +
             detail::hex(nearest->b) + "), address is " +
             (a < nearest->b ? std::to_string(nearest->b - a) + " bytes before its start"
                             : "at offset " + std::to_string(a - nearest->b));
    }
  }
  fail(msg);  // outside the lock: fail() may leave this fiber for good
}

}  // namespace effattn::emu
