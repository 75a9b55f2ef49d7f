"""Pool-query-only strided attention (Funnel-Transformer, Dai et al. 2020).

A Funnel block that compresses the sequence pools only the queries: ``q`` comes from pooled hidden
states, ``k`` and ``v`` from the unpooled ones, so the attention output has the pooled length. Here
the queries are pooled inside the kernels as they are loaded (no pooled copy of ``q`` is written),
and the backward carries the gradient through the pooling to the unpooled ``q``.

Layers, as in :mod:`effattn.flash`: ``effattn::pooled_attention_fwd`` / ``_bwd`` custom ops with fake
implementations and registered autograd, then the public :func:`pooled_attention` and the helpers
:func:`pooled_positions` and :func:`pool_key_padding_mask`.
"""

from __future__ import annotations

import torch

from effattn import _op, _validate
from effattn.backends import get_backend
from effattn.profile import visible_pairs
from effattn.reference import POOL_MODES, QueryPool, compute_dtype, pool_queries
from effattn.reference import pooled_positions as _pooled_positions

__all__ = ["QueryPool", "pool_key_padding_mask", "pooled_attention", "pooled_positions"]


def _pool(stride: int, mode: str, separate_cls: bool, truncate: bool) -> QueryPool:
    return QueryPool(stride=stride, mode=mode, separate_cls=separate_cls, truncate=truncate)


@torch.library.custom_op("effattn::pooled_attention_fwd", mutates_args=())
def pooled_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                         scale: float, window_left: int, window_right: int, stride: int, mode: str,
                         separate_cls: bool, truncate: bool, dropout_p: float, seed: int,
                         backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of pooled queries: ``out (B, Hq, Tp, Dv)``, ``lse (B, Hq, Tp)``."""
    pool = _pool(stride, mode, separate_cls, truncate)
    out, lse = get_backend(backend).forward(q, k, v, mask, scale=scale, window_left=window_left,
                                            window_right=window_right, diag_offset=pool.position_offset,
                                            dropout_p=dropout_p, seed=seed, pool=pool)
    return out, lse.to(compute_dtype(q.dtype))


@pooled_attention_fwd.register_fake
def _(q, k, v, mask, scale, window_left, window_right, stride, mode, separate_cls, truncate, dropout_p, seed,
      backend):
    B, Hq, T, _ = q.shape
    Tp = _pool(stride, mode, separate_cls, truncate).pooled_len(T)
    return q.new_empty(B, Hq, Tp, v.shape[-1]), q.new_empty(B, Hq, Tp, dtype=compute_dtype(q.dtype))


@torch.library.custom_op("effattn::pooled_attention_bwd", mutates_args=())
def pooled_attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                         lse: torch.Tensor, mask: torch.Tensor | None, dlse: torch.Tensor | None, scale: float,
                         window_left: int, window_right: int, stride: int, mode: str, separate_cls: bool,
                         truncate: bool, dropout_p: float, seed: int,
                         backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of :func:`pooled_attention_fwd`: ``dq`` (of the unpooled q), ``dk``, ``dv``."""
    pool = _pool(stride, mode, separate_cls, truncate)
    return get_backend(backend).backward(dout, q, k, v, out, lse, mask, dlse, scale=scale, window_left=window_left,
                                         window_right=window_right, diag_offset=pool.position_offset,
                                         dropout_p=dropout_p, seed=seed, pool=pool)


@pooled_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, mask, dlse, scale, window_left, window_right, stride, mode, separate_cls, truncate,
      dropout_p, seed, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _pairs(q, k, window_left, window_right, stride, mode, separate_cls, truncate, **_) -> int:
    B, Hq, T = q.shape[:3]
    pool = _pool(stride, mode, separate_cls, truncate)
    return B * Hq * visible_pairs(pool.pooled_len(T), k.shape[2], window_left, window_right, pool.position_offset,
                                  q_pos_stride=stride, clamp_first=separate_cls)


_op.register(pooled_attention_fwd, pooled_attention_bwd, pairs=_pairs)


