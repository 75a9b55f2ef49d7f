"""Flash attention: the torch ops and the public functions.

Layers, top to bottom:

* ``effattn::attention_fwd`` / ``effattn::attention_bwd``: ``torch.library`` custom ops (with fake
  implementations, so they trace under ``torch.compile`` and run on fake tensors) that hand the work
  to the chosen backend; autograd is registered on the forward op.
* :func:`flash_attention`: FlashAttention-style API.
* :func:`scaled_dot_product_attention`: the signature and semantics of
  ``torch.nn.functional.scaled_dot_product_attention``, so that swapping one import is enough.
"""

from __future__ import annotations

import torch

from effattn import _op, _validate
from effattn.backends import get_backend
from effattn.block_mask import BlockMask, MaskRule
from effattn.profile import visible_pairs
from effattn.reference import compute_dtype
from effattn.sparse import sparse_attention

__all__ = ["flash_attention", "scaled_dot_product_attention"]


# ----------------------------------------------------------------------------------------------
# custom ops
# ----------------------------------------------------------------------------------------------
def _kwargs(scale, window_left, window_right, diag_offset, dropout_p, seed, softcap, alibi_slopes):
    kw = dict(scale=scale, window_left=window_left, window_right=window_right, diag_offset=diag_offset,
              dropout_p=dropout_p, seed=seed)
    if softcap > 0.0:  # score modifiers reach the backends only when used
        kw["softcap"] = softcap
    if alibi_slopes is not None:
        kw["alibi_slopes"] = alibi_slopes
    return kw


@torch.library.custom_op("effattn::attention_fwd", mutates_args=())
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
                  window_left: int, window_right: int, diag_offset: int, dropout_p: float, seed: int,
                  softcap: float, alibi_slopes: torch.Tensor | None,
                  backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated attention forward on a named backend: ``out (B, Hq, Tq, Dv)``, ``lse (B, Hq, Tq)``.
    ``alibi_slopes``: ``(B, Hq)`` contiguous, or None; ``softcap`` 0 for none."""
    out, lse = get_backend(backend).forward(q, k, v, mask, **_kwargs(scale, window_left, window_right, diag_offset,
                                                                      dropout_p, seed, softcap, alibi_slopes))
    return out, lse.to(compute_dtype(q.dtype))


@attention_fwd.register_fake
def _(q, k, v, mask, scale, window_left, window_right, diag_offset, dropout_p, seed, softcap, alibi_slopes, backend):
    B, Hq, Tq, _ = q.shape
    out = q.new_empty(B, Hq, Tq, v.shape[-1])
    lse = q.new_empty(B, Hq, Tq, dtype=compute_dtype(q.dtype))
    return out, lse


@torch.library.custom_op("effattn::attention_bwd", mutates_args=())
def attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, mask: torch.Tensor | None, dlse: torch.Tensor | None, scale: float,
                  window_left: int, window_right: int, diag_offset: int, dropout_p: float, seed: int,
                  softcap: float, alibi_slopes: torch.Tensor | None,
                  backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention backward on a named backend: ``dq, dk, dv`` like q, k, v."""
    return get_backend(backend).backward(dout, q, k, v, out, lse, mask, dlse,
                                         **_kwargs(scale, window_left, window_right, diag_offset, dropout_p, seed,
                                                   softcap, alibi_slopes))


