"""Block-sparse flash attention in Triton: forward and backward over the kept blocks of a BlockMask.

The tiles are the mask's blocks (``BLOCK_M x BLOCK_N`` = the mask's ``(BLOCK_Q, BLOCK_KV)``). A query
block visits only its kept key blocks, read from the mask's compressed rows: first the PARTIAL ones,
where the mask's elementwise rule is applied (window / causal diagonal, segment ids, global tokens),
then the FULL ones, which need no elementwise test beyond the sequence bounds. Work is proportional
to the number of kept blocks. The online softmax and the backward recurrence are those of
:mod:`effattn.kernels.flash_attn` (whose device helpers this file uses):

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

from effattn.kernels.flash_attn import (
    INTERPRET,
    LOG2E,
    PREPROCESS_BLOCK_M,
    _block_d,
    _bwd_preprocess_kernel,
    _dot,
    _dot_precision,
    _load_lse2,
    _on_tensor_device,
    _tile_ptrs,
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
def _scores(q, kT, offs_m, offs_n, b, kpm_base, stride_mj,
            Tq, Tk, qk_scale, window_left, window_right, diag_offset, n_global,
            QSEG, KSEG, stride_qsb, stride_qst, stride_ksb, stride_kst, BLOCK_N: tl.constexpr,
            APPLY_RULE: tl.constexpr, HAS_WINDOW_LEFT: tl.constexpr, HAS_WINDOW_RIGHT: tl.constexpr,
            HAS_SEGMENTS: tl.constexpr, HAS_GLOBAL: tl.constexpr, HAS_KPM: tl.constexpr,
            UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Log2-domain masked scores of the query tile ``q`` against the key tile ``kT`` (keys ``offs_n``)."""
    s = _dot(q, kT, tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32), UPCAST_DOT, DOT_PRECISION) * qk_scale
    visible = (offs_m[:, None] < Tq) & (offs_n[None, :] < Tk)
    if APPLY_RULE:
        visible = visible & _rule_visible(offs_m[:, None], offs_n[None, :], b, window_left, window_right,
                                          diag_offset, n_global, QSEG, KSEG, stride_qsb, stride_qst, stride_ksb,
                                          stride_kst, Tq, Tk, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT, HAS_SEGMENTS,
                                          HAS_GLOBAL)
    if HAS_KPM:
        keep = tl.load(kpm_base + offs_n.to(tl.int64) * stride_mj, mask=offs_n < Tk, other=0)
        visible = visible & (keep[None, :] != 0)
    return tl.where(visible, s, float("-inf"))


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
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    for it in range(0, num):
        start_n = tl.load(idx_base + it * stride_idx) * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kT = tl.load(_tile_ptrs(k_base, start_n, stride_kt, stride_kd, BLOCK_N, BLOCK_DQK, True),
                     mask=(offs_n[None, :] < Tk) & (offs_dqk[:, None] < HEAD_DIM_QK), other=0.0)
        v = tl.load(_tile_ptrs(v_base, start_n, stride_vt, stride_vd, BLOCK_N, BLOCK_DV, False),
                    mask=(offs_n[:, None] < Tk) & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
        s = _scores(q, kT, offs_m, offs_n, b, kpm_base, stride_mj, Tq, Tk, qk_scale, window_left, window_right,
                    diag_offset, n_global, QSEG, KSEG, stride_qsb, stride_qst, stride_ksb, stride_kst, BLOCK_N,
                    APPLY_RULE, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT, HAS_SEGMENTS, HAS_GLOBAL, HAS_KPM, UPCAST_DOT,
                    DOT_PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], UPCAST_DOT, DOT_PRECISION)
        m_i = m_new
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
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < Tq

    q = tl.load(_tile_ptrs(Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh, m0,
                           stride_qt, stride_qd, BLOCK_M, BLOCK_DQK, False),
                mask=m_ok[:, None] & (offs_dqk[None, :] < HEAD_DIM_QK), other=0.0)
    k_base = K + off_b.to(tl.int64) * stride_kb + off_kvh.to(tl.int64) * stride_kh
    v_base = V + off_b.to(tl.int64) * stride_vb + off_kvh.to(tl.int64) * stride_vh
    kpm_base = KPM + off_b.to(tl.int64) * stride_mb
    num = tl.load(KV_NUM + off_b * stride_nb + off_h * stride_nh + start_m * stride_nm)
    idx_base = KV_IDX + off_b.to(tl.int64) * stride_ib + off_h.to(tl.int64) * stride_ih + start_m * stride_im
    full_num = tl.load(FULL_NUM + off_b * stride_fnb + off_h * stride_fnh + start_m * stride_fnm)
    full_base = FULL_IDX + off_b.to(tl.int64) * stride_fib + off_h.to(tl.int64) * stride_fih + start_m * stride_fim

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    # PARTIAL blocks (elementwise rule), then FULL blocks; an empty list is skipped, not entered
    if num > 0:
        acc, l_i, m_i = _fwd_blocks(
            acc, l_i, m_i, q, k_base, v_base, idx_base, stride_in, num, offs_m, off_b, kpm_base,
            stride_kt, stride_kd, stride_vt, stride_vd, stride_mj, Tq, Tk, qk_scale,
            window_left, window_right, diag_offset, n_global, QSEG, KSEG, stride_qsb, stride_qst, stride_ksb,
            stride_kst, HEAD_DIM_QK, HEAD_DIM_V, BLOCK_DQK, BLOCK_DV, BLOCK_N, True, HAS_WINDOW_LEFT,
            HAS_WINDOW_RIGHT, HAS_SEGMENTS, HAS_GLOBAL, HAS_KPM, UPCAST_DOT, DOT_PRECISION)
    if full_num > 0:
        acc, l_i, m_i = _fwd_blocks(
            acc, l_i, m_i, q, k_base, v_base, full_base, stride_fin, full_num, offs_m, off_b, kpm_base,
            stride_kt, stride_kd, stride_vt, stride_vd, stride_mj, Tq, Tk, qk_scale,
            window_left, window_right, diag_offset, n_global, QSEG, KSEG, stride_qsb, stride_qst, stride_ksb,
            stride_kst, HEAD_DIM_QK, HEAD_DIM_V, BLOCK_DQK, BLOCK_DV, BLOCK_N, False, HAS_WINDOW_LEFT,
            HAS_WINDOW_RIGHT, HAS_SEGMENTS, HAS_GLOBAL, HAS_KPM, UPCAST_DOT, DOT_PRECISION)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    tl.store(_tile_ptrs(O + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh, m0, stride_ot,
                        stride_od, BLOCK_M, BLOCK_DV, False), out.to(O.dtype.element_ty),
             mask=m_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V))
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
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    for it in range(0, num):
        start_m = tl.load(idx_base + it * stride_idx) * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < Tq
        q = tl.load(_tile_ptrs(q_base, start_m, stride_qt, stride_qd, BLOCK_M, BLOCK_DQK, False),
                    mask=m_ok[:, None] & (offs_dqk[None, :] < HEAD_DIM_QK), other=0.0)
        do = tl.load(_tile_ptrs(do_base, start_m, stride_dot, stride_dod, BLOCK_M, BLOCK_DV, False),
                     mask=m_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
        lse2 = _load_lse2(LSE, row_base, offs_m, Tq)
        delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
        sT = _dot(k, tl.trans(q), tl.zeros([k.shape[0], BLOCK_M], dtype=tl.float32), UPCAST_DOT,
                  DOT_PRECISION) * qk_scale
        visible = (offs_m[None, :] < Tq) & (offs_n[:, None] < Tk)
        if APPLY_RULE:
            visible = visible & _rule_visible(offs_m[None, :], offs_n[:, None], b, window_left, window_right,
                                              diag_offset, n_global, QSEG, KSEG, stride_qsb, stride_qst,
                                              stride_ksb, stride_kst, Tq, Tk, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT,
                                              HAS_SEGMENTS, HAS_GLOBAL)
        if HAS_KPM:
            keep = tl.load(kpm_base + offs_n.to(tl.int64) * stride_mj, mask=offs_n < Tk, other=0)
            visible = visible & (keep[:, None] != 0)
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
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    n_ok = offs_n < Tk
    k = tl.load(_tile_ptrs(K + off_b.to(tl.int64) * stride_kb + off_kvh.to(tl.int64) * stride_kh, n0,
                           stride_kt, stride_kd, BLOCK_N, BLOCK_DQK, False),
                mask=n_ok[:, None] & (offs_dqk[None, :] < HEAD_DIM_QK), other=0.0)
    v = tl.load(_tile_ptrs(V + off_b.to(tl.int64) * stride_vb + off_kvh.to(tl.int64) * stride_vh, n0,
                           stride_vt, stride_vd, BLOCK_N, BLOCK_DV, False),
                mask=n_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_DQK], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    kpm_base = KPM + off_b.to(tl.int64) * stride_mb
    for g in range(0, GROUP):
        off_h = off_kvh * GROUP + g
        q_base = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
        do_base = DO + off_b.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh
        row_base = (off_b * Hq + off_h).to(tl.int64) * Tq
        num = tl.load(Q_NUM + off_b * stride_nb + off_h * stride_nh + start_n * stride_nn)
        idx_base = Q_IDX + off_b.to(tl.int64) * stride_ib + off_h.to(tl.int64) * stride_ih + start_n * stride_in
        full_num = tl.load(FULL_NUM + off_b * stride_fnb + off_h * stride_fnh + start_n * stride_fnn)
        full_base = (FULL_IDX + off_b.to(tl.int64) * stride_fib + off_h.to(tl.int64) * stride_fih
                     + start_n * stride_fin)
        if num > 0:
            dk, dv = _dkdv_blocks(
                dk, dv, k, v, q_base, do_base, LSE, DELTA, row_base, idx_base, stride_im, num, offs_n, off_b,
                kpm_base, stride_qt, stride_qd, stride_dot, stride_dod, stride_mj, Tq, Tk, qk_scale,
                window_left, window_right, diag_offset, n_global, QSEG, KSEG, stride_qsb, stride_qst, stride_ksb,
                stride_kst, HEAD_DIM_QK, HEAD_DIM_V, BLOCK_DQK, BLOCK_DV, BLOCK_M, True, HAS_WINDOW_LEFT,
                HAS_WINDOW_RIGHT, HAS_SEGMENTS, HAS_GLOBAL, HAS_KPM, UPCAST_DOT, DOT_PRECISION)
        if full_num > 0:
            dk, dv = _dkdv_blocks(
                dk, dv, k, v, q_base, do_base, LSE, DELTA, row_base, full_base, stride_fim, full_num, offs_n,
                off_b, kpm_base, stride_qt, stride_qd, stride_dot, stride_dod, stride_mj, Tq, Tk, qk_scale,
                window_left, window_right, diag_offset, n_global, QSEG, KSEG, stride_qsb, stride_qst, stride_ksb,
                stride_kst, HEAD_DIM_QK, HEAD_DIM_V, BLOCK_DQK, BLOCK_DV, BLOCK_M, False, HAS_WINDOW_LEFT,
                HAS_WINDOW_RIGHT, HAS_SEGMENTS, HAS_GLOBAL, HAS_KPM, UPCAST_DOT, DOT_PRECISION)
    tl.store(_tile_ptrs(DK + off_b.to(tl.int64) * stride_dkb + off_kvh.to(tl.int64) * stride_dkh, n0,
                        stride_dkt, stride_dkd, BLOCK_N, BLOCK_DQK, False), (dk * sm_scale).to(DK.dtype.element_ty),
             mask=n_ok[:, None] & (offs_dqk[None, :] < HEAD_DIM_QK))
    tl.store(_tile_ptrs(DV + off_b.to(tl.int64) * stride_dvb + off_kvh.to(tl.int64) * stride_dvh, n0,
                        stride_dvt, stride_dvd, BLOCK_N, BLOCK_DV, False), dv.to(DV.dtype.element_ty),
             mask=n_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V))


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
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    for it in range(0, num):
        start_n = tl.load(idx_base + it * stride_idx) * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < Tk
        k = tl.load(_tile_ptrs(k_base, start_n, stride_kt, stride_kd, BLOCK_N, BLOCK_DQK, False),
                    mask=n_ok[:, None] & (offs_dqk[None, :] < HEAD_DIM_QK), other=0.0)
        vT = tl.load(_tile_ptrs(v_base, start_n, stride_vt, stride_vd, BLOCK_N, BLOCK_DV, True),
                     mask=n_ok[None, :] & (offs_dv[:, None] < HEAD_DIM_V), other=0.0)
        s = _scores(q, tl.trans(k), offs_m, offs_n, b, kpm_base, stride_mj, Tq, Tk, qk_scale, window_left,
                    window_right, diag_offset, n_global, QSEG, KSEG, stride_qsb, stride_qst, stride_ksb, stride_kst,
                    BLOCK_N, APPLY_RULE, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT, HAS_SEGMENTS, HAS_GLOBAL, HAS_KPM,
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
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < Tq
    row_base = (off_b * Hq + off_h).to(tl.int64) * Tq
    q = tl.load(_tile_ptrs(Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh, m0,
                           stride_qt, stride_qd, BLOCK_M, BLOCK_DQK, False),
                mask=m_ok[:, None] & (offs_dqk[None, :] < HEAD_DIM_QK), other=0.0)
    do = tl.load(_tile_ptrs(DO + off_b.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh, m0,
                            stride_dot, stride_dod, BLOCK_M, BLOCK_DV, False),
                 mask=m_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
    lse2 = _load_lse2(LSE, row_base, offs_m, Tq)
    delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
    k_base = K + off_b.to(tl.int64) * stride_kb + off_kvh.to(tl.int64) * stride_kh
    v_base = V + off_b.to(tl.int64) * stride_vb + off_kvh.to(tl.int64) * stride_vh
    kpm_base = KPM + off_b.to(tl.int64) * stride_mb
    num = tl.load(KV_NUM + off_b * stride_nb + off_h * stride_nh + start_m * stride_nm)
    idx_base = KV_IDX + off_b.to(tl.int64) * stride_ib + off_h.to(tl.int64) * stride_ih + start_m * stride_im
    full_num = tl.load(FULL_NUM + off_b * stride_fnb + off_h * stride_fnh + start_m * stride_fnm)
    full_base = FULL_IDX + off_b.to(tl.int64) * stride_fib + off_h.to(tl.int64) * stride_fih + start_m * stride_fim
    dq = tl.zeros([BLOCK_M, BLOCK_DQK], dtype=tl.float32)
    if num > 0:
        dq = _dq_blocks(dq, q, do, lse2, delta, k_base, v_base, idx_base, stride_in, num, offs_m, off_b, kpm_base,
                        stride_kt, stride_kd, stride_vt, stride_vd, stride_mj, Tq, Tk, qk_scale,
                        window_left, window_right, diag_offset, n_global, QSEG, KSEG, stride_qsb, stride_qst,
                        stride_ksb, stride_kst, HEAD_DIM_QK, HEAD_DIM_V, BLOCK_DQK, BLOCK_DV, BLOCK_N, True,
                        HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT, HAS_SEGMENTS, HAS_GLOBAL, HAS_KPM, UPCAST_DOT,
                        DOT_PRECISION)
    if full_num > 0:
        dq = _dq_blocks(dq, q, do, lse2, delta, k_base, v_base, full_base, stride_fin, full_num, offs_m, off_b,
                        kpm_base, stride_kt, stride_kd, stride_vt, stride_vd, stride_mj, Tq, Tk, qk_scale,
                        window_left, window_right, diag_offset, n_global, QSEG, KSEG, stride_qsb, stride_qst,
                        stride_ksb, stride_kst, HEAD_DIM_QK, HEAD_DIM_V, BLOCK_DQK, BLOCK_DV, BLOCK_N, False,
                        HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT, HAS_SEGMENTS, HAS_GLOBAL, HAS_KPM, UPCAST_DOT,
                        DOT_PRECISION)
    tl.store(_tile_ptrs(DQ + off_b.to(tl.int64) * stride_dqb + off_h.to(tl.int64) * stride_dqh, m0,
                        stride_dqt, stride_dqd, BLOCK_M, BLOCK_DQK, False), (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=m_ok[:, None] & (offs_dqk[None, :] < HEAD_DIM_QK))


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
