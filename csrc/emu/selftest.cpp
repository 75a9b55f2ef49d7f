// effattn CUDA host emulator: Python bindings of the selftest kernels.
// effattn_emu_register_selftest(m) adds them to an existing pybind11 module.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "emu.h"
#include "selftest_kernels.h"

namespace py = pybind11;
using namespace effattn::emu;

namespace {

template <size_t W, class T>
std::vector<std::array<T, W>> rows(const std::vector<std::vector<T>>& v, const char* what) {
  if (v.size() != 32) throw py::value_error(std::string(what) + ": need 32 rows (one per lane)");
  std::vector<std::array<T, W>> r(32);
  for (size_t i = 0; i < 32; ++i) {
    if (v[i].size() != W) throw py::value_error(std::string(what) + ": every row needs " + std::to_string(W) + " values");
    for (size_t j = 0; j < W; ++j) r[i][j] = v[i][j];
  }
  return r;
}

}  // namespace

void effattn_emu_register_selftest(py::module_& m) {
  m.def(
      "mma_m16n8k16",
      [](const std::string& dtype, const std::vector<std::vector<uint32_t>>& a,
         const std::vector<std::vector<uint32_t>>& b, const std::vector<std::vector<float>>& c) {
        if (dtype != "float16" && dtype != "bfloat16") throw py::value_error("dtype must be float16 or bfloat16");
        auto d = selftest::run_mma(dtype == "bfloat16", rows<4>(a, "a"), rows<2>(b, "b"), rows<4>(c, "c"));
        std::vector<std::vector<float>> out;
        for (const auto& x : d) out.emplace_back(x.begin(), x.end());
        return out;
      },
      py::arg("dtype"), py::arg("a"), py::arg("b"), py::arg("c"),
      "mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: per-lane a (32x4 u32), b (32x2 u32), c (32x4 f32) -> d");
  m.def("ldmatrix", &selftest::run_ldmatrix, py::arg("smem"), py::arg("row_addr"), py::arg("num"),
        py::arg("trans"),
        "ldmatrix.sync.aligned.m8n8.x{num}{.trans}.shared.b16: smem as u16 words, per-lane row byte offsets");
  m.def("shfl", &selftest::run_shfl, py::arg("kind"), py::arg("values"), py::arg("arg"), py::arg("width") = 32,
        py::arg("mask") = 0xffffffffu, "__shfl_{xor,sync,down,up}_sync over one warp");
  m.def("float_to_half_rn", [](const std::vector<float>& v) {
    std::vector<uint32_t> r;
    for (float f : v) r.push_back(__half_as_ushort(__float2half_rn(f)));
    return r;
  });
  m.def("half_to_float", [](const std::vector<uint32_t>& v) {
    std::vector<float> r;
    for (uint32_t h : v) r.push_back(__half2float(__ushort_as_half(static_cast<unsigned short>(h))));
    return r;
  });
  m.def("float_to_bf16_rn", [](const std::vector<float>& v) {
    std::vector<uint32_t> r;
    for (float f : v) r.push_back(__bfloat16_as_ushort(__float2bfloat16_rn(f)));
    return r;
  });
  m.def("bf16_to_float", [](const std::vector<uint32_t>& v) {
    std::vector<float> r;
    for (uint32_t h : v) r.push_back(__bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(h))));
    return r;
  });
  m.def("cp_async_scenario", &selftest::cp_async_scenario, py::arg("name"));
  m.def("memcheck_scenario", &selftest::memcheck_scenario, py::arg("name"));
  m.def("barrier_scenario", &selftest::barrier_scenario, py::arg("name"));
  m.def("scenario_names", &selftest::scenario_names, py::arg("family"),
        "names of the scenarios of a family: cp_async | memcheck | barrier");
  m.def("gemm_scenario", &selftest::gemm_scenario, py::arg("variant") = "correct");
  m.def("set_cp_async_check", &set_cp_async_check, py::arg("on"));
  m.def("cp_async_check", &cp_async_check);
}
