"""Relative-position ("band") attention in Triton: forward and backward.

Funnel-Transformer's relative-position term, computed per tile inside the kernel instead of as extra
Q/K features. Per batch ``b``, query head ``h`` (KV head ``h // (H // Hkv)``), query row ``i``, key ``j``
(the semantics of ``effattn.relpos_attention``; the oracle: ``effattn.reference.relpos_attention``)::

    t(i, j) = rel_stride*i - j + Tk - 1          row of the position table R[h]  (NR = rel_stride*(Tq-1) + Tk)
    extra   = not (separate_cls and (i == 0 or j == 0))
    z(i, j) = q_i . k_j + extra * (qr_i . R[h, t(i, j)] + tt[i, same(i, j)])
    s       = scale * z  (-inf at padded keys),  out = softmax_j(s) V,  lse = logsumexp_j(s)

Band. For a tile of query rows ``[m0, m0 + BM)`` and keys ``[n0, n0 + BN)`` the distances form the
contiguous table rows ``t0 + w``, ``t0 = rel_stride*m0 - (n0 + BN - 1) + Tk - 1``, ``0 <= w < W``,
``W = rel_stride*(BM - 1) + BN``, padded to the power of two ``BW``. One matmul gives every position score
of the tile, ``P_band = Qr_tile . R_band^T`` (BM x BW), and each pair reads its own column::

    pos(i, j) = P_band[i, rel_stride*(i - m0) - (j - n0) + BN - 1]        (tl.gather along axis 1)

The launchers pick ``BM = BN / rel_stride`` (a power of two, at least 16), so that ``W < 2 BN = BW``: the
band matmul costs at most 2x the content one, ``Q K^T`` (the contract's ``1 + rel_stride*BM/BN``), so the
score matmuls of a tile cost <= 3x flash's ``Q K^T`` (plus ``P V`` as in flash). The gather itself is
no matmul (on sm_90 Triton lowers it through shared memory / shuffles). The token-type term is a select
between two per-row scalars (``tt[i, 0]``, ``tt[i, 1]``) on the types of the pair.

Backward (``g = dL/ds = P∘(dP - delta)``, ``dP = dO V^T (∘Z)``, ``delta = rowsum(dO∘O) - dlse``, the
gradient of ``z`` is ``scale·g``)::

    dq = scale·g K,  dk = scale·g^T Q,  dv = (P∘Z)^T dO,
    dqr_i = scale·sum_j extra·g_ij R[t(i,j)],   dR[h, t] = scale·sum_{b, (i,j): t(i,j)=t} extra·g_ij qr_i,
    dtt[i, 1] = scale·sum_j extra·same·g_ij,    dtt[i, 0] = scale·sum_j extra·(1 - same)·g_ij.

* ``_relpos_bwd_dkdv_kernel``: one program per (key tile, KV head, batch), streaming query tiles of
  its GQA group (as flash's): dk, dv.
* ``_relpos_bwd_dq_kernel``: one program per (query tile, head, batch), streaming key tiles: dq, dqr,
  dtt. dqr is the gather transposed: within a row, distance and key are one-to-one, so
  ``dP_band[i, w] = extra·g[i, j]`` at ``j - n0 = rel_stride*(i - m0) + BN - 1 - w`` (0 where that key is
  outside the tile) is a ``tl.gather`` of ``g`` with the inverse index, and ``dqr += dP_band . R_band``.
* ``_relpos_bwd_dr_kernel``: dR without float atomics. One program per (table tile of BT rows
  ``[t0, t0 + BT)``, head, batch) owns those rows and recomputes the pairs that read them: for a query
  tile ``[m0, m0 + BM)``, the keys with ``t(i, j)`` in the tile form the band
  ``j = jb + c``, ``jb = rel_stride*m0 + Tk - 1 - t0 - (BT - 1)``, ``0 <= c < KW = rel_stride*(BM-1) + BT``
  (padded to ``BKW``), and the table row of pair (i, c) is ``t0 + rel_stride*(i-m0) - c + BT - 1``. The
  program recomputes ``S`` and ``dP`` on that BM x BKW key band (two matmuls), ``g`` there, gathers
  ``g`` back to table order, ``gT[i, r] = g[i, c = rel_stride*(i-m0) + BT - 1 - r]`` (BM x BT; always
  inside the band), and accumulates ``dR_tile += gT^T . Qr_tile``. Only query tiles whose rows can reach
  the table tile are visited, so the work is ``~ Tq·Tk·BKW/BT`` pair-evaluations per (b, h): with
  ``BT = rel_stride·BM`` that is 2x the pairs, i.e. about the cost of two extra ``Q K^T`` + ``dO V^T``
  passes (the dq kernel's score work once more, x2). Each (b, h) writes its own fp32 partial
  ``(B, H, NR, D)`` (O(T) memory: the size of ``qr`` times ``NR / Tq``, i.e. <= (rel_stride + Tk/Tq)x),
  then ``_batch_sum_kernel`` adds the batch in index order (B == 1 writes dR directly). Deterministic:
  every output element is written by one program, every sum runs in a fixed order.

No tensor of size Tq x Tk is formed; beyond the inputs the backward holds delta (B, H, Tq) and the dR
partials above.

Dropout (optional): the keep mask is flash's (``_dropout_keep``: Philox on ``(j, i, b*H + h, 0)``),
regenerated in every kernel; kept probabilities are scaled by ``dropout_scale``.

Precision: fp16/bf16/fp32 inputs, fp32 accumulation; under the interpreter bf16 dots run in fp32
(Triton 3.9's interpreter computes bf16 ``tl.dot`` wrongly), as in :mod:`effattn.kernels.flash_attn`.
Tiles are fixed per head-dim class (no autotuning: the tables below are not yet tuned on a GPU);
``forced_configs`` overrides them.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from effattn import limits
from effattn.kernels._attn_common import (
    LOG2E,
    _dot,
    _head_base,
    _load_row_stats,
    _load_tile,
    _online_softmax,
    _softmax_epilogue,
    _store_tile,
)
from effattn.kernels.flash_attn import (
    INTERPRET,
    PREPROCESS_BLOCK_M,
    _block_d,
    _bwd_preprocess_kernel,
    _dot_precision,
    _dropout_keep,
    _on_tensor_device,
)
from effattn.reference import dropout_scale, dropout_threshold

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256  # of qr/R/q/k and of v: the widest class of the tables below
MIN_BLOCK = 16  # tl.dot needs every side >= 16
BATCH_SUM_BLOCK = 1024  # elements of dR per program of the batch reduction

# Every output buffer of the launchers comes from here (tests swap in a NaN-filling allocator).
_alloc = torch.empty

# ----------------------------------------------------------------------------------------------
# tiles: per head-dim class (max of the padded QK and V head dims)
# ----------------------------------------------------------------------------------------------
# fwd / bwd_kv / bwd_q: (BLOCK_M, BLOCK_N, num_warps, num_stages); the launcher lowers BLOCK_M to
# BLOCK_N // rel_stride (at least 16), so the band is at most 2 BLOCK_N rows.
# bwd_dr: (BLOCK_T, BLOCK_M, num_warps, num_stages); BLOCK_M lowered to BLOCK_T // rel_stride.
# Ordered by the register spills of Triton 3.9's sm_90 compile (fp16/bf16, least first; not yet timed on a
# GPU): the first that fits the device runs.
CONFIGS = {
    "fwd": {64: [(64, 64, 8, 2), (32, 32, 4, 2)], 128: [(64, 64, 8, 2), (32, 32, 4, 1)],
            256: [(32, 32, 4, 1), (16, 32, 4, 1)]},
    "bwd_kv": {64: [(32, 32, 4, 1), (64, 64, 8, 1)], 128: [(32, 64, 8, 1), (32, 32, 4, 1)],
               256: [(16, 32, 4, 1), (16, 16, 4, 1)]},
    "bwd_q": {64: [(32, 32, 4, 1), (64, 64, 8, 1)], 128: [(32, 64, 8, 1), (32, 32, 4, 1)],
              256: [(16, 32, 4, 1), (16, 16, 4, 1)]},
    "bwd_dr": {64: [(32, 16, 4, 1), (64, 32, 8, 1)], 128: [(32, 32, 8, 1), (32, 16, 4, 1)],
               256: [(16, 16, 4, 1)]},
}
HEAD_DIM_CLASSES = (64, 128, 256)
# Under the interpreter: small tiles, so that tests cover several tiles and ragged edges.
INTERPRET_CONFIGS = {"fwd": (16, 16, 4, 1), "bwd_kv": (16, 16, 4, 1), "bwd_q": (16, 16, 4, 1),
                     "bwd_dr": (16, 16, 4, 1)}

_forced_configs: dict[str, tuple[int, int, int, int]] = {}


@contextlib.contextmanager
def forced_configs(fwd=None, bwd_kv=None, bwd_q=None, bwd_dr=None):
    """Run the kernels with the given configs (see ``CONFIGS`` for their meaning) instead of the tables'."""
    saved = dict(_forced_configs)
    _forced_configs.update({k: v for k, v in (("fwd", fwd), ("bwd_kv", bwd_kv), ("bwd_q", bwd_q),
                                              ("bwd_dr", bwd_dr)) if v})
    try:
        yield
    finally:
        _forced_configs.clear()
        _forced_configs.update(saved)


