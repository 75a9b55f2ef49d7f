"""Analytic FLOPs and bytes of effattn's ops, and their registration with ``torch.utils.flop_counter``.

Counting convention (FlashAttention's): a matmul of ``(m, k) @ (k, n)`` is ``2 m k n`` FLOPs, and only
query/key pairs the op must compute count: for dense, causal and windowed attention the visible
pairs (exact, bottom-right or top-left), for pooled attention the pairs of the pooled queries, for
block-sparse attention the elements of the kept blocks (what the kernel computes).

* forward: ``S = Q K^T`` and ``O = P V``: ``2 · pairs · (Dqk + Dv)`` per (batch, query head);
* backward (the kernels recompute ``S``): ``S``, ``dV = P^T dO``, ``dP = dO V^T``, ``dQ = dS K``,
  ``dK = dS^T Q``: ``2 · pairs · (3 Dqk + 2 Dv)`` — 2.5x the forward when ``Dqk = Dv``.

Bytes are the minimum a fused kernel moves through memory: its inputs read once, its outputs
written once (``lse`` as float32); ``naive_bytes`` adds the ``Tq x Tk`` scores and probabilities a
materialising implementation writes and reads. After ``import effattn``, ``FlopCounterMode`` counts
effattn's ops with these formulas.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import register_flop_formula

__all__ = ["AttentionCost", "attention_cost", "kept_pairs", "visible_pairs"]

LSE_BYTES = 4  # lse and delta are float32 rows


@dataclass(frozen=True)
class AttentionCost:
    """FLOPs and bytes of one attention call (forward and backward)."""

    fwd_flops: int
    bwd_flops: int
    fwd_bytes: int
    bwd_bytes: int
    naive_fwd_bytes: int  # + scores and probabilities of a materialising implementation

    @property
    def fwd_intensity(self) -> float:
        """Arithmetic intensity of the forward, FLOP/byte."""
        return self.fwd_flops / max(1, self.fwd_bytes)

    @property
    def bwd_intensity(self) -> float:
        return self.bwd_flops / max(1, self.bwd_bytes)


def visible_pairs(Tq: int, Tk: int, window_left: int = -1, window_right: int = -1, diag_offset: int = 0,
                  q_pos_stride: int = 1, clamp_first: bool = False) -> int:
    """Number of (query, key) pairs with ``-left <= j - pos_i <= right``, ``pos_i = i·stride + diag_offset``
    (``clamp_first``: positions clamped at 0, as for a pooled [cls] query); -1 = unbounded. O(Tq)."""
    pos = torch.arange(Tq, dtype=torch.int64) * q_pos_stride + diag_offset
    if clamp_first:
        pos = pos.clamp_min(0)
    lo = (pos - window_left).clamp_min(0) if window_left >= 0 else torch.zeros_like(pos)
    hi = (pos + window_right).clamp_max(Tk - 1) if window_right >= 0 else torch.full_like(pos, Tk - 1)
    return int((hi - lo + 1).clamp_min(0).sum())


def attention_cost(batch: int, heads_q: int, heads_kv: int, Tq: int, Tk: int, head_dim_qk: int, head_dim_v: int,
                   pairs_per_head: int, element_bytes: int = 2, q_rows: int | None = None) -> AttentionCost:
    """Cost of attention computing ``pairs_per_head`` (query, key) pairs per (batch, query head).

    ``q_rows``: rows of q read (the unpooled length for pooled attention; default ``Tq``)."""
    BH = batch * heads_q
    fwd = 2 * BH * pairs_per_head * (head_dim_qk + head_dim_v)
    bwd = 2 * BH * pairs_per_head * (3 * head_dim_qk + 2 * head_dim_v)
    q_el = BH * (Tq if q_rows is None else q_rows) * head_dim_qk
    kv_el = batch * heads_kv * Tk * (head_dim_qk + head_dim_v)
    o_el = BH * Tq * head_dim_v
    fwd_bytes = (q_el + kv_el + o_el) * element_bytes + BH * Tq * LSE_BYTES
    # backward: read q, k, v, o, dO, lse; write delta (and read it), dq, dk, dv
    bwd_bytes = (2 * q_el + 2 * kv_el + 2 * o_el) * element_bytes + 3 * BH * Tq * LSE_BYTES
    naive = fwd_bytes + 2 * 2 * BH * Tq * Tk * element_bytes  # scores and probabilities, written and read
    return AttentionCost(fwd, bwd, fwd_bytes, bwd_bytes, naive)


# ----------------------------------------------------------------------------------------------
# FlopCounterMode formulas for effattn's custom ops (tensors arrive as shapes)
# ----------------------------------------------------------------------------------------------
def _flash_pairs(q_shape, k_shape, window_left, window_right, diag_offset) -> int:
    return visible_pairs(q_shape[2], k_shape[2], window_left, window_right, diag_offset)


def _flops(q_shape, v_shape, pairs, backward: bool) -> int:
    B, Hq, _, Dqk = q_shape
    Dv = v_shape[3]
    return 2 * B * Hq * pairs * ((3 * Dqk + 2 * Dv) if backward else (Dqk + Dv))


def _register() -> None:
    ops = torch.ops.effattn

    @register_flop_formula(ops.attention_fwd)
    def _attention_fwd(q, k, v, mask, scale, window_left, window_right, diag_offset, *args, out_shape=None,
                       **kwargs) -> int:
        return _flops(q, v, _flash_pairs(q, k, window_left, window_right, diag_offset), backward=False)

    @register_flop_formula(ops.attention_bwd)
    def _attention_bwd(dout, q, k, v, out, lse, mask, dlse, scale, window_left, window_right, diag_offset, *args,
                       out_shape=None, **kwargs) -> int:
        return _flops(q, v, _flash_pairs(q, k, window_left, window_right, diag_offset), backward=True)

    def _pooled_pairs(q, k, window_left, window_right, stride, separate_cls, truncate):
        from effattn.reference import QueryPool
        pool = QueryPool(stride, "mean", separate_cls, truncate)
        return visible_pairs(pool.pooled_len(q[2]), k[2], window_left, window_right, pool.position_offset,
                             q_pos_stride=stride, clamp_first=separate_cls)

    @register_flop_formula(ops.pooled_attention_fwd)
    def _pooled_fwd(q, k, v, mask, scale, window_left, window_right, stride, mode, separate_cls, truncate, *args,
                    out_shape=None, **kwargs) -> int:
        return _flops(q, v, _pooled_pairs(q, k, window_left, window_right, stride, separate_cls, truncate), False)

    @register_flop_formula(ops.pooled_attention_bwd)
    def _pooled_bwd(dout, q, k, v, out, lse, mask, dlse, scale, window_left, window_right, stride, mode,
                    separate_cls, truncate, *args, out_shape=None, **kwargs) -> int:
        return _flops(q, v, _pooled_pairs(q, k, window_left, window_right, stride, separate_cls, truncate), True)


def _kept_pairs_from_lists(lists, q_len: int, kv_len: int, block_q: int, block_kv: int) -> torch.Tensor:
    """Elements of the blocks listed in (num, idx) pairs, per (b, h): int64 ``(B|1, H|1)``."""
    total = None
    for num, idx in lists:
        nq, nk = idx.shape[-2:]
        rows = torch.full((nq,), block_q, dtype=torch.int64)
        rows[-1] = q_len - block_q * (nq - 1)
        cols = torch.full((nk,), block_kv, dtype=torch.int64)
        cols[-1] = kv_len - block_kv * (nk - 1)
        listed = torch.arange(nk) < num.cpu().to(torch.int64)[..., None]
        pairs = ((cols[idx.cpu().to(torch.int64)] * listed).sum(-1) * rows).sum(-1)
        total = pairs if total is None else total + pairs
    return total


def kept_pairs(block_mask) -> torch.Tensor:
    """Elements of the kept blocks of a BlockMask per (b, h), ragged edge blocks counted by their
    existing rows/columns: the pairs the block-sparse kernels compute. int64 ``(B, H)``."""
    bm = block_mask
    lists = ((bm.kv_num_blocks, bm.kv_indices), (bm.full_kv_num_blocks, bm.full_kv_indices))
    return _kept_pairs_from_lists(lists, bm.q_len, bm.kv_len, *bm.block_size)


def _register_sparse() -> None:
    ops = torch.ops.effattn

    def pairs(q, k, lists, block_q, block_kv) -> int:
        per_bh = _kept_pairs_from_lists(lists, q.shape[2], k.shape[2], block_q, block_kv)
        return int(per_bh.expand(q.shape[0], q.shape[1]).sum())

    @register_flop_formula(ops.sparse_attention_fwd, get_raw=True)
    def _sparse_fwd(q, k, v, kpm, kv_num, kv_idx, full_num, full_idx, q_num, q_idx, full_q_num, full_q_idx,
                    q_seg, kv_seg, scale, block_q, block_kv, *args, out_val=None, **kwargs) -> int:
        n = pairs(q, k, ((kv_num, kv_idx), (full_num, full_idx)), block_q, block_kv)
        return 2 * n * (q.shape[3] + v.shape[3])

    @register_flop_formula(ops.sparse_attention_bwd, get_raw=True)
    def _sparse_bwd(dout, q, k, v, out, lse, kpm, dlse, kv_num, kv_idx, full_num, full_idx, q_num, q_idx,
                    full_q_num, full_q_idx, q_seg, kv_seg, scale, block_q, block_kv, *args, out_val=None,
                    **kwargs) -> int:
        n = pairs(q, k, ((kv_num, kv_idx), (full_num, full_idx)), block_q, block_kv)
        return 2 * n * (3 * q.shape[3] + 2 * v.shape[3])


_register()
_register_sparse()
