"""Relative-position ("band") attention: Funnel-Transformer's score computed inside the kernels.

The score of query ``i`` and key ``j`` adds to the content term ``q_i . k_j`` a relative-position term
read from a table, ``qr_i . R[rel_stride * i - j + Tk - 1]``, and a per-pair token-type term picked from
two per-query scores; :func:`effattn.reference.relpos_attention` is the definition. Each tile of the
kernels reads one contiguous band of the table (``rel_stride * (BM - 1) + BN`` rows for ``BM`` queries
and ``BN`` keys), so the position term costs about as much as the content term and no ``Tq x Tk``
tensor exists, forward or backward.

Layers, as in :mod:`effattn.flash`: the ``effattn::relpos_attention_fwd`` / ``_bwd`` custom ops (fake
implementations, registered autograd and FLOP formulas) hand the work to a backend
(:meth:`effattn.backends.Backend.relpos_forward`); :func:`relpos_attention` is the public function.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

from effattn import _op, _validate
from effattn.backends import AttentionCall, get_backend, select_backend
from effattn.profile import relpos_flops
from effattn.reference import compute_dtype

__all__ = ["relpos_attention"]


def _kw(scale, rel_stride, separate_cls, cls_type, dropout_p, seed):
    return dict(scale=scale, rel_stride=rel_stride, separate_cls=separate_cls, cls_type=cls_type,
                dropout_p=dropout_p, seed=seed)


# ----------------------------------------------------------------------------------------------
# custom ops
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("effattn::relpos_attention_fwd", mutates_args=())
def relpos_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qr: torch.Tensor, R: torch.Tensor,
                         tt: torch.Tensor | None, q_types: torch.Tensor | None, k_types: torch.Tensor | None,
                         key_padding_mask: torch.Tensor | None, scale: float, rel_stride: int, separate_cls: bool,
                         cls_type: int, dropout_p: float, seed: int,
                         backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Relative-position attention forward on a named backend: ``out (B, Hq, Tq, Dv)``, ``lse (B, Hq, Tq)``."""
    out, lse = get_backend(backend).relpos_forward(q, k, v, qr, R, tt, q_types, k_types, key_padding_mask,
                                                   **_kw(scale, rel_stride, separate_cls, cls_type, dropout_p, seed))
    return out, lse.to(compute_dtype(q.dtype))


@relpos_attention_fwd.register_fake
def _(q, k, v, qr, R, tt, q_types, k_types, key_padding_mask, scale, rel_stride, separate_cls, cls_type, dropout_p,
      seed, backend):
    B, Hq, Tq, _ = q.shape
    return q.new_empty(B, Hq, Tq, v.shape[-1]), q.new_empty(B, Hq, Tq, dtype=compute_dtype(q.dtype))


@torch.library.custom_op("effattn::relpos_attention_bwd", mutates_args=())
def relpos_attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qr: torch.Tensor,
                         R: torch.Tensor, tt: torch.Tensor | None, q_types: torch.Tensor | None,
                         k_types: torch.Tensor | None, key_padding_mask: torch.Tensor | None, out: torch.Tensor,
                         lse: torch.Tensor, dlse: torch.Tensor | None, scale: float, rel_stride: int,
                         separate_cls: bool, cls_type: int, dropout_p: float, seed: int,
                         backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                torch.Tensor]:
    """Backward: ``dq, dk, dv, dqr, dR, dtt`` (``dtt`` is an empty tensor when ``tt`` is None)."""
    dq, dk, dv, dqr, dR, dtt = get_backend(backend).relpos_backward(
        dout, q, k, v, qr, R, tt, q_types, k_types, key_padding_mask, out, lse, dlse,
        **_kw(scale, rel_stride, separate_cls, cls_type, dropout_p, seed))
    return dq, dk, dv, dqr, dR, dtt if dtt is not None else q.new_empty(0)


@relpos_attention_bwd.register_fake
def _(dout, q, k, v, qr, R, tt, q_types, k_types, key_padding_mask, out, lse, dlse, scale, rel_stride, separate_cls,
      cls_type, dropout_p, seed, backend):
    dtt = torch.empty_like(tt) if tt is not None else q.new_empty(0)
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(qr),
            torch.empty_like(R), dtt)


_SCALARS = ("scale", "rel_stride", "separate_cls", "cls_type", "dropout_p", "seed", "backend")


def _setup_context(ctx, inputs, output):
    q, k, v, qr, R, tt, q_types, k_types, kpm, *scalars = inputs
    out, lse = output
    ctx.scalars = scalars
    ctx.has_tt = tt is not None
    ctx.save_for_backward(q, k, v, qr, R, tt, q_types, k_types, kpm, out, lse)


