// effattn CUDA host emulator: the warp rendezvous and the collectives built
// on it (shfl, vote, syncwarp, mma.m16n8k16, ldmatrix).
//
// A lane arriving at a collective records {op, mask, &operands, &results} in
// its fiber and sleeps.  The lane whose arrival completes the group (every
// lane of `mask` waiting with the same op and mask) computes all results,
// exactly as the instruction does for the whole warp, and wakes the group.
// Lanes that meet at different instructions never complete: the scheduler's
// deadlock report names them.  A lane of the mask that has exited (or does not
// exist, in a partial warp) can never arrive: that is reported at once.
#include <cstring>
#include <string>

#include "half_bits.h"
#include "sched_internal.h"
#include "warp.h"

namespace effattn::emu {
namespace detail {

namespace {

// Ops: a lane meets only lanes at the same op (instruction + variant).
constexpr int kOpShfl = 100;    // + ShflMode
constexpr int kOpVote = 200;    // + VoteKind
constexpr int kOpSyncwarp = 300;
constexpr int kOpMma = 400;     // + bf16
constexpr int kOpLdmatrix = 500;  // + num*2 + trans

using Compute = std::string (*)(unsigned mask, const void* const* in, void* const* out, int param);

std::string lanes_of(unsigned m) {
  std::string s;
  for (unsigned i = 0; i < 32;) {
    if (!((m >> i) & 1u)) {
      ++i;
      continue;
    }
    unsigned j = i;
    while (j + 1 < 32 && ((m >> (j + 1)) & 1u)) ++j;
    if (!s.empty()) s += ",";
    s += std::to_string(i);
    if (j > i) s += "-" + std::to_string(j);
    i = j + 1;
  }
  return s.empty() ? "none" : s;
}

void rendezvous(int op, int param, unsigned mask, const void* in, void* out, const char* what, Compute compute) {
  Fiber& f = require_fiber(what);
  LaunchState& L = *tl_launch;
  const unsigned lane = f.linear % 32u, base = f.linear - lane;
  if (!((mask >> lane) & 1u))
    fail(std::string(what) + ": the calling lane " + std::to_string(lane) + " is not in its mask " + hex(mask));
  for (unsigned m = 0; m < 32; ++m) {
    if (!((mask >> m) & 1u)) continue;
    if (base + m >= L.nthreads)
      fail(std::string(what) + ": mask " + hex(mask) + " names lane " + std::to_string(m) + " of warp " +
           std::to_string(base / 32) + ", which does not exist (block of " + std::to_string(L.nthreads) +
           " threads)");
    if (L.fibers[base + m].state == FiberState::Exited)
      fail(std::string(what) + ": mask " + hex(mask) + " names lane " + std::to_string(m) + " (thread " +
           fmt_uint3(L.fibers[base + m].tid) + "), which has exited and can never arrive");
  }
  f.warp = WarpWait{op, mask, in, out, what};
  f.state = FiberState::Waiting;
  f.wait = WaitKind::Warp;
  for (unsigned m = 0; m < 32; ++m) {
    if (!((mask >> m) & 1u)) continue;
    const Fiber& g = L.fibers[base + m];
    if (!(g.state == FiberState::Waiting && g.wait == WaitKind::Warp && g.warp.op == op && g.warp.mask == mask)) {
      yield_to_scheduler();  // not complete: the last lane to arrive does the work
      return;
    }
  }
  const void* ins[32] = {};
  void* outs[32] = {};
  for (unsigned m = 0; m < 32; ++m) {
    if (!((mask >> m) & 1u)) continue;
    ins[m] = L.fibers[base + m].warp.in;
    outs[m] = L.fibers[base + m].warp.out;
  }
  const std::string err = compute(mask, ins, outs, param);
  for (unsigned m = 0; m < 32; ++m) {
    if (!((mask >> m) & 1u)) continue;
    Fiber& g = L.fibers[base + m];
    g.state = FiberState::Runnable;
    g.wait = WaitKind::None;
    g.warp = WarpWait{};
  }
  if (!err.empty()) fail(std::string(what) + ": " + err);
}

// ------------------------------------------------------------------ shfl
struct ShflIn {
  uint64_t bits;
  unsigned b, c;
  int mode;
};

// PTX ISA shfl.sync semantics, per lane (each lane may pass its own b).
std::string shfl_compute(unsigned mask, const void* const* in, void* const* out, int) {
  uint64_t res[32] = {};
  for (int l = 0; l < 32; ++l) {
    if (!((mask >> l) & 1u)) continue;
    const ShflIn& s = *static_cast<const ShflIn*>(in[l]);
    const int bval = static_cast<int>(s.b & 31u);
    const int cval = static_cast<int>(s.c & 31u);
    const int seg = static_cast<int>((s.c >> 8) & 31u);
    const int max_lane = (l & seg) | (cval & ~seg);
    const int min_lane = l & seg;
    int j = l;
    bool p = false;
    switch (static_cast<ShflMode>(s.mode)) {
      case ShflMode::Up: j = l - bval; p = j >= max_lane; break;
      case ShflMode::Down: j = l + bval; p = j <= max_lane; break;
      case ShflMode::Bfly: j = l ^ bval; p = j <= max_lane; break;
      case ShflMode::Idx: j = min_lane | (bval & ~seg); p = j <= max_lane; break;
    }
    if (!p) j = l;
    if (!((mask >> j) & 1u))
      return "lane " + std::to_string(l) + " reads lane " + std::to_string(j) + ", which is not in mask " +
             hex(mask) + " (undefined on the device)";
    res[l] = static_cast<const ShflIn*>(in[j])->bits;
  }
  for (int l = 0; l < 32; ++l)
    if ((mask >> l) & 1u) *static_cast<uint64_t*>(out[l]) = res[l];
  return "";
}

// ------------------------------------------------------------------ vote
std::string vote_compute(unsigned mask, const void* const* in, void* const* out, int kind) {
  unsigned ballot = 0;
  for (int l = 0; l < 32; ++l)
    if (((mask >> l) & 1u) && *static_cast<const bool*>(in[l])) ballot |= 1u << l;
  unsigned r = ballot;
  if (kind == static_cast<int>(VoteKind::Any)) r = ballot != 0;
  if (kind == static_cast<int>(VoteKind::All)) r = ballot == mask;
  for (int l = 0; l < 32; ++l)
    if ((mask >> l) & 1u) *static_cast<unsigned*>(out[l]) = r;
  return "";
}

std::string nothing_compute(unsigned, const void* const*, void* const*, int) { return ""; }

// ------------------------------------------------------------------- mma
struct MmaIn {
  uint32_t a[4];
  uint32_t b[2];
  float c[4];
};

// mma.m16n8k16 f32 += {f16,bf16} x {f16,bf16}, fragments per the PTX ISA
// ("Matrix Fragments for mma.m16n8k16 with floating point type"), with
// groupID = lane >> 2, tig = lane % 4 and the low half of a .b32 holding the
// lower-numbered element:
//   A (row): a[0] = A[g][2t..2t+1]   a[1] = A[g+8][2t..2t+1]
//            a[2] = A[g][2t+8..+9]   a[3] = A[g+8][2t+8..+9]
//   B (col): b[0] = B[2t..2t+1][g]   b[1] = B[2t+8..2t+9][g]
//   C/D:     c[0..1] = C[g][2t..2t+1]  c[2..3] = C[g+8][2t..2t+1]
// Products are exact in double; the 16 products and C are summed in double
// (C first, then k = 0..15) and rounded once to float.
std::string mma_compute(unsigned, const void* const* in, void* const* out, int bf16) {
  double A[16][16], B[16][8], C[16][8];
  auto elem = [bf16](uint32_t reg, int hi) -> double {
    const uint16_t v = static_cast<uint16_t>(hi ? reg >> 16 : reg & 0xffffu);
    return bf16 ? fp::bf16_to_f32(v) : fp::f16_to_f32(v);
  };
  for (int l = 0; l < 32; ++l) {
    const MmaIn& s = *static_cast<const MmaIn*>(in[l]);
    const int g = l >> 2, t = l & 3;
    for (int h = 0; h < 2; ++h) {
      A[g][2 * t + h] = elem(s.a[0], h);
      A[g + 8][2 * t + h] = elem(s.a[1], h);
      A[g][2 * t + 8 + h] = elem(s.a[2], h);
      A[g + 8][2 * t + 8 + h] = elem(s.a[3], h);
      B[2 * t + h][g] = elem(s.b[0], h);
      B[2 * t + 8 + h][g] = elem(s.b[1], h);
      C[g][2 * t + h] = s.c[h];
      C[g + 8][2 * t + h] = s.c[2 + h];
    }
  }
  float D[16][8];
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 8; ++n) {
      double acc = C[m][n];
      for (int k = 0; k < 16; ++k) acc += A[m][k] * B[k][n];
      D[m][n] = static_cast<float>(acc);
    }
  for (int l = 0; l < 32; ++l) {
    float* d = static_cast<float*>(out[l]);
    const int g = l >> 2, t = l & 3;
    d[0] = D[g][2 * t];
    d[1] = D[g][2 * t + 1];
    d[2] = D[g + 8][2 * t];
    d[3] = D[g + 8][2 * t + 1];
  }
  return "";
}

// -------------------------------------------------------------- ldmatrix
// ldmatrix.m8n8.b16: lane 8i+j gives the address of row j of matrix i (16
// bytes = 8 elements).  Lane l receives in register i the pair
//   no .trans: M_i[l/4][2(l%4)], M_i[l/4][2(l%4)+1]      (row l/4)
//   .trans:    M_i[2(l%4)][l/4], M_i[2(l%4)+1][l/4]      (column l/4)
// low half = first element.
std::string ldmatrix_compute(unsigned, const void* const* in, void* const* out, int param) {
  const int num = param / 2;
  const bool trans = param & 1;
  auto at = [&](int mat, int row, int col) -> uint32_t {
    const unsigned char* p = *static_cast<const unsigned char* const*>(in[8 * mat + row]);
    uint16_t v;
    std::memcpy(&v, p + 2 * col, 2);
    return v;
  };
  uint32_t res[32][4] = {};
  for (int l = 0; l < 32; ++l) {
    const int g = l >> 2, t = l & 3;
    for (int i = 0; i < num; ++i) {
      res[l][i] = trans ? (at(i, 2 * t, g) | (at(i, 2 * t + 1, g) << 16))
                        : (at(i, g, 2 * t) | (at(i, g, 2 * t + 1) << 16));
    }
  }
  for (int l = 0; l < 32; ++l) std::memcpy(out[l], res[l], sizeof(uint32_t) * num);
  return "";
}

}  // namespace

std::string warp_exit_check(const LaunchState& L, const Fiber& f) {
  const unsigned lane = f.linear % 32u, base = f.linear - lane;
  unsigned waiting = 0;
  const char* what = nullptr;
  for (unsigned m = 0; m < 32 && base + m < L.nthreads; ++m) {
    const Fiber& g = L.fibers[base + m];
    if (g.state == FiberState::Waiting && g.wait == WaitKind::Warp && ((g.warp.mask >> lane) & 1u)) {
      waiting |= 1u << m;
      what = g.warp.what;
    }
  }
  if (!waiting) return "";
  return "warp collective deadlock: thread exits while lanes " + lanes_of(waiting) + " of warp " +
         std::to_string(base / 32) + " wait for it (lane " + std::to_string(lane) + ") at " + (what ? what : "?");
}

}  // namespace detail

