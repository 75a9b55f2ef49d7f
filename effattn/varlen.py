"""Variable-length attention: packed sequences (flash-attn's varlen layout) and KV caches, natively in the kernels.

A batch of sequences of different lengths is packed along the token axis, ``q (total_q, Hq, D)``, with
``cu_seqlens_q (S + 1,)`` int32 the offsets of its ``S`` sequences; keys and values are either packed the same
way (``(total_k, Hkv, D)`` with ``cu_seqlens_k``) or a KV cache ``(S, Tc, Hkv, D)`` of which sequence ``s``
uses its first ``seqused_k[s]`` slots. Each sequence attends only to its own keys; causal and windows are
aligned bottom-right per sequence. The kernels run one program per (query block, head, sequence) from the
offsets: no padding, no block mask, no per-call mask building. Semantics per sequence:
:func:`effattn.flash_attention`; the layout: :class:`effattn.reference.Varlen`.

Layers, as in :mod:`effattn.flash`: ``effattn::varlen_attention_fwd`` / ``_bwd`` custom ops (fake
implementations, autograd), then :func:`varlen_attention`.
"""

from __future__ import annotations

import torch

from effattn import _op, _validate
from effattn.backends import get_backend
from effattn.profile import visible_pairs
from effattn.reference import Varlen, compute_dtype

__all__ = ["varlen_attention"]


def _kwargs(varlen, scale, window_left, window_right, dropout_p, seed, softcap, alibi_slopes):
    kw = dict(varlen=varlen, scale=scale, window_left=window_left, window_right=window_right, dropout_p=dropout_p,
              seed=seed)
    if softcap > 0.0:
        kw["softcap"] = softcap
    if alibi_slopes is not None:
        kw["alibi_slopes"] = alibi_slopes
    return kw


