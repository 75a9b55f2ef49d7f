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
# the reference backend's backward
# ----------------------------------------------------------------------------------------------
def reference_backward(dout, q, k, v, qr, R, tt, q_types, k_types, key_padding_mask, out, lse, dlse, *, scale,
                       rel_stride, separate_cls, cls_type, dropout_p=0.0, seed=0):
    """Gradients of :func:`effattn.reference.relpos_attention` by query chunks, written out (as
    :func:`effattn.reference.attention_backward`): P recomputed from lse, ``dS = P (dP - delta)``,
    ``delta = rowsum(dO O) - dlse``; the position gradient of a row is ``dS`` scattered onto the table rows
    it read (one key per row), ``dqr = dP_band R_band``, ``dR += dP_band^T qr``; ``dtt`` the sums of ``dS``
    over the keys of the same / another type. Returns ``(dq, dk, dv, dqr, dR, dtt)`` (dtt None without tt)."""
    from effattn import reference as ref
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
        step = max(1, min(Tq, ref.CHUNK_ELEMENTS // max(1, B * Hq * (Tk + rel_stride * Tk))))
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
                z = ref.dropout_keep(seed, dropout_p, bh, rows.view(-1, 1), cols.view(1, -1)).to(cdt)
                z = z * ref.dropout_scale(dropout_p)
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
