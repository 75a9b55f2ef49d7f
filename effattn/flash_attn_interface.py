"""flash-attn 2.x's attention functions on effattn's kernels: switching is one import.

Provided, with flash-attn's names, argument names, defaults, layouts and return conventions:

* dense ``(batch, seqlen, heads, head_dim)``: :func:`flash_attn_func`, :func:`flash_attn_qkvpacked_func`,
  :func:`flash_attn_kvpacked_func` (on :func:`effattn.flash_attention`);
* packed variable-length ``(total, heads, head_dim)`` with ``cu_seqlens``: :func:`flash_attn_varlen_func`,
  :func:`flash_attn_varlen_qkvpacked_func`, :func:`flash_attn_varlen_kvpacked_func` (on
  :func:`effattn.varlen_attention`);
* decoding against KV caches, appending new keys/values in place: :func:`flash_attn_with_kvcache` (on
  :func:`effattn.varlen_attention` with ``seqused_k``).

Example::

    # from flash_attn import flash_attn_func, flash_attn_varlen_func
    from effattn.flash_attn_interface import flash_attn_func, flash_attn_varlen_func

    out = flash_attn_func(q, k, v, causal=True)  # q (B, Tq, H, D), k/v (B, Tk, Hkv, D) -> (B, Tq, H, D)
    out = flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=True)

Arguments, as they reach effattn (:func:`effattn.flash_attention` takes ``(B, H, T, D)``: the dense inputs
are passed as transposed views, never copied):

========================  ==================================================================================
flash-attn                effattn
========================  ==================================================================================
``q (B, Tq, H, D)``       ``q.transpose(1, 2)``; likewise ``k``, ``v`` and the slices of ``qkv`` / ``kv``
``q (total_q, H, D)``     varlen: ``q`` as is; likewise ``k``, ``v`` and the slices of ``qkv`` / ``kv``
``cu_seqlens_q/_k``       ``cu_seqlens_q`` / ``cu_seqlens_k`` (``cu_seqlens`` both), int32 ``(S + 1,)``
``max_seqlen_q/_k``       ``max_seqlen_q`` / ``max_seqlen_k``: checked to be >= the longest sequence
``dropout_p``             ``dropout_p`` (applied whenever > 0, in training and eval alike, as flash-attn)
``softmax_scale``         ``scale`` (None: ``1 / sqrt(D)``)
``causal``                ``causal`` (bottom-right aligned, as flash-attn 2.1+; per sequence in varlen)
``window_size=(l, r)``    ``window=(l, r)``, -1 unbounded on either side: query ``i`` sees keys
                          ``i + Tk - Tq - l <= j <= i + Tk - Tq + r``; with ``causal``, ``r`` is 0
``softcap``               ``softcap`` (0: off)
``alibi_slopes``          ``alibi_slopes``, ``(H,)`` or ``(B, H)``: bias ``-slope * |i + Tk - Tq - j|``
``deterministic``         accepted and ignored: effattn's backward passes are deterministic always
``return_attn_probs``     ``return_lse``: returns ``(out, softmax_lse, None)``, lse ``(B, H, Tq)`` dense,
                          ``(H, total_q)`` varlen
``k_cache, v_cache``      kvcache: ``k``, ``v`` caches ``(S, Tc, Hkv, D)`` (``k_cache[cache_batch_idx]``)
``cache_seqlens``         kvcache: ``seqused_k = cache_seqlens + k.shape[1]`` (the appended tokens)
``k, v`` (kvcache)        written in place into the caches at ``cache_seqlens[b] ...``, then attended
``return_softmax_lse``    kvcache: ``return_lse``; returns ``(out, softmax_lse (B, H, Tq))``
``num_splits``            accepted and ignored (see below)
========================  ==================================================================================

What differs from flash-attn:

* ``S_dmask`` (the third value returned with ``return_attn_probs=True``) is always None: effattn never
  materialises the attention probabilities (flash-attn returns them only for its tests).
* ``softmax_lse`` of a query that sees no key is ``-inf`` (the log of an empty sum; its output row is 0);
  it is differentiable.
* Outputs are contiguous, as flash-attn's (``out.view(B, T, H * D)`` works); for the dense functions this
  costs one copy of the output, from effattn's ``(B, H, Tq, Dv)`` memory order.
* ``num_splits`` of :func:`flash_attn_with_kvcache` is ignored: the kernels choose their own split of the
  keys (split-KV decoding in the Triton and C++ CPU kernels).
* Not supported, each raising ``NotImplementedError`` naming the argument: paged keys in
  :func:`flash_attn_varlen_func` (``block_table``), rotary embeddings (``rotary_cos``, ``rotary_sin``;
  ``rotary_interleaved`` is then moot and ignored) and ``cache_leftpad``.
* :func:`flash_attn_with_kvcache` gathers ``k_cache[cache_batch_idx]`` (a copy of the rows used) when
  ``cache_batch_idx`` is given, and the pages of ``block_table`` (a paged cache, any page size) into one
  cache per sequence (a copy of the pages used: the kernels do not read pages in place); it stays
  differentiable (flash-attn's has no backward).
* dtypes: float16 and bfloat16 as flash-attn, and float32 too (float64 on the reference backend). ``v``
  may have a head dim different from ``q``/``k``'s.
* Backends are chosen automatically: CUDA tensors run the Triton kernels, CPU tensors the C++ kernels
  (the reference implementation for what they decline, varlen included); ``EFFATTN_BACKEND`` names one
  instead.
* Dropout masks come from effattn's Philox stream, seeded from torch's generator: ``torch.manual_seed``
  makes them reproducible, but they are not flash-attn's masks.
"""

