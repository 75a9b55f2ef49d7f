// effattn CUDA host emulator: scripted kernels, correct and buggy, that show
// each checker firing (cp.async groups, memcheck, barriers / warp
// rendezvous).  Each returns "ok", what the kernel itself observed (e.g. a
// NaN read), and/or "EmuError: <message>" from the launch.
#include <cmath>
#include <functional>
#include <map>
#include <stdexcept>

#include "emu.h"
#include "selftest_kernels.h"

namespace effattn::emu::selftest {

namespace {

// First observation a kernel makes about itself.
struct Obs {
  std::string msg;
  void note(const std::string& m) {
    if (msg.empty()) msg = m;
  }
};

std::string outcome(const Obs& o, const std::string& err) {
  if (o.msg.empty() && err.empty()) return "ok";
  if (o.msg.empty()) return err;
  if (err.empty()) return o.msg;
  return o.msg + " | " + err;
}

std::string run(Obs& o, const std::function<void()>& f) {
  std::string err;
  try {
    f();
  } catch (const EmuError& e) {
    err = std::string("EmuError: ") + e.what();
  }
  return outcome(o, err);
}

struct RangeGuard {
  const void* p;
  RangeGuard(const GuardedBuffer& b) : p(b.data()) { register_global_range(b.data(), b.size(), b.name()); }
  ~RangeGuard() { unregister_global_range(p); }
};

struct CheckModeGuard {
  bool old = cp_async_check();
  ~CheckModeGuard() { set_cp_async_check(old); }
};

// ------------------------------------------------------------- cp.async
// src: 64 chunks of 16 bytes (4 floats), chunk c holds c*4+k+1.
GuardedBuffer make_src() {
  GuardedBuffer src(64 * 16, "src");
  std::vector<float> v(256);
  for (int i = 0; i < 256; ++i) v[i] = static_cast<float>(i + 1);
  src.copy_in(v);
  return src;
}

// Thread t checks shared chunk `slot` against source chunk `chunk`.
void check_chunk(Obs& o, const unsigned char* s, int slot, int chunk, bool zero = false) {
  float f[4];
  std::memcpy(f, s + 16 * slot, 16);
  for (int k = 0; k < 4; ++k) {
    const float want = zero ? 0.0f : static_cast<float>(chunk * 4 + k + 1);
    if (std::isnan(f[k])) {
      o.note("thread " + std::to_string(threadIdx.x) + " read NaN from shared chunk " + std::to_string(slot) +
             " (cp.async data not landed)");
      return;
    }
    if (f[k] != want) {
      o.note("thread " + std::to_string(threadIdx.x) + " read " + std::to_string(f[k]) + " instead of " +
             std::to_string(want) + " in shared chunk " + std::to_string(slot));
      return;
    }
  }
}

using Scenario = std::function<std::string()>;

std::map<std::string, Scenario> cp_async_scenarios() {
  std::map<std::string, Scenario> m;
  auto simple = [](std::function<void(Obs&, const unsigned char* src, unsigned t, unsigned char* s)> body,
                   bool register_src = true) {
    return [body, register_src]() {
      GuardedBuffer src = make_src();
      std::unique_ptr<RangeGuard> rg;
      if (register_src) rg = std::make_unique<RangeGuard>(src);
      Obs o;
      const unsigned char* sp = src.as<unsigned char>();
      return run(o, [&] {
        launch("cp_async_scenario", nullptr, dim3(1), dim3(32), 1024,
               [&] { body(o, sp, threadIdx.x, dynamic_smem()); });
      });
    };
  };
  m["correct"] = simple([](Obs& o, const unsigned char* src, unsigned t, unsigned char* s) {
    cp_async_16(s + 16 * t, src + 16 * t, true);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    check_chunk(o, s, (t + 1) % 32, (t + 1) % 32);
  });
  m["missing_wait"] = simple([](Obs& o, const unsigned char* src, unsigned t, unsigned char* s) {
    cp_async_16(s + 16 * t, src + 16 * t, true);
    cp_async_commit();
    __syncthreads();  // bug: no cp.async.wait_group before the barrier
    check_chunk(o, s, (t + 1) % 32, (t + 1) % 32);
    cp_async_wait_all();
  });
  m["early_wait"] = simple([](Obs& o, const unsigned char* src, unsigned t, unsigned char* s) {
    cp_async_16(s + 16 * t, src + 16 * t, true);
    cp_async_commit();
    cp_async_16(s + 512 + 16 * t, src + 512 + 16 * t, true);
    cp_async_commit();
    cp_async_wait<1>();  // completes only the first group
    __syncthreads();
    check_chunk(o, s, t, t);
    check_chunk(o, s, 32 + t, 32 + t);  // bug: second group still in flight
    cp_async_wait<0>();
  });
  m["uncommitted"] = simple([](Obs& o, const unsigned char* src, unsigned t, unsigned char* s) {
    cp_async_16(s + 16 * t, src + 16 * t, true);
    cp_async_wait<0>();  // bug: nothing committed, so nothing completes
    __syncthreads();
    check_chunk(o, s, t, t);
  });
  m["never_waited"] = simple([](Obs&, const unsigned char* src, unsigned t, unsigned char* s) {
    cp_async_16(s + 16 * t, src + 16 * t, true);
    cp_async_commit();
  });
  m["wait_all"] = simple([](Obs& o, const unsigned char* src, unsigned t, unsigned char* s) {
    cp_async_16(s + 16 * t, src + 16 * t, true);
    cp_async_wait_all();  // commits, then waits
    __syncthreads();
    check_chunk(o, s, (t + 3) % 32, (t + 3) % 32);
  });
  m["empty_groups"] = simple([](Obs& o, const unsigned char* src, unsigned t, unsigned char* s) {
    cp_async_16(s + 16 * t, src + 16 * t, true);
    cp_async_commit();
    cp_async_commit();  // empty groups count for wait_group
    cp_async_commit();
    cp_async_wait<2>();
    __syncthreads();
    check_chunk(o, s, t, t);
  });
  m["zero_fill"] = simple([](Obs& o, const unsigned char*, unsigned t, unsigned char* s) {
    cp_async_16(s + 16 * t, nullptr, false);  // src-size 0: zeros, nothing read
    cp_async_wait_all();
    __syncthreads();
    check_chunk(o, s, t, t, /*zero=*/true);
  });
  m["misaligned_dst"] = simple([](Obs&, const unsigned char* src, unsigned t, unsigned char* s) {
    cp_async_16(s + 16 * t + (t == 7 ? 8 : 0), src + 16 * t, true);
    cp_async_wait_all();
  });
  m["misaligned_src"] = simple([](Obs&, const unsigned char* src, unsigned t, unsigned char* s) {
    cp_async_16(s + 16 * t, src + 16 * t + (t == 3 ? 4 : 0), true);
    cp_async_wait_all();
  });
  m["dst_not_shared"] = []() {
    GuardedBuffer src = make_src();
    GuardedBuffer dst(1024, "dst");
    Obs o;
    return run(o, [&] {
      launch("cp_async_dst_not_shared", nullptr, dim3(1), dim3(32), 1024, [&] {
        const unsigned t = threadIdx.x;
        cp_async_16(dst.as<unsigned char>() + 16 * t, src.as<unsigned char>() + 16 * t, true);
        cp_async_wait_all();
      });
    });
  };
  m["src_outside_ranges"] = []() {
    GuardedBuffer src = make_src();
    GuardedBuffer other(1024, "other");
    RangeGuard rg(src);  // only src is registered
    Obs o;
    return run(o, [&] {
      launch("cp_async_src_outside", nullptr, dim3(1), dim3(32), 1024, [&] {
        const unsigned t = threadIdx.x;
        const unsigned char* from = (t == 9 ? other.as<unsigned char>() : src.as<unsigned char>()) + 16 * t;
        cp_async_16(dynamic_smem() + 16 * t, from, true);
        cp_async_wait_all();
      });
    });
  };
  m["src_overflow"] = simple(
      [](Obs&, const unsigned char* src, unsigned t, unsigned char* s) {
        // bug: reads chunks 32+t+1, the last one is past the end of src
        cp_async_16(s + 16 * t, src + 16 * (33 + t), true);
        cp_async_wait_all();
      },
      /*register_src=*/false);
  m["check_off"] = []() {
    CheckModeGuard g;
    set_cp_async_check(false);  // without checking, the missing wait goes unnoticed
    GuardedBuffer src = make_src();
    Obs o;
    const unsigned char* sp = src.as<unsigned char>();
    return run(o, [&] {
      launch("cp_async_check_off", nullptr, dim3(1), dim3(32), 1024, [&] {
        const unsigned t = threadIdx.x;
        unsigned char* s = dynamic_smem();
        cp_async_16(s + 16 * t, sp + 16 * t, true);
        cp_async_commit();
        __syncthreads();
        check_chunk(o, s, (t + 1) % 32, (t + 1) % 32);
        cp_async_wait_all();
      });
    });
  };
  return m;
}

// -------------------------------------------------------------- memcheck
void dummy_kernel_a() {}
void dummy_kernel_b() {}
void dummy_kernel_c() {}

__attribute__((noinline)) int recurse(int n, int limit) {
  volatile char buf[1024];
  buf[0] = static_cast<char>(n);
  buf[1023] = 1;
  if (n >= limit) return 0;
  return recurse(n + 1, limit) + buf[n % 1024];
}
volatile int g_recursion_limit = 1 << 30;

std::string overflow_write_once() {
  GuardedBuffer out(32 * sizeof(float), "out");
  Obs o;
  return run(o, [&] {
    launch("overflow_write", nullptr, dim3(1), dim3(32), 0, [&] {
      float* p = out.as<float>();
      const unsigned t = threadIdx.x;
      p[t] = static_cast<float>(t);
      if (t == 31) p[32] = 1.0f;  // bug: one past the end
    });
  });
}

std::map<std::string, Scenario> memcheck_scenarios() {
  std::map<std::string, Scenario> m;
  m["ok"] = []() {
    GuardedBuffer out(32 * sizeof(float), "out");
    Obs o;
    std::string r = run(o, [&] {
      launch("memcheck_ok", nullptr, dim3(1), dim3(32), 0,
             [&] { out.as<float>()[threadIdx.x] = static_cast<float>(threadIdx.x); });
    });
    auto v = out.to_vector<float>();
    for (int i = 0; i < 32; ++i)
      if (v[i] != static_cast<float>(i)) return "wrong value at " + std::to_string(i);
    return r;
  };
  m["global_write_overflow"] = overflow_write_once;
  m["global_read_overflow"] = []() {
    GuardedBuffer in(32 * sizeof(float), "in");
    in.fill(0);
    Obs o;
    return run(o, [&] {
      launch("overflow_read", nullptr, dim3(1), dim3(32), 0, [&] {
        const volatile float* p = in.as<float>();
        const unsigned t = threadIdx.x;
        float x = p[t];
        if (t == 5) x += p[33];  // bug: 4 bytes past the end
        (void)x;
      });
    });
  };
  m["global_underflow"] = []() {
    GuardedBuffer in(32 * sizeof(float), "in", GuardedBuffer::Placement::StartAfterGuard);
    in.fill(0);
    Obs o;
    return run(o, [&] {
      launch("underflow_read", nullptr, dim3(1), dim3(32), 0, [&] {
        const volatile float* p = in.as<float>();
        const int t = static_cast<int>(threadIdx.x);
        float x = p[t - (t == 3 ? 4 : 0)];  // bug: thread 3 reads p[-1]
        (void)x;
      });
    });
  };
  m["global_slack_write"] = []() {
    GuardedBuffer out(18, "out18");  // 18 % 16 != 0: 14 slack bytes before the guard
    Obs o;
    return run(o, [&] {
      launch("slack_write", nullptr, dim3(1), dim3(32), 0, [&] {
        if (threadIdx.x == 0) out.as<unsigned char>()[20] = 0;  // 2 bytes past the end
      });
    });
  };
  m["shared_overflow"] = []() {
    Obs o;
    return run(o, [&] {
      launch("shared_overflow", nullptr, dim3(1), dim3(32), 1024, [&] {
        EA_DYNAMIC_SMEM(smem_raw);
        smem_raw[threadIdx.x] = 0;
        if (threadIdx.x == 2) smem_raw[1024] = 0;  // bug
      });
    });
  };
  m["shared_read_overflow"] = []() {
    Obs o;
    return run(o, [&] {
      launch("shared_read_overflow", nullptr, dim3(1), dim3(32), 1024, [&] {
        EA_DYNAMIC_SMEM(smem_raw);
        const volatile float* f = reinterpret_cast<const float*>(smem_raw);
        float x = f[threadIdx.x + 240];  // threads >= 16 read past the end
        (void)x;
      });
    });
  };
  m["shared_underflow"] = []() {
    Obs o;
    return run(o, [&] {
      launch("shared_underflow", nullptr, dim3(1), dim3(32), 1024, [&] {
        EA_DYNAMIC_SMEM(smem_raw);
        if (threadIdx.x == 0) smem_raw[-1] = 0;  // bug (found by the canary)
      });
    });
  };
  m["shared_uninitialised_read"] = []() {
    Obs o;
    return run(o, [&] {
      launch("shared_uninit", nullptr, dim3(1), dim3(32), 1024, [&] {
        EA_DYNAMIC_SMEM(smem_raw);
        const float* f = reinterpret_cast<const float*>(smem_raw);
        if (std::isnan(f[threadIdx.x])) o.note("never-written shared memory reads as NaN");
      });
    });
  };
  m["stack_overflow"] = []() {
    Obs o;
    return run(o, [&] {
      launch("stack_overflow", nullptr, dim3(1), dim3(32), 0, [&] {
        if (threadIdx.x == 4) recurse(0, g_recursion_limit);
      });
    });
  };
  m["cvta_outside"] = []() {
    GuardedBuffer g(64, "g");
    Obs o;
    return run(o, [&] {
      launch("cvta_outside", nullptr, dim3(1), dim3(32), 256, [&] {
        EA_DYNAMIC_SMEM(smem_raw);
        const size_t off = __cvta_generic_to_shared(smem_raw + 16 * threadIdx.x);
        if (off != 16 * threadIdx.x) o.note("wrong shared offset");
        if (threadIdx.x == 1) (void)__cvta_generic_to_shared(g.data());  // bug: not shared
      });
    });
  };
  m["smem_no_optin"] = []() {
    Obs o;
    return run(o, [&] {
      launch("smem_no_optin", reinterpret_cast<const void*>(&dummy_kernel_a), dim3(1), dim3(32), 64 * 1024, [] {});
    });
  };
  m["smem_optin"] = []() {
    Obs o;
    if (cudaFuncSetAttribute(&dummy_kernel_b, cudaFuncAttributeMaxDynamicSharedMemorySize, 100 * 1024) !=
        cudaSuccess)
      o.note("cudaFuncSetAttribute failed");
    return run(o, [&] {
      launch("smem_optin", reinterpret_cast<const void*>(&dummy_kernel_b), dim3(2), dim3(32), 100 * 1024, [&] {
        EA_DYNAMIC_SMEM(smem_raw);
        smem_raw[100 * 1024 - 1 - threadIdx.x] = 1;
      });
    });
  };
  m["smem_over_limit"] = []() {
    Obs o;
    const cudaError_t e =
        cudaFuncSetAttribute(&dummy_kernel_c, cudaFuncAttributeMaxDynamicSharedMemorySize, 232448 + 16);
    const cudaError_t last = cudaGetLastError();
    o.note(std::string("cudaFuncSetAttribute(232464) = ") + cudaGetErrorName(e) + ", cudaGetLastError = " +
           cudaGetErrorName(last));
    return run(o, [&] {
      launch("smem_over_limit", reinterpret_cast<const void*>(&dummy_kernel_c), dim3(1), dim3(32), 232448 + 16,
             [] {});
    });
  };
  m["exception"] = []() {
    Obs o;
    return run(o, [&] {
      launch("throws", nullptr, dim3(1), dim3(32), 0, [] {
        if (threadIdx.x == 6) throw std::runtime_error("boom");
      });
    });
  };
  m["recover"] = []() {
    // A failed launch must leave the emulator usable and the guards armed.
    const std::string first = overflow_write_once();
    if (first.find("Invalid __global__ write") == std::string::npos) return "first launch: " + first;
    const std::string ok = memcheck_scenarios()["ok"]();
    if (ok != "ok") return "second launch: " + ok;
    const std::string third = overflow_write_once();
    if (third.find("Invalid __global__ write") == std::string::npos) return "third launch: " + third;
    return std::string("ok");
  };
  return m;
}

// --------------------------------------------------------------- barrier
std::map<std::string, Scenario> barrier_scenarios() {
  std::map<std::string, Scenario> m;
  m["block_reduction"] = []() {
    Obs o;
    GuardedBuffer out(2 * sizeof(float), "sums");
    std::string r = run(o, [&] {
      launch("block_reduction", nullptr, dim3(1), dim3(128), 128 * sizeof(float), [&] {
        EA_DYNAMIC_SMEM(smem_raw);
        float* s = reinterpret_cast<float*>(smem_raw);
        const unsigned t = threadIdx.x;
        const float v = static_cast<float>(t + 1);
        // (1) tree reduction in shared memory
        s[t] = v;
        __syncthreads();
        for (unsigned stride = 64; stride > 0; stride /= 2) {
          if (t < stride) s[t] += s[t + stride];
          __syncthreads();
        }
        const float tree = s[0];
        __syncthreads();
        // (2) warp shuffles, then one value per warp through shared memory
        float w = v;
        for (int off = 16; off > 0; off /= 2) w += __shfl_xor_sync(0xffffffffu, w, off);
        if (t % 32 == 0) s[t / 32] = w;
        __syncthreads();
        if (t == 0) {
          out.as<float>()[0] = tree;
          out.as<float>()[1] = s[0] + s[1] + s[2] + s[3];
        }
      });
    });
    auto v = out.to_vector<float>();
    if (v[0] != 8256.0f || v[1] != 8256.0f)
      return "wrong sums " + std::to_string(v[0]) + ", " + std::to_string(v[1]) + " (want 8256) " + r;
    return r;
  };
  m["divergent_exit_while_waiting"] = []() {
    Obs o;
    return run(o, [&] {
      launch("divergent_a", nullptr, dim3(1), dim3(64), 0, [] {
        if (threadIdx.x >= 32) return;  // bug: warp 1 skips the barrier
        __syncthreads();
      });
    });
  };
  m["divergent_barrier_after_exit"] = []() {
    Obs o;
    return run(o, [&] {
      launch("divergent_b", nullptr, dim3(1), dim3(64), 0, [] {
        if (threadIdx.x < 32) return;  // bug: warp 0 leaves, warp 1 syncs
        __syncthreads();
      });
    });
  };
  m["warp_deadlock"] = []() {
    Obs o;
    return run(o, [&] {
      launch("warp_deadlock", nullptr, dim3(1), dim3(32), 0, [] {
        if (threadIdx.x < 16)
          (void)__shfl_xor_sync(0xffffffffu, 1.0f, 1);  // bug: lanes 16-31 never come
        else
          __syncthreads();
      });
    });
  };
  m["warp_lane_exits"] = []() {
    Obs o;
    return run(o, [&] {
      launch("warp_lane_exits", nullptr, dim3(1), dim3(32), 0, [] {
        if (threadIdx.x < 16) (void)__shfl_xor_sync(0xffffffffu, 1.0f, 1);  // bug: lanes 16-31 exit
      });
    });
  };
  m["partial_mask_ok"] = []() {
    Obs o;
    return run(o, [&] {
      launch("partial_mask", nullptr, dim3(1), dim3(32), 0, [&] {
        const unsigned t = threadIdx.x;
        if (t >= 16) return;
        float v = static_cast<float>(t);
        for (int off = 8; off > 0; off /= 2) v += __shfl_xor_sync(0x0000ffffu, v, off, 16);
        if (v != 120.0f) o.note("lane " + std::to_string(t) + " sum " + std::to_string(v));
      });
    });
  };
  m["shfl_reads_outside_mask"] = []() {
    Obs o;
    return run(o, [&] {
      launch("shfl_outside_mask", nullptr, dim3(1), dim3(32), 0, [] {
        if (threadIdx.x < 16) (void)__shfl_xor_sync(0x0000ffffu, 1.0f, 16);  // bug: reads lanes 16-31
      });
    });
  };
  m["ballot"] = []() {
    Obs o;
    return run(o, [&] {
      launch("ballot", nullptr, dim3(1), dim3(64), 0, [&] {
        const unsigned t = threadIdx.x;
        const unsigned b = __ballot_sync(0xffffffffu, t % 3 == 0);
        unsigned want = 0;
        for (unsigned l = 0; l < 32; ++l)
          if ((32 * (t / 32) + l) % 3 == 0) want |= 1u << l;
        if (b != want) o.note("ballot wrong in lane " + std::to_string(t));
        if (__any_sync(0xffffffffu, t == 40) != (t >= 32 ? 1 : 0)) o.note("any wrong");
        if (__all_sync(0xffffffffu, t < 32) != (t < 32 ? 1 : 0)) o.note("all wrong");
        if (__activemask() != 0xffffffffu) o.note("activemask wrong");
      });
    });
  };
  m["syncwarp"] = []() {
    Obs o;
    return run(o, [&] {
      launch("syncwarp", nullptr, dim3(1), dim3(32), 128, [&] {
        EA_DYNAMIC_SMEM(smem_raw);
        float* s = reinterpret_cast<float*>(smem_raw);
        const unsigned t = threadIdx.x;
        s[t] = static_cast<float>(t);
        __syncwarp();
        if (s[(t + 5) % 32] != static_cast<float>((t + 5) % 32)) o.note("syncwarp did not order the stores");
      });
    });
  };
  m["multi_block"] = []() {
    Obs o;
    const dim3 grid(3, 2, 2), block(8, 4, 2);
    GuardedBuffer out(3 * 2 * 2 * 64 * sizeof(int), "ids");
    std::string r = run(o, [&] {
      launch("multi_block", nullptr, grid, block, 64, [&] {
        const unsigned lin = threadIdx.x + threadIdx.y * blockDim.x + threadIdx.z * blockDim.x * blockDim.y;
        const unsigned blk = blockIdx.x + blockIdx.y * gridDim.x + blockIdx.z * gridDim.x * gridDim.y;
        EA_DYNAMIC_SMEM(smem_raw);
        if (lin == 0) std::memset(smem_raw, 0, 64);
        __syncthreads();
        smem_raw[lin] = static_cast<unsigned char>(lin);  // fresh per block
        __syncthreads();
        out.as<int>()[blk * 64 + lin] = static_cast<int>(blk * 1000 + smem_raw[63 - lin]);
      });
    });
    auto v = out.to_vector<int>();
    for (unsigned b = 0; b < 12; ++b)
      for (unsigned l = 0; l < 64; ++l)
        if (v[b * 64 + l] != static_cast<int>(b * 1000 + 63 - l))
          return "wrong value for block " + std::to_string(b) + " thread " + std::to_string(l) + " " + r;
    return r;
  };
  return m;
}

std::map<std::string, Scenario> family(const std::string& f) {
  if (f == "cp_async") return cp_async_scenarios();
  if (f == "memcheck") return memcheck_scenarios();
  if (f == "barrier") return barrier_scenarios();
  throw std::invalid_argument("unknown scenario family '" + f + "'");
}

std::string run_named(const std::string& fam, const std::string& name) {
  auto m = family(fam);
  auto it = m.find(name);
  if (it == m.end()) {
    std::string names;
    for (const auto& kv : m) names += (names.empty() ? "" : ", ") + kv.first;
    throw std::invalid_argument("unknown " + fam + " scenario '" + name + "' (have: " + names + ")");
  }
  return it->second();
}

}  // namespace

std::string cp_async_scenario(const std::string& name) { return run_named("cp_async", name); }
std::string memcheck_scenario(const std::string& name) { return run_named("memcheck", name); }
std::string barrier_scenario(const std::string& name) { return run_named("barrier", name); }

std::vector<std::string> scenario_names(const std::string& f) {
  std::vector<std::string> names;
  for (const auto& kv : family(f)) names.push_back(kv.first);
  return names;
}

}  // namespace effattn::emu::selftest
