"""Flash attention in Triton: forward and backward (Dao et al. 2022, FlashAttention-2 2023).

Exact attention computed tile by tile. The forward streams key/value blocks past a block of queries
and keeps a running row max ``m`` and row sum ``l`` (online softmax, in the exp2 domain), so the
``Tq x Tk`` score matrix never reaches memory; it writes ``O`` and the log-sum-exp ``lse``. The
backward recomputes the probabilities from ``lse``:

    P = exp(S - lse),  dV = (P∘Z)^T dO,  dP = (dO V^T)∘Z,  dS = P∘(dP - delta),
    dQ = scale·dS K,   dK = scale·dS^T Q,  delta = rowsum(dO∘O) - dlse,

with ``Z`` the scaled dropout keep mask, regenerated from the seed (Philox) rather than stored. One
kernel owns a key block and loops over the query blocks (and the query heads of its GQA group) to
produce dK and dV; another owns a query block and loops over the key blocks to produce dQ. No atomics:
the backward is deterministic.

Masking, as in :mod:`effattn.reference`: key ``j`` is visible to query ``i`` iff
``-window_left <= j - i - diag_offset <= window_right`` (negative bound = unbounded), plus an optional
bool/float ``mask`` broadcast to ``(B, Hq, Tq, Tk)`` read tile by tile. Blocks outside the window are
never visited; blocks entirely inside it skip the elementwise window and bounds checks.

Score modifiers (``HAS_SOFTCAP``, ``HAS_ALIBI``; flash-attn's ``softcap`` and ``alibi_slopes``), before
the masks: ``s = C·tanh(s / C)`` and ``s -= slope[b, h]·|pos_i - j|`` (``pos_i`` the query's key-grid
position), both in the log2 domain (``C = softcap·log2 e``); the backward recomputes ``t = tanh`` and
multiplies dS by ``1 - t^2``. Off, they compile away.

Query pooling (Funnel-Transformer, ``effattn.pooled_attention``): with ``POOL > 1`` the kernels read
unpooled queries and pool them as they load them (mean or max over windows of ``POOL`` rows, with
Funnel's [cls] handling), so no pooled copy of Q is written. Pooled row ``i`` sits at key-grid
position ``i * POOL + diag_offset`` for the window rule. The dQ kernel carries dQ of the pooled rows
back to the unpooled rows it read (mean: spread evenly; max: to the arg-max element).

Layout: one file, three layers as in the rest of effattn: ``@triton.jit`` kernels, then the launchers
``flash_attn_forward`` / ``flash_attn_backward`` that take and return tensors. The autograd glue lives
in ``effattn.flash``. The device helpers shared with the block-sparse kernels (tiles, the online-softmax
step and its epilogue, ``LOG2E`` / ``LN2``) are in :mod:`effattn.kernels._attn_common`.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from effattn import limits
from effattn.kernels._attn_common import (
    _LOG2E,
    LOG2E,
    _dot,
    _head_base,
    _load_row_stats,
    _load_tile,
    _online_softmax,
    _scores_log2,
    _softmax_epilogue,
    _store_tile,
)
from effattn.reference import QueryPool, Varlen, dropout_scale, dropout_threshold

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# EFFATTN_AUTOTUNE=0: take the first config of each head-dim class instead of benchmarking them
# all (bounded compile time, e.g. for a test run on the GPU).
AUTOTUNE = os.environ.get("EFFATTN_AUTOTUNE", "1") != "0"

MAX_HEAD_DIM = limits.TRITON_MAX_HEAD_DIM_V  # of V; Q/K go up to MAX_HEAD_DIM_QK (effattn.limits says why)
MAX_HEAD_DIM_QK = limits.TRITON_MAX_HEAD_DIM_QK
MIN_BLOCK_D = limits.MIN_DOT_SIZE  # tl.dot needs K >= 16
MASK_NONE, MASK_BOOL, MASK_FLOAT = 0, 1, 2
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Every output buffer of the launchers comes from here (tests swap in a NaN-filling allocator to
# prove that each element is written).
_alloc = torch.empty


# ----------------------------------------------------------------------------------------------
# autotuning: configs per head dim on the GPU, one small fixed config under the interpreter
# ----------------------------------------------------------------------------------------------
# Per head-dim class (the largest padded head dim it serves): (BLOCK_M, BLOCK_N, num_warps, num_stages).
HEAD_DIM_CLASSES = (64, 128, 256, 512, 1024, 2048)
# Within a class, configs are ordered by the register spills that Triton 3.9's sm_90 compile shows for
# fp16 (tests/aot_sm90.py; least first): without autotuning (EFFATTN_AUTOTUNE=0) the first that fits runs.
FWD_CONFIGS = {
    64: [(128, 64, 8, 2), (128, 32, 8, 3), (128, 32, 4, 4), (128, 64, 4, 3), (128, 128, 8, 3)],
    128: [(128, 32, 8, 3), (128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3)],
    256: [(128, 32, 8, 2), (64, 64, 8, 2), (64, 32, 4, 2)],
    # QK head dims above 256 (V at most 256): small tiles, one stage; not yet tuned on a GPU
    512: [(64, 32, 8, 1), (32, 32, 4, 1)],
    1024: [(32, 32, 8, 1), (16, 32, 4, 1)],
    2048: [(16, 16, 4, 1)],
}
BWD_KV_CONFIGS = {  # BLOCK_M = query rows streamed, BLOCK_N = keys owned
    64: [(32, 64, 8, 2), (64, 32, 8, 2), (64, 64, 8, 2), (32, 128, 4, 3)],
    128: [(32, 64, 8, 2), (32, 128, 8, 2), (64, 64, 8, 2)],
    256: [(64, 64, 8, 1), (32, 64, 8, 1), (32, 64, 8, 2)],
    512: [(32, 32, 8, 1), (16, 32, 4, 1)],
    1024: [(16, 32, 8, 1), (16, 16, 4, 1)],
    2048: [(16, 16, 4, 1)],
}
BWD_Q_CONFIGS = {  # BLOCK_M = queries owned, BLOCK_N = keys streamed
    64: [(64, 64, 8, 2), (64, 32, 8, 2), (64, 32, 4, 3), (128, 32, 4, 3)],
    128: [(64, 32, 8, 2), (128, 32, 8, 2), (64, 64, 8, 2)],
    256: [(64, 32, 8, 1), (64, 32, 8, 2), (64, 16, 4, 1)],
    512: [(32, 32, 8, 1), (16, 32, 4, 1)],
    1024: [(16, 32, 8, 1), (16, 16, 4, 1)],
    2048: [(16, 16, 4, 1)],
}
# Under the interpreter: one small, non-square config each, so that tests cover several blocks,
# ragged edges and all three loop segments at small sizes.
INTERPRET_FWD = (32, 16)
INTERPRET_BWD_KV = (16, 32)
INTERPRET_BWD_Q = (32, 16)
PREPROCESS_BLOCK_M = 64  # rows of delta = rowsum(dO * O) per program (a quarter above head dim 128)


def head_dim_class(head_dim: int) -> int:
    """The smallest head-dim class holding ``head_dim`` (the padded BLOCK_D)."""
    return min(d for d in HEAD_DIM_CLASSES if d >= head_dim)


def _autotune_configs(table, interpret_blocks):
    if INTERPRET:
        bm, bn = interpret_blocks
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=4, num_stages=1)]
    rows = dict.fromkeys(row for rows in table.values() for row in rows)  # ordered, without duplicates
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in rows]


_forced_configs: dict[str, tuple[int, int, int, int]] = {}


@contextlib.contextmanager
def forced_configs(fwd=None, bwd_kv=None, bwd_q=None):
    """Run the kernels with the given ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` configs instead of
    autotuning (None leaves a kernel autotuned): for tests of every GPU tile shape and for tuning."""
    saved = dict(_forced_configs)
    _forced_configs.update({k: v for k, v in (("fwd", fwd), ("bwd_kv", bwd_kv), ("bwd_q", bwd_q)) if v})
    try:
        yield
    finally:
        _forced_configs.clear()
        _forced_configs.update(saved)


def _launch(kernel, kind: str, table, grid, args, constexprs):
    """Launch an autotuned kernel, or with a fixed config: the forced one, or without autotuning the
    first config of the head-dim class that fits the device (e.g. float32 tiles need more shared memory)."""
    forced = _forced_configs.get(kind)
    if forced is None and (AUTOTUNE or INTERPRET):
        kernel[grid](*args, **constexprs)
        return
    candidates = [forced] if forced else table[head_dim_class(max(constexprs["BLOCK_DQK"], constexprs["BLOCK_DV"]))]
    for i, (bm, bn, warps, stages) in enumerate(candidates):
        meta = {"BLOCK_M": bm, "BLOCK_N": bn}
        try:
            kernel.fn[grid(meta)](*args, **constexprs, **meta, num_warps=warps, num_stages=stages)
            return
        except OutOfResources:
            if i == len(candidates) - 1:
                raise


def _prune_for(table):
    """Autotune pruning: keep the configs listed for the head-dim class of this call."""

    def prune(configs, named_args, **kwargs):
        if INTERPRET:
            return configs
        args = {**named_args, **kwargs}
        wanted = set(table[head_dim_class(max(args["BLOCK_DQK"], args["BLOCK_DV"]))])
        kept = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in wanted]
        return kept or configs

    return prune


_AUTOTUNE_KEY = ["BLOCK_DQK", "BLOCK_DV", "Q_BUCKET", "K_BUCKET", "MASK_KIND", "HAS_DROPOUT",
                 "HAS_WINDOW_LEFT", "HAS_WINDOW_RIGHT", "POOL", "POOL_MAX", "POOL_CLS"]
MAX_POOL_STRIDE = limits.TRITON_MAX_POOL_STRIDE  # the pooling loop is unrolled


# ----------------------------------------------------------------------------------------------
# device helpers (those the block-sparse kernels use too are in _attn_common)
# ----------------------------------------------------------------------------------------------
@triton.jit
def _q_pos(rows, diag_offset, POOL: tl.constexpr, POOL_CLS: tl.constexpr):
    """Key-grid position of query rows: ``rows * POOL + diag_offset`` (the pooled [cls] row counts as 0)."""
    pos = rows * POOL + diag_offset
    if POOL_CLS:
        pos = tl.maximum(pos, 0)
    return pos


@triton.jit
def _pool_source(rows, j, Tq, T_src, POOL: tl.constexpr, POOL_CLS: tl.constexpr):
    """Element ``j`` of the pooling window of each pooled row: (unpooled row index, in range?).

    Window of row ``i``: rows ``[i*POOL, i*POOL + POOL)`` of ``x'``, which is ``x`` itself, or with
    ``POOL_CLS`` ``[x_0] + x`` (row ``m`` of ``x'`` is row ``max(m - 1, 0)`` of ``x``); ``T_src = len(x')``.
    """
    m = rows * POOL + j
    ok = (rows < Tq) & (m < T_src)
    if POOL_CLS:
        m = tl.maximum(m - 1, 0)
    return m, ok


@triton.jit
def _load_q(q_base, m0, stride_qt, stride_qd, Tq, T_src,
            HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
            POOL: tl.constexpr, POOL_MAX: tl.constexpr, POOL_CLS: tl.constexpr):
    """Query tile of rows ``[m0, m0 + BLOCK_M)``, pooled on load when ``POOL > 1`` (zeros past Tq)."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < HEAD_DIM
    if POOL == 1:
        return _load_tile(q_base, m0, stride_qt, stride_qd, Tq, HEAD_DIM, BLOCK_M, BLOCK_D, False)
    else:
        if POOL_MAX:
            acc = tl.full([BLOCK_M, BLOCK_D], float("-inf"), dtype=tl.float32)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        count = tl.zeros([BLOCK_M], dtype=tl.float32)
        for j in tl.static_range(POOL):
            src, ok = _pool_source(offs_m, j, Tq, T_src, POOL, POOL_CLS)
            x = tl.load(q_base + src.to(tl.int64)[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                        mask=ok[:, None] & d_ok, other=0.0).to(tl.float32)
            if POOL_MAX:
                acc = tl.where(ok[:, None], tl.maximum(acc, x), acc)
            else:
                acc += x
                count += ok.to(tl.float32)
        if POOL_MAX:
            acc = tl.where((offs_m < Tq)[:, None], acc, 0.0)
        else:
            acc = acc / tl.maximum(count, 1.0)[:, None]
        return acc.to(q_base.dtype.element_ty)


@triton.jit
def _block_ranges(lo, hi, full_lo, full_hi, length, BLOCK: tl.constexpr):
    """Split the blocks of one axis (``length`` long) into masked / unmasked / masked segments.

    ``[lo, hi)``: indices some row (column) of the tile may see; ``[full_lo, full_hi)``: indices
    every one of them sees. Returns ``lo <= mid_lo <= mid_hi <= hi`` with ``lo``, ``mid_lo``,
    ``mid_hi`` multiples of ``BLOCK`` (or equal to ``hi``) and ``[mid_lo, mid_hi)`` whole blocks that
    need no elementwise window or bounds mask.
    """
    lo = tl.maximum(lo, 0)
    hi = tl.minimum(hi, length)
    lo = (lo // BLOCK) * BLOCK
    hi = tl.maximum(hi, lo)
    mid_lo = tl.minimum(tl.cdiv(tl.maximum(full_lo, lo), BLOCK) * BLOCK, hi)
    mid_hi = (tl.maximum(tl.minimum(full_hi, length), 0) // BLOCK) * BLOCK
    mid_hi = tl.minimum(tl.maximum(mid_hi, mid_lo), hi)
    return lo, mid_lo, mid_hi, hi


@triton.jit
def _segment(seg: tl.constexpr, lo, mid_lo, mid_hi, hi):
    """Bounds of loop segment ``seg``: 0 = masked leading edge, 1 = unmasked interior, 2 = masked trailing edge."""
    if seg == 0:
        return lo, mid_lo
    elif seg == 1:
        return mid_lo, mid_hi
    else:
        return mid_hi, hi


@triton.jit
def _kv_range(m0, Tq, Tk, window_left, window_right, diag_offset,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              HAS_WINDOW_LEFT: tl.constexpr, HAS_WINDOW_RIGHT: tl.constexpr,
              POOL: tl.constexpr, POOL_CLS: tl.constexpr):
    """Key blocks for the query rows ``[m0, m0 + BLOCK_M)``: (lo, mid_lo, mid_hi, hi)."""
    pos_first = _q_pos(m0, diag_offset, POOL, POOL_CLS)
    pos_last = _q_pos(tl.minimum(m0 + BLOCK_M, Tq) - 1, diag_offset, POOL, POOL_CLS)
    lo = 0
    hi = Tk
    full_lo = 0
    full_hi = Tk
    if HAS_WINDOW_LEFT:
        lo = pos_first - window_left
        full_lo = pos_last - window_left
    if HAS_WINDOW_RIGHT:
        hi = pos_last + window_right + 1
        full_hi = pos_first + window_right + 1
    return _block_ranges(lo, hi, full_lo, full_hi, Tk, BLOCK_N)


@triton.jit
def _q_range(n0, Tq, Tk, window_left, window_right, diag_offset,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             HAS_WINDOW_LEFT: tl.constexpr, HAS_WINDOW_RIGHT: tl.constexpr,
             POOL: tl.constexpr, POOL_CLS: tl.constexpr):
    """Query blocks that see some key of ``[n0, n0 + BLOCK_N)``: (lo, mid_lo, mid_hi, hi).

    With pooled queries (``POOL > 1``) and a window, every visited block is masked elementwise."""
    n_last = tl.minimum(n0 + BLOCK_N, Tk) - 1
    lo = 0
    hi = Tq
    full_lo = 0
    full_hi = Tq
    if POOL == 1:
        if HAS_WINDOW_RIGHT:
            lo = n0 - diag_offset - window_right
            full_lo = n_last - diag_offset - window_right
        if HAS_WINDOW_LEFT:
            hi = n_last - diag_offset + window_left + 1
            full_hi = n0 - diag_offset + window_left + 1
    else:
        # rows i with n0 - right <= i*POOL + diag_offset <= n_last + left (row 0 at 0 under POOL_CLS)
        if HAS_WINDOW_RIGHT:
            lo = tl.cdiv(tl.maximum(n0 - window_right - diag_offset, 0), POOL)
            if POOL_CLS:
                lo = tl.where(n0 - window_right <= 0, 0, lo)
            full_lo = Tq
        if HAS_WINDOW_LEFT:
            x = n_last + window_left - diag_offset
            hi = tl.where(x >= 0, x // POOL + 1, 0)
            if POOL_CLS:
                hi = tl.maximum(hi, 1)
            full_hi = 0
    return _block_ranges(lo, hi, full_lo, full_hi, Tq, BLOCK_M)


@triton.jit
def _window_visible(rows, cols, window_left, window_right, diag_offset, Tq, Tk,
                    HAS_WINDOW_LEFT: tl.constexpr, HAS_WINDOW_RIGHT: tl.constexpr,
                    POOL: tl.constexpr, POOL_CLS: tl.constexpr):
    """Elementwise visibility of a tile (``rows`` and ``cols`` broadcast to the tile's shape)."""
    visible = (rows < Tq) & (cols < Tk)
    d = cols - _q_pos(rows, diag_offset, POOL, POOL_CLS)
    if HAS_WINDOW_LEFT:
        visible = visible & (d >= -window_left)
    if HAS_WINDOW_RIGHT:
        visible = visible & (d <= window_right)
    return visible


@triton.jit
def _masked_scores(s, mask_base, rows, cols, stride_mi, stride_mj, Tq, Tk,
                   MASK_KIND: tl.constexpr, MASK_ROW_BCAST: tl.constexpr):
    """Apply the user mask to log2-domain scores ``s`` (tile indexed by broadcast ``rows``, ``cols``)."""
    if MASK_KIND != 0:
        if MASK_ROW_BCAST:  # e.g. a key padding mask: one row of Tk values, broadcast over the queries
            m = tl.load(mask_base + cols.to(tl.int64) * stride_mj, mask=cols < Tk, other=0)
        else:
            m = tl.load(mask_base + rows.to(tl.int64) * stride_mi + cols.to(tl.int64) * stride_mj,
                        mask=(rows < Tq) & (cols < Tk), other=0)
        if MASK_KIND == 1:
            s = tl.where(m != 0, s, float("-inf"))
        else:
            s = s + m.to(tl.float32) * _LOG2E
    return s


@triton.jit
def _dropout_keep(seed, bh, rows, cols, drop_threshold):
    """Keep mask of dropout for a tile: ``philox(seed; j, i, bh, 0)[0] >> 8 >= threshold``."""
    zero = (rows + cols) * 0
    c0 = (cols + zero).to(tl.uint32)
    c1 = (rows + zero).to(tl.uint32)
    c2 = (zero + bh).to(tl.uint32)
    c3 = zero.to(tl.uint32)
    r, _, _, _ = tl.philox(seed, c0, c1, c2, c3)
    return (r >> 8).to(tl.int32) >= drop_threshold


@triton.jit
def _tanh(x):
    """``tanh`` in fp32 from exp2: ``1 - 2 / (exp(2x) + 1)``, exactly ±1 at ±inf."""
    return 1.0 - 2.0 / (tl.math.exp2(x * (2.0 * _LOG2E)) + 1.0)


@triton.jit
def _score_mods(s, rows, cols, diag_offset, softcap2, alibi2, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                POOL: tl.constexpr, POOL_CLS: tl.constexpr):
    """Soft cap and ALiBi on log2-domain scores, before any mask: ``s = C·tanh(s / C) - a·|pos_i - j|`` with
    ``C = softcap·log2(e)``, ``a = slope·log2(e)``. Also returns the cap's derivative ``1 - tanh^2`` (the backward
    multiplies dS by it; 1 without a cap)."""
    dcap = 1.0
    if HAS_SOFTCAP:
        t = _tanh(s / softcap2)
        s = softcap2 * t
        dcap = 1.0 - t * t
    if HAS_ALIBI:
        s = s - alibi2 * tl.abs(_q_pos(rows, diag_offset, POOL, POOL_CLS) - cols).to(tl.float32)
    return s, dcap


@triton.jit
def _varlen_geometry(QSTART, QLEN, KSTART, KLEN, b, Tq, Tk, diag_offset, VARLEN: tl.constexpr):
    """``(q_start, Tq, k_start, Tk, diag_offset)`` of sequence ``b``: read from the per-sequence tables in varlen
    mode (bottom-right aligned: ``diag_offset = Tk - Tq`` of the sequence), else the call's (starts 0)."""
    if VARLEN:
        q_start = tl.load(QSTART + b).to(tl.int64)
        q_len = tl.load(QLEN + b)
        k_start = tl.load(KSTART + b).to(tl.int64)
        k_len = tl.load(KLEN + b)
        return q_start, q_len, k_start, k_len, k_len - q_len
    else:
        return tl.zeros([], dtype=tl.int64), Tq, tl.zeros([], dtype=tl.int64), Tk, diag_offset


@triton.jit
def _query_program(QSTART, QLEN, KSTART, KLEN, b, h, Hq, Tq, Tk, T_src, diag_offset, seed, VARLEN: tl.constexpr):
    """What a program over query rows of (batch ``b``, head ``h``) reads: ``(row_base, seed, bh, q_start, Tq,
    k_start, Tk, diag_offset, T_src)``, ``row_base`` the offset of its rows in ``(B, Hq, Tq)`` lse/delta. In varlen
    mode ``b`` is a sequence: its rows of the packed ``(1, Hq, total_q)`` (``Tq`` given = total_q), its keys, and
    the dropout stream of ``seed + b`` at head ``h``."""
    bh = b * Hq + h
    row_base = bh.to(tl.int64) * Tq
    if VARLEN:
        row_base = h.to(tl.int64) * Tq
        seed = seed + b
        bh = h
    q_start, Tq, k_start, Tk, diag_offset = _varlen_geometry(QSTART, QLEN, KSTART, KLEN, b, Tq, Tk, diag_offset,
                                                             VARLEN)
    if VARLEN:
        T_src = Tq
        row_base += q_start
    return row_base, seed, bh, q_start, Tq, k_start, Tk, diag_offset, T_src


@triton.jit
def _alibi_slope2(ALIBI, b, h, stride_ab, HAS_ALIBI: tl.constexpr):
    """The ALiBi slope of (batch, head) in the log2 domain (0 without ALiBi)."""
    if HAS_ALIBI:
        return tl.load(ALIBI + b.to(tl.int64) * stride_ab + h).to(tl.float32) * _LOG2E
    else:
        return 0.0


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, mask_base, offs_m, lo, hi,
               stride_kt, stride_kd, stride_vt, stride_vd, stride_mi, stride_mj,
               Tq, Tk, qk_scale, window_left, window_right, diag_offset, seed, bh, drop_threshold,
               softcap2, alibi2,
               HEAD_DIM_QK: tl.constexpr, HEAD_DIM_V: tl.constexpr,
               BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
               APPLY_WINDOW: tl.constexpr, HAS_WINDOW_LEFT: tl.constexpr, HAS_WINDOW_RIGHT: tl.constexpr,
               MASK_KIND: tl.constexpr, MASK_ROW_BCAST: tl.constexpr, HAS_DROPOUT: tl.constexpr,
               UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
               POOL: tl.constexpr, POOL_CLS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        # -- load K^T and V (rows past Tk only in masked segments) --
        kT = _load_tile(k_base, start_n, stride_kt, stride_kd, Tk, HEAD_DIM_QK, BLOCK_N, BLOCK_DQK, True)
        v = _load_tile(v_base, start_n, stride_vt, stride_vd, Tk, HEAD_DIM_V, BLOCK_N, BLOCK_DV, False)
        # -- compute qk (log2 domain), soft-cap it, add ALiBi, mask it --
        s = _scores_log2(q, kT, qk_scale, UPCAST_DOT, DOT_PRECISION)
        s, _ = _score_mods(s, offs_m[:, None], offs_n[None, :], diag_offset, softcap2, alibi2, HAS_SOFTCAP, HAS_ALIBI,
                           POOL, POOL_CLS)
        s = _masked_scores(s, mask_base, offs_m[:, None], offs_n[None, :], stride_mi, stride_mj, Tq, Tk,
                           MASK_KIND, MASK_ROW_BCAST)
        if APPLY_WINDOW:
            visible = _window_visible(offs_m[:, None], offs_n[None, :], window_left, window_right, diag_offset,
                                      Tq, Tk, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT, POOL, POOL_CLS)
            s = tl.where(visible, s, float("-inf"))
        # -- online softmax update (acc rescaled); a row with no visible key so far keeps m = -inf --
        p, m_i, l_i, acc = _online_softmax(s, m_i, l_i, acc)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m[:, None], offs_n[None, :], drop_threshold)
            p = tl.where(keep, p, 0.0)
        # -- acc += P V --
        acc = _dot(p.to(v.dtype), v, acc, UPCAST_DOT, DOT_PRECISION)
    return acc, l_i, m_i


@triton.autotune(configs=_autotune_configs(FWD_CONFIGS, INTERPRET_FWD), key=_AUTOTUNE_KEY,
                 prune_configs_by={"early_config_prune": _prune_for(FWD_CONFIGS)})
@triton.jit
def _flash_fwd_kernel(
    Q, K, V, O, LSE, MASK, ALIBI, QSTART, QLEN, KSTART, KLEN,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_mb, stride_mh, stride_mi, stride_mj,
    Hq, GROUP, Tq, Tk, T_src, qk_scale, window_left, window_right, diag_offset,
    seed, drop_threshold, drop_scale, softcap2, stride_ab, Q_BUCKET, K_BUCKET,
    HEAD_DIM_QK: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_WINDOW_LEFT: tl.constexpr, HAS_WINDOW_RIGHT: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_ROW_BCAST: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    POOL: tl.constexpr, POOL_MAX: tl.constexpr, POOL_CLS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program: BLOCK_M queries of one (batch, query head) against all the keys they may see.

    O = softmax(cap(scale·Q K^T) + alibi + mask) V, LSE = logsumexp of the same scores (natural log).
    In varlen mode the batch index is the sequence's, ``Tq`` the rows of the packed q (all sequences).
    """
    tl.static_assert(BLOCK_DQK >= 16)
    start_m = tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    off_kvh = off_h // GROUP
    m0 = start_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    lse_base, seed, bh, q_start, Tq, k_start, Tk, diag_offset, T_src = _query_program(
        QSTART, QLEN, KSTART, KLEN, off_b, off_h, Hq, Tq, Tk, T_src, diag_offset, seed, VARLEN)
    if m0 >= Tq:  # a block past its sequence's end (varlen: the grid covers the longest)
        return

    q_base = _head_base(Q, off_b, off_h, stride_qb, stride_qh) + q_start * stride_qt
    k_base = _head_base(K, off_b, off_kvh, stride_kb, stride_kh) + k_start * stride_kt
    v_base = _head_base(V, off_b, off_kvh, stride_vb, stride_vh) + k_start * stride_vt
    mask_base = _head_base(MASK, off_b, off_h, stride_mb, stride_mh)
    alibi2 = _alibi_slope2(ALIBI, off_b, off_h, stride_ab, HAS_ALIBI)

    # -- load the query tile once (pooled on load) --
    m_ok = offs_m < Tq
    q = _load_q(q_base, m0, stride_qt, stride_qd, Tq, T_src, HEAD_DIM_QK, BLOCK_M, BLOCK_DQK,
                POOL, POOL_MAX, POOL_CLS)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    # -- stream key blocks: window edges masked, interior blocks unmasked --
    lo, mid_lo, mid_hi, hi = _kv_range(m0, Tq, Tk, window_left, window_right, diag_offset, BLOCK_M, BLOCK_N,
                                       HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT, POOL, POOL_CLS)
    for seg in tl.static_range(3):
        seg_lo, seg_hi = _segment(seg, lo, mid_lo, mid_hi, hi)
        # An empty segment is skipped, not entered: where the compiler proves one empty (the leading one
        # without a left window) it folds the pipelined loop away but leaves its trailing wgmma wait, on
        # which the ptxas of CUDA 12.8/12.9 (Triton 3.6's) crashes (SIGSEGV) at head dims 16 and 32 (sm_90a).
        if seg_lo < seg_hi:
            acc, l_i, m_i = _fwd_inner(
                acc, l_i, m_i, q, k_base, v_base, mask_base, offs_m, seg_lo, seg_hi,
                stride_kt, stride_kd, stride_vt, stride_vd, stride_mi, stride_mj,
                Tq, Tk, qk_scale, window_left, window_right, diag_offset, seed, bh, drop_threshold,
                softcap2, alibi2,
                HEAD_DIM_QK, HEAD_DIM_V, BLOCK_DQK, BLOCK_DV, BLOCK_N,
                seg != 1, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT, MASK_KIND, MASK_ROW_BCAST, HAS_DROPOUT,
                UPCAST_DOT, DOT_PRECISION, POOL, POOL_CLS, HAS_SOFTCAP, HAS_ALIBI)

    # -- epilogue: normalise; an empty row gives O = 0 and lse = -inf --
    out, lse = _softmax_epilogue(acc, l_i, m_i)
    if HAS_DROPOUT:
        out = out * drop_scale
    _store_tile(_head_base(O, off_b, off_h, stride_ob, stride_oh) + q_start * stride_ot, m0, stride_ot, stride_od, out,
                Tq, HEAD_DIM_V, BLOCK_M, BLOCK_DV)
    tl.store(LSE + lse_base + offs_m, lse, mask=m_ok)


@triton.jit
def _flash_decode_kernel(
    Q, K, V, O_PART, LSE_PART, ALIBI, QSTART, QLEN, KSTART, KLEN,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    Hq, GROUP, Tq, Tk, qk_scale, window_left, window_right, softcap2, stride_ab, SPLIT_LEN, NUM_SPLITS,
    HEAD_DIM_QK: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_WINDOW_LEFT: tl.constexpr, HAS_WINDOW_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Split-KV decoding (flash-decoding): one program per (key split, head, sequence) of a varlen call whose
    sequences have at most BLOCK_M queries. It attends all the sequence's queries to the keys
    ``[split·SPLIT_LEN, (split+1)·SPLIT_LEN)`` (SPLIT_LEN a multiple of BLOCK_N, so no tile crosses splits) and
    writes that part's normalised output and lse, fp32, to ``O_PART (S, Hq, NUM_SPLITS, BLOCK_M, Dv)`` and
    ``LSE_PART (S, Hq, NUM_SPLITS, BLOCK_M)``; the launcher merges the parts by their lse."""
    split = tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    off_kvh = off_h // GROUP
    offs_m = tl.arange(0, BLOCK_M)
    q_start, Tq, k_start, Tk, diag_offset = _varlen_geometry(QSTART, QLEN, KSTART, KLEN, off_b, Tq, Tk, 0, True)
    q_base = _head_base(Q, off_b, off_h, stride_qb, stride_qh) + q_start * stride_qt
    k_base = _head_base(K, off_b, off_kvh, stride_kb, stride_kh) + k_start * stride_kt
    v_base = _head_base(V, off_b, off_kvh, stride_vb, stride_vh) + k_start * stride_vt
    alibi2 = _alibi_slope2(ALIBI, off_b, off_h, stride_ab, HAS_ALIBI)
    q = _load_tile(q_base, 0, stride_qt, stride_qd, Tq, HEAD_DIM_QK, BLOCK_M, BLOCK_DQK, False)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    # -- this split's keys, cut to the ones the rows may see (window edges masked elementwise) --
    lo, _, _, hi = _kv_range(0, Tq, Tk, window_left, window_right, diag_offset, BLOCK_M, BLOCK_N,
                             HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT, 1, False)
    s_lo = split * SPLIT_LEN
    s_hi = tl.minimum(s_lo + SPLIT_LEN, hi)
    s_lo = tl.maximum(s_lo, lo // BLOCK_N * BLOCK_N)
    if (s_lo < s_hi) & (Tq > 0):
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, Q, offs_m, s_lo, s_hi,
            stride_kt, stride_kd, stride_vt, stride_vd, 0, 0,
            Tq, Tk, qk_scale, window_left, window_right, diag_offset, 0, 0, 0, softcap2, alibi2,
            HEAD_DIM_QK, HEAD_DIM_V, BLOCK_DQK, BLOCK_DV, BLOCK_N,
            True, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT, 0, False, False, UPCAST_DOT, DOT_PRECISION, 1, False,
            HAS_SOFTCAP, HAS_ALIBI)
    out, lse = _softmax_epilogue(acc, l_i, m_i)
    part = ((off_b * Hq + off_h) * NUM_SPLITS + split).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_DV)
    tl.store(O_PART + (part * BLOCK_M + offs_m[:, None]) * BLOCK_DV + offs_d[None, :], out)
    tl.store(LSE_PART + part * BLOCK_M + offs_m, lse)


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _bwd_preprocess_kernel(O, DO, DLSE, DELTA,
                           stride_ob, stride_oh, stride_ot, stride_od,
                           stride_dob, stride_doh, stride_dot, stride_dod,
                           Hq, Tq, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
                           HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO ∘ O) - dlse, float32 ``(B, Hq, Tq)``."""
    start_m = tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    bh = off_b * Hq + off_h
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o = _load_tile(_head_base(O, off_b, off_h, stride_ob, stride_oh), start_m * BLOCK_M, stride_ot, stride_od, Tq,
                   HEAD_DIM_V, BLOCK_M, BLOCK_DV, False)
    do = _load_tile(_head_base(DO, off_b, off_h, stride_dob, stride_doh), start_m * BLOCK_M, stride_dot, stride_dod,
                    Tq, HEAD_DIM_V, BLOCK_M, BLOCK_DV, False)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + bh.to(tl.int64) * Tq + offs_m, mask=offs_m < Tq, other=0.0)
    tl.store(DELTA + bh.to(tl.int64) * Tq + offs_m, delta, mask=offs_m < Tq)


@triton.jit
def _bwd_kv_inner(dk, dv, k, v, q_base, do_base, mask_base, LSE, DELTA, row_base, offs_n, lo, hi,
                  stride_qt, stride_qd, stride_dot, stride_dod, stride_mi, stride_mj,
                  Tq, Tk, qk_scale, window_left, window_right, diag_offset, seed, bh, drop_threshold, drop_scale,
                  softcap2, alibi2,
                  HEAD_DIM_QK: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                  BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
                  APPLY_WINDOW: tl.constexpr, HAS_WINDOW_LEFT: tl.constexpr, HAS_WINDOW_RIGHT: tl.constexpr,
                  MASK_KIND: tl.constexpr, MASK_ROW_BCAST: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                  UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  T_src, POOL: tl.constexpr, POOL_MAX: tl.constexpr, POOL_CLS: tl.constexpr,
                  HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr):
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_q(q_base, start_m, stride_qt, stride_qd, Tq, T_src, HEAD_DIM_QK, BLOCK_M, BLOCK_DQK,
                    POOL, POOL_MAX, POOL_CLS)
        do = _load_tile(do_base, start_m, stride_dot, stride_dod, Tq, HEAD_DIM_V, BLOCK_M, BLOCK_DV, False)
        lse2, delta = _load_row_stats(LSE, DELTA, row_base, offs_m, Tq)
        # -- recompute P^T for this tile: (BLOCK_N, BLOCK_M) --
        sT = _scores_log2(k, tl.trans(q), qk_scale, UPCAST_DOT, DOT_PRECISION)
        sT, dcapT = _score_mods(sT, offs_m[None, :], offs_n[:, None], diag_offset, softcap2, alibi2, HAS_SOFTCAP,
                                HAS_ALIBI, POOL, POOL_CLS)
        sT = _masked_scores(sT, mask_base, offs_m[None, :], offs_n[:, None], stride_mi, stride_mj, Tq, Tk,
                            MASK_KIND, MASK_ROW_BCAST)
        if APPLY_WINDOW:
            visible = _window_visible(offs_m[None, :], offs_n[:, None], window_left, window_right, diag_offset,
                                      Tq, Tk, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT, POOL, POOL_CLS)
            sT = tl.where(visible, sT, float("-inf"))
        pT = tl.math.exp2(sT - lse2[None, :])
        # -- dV += (P∘Z)^T dO ; dP^T = V dO^T (∘Z) --
        dpT = _dot(v, tl.trans(do), tl.zeros([k.shape[0], BLOCK_M], dtype=tl.float32), UPCAST_DOT, DOT_PRECISION)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m[None, :], offs_n[:, None], drop_threshold)
            pT_drop = tl.where(keep, pT * drop_scale, 0.0)
            dpT = tl.where(keep, dpT * drop_scale, 0.0)
        else:
            pT_drop = pT
        dv = _dot(pT_drop.to(do.dtype), do, dv, UPCAST_DOT, DOT_PRECISION)
        # -- dS^T = P^T ∘ (dP^T - delta) (∘ the cap's derivative) ; dK += dS^T Q --
        dsT = pT * (dpT - delta[None, :]) * dcapT
        dk = _dot(dsT.to(q.dtype), q, dk, UPCAST_DOT, DOT_PRECISION)
    return dk, dv


@triton.autotune(configs=_autotune_configs(BWD_KV_CONFIGS, INTERPRET_BWD_KV), key=_AUTOTUNE_KEY,
                 prune_configs_by={"early_config_prune": _prune_for(BWD_KV_CONFIGS)})
@triton.jit
def _flash_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, MASK, ALIBI, QSTART, QLEN, KSTART, KLEN,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dkb, stride_dkh, stride_dkt, stride_dkd,
    stride_dvb, stride_dvh, stride_dvt, stride_dvd,
    stride_mb, stride_mh, stride_mi, stride_mj,
    Hq, Hkv, GROUP, Tq, Tk, T_src, sm_scale, qk_scale, window_left, window_right, diag_offset,
    seed, drop_threshold, drop_scale, softcap2, stride_ab, Q_BUCKET, K_BUCKET,
    HEAD_DIM_QK: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_WINDOW_LEFT: tl.constexpr, HAS_WINDOW_RIGHT: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_ROW_BCAST: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    POOL: tl.constexpr, POOL_MAX: tl.constexpr, POOL_CLS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program: dK, dV of BLOCK_N keys of one (batch, KV head), summed over its GQA query heads."""
    start_n = tl.program_id(0)
    off_kvh = tl.program_id(1)
    off_b = tl.program_id(2)
    n0 = start_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    total_q = Tq
    q_start, Tq, k_start, Tk, diag_offset = _varlen_geometry(QSTART, QLEN, KSTART, KLEN, off_b, Tq, Tk, diag_offset,
                                                             VARLEN)
    if VARLEN:
        T_src = Tq
        seed = seed + off_b
    if n0 >= Tk:  # a block past its sequence's keys (varlen)
        return

    k = _load_tile(_head_base(K, off_b, off_kvh, stride_kb, stride_kh) + k_start * stride_kt, n0, stride_kt,
                   stride_kd, Tk, HEAD_DIM_QK, BLOCK_N, BLOCK_DQK, False)
    v = _load_tile(_head_base(V, off_b, off_kvh, stride_vb, stride_vh) + k_start * stride_vt, n0, stride_vt,
                   stride_vd, Tk, HEAD_DIM_V, BLOCK_N, BLOCK_DV, False)
    dk = tl.zeros([BLOCK_N, BLOCK_DQK], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    lo, mid_lo, mid_hi, hi = _q_range(n0, Tq, Tk, window_left, window_right, diag_offset, BLOCK_M, BLOCK_N,
                                      HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT, POOL, POOL_CLS)
    for g in range(0, GROUP):
        off_h = off_kvh * GROUP + g
        bh = off_b * Hq + off_h
        q_base = _head_base(Q, off_b, off_h, stride_qb, stride_qh) + q_start * stride_qt
        do_base = _head_base(DO, off_b, off_h, stride_dob, stride_doh) + q_start * stride_dot
        mask_base = _head_base(MASK, off_b, off_h, stride_mb, stride_mh)
        alibi2 = _alibi_slope2(ALIBI, off_b, off_h, stride_ab, HAS_ALIBI)
        row_base = bh.to(tl.int64) * Tq
        if VARLEN:
            row_base = off_h.to(tl.int64) * total_q + q_start
            bh = off_h
        for seg in tl.static_range(3):
            seg_lo, seg_hi = _segment(seg, lo, mid_lo, mid_hi, hi)
            if seg_lo < seg_hi:  # as in the forward: an empty segment is skipped
                dk, dv = _bwd_kv_inner(
                    dk, dv, k, v, q_base, do_base, mask_base, LSE, DELTA, row_base, offs_n, seg_lo, seg_hi,
                    stride_qt, stride_qd, stride_dot, stride_dod, stride_mi, stride_mj,
                    Tq, Tk, qk_scale, window_left, window_right, diag_offset, seed, bh, drop_threshold, drop_scale,
                    softcap2, alibi2,
                    HEAD_DIM_QK, HEAD_DIM_V, BLOCK_DQK, BLOCK_DV, BLOCK_M,
                    seg != 1, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT, MASK_KIND, MASK_ROW_BCAST, HAS_DROPOUT,
                    UPCAST_DOT, DOT_PRECISION, T_src, POOL, POOL_MAX, POOL_CLS, HAS_SOFTCAP, HAS_ALIBI)

    dk = dk * sm_scale
    _store_tile(_head_base(DK, off_b, off_kvh, stride_dkb, stride_dkh) + k_start * stride_dkt, n0, stride_dkt,
                stride_dkd, dk, Tk, HEAD_DIM_QK, BLOCK_N, BLOCK_DQK)
    _store_tile(_head_base(DV, off_b, off_kvh, stride_dvb, stride_dvh) + k_start * stride_dvt, n0, stride_dvt,
                stride_dvd, dv, Tk, HEAD_DIM_V, BLOCK_N, BLOCK_DV)


@triton.jit
def _bwd_q_inner(dq, q, do, lse2, delta, k_base, v_base, mask_base, offs_m, lo, hi,
                 stride_kt, stride_kd, stride_vt, stride_vd, stride_mi, stride_mj,
                 Tq, Tk, qk_scale, window_left, window_right, diag_offset, seed, bh, drop_threshold, drop_scale,
                 softcap2, alibi2,
                 HEAD_DIM_QK: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                 BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
                 APPLY_WINDOW: tl.constexpr, HAS_WINDOW_LEFT: tl.constexpr, HAS_WINDOW_RIGHT: tl.constexpr,
                 MASK_KIND: tl.constexpr, MASK_ROW_BCAST: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                 UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 POOL: tl.constexpr, POOL_CLS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, start_n, stride_kt, stride_kd, Tk, HEAD_DIM_QK, BLOCK_N, BLOCK_DQK, False)
        vT = _load_tile(v_base, start_n, stride_vt, stride_vd, Tk, HEAD_DIM_V, BLOCK_N, BLOCK_DV, True)
        # -- recompute P --
        s = _scores_log2(q, tl.trans(k), qk_scale, UPCAST_DOT, DOT_PRECISION)
        s, dcap = _score_mods(s, offs_m[:, None], offs_n[None, :], diag_offset, softcap2, alibi2, HAS_SOFTCAP,
                              HAS_ALIBI, POOL, POOL_CLS)
        s = _masked_scores(s, mask_base, offs_m[:, None], offs_n[None, :], stride_mi, stride_mj, Tq, Tk,
                           MASK_KIND, MASK_ROW_BCAST)
        if APPLY_WINDOW:
            visible = _window_visible(offs_m[:, None], offs_n[None, :], window_left, window_right, diag_offset,
                                      Tq, Tk, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT, POOL, POOL_CLS)
            s = tl.where(visible, s, float("-inf"))
        p = tl.math.exp2(s - lse2[:, None])
        # -- dP = dO V^T (∘Z); dS = P ∘ (dP - delta); dQ += dS K --
        dp = _dot(do, vT, tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32), UPCAST_DOT, DOT_PRECISION)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m[:, None], offs_n[None, :], drop_threshold)
            dp = tl.where(keep, dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None]) * dcap
        dq = _dot(ds.to(k.dtype), k, dq, UPCAST_DOT, DOT_PRECISION)
    return dq


@triton.jit
def _store_dq_unpooled(dq, q_base, dq_base, offs_m, stride_qt, stride_qd, stride_dqt, stride_dqd, Tq, T_src,
                       HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                       POOL: tl.constexpr, POOL_MAX: tl.constexpr, POOL_CLS: tl.constexpr):
    """Carry dQ of pooled rows back to the unpooled rows of their windows and store it.

    Mean: each window row gets ``dq / count``; max: the first arg-max element of each column gets
    ``dq``, the others 0. Under ``POOL_CLS`` rows 0 and 1 of window 0 are both ``x_0``: its whole share
    is written once (by j = 0). Windows are disjoint, so every unpooled row is written by one program.
    """
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < HEAD_DIM
    count = tl.minimum(T_src - offs_m * POOL, POOL).to(tl.float32)
    if POOL_MAX:
        best = tl.full([BLOCK_M, BLOCK_D], float("-inf"), dtype=tl.float32)
        for j in tl.static_range(POOL):
            src, ok = _pool_source(offs_m, j, Tq, T_src, POOL, POOL_CLS)
            x = tl.load(q_base + src.to(tl.int64)[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                        mask=ok[:, None] & d_ok, other=0.0).to(tl.float32)
            best = tl.where(ok[:, None], tl.maximum(best, x), best)
        taken = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.int32)
    for j in tl.static_range(POOL):
        src, ok = _pool_source(offs_m, j, Tq, T_src, POOL, POOL_CLS)
        if POOL_MAX:
            x = tl.load(q_base + src.to(tl.int64)[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                        mask=ok[:, None] & d_ok, other=0.0).to(tl.float32)
            arg = ok[:, None] & (x == best) & (taken == 0)
            taken = tl.where(arg, 1, taken)
            g = tl.where(arg, dq, 0.0)
        else:
            share = 1.0 / tl.maximum(count, 1.0)
            if POOL_CLS:
                if j == 0:  # x_0 fills rows 0 and 1 of window 0 (one row if T_src == 1)
                    share = tl.where(offs_m == 0, tl.minimum(T_src, 2).to(tl.float32) * share, share)
            g = dq * share[:, None]
        if POOL_CLS:
            if j == 1:
                ok = ok & (offs_m != 0)
        tl.store(dq_base + src.to(tl.int64)[:, None] * stride_dqt + offs_d[None, :] * stride_dqd,
                 g.to(dq_base.dtype.element_ty), mask=ok[:, None] & d_ok)


@triton.autotune(configs=_autotune_configs(BWD_Q_CONFIGS, INTERPRET_BWD_Q), key=_AUTOTUNE_KEY,
                 prune_configs_by={"early_config_prune": _prune_for(BWD_Q_CONFIGS)})
@triton.jit
def _flash_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, MASK, ALIBI, QSTART, QLEN, KSTART, KLEN,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dqb, stride_dqh, stride_dqt, stride_dqd,
    stride_mb, stride_mh, stride_mi, stride_mj,
    Hq, GROUP, Tq, Tk, T_src, sm_scale, qk_scale, window_left, window_right, diag_offset,
    seed, drop_threshold, drop_scale, softcap2, stride_ab, Q_BUCKET, K_BUCKET,
    HEAD_DIM_QK: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_WINDOW_LEFT: tl.constexpr, HAS_WINDOW_RIGHT: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_ROW_BCAST: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    POOL: tl.constexpr, POOL_MAX: tl.constexpr, POOL_CLS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program: dQ of BLOCK_M queries of one (batch, query head), streaming the keys they see."""
    start_m = tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    off_kvh = off_h // GROUP
    m0 = start_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    row_base, seed, bh, q_start, Tq, k_start, Tk, diag_offset, T_src = _query_program(
        QSTART, QLEN, KSTART, KLEN, off_b, off_h, Hq, Tq, Tk, T_src, diag_offset, seed, VARLEN)
    if m0 >= Tq:
        return

    q_base = _head_base(Q, off_b, off_h, stride_qb, stride_qh) + q_start * stride_qt
    q = _load_q(q_base, m0, stride_qt, stride_qd, Tq, T_src, HEAD_DIM_QK, BLOCK_M, BLOCK_DQK,
                POOL, POOL_MAX, POOL_CLS)
    do = _load_tile(_head_base(DO, off_b, off_h, stride_dob, stride_doh) + q_start * stride_dot, m0, stride_dot,
                    stride_dod, Tq, HEAD_DIM_V, BLOCK_M, BLOCK_DV, False)
    lse2, delta = _load_row_stats(LSE, DELTA, row_base, offs_m, Tq)
    k_base = _head_base(K, off_b, off_kvh, stride_kb, stride_kh) + k_start * stride_kt
    v_base = _head_base(V, off_b, off_kvh, stride_vb, stride_vh) + k_start * stride_vt
    mask_base = _head_base(MASK, off_b, off_h, stride_mb, stride_mh)
    alibi2 = _alibi_slope2(ALIBI, off_b, off_h, stride_ab, HAS_ALIBI)
    dq = tl.zeros([BLOCK_M, BLOCK_DQK], dtype=tl.float32)

    lo, mid_lo, mid_hi, hi = _kv_range(m0, Tq, Tk, window_left, window_right, diag_offset, BLOCK_M, BLOCK_N,
                                       HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT, POOL, POOL_CLS)
    for seg in tl.static_range(3):
        seg_lo, seg_hi = _segment(seg, lo, mid_lo, mid_hi, hi)
        if seg_lo < seg_hi:  # as in the forward: an empty segment is skipped
            dq = _bwd_q_inner(
                dq, q, do, lse2, delta, k_base, v_base, mask_base, offs_m, seg_lo, seg_hi,
                stride_kt, stride_kd, stride_vt, stride_vd, stride_mi, stride_mj,
                Tq, Tk, qk_scale, window_left, window_right, diag_offset, seed, bh, drop_threshold, drop_scale,
                softcap2, alibi2,
                HEAD_DIM_QK, HEAD_DIM_V, BLOCK_DQK, BLOCK_DV, BLOCK_N,
                seg != 1, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT, MASK_KIND, MASK_ROW_BCAST, HAS_DROPOUT,
                UPCAST_DOT, DOT_PRECISION, POOL, POOL_CLS, HAS_SOFTCAP, HAS_ALIBI)

    dq = dq * sm_scale
    dq_base = _head_base(DQ, off_b, off_h, stride_dqb, stride_dqh) + q_start * stride_dqt
    if POOL == 1:
        _store_tile(dq_base, m0, stride_dqt, stride_dqd, dq, Tq, HEAD_DIM_QK, BLOCK_M, BLOCK_DQK)
    else:
        _store_dq_unpooled(dq, q_base, dq_base, offs_m, stride_qt, stride_qd, stride_dqt, stride_dqd, Tq, T_src,
                           HEAD_DIM_QK, BLOCK_M, BLOCK_DQK, POOL, POOL_MAX, POOL_CLS)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
def _block_d(head_dim: int) -> int:
    return max(MIN_BLOCK_D, triton.next_power_of_2(head_dim))


def _bucket(length: int) -> int:
    """Autotuning key for a sequence length: its power-of-two ceiling."""
    return triton.next_power_of_2(max(1, length))


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's matmul precision setting (IEEE unless TF32 is allowed)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _mask_args(mask: torch.Tensor | None, shape: tuple[int, int, int, int], dummy: torch.Tensor):
    """(tensor, strides (b, h, i, j), MASK_KIND, MASK_ROW_BCAST) for the kernels."""
    if mask is None:
        return dummy, (0, 0, 0, 0), MASK_NONE, False
    m = mask.expand(shape)
    kind = MASK_BOOL if m.dtype == torch.bool else MASK_FLOAT
    if kind == MASK_BOOL:
        m = m.view(torch.uint8)
    strides = m.stride()
    return m, strides, kind, strides[2] == 0


def _alibi_args(alibi_slopes: torch.Tensor | None, dummy: torch.Tensor):
    """(tensor, batch stride) of the ALiBi slopes ``(B, Hq)`` (contiguous over heads) for the kernels."""
    if alibi_slopes is None:
        return dummy, 0
    if alibi_slopes.stride(-1) != 1:
        raise ValueError("alibi_slopes must be contiguous over heads")
    return alibi_slopes, alibi_slopes.stride(0)


def _varlen_args(varlen: Varlen | None, dummy: torch.Tensor) -> tuple:
    return (dummy,) * 4 if varlen is None else (varlen.q_start, varlen.q_len, varlen.k_start, varlen.k_len)


def _strides(x: torch.Tensor, varlen: Varlen | None) -> tuple:
    """Strides of a (B, H, T, D) operand; in varlen mode a packed one (B = 1) reads batch stride 0, so that
    every sequence starts from the packed tensor's row 0 (plus its start)."""
    st = x.stride()
    return (0, *st[1:]) if varlen is not None and x.shape[0] == 1 else st


def _grid_rows(T: int, varlen: Varlen | None, use_max_k: bool = False) -> tuple[int, int]:
    """(rows of the grid's first axis, batch axis): the call's length and batch, or the longest sequence and the
    number of sequences."""
    if varlen is None:
        return T, None
    return (varlen.max_k if use_max_k else varlen.max_q), varlen.num_seqs


def _common_constexprs(q, k, v, window_left, window_right, mask_kind, mask_row_bcast, dropout_p,
                       pool: QueryPool | None, softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None,
                       varlen: Varlen | None = None):
    return dict(
        VARLEN=varlen is not None,
        HAS_SOFTCAP=softcap > 0.0, HAS_ALIBI=alibi_slopes is not None,
        POOL=pool.stride if pool else 1, POOL_MAX=bool(pool and pool.mode == "max"),
        POOL_CLS=bool(pool and pool.separate_cls),
        HEAD_DIM_QK=q.shape[-1], HEAD_DIM_V=v.shape[-1],
        BLOCK_DQK=_block_d(q.shape[-1]), BLOCK_DV=_block_d(v.shape[-1]),
        HAS_WINDOW_LEFT=window_left >= 0, HAS_WINDOW_RIGHT=window_right >= 0,
        MASK_KIND=mask_kind, MASK_ROW_BCAST=mask_row_bcast, HAS_DROPOUT=dropout_p > 0.0,
        UPCAST_DOT=INTERPRET and q.dtype == torch.bfloat16,
        DOT_PRECISION=_dot_precision(q.dtype),
    )


def _on_tensor_device(launcher):
    """Run a launcher with its first tensor's CUDA device current (Triton launches on the current device)."""

    @functools.wraps(launcher)
    def wrapper(first, *args, **kwargs):
        if first.is_cuda:
            with torch.cuda.device(first.device):
                return launcher(first, *args, **kwargs)
        return launcher(first, *args, **kwargs)

    return wrapper


# Split-KV decoding (flash-decoding) for varlen calls of short query sequences against long keys: at most
# DECODE_MAX_Q queries per sequence; splits of at least DECODE_MIN_SPLIT keys, enough to give every SM
# DECODE_PROGRAMS_PER_SM programs. Tiles (BLOCK_N, warps, stages) per head-dim class: the largest without register
# spills in Triton 3.9's sm_90 compile of 16 query rows (not yet timed on a GPU).
DECODE_MAX_Q = 16
DECODE_MIN_SPLIT = 256
DECODE_PROGRAMS_PER_SM = 4
DECODE_TILE = {64: (32, 4, 2), 128: (64, 8, 2), 256: (32, 8, 1), 512: (16, 4, 1), 1024: (16, 4, 1), 2048: (16, 4, 1)}
INTERPRET_DECODE_BLOCK_N = 16
_forced_splits: list[int] = []


@contextlib.contextmanager
def forced_splits(n: int):
    """Run varlen forwards with ``n`` key splits (1: no split-KV path), as tests do under the interpreter."""
    _forced_splits.append(n)
    try:
        yield
    finally:
        _forced_splits.pop()


def decode_splits(varlen: Varlen, heads: int, dropout_p: float, device: torch.device) -> int:
    """Key splits of a varlen forward: 1 (the ordinary kernel) unless the sequences are short and the keys long
    enough that the ordinary grid (one program per (query block, head, sequence)) would leave SMs idle."""
    if varlen is None or dropout_p > 0.0 or varlen.max_q > DECODE_MAX_Q:
        return 1
    if _forced_splits:
        return _forced_splits[-1]
    if INTERPRET or device.type != "cuda":
        return 1
    programs = heads * varlen.num_seqs
    target = DECODE_PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(target, programs), varlen.max_k // DECODE_MIN_SPLIT))


def _decode_forward(q, k, v, out, lse, varlen: Varlen, splits: int, *, scale, window_left, window_right, softcap,
                    alibi_slopes):
    """Split-KV forward of a varlen call into ``out (1, Hq, total_q, Dv)`` and ``lse (1, Hq, total_q)``: the parts
    of :func:`_flash_decode_kernel`, merged as ``out = sum_s exp(lse_s - lse) out_s``, ``lse = logsumexp_s lse_s``."""
    Hq, Hkv, Dv = q.shape[1], k.shape[1], v.shape[-1]
    S = varlen.num_seqs
    block_m = max(MIN_BLOCK_D, triton.next_power_of_2(varlen.max_q))
    block_dqk, block_dv = _block_d(q.shape[-1]), _block_d(Dv)
    block_n, warps, stages = DECODE_TILE[head_dim_class(max(block_dqk, block_dv))]
    if INTERPRET:
        block_n = INTERPRET_DECODE_BLOCK_N
    split_len = triton.cdiv(triton.cdiv(varlen.max_k, splits), block_n) * block_n
    o_part = torch.empty(S, Hq, splits, block_m, block_dv, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(S, Hq, splits, block_m, dtype=torch.float32, device=q.device)
    alibi, stride_ab = _alibi_args(alibi_slopes, lse)
    _flash_decode_kernel[(splits, Hq, S)](
        q, k, v, o_part, lse_part, alibi, *_varlen_args(varlen, lse),
        *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen),
        Hq, Hq // Hkv, q.shape[2], k.shape[2], scale * LOG2E, window_left, window_right, softcap * LOG2E, stride_ab,
        split_len, splits,
        HEAD_DIM_QK=q.shape[-1], HEAD_DIM_V=Dv, BLOCK_DQK=block_dqk, BLOCK_DV=block_dv,
        HAS_WINDOW_LEFT=window_left >= 0, HAS_WINDOW_RIGHT=window_right >= 0, HAS_SOFTCAP=softcap > 0.0,
        HAS_ALIBI=alibi_slopes is not None, UPCAST_DOT=INTERPRET and q.dtype == torch.bfloat16,
        DOT_PRECISION=_dot_precision(q.dtype), BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
    # -- merge the splits; scatter the rows of each sequence back into the packed layout --
    lse_all = torch.logsumexp(lse_part, dim=2)  # (S, Hq, BM); -inf for a row no split saw
    weight = torch.exp(lse_part - torch.where(torch.isinf(lse_all), 0.0, lse_all)[:, :, None])
    merged = (weight[..., None] * o_part).sum(2)[..., :Dv]  # (S, Hq, BM, Dv)
    rows = varlen.q_start.long()[:, None] + torch.arange(block_m, device=q.device)
    valid = torch.arange(block_m, device=q.device)[None, :] < varlen.q_len[:, None]
    out[0].permute(1, 0, 2)[rows[valid]] = merged.permute(0, 2, 1, 3)[valid].to(out.dtype)
    lse[0].permute(1, 0)[rows[valid]] = lse_all.permute(0, 2, 1)[valid]


@_on_tensor_device
def flash_attn_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, *,
                       scale: float, window_left: int = -1, window_right: int = -1, diag_offset: int = 0,
                       dropout_p: float = 0.0, seed: int = 0, pool: QueryPool | None = None,
                       softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None,
                       varlen: Varlen | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. Inputs are validated by the caller.

    q ``(B, Hq, T, Dqk)``, k ``(B, Hkv, Tk, Dqk)``, v ``(B, Hkv, Tk, Dv)``, any strides;
    mask None or bool/float broadcastable to ``(B, Hq, Tq, Tk)``. With ``pool`` the queries are
    pooled on load and ``Tq = pool.pooled_len(T)``, else ``Tq = T``. ``softcap`` (0: none) and
    ``alibi_slopes`` (``(B, Hq)``, contiguous) as in :func:`effattn.reference.attention_forward`.
    ``varlen`` (:class:`Varlen`): q is the packed ``(1, Hq, total_q, D)`` view of a ``(total_q, Hq, D)`` tensor and
    out, lse come as ``(1, Hq, total_q, Dv)`` (a view of a contiguous ``(total_q, Hq, Dv)``) and ``(1, Hq, total_q)``.
    Returns ``out (B, Hq, Tq, Dv)`` (q's dtype, contiguous) and ``lse (B, Hq, Tq)`` float32.
    """
    B, Hq, T, _ = q.shape
    Tq, T_src = (pool.pooled_len(T), pool.source_len(T)) if pool else (T, T)
    Hkv, Tk = k.shape[1], k.shape[2]
    if varlen is None:
        out = _alloc(B, Hq, Tq, v.shape[-1], dtype=q.dtype, device=q.device)
    else:  # rows (total_q, Hq, Dv), as flash-attn returns them
        out = _alloc(Tq, Hq, v.shape[-1], dtype=q.dtype, device=q.device).permute(1, 0, 2).unsqueeze(0)
    lse = _alloc(B, Hq, Tq, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    splits = decode_splits(varlen, Hq, dropout_p, q.device)
    if splits > 1:
        _decode_forward(q, k, v, out, lse, varlen, splits, scale=scale, window_left=window_left,
                        window_right=window_right, softcap=softcap, alibi_slopes=alibi_slopes)
        return out, lse
    m, m_strides, mask_kind, row_bcast = _mask_args(mask, (B, Hq, Tq, Tk), q)
    rows, batches = _grid_rows(Tq, varlen)
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), Hq, batches or B)  # noqa: E731
    alibi, stride_ab = _alibi_args(alibi_slopes, lse)
    args = (q, k, v, out, lse, m, alibi, *_varlen_args(varlen, lse),
            *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(out, varlen), *m_strides,
            Hq, Hq // Hkv, Tq, Tk, T_src, scale * LOG2E, window_left, window_right, diag_offset,
            seed, dropout_threshold(dropout_p), dropout_scale(dropout_p), softcap * LOG2E, stride_ab,
            _bucket(rows), _bucket(_grid_rows(Tk, varlen, use_max_k=True)[0]))
    _launch(_flash_fwd_kernel, "fwd", FWD_CONFIGS, grid, args,
            _common_constexprs(q, k, v, window_left, window_right, mask_kind, row_bcast, dropout_p, pool, softcap,
                               alibi_slopes, varlen))
    return out, lse


@_on_tensor_device
def flash_attn_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                        lse: torch.Tensor, mask: torch.Tensor | None, dlse: torch.Tensor | None = None, *,
                        scale: float, window_left: int = -1, window_right: int = -1, diag_offset: int = 0,
                        dropout_p: float = 0.0, seed: int = 0, pool: QueryPool | None = None,
                        softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None,
                        varlen: Varlen | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernels (preprocess, dK/dV, dQ). Same arguments as the forward, plus
    ``dout (B, Hq, Tq, Dv)``, the forward's ``out`` and ``lse``, and optionally ``dlse (B, Hq, Tq)``.
    Returns ``dq, dk, dv`` shaped and typed like q, k, v (contiguous); with ``pool``, ``dq`` is the
    gradient of the unpooled q (rows that feed no pooled row, cut by truncation, get 0). With ``varlen`` the
    gradients are views of contiguous tensors in the packed (or cache) layouts, cache slots past a sequence's
    keys 0."""
    B, Hq, T, _ = q.shape
    Tq, T_src = (pool.pooled_len(T), pool.source_len(T)) if pool else (T, T)
    Hkv, Tk = k.shape[1], k.shape[2]
    if varlen is None:
        dq = _alloc(q.shape, dtype=q.dtype, device=q.device)
        dk = _alloc(k.shape, dtype=k.dtype, device=k.device)
        dv = _alloc(v.shape, dtype=v.dtype, device=v.device)
    else:  # in the layouts of the 3-D / cache tensors that q, k, v view
        dq, dk, dv = (_alloc(x.shape[0], x.shape[2], x.shape[1], x.shape[3], dtype=x.dtype,
                             device=x.device).permute(0, 2, 1, 3) for x in (q, k, v))
        if k.shape[0] > 1:  # a cache: slots past each sequence's keys get no gradient
            dk.zero_()
            dv.zero_()
    if Tq == 0 or Tk == 0 or B * Hq == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    if pool is not None:
        dq[:, :, pool.covered_rows(T):].zero_()
    lse = lse.contiguous()
    delta = _alloc(B, Hq, Tq, dtype=torch.float32, device=q.device)
    preprocess_block = PREPROCESS_BLOCK_M if v.shape[-1] <= 128 else PREPROCESS_BLOCK_M // 4
    block_dv = _block_d(v.shape[-1])
    _bwd_preprocess_kernel[(triton.cdiv(Tq, preprocess_block), Hq, B)](
        out, dout, dlse.contiguous() if dlse is not None else delta, delta,
        *out.stride(), *dout.stride(), Hq, Tq,
        HEAD_DIM_V=v.shape[-1], BLOCK_DV=block_dv, HAS_DLSE=dlse is not None, BLOCK_M=preprocess_block,
    )
    m, m_strides, mask_kind, row_bcast = _mask_args(mask, (B, Hq, Tq, Tk), q)
    constexprs = _common_constexprs(q, k, v, window_left, window_right, mask_kind, row_bcast, dropout_p, pool, softcap,
                                    alibi_slopes, varlen)
    alibi, stride_ab = _alibi_args(alibi_slopes, delta)
    rows_q, batches = _grid_rows(Tq, varlen)
    rows_k, _ = _grid_rows(Tk, varlen, use_max_k=True)
    runtime = (scale, scale * LOG2E, window_left, window_right, diag_offset,
               seed, dropout_threshold(dropout_p), dropout_scale(dropout_p), softcap * LOG2E, stride_ab,
               _bucket(rows_q), _bucket(rows_k))
    seqs = _varlen_args(varlen, delta)
    st = functools.partial(_strides, varlen=varlen)
    grid_kv = lambda meta: (triton.cdiv(rows_k, meta["BLOCK_N"]), Hkv, batches or B)  # noqa: E731
    _launch(_flash_bwd_dkdv_kernel, "bwd_kv", BWD_KV_CONFIGS, grid_kv,
            (q, k, v, dout, lse, delta, dk, dv, m, alibi, *seqs,
             *st(q), *st(k), *st(v), *st(dout), *st(dk), *st(dv), *m_strides,
             Hq, Hkv, Hq // Hkv, Tq, Tk, T_src, *runtime), constexprs)
    grid_q = lambda meta: (triton.cdiv(rows_q, meta["BLOCK_M"]), Hq, batches or B)  # noqa: E731
    _launch(_flash_bwd_dq_kernel, "bwd_q", BWD_Q_CONFIGS, grid_q,
            (q, k, v, dout, lse, delta, dq, m, alibi, *seqs,
             *st(q), *st(k), *st(v), *st(dout), *st(dq), *m_strides,
             Hq, Hq // Hkv, Tq, Tk, T_src, *runtime), constexprs)
    return dq, dk, dv
