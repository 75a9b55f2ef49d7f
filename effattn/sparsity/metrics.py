"""Quality measures of a predicted block mask against the true softmax attention.

* :func:`block_sparsity` — the share of blocks the mask cuts (the work saved).
* :func:`attention_recall` — the share of the true attention probability mass that falls inside the
  mask, averaged over query rows: 1.0 means that no row loses any attention.
* :func:`exact_row_recall` — the share of query rows whose recall is at least ``1 - eps``.
* :func:`row_recall` — the per-row recalls themselves.
* :func:`saved_attention_flops` — the forward attention FLOPs the cut blocks do not cost, to set a
  predictor's own cost (``SparseFinder.predict_flops``, ``BlockGate.predict_flops``) against.

The recalls are computed by chunks of query rows (the mask expanded with ``BlockMask.dense_rows``
one chunk at a time), never as a whole ``Tq x Tk`` matrix. Causal attention is bottom-right aligned as
in :func:`effattn.flash_attention`; query rows that see no key at all (causal with ``Tq > Tk``) have
no attention to recall and are left out of the averages (their recall is NaN in :func:`row_recall`).
"""

from __future__ import annotations

import math

import torch

from effattn.block_mask import NONE, BlockMask

__all__ = ["attention_recall", "block_sparsity", "exact_row_recall", "row_recall", "saved_attention_flops"]

CHUNK_ELEMENTS = 1 << 22  # scores per query-row chunk


def _check_mask(block_mask) -> None:
    if not isinstance(block_mask, BlockMask):
        raise TypeError(f"block_mask must be an effattn.BlockMask, got {type(block_mask).__name__}")


def block_sparsity(block_mask: BlockMask, *, causal: bool = False) -> float:
    """The share of ``(b, h, q block, kv block)`` blocks that ``block_mask`` cuts (NONE).

    With ``causal``, measured among the blocks that bottom-right causal attention would compute (the
    saving over a causal dense kernel) instead of the whole grid."""
    _check_mask(block_mask)
    if not causal:
        return block_mask.sparsity()
    allowed = BlockMask.causal(block_mask.q_len, block_mask.kv_len, block_mask.block_size,
                               device=block_mask.device).block_kinds() != NONE
    kinds = block_mask.block_kinds()
    n_allowed = int(allowed.sum()) * kinds.shape[0] * kinds.shape[1]
    if n_allowed == 0:
        return 0.0
    kept = int(((kinds != NONE) & allowed).sum())
    return 1.0 - kept / n_allowed


def row_recall(q: torch.Tensor, k: torch.Tensor, block_mask: BlockMask, *, scale: float | None = None,
               causal: bool = False) -> torch.Tensor:
    """Per query row, the share of its softmax attention mass inside ``block_mask``: ``(B, Hq, Tq)`` in
    float64 for float64 inputs, else float32; NaN for rows that see no key.

    ``q (B, Hq, Tq, D)``, ``k (B, Hkv, Tk, D)`` (``Hkv`` dividing ``Hq``), ``block_mask`` built for
    ``(Tq, Tk)`` with ``B``, ``H`` equal to q's or 1. ``scale`` defaults to ``1 / sqrt(D)``."""
    _check_mask(block_mask)
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or not t.is_floating_point():
            raise ValueError(f"{name} must be a 4-D (B, H, T, D) floating-point tensor")
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    if k.shape[0] != B or k.shape[3] != D or Hkv == 0 or Hq % Hkv:
        raise ValueError(f"k {tuple(k.shape)} must match q {tuple(q.shape)} in batch and head dim, with heads "
                         f"dividing {Hq}")
    if (block_mask.q_len, block_mask.kv_len) != (Tq, Tk):
        raise ValueError(f"block_mask is for (q_len, kv_len) = {(block_mask.q_len, block_mask.kv_len)}, "
                         f"q / k have {(Tq, Tk)}")
    mb, mh = block_mask.shape[:2]
    if mb not in (1, B) or mh not in (1, Hq):
        raise ValueError(f"block_mask has (B, H) = {(mb, mh)}, q has {(B, Hq)}: they must match or be 1")
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    block_mask = block_mask.to(q.device)
    kc = k.to(cdt).repeat_interleave(Hq // Hkv, dim=1)
    out = torch.empty(B, Hq, Tq, dtype=cdt, device=q.device)
    step = max(1, CHUNK_ELEMENTS // max(1, B * Hq * Tk))
    cols = torch.arange(Tk, device=q.device)
    for r0 in range(0, Tq, step):
        r1 = min(Tq, r0 + step)
        s = torch.matmul(q[:, :, r0:r1].to(cdt), kc.transpose(-1, -2)) * scale
        if causal:
            rows = torch.arange(r0, r1, device=q.device)
            s = s.masked_fill(cols[None, :] > rows[:, None] + (Tk - Tq), float("-inf"))
        p = torch.softmax(s, dim=-1)  # NaN on rows that see no key
        out[:, :, r0:r1] = (p * block_mask.dense_rows(r0, r1)).sum(-1)
    return out


def attention_recall(q: torch.Tensor, k: torch.Tensor, block_mask: BlockMask, *, scale: float | None = None,
                     causal: bool = False) -> float:
    """Mean over ``(b, h, query row)`` of the share of the true softmax attention mass inside
    ``block_mask`` (see :func:`row_recall`); rows that see no key are left out (1.0 if none is left)."""
    r = row_recall(q, k, block_mask, scale=scale, causal=causal)
    r = r[~torch.isnan(r)]
    return 1.0 if r.numel() == 0 else float(r.mean())


def exact_row_recall(q: torch.Tensor, k: torch.Tensor, block_mask: BlockMask, *, scale: float | None = None,
                     causal: bool = False, eps: float = 1e-3) -> float:
    """Share of the ``(b, h, query row)`` rows whose recall is at least ``1 - eps`` (rows that see no key
    left out; 1.0 if none is left)."""
    if not (isinstance(eps, (int, float)) and 0.0 <= eps < 1.0):
        raise ValueError(f"eps must be a number in [0, 1), got {eps!r}")
    r = row_recall(q, k, block_mask, scale=scale, causal=causal)
    r = r[~torch.isnan(r)]
    return 1.0 if r.numel() == 0 else float((r >= 1.0 - eps).double().mean())


def saved_attention_flops(block_mask: BlockMask, head_dim: int, *, batch: int = 1, heads: int = 1,
                          head_dim_v: int | None = None) -> int:
    """Forward FLOPs of dense attention that ``block_mask`` saves: ``2 (D + Dv)`` per (query, key) pair
    outside its kept blocks (``QK^T`` and ``PV``, a multiply-add counting 2, as in
    :mod:`effattn.profile`), summed over ``(batch, heads)``; a mask with ``B`` or ``H`` of size 1 is
    broadcast to ``batch`` / ``heads``. Ragged edge blocks count by their existing rows and columns."""
    from effattn.profile import kept_pairs

    _check_mask(block_mask)
    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    for name, value in (("head_dim", head_dim), ("head_dim_v", head_dim_v), ("batch", batch), ("heads", heads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    kept = kept_pairs(block_mask)  # (B|1, H|1)
    B, H = kept.shape
    for name, value, size in (("batch", batch, B), ("heads", heads, H)):
        if size != 1 and size != value:
            raise ValueError(f"{name}={value} does not match the block mask's {name} dimension {size}")
    cut = block_mask.q_len * block_mask.kv_len - kept.expand(batch, heads)
    return int(cut.sum()) * 2 * (head_dim + head_dim_v)
