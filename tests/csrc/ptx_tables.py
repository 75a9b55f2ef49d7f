"""Lane/register tables of the warp primitives, transcribed from the PTX ISA and the CUDA C++ guide alone.

Nothing here is derived from the code under test (``csrc/``, ``kernels/``): each table quotes the
section of NVIDIA's *Parallel Thread Execution ISA* (PTX ISA 8.x/9.x numbering) or of the *CUDA C++
Programming Guide* it comes from, and the formula it transcribes. ``tests/csrc/test_emu_primitives.py``
checks the emulator ``effattn._emu`` against these tables, and checks the tables against each other.

Conventions (all from the sections quoted):

* ``groupID = %laneid >> 2`` and ``threadID_in_group = %laneid % 4``.
* A ``.f16x2`` / ``.bf16x2`` register holds two elements, "Elements (low to high)": element ``a_{2r}``
  in bits 0..15 of register ``r`` and ``a_{2r+1}`` in bits 16..31 (likewise for ``b``).
* Coordinates are ``(row, col)`` of the logical matrix of the ``mma`` operand: A is M x K = 16 x 16,
  B is K x N = 16 x 8, C and D are M x N = 16 x 8.
"""

from __future__ import annotations

WARP = 32


def group_id(lane: int) -> int:
    """``groupID = %laneid >> 2``."""
    return lane >> 2


def thread_id_in_group(lane: int) -> int:
    """``threadID_in_group = %laneid % 4``."""
    return lane % 4


# ---------------------------------------------------------------------------------------------------
# mma.m16n8k16, .f16 / .bf16 multiplicands, .f32 accumulators.
#
# PTX ISA 9.7.14.5.8 (9.7.13.4.8 in older editions) "Matrix Fragments for mma.m16n8k16 with floating
# point type".
# ---------------------------------------------------------------------------------------------------

def mma_a_coord(lane: int, i: int) -> tuple[int, int]:
    """(row, col) of element ``a_i`` (i = 0..7) of lane ``lane``; A is 16x16, ``.row``.

    Multiplicand A, ``.f16`` / ``.bf16``: "A vector expression containing four .f16x2 registers, with
    each register containing two .f16 / .bf16 elements from the matrix A. a0, a1, a2, a3, a4, a5, a6, a7"
    (Figure 79)::

        row =      groupID            for ai where  0 <= i < 2 || 4 <= i < 6
                  groupID + 8         Otherwise

        col =  (threadID_in_group * 2) + (i & 0x1)          for ai where i <  4
               (threadID_in_group * 2) + (i & 0x1) + 8      for ai where i >= 4
    """
    assert 0 <= lane < WARP and 0 <= i < 8
    g, t = group_id(lane), thread_id_in_group(lane)
    row = g if (0 <= i < 2 or 4 <= i < 6) else g + 8
    col = (t * 2) + (i & 0x1) if i < 4 else (t * 2) + (i & 0x1) + 8
    return row, col


def mma_b_coord(lane: int, i: int) -> tuple[int, int]:
    """(row, col) = (k, n) of element ``b_i`` (i = 0..3) of lane ``lane``; B is 16x8, ``.col``.

    Multiplicand B, ``.f16`` / ``.bf16``: "A vector expression containing two .f16x2 registers, with
    each register containing two .f16 / .bf16 elements from the matrix B. b0, b1, b2, b3" (Figure 81)::

        row =  (threadID_in_group * 2) + (i & 0x1)           for bi where i <  2
               (threadID_in_group * 2) + (i & 0x1) + 8       for bi where i >= 2

        col = groupID
    """
    assert 0 <= lane < WARP and 0 <= i < 4
    g, t = group_id(lane), thread_id_in_group(lane)
    row = (t * 2) + (i & 0x1) if i < 2 else (t * 2) + (i & 0x1) + 8
    col = g
    return row, col


def mma_c_coord(lane: int, i: int) -> tuple[int, int]:
    """(row, col) of element ``c_i`` / ``d_i`` (i = 0..3) of lane ``lane``; C and D are 16x8.

    Accumulators (C or D), ``.f32``: "A vector expression containing four .f32 registers containing
    four .f32 elements from the matrix C (or D)." c0, c1, c2, c3 (Figure 83)::

        row =      groupID                               for ci where i <  2
                 groupID + 8                             for ci where i >= 2

        col =  (threadID_in_group * 2) + (i & 0x1)        for ci where i = {0,..,3}
    """
    assert 0 <= lane < WARP and 0 <= i < 4
    g, t = group_id(lane), thread_id_in_group(lane)
    row = g if i < 2 else g + 8
    col = (t * 2) + (i & 0x1)
    return row, col


# As data: MMA_A[lane][reg][half] = (row, col), half 0 = low 16 bits. Register ``reg`` of a .f16x2
# vector holds elements a_{2*reg} (low) and a_{2*reg+1} (high): "Elements (low to high)".
MMA_A = [[[mma_a_coord(lane, 2 * reg + half) for half in range(2)] for reg in range(4)] for lane in range(WARP)]
# MMA_B[lane][reg][half] = (k, n).
MMA_B = [[[mma_b_coord(lane, 2 * reg + half) for half in range(2)] for reg in range(2)] for lane in range(WARP)]
# MMA_C[lane][reg] = (row, col); one .f32 element per register.
MMA_C = [[mma_c_coord(lane, reg) for reg in range(4)] for lane in range(WARP)]

