// effattn CUDA host emulator: one-warp launches that run a single primitive
// with caller-given per-lane registers (the selftest's primitive checks).
#include <stdexcept>

#include "emu.h"
#include "selftest_kernels.h"

namespace effattn::emu::selftest {

std::vector<std::array<float, 4>> run_mma(bool bf16, const std::vector<std::array<uint32_t, 4>>& a,
                                          const std::vector<std::array<uint32_t, 2>>& b,
                                          const std::vector<std::array<float, 4>>& c) {
  if (a.size() != 32 || b.size() != 32 || c.size() != 32)
    throw std::invalid_argument("mma_m16n8k16: a, b and c need one entry per lane (32)");
  std::vector<std::array<float, 4>> d(32);
  launch("selftest_mma", nullptr, dim3(1), dim3(32), 0, [&] {
    const unsigned lane = threadIdx.x;
    float acc[4] = {c[lane][0], c[lane][1], c[lane][2], c[lane][3]};
    const uint32_t ar[4] = {a[lane][0], a[lane][1], a[lane][2], a[lane][3]};
    if (bf16)
      mma_16816<__nv_bfloat16>(acc, ar, b[lane][0], b[lane][1]);
    else
      mma_16816<__half>(acc, ar, b[lane][0], b[lane][1]);
    for (int i = 0; i < 4; ++i) d[lane][i] = acc[i];
  });
  return d;
}

std::vector<std::vector<uint32_t>> run_ldmatrix(const std::vector<uint16_t>& smem,
                                                const std::vector<long long>& row_addr, int num, bool trans) {
  if (row_addr.size() != 32) throw std::invalid_argument("ldmatrix: row_addr needs 32 entries");
  if (num != 1 && num != 2 && num != 4) throw std::invalid_argument("ldmatrix: num must be 1, 2 or 4");
  std::vector<std::vector<uint32_t>> out(32, std::vector<uint32_t>(num));
  const size_t bytes = smem.size() * 2;
  launch("selftest_ldmatrix", nullptr, dim3(1), dim3(32), bytes, [&] {
    const unsigned lane = threadIdx.x;
    unsigned char* s = dynamic_smem();
    if (lane == 0 && bytes) std::memcpy(s, smem.data(), bytes);
    __syncthreads();
    // Integer arithmetic: unused lanes may pass offsets far outside.
    const void* p = reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(s) + row_addr[lane]);
    uint32_t r[4] = {};
    if (num == 1) {
      uint32_t (&r1)[1] = *reinterpret_cast<uint32_t(*)[1]>(r);
      trans ? ldmatrix_x1_trans(r1, p) : ldmatrix_x1(r1, p);
    } else if (num == 2) {
      uint32_t (&r2)[2] = *reinterpret_cast<uint32_t(*)[2]>(r);
      trans ? ldmatrix_x2_trans(r2, p) : ldmatrix_x2(r2, p);
    } else {
      trans ? ldmatrix_x4_trans(r, p) : ldmatrix_x4(r, p);
    }
    for (int i = 0; i < num; ++i) out[lane][i] = r[i];
  });
  return out;
}

std::vector<float> run_shfl(const std::string& kind, const std::vector<float>& values, int arg, int width,
                            unsigned mask) {
  if (values.size() != 32) throw std::invalid_argument("shfl: values needs 32 entries");
  if (kind != "xor" && kind != "idx" && kind != "down" && kind != "up")
    throw std::invalid_argument("shfl: kind must be xor, idx, down or up");
  std::vector<float> out(values);
  launch("selftest_shfl", nullptr, dim3(1), dim3(32), 0, [&] {
    const unsigned lane = threadIdx.x;
    if (!((mask >> lane) & 1u)) return;  // not participating: keeps its value
    const float v = values[lane];
    float r;
    if (kind == "xor")
      r = __shfl_xor_sync(mask, v, arg, width);
    else if (kind == "idx")
      r = __shfl_sync(mask, v, arg, width);
    else if (kind == "down")
      r = __shfl_down_sync(mask, v, static_cast<unsigned>(arg), width);
    else
      r = __shfl_up_sync(mask, v, static_cast<unsigned>(arg), width);
    out[lane] = r;
  });
  return out;
}

}  // namespace effattn::emu::selftest
