// effattn CUDA host emulator: global-memory checking ("memcheck").
//
// GuardedBuffer is a stand-in for a cudaMalloc'd buffer whose neighbours are
// PROT_NONE pages.  A kernel access that falls in one during a launch is
// caught by a SIGSEGV handler, recorded (address, buffer, offset, kernel,
// block, thread, read/write), the page is opened so the kernel can go on,
// and launch() throws EmuError at its end with a compute-sanitizer-like
// message.  Writes into the few alignment-slack bytes next to a buffer (which
// no page guard can cover) are found by a canary check after the launch.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "error.h"

namespace effattn::emu {

namespace detail {
struct GuardedMapping;
}

class GuardedBuffer {
 public:
  enum class Placement {
    EndAtGuard,       // buffer end touches the PROT_NONE page after it (overflows fault at +0)
    StartAfterGuard,  // buffer start touches the PROT_NONE page before it (underflows fault at -1)
  };

  // The start is aligned to `align` bytes (default 16, what vector loads and
  // cp.async need); with EndAtGuard the end touches the guard exactly when
  // bytes % align == 0, otherwise the < align slack bytes are canary-checked.
  // The contents start as 0xFF bytes (a NaN), like uninitialised device memory
  // that shows when read.
  explicit GuardedBuffer(size_t bytes, std::string name = "",
                         Placement placement = Placement::EndAtGuard, size_t align = 16);
  ~GuardedBuffer();
  GuardedBuffer(GuardedBuffer&&) noexcept;
  GuardedBuffer& operator=(GuardedBuffer&&) noexcept;
  GuardedBuffer(const GuardedBuffer&) = delete;
  GuardedBuffer& operator=(const GuardedBuffer&) = delete;

  void* data();
  const void* data() const;
  template <class T>
  T* as() {
    return static_cast<T*>(data());
  }
  size_t size() const;
  const std::string& name() const;

  // Host-side copies; throw EmuError if [offset, offset+n) is not inside.
  void copy_in(const void* src, size_t n, size_t offset = 0);
  void copy_out(void* dst, size_t n, size_t offset = 0) const;
  void fill(unsigned char byte);
  template <class T>
  void copy_in(const std::vector<T>& v) {
    copy_in(v.data(), v.size() * sizeof(T));
  }
  template <class T>
  std::vector<T> to_vector() const {
    std::vector<T> v(size() / sizeof(T));
    copy_out(v.data(), v.size() * sizeof(T));
    return v;
  }

 private:
  std::unique_ptr<detail::GuardedMapping> m_;
  std::string name_;
};

// Explicit global ranges, consulted by cp_async_16: while at least one range
// is registered, every cp.async source must lie inside one of them.
void register_global_range(const void* ptr, size_t bytes, const std::string& name = "");
void unregister_global_range(const void* ptr);
void clear_global_ranges();

// Throws/fails unless [p, p+n) lies inside one registered range (no-op when
// none are registered).  `what` names the instruction in the message.
void check_global_range(const void* p, size_t n, const char* what);

}  // namespace effattn::emu