def head_dim_class(head_dim: int) -> int:
    return min(d for d in HEAD_DIM_CLASSES if d >= head_dim)


def _prev_pow2(x: int) -> int:
    return 1 << (max(1, x).bit_length() - 1)


def _row_block(bm: int, bn: int, rel_stride: int) -> int:
    """Query rows per tile: ``bm`` lowered so that ``rel_stride * BM <= bn`` (not below 16)."""
    return max(MIN_BLOCK, min(bm, _prev_pow2(bn // rel_stride)))


def band_width(bm: int, bn: int, rel_stride: int) -> int:
    """Padded band width of a BM x BN tile: ``next_pow2(rel_stride*(BM-1) + BN)``."""
    return triton.next_power_of_2(rel_stride * (bm - 1) + bn)


def _candidates(kind: str, block_d: int):
    forced = _forced_configs.get(kind)
    if forced:
        return [forced]
    if INTERPRET:
        return [INTERPRET_CONFIGS[kind]]
    return CONFIGS[kind][head_dim_class(block_d)]


def _launch(kernel, kind: str, grid_fn, args, constexprs, rel_stride: int):
    """Launch with the first config of the class that fits the device (fp32 tiles need more room)."""
    candidates = _candidates(kind, max(constexprs["BLOCK_DQK"], constexprs["BLOCK_DV"]))
    for n, (b0, b1, warps, stages) in enumerate(candidates):
        if kind == "bwd_dr":
            meta = dict(BLOCK_T=b0, BLOCK_M=_row_block(b1, b0, rel_stride))
            meta["BLOCK_KW"] = band_width(meta["BLOCK_M"], meta["BLOCK_T"], rel_stride)
        else:
            meta = dict(BLOCK_M=_row_block(b0, b1, rel_stride), BLOCK_N=b1)
            meta["BLOCK_W"] = band_width(meta["BLOCK_M"], b1, rel_stride)
        try:
            kernel[grid_fn(meta)](*args, **constexprs, **meta, num_warps=warps, num_stages=stages)
            return
        except OutOfResources:
            if n == len(candidates) - 1:
                raise


# ----------------------------------------------------------------------------------------------
# device helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _load_rows(base, start, stride_t, stride_d, T, DIM: tl.constexpr, BLOCK_T: tl.constexpr,
               BLOCK_D: tl.constexpr, TRANSPOSED: tl.constexpr):
    """Rows ``[start, start + BLOCK_T)`` of a ``(T, DIM)`` matrix (``start`` may be negative), zero
    outside ``[0, T) x [0, DIM)``; as a ``(BLOCK_T, BLOCK_D)`` tile or its transpose."""
    t = start + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    t_ok = (t >= 0) & (t < T)
    t64 = tl.where(t_ok, t, 0).to(tl.int64)
    if TRANSPOSED:
        return tl.load(base + t64[None, :] * stride_t + d[:, None] * stride_d,
                       mask=t_ok[None, :] & (d[:, None] < DIM), other=0.0)
    else:
        return tl.load(base + t64[:, None] * stride_t + d[None, :] * stride_d,
                       mask=t_ok[:, None] & (d[None, :] < DIM), other=0.0)


@triton.jit
def _key_side(KPM, KT, b, offs_n, Tk, stride_kpb, stride_kpt, stride_ktb, stride_ktt,
              HAS_KPM: tl.constexpr, HAS_TT: tl.constexpr):
    """Per key: visible (in range and not padded) and token type (0 without ``tt``)."""
    n_ok = (offs_n >= 0) & (offs_n < Tk)
    n64 = tl.where(n_ok, offs_n, 0).to(tl.int64)
    visible = n_ok
    if HAS_KPM:
        keep = tl.load(KPM + b.to(tl.int64) * stride_kpb + n64 * stride_kpt, mask=n_ok, other=0)
        visible = visible & (keep != 0)
    ktype = tl.zeros_like(offs_n)
    if HAS_TT:
        ktype = tl.load(KT + b.to(tl.int64) * stride_ktb + n64 * stride_ktt, mask=n_ok, other=0)
    return visible, ktype


@triton.jit
def _query_side(TT, QT, b, h, offs_m, Tq, stride_ttb, stride_tth, stride_ttt, stride_ttc,
                stride_qtb, stride_qtt, HAS_TT: tl.constexpr):
    """Per query row: ``tt[i, 0]`` (different type), ``tt[i, 1]`` (same type), token type; zeros without ``tt``."""
    m_ok = offs_m < Tq
    tt0 = tl.zeros(offs_m.shape, dtype=tl.float32)
    tt1 = tl.zeros(offs_m.shape, dtype=tl.float32)
    qtype = tl.zeros_like(offs_m)
    if HAS_TT:
        tt_rows = _head_base(TT, b, h, stride_ttb, stride_tth) + offs_m.to(tl.int64) * stride_ttt
        tt0 = tl.load(tt_rows, mask=m_ok, other=0.0).to(tl.float32)
        tt1 = tl.load(tt_rows + stride_ttc, mask=m_ok, other=0.0).to(tl.float32)
        qtype = tl.load(QT + b.to(tl.int64) * stride_qtb + offs_m.to(tl.int64) * stride_qtt, mask=m_ok, other=0)
    return tt0, tt1, qtype


@triton.jit
def _same_type(qtype, ktype, cls_type):
    """Pairs of the same token type (a [cls]-typed token matches every type): ``(BM, BN)``."""
    return (qtype[:, None] == ktype[None, :]) | (qtype[:, None] == cls_type) | (ktype[None, :] == cls_type)


@triton.jit
def _extra_pairs(offs_m, offs_n, SEPARATE_CLS: tl.constexpr):
    """Pairs that get the position and type terms: all, or with ``separate_cls`` none of row / column 0."""
    if SEPARATE_CLS:
        return (offs_m[:, None] != 0) & (offs_n[None, :] != 0)
    else:
        return (offs_m[:, None] >= 0) & (offs_n[None, :] >= 0)


@triton.jit
def _band_index(REL_STRIDE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Column of pair (i, j) of a tile in its band: ``rel_stride*i - j + BLOCK_N - 1`` (tile-local i, j)."""
    i = tl.arange(0, BLOCK_M)
    j = tl.arange(0, BLOCK_N)
    return REL_STRIDE * i[:, None] - j[None, :] + (BLOCK_N - 1)


@triton.jit
def _band_start(m0, n0, Tk, REL_STRIDE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Table row of band column 0 of the tile at (m0, n0)."""
    return REL_STRIDE * m0 - n0 - (BLOCK_N - 1) + Tk - 1


@triton.jit
def _tile_logits(qk, p_band, band_idx, tt0, tt1, qtype, ktype, extra, cls_type, HAS_TT: tl.constexpr):
    """``z = q.k + extra·(pos + typ)`` for a tile: pos gathered from ``P_band``, typ selected from tt."""
    rel = tl.gather(p_band, band_idx, axis=1)
    if HAS_TT:
        rel += tl.where(_same_type(qtype, ktype, cls_type), tt1[:, None], tt0[:, None])
    return qk + tl.where(extra, rel, 0.0)


@triton.jit
def _tile_probs_and_grad(q, qr, do, k, vT, r_band, lse2, delta, tt0, tt1, qtype, ktype, k_visible,
                         offs_m, offs_n, band_idx, cls_type, qk_scale, seed, bh, drop_threshold, drop_scale,
                         HAS_TT: tl.constexpr, SEPARATE_CLS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                         UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Backward of one tile: ``P∘Z`` (dropout applied) and ``g = P∘(dP - delta)``, ``(BM, BN)`` fp32, and the
    ``extra`` mask. ``k`` is ``(BN, D)``, ``vT`` ``(Dv, BN)``, ``r_band`` the table rows the tile reads
    (``(BW, D)``; the dR kernel's table tile) and ``band_idx`` the row of each pair in it."""
    bm: tl.constexpr = q.shape[0]
    bn: tl.constexpr = k.shape[0]
    qk = _dot(q, tl.trans(k), tl.zeros([bm, bn], dtype=tl.float32), UPCAST_DOT, DOT_PRECISION)
    p_band = _dot(qr, tl.trans(r_band), tl.zeros([bm, r_band.shape[0]], dtype=tl.float32), UPCAST_DOT,
                  DOT_PRECISION)
    extra = _extra_pairs(offs_m, offs_n, SEPARATE_CLS)
    z = _tile_logits(qk, p_band, band_idx, tt0, tt1, qtype, ktype, extra, cls_type, HAS_TT)
    s = tl.where(k_visible[None, :], z * qk_scale, float("-inf"))
    p = tl.math.exp2(s - lse2[:, None])
    dp = _dot(do, vT, tl.zeros([bm, bn], dtype=tl.float32), UPCAST_DOT, DOT_PRECISION)
    if HAS_DROPOUT:
        keep = _dropout_keep(seed, bh, offs_m[:, None], offs_n[None, :], drop_threshold)
        p_drop = tl.where(keep, p * drop_scale, 0.0)
        dp = tl.where(keep, dp * drop_scale, 0.0)
    else:
        p_drop = p
    g = p * (dp - delta[:, None])
    return p_drop, g, extra


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _relpos_fwd_kernel(
    Q, K, V, QR, R, TT, QT, KT, KPM, O, LSE,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_qrb, stride_qrh, stride_qrt, stride_qrd,
    stride_rh, stride_rt, stride_rd,
    stride_ttb, stride_tth, stride_ttt, stride_ttc,
    stride_qtb, stride_qtt, stride_ktb, stride_ktt, stride_kpb, stride_kpt,
    stride_ob, stride_oh, stride_ot, stride_od,
    H, GROUP, Tq, Tk, NR, qk_scale, cls_type, seed, drop_threshold, drop_scale,
    HEAD_DIM_QK: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    REL_STRIDE: tl.constexpr, SEPARATE_CLS: tl.constexpr, HAS_TT: tl.constexpr, HAS_KPM: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """One program: BLOCK_M query rows of one (batch, head) against all keys: O and LSE."""
    start_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    bh = b * H + h
    hk = h // GROUP
    m0 = start_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)

    q = _load_tile(_head_base(Q, b, h, stride_qb, stride_qh), m0, stride_qt, stride_qd, Tq, HEAD_DIM_QK,
                   BLOCK_M, BLOCK_DQK, False)
    qr = _load_tile(_head_base(QR, b, h, stride_qrb, stride_qrh), m0, stride_qrt, stride_qrd, Tq, HEAD_DIM_QK,
                    BLOCK_M, BLOCK_DQK, False)
    tt0, tt1, qtype = _query_side(TT, QT, b, h, offs_m, Tq, stride_ttb, stride_tth, stride_ttt, stride_ttc,
                                  stride_qtb, stride_qtt, HAS_TT)
    k_base = _head_base(K, b, hk, stride_kb, stride_kh)
    v_base = _head_base(V, b, hk, stride_vb, stride_vh)
    r_base = R + h.to(tl.int64) * stride_rh
    band_idx = _band_index(REL_STRIDE, BLOCK_M, BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for n0 in range(0, Tk, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        kT = _load_tile(k_base, n0, stride_kt, stride_kd, Tk, HEAD_DIM_QK, BLOCK_N, BLOCK_DQK, True)
        v = _load_tile(v_base, n0, stride_vt, stride_vd, Tk, HEAD_DIM_V, BLOCK_N, BLOCK_DV, False)
        rT = _load_rows(r_base, _band_start(m0, n0, Tk, REL_STRIDE, BLOCK_N), stride_rt, stride_rd, NR,
                        HEAD_DIM_QK, BLOCK_W, BLOCK_DQK, True)
        k_visible, ktype = _key_side(KPM, KT, b, offs_n, Tk, stride_kpb, stride_kpt, stride_ktb, stride_ktt,
                                     HAS_KPM, HAS_TT)
        # -- z = Q K^T + gather(Qr R_band^T) + type select; log2-domain scores, -inf at hidden keys --
        qk = _dot(q, kT, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), UPCAST_DOT, DOT_PRECISION)
        p_band = _dot(qr, rT, tl.zeros([BLOCK_M, BLOCK_W], dtype=tl.float32), UPCAST_DOT, DOT_PRECISION)
        z = _tile_logits(qk, p_band, band_idx, tt0, tt1, qtype, ktype, _extra_pairs(offs_m, offs_n, SEPARATE_CLS),
                         cls_type, HAS_TT)
        s = tl.where(k_visible[None, :], z * qk_scale, float("-inf"))
        # -- online softmax; acc += (P∘keep) V --
        p, m_i, l_i, acc = _online_softmax(s, m_i, l_i, acc)
        if HAS_DROPOUT:
            p = tl.where(_dropout_keep(seed, bh, offs_m[:, None], offs_n[None, :], drop_threshold), p, 0.0)
        acc = _dot(p.to(v.dtype), v, acc, UPCAST_DOT, DOT_PRECISION)

    out, lse = _softmax_epilogue(acc, l_i, m_i)
    if HAS_DROPOUT:
        out = out * drop_scale
    _store_tile(_head_base(O, b, h, stride_ob, stride_oh), m0, stride_ot, stride_od, out, Tq, HEAD_DIM_V,
                BLOCK_M, BLOCK_DV)
    tl.store(LSE + bh.to(tl.int64) * Tq + offs_m, lse, mask=offs_m < Tq)


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _relpos_bwd_dkdv_kernel(
    Q, K, V, QR, R, TT, QT, KT, KPM, DO, LSE, DELTA, DK, DV,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_qrb, stride_qrh, stride_qrt, stride_qrd,
    stride_rh, stride_rt, stride_rd,
    stride_ttb, stride_tth, stride_ttt, stride_ttc,
    stride_qtb, stride_qtt, stride_ktb, stride_ktt, stride_kpb, stride_kpt,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dkb, stride_dkh, stride_dkt, stride_dkd,
    stride_dvb, stride_dvh, stride_dvt, stride_dvd,
    H, GROUP, Tq, Tk, NR, sm_scale, qk_scale, cls_type, seed, drop_threshold, drop_scale,
    HEAD_DIM_QK: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    REL_STRIDE: tl.constexpr, SEPARATE_CLS: tl.constexpr, HAS_TT: tl.constexpr, HAS_KPM: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """One program: dK, dV of BLOCK_N keys of one (batch, KV head), summed over its GQA query heads."""
    start_n = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2)
    n0 = start_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)

    k = _load_tile(_head_base(K, b, hk, stride_kb, stride_kh), n0, stride_kt, stride_kd, Tk, HEAD_DIM_QK,
                   BLOCK_N, BLOCK_DQK, False)
    vT = _load_tile(_head_base(V, b, hk, stride_vb, stride_vh), n0, stride_vt, stride_vd, Tk, HEAD_DIM_V,
                    BLOCK_N, BLOCK_DV, True)
    k_visible, ktype = _key_side(KPM, KT, b, offs_n, Tk, stride_kpb, stride_kpt, stride_ktb, stride_ktt,
                                 HAS_KPM, HAS_TT)
    band_idx = _band_index(REL_STRIDE, BLOCK_M, BLOCK_N)
    dk = tl.zeros([BLOCK_N, BLOCK_DQK], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for g_head in range(0, GROUP):
        h = hk * GROUP + g_head
        bh = b * H + h
        q_base = _head_base(Q, b, h, stride_qb, stride_qh)
        qr_base = _head_base(QR, b, h, stride_qrb, stride_qrh)
        do_base = _head_base(DO, b, h, stride_dob, stride_doh)
        r_base = R + h.to(tl.int64) * stride_rh
        row_base = bh.to(tl.int64) * Tq
        for m0 in range(0, Tq, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            q = _load_tile(q_base, m0, stride_qt, stride_qd, Tq, HEAD_DIM_QK, BLOCK_M, BLOCK_DQK, False)
            qr = _load_tile(qr_base, m0, stride_qrt, stride_qrd, Tq, HEAD_DIM_QK, BLOCK_M, BLOCK_DQK, False)
            do = _load_tile(do_base, m0, stride_dot, stride_dod, Tq, HEAD_DIM_V, BLOCK_M, BLOCK_DV, False)
            r_band = _load_rows(r_base, _band_start(m0, n0, Tk, REL_STRIDE, BLOCK_N), stride_rt, stride_rd, NR,
                                HEAD_DIM_QK, BLOCK_W, BLOCK_DQK, False)
            lse2, delta = _load_row_stats(LSE, DELTA, row_base, offs_m, Tq)
            tt0, tt1, qtype = _query_side(TT, QT, b, h, offs_m, Tq, stride_ttb, stride_tth, stride_ttt, stride_ttc,
                                          stride_qtb, stride_qtt, HAS_TT)
            p_drop, g, extra = _tile_probs_and_grad(
                q, qr, do, k, vT, r_band, lse2, delta, tt0, tt1, qtype, ktype, k_visible, offs_m, offs_n, band_idx,
                cls_type, qk_scale, seed, bh, drop_threshold, drop_scale,
                HAS_TT, SEPARATE_CLS, HAS_DROPOUT, UPCAST_DOT, DOT_PRECISION)
            # -- dV += (P∘Z)^T dO ; dK += g^T Q --
            dv = _dot(tl.trans(p_drop.to(do.dtype)), do, dv, UPCAST_DOT, DOT_PRECISION)
            dk = _dot(tl.trans(g.to(q.dtype)), q, dk, UPCAST_DOT, DOT_PRECISION)

    _store_tile(_head_base(DK, b, hk, stride_dkb, stride_dkh), n0, stride_dkt, stride_dkd, dk * sm_scale, Tk,
                HEAD_DIM_QK, BLOCK_N, BLOCK_DQK)
    _store_tile(_head_base(DV, b, hk, stride_dvb, stride_dvh), n0, stride_dvt, stride_dvd, dv, Tk,
                HEAD_DIM_V, BLOCK_N, BLOCK_DV)


@triton.jit
def _relpos_bwd_dq_kernel(
    Q, K, V, QR, R, TT, QT, KT, KPM, DO, LSE, DELTA, DQ, DQR, DTT,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_qrb, stride_qrh, stride_qrt, stride_qrd,
    stride_rh, stride_rt, stride_rd,
    stride_ttb, stride_tth, stride_ttt, stride_ttc,
    stride_qtb, stride_qtt, stride_ktb, stride_ktt, stride_kpb, stride_kpt,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dqb, stride_dqh, stride_dqt, stride_dqd,
    stride_dqrb, stride_dqrh, stride_dqrt, stride_dqrd,
    stride_dttb, stride_dtth, stride_dttt, stride_dttc,
    H, GROUP, Tq, Tk, NR, sm_scale, qk_scale, cls_type, seed, drop_threshold, drop_scale,
    HEAD_DIM_QK: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    REL_STRIDE: tl.constexpr, SEPARATE_CLS: tl.constexpr, HAS_TT: tl.constexpr, HAS_KPM: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """One program: dQ, dQr and dtt of BLOCK_M query rows of one (batch, head), streaming all keys."""
    start_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    bh = b * H + h
    hk = h // GROUP
    m0 = start_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)

    q = _load_tile(_head_base(Q, b, h, stride_qb, stride_qh), m0, stride_qt, stride_qd, Tq, HEAD_DIM_QK,
                   BLOCK_M, BLOCK_DQK, False)
    qr = _load_tile(_head_base(QR, b, h, stride_qrb, stride_qrh), m0, stride_qrt, stride_qrd, Tq, HEAD_DIM_QK,
                    BLOCK_M, BLOCK_DQK, False)
    do = _load_tile(_head_base(DO, b, h, stride_dob, stride_doh), m0, stride_dot, stride_dod, Tq, HEAD_DIM_V,
                    BLOCK_M, BLOCK_DV, False)
    lse2, delta = _load_row_stats(LSE, DELTA, bh.to(tl.int64) * Tq, offs_m, Tq)
    tt0, tt1, qtype = _query_side(TT, QT, b, h, offs_m, Tq, stride_ttb, stride_tth, stride_ttt, stride_ttc,
                                  stride_qtb, stride_qtt, HAS_TT)
    k_base = _head_base(K, b, hk, stride_kb, stride_kh)
    v_base = _head_base(V, b, hk, stride_vb, stride_vh)
    r_base = R + h.to(tl.int64) * stride_rh
    band_idx = _band_index(REL_STRIDE, BLOCK_M, BLOCK_N)
    # inverse of the band index: the key (tile-local) of band column w in row i, valid in [0, BLOCK_N)
    key_of_w = (REL_STRIDE * tl.arange(0, BLOCK_M)[:, None] - tl.arange(0, BLOCK_W)[None, :] + (BLOCK_N - 1))
    w_ok = (key_of_w >= 0) & (key_of_w < BLOCK_N)
    key_of_w = tl.minimum(tl.maximum(key_of_w, 0), BLOCK_N - 1)

    dq = tl.zeros([BLOCK_M, BLOCK_DQK], dtype=tl.float32)
    dqr = tl.zeros([BLOCK_M, BLOCK_DQK], dtype=tl.float32)
    dtt0 = tl.zeros([BLOCK_M], dtype=tl.float32)
    dtt1 = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(0, Tk, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, n0, stride_kt, stride_kd, Tk, HEAD_DIM_QK, BLOCK_N, BLOCK_DQK, False)
        vT = _load_tile(v_base, n0, stride_vt, stride_vd, Tk, HEAD_DIM_V, BLOCK_N, BLOCK_DV, True)
        r_band = _load_rows(r_base, _band_start(m0, n0, Tk, REL_STRIDE, BLOCK_N), stride_rt, stride_rd, NR,
                            HEAD_DIM_QK, BLOCK_W, BLOCK_DQK, False)
        k_visible, ktype = _key_side(KPM, KT, b, offs_n, Tk, stride_kpb, stride_kpt, stride_ktb, stride_ktt,
                                     HAS_KPM, HAS_TT)
        _, g, extra = _tile_probs_and_grad(
            q, qr, do, k, vT, r_band, lse2, delta, tt0, tt1, qtype, ktype, k_visible, offs_m, offs_n, band_idx,
            cls_type, qk_scale, seed, bh, drop_threshold, drop_scale,
            HAS_TT, SEPARATE_CLS, HAS_DROPOUT, UPCAST_DOT, DOT_PRECISION)
        # -- dQ += g K --
        dq = _dot(g.to(k.dtype), k, dq, UPCAST_DOT, DOT_PRECISION)
        g_rel = tl.where(extra, g, 0.0)
        # -- dtt: row sums of g split by same / different type --
        if HAS_TT:
            same = _same_type(qtype, ktype, cls_type)
            dtt1 += tl.sum(tl.where(same, g_rel, 0.0), axis=1)
            dtt0 += tl.sum(tl.where(same, 0.0, g_rel), axis=1)
        # -- dQr += dP_band R_band, dP_band = g scattered to band columns (a gather with the inverse index) --
        dp_band = tl.where(w_ok, tl.gather(g_rel, key_of_w, axis=1), 0.0)
        dqr = _dot(dp_band.to(r_band.dtype), r_band, dqr, UPCAST_DOT, DOT_PRECISION)

    q_rows = offs_m < Tq
    _store_tile(_head_base(DQ, b, h, stride_dqb, stride_dqh), m0, stride_dqt, stride_dqd, dq * sm_scale, Tq,
                HEAD_DIM_QK, BLOCK_M, BLOCK_DQK)
    _store_tile(_head_base(DQR, b, h, stride_dqrb, stride_dqrh), m0, stride_dqrt, stride_dqrd, dqr * sm_scale, Tq,
                HEAD_DIM_QK, BLOCK_M, BLOCK_DQK)
    if HAS_TT:
        dtt_rows = _head_base(DTT, b, h, stride_dttb, stride_dtth) + offs_m.to(tl.int64) * stride_dttt
        tl.store(dtt_rows, (dtt0 * sm_scale).to(DTT.dtype.element_ty), mask=q_rows)
        tl.store(dtt_rows + stride_dttc, (dtt1 * sm_scale).to(DTT.dtype.element_ty), mask=q_rows)


@triton.jit
def _relpos_bwd_dr_kernel(
    Q, K, V, QR, TT, QT, KT, KPM, DO, LSE, DELTA, R, DR,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_qrb, stride_qrh, stride_qrt, stride_qrd,
    stride_rh, stride_rt, stride_rd,
    stride_ttb, stride_tth, stride_ttt, stride_ttc,
    stride_qtb, stride_qtt, stride_ktb, stride_ktt, stride_kpb, stride_kpt,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_drb, stride_drh, stride_drt, stride_drd,
    H, GROUP, Tq, Tk, NR, sm_scale, qk_scale, cls_type, seed, drop_threshold, drop_scale,
    HEAD_DIM_QK: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    REL_STRIDE: tl.constexpr, SEPARATE_CLS: tl.constexpr, HAS_TT: tl.constexpr, HAS_KPM: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_KW: tl.constexpr,
):
    """One program: the contribution of batch ``b`` to table rows ``[t0, t0 + BLOCK_T)`` of dR[h].

    Visits the query tiles whose rows reach those table rows; for each, the key band of the pairs that
    read them (``j = jb + c``), where it recomputes g and gathers it back to table order."""
    start_t = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    bh = b * H + h
    hk = h // GROUP
    t0 = start_t * BLOCK_T

    r_tile = _load_rows(R + h.to(tl.int64) * stride_rh, t0, stride_rt, stride_rd, NR, HEAD_DIM_QK, BLOCK_T,
                        BLOCK_DQK, False)
    q_base = _head_base(Q, b, h, stride_qb, stride_qh)
    qr_base = _head_base(QR, b, h, stride_qrb, stride_qrh)
    do_base = _head_base(DO, b, h, stride_dob, stride_doh)
    k_base = _head_base(K, b, hk, stride_kb, stride_kh)
    v_base = _head_base(V, b, hk, stride_vb, stride_vh)
    row_base = bh.to(tl.int64) * Tq
    il = tl.arange(0, BLOCK_M)
    # table row (tile-local) of pair (i, c) of the band, and its inverse: the band column of table row r
    r_of_c = REL_STRIDE * il[:, None] - tl.arange(0, BLOCK_KW)[None, :] + (BLOCK_T - 1)
    c_ok = (r_of_c >= 0) & (r_of_c < BLOCK_T)
    r_of_c = tl.minimum(tl.maximum(r_of_c, 0), BLOCK_T - 1)
    c_of_r = REL_STRIDE * il[:, None] - tl.arange(0, BLOCK_T)[None, :] + (BLOCK_T - 1)  # in [0, KW)

    # query rows reaching the tile: rel_stride*i in [t0 - (Tk - 1), t0 + BLOCK_T - 1]
    i_lo = (tl.maximum(t0 - (Tk - 1), 0) + (REL_STRIDE - 1)) // REL_STRIDE
    i_hi = tl.minimum(Tq, (t0 + BLOCK_T - 1) // REL_STRIDE + 1)
    dr = tl.zeros([BLOCK_T, BLOCK_DQK], dtype=tl.float32)
    for m0 in range((i_lo // BLOCK_M) * BLOCK_M, i_hi, BLOCK_M):
        offs_m = m0 + il
        jb = REL_STRIDE * m0 + (Tk - 1) - t0 - (BLOCK_T - 1)
        offs_n = jb + tl.arange(0, BLOCK_KW)
        q = _load_tile(q_base, m0, stride_qt, stride_qd, Tq, HEAD_DIM_QK, BLOCK_M, BLOCK_DQK, False)
        qr = _load_tile(qr_base, m0, stride_qrt, stride_qrd, Tq, HEAD_DIM_QK, BLOCK_M, BLOCK_DQK, False)
        do = _load_tile(do_base, m0, stride_dot, stride_dod, Tq, HEAD_DIM_V, BLOCK_M, BLOCK_DV, False)
        k = _load_rows(k_base, jb, stride_kt, stride_kd, Tk, HEAD_DIM_QK, BLOCK_KW, BLOCK_DQK, False)
        vT = _load_rows(v_base, jb, stride_vt, stride_vd, Tk, HEAD_DIM_V, BLOCK_KW, BLOCK_DV, True)
        lse2, delta = _load_row_stats(LSE, DELTA, row_base, offs_m, Tq)
        tt0, tt1, qtype = _query_side(TT, QT, b, h, offs_m, Tq, stride_ttb, stride_tth, stride_ttt, stride_ttc,
                                      stride_qtb, stride_qtt, HAS_TT)
        k_visible, ktype = _key_side(KPM, KT, b, offs_n, Tk, stride_kpb, stride_kpt, stride_ktb, stride_ktt,
                                     HAS_KPM, HAS_TT)
        # pairs of the key band whose table row is outside the tile get a clamped (wrong) position score;
        # c_ok drops them below (tl.where: whatever they hold, overflow included, never reaches dR)
        _, g, extra = _tile_probs_and_grad(
            q, qr, do, k, vT, r_tile, lse2, delta, tt0, tt1, qtype, ktype, k_visible, offs_m, offs_n, r_of_c,
            cls_type, qk_scale, seed, bh, drop_threshold, drop_scale,
            HAS_TT, SEPARATE_CLS, HAS_DROPOUT, UPCAST_DOT, DOT_PRECISION)
        g_rel = tl.where(extra & c_ok, g, 0.0)
        # -- back to table order, then dR_tile += gT^T Qr --
        g_t = tl.gather(g_rel, c_of_r, axis=1)
        dr = _dot(tl.trans(g_t.to(qr.dtype)), qr, dr, UPCAST_DOT, DOT_PRECISION)

    _store_tile(DR + b.to(tl.int64) * stride_drb + h.to(tl.int64) * stride_drh, t0, stride_drt, stride_drd,
                dr * sm_scale, NR, HEAD_DIM_QK, BLOCK_T, BLOCK_DQK)


@triton.jit
def _batch_sum_kernel(X, Y, B, N, BLOCK: tl.constexpr):
    """``Y[n] = sum_b X[b, n]`` (contiguous), the batch added in index order: deterministic."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    x = X + offs
    for _ in range(0, B):
        acc += tl.load(x, mask=ok, other=0.0)
        x += N
    tl.store(Y + offs, acc.to(Y.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
class RelposNotSupported(NotImplementedError):
    """A case the Triton kernels do not cover (the backend turns the message into a not-supported reason)."""


def not_supported_reasons(q, k, v, qr, R, tt, dropout_p=0.0) -> list[str]:
    """Why the kernels cannot run a case (empty if they can): for the backend's not-supported reasons."""
    reasons = []
    if q.dtype not in SUPPORTED_DTYPES:
        reasons.append(f"dtype {q.dtype} (supported: float16, bfloat16, float32)")
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        reasons.append(f"head dim {max(q.shape[-1], v.shape[-1])} > {MAX_HEAD_DIM}")
    if max(q.shape[0], q.shape[1]) > limits.MAX_GRID_YZ:
        reasons.append(f"batch or heads > {limits.MAX_GRID_YZ} (launch grid)")
    if dropout_p > 0.0 and max(q.shape[2], k.shape[2]) > limits.DROPOUT_MAX_LEN:
        reasons.append(f"dropout with a sequence longer than {limits.DROPOUT_MAX_LEN}")
    return reasons


def _stride_args(t: torch.Tensor | None, n: int):
    return tuple(t.stride()) if t is not None else (0,) * n


def _prepare(q, k, v, qr, R, tt, q_types, k_types, key_padding_mask, rel_stride, dropout_p):
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    reasons = not_supported_reasons(q, k, v, qr, R, tt, dropout_p)
    if reasons:
        raise RelposNotSupported("relpos_attention (triton): " + "; ".join(reasons))
    nr_ok = Tq == 0 or R.shape[1] == rel_stride * (Tq - 1) + Tk
    if rel_stride < 1 or H % Hkv != 0 or not nr_ok or qr.shape != q.shape:
        raise ValueError(f"relpos_attention: bad shapes q {tuple(q.shape)} k {tuple(k.shape)} qr {tuple(qr.shape)} "
                         f"R {tuple(R.shape)} rel_stride {rel_stride}")
    has_tt = tt is not None
    if has_tt and (q_types is None or k_types is None):
        raise ValueError("relpos_attention: tt needs q_types and k_types")
    qt = q_types.to(torch.int32) if has_tt else None
    kt = k_types.to(torch.int32) if has_tt else None
    kpm = key_padding_mask.to(torch.bool).view(torch.uint8) if key_padding_mask is not None else None
    dummy = q
    tensors = (qr, R, tt if has_tt else dummy, qt if has_tt else dummy, kt if has_tt else dummy,
               kpm if kpm is not None else dummy)
    strides = (*qr.stride(), *R.stride(), *_stride_args(tt, 4), *_stride_args(qt, 2), *_stride_args(kt, 2),
               *_stride_args(kpm, 2))
    constexprs = dict(
        HEAD_DIM_QK=D, HEAD_DIM_V=v.shape[-1], BLOCK_DQK=_block_d(D), BLOCK_DV=_block_d(v.shape[-1]),
        REL_STRIDE=rel_stride, HAS_TT=has_tt, HAS_KPM=kpm is not None,
        UPCAST_DOT=INTERPRET and q.dtype == torch.bfloat16, DOT_PRECISION=_dot_precision(q.dtype))
    return tensors, strides, constexprs


@_on_tensor_device
def relpos_attn_forward(q, k, v, qr, R, tt, q_types, k_types, key_padding_mask, *, rel_stride: int = 1,
                        separate_cls: bool = False, cls_type: int = 2, scale: float, dropout_p: float = 0.0,
                        seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward: ``out (B, H, Tq, Dv)`` in q's dtype and ``lse (B, H, Tq)`` float32 (module docstring).

    q, qr ``(B, H, Tq, D)``; k ``(B, Hkv, Tk, D)``; v ``(B, Hkv, Tk, Dv)``; R ``(H, NR, D)``; tt
    ``(B, H, Tq, 2)`` or None (then q_types/k_types are ignored); key_padding_mask ``(B, Tk)`` bool or None.
    """
    B, H, Tq, _ = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    tensors, strides, constexprs = _prepare(q, k, v, qr, R, tt, q_types, k_types, key_padding_mask, rel_stride,
                                         dropout_p)
    out = _alloc(B, H, Tq, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = _alloc(B, H, Tq, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    if Tk == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    args = (q, k, v, *tensors, out, lse, *q.stride(), *k.stride(), *v.stride(), *strides, *out.stride(),
            H, H // Hkv, Tq, Tk, R.shape[1], scale * LOG2E, cls_type, seed,
            dropout_threshold(dropout_p), dropout_scale(dropout_p))
    constexprs.update(SEPARATE_CLS=separate_cls, HAS_DROPOUT=dropout_p > 0.0)
    _launch(_relpos_fwd_kernel, "fwd", lambda meta: (triton.cdiv(Tq, meta["BLOCK_M"]), H, B), args, constexprs,
            rel_stride)
    return out, lse


@_on_tensor_device
def relpos_attn_backward(dout, q, k, v, qr, R, tt, q_types, k_types, key_padding_mask, out, lse, dlse=None, *,
                         rel_stride: int = 1, separate_cls: bool = False, cls_type: int = 2, scale: float,
                         dropout_p: float = 0.0, seed: int = 0):
    """Backward: ``(dq, dk, dv, dqr, dR, dtt)`` typed like their inputs (``dtt`` None without ``tt``;
    ``dR`` summed over the batch). Same arguments as the forward plus ``dout``, ``out``, ``lse`` and
    optionally ``dlse (B, H, Tq)``."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    NR = R.shape[1]
    tensors, strides, constexprs = _prepare(q, k, v, qr, R, tt, q_types, k_types, key_padding_mask, rel_stride,
                                         dropout_p)
    constexprs.update(SEPARATE_CLS=separate_cls, HAS_DROPOUT=dropout_p > 0.0)
    dq = _alloc(q.shape, dtype=q.dtype, device=q.device)
    dk = _alloc(k.shape, dtype=k.dtype, device=k.device)
    dv = _alloc(v.shape, dtype=v.dtype, device=v.device)
    dqr = _alloc(qr.shape, dtype=qr.dtype, device=qr.device)
    dR = _alloc(R.shape, dtype=R.dtype, device=R.device)
    dtt = _alloc(tt.shape, dtype=tt.dtype, device=tt.device) if tt is not None else None
    if Tq == 0 or Tk == 0 or B * H == 0:
        return (dq.zero_(), dk.zero_(), dv.zero_(), dqr.zero_(), dR.zero_(),
                dtt.zero_() if dtt is not None else None)
    lse = lse.contiguous()
    delta = _alloc(B, H, Tq, dtype=torch.float32, device=q.device)
    preprocess_block = PREPROCESS_BLOCK_M if v.shape[-1] <= 128 else PREPROCESS_BLOCK_M // 4
    _bwd_preprocess_kernel[(triton.cdiv(Tq, preprocess_block), H, B)](
        out, dout, dlse.contiguous() if dlse is not None else delta, delta, *out.stride(), *dout.stride(), H, Tq,
        HEAD_DIM_V=v.shape[-1], BLOCK_DV=_block_d(v.shape[-1]), HAS_DLSE=dlse is not None, BLOCK_M=preprocess_block)
    inputs = (q, k, v, *tensors)
    in_strides = (*q.stride(), *k.stride(), *v.stride(), *strides)
    runtime = (H, H // Hkv, Tq, Tk, NR, scale, scale * LOG2E, cls_type, seed,
               dropout_threshold(dropout_p), dropout_scale(dropout_p))
    _launch(_relpos_bwd_dkdv_kernel, "bwd_kv", lambda meta: (triton.cdiv(Tk, meta["BLOCK_N"]), Hkv, B),
            (*inputs, dout, lse, delta, dk, dv, *in_strides, *dout.stride(), *dk.stride(), *dv.stride(), *runtime),
            constexprs, rel_stride)
    dtt_arg = dtt if dtt is not None else dq
    _launch(_relpos_bwd_dq_kernel, "bwd_q", lambda meta: (triton.cdiv(Tq, meta["BLOCK_M"]), H, B),
            (*inputs, dout, lse, delta, dq, dqr, dtt_arg, *in_strides, *dout.stride(), *dq.stride(),
             *dqr.stride(), *_stride_args(dtt, 4), *runtime),
            constexprs, rel_stride)
    # dR: per-batch partials (fp32) reduced in batch order; one batch writes dR directly
    qr_, R_, tt_, qt_, kt_, kpm_ = tensors
    partial = dR.unsqueeze(0) if B == 1 else _alloc(B, H, NR, D, dtype=torch.float32, device=q.device)
    _launch(_relpos_bwd_dr_kernel, "bwd_dr", lambda meta: (triton.cdiv(NR, meta["BLOCK_T"]), H, B),
            (q, k, v, qr_, tt_, qt_, kt_, kpm_, dout, lse, delta, R_, partial,
             *q.stride(), *k.stride(), *v.stride(), *strides, *dout.stride(), *partial.stride(), *runtime),
            constexprs, rel_stride)
    if B > 1:  # dR is contiguous (it comes from _alloc)
        n = H * NR * D
        _batch_sum_kernel[(triton.cdiv(n, BATCH_SUM_BLOCK),)](partial, dR, B, n, BLOCK=BATCH_SUM_BLOCK)
    return dq, dk, dv, dqr, dR, dtt
