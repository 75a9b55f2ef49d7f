"""Block-sparse flash attention in Triton: forward and backward over the kept blocks of a BlockMask.

The tiles are the mask's blocks (``BLOCK_M x BLOCK_N`` = the mask's ``(BLOCK_Q, BLOCK_KV)``). A query
block visits only its kept key blocks, read from the mask's compressed rows: first the PARTIAL ones,
where the mask's elementwise rule is applied (window / causal diagonal, segment ids, global tokens),
then the FULL ones, which need no elementwise test beyond the sequence bounds. Work is proportional
to the number of kept blocks. The online softmax and the backward recurrence are those of
:mod:`effattn.kernels.flash_attn`, from the same helpers (:mod:`effattn.kernels._attn_common`):

    P = exp(S - lse), dV = P^T dO, dP = dO V^T, dS = P∘(dP - delta), dQ = scale·dS K, dK = scale·dS^T Q.

The dK/dV kernel owns a key block and walks the transposed lists (the query blocks that keep it),
over the query heads of its GQA group; the dQ kernel owns a query block. No atomics.

Elementwise rule (``effattn.block_mask.MaskRule``): visible(i, j) = (window(i, j) and
segment(i, j)) or global(i, j), window: ``-left <= j - i - diag_offset <= right``; segment:
``q_seg[b, i] == kv_seg[b, j]``; global: ``i < n_global or j < n_global``. A key padding mask
``(B, Tk)`` applies to every visited block.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from effattn.kernels._attn_common import (
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
from effattn.kernels.flash_attn import (
    INTERPRET,
    PREPROCESS_BLOCK_M,
    _block_d,
    _bwd_preprocess_kernel,
    _dot_precision,
    _on_tensor_device,
)

NUM_WARPS = 4
NUM_STAGES = 2

# Every output buffer comes from here (tests swap in a NaN-filling allocator).
_alloc = torch.empty


# ----------------------------------------------------------------------------------------------
# device helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _rule_visible(rows, cols, b, window_left, window_right, diag_offset, n_global,
                  QSEG, KSEG, stride_qsb, stride_qst, stride_ksb, stride_kst, Tq, Tk,
                  HAS_WINDOW_LEFT: tl.constexpr, HAS_WINDOW_RIGHT: tl.constexpr,
                  HAS_SEGMENTS: tl.constexpr, HAS_GLOBAL: tl.constexpr):
    """The mask's elementwise rule on a tile (``rows``, ``cols`` broadcast to its shape)."""
    vis = (rows >= 0) & (cols >= 0)
    d = cols - rows - diag_offset
    if HAS_WINDOW_LEFT:
        vis = vis & (d >= -window_left)
    if HAS_WINDOW_RIGHT:
        vis = vis & (d <= window_right)
    if HAS_SEGMENTS:
        qs = tl.load(QSEG + b.to(tl.int64) * stride_qsb + rows.to(tl.int64) * stride_qst, mask=rows < Tq, other=-1)
        ks = tl.load(KSEG + b.to(tl.int64) * stride_ksb + cols.to(tl.int64) * stride_kst, mask=cols < Tk, other=-2)
        vis = vis & (qs == ks)
    if HAS_GLOBAL:
        vis = vis | (rows < n_global) | (cols < n_global)
    return vis


