// The module effattn._C_emu: the CUDA kernels of csrc/cuda compiled for the host and run on the emulator
// (backend "cuda-emu"), with the launch arguments of effattn._C (common/params_binding.h), and the
// emulator's self-tests (selftest.cpp). Errors: std::invalid_argument -> ValueError (argument checks),
// CudaError and EmuError (a kernel's invalid access, barrier misuse, unwaited cp.async) -> RuntimeError.
//
// Memcheck of a launch: every tensor of the AttnParams is copied into a GuardedBuffer (memcheck.h) whose
// end touches a PROT_NONE page, the launch runs on those copies, and the outputs are copied back; so a
// kernel's read or write past the end of any of its tensors is reported with the kernel, block and
// thread, as compute-sanitizer's memcheck would. (Past the end: extents are the tensors' views, from
// their sizes and strides.)
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <deque>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <utility>

#include "common/params_binding.h"
#include "cuda/launch.h"
#include "emu.h"

namespace py = pybind11;

void effattn_emu_register_selftest(py::module_& m);

namespace effattn {
namespace {

bool g_memcheck = true;

// Elements spanned by a view of sizes n_i and strides s_i (>= 0): the largest offset + 1; 0 if empty.
int64_t extent(std::initializer_list<std::pair<int64_t, int64_t>> dims) {
  int64_t e = 1;
  for (const auto& d : dims) {
    if (d.first <= 0) return 0;
    e += (d.first - 1) * d.second;
  }
  return e;
}

int64_t mask_element_size(int dtype) {
  switch (dtype) {
    case kBool: return 1;
    case kFloat16:
    case kBFloat16: return 2;
    case kFloat64: return 8;
    default: return 4;
  }
}

// The launch's tensors in guarded copies: fields of the params are pointed at the copies; outputs are copied
// back by finish().
class GuardedLaunch {
 public:
  void add(int64_t& field, int64_t bytes, const char* name, bool output) {
    if (field == 0 || bytes <= 0) return;
    bufs_.emplace_back(static_cast<size_t>(bytes), name);
    bufs_.back().copy_in(reinterpret_cast<const void*>(field), static_cast<size_t>(bytes));
    if (output) outputs_.push_back({&bufs_.back(), field});
    field = reinterpret_cast<int64_t>(bufs_.back().data());
  }

  // A block list (B, H, nblocks) of counts and (B, H, nblocks, n) of indices, n the largest count (what is read).
  void add_list(BlockList& l, int B, int H, int64_t nblocks, const char* name) {
    if (l.num == 0) return;
    const auto* num = reinterpret_cast<const int32_t*>(l.num);
    int32_t most = 1;
    for (int b = 0; b < B; ++b)
      for (int h = 0; h < H; ++h)
        for (int64_t i = 0; i < nblocks; ++i) most = std::max(most, num[b * l.num_sb + h * l.num_sh + i * l.num_sm]);
    add(l.num, 4 * extent({{B, l.num_sb}, {H, l.num_sh}, {nblocks, l.num_sm}}), name, false);
    add(l.idx, 4 * extent({{B, l.idx_sb}, {H, l.idx_sh}, {nblocks, l.idx_sm}, {most, l.idx_sn}}), name, false);
  }

  void finish() {
    for (const auto& o : outputs_) o.first->copy_out(reinterpret_cast<void*>(o.second), o.first->size());
  }

