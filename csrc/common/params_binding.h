// pybind11 classes of the launch arguments (common/params.h): Strides4, BlockList, AttnParams, each member
// exposed by name. Shared by the extension effattn._C (csrc/bindings.cpp) and the emulator's module
// effattn._C_emu (csrc/emu/bindings.cpp), so that Python fills both the same way; module-local, as both
// modules live in one process (pybind11 registers a global type once).
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>

#include "params.h"

namespace effattn {

inline void bind_params(pybind11::module_& m) {
  namespace py = pybind11;
  py::class_<Strides4>(m, "Strides4", py::module_local())
      .def(py::init<>())
      .def(py::init([](int64_t b, int64_t h, int64_t t, int64_t d) { return Strides4{b, h, t, d}; }))
      .def_readwrite("b", &Strides4::b)
      .def_readwrite("h", &Strides4::h)
      .def_readwrite("t", &Strides4::t)
      .def_readwrite("d", &Strides4::d);

  py::class_<BlockList>(m, "BlockList", py::module_local())
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
  py::class_<AttnParams>(m, "AttnParams", py::module_local())
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
}

}  // namespace effattn
