// effattn CUDA host emulator: cp.async with commit/wait groups, per thread.
#include <atomic>
#include <cstring>

#include "cp_async.h"
#include "memcheck.h"
#include "sched_internal.h"

namespace effattn::emu {

namespace {
std::atomic<bool> g_check{true};

void land(std::vector<detail::CpAsyncCopy>& group) {
  for (auto& c : group)
    if (!c.landed) std::memcpy(c.dst, c.data, 16);
}
}  // namespace

void set_cp_async_check(bool on) { g_check = on; }
bool cp_async_check() { return g_check.load(); }

void cp_async_16(void* dst_shared, const void* src_global, bool pred) {
  detail::Fiber& f = detail::require_fiber("cp.async");
  detail::check_shared(dst_shared, 16, 16, "cp.async destination");
  detail::CpAsyncCopy c;
  c.dst = static_cast<unsigned char*>(dst_shared);
  if (pred) {
    if (reinterpret_cast<uintptr_t>(src_global) % 16 != 0)
      fail("cp.async: global source " + detail::hex(reinterpret_cast<uintptr_t>(src_global)) +
           " is not 16-byte aligned");
    check_global_range(src_global, 16, "cp.async source");
    std::memcpy(c.data, src_global, 16);  // a guard-page fault here is reported with this thread
  } else {
    std::memset(c.data, 0, 16);  // src-size 0: zero fill, nothing read
  }
  if (g_check.load(std::memory_order_relaxed)) {
    std::memset(c.dst, 0xFF, 16);  // NaN until a wait completes the group
    c.landed = false;
  } else {
    std::memcpy(c.dst, c.data, 16);
    c.landed = true;
  }
  f.cp.uncommitted.push_back(c);
}

void cp_async_commit() {
  detail::Fiber& f = detail::require_fiber("cp.async.commit_group");
  f.cp.committed.push_back(std::move(f.cp.uncommitted));
  f.cp.uncommitted.clear();
}

void cp_async_wait_group(int n) {
  detail::Fiber& f = detail::require_fiber("cp.async.wait_group");
  if (n < 0) fail("cp.async.wait_group with negative N");
  while (f.cp.committed.size() > static_cast<size_t>(n)) {
    land(f.cp.committed.front());
    f.cp.committed.pop_front();
  }
}

void cp_async_wait_all() {
  cp_async_commit();
  cp_async_wait_group(0);
}

}  // namespace effattn::emu
