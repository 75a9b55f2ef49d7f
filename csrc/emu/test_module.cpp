// Stand-alone module for testing the emulator on its own (not part of the
// project build): python -c "import _emu_selftest"
#include <pybind11/pybind11.h>

void effattn_emu_register_selftest(pybind11::module_& m);

PYBIND11_MODULE(_emu_selftest, m) { effattn_emu_register_selftest(m); }