# ----------------------------------------------------------------------------------------------
# public functions
# ----------------------------------------------------------------------------------------------
def _check_pool_args(stride, pool, separate_cls, truncate) -> None:
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be an int >= 1, got {stride!r}")
    if pool not in POOL_MODES:
        raise ValueError(f"pool must be one of {POOL_MODES}, got {pool!r}")
    for name, flag in (("separate_cls", separate_cls), ("truncate", truncate)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")


def pooled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, stride: int = 2, pool: str = "mean",
                     separate_cls: bool = False, truncate: bool = True, causal: bool = False,
                     key_padding_mask: torch.Tensor | None = None, scale: float | None = None,
                     dropout_p: float = 0.0, return_lse: bool = False, dropout_seed: int | None = None,
                     backend: str | None = None):
    """Funnel-Transformer attention: queries pooled along the sequence, keys and values at full length.

    The queries are pooled exactly as Funnel's ``pool_tensor``: with ``separate_cls`` the sequence is
    first rewritten ``[x_0] + x[:-1]`` (``truncate``) or ``[x_0] + x``, so that [cls] stays a row of its
    own; then windows of ``stride`` rows (step ``stride``, ceil mode: a short last window is pooled
    over the rows it has) are averaged (``pool="mean"``) or maxed (``"max"``), per feature. Pooling
    happens inside the kernel as q is loaded; no pooled copy of q is written.

    Note on ``pool="max"``: here the *projected* queries are max-pooled, which differs from Funnel's
    model, which max-pools hidden states before the query projection (``effattn.nn`` does that when
    asked for max). For ``"mean"`` the two agree, since the projection is linear.

    Args:
        q: ``(B, Hq, T, Dqk)`` unpooled queries; k ``(B, Hkv, T, Dqk)``, v ``(B, Hkv, T, Dv)``: the same
            ``T`` (keys live on the grid the queries were pooled from). GQA/MQA as in
            :func:`effattn.flash_attention`; dtypes and head dims likewise.
        stride: pooling window and step (Funnel uses 2).
        causal: key ``j`` is visible to pooled query ``i`` iff ``j <= pos_i``, with ``pos_i`` the
            pooled position (:func:`pooled_positions`: the first token of the window; the [cls]
            query counts as token 0, so it sees the [cls] key only). A rule on positions, not
            autoregressive safety: a pooled query averages the rows up to the end of its window.
        key_padding_mask: ``(B, T)`` bool, True = keep, over the unpooled keys. For the mask of the
            pooled sequence (the keys of the next layer), see :func:`pool_key_padding_mask`.
        scale: default ``1 / sqrt(Dqk)``.
        dropout_p, dropout_seed, return_lse, backend: as in :func:`effattn.flash_attention`.

    Returns:
        ``out (B, Hq, Tp, Dv)`` with ``Tp = ceil(T' / stride)``, ``T'`` = ``T``, or ``T + 1`` with
        ``separate_cls`` and not ``truncate``; or ``(out, lse)``. Gradients flow to the unpooled q
        (mean: spread evenly over the window; max: to the arg-max element); rows cut by truncation get 0.
    """
    _check_pool_args(stride, pool, separate_cls, truncate)
    shape = _validate.check_qkv(q, k, v)
    if shape.Tk != shape.Tq:
        raise ValueError(f"pooled_attention: q and k must have the same (unpooled) length, got q {tuple(q.shape)} "
                         f"and k {tuple(k.shape)}")
    _validate.check_scale(scale)
    _validate.check_dropout(dropout_p)
    _validate.check_seed(dropout_seed)
    _validate.check_key_padding_mask(key_padding_mask, shape, q.device)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    mask = key_padding_mask[:, None, None, :] if key_padding_mask is not None else None
    backend, scale = _op.prepare(q, shape, backend, scale, dropout_p=dropout_p, mask=mask,
                                 pool=_pool(stride, pool, separate_cls, truncate))
    out, lse = pooled_attention_fwd(q, k, v, mask, scale, -1, 0 if causal else -1, stride, pool, separate_cls,
                                    truncate, float(dropout_p), _op.draw_seed(dropout_p, dropout_seed), backend)
    return (out, lse) if return_lse else out


def pooled_positions(seq_len: int, *, stride: int = 2, separate_cls: bool = False, truncate: bool = True,
                     device=None) -> torch.Tensor:
    """Positions of the pooled queries on the unpooled grid, int64 ``(Tp,)``, as Funnel assigns them.

    A pooled row sits at the position of the first token of its window; with ``separate_cls`` the
    [cls] row sits at ``1 - stride`` (one stride before token 1), so positions stay evenly spaced:
    ``pos_i = i * stride + (1 - stride if separate_cls else 0)``. Funnel's ``stride_pool_pos`` with
    ``stride=2`` gives ``[-1, 1, 3, ...]`` (and ``[0, 2, 4, ...]`` without [cls]). For deeper blocks,
    whose own grid is spaced ``2**b``, scale these by the grid's spacing. Relative positions use these
    positions; causal masking too, except that the [cls] query counts as token 0.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 0:
        raise ValueError(f"seq_len must be an int >= 0, got {seq_len!r}")
    _check_pool_args(stride, "mean", separate_cls, truncate)
    return _pooled_positions(seq_len, _pool(stride, "mean", separate_cls, truncate), device=device)


def pool_key_padding_mask(key_padding_mask: torch.Tensor, *, stride: int = 2, separate_cls: bool = False,
                          truncate: bool = True) -> torch.Tensor:
    """The key padding mask of the pooled sequence, ``(B, T)`` bool -> ``(B, Tp)`` bool (True = keep).

    Follows Hugging Face's Funnel (``pool_tensor(mask, mode="min")``): a pooled position is kept only
    if every token of its window is kept. (The original Funnel code keeps it if any token is.)
    """
    _validate.check_tensor("key_padding_mask", key_padding_mask, 2, "(B, T)")
    if key_padding_mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must be bool (True = keep), got {key_padding_mask.dtype}")
    _check_pool_args(stride, "mean", separate_cls, truncate)
    x = key_padding_mask[:, None, :, None].to(torch.float32)
    # min-pool = -max-pool(-x)
    pooled = -pool_queries(-x, _pool(stride, "max", separate_cls, truncate))
    return pooled[:, 0, :, 0] > 0.5
