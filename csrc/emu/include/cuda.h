// Stand-in for <cuda.h> (effattn host emulator): just the runtime stand-in.
#pragma once
#include "cuda_runtime.h"