@triton.jit
def _visible(offs_m, offs_n, b, kpm_base, stride_mj, Tq, Tk, window_left, window_right, diag_offset, n_global,
             QSEG, KSEG, stride_qsb, stride_qst, stride_ksb, stride_kst,
             APPLY_RULE: tl.constexpr, HAS_WINDOW_LEFT: tl.constexpr, HAS_WINDOW_RIGHT: tl.constexpr,
             HAS_SEGMENTS: tl.constexpr, HAS_GLOBAL: tl.constexpr, HAS_KPM: tl.constexpr,
             TRANSPOSED: tl.constexpr):
    """Visibility of the tile of queries ``offs_m`` x keys ``offs_n`` (keys x queries if ``TRANSPOSED``):
    in bounds, the elementwise rule where ``APPLY_RULE`` (PARTIAL blocks), and the key padding mask."""
    if TRANSPOSED:
        rows = offs_m[None, :]
        cols = offs_n[:, None]
    else:
        rows = offs_m[:, None]
        cols = offs_n[None, :]
    visible = (rows < Tq) & (cols < Tk)
    if APPLY_RULE:
        visible = visible & _rule_visible(rows, cols, b, window_left, window_right, diag_offset, n_global, QSEG, KSEG,
                                          stride_qsb, stride_qst, stride_ksb, stride_kst, Tq, Tk, HAS_WINDOW_LEFT,
                                          HAS_WINDOW_RIGHT, HAS_SEGMENTS, HAS_GLOBAL)
    if HAS_KPM:
        keep = tl.load(kpm_base + offs_n.to(tl.int64) * stride_mj, mask=offs_n < Tk, other=0)
        if TRANSPOSED:
            visible = visible & (keep[:, None] != 0)
        else:
            visible = visible & (keep[None, :] != 0)
    return visible


