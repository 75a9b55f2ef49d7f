// The portable micro-kernels of simd.h (the compiler's baseline flags: SSE2 on x86-64, NEON on arm64,
// plain scalar code elsewhere), and the run-time choice of a table.
#define EA_ISA_NS portable
#define EA_ISA "portable"
#define EA_W 4
#define EA_MR 4
#define EA_NV 2
#include "simd_kernels.inc"

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace effattn {
namespace cpu {

const Kernels& kernels_portable() { return portable::table(); }

namespace {

const Kernels* by_name(const char* name) {
#if defined(EFFATTN_X86_SIMD)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  if (std::strcmp(name, "auto") == 0) return avx512 ? &kernels_avx512() : avx2 ? &kernels_avx2() : &kernels_portable();
  if (std::strcmp(name, "avx512") == 0) return avx512 ? &kernels_avx512() : nullptr;
  if (std::strcmp(name, "avx2") == 0) return avx2 ? &kernels_avx2() : nullptr;
#else
  if (std::strcmp(name, "auto") == 0) return &kernels_portable();
#endif
  if (std::strcmp(name, "portable") == 0) return &kernels_portable();
  return nullptr;
}

// The table in use; first set from EFFATTN_CPU_ISA (default "auto").
std::atomic<const Kernels*>& current() {
  static std::atomic<const Kernels*> k{[] {
    const char* env = std::getenv("EFFATTN_CPU_ISA");
    const Kernels* t = env && *env ? by_name(env) : nullptr;
    return t ? t : by_name("auto");
  }()};
  return k;
}

}  // namespace

const Kernels& kernels() { return *current().load(std::memory_order_acquire); }

bool set_isa(const char* name) {
  const Kernels* t = by_name(name);
  if (t == nullptr) return false;
  current().store(t, std::memory_order_release);
  return true;
}

const char* isa_name() { return kernels().name; }

}  // namespace cpu
}  // namespace effattn
