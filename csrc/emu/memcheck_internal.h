// Internal to the emulator: guarded mappings and the registry of guard pages
// that the SIGSEGV handler consults.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "sched_internal.h"

namespace effattn::emu::detail {

enum RegionKind : int { kRegionGlobal = 1, kRegionShared = 2, kRegionStack = 3 };

constexpr unsigned char kCanary = 0xA5;  // fills slack bytes next to a buffer
constexpr size_t kGuardBytes = 64 * 1024;  // PROT_NONE on each side

size_t page_size();

// [lo guard][accessible pages, the buffer somewhere inside][hi guard]
struct GuardedMapping {
  unsigned char* map_base = nullptr;
  size_t map_len = 0;
  unsigned char* data_lo = nullptr;  // first accessible byte
  unsigned char* data_hi = nullptr;  // one past the last accessible byte
  unsigned char* begin = nullptr;    // the buffer
  size_t bytes = 0;
  int region = -1;

  GuardedMapping(size_t bytes, bool end_at_guard, size_t align, RegionKind kind, const char* name);
  ~GuardedMapping();
  GuardedMapping(const GuardedMapping&) = delete;
  GuardedMapping& operator=(const GuardedMapping&) = delete;

  void fill_canary();
  // Offset (relative to begin; negative = before it) of the first slack byte
  // that lost its canary, or false if all are intact.
  bool find_corrupt_slack(long long* offset) const;
};

// Registers a guard region for the handler; returns its slot (or -1 if full).
int register_region(RegionKind kind, uintptr_t lo_b, uintptr_t lo_e, uintptr_t hi_b, uintptr_t hi_e,
                    uintptr_t buf_b, uintptr_t buf_e, const char* name);
// Fiber stacks: one arena of `count` [guard][stack] slots of `stride` bytes.
int register_stack_region(uintptr_t base, size_t total, size_t stride, size_t guard);
void unregister_region(int slot);

// Installs the SIGSEGV handler (again, if someone replaced it) and an
// alternate signal stack for the calling OS thread.
void ensure_fault_handler();
// Re-protects the guard pages the handler opened during launch L.
void close_opened_pages(LaunchState& L);
// Canary check of all registered global buffers; message or "".
std::string check_global_canaries();
std::string describe_fault(const FaultInfo& f, const char* kernel);

}  // namespace effattn::emu::detail