def _backward(ctx, dout, dlse):
    q, k, v, qr, R, tt, q_types, k_types, kpm, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv, dqr, dR, dtt = relpos_attention_bwd(dout.contiguous(), q, k, v, qr, R, tt, q_types, k_types, kpm,
                                                    out, lse, dlse, *ctx.scalars)
    return dq, dk, dv, dqr, dR, (dtt if ctx.has_tt else None), None, None, None, *([None] * len(_SCALARS))


relpos_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def _flops(backward: bool):
    def formula(q, k, v, rel_stride, **_) -> int:
        B, Hq, Tq, D = q.shape
        return relpos_flops(B, Hq, Tq, k.shape[2], D, v.shape[-1], rel_stride, backward=backward)
    return formula


def _register_flops(op, formula) -> None:
    overload = op._opoverload
    names = [a.name for a in overload._schema.arguments]

    @register_flop_formula(overload.overloadpacket, get_raw=True)
    def _(*args, out_val=None, **kwargs) -> int:
        return formula(**dict(zip(names, args), **kwargs))


# FLOPs: the content GEMMs of flash attention plus the band GEMMs of the position term
# (effattn.profile.relpos_flops: one band GEMM forward, three backward)
_register_flops(relpos_attention_fwd, _flops(backward=False))
_register_flops(relpos_attention_bwd, _flops(backward=True))


# ----------------------------------------------------------------------------------------------
# the public function
# ----------------------------------------------------------------------------------------------
def _check_int(name: str, x, least: int) -> None:
    if isinstance(x, bool) or not isinstance(x, int) or x < least:
        raise ValueError(f"{name} must be an int >= {least}, got {x!r}")


def _check_args(q, k, v, qr, R, rel_stride, separate_cls, tt, q_types, k_types, cls_type, key_padding_mask):
    shape = _validate.check_qkv(q, k, v)
    _check_int("rel_stride", rel_stride, 1)
    if not isinstance(separate_cls, bool):
        raise TypeError(f"separate_cls must be a bool, got {type(separate_cls).__name__}")
    if isinstance(cls_type, bool) or not isinstance(cls_type, int):
        raise TypeError(f"cls_type must be an int, got {type(cls_type).__name__}")
    _validate.check_tensor("qr", qr, 4, "(B, Hq, Tq, D)")
    if tuple(qr.shape) != tuple(q.shape):
        raise ValueError(f"qr must have q's shape {tuple(q.shape)}, got {tuple(qr.shape)}")
    _validate.check_tensor("R", R, 3, "(Hq, NR, D)")
    NR = rel_stride * (shape.Tq - 1) + shape.Tk if shape.Tq > 0 else shape.Tk
    if tuple(R.shape) != (shape.Hq, NR, shape.Dqk):
        raise ValueError(f"R must have shape (Hq, rel_stride * (Tq - 1) + Tk, D) = {(shape.Hq, NR, shape.Dqk)}, "
                         f"got {tuple(R.shape)}")
    for name, x in (("qr", qr), ("R", R)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} must be on {q.device}, got {x.device}")
    if tt is not None:
        _validate.check_tensor("tt", tt, 4, "(B, Hq, Tq, 2)")
        if tuple(tt.shape) != (shape.B, shape.Hq, shape.Tq, 2):
            raise ValueError(f"tt must have shape (B, Hq, Tq, 2) = {(shape.B, shape.Hq, shape.Tq, 2)}, "
                             f"got {tuple(tt.shape)}")
        if tt.dtype != q.dtype:
            raise TypeError(f"tt must have q's dtype {q.dtype}, got {tt.dtype}")
        if tt.device != q.device:
            raise ValueError(f"tt must be on {q.device}, got {tt.device}")
        for name, x, n in (("q_types", q_types, shape.Tq), ("k_types", k_types, shape.Tk)):
            if x is None:
                raise ValueError(f"{name} is required when tt is given")
            _validate.check_tensor(name, x, 2, f"(B, {'Tq' if name == 'q_types' else 'Tk'})")
            if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
                raise TypeError(f"{name} must be an integer tensor, got {x.dtype}")
            if tuple(x.shape) != (shape.B, n):
                raise ValueError(f"{name} must have shape {(shape.B, n)}, got {tuple(x.shape)}")
            if x.device != q.device:
                raise ValueError(f"{name} must be on {q.device}, got {x.device}")
    elif q_types is not None or k_types is not None:
        raise ValueError("q_types and k_types are only used with tt: pass tt, or neither")
    _validate.check_key_padding_mask(key_padding_mask, shape, q.device)
    return shape


