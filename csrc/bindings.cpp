// pybind11 bindings of the effattn extension ``effattn._C``.
//
// Launchers take an AttnParams (raw addresses, strides, sizes, the stream as an integer), so the
// extension needs neither torch headers nor libtorch. Errors: std::invalid_argument -> ValueError,
// effattn::CudaError -> effattn._C.CudaError (a RuntimeError) carrying the CUDA error string.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/params.h"
#include "common/philox.h"
#include "cpu/attn_cpu.h"
#include "cpu/relpos_tiled.h"
#include "cpu/simd.h"
#ifdef EFFATTN_WITH_CUDA
#include "cuda/launch.h"
#endif

namespace py = pybind11;
using namespace effattn;

namespace {

#ifndef EFFATTN_WITH_CUDA
[[noreturn]] void no_cuda() {
  throw std::runtime_error("the effattn extension was built without CUDA (nvcc was not found at build time)");
}
#endif

void run_cuda_forward(const AttnParams& p) {
#ifdef EFFATTN_WITH_CUDA
  cuda_forward(p);
#else
  (void)p;
  no_cuda();
#endif
}

void run_cuda_backward(const AttnParams& p) {
#ifdef EFFATTN_WITH_CUDA
  cuda_backward(p);
#else
  (void)p;
  no_cuda();
#endif
}

int device_count() {
#ifdef EFFATTN_WITH_CUDA
  return cuda_device_count();
#else
  no_cuda();
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "effattn C++/CUDA attention kernels (raw-pointer launchers)";

#ifdef EFFATTN_WITH_CUDA
  py::register_exception<CudaError>(m, "CudaError", PyExc_RuntimeError);
  m.attr("WITH_CUDA") = true;
  m.attr("CUDA_RUNTIME_VERSION") = cuda_runtime_version();
#else
  m.attr("WITH_CUDA") = false;
  m.attr("CUDA_RUNTIME_VERSION") = 0;
#endif
#ifdef EFFATTN_CUDA_ARCHS
  m.attr("CUDA_ARCHS") = std::string(EFFATTN_CUDA_ARCHS);
#else
  m.attr("CUDA_ARCHS") = std::string();
#endif

  py::class_<Strides4>(m, "Strides4")
      .def(py::init<>())
      .def(py::init([](int64_t b, int64_t h, int64_t t, int64_t d) { return Strides4{b, h, t, d}; }))
      .def_readwrite("b", &Strides4::b)
      .def_readwrite("h", &Strides4::h)
      .def_readwrite("t", &Strides4::t)
      .def_readwrite("d", &Strides4::d);

  py::class_<BlockList>(m, "BlockList")
      .def(py::init<>())
      .def_readwrite("num", &BlockList::num)
      .def_readwrite("idx", &BlockList::idx)
      .def_readwrite("num_sb", &BlockList::num_sb)
      .def_readwrite("num_sh", &BlockList::num_sh)
      .def_readwrite("num_sm", &BlockList::num_sm)
      .def_readwrite("idx_sb", &BlockList::idx_sb)
      .def_readwrite("idx_sh", &BlockList::idx_sh)
      .def_readwrite("idx_sm", &BlockList::idx_sm)
      .def_readwrite("idx_sn", &BlockList::idx_sn);

#define EA_FIELD(name) .def_readwrite(#name, &AttnParams::name)
  py::class_<AttnParams>(m, "AttnParams")
      .def(py::init<>())
      EA_FIELD(q) EA_FIELD(k) EA_FIELD(v) EA_FIELD(o) EA_FIELD(sq) EA_FIELD(sk) EA_FIELD(sv) EA_FIELD(so)
      EA_FIELD(lse) EA_FIELD(mask) EA_FIELD(smask) EA_FIELD(mask_kind) EA_FIELD(mask_dtype)
      EA_FIELD(dout) EA_FIELD(dq) EA_FIELD(dk) EA_FIELD(dv) EA_FIELD(sdo) EA_FIELD(sdq) EA_FIELD(sdk)
      EA_FIELD(sdv) EA_FIELD(delta) EA_FIELD(dlse) EA_FIELD(stat_sh)
      EA_FIELD(B) EA_FIELD(Hq) EA_FIELD(Hkv) EA_FIELD(Tq) EA_FIELD(Tk) EA_FIELD(T_in) EA_FIELD(T_src)
      EA_FIELD(Dqk) EA_FIELD(Dv) EA_FIELD(dtype) EA_FIELD(scale) EA_FIELD(softcap) EA_FIELD(alibi) EA_FIELD(alibi_sb)
      EA_FIELD(window_left) EA_FIELD(window_right) EA_FIELD(diag_offset)
      EA_FIELD(pool_stride) EA_FIELD(pool_mode) EA_FIELD(pool_cls)
      EA_FIELD(sparse) EA_FIELD(block_q) EA_FIELD(block_kv) EA_FIELD(kv_partial) EA_FIELD(kv_full)
      EA_FIELD(q_partial) EA_FIELD(q_full) EA_FIELD(rule_window_left) EA_FIELD(rule_window_right)
      EA_FIELD(rule_diag_offset) EA_FIELD(rule_n_global) EA_FIELD(q_seg) EA_FIELD(kv_seg)
      EA_FIELD(q_seg_sb) EA_FIELD(q_seg_st) EA_FIELD(kv_seg_sb) EA_FIELD(kv_seg_st)
      EA_FIELD(vl_q_start) EA_FIELD(vl_q_len) EA_FIELD(vl_k_start) EA_FIELD(vl_k_len) EA_FIELD(vl_cached)
      EA_FIELD(dropout_p) EA_FIELD(seed)
      EA_FIELD(stream) EA_FIELD(device) EA_FIELD(tile_m) EA_FIELD(tile_n) EA_FIELD(num_threads);
#undef EA_FIELD

  m.def("cpu_forward", &cpu_forward, py::arg("params"), py::call_guard<py::gil_scoped_release>(),
        "C++ CPU attention forward: writes out and lse.");
  m.def("cpu_backward", &cpu_backward, py::arg("params"), py::call_guard<py::gil_scoped_release>(),
        "C++ CPU attention backward: writes delta, dq, dk, dv.");
  m.def(
      "cpu_set_isa",
      [](const std::string& name) {
        if (!cpu::set_isa(name.c_str()))
          throw std::invalid_argument("effattn extension: instruction set '" + name +
                                      "' is not available here (one of auto, avx512, avx2, portable)");
      },
      py::arg("name"),
      "Micro-kernels of the C++ CPU implementation: 'auto' (the best this CPU supports), 'avx512', 'avx2' or "
      "'portable'; ValueError if this CPU or build cannot run it. The initial choice is $EFFATTN_CPU_ISA, else auto.");
  m.def("cpu_isa", [] { return std::string(cpu::isa_name()); }, "Micro-kernels the C++ CPU implementation uses.");
  m.def("cpu_philox", &philox_first, py::arg("seed"), py::arg("c0"), py::arg("c1"), py::arg("c2"), py::arg("c3"),
        "First 32-bit word of Philox-4x32-10 keyed by seed on counters (c0, c1, c2, c3): the dropout draws "
        "(common/philox.h), as effattn.reference.philox_randint.");
  m.def("cuda_forward", &run_cuda_forward, py::arg("params"), py::call_guard<py::gil_scoped_release>(),
        "CUDA attention forward on params.stream: writes out and lse.");
  m.def("cuda_backward", &run_cuda_backward, py::arg("params"), py::call_guard<py::gil_scoped_release>(),
        "CUDA attention backward on params.stream: writes delta, dq, dk, dv.");
  m.def("cuda_device_count", &device_count, "CUDA devices visible to the extension's runtime.");

  // ---- relative-position ("band") attention on the CPU: csrc/cpu/relpos_tiled.h ----
  {
#define EA_RP(name) .def_readwrite(#name, &cpu::RelposParams::name)
    py::class_<cpu::RelposParams>(m, "RelposParams")
        .def(py::init<>())
        EA_RP(q) EA_RP(k) EA_RP(v) EA_RP(qr) EA_RP(R) EA_RP(tt) EA_RP(q_types) EA_RP(k_types) EA_RP(kpm)
        EA_RP(sq) EA_RP(sk) EA_RP(sv) EA_RP(sqr) EA_RP(sR) EA_RP(stt) EA_RP(o) EA_RP(lse) EA_RP(so)
        EA_RP(dout) EA_RP(delta) EA_RP(dq) EA_RP(dk) EA_RP(dv) EA_RP(dqr) EA_RP(dR) EA_RP(dtt) EA_RP(sdo)
        EA_RP(B) EA_RP(Hq) EA_RP(Hkv) EA_RP(Tq) EA_RP(Tk) EA_RP(NR) EA_RP(D) EA_RP(Dv) EA_RP(dtype) EA_RP(scale)
        EA_RP(rel_stride) EA_RP(separate_cls) EA_RP(cls_type) EA_RP(dropout_p) EA_RP(seed) EA_RP(tile_m)
        EA_RP(tile_n) EA_RP(num_threads);
#undef EA_RP
    m.def("cpu_relpos_forward", &cpu::relpos_forward, py::arg("params"), py::call_guard<py::gil_scoped_release>(),
          "C++ CPU relative-position attention forward: writes out and lse.");
    m.def("cpu_relpos_backward", &cpu::relpos_backward, py::arg("params"), py::call_guard<py::gil_scoped_release>(),
          "C++ CPU relative-position attention backward: writes dq, dk, dv, dqr, dR (batch-summed), dtt.");
  }
}
