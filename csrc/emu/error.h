// effattn CUDA host emulator: the one exception type every emulator check throws.
#pragma once

#include <stdexcept>
#include <string>

namespace effattn::emu {

// Thrown by launch() (and by host-side API misuse).  Errors detected inside
// an emulated thread are recorded there and thrown only after the launch has
// been unwound, because an exception can not cross swapcontext.
class EmuError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace effattn::emu
