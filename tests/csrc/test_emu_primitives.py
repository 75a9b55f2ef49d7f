"""The host emulator of the CUDA warp primitives (``effattn._emu``) against the PTX ISA.

An independent suite: the expected lane/register layouts come from ``tests/csrc/ptx_tables.py``, which
transcribes the PTX ISA sections (quoted there) and the CUDA C++ guide's "Warp Shuffle Functions", not
from the emulator's sources. Expected numbers come from exact arithmetic (float64 on values whose
products and sums are exact in fp32) and from torch's round-to-nearest-even conversions.

The module under test is ``effattn._emu.load()`` (a pybind11 module, built on first use); a checkout with
the emulator's sources must build it (a failure fails the tests). The ``test_table_*`` tests check the
tables themselves (coverage, agreement between sections) and need no module.
"""

from __future__ import annotations

import math
import random
import struct

import numpy as np
import pytest
import torch

from tests.csrc.ptx_tables import (
    MMA_A,
    MMA_B,
    MMA_C,
    MMA_K,
    MMA_M,
    MMA_N,
    PTX_MODE,
    WARP,
    ldmatrix_address_lanes,
    ldmatrix_coord,
    ldmatrix_source,
    shfl_c_operand,
    shfl_cuda_guide,
    shfl_ptx_source_lane,
    shfl_reference,
)

# ---------------------------------------------------------------------------------------------------
# The module under test
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def emu():
    """The emulator's module; a checkout that has its sources must build it (a failure fails, never skips)."""
    from effattn import _build, _emu

    if not _build.emu_sources():
        pytest.skip("the emulator's sources (csrc/emu) are not in this installation")
    return _emu.load()


# ---------------------------------------------------------------------------------------------------
# Bit helpers (torch's conversions are round-to-nearest-even)
# ---------------------------------------------------------------------------------------------------

_TORCH_DTYPE = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def to_bits16(values, dtype: str) -> list[int]:
    """16-bit patterns (0..0xffff) of ``values`` rounded to ``dtype`` by torch."""
    t = torch.tensor(np.asarray(values, dtype=np.float64), dtype=torch.float64).to(torch.float32)
    return [int(v) & 0xFFFF for v in t.to(_TORCH_DTYPE[dtype]).view(torch.int16).tolist()]


def bits16_to_float(bits, dtype: str) -> list[float]:
    t = torch.tensor([b - 0x10000 if b >= 0x8000 else b for b in bits], dtype=torch.int16)
    return t.view(_TORCH_DTYPE[dtype]).to(torch.float64).tolist()


def f32_bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def f32_from_bits(b: int) -> float:
    return struct.unpack("<f", struct.pack("<I", b & 0xFFFFFFFF))[0]


def as_lists(rows) -> list[list]:
    """The binding's 32 x n result as plain lists (whatever sequence type it returns)."""
    return [list(r) for r in rows]


def pack2(lo: int, hi: int) -> int:
    """A .b32 register of two 16-bit elements, "low to high": the lower-indexed element in bits 0..15."""
    assert 0 <= lo <= 0xFFFF and 0 <= hi <= 0xFFFF
    return lo | (hi << 16)


# ---------------------------------------------------------------------------------------------------
# mma operands through the tables
# ---------------------------------------------------------------------------------------------------


def pack_a(a: np.ndarray, dtype: str) -> list[list[int]]:
    """A (16x16) into 32 lanes x 4 registers by MMA_A[lane][reg][half] = (row, col)."""
    assert a.shape == (MMA_M, MMA_K)
    bits = np.array(to_bits16(a.reshape(-1), dtype)).reshape(a.shape)
    return [[pack2(int(bits[MMA_A[l][r][0]]), int(bits[MMA_A[l][r][1]])) for r in range(4)] for l in range(WARP)]


def pack_b(b: np.ndarray, dtype: str) -> list[list[int]]:
    """B (16x8, K x N) into 32 lanes x 2 registers by MMA_B[lane][reg][half] = (k, n)."""
    assert b.shape == (MMA_K, MMA_N)
    bits = np.array(to_bits16(b.reshape(-1), dtype)).reshape(b.shape)
    return [[pack2(int(bits[MMA_B[l][r][0]]), int(bits[MMA_B[l][r][1]])) for r in range(2)] for l in range(WARP)]


def pack_c(c: np.ndarray) -> list[list[float]]:
    """C (16x8) into 32 lanes x 4 .f32 registers by MMA_C[lane][reg] = (row, col)."""
    assert c.shape == (MMA_M, MMA_N)
    return [[float(c[MMA_C[l][r]]) for r in range(4)] for l in range(WARP)]


def unpack_d(d) -> np.ndarray:
    """D (32 lanes x 4) back to the 16x8 matrix by MMA_C."""
    assert len(d) == WARP and all(len(regs) == 4 for regs in d)
    out = np.full((MMA_M, MMA_N), np.nan)
    for l in range(WARP):
        for r in range(4):
            out[MMA_C[l][r]] = d[l][r]
    return out


