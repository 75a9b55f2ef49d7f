// effattn CUDA host emulator: an end-to-end kernel of our own, written like a
// device kernel: C[64x64] = A[64x128] * B[128x64] in fp16 -> fp32 with one CTA
// of 4 warps.  K is consumed in tiles of 32, double-buffered in dynamic
// shared memory with cp.async; each warp owns 16 rows, loads its A fragments
// with ldmatrix.x4 and B fragments with ldmatrix.x4.trans (B is K-major in
// shared memory), runs mma.m16n8k16, then reduces each row's maximum with
// warp shuffles.  Checked against a plain double loop.
#include <cmath>

#include "emu.h"
#include "selftest_kernels.h"

namespace effattn::emu::selftest {

namespace {

constexpr int M = 64, N = 64, K = 128, BK = 32, KT = K / BK;
constexpr size_t kSmemBytes = 2 * (M * BK + BK * N) * sizeof(__half);

__global__ void gemm_kernel(const __half* __restrict__ A, const __half* __restrict__ B, float* __restrict__ C,
                            float* __restrict__ rowmax, bool early_wait_bug) {
  EA_DYNAMIC_SMEM(smem_raw);
  __half* sA = reinterpret_cast<__half*>(smem_raw);  // [2][M][BK]
  __half* sB = sA + 2 * M * BK;                       // [2][BK][N]
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;

  auto load_tile = [&](int kt, int buf) {
    for (int i = tid; i < M * BK / 8; i += 128) {  // 16-byte chunks
      const int r = i / (BK / 8), c = (i % (BK / 8)) * 8;
      cp_async_16(sA + buf * M * BK + r * BK + c, A + r * K + kt * BK + c, true);
    }
    for (int i = tid; i < BK * N / 8; i += 128) {
      const int r = i / (N / 8), c = (i % (N / 8)) * 8;
      cp_async_16(sB + buf * BK * N + r * N + c, B + (kt * BK + r) * N + c, true);
    }
    cp_async_commit();
  };

  float acc[8][4] = {};
  load_tile(0, 0);
  for (int kt = 0; kt < KT; ++kt) {
    if (kt + 1 < KT) {
      load_tile(kt + 1, (kt + 1) & 1);
      cp_async_wait<1>();  // tile kt has landed, kt+1 may still be in flight
    } else if (early_wait_bug) {
      cp_async_wait<1>();  // bug: the last tile is the newest group and stays pending
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const __half* a = sA + (kt & 1) * M * BK;
    const __half* b = sB + (kt & 1) * BK * N;
    for (int kk = 0; kk < BK; kk += 16) {
      // A 16x16 tile of this warp: lanes 0-15 rows 0-15 at column kk, lanes
      // 16-31 the same rows at kk+8 -> matrices (r0-7,c0-7) (r8-15,c0-7)
      // (r0-7,c8-15) (r8-15,c8-15) = a0..a3 of the mma A fragment.
      uint32_t af[4];
      ldmatrix_x4(af, a + (warp * 16 + lane % 16) * BK + kk + (lane / 16) * 8);
      for (int nt = 0; nt < 8; nt += 2) {
        // B rows k = kk + lane%16, columns of n-tiles nt (lanes 0-15) and
        // nt+1 (lanes 16-31); .trans turns K-major rows into col fragments.
        uint32_t bf[4];
        ldmatrix_x4_trans(bf, b + (kk + lane % 16) * N + nt * 8 + (lane / 16) * 8);
        mma_16816<__half>(acc[nt], af, bf[0], bf[1]);
        mma_16816<__half>(acc[nt + 1], af, bf[2], bf[3]);
      }
    }
    __syncthreads();  // the buffer is overwritten by the next load_tile
  }
  if (early_wait_bug) cp_async_wait_all();

  const int g = lane >> 2, t = lane & 3, r0 = warp * 16 + g;
  float mx0 = -INFINITY, mx1 = -INFINITY;
  for (int nt = 0; nt < 8; ++nt) {
    const int c = nt * 8 + 2 * t;
    C[r0 * N + c] = acc[nt][0];
    C[r0 * N + c + 1] = acc[nt][1];
    C[(r0 + 8) * N + c] = acc[nt][2];
    C[(r0 + 8) * N + c + 1] = acc[nt][3];
    mx0 = fmaxf(mx0, fmaxf(acc[nt][0], acc[nt][1]));
    mx1 = fmaxf(mx1, fmaxf(acc[nt][2], acc[nt][3]));
  }
  // The 4 lanes of a quad hold one row's 64 columns between them.
  for (int off = 1; off < 4; off *= 2) {
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
  }
  if (t == 0) {
    rowmax[r0] = mx0;
    rowmax[r0 + 8] = mx1;
  }
}

}  // namespace

double gemm_scenario(const std::string& variant) {
  if (variant != "correct" && variant != "early_wait") throw std::invalid_argument("gemm variant: correct | early_wait");
  const bool bug = variant == "early_wait";
  std::vector<__half> ha(M * K), hb(K * N);
  uint32_t state = 12345u;
  auto rnd = [&] {
    state = state * 1664525u + 1013904223u;
    return static_cast<float>((state >> 8) & 0xffff) / 32768.0f - 1.0f;
  };
  for (auto& x : ha) x = __float2half_rn(rnd());
  for (auto& x : hb) x = __float2half_rn(rnd());

  GuardedBuffer A(ha.size() * 2, "A"), B(hb.size() * 2, "B"), C(M * N * 4, "C"), R(M * 4, "rowmax");
  A.copy_in(ha);
  B.copy_in(hb);
  register_global_range(A.data(), A.size(), "A");
  register_global_range(B.data(), B.size(), "B");
  struct Unreg {
    const void *a, *b;
    ~Unreg() {
      unregister_global_range(a);
      unregister_global_range(b);
    }
  } unreg{A.data(), B.data()};

  const __half* pa = A.as<__half>();
  const __half* pb = B.as<__half>();
  float* pc = C.as<float>();
  float* pr = R.as<float>();
  launch("gemm_kernel", reinterpret_cast<const void*>(&gemm_kernel), dim3(1), dim3(128), kSmemBytes,
         [&] { gemm_kernel(pa, pb, pc, pr, bug); });

  const auto c = C.to_vector<float>();
  const auto r = R.to_vector<float>();
  double err = 0.0;
  for (int i = 0; i < M; ++i) {
    double mx = -INFINITY;
    for (int j = 0; j < N; ++j) {
      double ref = 0.0;
      for (int k = 0; k < K; ++k) ref += static_cast<double>(__half2float(ha[i * K + k])) * __half2float(hb[k * N + j]);
      mx = std::max(mx, ref);
      const double e = std::fabs(c[i * N + j] - ref);
      if (std::isnan(e)) return NAN;
      err = std::max(err, e);
    }
    const double e = std::fabs(r[i] - mx);
    if (std::isnan(e)) return NAN;
    err = std::max(err, e);
  }
  return err;
}

}  // namespace effattn::emu::selftest