@attention_bwd.register_fake
def _(dout, q, k, v, out, lse, mask, dlse, scale, window_left, window_right, diag_offset, dropout_p, seed, softcap,
      alibi_slopes, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _pairs(q, k, window_left, window_right, diag_offset, **_) -> int:
    B, Hq, Tq = q.shape[:3]
    return B * Hq * visible_pairs(Tq, k.shape[2], window_left, window_right, diag_offset)


_op.register(attention_fwd, attention_bwd, pairs=_pairs)


# ----------------------------------------------------------------------------------------------
# public functions
# ----------------------------------------------------------------------------------------------
def _run(q, k, v, mask, shape, *, scale, window_left, window_right, diag_offset, dropout_p, seed, backend,
         softcap=0.0, alibi_slopes=None):
    backend, scale = _op.prepare(q, shape, backend, scale, dropout_p=dropout_p, mask=mask, softcap=softcap > 0.0,
                                 alibi=alibi_slopes is not None)
    # A window wider than both sequences is unbounded on that side; clamping keeps kernel ints small.
    span = shape.Tq + shape.Tk
    window_left, window_right = min(window_left, span), min(window_right, span)
    return attention_fwd(q, k, v, mask, scale, window_left, window_right, diag_offset, float(dropout_p), seed,
                         float(softcap), alibi_slopes, backend)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                    scale: float | None = None, key_padding_mask: torch.Tensor | None = None,
                    window: tuple[int | None, int | None] | None = None, dropout_p: float = 0.0,
                    return_lse: bool = False, dropout_seed: int | None = None, backend: str | None = None,
                    segment_ids=None, softcap: float | None = 0.0, alibi_slopes: torch.Tensor | None = None):
    """Exact attention, computed tile by tile (FlashAttention) and differentiable.

    Args:
        q: ``(B, Hq, Tq, D)``; k: ``(B, Hkv, Tk, D)``; v: ``(B, Hkv, Tk, Dv)``. float16, bfloat16 or
            float32 (float64 on the reference backend); any strides. ``Hq`` must be a multiple of
            ``Hkv`` (GQA/MQA): query head ``h`` uses KV head ``h // (Hq // Hkv)``. ``Tq`` may differ from
            ``Tk``. The Triton backend takes any head dim (e.g. 40, 80, 96, 160) up to 256 for v and
            up to 1024 for q/k (QK dims above 256 run on small tiles: for extra score features).
        causal: query ``i`` sees keys ``j <= i + Tk - Tq``: the diagonal is aligned to the
            bottom-right corner of the score matrix (FlashAttention 2.1+). When ``Tq > Tk`` the first
            ``Tq - Tk`` queries see no key.
        scale: scores are ``scale * q k^T``; default ``1 / sqrt(D)``.
        key_padding_mask: ``(B, Tk)`` bool, True = keep the key.
        window: ``(left, right)`` sliding window, aligned like ``causal``: query ``i`` sees keys
            ``i + Tk - Tq - left <= j <= i + Tk - Tq + right``; ``None`` or -1 leaves a side unbounded.
            With ``causal``, ``right`` is at most 0.
        dropout_p: dropout on the attention probabilities. The keep mask is drawn from a Philox
            stream keyed by ``dropout_seed`` (drawn from torch's generator when None, so
            ``torch.manual_seed`` makes it reproducible) and regenerated, not stored, by the backward.
        return_lse: also return ``lse (B, Hq, Tq)`` float32 (float64 for float64 inputs), the
            natural-log log-sum-exp of each row's scores; it is differentiable too.
        backend: None (automatic: CUDA tensors -> ``"triton"``, CPU -> ``"reference"``), or a name;
            the environment variable ``EFFATTN_BACKEND`` sets the default.
        segment_ids: ``(B, Tq)`` int (with ``Tq == Tk``), or a pair ``(q_segment_ids (B, Tq),
            kv_segment_ids (B, Tk))``: query ``i`` sees key ``j`` only if their segment ids are equal
            (packed documents; DeFormer's question/context split), on top of ``causal``/``window``.
            Runs the block-sparse kernels (:func:`effattn.sparse_attention`), which skip
            cross-segment blocks; not with dropout, softcap or alibi_slopes.
        softcap: ``> 0`` soft-caps the scaled scores, ``softcap * tanh(scale q.k / softcap)`` (Gemma-2;
            flash-attn's ``softcap``), forward and backward; 0 or None: off.
        alibi_slopes: ``(Hq,)`` or ``(B, Hq)`` float (flash-attn's): adds ``-slope * |i + Tk - Tq - j|`` to
            the score of query ``i`` and key ``j`` (after the soft cap), inside the kernels.

    Returns:
        ``out (B, Hq, Tq, Dv)`` in q's dtype, or ``(out, lse)``. A query with no visible key gets
        ``out = 0``, ``lse = -inf`` and zero gradients.
    """
    shape = _validate.check_qkv(q, k, v)
    _validate.check_scale(scale)
    _validate.check_dropout(dropout_p)
    _validate.check_seed(dropout_seed)
    _validate.check_key_padding_mask(key_padding_mask, shape, q.device)
    window_left, window_right = _validate.window_bounds(window)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if causal:
        window_right = 0 if window_right < 0 else min(window_right, 0)
    softcap = _validate.softcap_value(softcap)
    alibi_slopes = _validate.alibi_slopes(alibi_slopes, shape, q.device, compute_dtype(q.dtype))
    if segment_ids is not None:
        if softcap or alibi_slopes is not None:
            raise ValueError("segment_ids cannot be combined with softcap or alibi_slopes (the block-sparse kernels "
                             "have neither)")
        return _segmented(q, k, v, shape, segment_ids, scale=scale, key_padding_mask=key_padding_mask,
                          window_left=window_left, window_right=window_right, dropout_p=dropout_p,
                          return_lse=return_lse, backend=backend)
    mask = key_padding_mask[:, None, None, :] if key_padding_mask is not None else None
    out, lse = _run(q, k, v, mask, shape, scale=scale, window_left=window_left, window_right=window_right,
                    diag_offset=shape.Tk - shape.Tq, dropout_p=dropout_p,
                    seed=_op.draw_seed(dropout_p, dropout_seed), backend=backend, softcap=softcap,
                    alibi_slopes=alibi_slopes)
    return (out, lse) if return_lse else out


SEGMENT_BLOCK_SIZE = (64, 64)  # tiles of the block mask that segment_ids turn into