 private:
  std::deque<emu::GuardedBuffer> bufs_;  // a deque: the buffers never move
  std::vector<std::pair<emu::GuardedBuffer*, int64_t>> outputs_;
};

// The params of a launch pointed at guarded copies of its tensors (forward: out and lse are written;
// backward: delta, dq, dk, dv).
void guard(AttnParams& p, GuardedLaunch& g, bool backward) {
  const int64_t e = 2;  // float16 / bfloat16
  const int64_t rows = static_cast<int64_t>(p.B) * p.Hq * p.Tq;
  const auto qlike = [&](const Strides4& s) { return e * extent({{p.B, s.b}, {p.Hq, s.h}, {p.T_in, s.t}, {p.Dqk, s.d}}); };
  const auto klike = [&](const Strides4& s, int D) { return e * extent({{p.B, s.b}, {p.Hkv, s.h}, {p.Tk, s.t}, {D, s.d}}); };
  const auto olike = [&](const Strides4& s) { return e * extent({{p.B, s.b}, {p.Hq, s.h}, {p.Tq, s.t}, {p.Dv, s.d}}); };
  g.add(p.q, qlike(p.sq), "q", false);
  g.add(p.k, klike(p.sk, p.Dqk), "k", false);
  g.add(p.v, klike(p.sv, p.Dv), "v", false);
  g.add(p.o, olike(p.so), "out", !backward);
  g.add(p.lse, 4 * rows, "lse", !backward);
  if (p.mask_kind != kMaskNone)
    g.add(p.mask, mask_element_size(p.mask_dtype) *
                      extent({{p.B, p.smask.b}, {p.Hq, p.smask.h}, {p.Tq, p.smask.t}, {p.Tk, p.smask.d}}),
          "mask", false);
  if (p.q_seg) {
    g.add(p.q_seg, 4 * extent({{p.B, p.q_seg_sb}, {p.Tq, p.q_seg_st}}), "q segment ids", false);
    g.add(p.kv_seg, 4 * extent({{p.B, p.kv_seg_sb}, {p.Tk, p.kv_seg_st}}), "kv segment ids", false);
  }
  if (p.sparse) {
    const int64_t nqb = (p.Tq + p.block_q - 1) / p.block_q, nkb = (p.Tk + p.block_kv - 1) / p.block_kv;
    g.add_list(p.kv_partial, p.B, p.Hq, nqb, "kv block list");
    g.add_list(p.kv_full, p.B, p.Hq, nqb, "full kv block list");
    if (backward) {
      g.add_list(p.q_partial, p.B, p.Hq, nkb, "q block list");
      g.add_list(p.q_full, p.B, p.Hq, nkb, "full q block list");
    }
  }
  if (!backward) return;
  g.add(p.dout, olike(p.sdo), "dout", false);
  g.add(p.dlse, 4 * rows, "dlse", false);
  g.add(p.delta, 4 * rows, "delta", true);
  g.add(p.dq, qlike(p.sdq), "dq", true);
  g.add(p.dk, klike(p.sdk, p.Dqk), "dk", true);
  g.add(p.dv, klike(p.sdv, p.Dv), "dv", true);
}

template <class Launch>
void run(AttnParams p, bool backward, Launch launch) {
  if (!g_memcheck) return launch(p);
  GuardedLaunch g;
  guard(p, g, backward);
  launch(p);
  g.finish();
}

}  // namespace
}  // namespace effattn

PYBIND11_MODULE(_C_emu, m) {
  using namespace effattn;
  m.doc() = "effattn's CUDA kernels on a host emulator of the PTX primitives they use (csrc/emu)";
  py::register_local_exception<CudaError>(m, "CudaError", PyExc_RuntimeError);
  py::register_local_exception<emu::EmuError>(m, "EmuError", PyExc_RuntimeError);
  m.attr("WITH_CUDA") = true;
  bind_params(m);
  m.def(
      "cuda_forward", [](const AttnParams& p) { run(p, false, [](const AttnParams& q) { cuda_forward(q); }); },
      py::arg("params"), py::call_guard<py::gil_scoped_release>(),
      "The CUDA attention forward on the emulator: writes out and lse.");
  m.def(
      "cuda_backward", [](const AttnParams& p) { run(p, true, [](const AttnParams& q) { cuda_backward(q); }); },
      py::arg("params"), py::call_guard<py::gil_scoped_release>(),
      "The CUDA attention backward on the emulator: writes delta, dq, dk, dv.");
  m.def("set_cp_async_check", &emu::set_cp_async_check, py::arg("on"),
        "cp.async checking (default on): shared memory a group writes reads as NaN until its wait_group.");
  m.def(
      "set_schedule",
      [](const std::string& name) {
        if (name == "round_robin") return emu::set_schedule(emu::Schedule::RoundRobin);
        if (name == "warps_ahead") return emu::set_schedule(emu::Schedule::WarpsAhead);
        if (name == "warps_behind") return emu::set_schedule(emu::Schedule::WarpsBehind);
        throw std::invalid_argument("schedule must be 'round_robin', 'warps_ahead' or 'warps_behind', got '" + name +
                                    "'");
      },
      py::arg("name"),
      "The order a block's threads run in (core.h): 'round_robin' (default; warps in near lockstep), "
      "'warps_ahead' / 'warps_behind' (the lowest / highest warp runs until a barrier stops it: a missing "
      "__syncthreads shows).");
  m.def(
      "set_memcheck", [](bool on) { g_memcheck = on; }, py::arg("on"),
      "Memcheck of the launches (default on): every tensor in a guarded copy, out-of-bounds accesses reported.");
  effattn_emu_register_selftest(m);
}