MMA_M, MMA_N, MMA_K = 16, 8, 16


# ---------------------------------------------------------------------------------------------------
# ldmatrix.sync.aligned.m8n8.x{1,2,4}{.trans}.shared.b16
#
# PTX ISA 9.7.14.5.15 (9.7.13.4.15 in older editions) "Warp-level matrix load instruction: ldmatrix".
# ---------------------------------------------------------------------------------------------------

# "The eight addresses required for each matrix are provided by eight threads, depending upon the value
# of .num as shown in the following table. Each address corresponds to the start of a matrix row.
# Addresses addr0-addr7 correspond to the rows of the first matrix, addresses addr8-addr15 correspond
# to the rows of the second matrix, and so on."
#
#   | .num | Threads 0-7 | Threads 8-15 | Threads 16-23 | Threads 24-31 |
#   | .x1  | addr0-addr7 | -            | -             | -             |
#   | .x2  | addr0-addr7 | addr8-addr15 | -             | -             |
#   | .x4  | addr0-addr7 | addr8-addr15 | addr16-addr23 | addr24-addr31 |
#
# So row r (0..7) of matrix m (0..num-1) starts at the address held by lane 8*m + r; the addresses of
# lanes >= 8*num are not used.

def ldmatrix_address_lane(matrix: int, row: int) -> int:
    """The lane whose address is the start of row ``row`` of matrix ``matrix``."""
    assert 0 <= matrix < 4 and 0 <= row < 8
    return 8 * matrix + row


def ldmatrix_address_lanes(num: int) -> list[int]:
    """The lanes whose addresses ``ldmatrix ... .x<num>`` reads (the others are ignored)."""
    assert num in (1, 2, 4)
    return list(range(8 * num))


def ldmatrix_coord(lane: int, half: int) -> tuple[int, int]:
    """(row, col) in the 8x8 matrix of the 16-bit element in half ``half`` (0 = low) of lane ``lane``'s
    register for that matrix.

    "When reading 8x8 matrices, a group of four consecutive threads loads 16 bytes." "Each thread in a
    warp loads fragments of a row, with thread 0 receiving the first fragment in its register r, and so
    on. A group of four threads loads an entire row of the matrix as shown in Figure 104" (ldmatrix
    fragment layout for one 8x8 matrix with 16-bit elements: row i is held by threads 4i..4i+3, thread
    4i+j holding columns 2j and 2j+1, the lower column in the lower half). This is the same layout as
    the mma accumulator rows above: row = groupID, col = threadID_in_group * 2 + half.

    "When .num = .x2, the elements of the second matrix are loaded in the next destination register in
    each thread as per the layout in above table. Similarly, when .num = .x4, elements of the third and
    fourth matrices are loaded in the subsequent destination registers in each thread." So register m
    of every lane holds that lane's fragment of matrix m.
    """
    assert 0 <= lane < WARP and half in (0, 1)
    return group_id(lane), thread_id_in_group(lane) * 2 + half


def ldmatrix_source(lane: int, reg: int, half: int, trans: bool) -> tuple[int, int]:
    """(address lane, element offset in that row) of the 16-bit value landing in ``half`` of register
    ``reg`` of lane ``lane``: the value is ``smem[row_addr[address_lane] // 2 + offset]``.

    Without ``.trans``, matrix element (r, c) is element c of the row whose address lane 8*reg + r gives.

    "Optional qualifier .trans indicates that the matrix is loaded in column-major format": the eight
    addresses are then the starts of the matrix's columns, element (r, c) being element r of the
    memory row given by lane 8*reg + c; the fragment layout (Figure 104) is unchanged. So with
    ``.trans`` the lane receives the transpose of what it would otherwise receive.
    """
    r, c = ldmatrix_coord(lane, half)
    if trans:
        r, c = c, r
    return ldmatrix_address_lane(reg, r), c


# ---------------------------------------------------------------------------------------------------
# shfl.sync and CUDA's __shfl_*_sync
#
# PTX ISA 9.7.9.6 (9.7.8.6 in older editions) "Data Movement and Conversion Instructions: shfl.sync",
# Semantics:
#
#   lane[4:0]  = [Thread].laneid;  // position of thread in warp
#   bval[4:0] = b[4:0];            // source lane or lane offset (0..31)
#   cval[4:0] = c[4:0];            // clamp value
#   segmask[4:0] = c[12:8];
#   maxLane = (lane[4:0] & segmask[4:0]) | (cval[4:0] & ~segmask[4:0]);
#   minLane = (lane[4:0] & segmask[4:0]);
#   switch (.mode) {
#       case .up:    j = lane - bval; pval = (j >= maxLane); break;
#       case .down:  j = lane + bval; pval = (j <= maxLane); break;
#       case .bfly:  j = lane ^ bval; pval = (j <= maxLane); break;
#       case .idx:   j = minLane  | (bval[4:0] & ~segmask[4:0]);
#                                    pval = (j <= maxLane); break;
#   }
#   if (!pval) j = lane;  // copy from own lane
#   d = SourceA[j];       // copy input a from lane j
#
# "results are undefined if a thread sources a register from an inactive thread or a thread that is
# not in membermask" and "The behavior of shfl.sync is undefined if the executing thread is not in the
# membermask": tests only use masks whose members source from members.
# ---------------------------------------------------------------------------------------------------

