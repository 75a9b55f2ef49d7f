"""The one reference implementation of effattn's attention semantics.

Two implementations of the same function live here, and nowhere else:

* :func:`attention_forward` / :func:`attention_backward` compute attention by query chunks, so the
  ``Tq x Tk`` score matrix is never held in memory whole (at most ``chunk x Tk`` per head). They are
  the CPU backend (``backend="reference"``) and, run on float64 inputs, the reference every kernel
  is tested against. The backward is written out by hand (FlashAttention's recurrence), so it needs
  no stored probabilities either.
* :func:`naive_attention` materialises the full softmax and is differentiated by autograd: the
  baseline of the benchmarks, and an independent check of the chunked code in the tests.

Semantics shared by every backend (the kernels reproduce them exactly):

* scores ``S = cap(scale * Q K^T) + alibi (+ additive mask)``, softmax over keys, ``O = softmax(S) V``;
  ``lse[i] = log(sum_j exp(S_ij))`` over the visible keys (``-inf`` for a row that sees none).
  ``cap(x) = softcap * tanh(x / softcap)`` when ``softcap > 0`` (Gemma-2's logit soft-capping), else
  ``x``; ``alibi = -slope[b, h] * |pos_i - j|`` with ``alibi_slopes (B, Hq)`` (ALiBi, as flash-attn:
  ``pos_i = i + diag_offset`` is the query's position on the key grid), else 0.
* GQA: ``Hq = G * Hkv``; query head ``h`` reads KV head ``h // G`` (consecutive query heads share).
* Visibility of key ``j`` for query ``i``: with ``d = j - i - diag_offset``,
  ``-window_left <= d <= window_right``, a negative bound meaning unbounded. Causal attention is
  ``window_right = 0``; ``diag_offset = Tk - Tq`` aligns the diagonal to the bottom-right corner
  (FlashAttention 2.1+), ``diag_offset = 0`` to the top-left (``torch.nn.functional.sdpa``).
* ``mask``: a bool (True = keep) or float (added to the scores) tensor broadcastable to
  ``(B, Hq, Tq, Tk)``.
* A query row with no visible key gets output 0 (and zero gradients), never NaN.
* Query pooling (Funnel-Transformer, :class:`QueryPool`): the queries are first pooled along the
  sequence (:func:`pool_queries`), keys and values are not. Query row ``i`` then sits at position
  ``i * stride + diag_offset`` of the key grid (clamped at 0 with ``separate_cls``: the [cls] query is
  token 0), and the window rule above uses that position in place of ``i + diag_offset``.
* Dropout keeps score ``(b, h, i, j)`` iff ``philox(seed; j, i, b * Hq + h, 0)[0] >> 8 >= threshold``
  with ``threshold = round(dropout_p * 2**24)``; kept probabilities are scaled by
  ``2**24 / (2**24 - threshold)``. The forward and the backward of every backend draw the same bits
  from the same seed, so nothing is stored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "DROPOUT_BITS",
    "QueryPool",
    "Varlen",
    "attention_backward",
    "attention_forward",
    "compute_dtype",
    "dropout_keep",
    "dropout_scale",
    "dropout_threshold",
    "naive_attention",
    "philox_randint",
    "pool_queries",
    "pool_queries_backward",
    "pooled_positions",
    "relpos_attention",
    "relpos_attention_backward",
    "sparse_attention_backward",
    "sparse_attention_forward",
    "varlen_backward",
    "varlen_forward",
]

# Dropout compares the top DROPOUT_BITS bits of a 32-bit Philox draw with a threshold.
DROPOUT_BITS = 24
# Elements of one chunk of scores (B * Hq * rows * Tk) held at once by the chunked implementation:
# small on CPU (cache-sized), large on GPUs (few chunks, each a big matmul).
CHUNK_ELEMENTS = 1 << 20
CUDA_CHUNK_ELEMENTS = 1 << 27

# Output buffers come from here (tests swap in a NaN-filling allocator).
_alloc = torch.empty

_MASK32 = 0xFFFFFFFF
# Philox-4x32-10 constants (Salmon et al. 2011), as Triton's tl.philox uses them.
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_PHILOX_ROUNDS = 10


# ----------------------------------------------------------------------------------------------
# dropout bits
# ----------------------------------------------------------------------------------------------
def _mul32(a: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of ``a * x`` for a 32-bit constant ``a`` and int64 tensor ``x < 2**32``."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    hi_part = x * a_hi  # < 2**48
    lo_part = x * a_lo  # < 2**48
    high = (hi_part + (lo_part >> 16)) >> 16
    low = (((hi_part & 0xFFFF) << 16) + lo_part) & _MASK32
    return high & _MASK32, low


def philox_randint(seed: int, c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor) -> torch.Tensor:
    """First 32-bit output of Philox-4x32-10 keyed by ``seed`` on counters ``(c0, c1, c2, c3)``.

    Bit-for-bit the value of Triton's ``tl.philox(seed, c0, c1, c2, c3)[0]`` for uint32 counters.
    Counters are int64 tensors holding values in ``[0, 2**32)``; the result is int64 in that range.
    """
    k0 = seed & _MASK32
    k1 = (seed >> 32) & _MASK32
    c0, c1, c2, c3 = torch.broadcast_tensors(c0, c1, c2, c3)
    for _ in range(_PHILOX_ROUNDS):
        hi_b, lo_b = _mul32(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul32(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _MASK32
        k1 = (k1 + _PHILOX_KEY_B) & _MASK32
    return c0


def dropout_threshold(dropout_p: float) -> int:
    """Integer threshold on the top ``DROPOUT_BITS`` bits of a draw: kept iff ``bits >= threshold``."""
    return int(round(dropout_p * (1 << DROPOUT_BITS)))


def dropout_scale(dropout_p: float) -> float:
    """Scale of a kept probability: the inverse of the exact keep rate of :func:`dropout_threshold`."""
    full = 1 << DROPOUT_BITS
    return full / (full - dropout_threshold(dropout_p))


def dropout_keep(seed: int, dropout_p: float, batch_heads: torch.Tensor, rows: torch.Tensor,
                 cols: torch.Tensor) -> torch.Tensor:
    """Keep mask (bool) of dropout, broadcast over ``batch_heads``, ``rows`` and ``cols`` (int64 tensors).

    ``batch_heads`` is ``b * Hq + h``; ``rows`` and ``cols`` are query and key indices.
    """
    bits = philox_randint(seed, cols, rows, batch_heads, torch.zeros_like(cols))
    return (bits >> (32 - DROPOUT_BITS)) >= dropout_threshold(dropout_p)


# ----------------------------------------------------------------------------------------------
# query pooling (Funnel-Transformer)
# ----------------------------------------------------------------------------------------------
POOL_MODES = ("mean", "max")


@dataclass(frozen=True)
class QueryPool:
    """How queries are pooled along the sequence, as Funnel-Transformer's ``pool_tensor`` does.

    With ``separate_cls`` the sequence is first rewritten ``x' = [x_0] + x[:-1]`` (``truncate``) or
    ``x' = [x_0] + x``; then windows of ``stride`` rows, step ``stride``, are pooled (mean or max) with
    ceil mode (a short last window is pooled over the rows it has). So with stride 2 the pooled rows
    are ``[x_0, pool(x_1, x_2), pool(x_3, x_4), ...]``; without ``separate_cls``, ``[pool(x_0, x_1), ...]``.
    """

    stride: int = 2
    mode: str = "mean"
    separate_cls: bool = False
    truncate: bool = True

    def source_len(self, T: int) -> int:
        """Length of ``x'``, the sequence that is cut into windows."""
        if not self.separate_cls or T == 0:
            return T
        return T if self.truncate else T + 1

    def pooled_len(self, T: int) -> int:
        return -(-self.source_len(T) // self.stride)

    @property
    def position_offset(self) -> int:
        """Key-grid position of pooled row ``i`` is ``i * stride + position_offset`` (Funnel's rule)."""
        return 1 - self.stride if self.separate_cls else 0

    def covered_rows(self, T: int) -> int:
        """Rows ``[0, n)`` of the unpooled queries that feed some pooled row (the rest are truncated)."""
        if not self.separate_cls:
            return T
        return max(1, self.source_len(T) - 1) if T else 0


def pool_queries(x: torch.Tensor, pool: QueryPool) -> torch.Tensor:
    """Pool ``x (B, H, T, D)`` along T: ``(B, H, pool.pooled_len(T), D)``. Differentiable (autograd)."""
    if pool.separate_cls and x.shape[2] > 0:
        suffix = x[:, :, :-1] if pool.truncate else x
        x = torch.cat([x[:, :, :1], suffix], dim=2)
    B, H, T, D = x.shape
    if T == 0:
        return x
    flat = x.reshape(B * H, 1, T, D)
    window = (pool.stride, 1)
    if pool.mode == "mean":
        pooled = F.avg_pool2d(flat, window, stride=window, ceil_mode=True)
    else:
        pooled = F.max_pool2d(flat, window, stride=window, ceil_mode=True)
    return pooled.reshape(B, H, -1, D)


def pool_queries_backward(grad_pooled: torch.Tensor, x: torch.Tensor, pool: QueryPool) -> torch.Tensor:
    """Gradient of :func:`pool_queries` w.r.t. ``x (B, H, T, D)``, given ``grad_pooled (B, H, Tp, D)``.

    Mean: each window row gets ``grad / count``; max: the first arg-max row of each window and feature
    gets ``grad`` (torch's max-pool rule). Rows that feed no window (cut by truncation) get 0.
    """
    B, H, T, D = x.shape
    src_len, Tp, s = pool.source_len(T), pool.pooled_len(T), pool.stride
    dx = torch.zeros_like(x, dtype=grad_pooled.dtype)
    if Tp == 0:
        return dx
    src = torch.arange(src_len, device=x.device)
    if pool.separate_cls:
        src = (src - 1).clamp_min(0)
    pad = Tp * s - src_len
    if pool.mode == "mean":
        count = torch.full((Tp,), float(s), dtype=grad_pooled.dtype, device=x.device)
        count[-1] = s - pad
        g = (grad_pooled / count[:, None]).repeat_interleave(s, dim=2)[:, :, :src_len]
    else:
        windows = F.pad(x[:, :, src], (0, 0, 0, pad), value=float("-inf")).unflatten(2, (Tp, s))
        first_max = windows.argmax(dim=3, keepdim=True)  # the first maximal element of each window
        g = torch.zeros_like(windows, dtype=grad_pooled.dtype)
        g.scatter_(3, first_max, grad_pooled.unsqueeze(3))
        g = g.flatten(2, 3)[:, :, :src_len]
    return dx.index_add_(2, src, g)


def pooled_positions(T: int, pool: QueryPool, device=None) -> torch.Tensor:
    """Positions of the pooled queries on the unpooled (key) grid, int64 ``(pool.pooled_len(T),)``.

    Funnel's rule (``stride_pool_pos``): a pooled row sits at the position of the first token of its
    window, except the [cls] row under ``separate_cls``, which sits one stride before token 1
    (``1 - stride``), so that the positions stay evenly spaced: ``i * stride + position_offset``.
    For causal masking the [cls] query counts as token 0 (it sees the [cls] key).
    """
    return torch.arange(pool.pooled_len(T), device=device, dtype=torch.int64) * pool.stride + pool.position_offset


def _query_positions(r0: int, r1: int, q_pos_stride: int, diag_offset: int, clamp: bool, device) -> torch.Tensor:
    pos = torch.arange(r0, r1, device=device) * q_pos_stride + diag_offset
    return pos.clamp_min(0) if clamp else pos


# ----------------------------------------------------------------------------------------------
# masks
# ----------------------------------------------------------------------------------------------
def _visible(rows: torch.Tensor, cols: torch.Tensor, window_left: int, window_right: int,
             diag_offset: int) -> torch.Tensor | None:
    """``(len(rows), len(cols))`` bool visibility from the window rule, or None when unbounded.

    ``rows`` are query positions (``diag_offset`` is added to them), ``cols`` key indices."""
    if window_left < 0 and window_right < 0:
        return None
    d = cols[None, :] - rows[:, None] - diag_offset
    keep = torch.ones_like(d, dtype=torch.bool)
    if window_left >= 0:
        keep &= d >= -window_left
    if window_right >= 0:
        keep &= d <= window_right
    return keep


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation (and lse) dtype for inputs of ``dtype``: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grouped(x: torch.Tensor, n_kv: int) -> torch.Tensor:
    """``(B, Hq, ...)`` -> ``(B, Hkv, G, ...)`` view: the G query heads that share one KV head."""
    return x.unflatten(1, (n_kv, x.shape[1] // n_kv))


def _key_range(p0: int, p1: int, Tk: int, window_left: int, window_right: int) -> tuple[int, int]:
    """Keys ``[c0, c1)`` that some query at positions ``p0 .. p1`` (inclusive) may see under the window rule."""
    c0 = max(0, p0 - window_left) if window_left >= 0 else 0
    c1 = min(Tk, p1 + window_right + 1) if window_right >= 0 else Tk
    return (c0, c1) if c1 > c0 else (0, 0)


def _chunks(q, k, mask, *, scale, window_left, window_right, diag_offset, dropout_p, seed, q_pos_stride=1,
            clamp_pos=False, softcap=0.0, alibi_slopes=None):
    """Query chunks of at most ``CHUNK_ELEMENTS`` scores, each against the keys it may see.

    Yields ``(rows, cols, q_c, s, keep, dcap)``: the query and key slices, the chunk's queries
    ``(B, Hkv, G, R, Dqk)`` in compute dtype, masked scores ``s (B, Hkv, G, R, C)`` (``-inf`` where
    masked), the dropout keep mask (same shape) or None, and ``dcap = 1 - tanh^2``, the derivative of
    the soft cap at each score (same shape), or None without one.
    """
    B, Hq, Tq, _ = q.shape
    n_kv, Tk = k.shape[1], k.shape[2]
    cdt = compute_dtype(q.dtype)
    kc = k.to(cdt)[:, :, None]
    if mask is not None:
        mask = mask.expand(B, Hq, Tq, Tk)
    budget = CUDA_CHUNK_ELEMENTS if q.is_cuda else CHUNK_ELEMENTS
    step = max(1, min(Tq, budget // max(1, B * Hq * Tk)))
    for r0 in range(0, Tq, step):
        r1 = min(Tq, r0 + step)
        pos = _query_positions(r0, r1, q_pos_stride, diag_offset, clamp_pos, q.device)
        c0, c1 = _key_range(int(pos[0]), int(pos[-1]), Tk, window_left, window_right)
        rows, cols = slice(r0, r1), slice(c0, c1)
        q_c = _grouped(q[:, :, rows].to(cdt), n_kv)
        s = torch.matmul(q_c, kc[:, :, :, cols].transpose(-1, -2)) * scale
        dcap = None
        if softcap > 0.0:
            t = torch.tanh(s / softcap)
            s, dcap = softcap * t, 1.0 - t * t
        if alibi_slopes is not None:
            s = s + _alibi(alibi_slopes, n_kv, pos, torch.arange(c0, c1, device=q.device), cdt)
        if mask is not None:
            m = _grouped(mask[:, :, rows, cols], n_kv)
            s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.to(cdt)
        row_idx = torch.arange(r0, r1, device=q.device)
        col_idx = torch.arange(c0, c1, device=q.device)
        vis = _visible(pos, col_idx, window_left, window_right, 0)
        if vis is not None:
            s = s.masked_fill(~vis, float("-inf"))
        keep = None
        if dropout_p > 0.0:
            bh = torch.arange(B * Hq, device=q.device).view(B, n_kv, Hq // n_kv, 1, 1)
            keep = dropout_keep(seed, dropout_p, bh, row_idx.view(-1, 1), col_idx.view(1, -1))
        yield rows, cols, q_c, s, keep, dcap


def _alibi(slopes: torch.Tensor, n_kv: int, pos: torch.Tensor, cols: torch.Tensor, dtype) -> torch.Tensor:
    """``-slope[b, h] * |pos_i - j|`` as ``(B, Hkv, G, R, C)`` (``slopes (B, Hq)``, ``pos`` the rows' positions)."""
    dist = (pos[:, None] - cols[None, :]).abs().to(dtype)
    return -_grouped(slopes.to(dtype), n_kv)[..., None, None] * dist


def _probs(s: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """``exp(s - lse)``; a row with no visible key has ``lse = -inf`` and all ``s = -inf``, so P = 0."""
    return torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])


def _pool_kwargs(pool: QueryPool | None) -> dict:
    if pool is None:
        return {}
    return dict(q_pos_stride=pool.stride, clamp_pos=pool.separate_cls)


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, *,
                      scale: float, window_left: int = -1, window_right: int = -1, diag_offset: int = 0,
                      dropout_p: float = 0.0, seed: int = 0, pool: QueryPool | None = None,
                      softcap: float = 0.0,
                      alibi_slopes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked attention forward.

    Args:
        q: ``(B, Hq, Tq, Dqk)``; k: ``(B, Hkv, Tk, Dqk)``; v: ``(B, Hkv, Tk, Dv)``.
        mask: None, or bool/float broadcastable to ``(B, Hq, Tq', Tk)`` (``Tq'`` = pooled length).
        pool: pool the queries first (:class:`QueryPool`); rows are then the pooled queries.
        softcap: ``> 0`` caps the scaled scores at ``±softcap`` (``softcap * tanh(s / softcap)``).
        alibi_slopes: ``(B, Hq)`` ALiBi slopes (module docstring), or None.
    Returns:
        ``out (B, Hq, Tq', Dv)`` in q's dtype, ``lse (B, Hq, Tq')`` float32 (float64 for float64 inputs).
    """
    out_dtype = q.dtype
    cdt = compute_dtype(q.dtype)
    if pool is not None:
        q = pool_queries(q.to(cdt), pool)
    B, Hq, Tq, _ = q.shape
    vc = v.to(cdt)[:, :, None]
    out = _alloc(B, Hq, Tq, v.shape[3], dtype=out_dtype, device=q.device)
    lse = _alloc(B, Hq, Tq, dtype=cdt, device=q.device)
    drop_scale = dropout_scale(dropout_p)
    for rows, cols, _, s, keep, _ in _chunks(q, k, mask, scale=scale, window_left=window_left,
                                             window_right=window_right, diag_offset=diag_offset,
                                             dropout_p=dropout_p, seed=seed, softcap=softcap,
                                             alibi_slopes=alibi_slopes, **_pool_kwargs(pool)):
        lse_c = torch.logsumexp(s, dim=-1)  # -inf for a row with no visible key
        p = _probs(s, lse_c)
        if keep is not None:
            p = p * keep * drop_scale
        out[:, :, rows] = torch.matmul(p, vc[:, :, :, cols]).flatten(1, 2).to(out_dtype)
        lse[:, :, rows] = lse_c.flatten(1, 2)
    return out, lse


def attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       lse: torch.Tensor, mask: torch.Tensor | None = None, dlse: torch.Tensor | None = None, *,
                       scale: float, window_left: int = -1, window_right: int = -1, diag_offset: int = 0,
                       dropout_p: float = 0.0, seed: int = 0, pool: QueryPool | None = None,
                       softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chunked attention backward: gradients of ``out`` (and optionally ``lse``) w.r.t. q, k, v.

    Recomputes the probabilities from ``lse``: ``P = exp(S - lse)``;
    ``dV = (P∘Z)^T dO``, ``dP = (dO V^T)∘Z``, ``dS = P∘(dP - delta)`` with
    ``delta = rowsum(dO∘O) - dlse`` and ``Z`` the scaled dropout keep mask;
    ``dQ = scale·dS K``, ``dK = scale·dS^T Q`` (with a soft cap, ``dS`` times its derivative
    ``1 - tanh^2`` first; ALiBi has no parameter to differentiate). With ``pool``, dQ of the pooled queries is carried
    back through the pooling to the unpooled ``q`` (mean: spread evenly; max: to the arg-max).
    """
    if pool is not None:
        q_src = q.to(compute_dtype(q.dtype))
        dq_pooled, dk, dv = _attention_backward(dout, pool_queries(q_src, pool), k, v, out, lse, mask, dlse,
                                                scale=scale, window_left=window_left, window_right=window_right,
                                                diag_offset=diag_offset, dropout_p=dropout_p, seed=seed,
                                                softcap=softcap, alibi_slopes=alibi_slopes, _pos=_pool_kwargs(pool))
        return pool_queries_backward(dq_pooled, q_src, pool).to(q.dtype), dk, dv
    return _attention_backward(dout, q, k, v, out, lse, mask, dlse, scale=scale, window_left=window_left,
                               window_right=window_right, diag_offset=diag_offset, dropout_p=dropout_p, seed=seed,
                               softcap=softcap, alibi_slopes=alibi_slopes)


def _attention_backward(dout, q, k, v, out, lse, mask, dlse, *, scale, window_left, window_right, diag_offset,
                        dropout_p, seed, softcap=0.0, alibi_slopes=None, _pos=None):
    n_kv = k.shape[1]
    cdt = compute_dtype(q.dtype)
    kc = k.to(cdt)[:, :, None]
    vc = v.to(cdt)[:, :, None]
    dq = _alloc(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=cdt, device=k.device)
    dv = torch.zeros(v.shape, dtype=cdt, device=v.device)
    delta = (dout.to(cdt) * out.to(cdt)).sum(-1)
    if dlse is not None:
        delta = delta - dlse.to(cdt)
    drop_scale = dropout_scale(dropout_p)
    for rows, cols, q_c, s, keep, dcap in _chunks(q, k, mask, scale=scale, window_left=window_left,
                                                  window_right=window_right, diag_offset=diag_offset,
                                                  dropout_p=dropout_p, seed=seed, softcap=softcap,
                                                  alibi_slopes=alibi_slopes, **(_pos or {})):
        do_c = _grouped(dout[:, :, rows].to(cdt), n_kv)
        p = _probs(s, _grouped(lse[:, :, rows].to(cdt), n_kv))
        dp = torch.matmul(do_c, vc[:, :, :, cols].transpose(-1, -2))
        p_drop = p
        if keep is not None:
            z = keep.to(p.dtype) * drop_scale
            p_drop = p * z
            dp = dp * z
        dv[:, :, cols] += torch.matmul(p_drop.transpose(-1, -2), do_c).sum(2)
        ds = p * (dp - _grouped(delta[:, :, rows], n_kv)[..., None])
        if dcap is not None:
            ds = ds * dcap
        dq[:, :, rows] = (torch.matmul(ds, kc[:, :, :, cols]) * scale).flatten(1, 2).to(q.dtype)
        dk[:, :, cols] += (torch.matmul(ds.transpose(-1, -2), q_c) * scale).sum(2)
    return dq, dk.to(k.dtype), dv.to(v.dtype)


# ----------------------------------------------------------------------------------------------
# variable-length sequences: the same attention per sequence of a packed batch
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Varlen:
    """The sequences of a varlen call (int32 tensors ``(S,)``, on the tensors' device).

    Sequence ``s`` is rows ``[q_start, q_start + q_len)`` of the packed q, a ``(1, Hq, total_q, D)`` view of a
    ``(total_q, Hq, D)`` tensor, against keys ``[k_start, k_start + k_len)`` of k's batch entry ``s`` when k is a
    cache ``(S, Hkv, Tc, D)``, or of entry 0 when k is packed ``(1, Hkv, total_k, D)``; causal and windows are
    aligned bottom-right per sequence (``diag_offset = k_len - q_len``); ALiBi slopes ``(S, Hq)``; dropout of
    sequence ``s`` draws the dense stream of seed ``seed + s`` (its own rows and keys from 0, head ``h``).
    ``max_q``/``max_k``: the longest sequence (a kernel's grid).
    """

    q_start: torch.Tensor
    q_len: torch.Tensor
    k_start: torch.Tensor
    k_len: torch.Tensor
    max_q: int
    max_k: int

    @property
    def num_seqs(self) -> int:
        return self.q_len.shape[0]

    def sequences(self):
        """``(s, q rows slice, k entry, k rows slice)`` per sequence, on the host."""
        qs, ql, ks, kl = (t.tolist() for t in (self.q_start, self.q_len, self.k_start, self.k_len))
        for s in range(len(ql)):
            yield s, slice(qs[s], qs[s] + ql[s]), slice(ks[s], ks[s] + kl[s])


def varlen_forward(q, k, v, varlen: Varlen, *, scale, window_left=-1, window_right=-1, dropout_p=0.0, seed=0,
                   softcap=0.0, alibi_slopes=None, forward=None):
    """Varlen attention (:class:`Varlen`): ``out (1, Hq, total_q, Dv)`` (a view of ``(total_q, Hq, Dv)``) and
    ``lse (1, Hq, total_q)``, one ``forward`` per sequence that has queries and keys (default
    :func:`attention_forward`; a backend passes its own dense forward of the same signature)."""
    forward = forward or attention_forward
    Hq, total_q = q.shape[1], q.shape[2]
    out = torch.zeros(total_q, Hq, v.shape[3], dtype=q.dtype, device=q.device).permute(1, 0, 2).unsqueeze(0)
    lse = torch.full((1, Hq, total_q), float("-inf"), dtype=compute_dtype(q.dtype), device=q.device)
    cached = k.shape[0] > 1
    for s, rows, keys in varlen.sequences():
        e = slice(s, s + 1) if cached else slice(0, 1)
        if rows.stop == rows.start or keys.stop == keys.start:  # no rows, or rows that see nothing: 0, -inf
            continue
        offset = (keys.stop - keys.start) - (rows.stop - rows.start)  # bottom-right, per sequence
        o, l = forward(q[:, :, rows], k[e, :, keys], v[e, :, keys], None, scale=scale, window_left=window_left,
                       window_right=window_right, diag_offset=offset, dropout_p=dropout_p, seed=seed + s,
                       softcap=softcap, alibi_slopes=None if alibi_slopes is None else alibi_slopes[s:s + 1])
        out[:, :, rows], lse[:, :, rows] = o, l
    return out, lse


def varlen_backward(dout, q, k, v, out, lse, dlse, varlen: Varlen, *, scale, window_left=-1, window_right=-1,
                    dropout_p=0.0, seed=0, softcap=0.0, alibi_slopes=None, backward=None):
    """Gradients ``dq, dk, dv`` of :func:`varlen_forward` (like q, k, v; cache slots past a sequence's keys 0),
    one ``backward`` per sequence (default :func:`attention_backward`)."""
    backward = backward or attention_backward
    dq, dk, dv = (torch.zeros(x.shape[0], x.shape[2], x.shape[1], x.shape[3], dtype=x.dtype,
                              device=x.device).permute(0, 2, 1, 3) for x in (q, k, v))
    cached = k.shape[0] > 1
    for s, rows, keys in varlen.sequences():
        e = slice(s, s + 1) if cached else slice(0, 1)
        if rows.stop == rows.start or keys.stop == keys.start:
            continue
        g = backward(dout[:, :, rows], q[:, :, rows], k[e, :, keys], v[e, :, keys], out[:, :, rows],
                               lse[:, :, rows], None, None if dlse is None else dlse[:, :, rows], scale=scale,
                               window_left=window_left, window_right=window_right,
                               diag_offset=keys.stop - keys.start - (rows.stop - rows.start), dropout_p=dropout_p,
                               seed=seed + s, softcap=softcap,
                               alibi_slopes=None if alibi_slopes is None else alibi_slopes[s:s + 1])
        dq[:, :, rows] = g[0]
        dk[e, :, keys] += g[1]
        dv[e, :, keys] += g[2]
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# block-sparse attention: the same attention, visibility given by query-row chunks
# ----------------------------------------------------------------------------------------------
def _row_step(B: int, H: int, Tk: int, device) -> int:
    budget = CUDA_CHUNK_ELEMENTS if device.type == "cuda" else CHUNK_ELEMENTS
    return max(1, budget // max(1, B * H * Tk))


def sparse_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible_rows, *,
                             scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention where ``visible_rows(r0, r1)`` gives the bool visibility ``(B|1, H|1, r1 - r0, Tk)`` of
    query rows ``[r0, r1)`` (e.g. ``BlockMask.dense_rows`` and a key padding mask): computed by row
    chunks, never the whole ``Tq x Tk`` mask. Returns ``out (B, Hq, Tq, Dv)``, ``lse (B, Hq, Tq)``."""
    B, Hq, Tq, _ = q.shape
    out = _alloc(B, Hq, Tq, v.shape[3], dtype=q.dtype, device=q.device)
    lse = _alloc(B, Hq, Tq, dtype=compute_dtype(q.dtype), device=q.device)
    step = _row_step(B, Hq, k.shape[2], q.device)
    for r0 in range(0, Tq, step):
        r1 = min(Tq, r0 + step)
        out[:, :, r0:r1], lse[:, :, r0:r1] = attention_forward(q[:, :, r0:r1], k, v, visible_rows(r0, r1),
                                                               scale=scale)
    return out, lse


def sparse_attention_backward(dout, q, k, v, out, lse, dlse, visible_rows, *, scale: float):
    """Gradients ``dq, dk, dv`` of :func:`sparse_attention_forward` (and of its lse, through ``dlse``
    ``(B, Hq, Tq)`` or None), by the same row chunks."""
    cdt = compute_dtype(q.dtype)
    Tq = q.shape[2]
    dq = _alloc(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=cdt, device=k.device)
    dv = torch.zeros(v.shape, dtype=cdt, device=v.device)
    kc, vc = k.to(cdt), v.to(cdt)
    step = _row_step(q.shape[0], q.shape[1], k.shape[2], q.device)
    for r0 in range(0, Tq, step):
        r1 = min(Tq, r0 + step)
        rows = slice(r0, r1)
        dq_c, dk_c, dv_c = attention_backward(dout[:, :, rows].to(cdt), q[:, :, rows].to(cdt), kc, vc,
                                              out[:, :, rows].to(cdt), lse[:, :, rows], visible_rows(r0, r1),
                                              None if dlse is None else dlse[:, :, rows], scale=scale)
        dq[:, :, rows] = dq_c.to(q.dtype)
        dk += dk_c
        dv += dv_c
    return dq, dk.to(k.dtype), dv.to(v.dtype)


# ----------------------------------------------------------------------------------------------
# relative-position ("band") attention: Funnel-Transformer's score as one op
# ----------------------------------------------------------------------------------------------
def relpos_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qr: torch.Tensor, R: torch.Tensor, *,
                     scale: float, rel_stride: int = 1, separate_cls: bool = False, tt: torch.Tensor | None = None,
                     q_types: torch.Tensor | None = None, k_types: torch.Tensor | None = None, cls_type: int = 2,
                     key_padding_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with a relative-position term read from a table and a per-pair token-type term.

    The oracle of :func:`effattn.relpos_attention` (and of its kernels); differentiable by autograd in
    every tensor argument. Per batch ``b``, query head ``h`` (KV head ``h // (Hq // Hkv)``), query row
    ``i`` and key ``j``::

        t(i, j)  = rel_stride * i - j + (Tk - 1)                  # row of the position table R
        extra    = not (separate_cls and (i == 0 or j == 0))      # the [cls] row/column: content only
        pos(i,j) = qr[b, h, i] . R[h, t(i, j)]                     if extra else 0
        same     = q_types[b, i] == k_types[b, j] or either equals cls_type
        typ(i,j) = tt[b, h, i, 1 if same else 0]                   if extra and tt is given else 0
        s(i, j)  = scale * (q[b, h, i] . k[b, hk, j] + pos + typ)  (-inf where key_padding_mask[b, j] is False)
        out      = softmax_j(s) @ v,   lse = logsumexp_j(s)

    A row that sees no key gets ``out = 0`` and ``lse = -inf`` (and zero gradients). Dropout, when
    ``dropout_p > 0``, drops probabilities exactly as :func:`attention_forward` does (same Philox bits
    from ``seed``).

    Args:
        q: ``(B, Hq, Tq, D)``; k: ``(B, Hkv, Tk, D)``; v: ``(B, Hkv, Tk, Dv)``; qr: ``(B, Hq, Tq, D)``.
        R: ``(Hq, NR, D)`` with ``NR == rel_stride * (Tq - 1) + Tk`` (row ``t`` is key-unit distance
            ``t - (Tk - 1)``). tt: ``(B, Hq, Tq, 2)`` or None; q_types ``(B, Tq)``, k_types ``(B, Tk)``
            integer, required with ``tt``. key_padding_mask: ``(B, Tk)`` bool (True = keep) or None.
    Returns:
        ``out (B, Hq, Tq, Dv)`` in q's dtype and ``lse (B, Hq, Tq)`` in :func:`compute_dtype`. Computed by
        query chunks (at most ``CHUNK_ELEMENTS`` scores, and the table rows the chunk reads, at once).
    """
    out_dtype = q.dtype
    cdt = compute_dtype(q.dtype)
    B, Hq, Tq, _ = q.shape
    n_kv, Tk = k.shape[1], k.shape[2]
    G = Hq // n_kv
    if Tq == 0 or Tk == 0:
        out = torch.zeros(B, Hq, Tq, v.shape[3], dtype=out_dtype, device=q.device) + 0 * v.sum() + 0 * q.sum()
        return out, torch.full((B, Hq, Tq), float("-inf"), dtype=cdt, device=q.device)
    kc = k.to(cdt).repeat_interleave(G, dim=1)
    vc = v.to(cdt).repeat_interleave(G, dim=1)
    Rc = R.to(cdt)
    cols = torch.arange(Tk, device=q.device)
    budget = CUDA_CHUNK_ELEMENTS if q.is_cuda else CHUNK_ELEMENTS
    step = max(1, min(Tq, budget // max(1, B * Hq * (Tk + rel_stride * Tk))))
    outs, lses = [], []
    for r0 in range(0, Tq, step):
        r1 = min(Tq, r0 + step)
        rows = torch.arange(r0, r1, device=q.device)
        s = torch.matmul(q[:, :, r0:r1].to(cdt), kc.transpose(-1, -2))
        t_lo, t_hi = rel_stride * r0, rel_stride * (r1 - 1) + Tk  # the table rows this chunk reads
        band = torch.matmul(qr[:, :, r0:r1].to(cdt), Rc[:, t_lo:t_hi].transpose(-1, -2))  # (B, Hq, c, t_hi - t_lo)
        t = rel_stride * rows[:, None] - cols[None, :] + (Tk - 1) - t_lo
        extra = torch.ones(r1 - r0, Tk, dtype=torch.bool, device=q.device)
        if separate_cls:
            extra = extra & (rows[:, None] != 0) & (cols[None, :] != 0)
        pos = torch.gather(band, -1, t.expand(B, Hq, -1, -1))
        if tt is not None:
            qt, kt = q_types[:, r0:r1], k_types
            same = (qt[:, :, None] == kt[:, None, :]) | (qt == cls_type)[:, :, None] | (kt == cls_type)[:, None, :]
            tt_c = tt[:, :, r0:r1].to(cdt)
            pos = pos + torch.where(same[:, None], tt_c[..., 1:2], tt_c[..., 0:1])
        s = (s + pos * extra) * scale
        if key_padding_mask is not None:
            s = s.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
        empty = torch.isneginf(s).all(-1, keepdim=True)
        lse_c = torch.logsumexp(s.masked_fill(empty, 0.0), dim=-1).masked_fill(empty[..., 0], float("-inf"))
        p = torch.exp(s - lse_c.masked_fill(empty[..., 0], 0.0)[..., None])
        if dropout_p > 0.0:
            bh = torch.arange(B * Hq, device=q.device).view(B, Hq, 1, 1)
            keep = dropout_keep(seed, dropout_p, bh, rows.view(-1, 1), cols.view(1, -1))
            p = p * keep * dropout_scale(dropout_p)
        outs.append(torch.matmul(p, vc))
        lses.append(lse_c)
    return torch.cat(outs, dim=2).to(out_dtype), torch.cat(lses, dim=2)


# ----------------------------------------------------------------------------------------------
# naive attention: the materialised baseline
# ----------------------------------------------------------------------------------------------
def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, *,
                    scale: float | None = None, window_left: int = -1, window_right: int = -1,
                    diag_offset: int = 0, dropout_p: float = 0.0, seed: int = 0, softcap: float = 0.0,
                    alibi_slopes: torch.Tensor | None = None, upcast: bool = False) -> torch.Tensor:
    """Textbook attention: the full ``(B, Hq, Tq, Tk)`` softmax in memory, differentiated by autograd.

    Same arguments and semantics as :func:`attention_forward` (``scale`` defaults to ``1/sqrt(D)``).
    Computes in the inputs' dtype unless ``upcast`` (then float32, or float64 for float64 inputs).
    """
    B, Hq, Tq, D = q.shape
    n_kv, Tk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    dt = compute_dtype(q.dtype) if upcast else q.dtype
    G = Hq // n_kv
    kk = k.to(dt).repeat_interleave(G, dim=1)
    vv = v.to(dt).repeat_interleave(G, dim=1)
    s = torch.matmul(q.to(dt), kk.transpose(-1, -2)) * scale
    if softcap > 0.0:
        s = softcap * torch.tanh(s / softcap)
    if alibi_slopes is not None:
        pos = torch.arange(Tq, device=q.device) + diag_offset
        dist = (pos[:, None] - torch.arange(Tk, device=q.device)[None, :]).abs().to(dt)
        s = s - alibi_slopes.to(dt)[:, :, None, None] * dist
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.to(dt)
    vis = _visible(torch.arange(Tq, device=q.device), torch.arange(Tk, device=q.device), window_left,
                   window_right, diag_offset)
    if vis is not None:
        s = s.masked_fill(~vis, float("-inf"))
    empty = torch.isneginf(s).all(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    if dropout_p > 0.0:
        bh = torch.arange(B * Hq, device=q.device).view(B, Hq, 1, 1)
        keep = dropout_keep(seed, dropout_p, bh, torch.arange(Tq, device=q.device).view(1, 1, Tq, 1),
                            torch.arange(Tk, device=q.device).view(1, 1, 1, Tk))
        p = p * keep * dropout_scale(dropout_p)
    return torch.matmul(p, vv).to(q.dtype)


def relpos_attention_backward(dout, q, k, v, qr, R, tt, q_types, k_types, key_padding_mask, out, lse, dlse, *,
                              scale, rel_stride, separate_cls, cls_type, dropout_p=0.0, seed=0):
    """Gradients of :func:`relpos_attention` by query chunks, written out (as
    :func:`attention_backward`): P recomputed from lse, ``dS = P (dP - delta)``,
    ``delta = rowsum(dO O) - dlse``; the position gradient of a row is ``dS`` scattered onto the table rows
    it read (one key per row), ``dqr = dP_band R_band``, ``dR += dP_band^T qr``; ``dtt`` the sums of ``dS``
    over the keys of the same / another type. Returns ``(dq, dk, dv, dqr, dR, dtt)`` (dtt None without tt)."""
    cdt = compute_dtype(q.dtype)
    B, Hq, Tq, D = q.shape
    n_kv, Tk = k.shape[1], k.shape[2]
    G = Hq // n_kv
    kc, vc = k.to(cdt).repeat_interleave(G, dim=1), v.to(cdt).repeat_interleave(G, dim=1)
    Rc = R.to(cdt)
    dq, dqr = torch.zeros(q.shape, dtype=cdt, device=q.device), torch.zeros(q.shape, dtype=cdt, device=q.device)
    dk = torch.zeros(B, Hq, Tk, D, dtype=cdt, device=q.device)
    dv = torch.zeros(B, Hq, Tk, v.shape[3], dtype=cdt, device=q.device)
    dR = torch.zeros(R.shape, dtype=cdt, device=q.device)
    dtt = torch.zeros(B, Hq, Tq, 2, dtype=cdt, device=q.device) if tt is not None else None
    if Tq and Tk and B:
        delta = (dout.to(cdt) * out.to(cdt)).sum(-1)
        if dlse is not None:
            delta = delta - dlse.to(cdt)
        cols = torch.arange(Tk, device=q.device)
        step = max(1, min(Tq, CHUNK_ELEMENTS // max(1, B * Hq * (Tk + rel_stride * Tk))))
        for r0 in range(0, Tq, step):
            r1 = min(Tq, r0 + step)
            rows = torch.arange(r0, r1, device=q.device)
            q_c, qr_c = q[:, :, r0:r1].to(cdt), qr[:, :, r0:r1].to(cdt)
            t_lo, t_hi = rel_stride * r0, rel_stride * (r1 - 1) + Tk
            R_band = Rc[:, t_lo:t_hi]
            t = (rel_stride * rows[:, None] - cols[None, :] + (Tk - 1) - t_lo).expand(B, Hq, -1, -1)
            extra = torch.ones(r1 - r0, Tk, dtype=torch.bool, device=q.device)
            if separate_cls:
                extra = extra & (rows[:, None] != 0) & (cols[None, :] != 0)
            s = torch.matmul(q_c, kc.transpose(-1, -2))
            pos = torch.gather(torch.matmul(qr_c, R_band.transpose(-1, -2)), -1, t)
            same = None
            if tt is not None:
                qt = q_types[:, r0:r1]
                same = ((qt[:, :, None] == k_types[:, None, :]) | (qt == cls_type)[:, :, None]
                        | (k_types == cls_type)[:, None, :])[:, None]
                tt_c = tt[:, :, r0:r1].to(cdt)
                pos = pos + torch.where(same, tt_c[..., 1:2], tt_c[..., 0:1])
            s = (s + pos * extra) * scale
            if key_padding_mask is not None:
                s = s.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
            lse_c = lse[:, :, r0:r1].to(cdt)
            p = torch.exp(s - lse_c.masked_fill(torch.isinf(lse_c), 0.0)[..., None])
            p = p.masked_fill(torch.isinf(lse_c)[..., None], 0.0)
            do_c = dout[:, :, r0:r1].to(cdt)
            dp = torch.matmul(do_c, vc.transpose(-1, -2))
            p_drop = p
            if dropout_p > 0.0:
                bh = torch.arange(B * Hq, device=q.device).view(B, Hq, 1, 1)
                z = dropout_keep(seed, dropout_p, bh, rows.view(-1, 1), cols.view(1, -1)).to(cdt)
                z = z * dropout_scale(dropout_p)
                p_drop, dp = p * z, dp * z
            dv += torch.matmul(p_drop.transpose(-1, -2), do_c)
            ds = p * (dp - delta[:, :, r0:r1, None]) * scale  # gradient of the unscaled score
            dq[:, :, r0:r1] = torch.matmul(ds, kc)
            dk += torch.matmul(ds.transpose(-1, -2), q_c)
            ds = ds * extra
            band = torch.zeros(B, Hq, r1 - r0, t_hi - t_lo, dtype=cdt, device=q.device).scatter_(-1, t, ds)
            dqr[:, :, r0:r1] = torch.matmul(band, R_band)
            dR[:, t_lo:t_hi] += torch.matmul(band.transpose(-1, -2), qr_c).sum(0)
            if dtt is not None:
                dtt[:, :, r0:r1, 1] = (ds * same).sum(-1)
                dtt[:, :, r0:r1, 0] = (ds * ~same).sum(-1)
    dk = dk.unflatten(1, (n_kv, G)).sum(2)
    dv = dv.unflatten(1, (n_kv, G)).sum(2)
    return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dqr.to(qr.dtype), dR.to(R.dtype),
            None if dtt is None else dtt.to(tt.dtype))