def _segmented(q, k, v, shape, segment_ids, *, scale, key_padding_mask, window_left, window_right, dropout_p,
               return_lse, backend):
    """flash_attention with segment ids: one MaskRule (window and segments), run block-sparse."""
    if dropout_p > 0.0:
        raise ValueError("segment_ids cannot be combined with dropout_p > 0 (the block-sparse kernels have no dropout)")
    q_seg, kv_seg = segment_ids if isinstance(segment_ids, (tuple, list)) else (segment_ids, None)
    if kv_seg is None and shape.Tq != shape.Tk:
        raise ValueError(f"segment_ids: Tq ({shape.Tq}) != Tk ({shape.Tk}): pass (q_segment_ids, kv_segment_ids)")
    for name, seg, T in (("q segment_ids", q_seg, shape.Tq), ("kv segment_ids", kv_seg, shape.Tk)):
        if seg is None:
            continue
        _validate.check_tensor(name, seg, 2, "(B, T)")
        if seg.dtype.is_floating_point or seg.dtype == torch.bool or tuple(seg.shape) not in ((shape.B, T), (1, T)):
            raise ValueError(f"{name} must be an integer tensor of shape (B, T) = {(shape.B, T)} (or (1, T)), "
                             f"got {seg.dtype} {tuple(seg.shape)}")
        if seg.device != q.device:
            raise ValueError(f"{name} must be on {q.device}, got {seg.device}")
    rule = MaskRule(window_left=window_left, window_right=window_right, diag_offset=shape.Tk - shape.Tq,
                    q_segments=q_seg, kv_segments=kv_seg)
    block_mask = BlockMask.from_rule(rule, shape.Tq, shape.Tk, block_size=SEGMENT_BLOCK_SIZE, device=q.device)
    return sparse_attention(q, k, v, block_mask, scale=scale, key_padding_mask=key_padding_mask,
                            return_lse=return_lse, backend=backend)


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False,
                                 *, backend: str | None = None) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention``, on effattn's kernels.

    Args:
        query: ``(N, ..., Hq, L, E)``; key: ``(N, ..., Hkv, S, E)``; value: ``(N, ..., Hkv, S, Ev)``, at
            least 3-D; the dimension before the sequence is the head dimension (as torch's GQA reads it).
        attn_mask: bool (True = take part in attention) or float (added to the scores), broadcastable
            to ``(N, ..., Hq, L, S)``; read tile by tile by the kernels, never expanded in memory.
            Gradients with respect to a float mask are not supported (an error says so).
        dropout_p: applied whenever > 0, as torch does; see :func:`flash_attention` for the RNG.
        is_causal: top-left aligned causal mask (``j <= i``), as torch; not together with ``attn_mask``.
        scale: default ``1 / sqrt(E)``.
        enable_gqa: allow ``Hq`` to be a multiple of ``Hkv``.
        backend: as in :func:`flash_attention`.

    Returns:
        ``(N, ..., Hq, L, Ev)``. Rows that see no key are 0 (torch's math path does the same).
    """
    for name, x in (("query", query), ("key", key), ("value", value)):
        _validate.check_tensor(name, x)
        if x.dim() < 3:
            raise ValueError(f"{name} must be at least 3-D (..., heads, seq, dim), got shape {tuple(x.shape)}")
    if not (query.dim() == key.dim() == value.dim()):
        raise ValueError(f"query, key, value must have the same number of dims, got {query.dim()}, {key.dim()}, "
                         f"{value.dim()}")
    lead = query.shape[:-3]
    if key.shape[:-3] != lead or value.shape[:-3] != lead:
        raise ValueError(f"leading (batch) dims differ: query {tuple(query.shape)}, key {tuple(key.shape)}, "
                         f"value {tuple(value.shape)}")
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    if is_causal and attn_mask is not None:
        raise ValueError("attn_mask must be None when is_causal=True (as in torch)")
    if query.shape[-3] != key.shape[-3] and not enable_gqa:
        raise ValueError(f"query has {query.shape[-3]} heads and key {key.shape[-3]}: pass enable_gqa=True for GQA")
    _validate.check_dropout(dropout_p)
    _validate.check_scale(scale)

    def as4d(x):
        return x.reshape(-1, *x.shape[-3:]) if x.dim() != 4 else x

    q, k, v = as4d(query), as4d(key), as4d(value)
    shape = _validate.check_qkv(q, k, v, names=("query", "key", "value"))
    target = (*lead, shape.Hq, shape.Tq, shape.Tk)
    _validate.check_attn_mask(attn_mask, target, query.device)
    mask = None
    if attn_mask is not None:
        mask = attn_mask.expand(target)
        if mask.dim() != 4:
            mask = mask.reshape(-1, *target[-3:])
    out, _ = _run(q, k, v, mask, shape, scale=scale, window_left=-1, window_right=0 if is_causal else -1,
                  diag_offset=0, dropout_p=dropout_p, seed=_op.draw_seed(dropout_p, None), backend=backend)
    return out.reshape(*lead, shape.Hq, shape.Tq, shape.Dv)