using namespace detail;

uint64_t shfl_bits(ShflMode mode, unsigned mask, uint64_t bits, unsigned b, int width, const char* what) {
  if (width < 1 || width > 32 || (width & (width - 1)))
    fail(std::string(what) + ": width " + std::to_string(width) + " is not a power of two in [1, 32]");
  // The c operand CUDA's intrinsics pass to shfl.sync: segment mask
  // (32 - width) in bits 12:8, clamp 0 for .up and 31 otherwise.
  const unsigned c = ((32u - static_cast<unsigned>(width)) << 8) | (mode == ShflMode::Up ? 0u : 0x1fu);
  ShflIn in{bits, b, c, static_cast<int>(mode)};
  uint64_t out = 0;
  rendezvous(kOpShfl + static_cast<int>(mode), 0, mask, &in, &out, what, &shfl_compute);
  return out;
}

unsigned vote(VoteKind kind, unsigned mask, bool pred, const char* what) {
  unsigned out = 0;
  rendezvous(kOpVote + static_cast<int>(kind), static_cast<int>(kind), mask, &pred, &out, what, &vote_compute);
  return out;
}

void syncwarp(unsigned mask) { rendezvous(kOpSyncwarp, 0, mask, nullptr, nullptr, "__syncwarp", &nothing_compute); }

