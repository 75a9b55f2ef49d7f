"""Device helpers shared by the attention kernels (``flash_attn``, ``block_sparse_attn``).

Scores live in the log2 domain: the launchers pass ``qk_scale = scale * LOG2E``, so that
``exp(scale·q·k - m) = exp2(s - m2)`` with ``s = qk_scale·q·k`` and ``m2 = m * LOG2E``; the log-sum-exp
goes back to natural log (``* LN2``) when it is stored, and into the log2 domain when it is read again.

Online softmax over key tiles ``s_1, s_2, ...`` of a row block (Milakov & Gimelshein 2018; Dao et al.
2022), with running max ``m``, running sum ``l`` and accumulator ``acc``::

    m' = max(m, rowmax(s)),  p = exp2(s - m'),  alpha = exp2(m - m'),
    l' = alpha·l + rowsum(p),  acc' = alpha·acc + p V,

and at the end ``O = acc / l``, ``lse = (m + log2 l)·LN2``. A row that has seen no visible key keeps
``m = -inf`` (its exponentials are taken against 0, not ``-inf``, so nothing is NaN); if it stays so, it
is empty: ``O = 0``, ``lse = -inf``.

Every helper is a ``@triton.jit`` function, inlined where it is called: the kernels compile as if the
code stood in place.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # log2(e): natural-log scores times LOG2E are log2-domain scores
LN2 = 0.6931471805599453  # ln(2) = 1 / LOG2E: log2-domain values times LN2 are natural-log values
# The same, for device code (a @triton.jit function reads a module global only as a constexpr).
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(LN2)


# ----------------------------------------------------------------------------------------------
# tiles
# ----------------------------------------------------------------------------------------------
@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + a @ b`` in fp32; operands upcast to fp32 first when ``UPCAST`` (bf16 under the interpreter)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _head_base(X, b, h, stride_b, stride_h):
    """Pointer to the ``(T, D)`` matrix of batch ``b``, head ``h`` of a ``(B, H, T, D)`` tensor (64-bit offsets)."""
    return X + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h


@triton.jit
def _tile_ptrs(base, start, stride_t, stride_d, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
               TRANSPOSED: tl.constexpr):
    """Pointers to rows ``[start, start + BLOCK_T)`` x ``[0, BLOCK_D)`` of a ``(T, D)`` matrix, as a
    ``(BLOCK_T, BLOCK_D)`` tile or its transpose. The row offset is 64-bit: long sequences of
    strided (e.g. ``(B, T, H, D)``) tensors do not overflow."""
    base = base + tl.cast(start, tl.int64) * stride_t
    t = tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    if TRANSPOSED:
        return base + t[None, :] * stride_t + d[:, None] * stride_d
    else:
        return base + t[:, None] * stride_t + d[None, :] * stride_d


@triton.jit
def _tile_mask(start, T, DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
               TRANSPOSED: tl.constexpr):
    """In-bounds elements of the tile of :func:`_tile_ptrs`: rows below ``T``, columns below ``DIM``."""
    t_ok = start + tl.arange(0, BLOCK_T) < T
    d = tl.arange(0, BLOCK_D)
    if TRANSPOSED:
        return t_ok[None, :] & (d[:, None] < DIM)
    else:
        return t_ok[:, None] & (d[None, :] < DIM)


@triton.jit
def _load_tile(base, start, stride_t, stride_d, T, DIM: tl.constexpr, BLOCK_T: tl.constexpr,
               BLOCK_D: tl.constexpr, TRANSPOSED: tl.constexpr):
    """The tile of :func:`_tile_ptrs` of a ``(T, DIM)`` matrix, zero outside it."""
    return tl.load(_tile_ptrs(base, start, stride_t, stride_d, BLOCK_T, BLOCK_D, TRANSPOSED),
                   mask=_tile_mask(start, T, DIM, BLOCK_T, BLOCK_D, TRANSPOSED), other=0.0)


@triton.jit
def _store_tile(base, start, stride_t, stride_d, x, T, DIM: tl.constexpr, BLOCK_T: tl.constexpr,
                BLOCK_D: tl.constexpr):
    """Store the ``(BLOCK_T, BLOCK_D)`` tile ``x`` (cast to the matrix's type) at rows ``start...`` of a
    ``(T, DIM)`` matrix, the part inside it only."""
    tl.store(_tile_ptrs(base, start, stride_t, stride_d, BLOCK_T, BLOCK_D, False), x.to(base.dtype.element_ty),
             mask=_tile_mask(start, T, DIM, BLOCK_T, BLOCK_D, False))


# ----------------------------------------------------------------------------------------------
# softmax in the log2 domain
# ----------------------------------------------------------------------------------------------
@triton.jit
def _scores_log2(a, bT, qk_scale, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Log2-domain scores ``qk_scale · a @ bT`` (``qk_scale = scale * LOG2E``), fp32, before any mask."""
    return _dot(a, bT, tl.zeros([a.shape[0], bT.shape[1]], dtype=tl.float32), UPCAST, PRECISION) * qk_scale


@triton.jit
def _online_softmax(s, m_i, l_i, acc):
    """One online-softmax step over the log2-domain scores ``s`` (``-inf`` = masked) of a key tile.

    Returns ``p = exp2(s - m')``, the new running max ``m'`` and sum ``l'``, and ``acc`` rescaled to
    ``m'``; the caller adds ``p V`` to it (after dropout, if any). A row with no visible key so far
    keeps ``m = -inf``."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    return p, m_new, l_i, acc * alpha[:, None]


@triton.jit
def _softmax_epilogue(acc, l_i, m_i):
    """``O = acc / l`` and the natural-log ``lse``; an empty row (``l = 0``) gives ``O = 0``, ``lse = -inf``."""
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * _LN2)
    return out, lse


@triton.jit
def _load_row_stats(LSE, DELTA, row_base, offs_m, Tq):
    """The backward's per-row values of a row block: the log2-domain lse (``+inf`` for empty rows and
    rows past Tq, so that P = exp2(s - lse) = 0 there) and ``delta`` (0 past Tq)."""
    lse = tl.load(LSE + row_base + offs_m, mask=offs_m < Tq, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse) * _LOG2E
    delta = tl.load(DELTA + row_base + offs_m, mask=offs_m < Tq, other=0.0)
    return lse2, delta
