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
#include "common/params_binding.h"
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
  py::register_local_exception<CudaError>(m, "CudaError", PyExc_RuntimeError);
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

  bind_params(m);

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