PTX_MODE = {"xor": "bfly", "idx": "idx", "down": "down", "up": "up"}


def shfl_c_operand(kind: str, width: int) -> int:
    """The ``c`` operand for ``__shfl_*_sync(mask, v, arg, width)``: segment mask ``32 - width`` in bits
    12..8 (the width-aligned segment is the set of lanes sharing ``lane & segmask``) and clamp ``0x1f``
    (``up``: ``0``, because its range test is ``j >= maxLane``, the first lane of the segment).

    (This is how CUDA's headers encode ``width``; :func:`shfl_cuda_guide` states the guide's prose
    independently and a test checks the two agree for every lane, argument and width.)
    """
    assert width in (1, 2, 4, 8, 16, 32)
    seg = (WARP - width) << 8
    return seg if kind == "up" else seg | 0x1F


def shfl_ptx_source_lane(mode: str, lane: int, b: int, c: int) -> int:
    """Source lane ``j`` of lane ``lane`` for ``shfl.sync.<mode>.b32 d, a, b, c`` (own lane when
    ``pval`` is false), literally the ISA's Semantics block. ``j`` is a signed integer: ``lane - bval``
    may be negative, which fails ``j >= maxLane``."""
    bval = b & 0x1F
    cval = c & 0x1F
    segmask = (c >> 8) & 0x1F
    max_lane = (lane & segmask) | (cval & ~segmask & 0x1F)
    min_lane = lane & segmask
    if mode == "up":
        j = lane - bval
        pval = j >= max_lane
    elif mode == "down":
        j = lane + bval
        pval = j <= max_lane
    elif mode == "bfly":
        j = lane ^ bval
        pval = j <= max_lane
    elif mode == "idx":
        j = min_lane | (bval & ~segmask & 0x1F)
        pval = j <= max_lane
    else:
        raise ValueError(mode)
    return j if pval else lane


def shfl_cuda_guide(kind: str, lane: int, arg: int, width: int) -> int:
    """Source lane of ``__shfl_*_sync(mask, var, arg, width)`` by the CUDA C++ Programming Guide,
    "Warp Shuffle Functions" (own lane = own value returned):

    * ``__shfl_sync``: "returns the value of var held by the thread whose ID is given by srcLane. If
      width is less than warpSize then each subsection of the warp behaves as a separate entity with a
      starting logical lane ID of 0. If srcLane is outside the range [0:width-1], the value returned
      corresponds to the value of var held by the srcLane modulo width (i.e. within the same
      subsection)."
    * ``__shfl_up_sync``: "calculates a source lane ID by subtracting delta from the caller's lane ID
      ... each subsection of the warp behaves as a separate entity ... The source lane index will not
      wrap around the value of width, so effectively the lower delta lanes will be unchanged."
    * ``__shfl_down_sync``: "adding delta to the caller's lane ID ... the upper delta lanes will remain
      unchanged."
    * ``__shfl_xor_sync``: "performing a bitwise XOR of the caller's lane ID with laneMask ... If width
      is less than warpSize then each group of width consecutive threads are able to access elements
      from earlier groups of threads, however if they attempt to access elements from later groups of
      threads their own value of var will be returned."
    """
    base = lane - lane % width          # first lane of the caller's subsection
    logical = lane % width
    if kind == "idx":
        return base + arg % width
    if kind == "up":
        src = logical - arg
        return base + src if src >= 0 else lane
    if kind == "down":
        src = logical + arg
        return base + src if src < width else lane
    if kind == "xor":
        j = lane ^ arg
        return j if j < base + width else lane   # same or earlier group: read it; later group: own
    raise ValueError(kind)


def shfl_reference(kind: str, values: list[float], arg: int, width: int = WARP,
                   mask: int = 0xFFFFFFFF) -> list[float]:
    """Expected ``shfl(kind, values, arg, width, mask)``: member lanes read ``values[j]`` with ``j``
    from the PTX Semantics; lanes outside ``mask`` do not execute and keep their own input."""
    c = shfl_c_operand(kind, width)
    out = []
    for lane in range(WARP):
        if not (mask >> lane) & 1:
            out.append(values[lane])
            continue
        j = shfl_ptx_source_lane(PTX_MODE[kind], lane, arg, c)
        assert (mask >> j) & 1, f"test bug: lane {lane} sources lane {j}, outside mask {mask:#x}"
        out.append(values[j])
    return out
