// effattn CUDA host emulator: small built-in kernels that exercise every
// primitive and checker (used by selftest.cpp's Python bindings).  Plain C++
// interface, no pybind11 here.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

namespace effattn::emu::selftest {

// One warp; lane i gets a[i], b[i], c[i] and returns its D fragment.
std::vector<std::array<float, 4>> run_mma(bool bf16, const std::vector<std::array<uint32_t, 4>>& a,
                                          const std::vector<std::array<uint32_t, 2>>& b,
                                          const std::vector<std::array<float, 4>>& c);
// smem: 16-bit words (element i at byte 2i); row_addr: per-lane byte offsets.
std::vector<std::vector<uint32_t>> run_ldmatrix(const std::vector<uint16_t>& smem,
                                                const std::vector<long long>& row_addr, int num, bool trans);
// kind: xor | idx | down | up.  Lanes outside mask keep their value.
std::vector<float> run_shfl(const std::string& kind, const std::vector<float>& values, int arg, int width,
                            unsigned mask);

// Each returns "ok", or what went wrong / what the checker reported.
std::string cp_async_scenario(const std::string& name);
std::string memcheck_scenario(const std::string& name);
std::string barrier_scenario(const std::string& name);
std::vector<std::string> scenario_names(const std::string& family);  // cp_async | memcheck | barrier

// 64x64x128 fp16 GEMM, one CTA of 4 warps (cp.async double buffering,
// ldmatrix x4 / x4.trans, mma.sync, shuffle row max) against a plain loop.
// Returns max |error| over C and the row maxima (NaN if the kernel read
// NaN).  variant "correct", or "early_wait" (last wait_group too weak).
double gemm_scenario(const std::string& variant);

}  // namespace effattn::emu::selftest