unsigned activemask() {
  Fiber& f = require_fiber("__activemask");
  const LaunchState& L = *tl_launch;
  const unsigned base = f.linear - f.linear % 32u;
  unsigned m = 0;
  // Lanes that exist.  Not "lanes not yet exited": the scheduler's order
  // would then leak into the result (a lane of a converged warp can run to
  // its exit before another lane reaches __activemask()).
  for (unsigned i = 0; i < 32 && base + i < L.nthreads; ++i) m |= 1u << i;
  return m;
}

void mma_16816_impl(bool bf16, float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  MmaIn in;
  std::memcpy(in.a, a, sizeof in.a);
  in.b[0] = b0;
  in.b[1] = b1;
  std::memcpy(in.c, d, sizeof in.c);
  float out[4];
  rendezvous(kOpMma + (bf16 ? 1 : 0), bf16 ? 1 : 0, 0xffffffffu, &in, out,
             bf16 ? "mma.sync.m16n8k16.row.col.f32.bf16.bf16.f32" : "mma.sync.m16n8k16.row.col.f32.f16.f16.f32",
             &mma_compute);
  std::memcpy(d, out, sizeof out);
}

void ldmatrix_impl(int num, bool trans, uint32_t* r, const void* row) {
  static const char* const kNames[2][5] = {
      {"", "ldmatrix.m8n8.x1.b16", "ldmatrix.m8n8.x2.b16", "", "ldmatrix.m8n8.x4.b16"},
      {"", "ldmatrix.m8n8.x1.trans.b16", "ldmatrix.m8n8.x2.trans.b16", "", "ldmatrix.m8n8.x4.trans.b16"}};
  const char* what = kNames[trans ? 1 : 0][num];
  Fiber& f = require_fiber(what);
  // Only lanes 0..8*num-1 supply addresses; check them where they come from.
  if (f.linear % 32u < 8u * static_cast<unsigned>(num)) check_shared(row, 16, 16, what);
  const unsigned char* in = static_cast<const unsigned char*>(row);
  uint32_t out[4] = {};
  rendezvous(kOpLdmatrix + num * 2 + (trans ? 1 : 0), num * 2 + (trans ? 1 : 0), 0xffffffffu, &in, out, what,
             &ldmatrix_compute);
  std::memcpy(r, out, sizeof(uint32_t) * num);
}

}  // namespace effattn::emu