def run_mma(emu, dtype: str, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    return unpack_d(as_lists(emu.mma_m16n8k16(dtype, pack_a(a, dtype), pack_b(b, dtype), pack_c(c))))


def exact_operands(rng: np.random.Generator):
    """A, B, C whose every product and partial sum is exact in fp32 (and A, B exact in fp16 and bf16):
    A in multiples of 1/4 in [-2, 2], B in multiples of 1/2 in [-4, 4], C in multiples of 1/8 in
    [-16, 16]. Every partial sum is a multiple of 1/8 below 2^8 in magnitude: 12 significant bits."""
    a = rng.integers(-8, 9, size=(MMA_M, MMA_K)) / 4.0
    b = rng.integers(-8, 9, size=(MMA_K, MMA_N)) / 2.0
    c = rng.integers(-128, 129, size=(MMA_M, MMA_N)) / 8.0
    return a, b, c


DTYPES = ["float16", "bfloat16"]


# ===================================================================================================
# 1. The tables themselves (no emulator needed)
# ===================================================================================================


def test_table_mma_a_covers_each_element_once():
    seen = [pos for lane in MMA_A for reg in lane for pos in reg]
    assert sorted(seen) == [(r, c) for r in range(MMA_M) for c in range(MMA_K)]


def test_table_mma_b_covers_each_element_once():
    seen = [pos for lane in MMA_B for reg in lane for pos in reg]
    assert sorted(seen) == [(k, n) for k in range(MMA_K) for n in range(MMA_N)]


def test_table_mma_c_covers_each_element_once():
    seen = [pos for lane in MMA_C for pos in lane]
    assert sorted(seen) == [(r, c) for r in range(MMA_M) for c in range(MMA_N)]


def test_table_mma_register_pairs_are_adjacent_along_k_for_a_and_b_and_n_for_c():
    # The .f16x2 pairs of A (row layout) and B (col layout) are two consecutive k; the .f32 pairs c0/c1
    # and c2/c3 are two consecutive columns: what lets a thread load/store them as one 32/64-bit word.
    for lane in range(WARP):
        for reg in range(4):
            (r0, k0), (r1, k1) = MMA_A[lane][reg]
            assert r0 == r1 and k1 == k0 + 1 and k0 % 2 == 0
        for reg in range(2):
            (k0, n0), (k1, n1) = MMA_B[lane][reg]
            assert n0 == n1 and k1 == k0 + 1 and k0 % 2 == 0
        for pair in (0, 2):
            (r0, c0), (r1, c1) = MMA_C[lane][pair], MMA_C[lane][pair + 1]
            assert r0 == r1 and c1 == c0 + 1


def test_table_mma_spot_values_from_the_figures():
    # Figures 79/81/83: lane 0 holds A(0,0..1), A(8,0..1), A(0,8..9), A(8,8..9); lane 5 (groupID 1,
    # threadID_in_group 1) holds A(1,2..3) ...; lane 31 holds A(15,14..15) last.
    assert MMA_A[0] == [[(0, 0), (0, 1)], [(8, 0), (8, 1)], [(0, 8), (0, 9)], [(8, 8), (8, 9)]]
    assert MMA_A[5] == [[(1, 2), (1, 3)], [(9, 2), (9, 3)], [(1, 10), (1, 11)], [(9, 10), (9, 11)]]
    assert MMA_A[31][3] == [(15, 14), (15, 15)]
    assert MMA_B[0] == [[(0, 0), (1, 0)], [(8, 0), (9, 0)]]
    assert MMA_B[6] == [[(4, 1), (5, 1)], [(12, 1), (13, 1)]]
    assert MMA_C[0] == [(0, 0), (0, 1), (8, 0), (8, 1)]
    assert MMA_C[31] == [(7, 6), (7, 7), (15, 6), (15, 7)]


def test_table_ldmatrix_fragment_covers_the_8x8_matrix_once():
    seen = sorted(ldmatrix_coord(lane, h) for lane in range(WARP) for h in range(2))
    assert seen == [(r, c) for r in range(8) for c in range(8)]


def test_table_ldmatrix_fragment_is_the_mma_accumulator_layout():
    # Figure 104 and Figure 83 (rows 0..7, c0/c1) describe the same thread ownership.
    for lane in range(WARP):
        assert [ldmatrix_coord(lane, h) for h in range(2)] == MMA_C[lane][:2]


def _x4_a_tile_sources():
    """Lane l points at row l % 16, column 8 * (l // 16) of a 16x16 row-major A tile: matrices 0..3 are
    the (rows 0-7, cols 0-7), (rows 8-15, cols 0-7), (rows 0-7, cols 8-15), (rows 8-15, cols 8-15)
    quadrants. Returns the tile element (row, col) each (lane, reg, half) of ldmatrix.x4 receives."""
    row_start = [(l % 16, 8 * (l // 16)) for l in range(WARP)]
    out = {}
    for lane in range(WARP):
        for reg in range(4):
            for half in range(2):
                src, off = ldmatrix_source(lane, reg, half, trans=False)
                r, c0 = row_start[src]
                out[lane, reg, half] = (r, c0 + off)
    return out


def test_table_ldmatrix_x4_of_a_row_major_tile_is_the_mma_a_fragment():
    got = _x4_a_tile_sources()
    for lane in range(WARP):
        for reg in range(4):
            for half in range(2):
                assert got[lane, reg, half] == MMA_A[lane][reg][half]


def test_table_ldmatrix_x2_trans_of_a_k_major_tile_is_the_mma_b_fragment():
    # B stored row-major as [k][n] (16 rows of 8): lanes 0..15 point at rows k = 0..15; with .trans,
    # matrix m is rows k = 8m..8m+7, and the lane gets element (k, n) = (8m + 2*tig + half, groupID).
    for lane in range(WARP):
        for reg in range(2):
            for half in range(2):
                src, off = ldmatrix_source(lane, reg, half, trans=True)
                assert (src, off) == MMA_B[lane][reg][half]  # address lane = k, element offset = n


def test_table_ldmatrix_x2_of_an_n_major_tile_is_the_mma_b_fragment():
    # B stored as B^T, [n][k] (8 rows of 16): lane l < 16 points at row n = l % 8, column 8 * (l // 8).
    for lane in range(WARP):
        for reg in range(2):
            for half in range(2):
                src, off = ldmatrix_source(lane, reg, half, trans=False)
                n, k = src % 8, 8 * (src // 8) + off
                assert (k, n) == MMA_B[lane][reg][half]


@pytest.mark.parametrize("kind", ["xor", "idx", "down", "up"])
@pytest.mark.parametrize("width", [1, 2, 4, 8, 16, 32])
def test_table_shfl_ptx_semantics_agree_with_the_cuda_guide(kind, width):
    # Offsets below 32 only: the ISA takes b[4:0], so 33 means 1 for up/down/bfly, whereas the guide's
    # prose would leave every lane unchanged for a delta of 33 (no test here relies on either).
    args = range(32) if kind in ("xor", "idx") else range(min(width + 2, 32))
    if kind == "idx":
        args = list(args) + [33, 47]  # srcLane >= 32: b[4:0] in the ISA, "srcLane modulo width" in the guide
    for arg in args:
        for lane in range(WARP):
            ptx = shfl_ptx_source_lane(PTX_MODE[kind], lane, arg, shfl_c_operand(kind, width))
            assert ptx == shfl_cuda_guide(kind, lane, arg, width), (kind, width, arg, lane)


# ===================================================================================================
# 2. mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32
# ===================================================================================================


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(4))
def test_mma_random_exact_matrices(emu, dtype, seed):
    a, b, c = exact_operands(np.random.default_rng(1000 + seed))
    expected = a @ b + c  # exact in float64, and exactly representable in fp32
    got = run_mma(emu, dtype, a, b, c)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mma_zero_a_returns_c_in_its_own_layout(emu, dtype):
    c = np.arange(MMA_M * MMA_N, dtype=np.float64).reshape(MMA_M, MMA_N) - 40.5
    got = run_mma(emu, dtype, np.zeros((MMA_M, MMA_K)), np.zeros((MMA_K, MMA_N)), c)
    np.testing.assert_array_equal(got, c)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mma_one_hot_a_pins_every_a_position(emu, dtype):
    # A = e_{i,k}; B has distinct entries: D = row k of B placed in row i, zero elsewhere.
    b = (np.arange(MMA_K * MMA_N, dtype=np.float64).reshape(MMA_K, MMA_N) + 1) / 2
    zero_c = np.zeros((MMA_M, MMA_N))
    for i in range(MMA_M):
        for k in range(MMA_K):
            a = np.zeros((MMA_M, MMA_K))
            a[i, k] = 1.0
            expected = np.zeros((MMA_M, MMA_N))
            expected[i, :] = b[k, :]
            np.testing.assert_array_equal(run_mma(emu, dtype, a, b, zero_c), expected, err_msg=f"A=e({i},{k})")


@pytest.mark.parametrize("dtype", DTYPES)
def test_mma_one_hot_b_pins_every_b_position(emu, dtype):
    # B = e_{k,j}; A has distinct entries: D = column k of A placed in column j.
    a = (np.arange(MMA_M * MMA_K, dtype=np.float64).reshape(MMA_M, MMA_K) + 1) / 4
    zero_c = np.zeros((MMA_M, MMA_N))
    for k in range(MMA_K):
        for j in range(MMA_N):
            b = np.zeros((MMA_K, MMA_N))
            b[k, j] = 1.0
            expected = np.zeros((MMA_M, MMA_N))
            expected[:, j] = a[:, k]
            np.testing.assert_array_equal(run_mma(emu, dtype, a, b, zero_c), expected, err_msg=f"B=e({k},{j})")


@pytest.mark.parametrize("dtype", DTYPES)
def test_mma_one_hot_a_times_one_hot_b_gives_one_hot_d(emu, dtype):
    # A = e_{i,k}, B = e_{k,j} -> D = e_{i,j}; and with B = e_{k',j}, k' != k, D = 0.
    zero_c = np.zeros((MMA_M, MMA_N))
    rng = random.Random(7)
    for i, k, j in [(0, 0, 0), (15, 15, 7), (7, 8, 3), (8, 7, 4)] + [
        (rng.randrange(16), rng.randrange(16), rng.randrange(8)) for _ in range(40)
    ]:
        a = np.zeros((MMA_M, MMA_K))
        a[i, k] = 1.0
        b = np.zeros((MMA_K, MMA_N))
        b[k, j] = 1.0
        expected = np.zeros((MMA_M, MMA_N))
        expected[i, j] = 1.0
        np.testing.assert_array_equal(run_mma(emu, dtype, a, b, zero_c), expected, err_msg=f"{(i, k, j)}")
        b_other = np.zeros((MMA_K, MMA_N))
        b_other[(k + 1) % MMA_K, j] = 1.0
        np.testing.assert_array_equal(run_mma(emu, dtype, a, b_other, zero_c), zero_c, err_msg=f"{(i, k, j)}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_mma_accumulates_into_c(emu, dtype):
    a, b, c = exact_operands(np.random.default_rng(99))
    d1 = run_mma(emu, dtype, a, b, c)
    d2 = run_mma(emu, dtype, a, b, d1)  # feeding D back as C, as a K loop does
    np.testing.assert_array_equal(d2, 2 * (a @ b) + c)


def test_mma_bf16_uses_bf16_bits_not_fp16_bits(emu):
    # 2^10 and 2^-10 are exact in both formats but have different bit patterns; 300.5 needs 10
    # significand bits (exact in fp16, rounded in bf16) - so a dtype mix-up cannot pass.
    a = np.zeros((MMA_M, MMA_K))
    b = np.zeros((MMA_K, MMA_N))
    a[3, 5], b[5, 2] = 1024.0, 2.0 ** -10
    a[9, 12], b[12, 6] = 300.5, 1.0
    zero_c = np.zeros((MMA_M, MMA_N))
    for dtype in DTYPES:
        a_rounded = np.array(bits16_to_float(to_bits16(a.reshape(-1), dtype), dtype)).reshape(a.shape)
        expected = a_rounded @ b
        np.testing.assert_array_equal(run_mma(emu, dtype, a, b, zero_c), expected, err_msg=dtype)
    assert bits16_to_float(to_bits16([300.5], "bfloat16"), "bfloat16") == [300.0]


# ===================================================================================================
# 3. ldmatrix.sync.aligned.m8n8.x{1,2,4}{.trans}.shared.b16
# ===================================================================================================

SMEM_ELEMS = 8192  # 16 KiB; element i holds the value i, so every value names its own address


def smem_image() -> list[int]:
    return list(range(SMEM_ELEMS))


def expected_ldmatrix(smem: list[int], row_addr: list[int], num: int, trans: bool) -> list[list[int]]:
    out = []
    for lane in range(WARP):
        regs = []
        for reg in range(num):
            halves = []
            for half in range(2):
                src_lane, offset = ldmatrix_source(lane, reg, half, trans)
                halves.append(smem[row_addr[src_lane] // 2 + offset])
            regs.append(pack2(*halves))
        out.append(regs)
    return out


def garbage_addresses(rng: random.Random, used: list[int]) -> list[int]:
    """16-byte-aligned, in-bounds row addresses not among ``used`` (for the lanes ldmatrix ignores)."""
    free = sorted(set(range(0, 2 * SMEM_ELEMS - 16 + 1, 16)) - set(used))
    return [rng.choice(free) for _ in range(WARP)]


def with_ignored_lanes(rng: random.Random, addrs: list[int], num: int) -> list[int]:
    used = ldmatrix_address_lanes(num)
    junk = garbage_addresses(rng, [addrs[l] for l in used])
    return [addrs[l] if l in used else junk[l] for l in range(WARP)]


def check_ldmatrix(emu, row_addr: list[int], num: int, trans: bool):
    assert all(a % 16 == 0 and 0 <= a <= 2 * SMEM_ELEMS - 16 for a in row_addr), "test bug: bad address"
    smem = smem_image()
    got = as_lists(emu.ldmatrix(smem, row_addr, num, trans))
    expected = expected_ldmatrix(smem, row_addr, num, trans)
    assert len(got) == WARP
    for lane in range(WARP):
        assert list(got[lane]) == expected[lane], (
            f"lane {lane}: got {[hex(v) for v in got[lane]]}, expected {[hex(v) for v in expected[lane]]}"
        )


@pytest.mark.parametrize("trans", [False, True], ids=["plain", "trans"])
@pytest.mark.parametrize("num", [1, 2, 4])
@pytest.mark.parametrize("stride_elems", [8, 16, 64, 72])
def test_ldmatrix_strided_tiles_at_aligned_offsets(emu, num, trans, stride_elems):
    # Matrix m at an arbitrary 16-byte-aligned base; row r of it at base_m + r * stride (bytes).
    rng = random.Random(num * 1000 + stride_elems * 2 + trans)
    stride = 2 * stride_elems
    span = 7 * stride + 16
    bases = [16 * rng.randrange((2 * SMEM_ELEMS - span) // 16) for _ in range(4)]
    addrs = [0] * WARP
    for m in range(4):
        for r in range(8):
            addrs[8 * m + r] = bases[m] + r * stride
    check_ldmatrix(emu, with_ignored_lanes(rng, addrs, num), num, trans)


@pytest.mark.parametrize("trans", [False, True], ids=["plain", "trans"])
@pytest.mark.parametrize("num", [1, 2, 4])
@pytest.mark.parametrize("seed", range(3))
def test_ldmatrix_scattered_rows(emu, num, trans, seed):
    # "Consecutive instances of row need not be stored contiguously in memory": every row anywhere.
    rng = random.Random(seed * 17 + num * 3 + trans)
    slots = rng.sample(range(0, 2 * SMEM_ELEMS - 16 + 1, 16), WARP)
    check_ldmatrix(emu, with_ignored_lanes(rng, slots, num), num, trans)


@pytest.mark.parametrize("num", [1, 2])
def test_ldmatrix_ignores_addresses_of_unused_lanes(emu, num):
    # Same used addresses, two different sets of junk in the ignored lanes: same result.
    rng = random.Random(5)
    base = [16 * 40 + 144 * l for l in range(WARP)]
    first = with_ignored_lanes(rng, base, num)
    second = with_ignored_lanes(rng, base, num)
    assert first != second
    smem = smem_image()
    assert as_lists(emu.ldmatrix(smem, first, num, False)) == as_lists(emu.ldmatrix(smem, second, num, False))
    check_ldmatrix(emu, first, num, False)


def test_ldmatrix_x1_spot_values(emu):
    # 8x8 tile at element 0 with row stride 8: element (r, c) has value 8r + c.
    addrs = [16 * r for r in range(8)] + [16 * 100] * 24
    got = as_lists(emu.ldmatrix(smem_image(), addrs, 1, False))
    assert got[0] == [pack2(0, 1)]
    assert got[1] == [pack2(2, 3)]
    assert got[4] == [pack2(8, 9)]
    assert got[31] == [pack2(62, 63)]
    got_t = as_lists(emu.ldmatrix(smem_image(), addrs, 1, True))
    assert got_t[0] == [pack2(0, 8)]        # (0,0), (1,0) of memory: column 0, rows 0-1
    assert got_t[1] == [pack2(16, 24)]      # rows 2-3 of column 0
    assert got_t[4] == [pack2(1, 9)]        # column 1
    assert got_t[31] == [pack2(55, 63)]     # rows 6-7 of column 7


@pytest.mark.parametrize("dtype", DTYPES)
def test_ldmatrix_feeds_mma(emu, dtype):
    # A 16x16 row-major (padded stride 24) via ldmatrix.x4, B stored [k][n] (stride 16) via .x2.trans:
    # the product must be A @ B. Pins the pairing of the two instructions' layouts as kernels use them.
    a, b, c = exact_operands(np.random.default_rng(3))
    a_bits = to_bits16(a.reshape(-1), dtype)
    b_bits = to_bits16(b.reshape(-1), dtype)
    smem = [0] * 2048
    a_base, a_stride, b_base, b_stride = 64, 24, 1024, 16
    for r in range(16):
        for col in range(16):
            smem[a_base + r * a_stride + col] = a_bits[r * 16 + col]
    for k in range(16):
        for n in range(8):
            smem[b_base + k * b_stride + n] = b_bits[k * 8 + n]
    a_addr = [2 * (a_base + (l % 16) * a_stride + 8 * (l // 16)) for l in range(WARP)]
    b_addr = [2 * (b_base + (l % 16) * b_stride) for l in range(WARP)]
    a_regs = as_lists(emu.ldmatrix(smem, a_addr, 4, False))
    b_regs = as_lists(emu.ldmatrix(smem, b_addr, 2, True))
    assert a_regs == pack_a(a, dtype)
    assert b_regs == pack_b(b, dtype)
    d = unpack_d(as_lists(emu.mma_m16n8k16(dtype, a_regs, b_regs, pack_c(c))))
    np.testing.assert_array_equal(d, a @ b + c)


# ===================================================================================================
# 4. shfl.sync / __shfl_*_sync
# ===================================================================================================


def lane_values(seed: int = 0) -> list[float]:
    """32 distinct floats, exact in fp32."""
    rng = random.Random(seed)
    return [v * 0.5 - 7.25 for v in rng.sample(range(200), WARP)]


def check_shfl(emu, kind, arg, width=32, mask=0xFFFFFFFF, seed=0):
    values = lane_values(seed)
    got = emu.shfl(kind, values, arg, width) if mask == 0xFFFFFFFF else emu.shfl(kind, values, arg, width, mask)
    expected = shfl_reference(kind, values, arg, width, mask)
    assert list(got) == expected, f"{kind} arg={arg} width={width} mask={mask:#x}"


@pytest.mark.parametrize("width", [32, 16, 8, 4])
@pytest.mark.parametrize("kind,args", [
    ("xor", [0, 1, 2, 3, 4, 7, 8, 16, 31]),
    ("idx", [0, 1, 3, 5, 7, 15, 31]),
    ("down", [0, 1, 2, 3, 4, 8, 16]),
    ("up", [0, 1, 2, 3, 4, 8, 16]),
])
def test_shfl_full_mask(emu, kind, args, width):
    # Arguments at and beyond width included: idx reads "srcLane modulo width"; up/down leave the
    # lowest/highest delta lanes of each segment unchanged; xor may read earlier groups only.
    for arg in args:
        check_shfl(emu, kind, arg, width)


def test_shfl_xor_spot_values(emu):
    v = [float(i) for i in range(WARP)]
    assert list(emu.shfl("xor", v, 1)) == [float(i ^ 1) for i in range(WARP)]
    assert list(emu.shfl("xor", v, 16)) == [float(i ^ 16) for i in range(WARP)]


def test_shfl_idx_broadcasts_within_each_segment(emu):
    v = [float(i) for i in range(WARP)]
    assert list(emu.shfl("idx", v, 2, 32)) == [2.0] * WARP
    assert list(emu.shfl("idx", v, 2, 16)) == [2.0] * 16 + [18.0] * 16   # the CUDA guide's example
    assert list(emu.shfl("idx", v, 5, 4)) == [float(4 * (i // 4) + 1) for i in range(WARP)]  # 5 mod 4


def test_shfl_down_and_up_do_not_wrap(emu):
    v = [float(i) for i in range(WARP)]
    assert list(emu.shfl("down", v, 3, 8)) == [float(i + 3) if i % 8 < 5 else float(i) for i in range(WARP)]
    assert list(emu.shfl("up", v, 2, 16)) == [float(i - 2) if i % 16 >= 2 else float(i) for i in range(WARP)]


def test_shfl_xor_lane_mask_beyond_width_reads_earlier_groups_only(emu):
    # CUDA guide: "each group of width consecutive threads are able to access elements from earlier
    # groups of threads, however if they attempt to access elements from later groups of threads their
    # own value of var will be returned." width 4, laneMask 4: lanes with bit 2 set read lane ^ 4.
    v = [float(i) for i in range(WARP)]
    assert list(emu.shfl("xor", v, 4, 4)) == [float(i ^ 4) if i & 4 else float(i) for i in range(WARP)]


@pytest.mark.parametrize("mask,args", [
    (0x0000FFFF, [1, 2, 4, 8]),
    (0xFFFF0000, [1, 2, 4, 8]),
    (0x0F0F0F0F, [1, 2, 3]),
    (0xF0F0F0F0, [1, 2, 3]),
    (0x000000FF, [1, 2, 4, 7]),
])
def test_shfl_xor_partial_mask(emu, mask, args):
    # Partners stay inside the mask; lanes outside it do not execute and keep their input.
    for arg in args:
        check_shfl(emu, "xor", arg, 32, mask)


@pytest.mark.parametrize("kind,arg", [("idx", 3), ("down", 1), ("down", 5), ("up", 1), ("up", 6), ("xor", 5)])
def test_shfl_width_16_with_low_half_mask(emu, kind, arg):
    # Only lanes 0..15 run, as one 16-wide segment: every source lies inside the mask.
    check_shfl(emu, kind, arg, 16, 0x0000FFFF)


def test_shfl_idx_partial_mask(emu):
    check_shfl(emu, "idx", 12, 16, 0x10001000 | 0x00FF00FF)  # source lanes 12 and 28 are members


def butterfly(emu, values, offsets, op, width=32):
    v = list(values)
    for off in offsets:
        other = emu.shfl("xor", v, off, width)
        v = [op(x, y) for x, y in zip(v, other)]
    return v


def test_shfl_butterfly_max_over_groups_of_four(emu):
    # The attention kernels' row max: a row of the mma accumulator lives in the 4 lanes of a group,
    # reduced with xor 1 then xor 2.
    values = lane_values(3)
    got = butterfly(emu, values, [1, 2], max)
    assert got == [max(values[4 * (l // 4):4 * (l // 4) + 4]) for l in range(WARP)]
    got_w4 = butterfly(emu, values, [1, 2], max, width=4)
    assert got_w4 == got


def test_shfl_butterfly_sum_over_groups_of_four(emu):
    values = [float(v) for v in random.Random(4).sample(range(-500, 500), WARP)]  # integer sums: exact
    got = butterfly(emu, values, [1, 2], lambda x, y: x + y)
    assert got == [sum(values[4 * (l // 4):4 * (l // 4) + 4]) for l in range(WARP)]


def test_shfl_butterfly_full_warp_sum(emu):
    values = [float(v) for v in random.Random(5).sample(range(-500, 500), WARP)]
    got = butterfly(emu, values, [16, 8, 4, 2, 1], lambda x, y: x + y)
    assert got == [sum(values)] * WARP


def test_shfl_down_tree_sum_lands_in_lane_zero(emu):
    values = [float(v) for v in range(1, WARP + 1)]
    v = list(values)
    for off in (16, 8, 4, 2, 1):
        other = emu.shfl("down", v, off)
        v = [x + y for x, y in zip(v, other)]
    assert v[0] == sum(values)


# ===================================================================================================
# 5. Conversions: round to nearest even, subnormals, inf, NaN
# ===================================================================================================


def as_f32(values) -> list[float]:
    """Python floats holding fp32 values exactly (so a float- or double-taking binding agrees)."""
    return [float(np.float32(v)) for v in values]


def is_nan_half_bits(b: int) -> bool:
    return (b & 0x7C00) == 0x7C00 and (b & 0x03FF) != 0


def is_nan_bf16_bits(b: int) -> bool:
    return (b & 0x7F80) == 0x7F80 and (b & 0x007F) != 0


def assert_bits_match(got, inputs, expected, is_nan):
    assert len(got) == len(expected)
    bad = []
    for x, g, e in zip(inputs, got, expected):
        g &= 0xFFFF
        if is_nan(e):
            if not is_nan(g):
                bad.append((x, hex(g), "NaN"))
        elif g != e:
            bad.append((x, hex(g), hex(e)))
    assert not bad, f"{len(bad)} mismatches (input, got, expected), first: {bad[:8]}"


# (input, expected fp16 bits): written out from the binary16 format, and also checked against torch.
HALF_CASES = [
    (0.0, 0x0000),
    (-0.0, 0x8000),
    (1.0, 0x3C00),
    (-2.0, 0xC000),
    (65504.0, 0x7BFF),                  # largest finite
    (65519.99, 0x7BFF),                 # (as fp32: 65519.98828125) below the halfway point to 2^16
    (65520.0, 0x7C00),                  # halfway between 65504 and 2^16: ties to even -> inf
    (-65520.0, 0xFC00),
    (70000.0, 0x7C00),                  # overflow -> inf
    (1e30, 0x7C00),
    (2.0 ** -24, 0x0001),               # smallest subnormal
    (2.0 ** -25, 0x0000),               # halfway between 0 and 2^-24: ties to even -> 0
    (-(2.0 ** -25), 0x8000),
    (3 * 2.0 ** -25, 0x0002),           # halfway between 2^-24 and 2^-23: ties to even -> 2^-23
    (2.0 ** -26, 0x0000),
    (2.0 ** -14, 0x0400),               # smallest normal
    (2.0 ** -14 - 2.0 ** -25, 0x0400),  # halfway between the largest subnormal and 2^-14 -> even
    (1023 * 2.0 ** -24, 0x03FF),        # largest subnormal
    (1 + 2.0 ** -11, 0x3C00),           # halfway between 1 and 1 + 2^-10: ties to even -> 1
    (1 + 3 * 2.0 ** -11, 0x3C02),       # halfway between 1 + 2^-10 and 1 + 2^-9: -> 1 + 2^-9
    (1 + 2.0 ** -11 + 2.0 ** -20, 0x3C01),  # just above halfway: up
    (2049.0, 0x6800),                   # halfway between 2048 and 2050: even -> 2048
    (2051.0, 0x6802),                   # halfway between 2050 and 2052: even -> 2052
    (math.inf, 0x7C00),
    (-math.inf, 0xFC00),
]

BF16_CASES = [
    (0.0, 0x0000),
    (-0.0, 0x8000),
    (1.0, 0x3F80),
    (1 + 2.0 ** -8, 0x3F80),            # halfway between 1 and 1 + 2^-7: ties to even -> 1
    (1 + 3 * 2.0 ** -8, 0x3F82),        # halfway between 1 + 2^-7 and 1 + 2^-6: -> 1 + 2^-6
    (1 + 2.0 ** -8 + 2.0 ** -20, 0x3F81),
    (65520.0, 0x4780),
    (300.5, 0x4396),                    # 300.5 -> 300 (0x4396): below halfway to 302
    (3.4028234663852886e38, 0x7F80),    # fp32 max rounds up past bf16 max -> inf
    (3.3895313892515355e38, 0x7F7F),    # bf16 max
    (2.0 ** -126, 0x0080),              # smallest normal
    (2.0 ** -133, 0x0001),              # smallest bf16 subnormal
    (2.0 ** -134, 0x0000),              # halfway between 0 and 2^-133 -> 0
    (3 * 2.0 ** -134, 0x0002),          # halfway between 2^-133 and 2^-132 -> 2^-132
    (2.0 ** -149, 0x0000),              # fp32 smallest subnormal
    (math.inf, 0x7F80),
    (-math.inf, 0xFF80),
]


def test_table_conversion_cases_agree_with_torch():
    xs = as_f32([x for x, _ in HALF_CASES])
    assert to_bits16(xs, "float16") == [e for _, e in HALF_CASES]
    xs = as_f32([x for x, _ in BF16_CASES])
    assert to_bits16(xs, "bfloat16") == [e for _, e in BF16_CASES]


def test_float_to_half_rn_hand_picked(emu):
    xs = as_f32([x for x, _ in HALF_CASES])
    assert_bits_match(emu.float_to_half_rn(xs), xs, [e for _, e in HALF_CASES], is_nan_half_bits)


def test_float_to_bf16_rn_hand_picked(emu):
    xs = as_f32([x for x, _ in BF16_CASES])
    assert_bits_match(emu.float_to_bf16_rn(xs), xs, [e for _, e in BF16_CASES], is_nan_bf16_bits)


def test_float_to_half_and_bf16_nan(emu):
    nans = [math.nan, -math.nan, f32_from_bits(0x7FC00000), f32_from_bits(0x7F800001), f32_from_bits(0xFFBFFFFF)]
    assert all(math.isnan(x) for x in nans)
    assert all(is_nan_half_bits(b & 0xFFFF) for b in emu.float_to_half_rn(nans))
    # Every NaN input gives a NaN (not inf, not a number). (Through a Python float, i.e. a double, a
    # low-payload fp32 NaN such as 0x7F800001 arrives quieted, so truncation bugs cannot be seen here.)
    assert all(is_nan_bf16_bits(b & 0xFFFF) for b in emu.float_to_bf16_rn(nans))


def random_f32(rng: np.random.Generator, n: int, exp_lo: int, exp_hi: int) -> list[float]:
    """fp32 values with random sign and mantissa, unbiased exponent uniform in [exp_lo, exp_hi]."""
    sign = rng.integers(0, 2, n, dtype=np.uint32) << 31
    expo = (rng.integers(exp_lo, exp_hi + 1, n) + 127).astype(np.uint32) << 23
    mant = rng.integers(0, 1 << 23, n, dtype=np.uint32)
    return np.array(sign | expo | mant, dtype=np.uint32).view(np.float32).astype(np.float64).tolist()


def half_ties(rng: np.random.Generator, n: int) -> list[float]:
    """Exact midpoints between adjacent finite fp16 values (exact in fp32), both signs."""
    bits = rng.integers(0, 0x7BFF, n)  # h and h + 1 both finite
    lo = np.array(bits, dtype=np.uint16).view(np.float16).astype(np.float64)
    hi = np.array(bits + 1, dtype=np.uint16).view(np.float16).astype(np.float64)
    sign = np.where(rng.integers(0, 2, n) == 1, -1.0, 1.0)
    mids = sign * (lo + hi) / 2
    assert all(float(np.float32(m)) == m for m in mids)
    return mids.tolist()


def test_float_to_half_rn_random_sweep(emu):
    rng = np.random.default_rng(2024)
    xs = random_f32(rng, 10_000, -28, 17) + half_ties(rng, 2_000) + as_f32(rng.uniform(-70000, 70000, 1000))
    assert_bits_match(emu.float_to_half_rn(xs), xs, to_bits16(xs, "float16"), is_nan_half_bits)


def test_float_to_bf16_rn_random_sweep(emu):
    rng = np.random.default_rng(2025)
    xs = random_f32(rng, 10_000, -126, 127)  # every normal fp32 exponent
    raw = rng.integers(0, 1 << 32, 3_000, dtype=np.uint64).astype(np.uint32)
    ties = (raw & np.uint32(0xFFFF0000)) | np.uint32(0x8000)  # exact bf16 midpoints, any exponent
    sub = rng.integers(0, 1 << 23, 1_000, dtype=np.uint32)     # fp32 subnormals
    with np.errstate(invalid="ignore"):  # some of the raw patterns are NaNs
        extra = np.concatenate([raw, ties, sub]).view(np.float32).astype(np.float64).tolist()
    xs = xs + extra
    assert_bits_match(emu.float_to_bf16_rn(xs), xs, to_bits16(xs, "bfloat16"), is_nan_bf16_bits)


def test_half_to_float_every_bit_pattern(emu):
    bits = list(range(0x10000))
    got = emu.half_to_float(bits)
    expected = bits16_to_float(bits, "float16")
    assert len(got) == len(expected)
    bad = [(hex(b), g, e) for b, g, e in zip(bits, got, expected)
           if not ((math.isnan(g) and math.isnan(e)) or (g == e and math.copysign(1, g) == math.copysign(1, e)))]
    assert not bad, f"{len(bad)} mismatches (bits, got, expected), first: {bad[:8]}"


def test_bf16_to_float_every_bit_pattern(emu):
    bits = list(range(0x10000))
    got = emu.bf16_to_float(bits)
    expected = [f32_from_bits(b << 16) for b in bits]  # bf16 is the top half of a binary32
    bad = [(hex(b), g, e) for b, g, e in zip(bits, got, expected)
           if not ((math.isnan(g) and math.isnan(e)) or (g == e and math.copysign(1, g) == math.copysign(1, e)))]
    assert not bad, f"{len(bad)} mismatches (bits, got, expected), first: {bad[:8]}"


def test_half_round_trip_is_identity_on_finite_values(emu):
    bits = [b for b in range(0x10000) if not ((b & 0x7C00) == 0x7C00 and (b & 0x3FF))]
    assert [b & 0xFFFF for b in emu.float_to_half_rn(emu.half_to_float(bits))] == bits


# ===================================================================================================
# 6. Scenarios: cp.async groups, memory checking, barriers, an emulated GEMM kernel
# ===================================================================================================


# Every scenario of the emulator's self-test, and what it must give: "ok", or a report (a message naming what
# went wrong: an EmuError's text, or the NaN a missing wait leaves in shared memory).
SCENARIOS_OK = {
    "cp_async": {"correct", "check_off", "empty_groups", "wait_all", "zero_fill"},
    "memcheck": {"ok", "recover", "smem_optin"},
    "barrier": {"block_reduction", "ballot", "multi_block", "partial_mask_ok", "syncwarp"},
}
SCENARIOS_REPORTED = {
    "cp_async": {"missing_wait", "early_wait", "uncommitted", "never_waited", "dst_not_shared", "misaligned_dst",
                 "misaligned_src", "src_outside_ranges", "src_overflow"},
    "memcheck": {"global_write_overflow", "global_read_overflow", "global_underflow", "global_slack_write",
                 "shared_overflow", "shared_read_overflow", "shared_underflow", "shared_uninitialised_read",
                 "cvta_outside", "exception", "smem_no_optin", "smem_over_limit", "stack_overflow"},
    "barrier": {"divergent_barrier_after_exit", "divergent_exit_while_waiting", "warp_deadlock", "warp_lane_exits",
                "shfl_reads_outside_mask"},
}
SCENARIOS = [(family, name, name in SCENARIOS_OK[family])
             for family in SCENARIOS_OK for name in sorted(SCENARIOS_OK[family] | SCENARIOS_REPORTED[family])]


@pytest.mark.parametrize("family", list(SCENARIOS_OK))
def test_every_scenario_is_classified(emu, family):
    """A scenario added to the emulator is added here too (with what it must give)."""
    assert set(emu.scenario_names(family)) == SCENARIOS_OK[family] | SCENARIOS_REPORTED[family]


@pytest.mark.parametrize("family,name,ok", SCENARIOS, ids=[f"{f}-{n}" for f, n, _ in SCENARIOS])
def test_scenario(emu, family, name, ok):
    result = getattr(emu, f"{family}_scenario")(name)
    assert isinstance(result, str) and result
    if ok:
        assert result == "ok", (name, result)
    else:
        assert result != "ok", (name, result)


@pytest.mark.parametrize("name,where", [("global_write_overflow", "0 bytes after the end"),
                                        ("global_read_overflow", "after the end"),
                                        ("global_underflow", "before the start"),
                                        ("shared_overflow", "after the end of dynamic shared memory")])
def test_memcheck_reports_like_compute_sanitizer(emu, name, where):
    """Out-of-bounds accesses are reported as compute-sanitizer's memcheck does: the access, the buffer, the
    kernel, block and thread."""
    result = emu.memcheck_scenario(name)
    assert result.startswith("EmuError: Invalid __") and where in result and "block (" in result, result


def test_emulated_gemm_kernel_matches_a_loop(emu):
    err = emu.gemm_scenario()
    assert isinstance(err, float) and math.isfinite(err) and 0.0 <= err < 1e-2, err
