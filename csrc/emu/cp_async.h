// effattn CUDA host emulator: cp.async (global -> shared, 16 bytes) with
// commit/wait groups.
//
// Checking mode (default on): at issue the source is snapshotted and the
// destination filled with 0xFF (NaN); the snapshot lands only when a
// cp.async.wait_group completes its group.  So a missing or too-early wait
// makes the kernel read NaN, as it would (sometimes) read stale data on a GPU.
// Copies still pending when a thread exits are an error.
#pragma once

#include "core.h"

namespace effattn::emu {

// cp.async.cg.shared.global [dst], [src], 16, pred ? 16 : 0
// (pred false: 16 zero bytes, nothing read, src not checked).
void cp_async_16(void* dst_shared, const void* src_global, bool pred = true);
// cp.async.commit_group (an empty group is legal and counts).
void cp_async_commit();
// cp.async.wait_group n: completes all committed groups but the newest n.
// Uncommitted copies are not completed (as in the ISA).
void cp_async_wait_group(int n);
template <int N>
inline void cp_async_wait() {
  static_assert(N >= 0, "cp.async.wait_group N needs N >= 0");
  cp_async_wait_group(N);
}
// cp.async.wait_all == commit_group + wait_group 0.
void cp_async_wait_all();

void set_cp_async_check(bool on);  // process-wide
bool cp_async_check();

}  // namespace effattn::emu