from __future__ import annotations

import math

import torch

from effattn import _validate
from effattn.flash import flash_attention
from effattn.varlen import _offsets, varlen_attention

__all__ = ["flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func", "flash_attn_varlen_func",
           "flash_attn_varlen_kvpacked_func", "flash_attn_varlen_qkvpacked_func", "flash_attn_with_kvcache"]


def _check_options(softmax_scale, window_size, **flags) -> tuple[int, int]:
    """Check the arguments effattn does not see under flash-attn's names; return the window as ints."""
    if softmax_scale is not None and (isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float))
                                      or not math.isfinite(softmax_scale)):
        raise TypeError(f"softmax_scale must be a finite float or None, got {softmax_scale!r}")
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or any(isinstance(w, bool) or not isinstance(w, int) or w < -1 for w in window_size)):
        raise ValueError(f"window_size must be a pair (left, right) of ints >= -1 (-1: unbounded), got {window_size!r}")
    for name, flag in flags.items():
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    return window_size[0], window_size[1]


def _check_layout(name: str, x, ndim: int, layout: str, packed: int | None = None) -> None:
    """``x`` must be an ``ndim``-D tensor laid out as ``layout`` (with size ``packed`` at dim -3, the packing
    dim before ``(heads, head_dim)``, if given)."""
    _validate.check_tensor(name, x, ndim, layout)
    if packed is not None and x.shape[-3] != packed:
        raise ValueError(f"{name} must be {layout} with size {packed} at dim {ndim - 3}, got shape {tuple(x.shape)}")


def _attention(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
               return_attn_probs):
    """flash-attn's semantics on ``(B, T, H, D)`` views q, k, v (already checked to be 4-D)."""
    window = _check_options(softmax_scale, window_size, deterministic=deterministic,
                            return_attn_probs=return_attn_probs)
    result = flash_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal,
                             scale=softmax_scale, window=window, dropout_p=dropout_p, return_lse=return_attn_probs,
                             softcap=softcap, alibi_slopes=alibi_slopes)
    if not return_attn_probs:
        return result.transpose(1, 2).contiguous()
    out, lse = result
    return out.transpose(1, 2).contiguous(), lse, None


def _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
            window_size, softcap, alibi_slopes, deterministic, return_attn_probs):
    """flash-attn's varlen semantics on packed ``(total, H, D)`` views q, k, v (already checked to be 3-D)."""
    window = _check_options(softmax_scale, window_size, deterministic=deterministic,
                            return_attn_probs=return_attn_probs)
    result = varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                              max_seqlen_k=max_seqlen_k, causal=causal, scale=softmax_scale, window=window,
                              dropout_p=dropout_p, softcap=softcap, alibi_slopes=alibi_slopes,
                              return_lse=return_attn_probs)
    if not return_attn_probs:
        return result
    out, lse = result
    return out, lse, None