def relpos_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qr: torch.Tensor, R: torch.Tensor, *,
                     rel_stride: int = 1, separate_cls: bool = False, tt: torch.Tensor | None = None,
                     q_types: torch.Tensor | None = None, k_types: torch.Tensor | None = None, cls_type: int = 2,
                     key_padding_mask: torch.Tensor | None = None, scale: float | None = None,
                     dropout_p: float = 0.0, dropout_seed: int | None = None, return_lse: bool = False,
                     backend: str | None = None):
    """Attention with a relative-position term from a table and a token-type term (Funnel-Transformer).

    For batch ``b``, query head ``h`` (KV head ``h // (Hq // Hkv)``, GQA), query ``i`` and key ``j``::

        t(i, j) = rel_stride * i - j + (Tk - 1)                          # row of R
        extra   = not (separate_cls and (i == 0 or j == 0))              # [cls] pairs: content only
        same    = q_types[b, i] == k_types[b, j], or either is cls_type
        s(i, j) = scale * (q[b,h,i] . k[b,hk,j]
                           + extra * qr[b,h,i] . R[h, t(i, j)]
                           + extra * tt[b,h,i, 1 if same else 0])         # the tt term only with tt
        out = softmax_j(s) @ v   (keys with key_padding_mask False removed; a row with no key: out 0)

    Row ``t`` of ``R`` is the relative distance ``t - (Tk - 1)`` in key steps between query ``i`` placed
    at key step ``rel_stride * i`` and key ``j``: Funnel's table of ``pe(distance) @ r_kernel`` rows.

    Args:
        q: ``(B, Hq, Tq, D)`` content queries; k ``(B, Hkv, Tk, D)``; v ``(B, Hkv, Tk, Dv)``; one floating
            dtype, one device (as :func:`effattn.flash_attention`).
        qr: ``(B, Hq, Tq, D)`` position queries (Funnel: ``q + r_r_bias``), q's dtype.
        R: ``(Hq, NR, D)`` position table, ``NR == rel_stride * (Tq - 1) + Tk`` exactly, q's dtype.
        rel_stride: query step in key steps (int >= 1; 2 for a Funnel layer whose queries are pooled).
        separate_cls: row 0 and column 0 are [cls]: their pairs keep the content term only.
        tt: ``(B, Hq, Tq, 2)`` or None: per query, the score for a key of a different ([0]) or the same
            ([1]) token type; needs ``q_types (B, Tq)`` and ``k_types (B, Tk)`` integer tensors.
        cls_type: the token type of [cls], of the same type as every token (Funnel: 2).
        key_padding_mask: ``(B, Tk)`` bool, True = keep.
        scale: default ``1 / sqrt(D)``; multiplies the whole score.
        dropout_p, dropout_seed, return_lse, backend: as in :func:`effattn.flash_attention` (dropout
            draws the same Philox bits).

    Returns:
        ``out (B, Hq, Tq, Dv)`` in q's dtype, or ``(out, lse)`` with ``lse (B, Hq, Tq)`` float32 (float64
        for float64 inputs; ``-inf`` for a row without keys). Differentiable in q, k, v, qr, R and tt
        (``dR`` summed over the batch; deterministic on every backend).

    Raises:
        TypeError / ValueError naming the argument for bad inputs, before any kernel;
        :class:`effattn.UnsupportedInputError` when no backend (or not the one named) can run the call.
    """
    shape = _check_args(q, k, v, qr, R, rel_stride, separate_cls, tt, q_types, k_types, cls_type, key_padding_mask)
    _validate.check_scale(scale)
    _validate.check_dropout(dropout_p)
    _validate.check_seed(dropout_seed)
    call = AttentionCall(device=q.device, dtype=q.dtype, head_dim_qk=shape.Dqk, head_dim_v=shape.Dv, Tq=shape.Tq,
                         Tk=shape.Tk, dropout=dropout_p > 0.0, batch=shape.B, heads=shape.Hq,
                         mask="none" if key_padding_mask is None else "bool")
    name = select_backend(call, backend, relpos=True).name
    scale = 1.0 / shape.Dqk ** 0.5 if scale is None else float(scale)
    if tt is None:
        q_types = k_types = None
    out, lse = relpos_attention_fwd(q, k, v, qr, R, tt, q_types, k_types, key_padding_mask, scale, rel_stride,
                                    separate_cls, cls_type, float(dropout_p), _op.draw_seed(dropout_p, dropout_seed),
                                    name)
    return (out, lse) if return_lse else out