@triton.jit
def _scores(q, kT, offs_m, offs_n, b, kpm_base, stride_mj,
            Tq, Tk, qk_scale, window_left, window_right, diag_offset, n_global,
            QSEG, KSEG, stride_qsb, stride_qst, stride_ksb, stride_kst,
            APPLY_RULE: tl.constexpr, HAS_WINDOW_LEFT: tl.constexpr, HAS_WINDOW_RIGHT: tl.constexpr,
            HAS_SEGMENTS: tl.constexpr, HAS_GLOBAL: tl.constexpr, HAS_KPM: tl.constexpr,
            UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Log2-domain masked scores of the query tile ``q`` against the key tile ``kT`` (keys ``offs_n``)."""
    s = _scores_log2(q, kT, qk_scale, UPCAST_DOT, DOT_PRECISION)
    visible = _visible(offs_m, offs_n, b, kpm_base, stride_mj, Tq, Tk, window_left, window_right, diag_offset,
                       n_global, QSEG, KSEG, stride_qsb, stride_qst, stride_ksb, stride_kst, APPLY_RULE,
                       HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT, HAS_SEGMENTS, HAS_GLOBAL, HAS_KPM, False)
    return tl.where(visible, s, float("-inf"))


@triton.jit
def _block_list(NUM, IDX, b, h, row, stride_nb, stride_nh, stride_nr, stride_ib, stride_ih, stride_ir):
    """Row ``row`` of a compressed block list of (batch ``b``, head ``h``): (its length, pointer to its indices)."""
    num = tl.load(NUM + b * stride_nb + h * stride_nh + row * stride_nr)
    return num, _head_base(IDX, b, h, stride_ib, stride_ih) + row * stride_ir


@triton.jit
def _pick_list(FULL: tl.constexpr, num, idx_base, stride_idx, full_num, full_base, stride_full):
    """The PARTIAL list (``FULL`` false) or the FULL list, as (length, indices, index stride)."""
    if FULL:
        return full_num, full_base, stride_full
    else:
        return num, idx_base, stride_idx


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, idx_base, stride_idx, num, offs_m, b, kpm_base,
                stride_kt, stride_kd, stride_vt, stride_vd, stride_mj, Tq, Tk, qk_scale,
                window_left, window_right, diag_offset, n_global,
                QSEG, KSEG, stride_qsb, stride_qst, stride_ksb, stride_kst,
                HEAD_DIM_QK: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DQK: tl.constexpr,
                BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, APPLY_RULE: tl.constexpr,
                HAS_WINDOW_LEFT: tl.constexpr, HAS_WINDOW_RIGHT: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
                HAS_GLOBAL: tl.constexpr, HAS_KPM: tl.constexpr, UPCAST_DOT: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    for it in range(0, num):
        start_n = tl.load(idx_base + it * stride_idx) * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kT = _load_tile(k_base, start_n, stride_kt, stride_kd, Tk, HEAD_DIM_QK, BLOCK_N, BLOCK_DQK, True)
        v = _load_tile(v_base, start_n, stride_vt, stride_vd, Tk, HEAD_DIM_V, BLOCK_N, BLOCK_DV, False)
        s = _scores(q, kT, offs_m, offs_n, b, kpm_base, stride_mj, Tq, Tk, qk_scale, window_left, window_right,
                    diag_offset, n_global, QSEG, KSEG, stride_qsb, stride_qst, stride_ksb, stride_kst,
                    APPLY_RULE, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT, HAS_SEGMENTS, HAS_GLOBAL, HAS_KPM, UPCAST_DOT,
                    DOT_PRECISION)
        p, m_i, l_i, acc = _online_softmax(s, m_i, l_i, acc)
        acc = _dot(p.to(v.dtype), v, acc, UPCAST_DOT, DOT_PRECISION)
    return acc, l_i, m_i


@triton.jit
def _sparse_fwd_kernel(
    Q, K, V, O, LSE, KPM, KV_NUM, KV_IDX, FULL_NUM, FULL_IDX, QSEG, KSEG,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_mb, stride_mj,
    stride_nb, stride_nh, stride_nm, stride_ib, stride_ih, stride_im, stride_in,
    stride_fnb, stride_fnh, stride_fnm, stride_fib, stride_fih, stride_fim, stride_fin,
    stride_qsb, stride_qst, stride_ksb, stride_kst,
    Hq, GROUP, Tq, Tk, qk_scale, window_left, window_right, diag_offset, n_global,
    HEAD_DIM_QK: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_WINDOW_LEFT: tl.constexpr, HAS_WINDOW_RIGHT: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
    HAS_GLOBAL: tl.constexpr, HAS_KPM: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program: query block ``start_m`` of one (batch, query head) against its kept key blocks."""
    start_m = tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    off_kvh = off_h // GROUP
    m0 = start_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_ok = offs_m < Tq

    q = _load_tile(_head_base(Q, off_b, off_h, stride_qb, stride_qh), m0, stride_qt, stride_qd, Tq, HEAD_DIM_QK,
                   BLOCK_M, BLOCK_DQK, False)
    k_base = _head_base(K, off_b, off_kvh, stride_kb, stride_kh)
    v_base = _head_base(V, off_b, off_kvh, stride_vb, stride_vh)
    kpm_base = KPM + off_b.to(tl.int64) * stride_mb
    num, idx_base = _block_list(KV_NUM, KV_IDX, off_b, off_h, start_m, stride_nb, stride_nh, stride_nm,
                                stride_ib, stride_ih, stride_im)
    full_num, full_base = _block_list(FULL_NUM, FULL_IDX, off_b, off_h, start_m, stride_fnb, stride_fnh, stride_fnm,
                                      stride_fib, stride_fih, stride_fim)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    # PARTIAL blocks (elementwise rule), then FULL blocks; an empty list is skipped, not entered
    for full in tl.static_range(2):
        n, blocks, stride_blocks = _pick_list(full, num, idx_base, stride_in, full_num, full_base, stride_fin)
        if n > 0:
            acc, l_i, m_i = _fwd_blocks(
                acc, l_i, m_i, q, k_base, v_base, blocks, stride_blocks, n, offs_m, off_b, kpm_base,
                stride_kt, stride_kd, stride_vt, stride_vd, stride_mj, Tq, Tk, qk_scale,
                window_left, window_right, diag_offset, n_global, QSEG, KSEG, stride_qsb, stride_qst, stride_ksb,
                stride_kst, HEAD_DIM_QK, HEAD_DIM_V, BLOCK_DQK, BLOCK_DV, BLOCK_N, full == 0, HAS_WINDOW_LEFT,
                HAS_WINDOW_RIGHT, HAS_SEGMENTS, HAS_GLOBAL, HAS_KPM, UPCAST_DOT, DOT_PRECISION)

    out, lse = _softmax_epilogue(acc, l_i, m_i)
    _store_tile(_head_base(O, off_b, off_h, stride_ob, stride_oh), m0, stride_ot, stride_od, out, Tq, HEAD_DIM_V,
                BLOCK_M, BLOCK_DV)
    tl.store(LSE + (off_b * Hq + off_h).to(tl.int64) * Tq + offs_m, lse, mask=m_ok)


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _dkdv_blocks(dk, dv, k, v, q_base, do_base, LSE, DELTA, row_base, idx_base, stride_idx, num, offs_n, b,
                 kpm_base, stride_qt, stride_qd, stride_dot, stride_dod, stride_mj, Tq, Tk, qk_scale,
                 window_left, window_right, diag_offset, n_global,
                 QSEG, KSEG, stride_qsb, stride_qst, stride_ksb, stride_kst,
                 HEAD_DIM_QK: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DQK: tl.constexpr,
                 BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, APPLY_RULE: tl.constexpr,
                 HAS_WINDOW_LEFT: tl.constexpr, HAS_WINDOW_RIGHT: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
                 HAS_GLOBAL: tl.constexpr, HAS_KPM: tl.constexpr, UPCAST_DOT: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    for it in range(0, num):
        start_m = tl.load(idx_base + it * stride_idx) * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_tile(q_base, start_m, stride_qt, stride_qd, Tq, HEAD_DIM_QK, BLOCK_M, BLOCK_DQK, False)
        do = _load_tile(do_base, start_m, stride_dot, stride_dod, Tq, HEAD_DIM_V, BLOCK_M, BLOCK_DV, False)
        lse2, delta = _load_row_stats(LSE, DELTA, row_base, offs_m, Tq)
        sT = _scores_log2(k, tl.trans(q), qk_scale, UPCAST_DOT, DOT_PRECISION)
        visible = _visible(offs_m, offs_n, b, kpm_base, stride_mj, Tq, Tk, window_left, window_right, diag_offset,
                           n_global, QSEG, KSEG, stride_qsb, stride_qst, stride_ksb, stride_kst, APPLY_RULE,
                           HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT, HAS_SEGMENTS, HAS_GLOBAL, HAS_KPM, True)
        pT = tl.where(visible, tl.math.exp2(sT - lse2[None, :]), 0.0)
        dv = _dot(pT.to(do.dtype), do, dv, UPCAST_DOT, DOT_PRECISION)
        dpT = _dot(v, tl.trans(do), tl.zeros([k.shape[0], BLOCK_M], dtype=tl.float32), UPCAST_DOT, DOT_PRECISION)
        dsT = pT * (dpT - delta[None, :])
        dk = _dot(dsT.to(q.dtype), q, dk, UPCAST_DOT, DOT_PRECISION)
    return dk, dv


@triton.jit
def _sparse_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, KPM, Q_NUM, Q_IDX, FULL_NUM, FULL_IDX, QSEG, KSEG,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dkb, stride_dkh, stride_dkt, stride_dkd,
    stride_dvb, stride_dvh, stride_dvt, stride_dvd,
    stride_mb, stride_mj,
    stride_nb, stride_nh, stride_nn, stride_ib, stride_ih, stride_in, stride_im,
    stride_fnb, stride_fnh, stride_fnn, stride_fib, stride_fih, stride_fin, stride_fim,
    stride_qsb, stride_qst, stride_ksb, stride_kst,
    Hq, GROUP, Tq, Tk, sm_scale, qk_scale, window_left, window_right, diag_offset, n_global,
    HEAD_DIM_QK: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_WINDOW_LEFT: tl.constexpr, HAS_WINDOW_RIGHT: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
    HAS_GLOBAL: tl.constexpr, HAS_KPM: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program: dK, dV of key block ``start_n`` of one (batch, KV head), over its GQA query heads."""
    start_n = tl.program_id(0)
    off_kvh = tl.program_id(1)
    off_b = tl.program_id(2)
    n0 = start_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    k = _load_tile(_head_base(K, off_b, off_kvh, stride_kb, stride_kh), n0, stride_kt, stride_kd, Tk, HEAD_DIM_QK,
                   BLOCK_N, BLOCK_DQK, False)
    v = _load_tile(_head_base(V, off_b, off_kvh, stride_vb, stride_vh), n0, stride_vt, stride_vd, Tk, HEAD_DIM_V,
                   BLOCK_N, BLOCK_DV, False)
    dk = tl.zeros([BLOCK_N, BLOCK_DQK], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    kpm_base = KPM + off_b.to(tl.int64) * stride_mb
    for g in range(0, GROUP):
        off_h = off_kvh * GROUP + g
        q_base = _head_base(Q, off_b, off_h, stride_qb, stride_qh)
        do_base = _head_base(DO, off_b, off_h, stride_dob, stride_doh)
        row_base = (off_b * Hq + off_h).to(tl.int64) * Tq
        num, idx_base = _block_list(Q_NUM, Q_IDX, off_b, off_h, start_n, stride_nb, stride_nh, stride_nn,
                                    stride_ib, stride_ih, stride_in)
        full_num, full_base = _block_list(FULL_NUM, FULL_IDX, off_b, off_h, start_n, stride_fnb, stride_fnh,
                                          stride_fnn, stride_fib, stride_fih, stride_fin)
        # PARTIAL blocks (elementwise rule), then FULL blocks, as in the forward
        for full in tl.static_range(2):
            n, blocks, stride_blocks = _pick_list(full, num, idx_base, stride_im, full_num, full_base, stride_fim)
            if n > 0:
                dk, dv = _dkdv_blocks(
                    dk, dv, k, v, q_base, do_base, LSE, DELTA, row_base, blocks, stride_blocks, n, offs_n, off_b,
                    kpm_base, stride_qt, stride_qd, stride_dot, stride_dod, stride_mj, Tq, Tk, qk_scale,
                    window_left, window_right, diag_offset, n_global, QSEG, KSEG, stride_qsb, stride_qst,
                    stride_ksb, stride_kst, HEAD_DIM_QK, HEAD_DIM_V, BLOCK_DQK, BLOCK_DV, BLOCK_M, full == 0,
                    HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT, HAS_SEGMENTS, HAS_GLOBAL, HAS_KPM, UPCAST_DOT, DOT_PRECISION)
    _store_tile(_head_base(DK, off_b, off_kvh, stride_dkb, stride_dkh), n0, stride_dkt, stride_dkd, dk * sm_scale, Tk,
                HEAD_DIM_QK, BLOCK_N, BLOCK_DQK)
    _store_tile(_head_base(DV, off_b, off_kvh, stride_dvb, stride_dvh), n0, stride_dvt, stride_dvd, dv, Tk,
                HEAD_DIM_V, BLOCK_N, BLOCK_DV)


@triton.jit
def _dq_blocks(dq, q, do, lse2, delta, k_base, v_base, idx_base, stride_idx, num, offs_m, b, kpm_base,
               stride_kt, stride_kd, stride_vt, stride_vd, stride_mj, Tq, Tk, qk_scale,
               window_left, window_right, diag_offset, n_global,
               QSEG, KSEG, stride_qsb, stride_qst, stride_ksb, stride_kst,
               HEAD_DIM_QK: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DQK: tl.constexpr,
               BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, APPLY_RULE: tl.constexpr,
               HAS_WINDOW_LEFT: tl.constexpr, HAS_WINDOW_RIGHT: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
               HAS_GLOBAL: tl.constexpr, HAS_KPM: tl.constexpr, UPCAST_DOT: tl.constexpr,
               DOT_PRECISION: tl.constexpr):
    for it in range(0, num):
        start_n = tl.load(idx_base + it * stride_idx) * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, start_n, stride_kt, stride_kd, Tk, HEAD_DIM_QK, BLOCK_N, BLOCK_DQK, False)
        vT = _load_tile(v_base, start_n, stride_vt, stride_vd, Tk, HEAD_DIM_V, BLOCK_N, BLOCK_DV, True)
        s = _scores(q, tl.trans(k), offs_m, offs_n, b, kpm_base, stride_mj, Tq, Tk, qk_scale, window_left,
                    window_right, diag_offset, n_global, QSEG, KSEG, stride_qsb, stride_qst, stride_ksb, stride_kst,
                    APPLY_RULE, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT, HAS_SEGMENTS, HAS_GLOBAL, HAS_KPM,
                    UPCAST_DOT, DOT_PRECISION)
        p = tl.math.exp2(s - lse2[:, None])
        dp = _dot(do, vT, tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32), UPCAST_DOT, DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = _dot(ds.to(k.dtype), k, dq, UPCAST_DOT, DOT_PRECISION)
    return dq


@triton.jit
def _sparse_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, KPM, KV_NUM, KV_IDX, FULL_NUM, FULL_IDX, QSEG, KSEG,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dqb, stride_dqh, stride_dqt, stride_dqd,
    stride_mb, stride_mj,
    stride_nb, stride_nh, stride_nm, stride_ib, stride_ih, stride_im, stride_in,
    stride_fnb, stride_fnh, stride_fnm, stride_fib, stride_fih, stride_fim, stride_fin,
    stride_qsb, stride_qst, stride_ksb, stride_kst,
    Hq, GROUP, Tq, Tk, sm_scale, qk_scale, window_left, window_right, diag_offset, n_global,
    HEAD_DIM_QK: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_WINDOW_LEFT: tl.constexpr, HAS_WINDOW_RIGHT: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
    HAS_GLOBAL: tl.constexpr, HAS_KPM: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program: dQ of query block ``start_m`` of one (batch, query head), over its kept key blocks."""
    start_m = tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    off_kvh = off_h // GROUP
    m0 = start_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    row_base = (off_b * Hq + off_h).to(tl.int64) * Tq
    q = _load_tile(_head_base(Q, off_b, off_h, stride_qb, stride_qh), m0, stride_qt, stride_qd, Tq, HEAD_DIM_QK,
                   BLOCK_M, BLOCK_DQK, False)
    do = _load_tile(_head_base(DO, off_b, off_h, stride_dob, stride_doh), m0, stride_dot, stride_dod, Tq, HEAD_DIM_V,
                    BLOCK_M, BLOCK_DV, False)
    lse2, delta = _load_row_stats(LSE, DELTA, row_base, offs_m, Tq)
    k_base = _head_base(K, off_b, off_kvh, stride_kb, stride_kh)
    v_base = _head_base(V, off_b, off_kvh, stride_vb, stride_vh)
    kpm_base = KPM + off_b.to(tl.int64) * stride_mb
    num, idx_base = _block_list(KV_NUM, KV_IDX, off_b, off_h, start_m, stride_nb, stride_nh, stride_nm,
                                stride_ib, stride_ih, stride_im)
    full_num, full_base = _block_list(FULL_NUM, FULL_IDX, off_b, off_h, start_m, stride_fnb, stride_fnh, stride_fnm,
                                      stride_fib, stride_fih, stride_fim)
    dq = tl.zeros([BLOCK_M, BLOCK_DQK], dtype=tl.float32)
    # PARTIAL blocks (elementwise rule), then FULL blocks, as in the forward
    for full in tl.static_range(2):
        n, blocks, stride_blocks = _pick_list(full, num, idx_base, stride_in, full_num, full_base, stride_fin)
        if n > 0:
            dq = _dq_blocks(dq, q, do, lse2, delta, k_base, v_base, blocks, stride_blocks, n, offs_m, off_b, kpm_base,
                            stride_kt, stride_kd, stride_vt, stride_vd, stride_mj, Tq, Tk, qk_scale,
                            window_left, window_right, diag_offset, n_global, QSEG, KSEG, stride_qsb, stride_qst,
                            stride_ksb, stride_kst, HEAD_DIM_QK, HEAD_DIM_V, BLOCK_DQK, BLOCK_DV, BLOCK_N, full == 0,
                            HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT, HAS_SEGMENTS, HAS_GLOBAL, HAS_KPM, UPCAST_DOT,
                            DOT_PRECISION)
    _store_tile(_head_base(DQ, off_b, off_h, stride_dqb, stride_dqh), m0, stride_dqt, stride_dqd, dq * sm_scale, Tq,
                HEAD_DIM_QK, BLOCK_M, BLOCK_DQK)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
def _lists(num: torch.Tensor, idx: torch.Tensor, B: int, H: int):
    """A compressed list broadcast to (B, H, ...) as (tensor, tensor, strides...)."""
    num = num.expand(B, H, num.shape[-1])
    idx = idx.expand(B, H, *idx.shape[-2:])
    return num, idx, (*num.stride(), *idx.stride())


def _rule_args(rule, q, B: int):
    """(QSEG, KSEG, segment strides, runtime ints, constexpr flags) of a MaskRule (or None)."""
    dummy = q.new_zeros(1, dtype=torch.int32)
    wl = wr = -1
    diag = n_global = 0
    qseg = kseg = dummy
    seg_strides = (0, 0, 0, 0)
    if rule is not None:
        wl, wr, diag, n_global = rule.window_left, rule.window_right, rule.diag_offset, rule.n_global
        if rule.q_segments is not None:
            qseg = rule.q_segments.to(q.device, torch.int32).expand(B, -1)
            kseg = rule.kv_segments.to(q.device, torch.int32).expand(B, -1)
            seg_strides = (*qseg.stride(), *kseg.stride())
    flags = dict(HAS_WINDOW_LEFT=wl >= 0, HAS_WINDOW_RIGHT=wr >= 0, HAS_SEGMENTS=qseg is not dummy,
                 HAS_GLOBAL=n_global > 0)
    return qseg, kseg, seg_strides, (wl, wr, diag, n_global), flags


def _constexprs(q, v, block_mask, kpm, flags):
    return dict(HEAD_DIM_QK=q.shape[-1], HEAD_DIM_V=v.shape[-1], BLOCK_DQK=_block_d(q.shape[-1]),
                BLOCK_DV=_block_d(v.shape[-1]), HAS_KPM=kpm is not None,
                UPCAST_DOT=INTERPRET and q.dtype == torch.bfloat16, DOT_PRECISION=_dot_precision(q.dtype),
                BLOCK_M=block_mask.block_size[0], BLOCK_N=block_mask.block_size[1], **flags)


def _kpm_args(kpm, q):
    if kpm is None:
        return q.new_zeros(1, dtype=torch.uint8), (0, 0)
    kpm = kpm.view(torch.uint8)
    return kpm, kpm.stride()


@_on_tensor_device
def sparse_attn_forward(q, k, v, block_mask, key_padding_mask=None, *, scale: float):
    """q ``(B, Hq, Tq, D)``, k ``(B, Hkv, Tk, D)``, v ``(B, Hkv, Tk, Dv)``, a validated BlockMask for
    ``(Tq, Tk)``, key_padding_mask None or bool ``(B, Tk)``. Returns ``out``, ``lse`` float32."""
    B, Hq, Tq, _ = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    out = _alloc(B, Hq, Tq, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = _alloc(B, Hq, Tq, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    bm = block_mask
    num, idx, strides = _lists(bm.kv_num_blocks, bm.kv_indices, B, Hq)
    fnum, fidx, fstrides = _lists(bm.full_kv_num_blocks, bm.full_kv_indices, B, Hq)
    qseg, kseg, seg_strides, ints, flags = _rule_args(bm.rule, q, B)
    kpm, kpm_strides = _kpm_args(key_padding_mask, q)
    grid = (triton.cdiv(Tq, bm.block_size[0]), Hq, B)
    _sparse_fwd_kernel[grid](
        q, k, v, out, lse, kpm, num, idx, fnum, fidx, qseg, kseg,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *kpm_strides, *strides, *fstrides, *seg_strides,
        Hq, Hq // Hkv, Tq, Tk, scale * LOG2E, *ints,
        **_constexprs(q, v, bm, key_padding_mask, flags), num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return out, lse


@_on_tensor_device
def sparse_attn_backward(dout, q, k, v, out, lse, block_mask, key_padding_mask=None, *, dlse=None, scale: float):
    """Gradients ``dq, dk, dv`` of :func:`sparse_attn_forward` (contiguous, like q, k, v); ``dlse``: the
    gradient of lse ``(B, Hq, Tq)`` or None."""
    B, Hq, Tq, _ = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    dq = _alloc(*q.shape, dtype=q.dtype, device=q.device)
    dk = _alloc(*k.shape, dtype=k.dtype, device=k.device)
    dv = _alloc(*v.shape, dtype=v.dtype, device=v.device)
    if Tq == 0 or Tk == 0 or B * Hq == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    bm = block_mask
    delta = _alloc(B, Hq, Tq, dtype=torch.float32, device=q.device)
    pre = PREPROCESS_BLOCK_M if v.shape[-1] <= 128 else PREPROCESS_BLOCK_M // 4
    _bwd_preprocess_kernel[(triton.cdiv(Tq, pre), Hq, B)](
        out, dout, dlse.contiguous() if dlse is not None else delta, delta, *out.stride(), *dout.stride(), Hq, Tq,
        HEAD_DIM_V=v.shape[-1], BLOCK_DV=_block_d(v.shape[-1]), HAS_DLSE=dlse is not None, BLOCK_M=pre)
    lse = lse.contiguous()
    qseg, kseg, seg_strides, ints, flags = _rule_args(bm.rule, q, B)
    kpm, kpm_strides = _kpm_args(key_padding_mask, q)
    constexprs = _constexprs(q, v, bm, key_padding_mask, flags)
    runtime = (Hq, Hq // Hkv, Tq, Tk, scale, scale * LOG2E, *ints)
    qnum, qidx, qstrides = _lists(bm.q_num_blocks, bm.q_indices, B, Hq)
    fqnum, fqidx, fqstrides = _lists(bm.full_q_num_blocks, bm.full_q_indices, B, Hq)
    _sparse_bwd_dkdv_kernel[(triton.cdiv(Tk, bm.block_size[1]), Hkv, B)](
        q, k, v, dout, lse, delta, dk, dv, kpm, qnum, qidx, fqnum, fqidx, qseg, kseg,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dk.stride(), *dv.stride(), *kpm_strides,
        *qstrides, *fqstrides, *seg_strides, *runtime, **constexprs, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    num, idx, strides = _lists(bm.kv_num_blocks, bm.kv_indices, B, Hq)
    fnum, fidx, fstrides = _lists(bm.full_kv_num_blocks, bm.full_kv_indices, B, Hq)
    _sparse_bwd_dq_kernel[(triton.cdiv(Tq, bm.block_size[0]), Hq, B)](
        q, k, v, dout, lse, delta, dq, kpm, num, idx, fnum, fidx, qseg, kseg,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dq.stride(), *kpm_strides,
        *strides, *fstrides, *seg_strides, *runtime, **constexprs, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return dq, dk, dv