_UNSUPPORTED = {
    "block_table": "paged keys of flash_attn_varlen_func are not implemented (pass packed k, v; "
                   "flash_attn_with_kvcache takes a block_table)",
    "rotary_cos": "rotary embeddings are not applied here (rotate q and k before the call)",
    "rotary_sin": "rotary embeddings are not applied here (rotate q and k before the call)",
    "cache_leftpad": "left-padded caches are not implemented (keep each sequence's keys from slot 0)",
}


def _unsupported(**args) -> None:
    """Raise ``NotImplementedError`` naming the first of ``args`` that is given (not None)."""
    for name, value in args.items():
        if value is not None:
            raise NotImplementedError(f"{name} is not supported by effattn's flash-attn interface: "
                                      f"{_UNSUPPORTED[name]}; pass {name}=None")


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash-attn's ``flash_attn_func``: attention on ``(batch, seqlen, heads, head_dim)`` tensors.

    Args:
        q: ``(B, Tq, H, D)``; k: ``(B, Tk, Hkv, D)``; v: ``(B, Tk, Hkv, Dv)``; ``H`` a multiple of ``Hkv``
            (MQA/GQA: query head ``h`` uses KV head ``h // (H // Hkv)``). Any strides.
        dropout_p: dropout probability, applied whenever > 0 (pass 0.0 at evaluation, as with flash-attn).
        softmax_scale: scale of ``q k^T`` before the softmax; default ``1 / sqrt(D)``.
        causal: bottom-right aligned causal mask, query ``i`` sees keys ``j <= i + Tk - Tq``.
        window_size: ``(left, right)`` sliding window, -1 for an unbounded side: query ``i`` sees keys
            ``i + Tk - Tq - left <= j <= i + Tk - Tq + right``.
        softcap: ``> 0`` soft-caps the scaled scores to ``softcap * tanh(score / softcap)``; 0: off.
        alibi_slopes: ``(H,)`` or ``(B, H)`` float; adds ``-slope * |i + Tk - Tq - j|`` to the scores
            (after the soft cap).
        deterministic: accepted for compatibility; effattn's backward is always deterministic.
        return_attn_probs: also return ``softmax_lse`` and ``S_dmask`` (always None here).

    Returns:
        ``out (B, Tq, H, Dv)`` contiguous, or ``(out, softmax_lse (B, H, Tq) float32, None)`` with
        ``return_attn_probs``.
    """
    _check_layout("q", q, 4, "(B, Tq, H, D)")
    _check_layout("k", k, 4, "(B, Tk, Hkv, D)")
    _check_layout("v", v, 4, "(B, Tk, Hkv, Dv)")
    return _attention(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                      return_attn_probs)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash-attn's ``flash_attn_qkvpacked_func``: self-attention on a packed ``qkv (B, T, 3, H, D)``.

    q, k and v are views of ``qkv`` and its gradient comes back as one tensor. The other arguments and
    the return value are those of :func:`flash_attn_func`.
    """
    _check_layout("qkv", qkv, 5, "(B, T, 3, H, D)", packed=3)
    q, k, v = qkv.unbind(2)
    return _attention(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                      return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash-attn's ``flash_attn_kvpacked_func``: ``q (B, Tq, H, D)`` against a packed ``kv (B, Tk, 2, Hkv, D)``.

    k and v are views of ``kv`` and its gradient comes back as one tensor. The other arguments and the
    return value are those of :func:`flash_attn_func`.
    """
    _check_layout("q", q, 4, "(B, Tq, H, D)")
    _check_layout("kv", kv, 5, "(B, Tk, 2, Hkv, D)", packed=2)
    k, v = kv.unbind(2)
    return _attention(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                      return_attn_probs)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """flash-attn's ``flash_attn_varlen_func``: attention over ``S`` sequences packed along the token axis.

    Args:
        q: ``(total_q, H, D)``, the sequences' queries one after another; k: ``(total_k, Hkv, D)``;
            v: ``(total_k, Hkv, Dv)``; ``H`` a multiple of ``Hkv`` (MQA/GQA). Any strides.
        cu_seqlens_q, cu_seqlens_k: ``(S + 1,)`` int32 offsets of the sequences in q and in k/v, from 0 to
            ``total_q`` / ``total_k``, non-decreasing (a sequence may be empty). Sequence ``s`` is queries
            ``cu_seqlens_q[s] : cu_seqlens_q[s + 1]`` against keys ``cu_seqlens_k[s] : cu_seqlens_k[s + 1]``.
        max_seqlen_q, max_seqlen_k: the longest query / key sequence (ints; checked to be >= the longest).
        block_table: paged keys are not supported here: must be None (:func:`flash_attn_with_kvcache` takes one).

    The other arguments are those of :func:`flash_attn_func`, per sequence: causal masks and windows are
    aligned bottom-right within each sequence (``Tq``, ``Tk`` its own lengths), ``alibi_slopes`` is ``(H,)``
    or ``(S, H)``.

    Returns:
        ``out (total_q, H, Dv)`` contiguous, or ``(out, softmax_lse (H, total_q) float32, None)`` with
        ``return_attn_probs``.
    """
    _unsupported(block_table=block_table)
    _check_layout("q", q, 3, "(total_q, H, D)")
    _check_layout("k", k, 3, "(total_k, Hkv, D)")
    _check_layout("v", v, 3, "(total_k, Hkv, Dv)")
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
                   window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """flash-attn's ``flash_attn_varlen_qkvpacked_func``: self-attention on a packed ``qkv (total, 3, H, D)``.

    ``cu_seqlens (S + 1,)`` int32 and ``max_seqlen`` serve queries and keys alike. q, k and v are views of
    ``qkv`` and its gradient comes back as one tensor. The other arguments and the return value are those
    of :func:`flash_attn_varlen_func`.
    """
    _check_layout("qkv", qkv, 4, "(total, 3, H, D)", packed=3)
    _offsets("cu_seqlens", cu_seqlens, qkv.shape[0], qkv.device)
    q, k, v = qkv.unbind(1)
    return _varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale, causal,
                   window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash-attn's ``flash_attn_varlen_kvpacked_func``: ``q (total_q, H, D)`` against a packed
    ``kv (total_k, 2, Hkv, D)``.

    k and v are views of ``kv`` and its gradient comes back as one tensor. The other arguments and the
    return value are those of :func:`flash_attn_varlen_func`.
    """
    _check_layout("q", q, 3, "(total_q, H, D)")
    _check_layout("kv", kv, 4, "(total_k, 2, Hkv, D)", packed=2)
    k, v = kv.unbind(1)
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
                   window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def _int32_per_sequence(name: str, x, B: int, device) -> torch.Tensor:
    """``x`` must be an int32 ``(B,)`` tensor on ``device``; return its values on the host."""
    _validate.check_tensor(name, x, 1, "(B,)")
    if x.dtype != torch.int32:
        raise TypeError(f"{name} must be int32 (as flash-attn's), got {x.dtype}")
    if tuple(x.shape) != (B,):
        raise ValueError(f"{name} must have shape (B,) = ({B},), got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} must be on {device}, got {x.device}")
    return x.cpu()


def _block_table(block_table, B: int, num_blocks: int, device, cache_batch_idx) -> torch.Tensor:
    """The page table of a paged cache, checked: int32 ``(B, max_blocks)`` on ``device``, entries in
    ``[0, num_blocks)``; returned as int64 indices."""
    if cache_batch_idx is not None:
        raise ValueError("cache_batch_idx and block_table cannot be combined: the block table already chooses each "
                         "sequence's pages")
    _validate.check_tensor("block_table", block_table, 2, "(B, max_blocks)")
    if block_table.dtype != torch.int32:
        raise TypeError(f"block_table must be int32 (as flash-attn's), got {block_table.dtype}")
    if block_table.shape[0] != B or block_table.shape[1] < 1:
        raise ValueError(f"block_table must have shape (B, max_blocks) = ({B}, >= 1), got {tuple(block_table.shape)}")
    if block_table.device != device:
        raise ValueError(f"block_table must be on {device}, got {block_table.device}")
    host = block_table.cpu()
    if bool(((host < 0) | (host >= num_blocks)).any()):
        raise ValueError(f"block_table entries must lie in [0, num_blocks = {num_blocks}), got {host.tolist()}")
    return block_table.long()


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, cache_seqlens=None,
                            cache_batch_idx=None, cache_leftpad=None, block_table=None, softmax_scale=None,
                            causal=False, window_size=(-1, -1), softcap=0.0, rotary_interleaved=True,
                            alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """flash-attn's ``flash_attn_with_kvcache``: attention of new queries against KV caches, appending the
    new keys and values to the caches in place first (incremental decoding).

    Sequence ``b`` uses cache row ``r = cache_batch_idx[b]`` (``b`` without it), or with ``block_table`` (a
    paged cache) the pages ``block_table[b]``, its slot ``j`` at ``(block_table[b, j // page], j % page)``.
    When ``k`` and ``v`` are given, they are written into ``k_cache[r]`` / ``v_cache[r]`` (or those slots of
    the pages) at slots ``cache_seqlens[b] ... cache_seqlens[b] + Tnew - 1`` (before anything else runs; if
    ``cache_batch_idx`` repeats a row, which write lands is unspecified); the queries then attend to the
    first ``cache_seqlens[b] + Tnew`` slots, causal masks and windows aligned bottom-right (query ``i`` sits at
    key position ``cache_seqlens[b] + Tnew - Tq + i``).
    Runs :func:`effattn.varlen_attention` on ``q.reshape(B * Tq, H, D)`` and the caches (gathered by
    ``cache_batch_idx`` or ``block_table`` when given: a copy of those rows or pages; the kernels do not read pages
    in place) with ``seqused_k = cache_seqlens + Tnew``.
    Differentiable (flash-attn's is not).

    Args:
        q: ``(B, Tq, H, D)``, ``Tq = 1`` when decoding one token; ``H`` a multiple of ``Hkv`` (MQA/GQA).
        k_cache, v_cache: ``(B_cache, Tc, Hkv, D)`` / ``(B_cache, Tc, Hkv, Dv)``, q's dtype and device; with
            ``block_table`` the pages ``(num_blocks, page, Hkv, D)`` / ``(num_blocks, page, Hkv, Dv)``.
        k, v: optional new keys/values ``(B, Tnew, Hkv, D)`` / ``(B, Tnew, Hkv, Dv)``, both or neither; the
            caches must hold them: ``cache_seqlens[b] + Tnew <= Tc``.
        rotary_cos, rotary_sin, cache_leftpad: not supported, must be None (``rotary_interleaved`` is then
            ignored).
        cache_seqlens: the keys already in each cache row: an int (all equal) or an int32 ``(B,)`` tensor;
            None (only without ``k``/``v``): the whole cache, ``Tc``.
        cache_batch_idx: optional int32 ``(B,)`` cache rows in ``[0, B_cache)``; without it ``B <= B_cache``
            and sequence ``b`` uses row ``b``.
        block_table: optional int32 ``(B, max_blocks)``, page indices in ``[0, num_blocks)`` (a paged KV cache of
            ``max_blocks * page`` slots per sequence; any page size); not with ``cache_batch_idx``.
        num_splits: accepted and ignored: the kernels choose their own split of the keys (split-KV decoding).
        return_softmax_lse: also return ``softmax_lse``.

    ``softmax_scale``, ``causal``, ``window_size``, ``softcap`` and ``alibi_slopes`` (``(H,)`` or ``(B, H)``)
    are those of :func:`flash_attn_func`.

    Returns:
        ``out (B, Tq, H, Dv)`` contiguous, or ``(out, softmax_lse (B, H, Tq) float32)`` with
        ``return_softmax_lse``.
    """
    _unsupported(rotary_cos=rotary_cos, rotary_sin=rotary_sin, cache_leftpad=cache_leftpad)
    window = _check_options(softmax_scale, window_size, return_softmax_lse=return_softmax_lse)
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0 (it is ignored), got {num_splits!r}")
    _check_layout("q", q, 4, "(B, Tq, H, D)")
    _check_layout("k_cache", k_cache, 4, "(B_cache, Tc, Hkv, D)")
    _check_layout("v_cache", v_cache, 4, "(B_cache, Tc, Hkv, Dv)")
    if v_cache.shape[:3] != k_cache.shape[:3]:
        raise ValueError(f"v_cache must be (B_cache, Tc, Hkv, Dv) = {tuple(k_cache.shape[:3])} + (Dv,) like k_cache, "
                         f"got {tuple(v_cache.shape)}")
    _validate.check_qkv(q[:1].transpose(1, 2), k_cache[:1].transpose(1, 2), v_cache[:1].transpose(1, 2),
                        names=("q", "k_cache", "v_cache"))
    B, Tq, H, D = q.shape
    B_cache, Tc, Hkv, Dv = v_cache.shape
    dev = q.device
    pages = None
    if block_table is not None:
        pages = _block_table(block_table, B, B_cache, dev, cache_batch_idx)
        Tc = pages.shape[1] * v_cache.shape[1]  # the slots of a sequence: its pages, end to end
    if (k is None) != (v is None):
        raise ValueError("k and v (the new keys and values to append) must be given together, or neither")
    t_new = 0
    if k is not None:
        _check_layout("k", k, 4, "(B, Tnew, Hkv, D)")
        _check_layout("v", v, 4, "(B, Tnew, Hkv, Dv)")
        t_new = k.shape[1]
        for name, new, expected in (("k", k, (B, t_new, Hkv, D)), ("v", v, (B, t_new, Hkv, Dv))):
            if tuple(new.shape) != expected:
                raise ValueError(f"{name} must be (B, Tnew, Hkv, {'D' if name == 'k' else 'Dv'}) = {expected} "
                                 f"(q's B, the caches' heads and head dim), got {tuple(new.shape)}")
            if new.dtype != q.dtype:
                raise TypeError(f"{name} must have the dtype of q and the caches ({q.dtype}), got {new.dtype}")
            if new.device != dev:
                raise ValueError(f"{name} must be on {dev} (q's and the caches' device), got {new.device}")
    if cache_seqlens is None:
        if k is not None:
            raise ValueError("cache_seqlens must be given with k and v: they are written from slot cache_seqlens[b]")
        cache_seqlens = Tc
    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        host_seqlens = torch.full((B,), cache_seqlens, dtype=torch.int32)
        seqlens = host_seqlens.to(dev)
    elif isinstance(cache_seqlens, torch.Tensor):
        host_seqlens, seqlens = _int32_per_sequence("cache_seqlens", cache_seqlens, B, dev), cache_seqlens
    else:
        raise TypeError(f"cache_seqlens must be an int or an int32 tensor (B,), got {type(cache_seqlens).__name__}")
    if bool((host_seqlens < 0).any()) or bool((host_seqlens + t_new > Tc).any()):
        raise ValueError(f"cache_seqlens must be >= 0 and leave room for the Tnew = {t_new} appended tokens in the "
                         f"Tc = {Tc} cache slots (cache_seqlens + Tnew <= Tc), got {host_seqlens.tolist()}")
    if pages is not None:
        rows = None
    elif cache_batch_idx is None:
        if B > B_cache:
            raise ValueError(f"k_cache holds {B_cache} sequences, q {B}: pass cache_batch_idx to choose the rows")
        rows = torch.arange(B, device=dev)
    else:
        host_rows = _int32_per_sequence("cache_batch_idx", cache_batch_idx, B, dev)
        if bool(((host_rows < 0) | (host_rows >= B_cache)).any()):
            raise ValueError(f"cache_batch_idx must lie in [0, B_cache = {B_cache}), got {host_rows.tolist()}")
        rows = cache_batch_idx.long()
    if k is not None:
        slots = seqlens.long()[:, None] + torch.arange(t_new, device=dev)
        if pages is None:
            k_cache[rows[:, None], slots] = k
            v_cache[rows[:, None], slots] = v
        else:
            page = k_cache.shape[1]
            blocks = pages.gather(1, slots // page)
            k_cache[blocks, slots % page] = k
            v_cache[blocks, slots % page] = v
    if pages is not None:
        keys, values = (c[pages].flatten(1, 2) for c in (k_cache, v_cache))
    else:
        keys, values = (k_cache[:B], v_cache[:B]) if cache_batch_idx is None else (k_cache[rows], v_cache[rows])
    result = varlen_attention(q.reshape(B * Tq, H, D), keys, values,
                              torch.arange(B + 1, dtype=torch.int32, device=dev) * Tq, seqused_k=seqlens + t_new,
                              max_seqlen_q=Tq, causal=causal, scale=softmax_scale, window=window, softcap=softcap,
                              alibi_slopes=alibi_slopes, return_lse=return_softmax_lse)
    if not return_softmax_lse:
        return result.view(B, Tq, H, Dv)
    out, lse = result
    return out.view(B, Tq, H, Dv), lse.view(H, B, Tq).transpose(0, 1).contiguous()
