// Host side of the CUDA backend: argument checks, device guard, dispatch on (dtype, head dim).
//
// The kernel templates are instantiated in flash_{fwd,bwd}_hdim{64,128}.cu; this file only declares
// the launchers, so it compiles quickly. Every CUDA call is checked (EA_CUDA_CHECK): a failure
// becomes effattn::CudaError, which the bindings turn into a Python exception with the CUDA string.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <string>

#include "../common/check.h"
#include "cuda_check.cuh"
#include "launch.h"


namespace effattn {
namespace cuda {
template <class T, int D>
void launch_fwd(const AttnParams& p, cudaStream_t stream);
template <class T, int D>
void launch_bwd(const AttnParams& p, cudaStream_t stream);
}  // namespace cuda

namespace {

constexpr int kMaxGridYZ = 65535;
constexpr int kMinSparseBlock = 64;  // the kernels' tiles (64 rows / keys) must fit in a mask block
constexpr int kMaxHeadDim = 128;

// Makes p.device current for the launch and restores the caller's device afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    EA_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device) EA_CUDA_CHECK(cudaSetDevice(device));
  }
  ~DeviceGuard() {
    if (previous_ >= 0) (void)cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

void check_cuda_params(const AttnParams& p) {
  require(p.dtype == kFloat16 || p.dtype == kBFloat16, "the CUDA kernels take float16 or bfloat16 inputs");
  require(p.Dqk <= kMaxHeadDim && p.Dv <= kMaxHeadDim,
          "the CUDA kernels support head dims up to " + std::to_string(kMaxHeadDim) + " (got q/k " +
              std::to_string(p.Dqk) + ", v " + std::to_string(p.Dv) + ")");
  require(p.B <= kMaxGridYZ && p.Hq <= kMaxGridYZ, "batch and heads must each be <= 65535 (CUDA launch grid)");
  require((p.q | p.k | p.v | p.o) % 2 == 0, "q, k, v, out must be 2-byte aligned");
  if (p.sparse)
    require(p.block_q >= kMinSparseBlock && p.block_kv >= kMinSparseBlock && (p.block_q & (p.block_q - 1)) == 0 &&
                (p.block_kv & (p.block_kv - 1)) == 0,
            "the CUDA block-sparse kernels need block sizes that are powers of two >= 64 (got " +
                std::to_string(p.block_q) + " x " + std::to_string(p.block_kv) + ")");
  // What the CUDA kernels do not implement (the Python layer declines these first; a raw launch must not
  // silently ignore them).
  require(p.softcap == 0.0 && p.alibi == 0, "the CUDA kernels do not implement softcap or ALiBi");
  require(p.dropout_p == 0.0, "the CUDA kernels do not implement dropout");
  require(p.vl_q_len == 0, "the CUDA kernels do not implement varlen");
  require(p.stat_sh == 0 || p.stat_sh == p.Tq, "the CUDA kernels take lse, delta and dlse contiguous (B, Hq, Tq)");
  int count = 0;
  EA_CUDA_CHECK(cudaGetDeviceCount(&count));
  require(p.device >= 0 && p.device < count, "CUDA device " + std::to_string(p.device) + " does not exist");
}

template <class F>
void dispatch(const AttnParams& p, F&& f) {
  const int d = p.Dqk > p.Dv ? p.Dqk : p.Dv;
  if (p.dtype == kFloat16) {
    if (d <= 64)
      f(__half(), std::integral_constant<int, 64>());
    else
      f(__half(), std::integral_constant<int, 128>());
  } else {
    if (d <= 64)
      f(__nv_bfloat16(), std::integral_constant<int, 64>());
    else
      f(__nv_bfloat16(), std::integral_constant<int, 128>());
  }
}

}  // namespace

void cuda_forward(const AttnParams& p) {
  check_forward(p);
  check_cuda_params(p);
  if (static_cast<int64_t>(p.B) * p.Hq * p.Tq == 0) return;
  DeviceGuard guard(p.device);
  const auto stream = reinterpret_cast<cudaStream_t>(p.stream);
  dispatch(p, [&](auto t, auto d) { cuda::launch_fwd<decltype(t), decltype(d)::value>(p, stream); });
}

void cuda_backward(const AttnParams& p) {
  check_backward(p);
  check_cuda_params(p);
  if (static_cast<int64_t>(p.B) * p.Hq * p.Tq * p.Tk == 0) return;
  DeviceGuard guard(p.device);
  const auto stream = reinterpret_cast<cudaStream_t>(p.stream);
  dispatch(p, [&](auto t, auto d) { cuda::launch_bwd<decltype(t), decltype(d)::value>(p, stream); });
}

int cuda_device_count() {
  int count = 0;
  EA_CUDA_CHECK(cudaGetDeviceCount(&count));
  return count;
}

int cuda_runtime_version() {
  int version = 0;
  if (cudaRuntimeGetVersion(&version) != cudaSuccess) return 0;
  return version;
}

}  // namespace effattn