@torch.library.custom_op("effattn::varlen_attention_fwd", mutates_args=())
def varlen_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                         q_start: torch.Tensor, q_len: torch.Tensor, k_start: torch.Tensor, k_len: torch.Tensor,
                         max_q: int, max_k: int, scale: float, window_left: int, window_right: int, dropout_p: float,
                         seed: int, softcap: float, alibi_slopes: torch.Tensor | None,
                         backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Varlen forward on a named backend, on the 4-D views (:class:`~effattn.reference.Varlen`): ``out (1, Hq,
    total_q, Dv)``, ``lse (1, Hq, total_q)``. ``mask`` is always None (the op protocol's slot)."""
    varlen = Varlen(q_start, q_len, k_start, k_len, max_q, max_k)
    out, lse = get_backend(backend).forward(q, k, v, None, **_kwargs(varlen, scale, window_left, window_right,
                                                                      dropout_p, seed, softcap, alibi_slopes))
    return out, lse.to(compute_dtype(q.dtype))


@varlen_attention_fwd.register_fake
def _(q, k, v, mask, q_start, q_len, k_start, k_len, max_q, max_k, scale, window_left, window_right, dropout_p, seed,
      softcap, alibi_slopes, backend):
    _, Hq, total_q, _ = q.shape
    out = q.new_empty(total_q, Hq, v.shape[-1]).permute(1, 0, 2).unsqueeze(0)
    return out, q.new_empty(1, Hq, total_q, dtype=compute_dtype(q.dtype))


@torch.library.custom_op("effattn::varlen_attention_bwd", mutates_args=())
def varlen_attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                         lse: torch.Tensor, mask: torch.Tensor | None, dlse: torch.Tensor | None,
                         q_start: torch.Tensor, q_len: torch.Tensor, k_start: torch.Tensor, k_len: torch.Tensor,
                         max_q: int, max_k: int, scale: float, window_left: int, window_right: int, dropout_p: float,
                         seed: int, softcap: float, alibi_slopes: torch.Tensor | None,
                         backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of :func:`varlen_attention_fwd`: ``dq, dk, dv`` like q, k, v."""
    varlen = Varlen(q_start, q_len, k_start, k_len, max_q, max_k)
    return get_backend(backend).backward(dout, q, k, v, out, lse, None, dlse,
                                         **_kwargs(varlen, scale, window_left, window_right, dropout_p, seed, softcap,
                                                   alibi_slopes))


@varlen_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, mask, dlse, q_start, q_len, k_start, k_len, max_q, max_k, scale, window_left,
      window_right, dropout_p, seed, softcap, alibi_slopes, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _pairs(q, q_len, k_len, window_left, window_right, **_) -> int:
    """The (query, key) pairs computed: per sequence its visible pairs, times the query heads."""
    per_head = sum(visible_pairs(ql, kl, window_left, window_right, kl - ql)
                   for ql, kl in zip(q_len.tolist(), k_len.tolist()))
    return q.shape[1] * per_head


_op.register(varlen_attention_fwd, varlen_attention_bwd, pairs=_pairs)


# ----------------------------------------------------------------------------------------------
# the public function
# ----------------------------------------------------------------------------------------------
def _offsets(name: str, cu: torch.Tensor, total: int, device) -> torch.Tensor:
    """Check cumulative sequence offsets ``(S + 1,)`` int32 from 0 to ``total``, non-decreasing; the lengths."""
    _validate.check_tensor(name, cu, 1, "(S + 1,)")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be int32 (as flash-attn's), got {cu.dtype}")
    if cu.device != device:
        raise ValueError(f"{name} must be on {device}, got {cu.device}")
    if cu.shape[0] < 2:
        raise ValueError(f"{name} must hold S + 1 >= 2 offsets, got {cu.shape[0]}")
    host = cu.cpu()
    lens = host[1:] - host[:-1]
    if int(host[0]) != 0 or int(host[-1]) != total or bool((lens < 0).any()):
        shown = host.tolist() if host.numel() <= 16 else f"[{int(host[0])}, ..., {int(host[-1])}]"
        raise ValueError(f"{name} must rise from 0 to the packed length {total} without decreasing, got {shown}")
    return lens


def _check_max(name: str, given, actual: int) -> None:
    if given is None:
        return
    if isinstance(given, bool) or not isinstance(given, int) or given < actual:
        raise ValueError(f"{name} must be an int >= the longest sequence ({actual}), got {given!r}")


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor | None = None, *, seqused_k: torch.Tensor | None = None,
                     max_seqlen_q: int | None = None, max_seqlen_k: int | None = None, causal: bool = False,
                     scale: float | None = None, window: tuple[int | None, int | None] | None = None,
                     dropout_p: float = 0.0, dropout_seed: int | None = None, softcap: float | None = 0.0,
                     alibi_slopes: torch.Tensor | None = None, return_lse: bool = False, backend: str | None = None):
    """Attention over packed variable-length sequences, differentiable.

    Args:
        q: ``(total_q, Hq, D)``, the ``S`` sequences' queries one after another; ``cu_seqlens_q (S + 1,)`` int32
            their offsets (``0 = cu[0] <= cu[1] <= ... <= cu[S] = total_q``; a sequence may be empty).
        k, v: packed ``(total_k, Hkv, D)`` / ``(total_k, Hkv, Dv)`` with ``cu_seqlens_k (S + 1,)``, or a KV cache
            ``(S, Tc, Hkv, D)`` / ``(S, Tc, Hkv, Dv)`` with ``seqused_k (S,)`` int32: sequence ``s`` uses its first
            ``seqused_k[s] <= Tc`` slots. ``Hq`` a multiple of ``Hkv`` (GQA).
        max_seqlen_q, max_seqlen_k: optional (flash-attn takes them); checked to be >= the longest sequence.
        causal, window, scale, dropout_p, dropout_seed, softcap, alibi_slopes: as in :func:`effattn.flash_attention`,
            per sequence, aligned bottom-right (query ``i`` of a sequence of ``Lq`` queries and ``Lk`` keys sits at
            key position ``i + Lk - Lq``); ``alibi_slopes`` ``(Hq,)`` or ``(S, Hq)``; sequence ``s`` draws the dropout
            stream of seed ``dropout_seed + s``.
        backend: as in :func:`effattn.flash_attention` (Triton and the reference run varlen).

    Returns:
        ``out (total_q, Hq, Dv)`` (contiguous), or ``(out, lse)`` with ``lse (Hq, total_q)`` float32 (flash-attn's
        layout). A query with no visible key gets 0 and ``lse = -inf``; gradients in the layouts of q, k, v
        (cache slots past ``seqused_k`` get 0).
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        _validate.check_tensor(name, x)
    if q.dim() != 3:
        raise ValueError(f"q must be 3-D (total_q, Hq, D), got shape {tuple(q.shape)}")
    cached = k.dim() == 4
    if k.dim() not in (3, 4) or v.dim() != k.dim():
        raise ValueError(f"k and v must both be 3-D (total_k, Hkv, D) or both 4-D caches (S, Tc, Hkv, D), got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    if (cu_seqlens_k is None) == (seqused_k is None) or (seqused_k is not None) != cached:
        raise ValueError("pass cu_seqlens_k with packed 3-D k/v, or seqused_k with 4-D k/v caches (S, Tc, Hkv, D)")
    q_lens = _offsets("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device)
    S = q_lens.shape[0]
    if cached:
        _validate.check_tensor("seqused_k", seqused_k, 1, "(S,)")
        if seqused_k.dtype != torch.int32 or seqused_k.device != q.device or tuple(seqused_k.shape) != (S,):
            raise ValueError(f"seqused_k must be int32 of shape (S,) = ({S},) on {q.device}, got {seqused_k.dtype} "
                             f"{tuple(seqused_k.shape)} on {seqused_k.device}")
        if k.shape[0] != S:
            raise ValueError(f"the k/v caches hold {k.shape[0]} sequences, cu_seqlens_q {S}")
        k_lens = seqused_k.cpu()
        if bool((k_lens < 0).any()) or bool((k_lens > k.shape[1]).any()):
            raise ValueError(f"seqused_k must lie in [0, Tc = {k.shape[1]}], got {k_lens.tolist()}")
        k_start = torch.zeros(S, dtype=torch.int32)
        k4, v4 = k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
    else:
        k_lens = _offsets("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device)
        if k_lens.shape[0] != S:
            raise ValueError(f"cu_seqlens_q has {S} sequences, cu_seqlens_k {k_lens.shape[0]}")
        k_start = cu_seqlens_k.cpu()[:-1]
        k4, v4 = k.permute(1, 0, 2).unsqueeze(0), v.permute(1, 0, 2).unsqueeze(0)
    q4 = q.permute(1, 0, 2).unsqueeze(0)
    shape = _validate.check_qkv(q4, k4[:1], v4[:1])
    max_q, max_k = int(q_lens.max()), int(k_lens.max())
    _check_max("max_seqlen_q", max_seqlen_q, max_q)
    _check_max("max_seqlen_k", max_seqlen_k, max_k)
    _validate.check_scale(scale)
    _validate.check_dropout(dropout_p)
    _validate.check_seed(dropout_seed)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    window_left, window_right = _validate.window_bounds(window)
    if causal:
        window_right = 0 if window_right < 0 else min(window_right, 0)
    softcap = _validate.softcap_value(softcap)
    call_shape = _validate.QKVShape(S, shape.Hq, shape.Hkv, max_q, max_k, shape.Dqk, shape.Dv)
    alibi = _validate.alibi_slopes(alibi_slopes, call_shape, q.device, compute_dtype(q.dtype))
    backend, scale = _op.prepare(q, call_shape, backend, scale, dropout_p=dropout_p, softcap=softcap > 0.0,
                                 alibi=alibi is not None, varlen=True)
    span = max_q + max_k
    window_left, window_right = min(window_left, span), min(window_right, span)
    dev = q.device
    tables = [t.to(device=dev, dtype=torch.int32).contiguous() for t in (cu_seqlens_q[:-1], q_lens, k_start, k_lens)]
    out, lse = varlen_attention_fwd(q4, k4, v4, None, *tables, max_q, max_k, scale, window_left, window_right,
                                    float(dropout_p), _op.draw_seed(dropout_p, dropout_seed), float(softcap), alibi,
                                    backend)
    out = out[0].permute(1, 0, 2)
    return (out, lse[0]) if return_lse else out
