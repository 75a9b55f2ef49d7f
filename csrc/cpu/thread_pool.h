// A small persistent pool of std::threads for the C++ CPU attention (no OpenMP: the extension runs
// next to torch's own OpenMP runtime and must not bring a second one).
#pragma once

#include <functional>

namespace effattn {
namespace cpu {

// Threads to use for ``requested`` (<= 0: the hardware's concurrency).
int resolve_threads(int requested);

// Runs ``body(worker)`` for worker = 0 .. threads - 1 at once (worker 0 on the calling thread) and
// returns when all have returned; the first exception thrown by a body is rethrown here. Work is
// shared by the bodies themselves (e.g. an atomic task counter), so that which worker runs a task
// never changes its result. A call made while the pool is busy (another caller thread) runs its
// bodies one after another on the calling thread.
void run_parallel(int threads, const std::function<void(int)>& body);

}  // namespace cpu
}  // namespace effattn
