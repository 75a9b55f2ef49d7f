"""Funnel-Transformer parts on effattn's kernels (Dai et al. 2020; Hugging Face ``modeling_funnel``).

* :class:`FunnelRelAttention` — Funnel's relative multi-head attention (content + relative position
  + token type terms, [cls] handling, key padding), with the whole score computed inside one flash
  attention kernel: no ``Tq x Tk`` tensor exists at any point, forward or backward.
* :func:`pool_sequence`, :func:`stride_select`, :func:`pool_attention_mask` — the encoder's pooling
  of hidden states, of per-token data (positions, token types) and of the attention mask.
* :func:`upsample` — the decoder's up-sampling of the last block's output.

How the score is fused. Funnel's score for query ``i`` and key ``j`` is

    content  (q_i + r_w) . k_j
  + position (q_i + r_r) W_r . pe(a_i - b_j),   pe(d) = [sin(d w), cos(d w)]  (d_model features)
  + type     (q_i + r_s) . seg[same(i, j)],     same = equal types, or either is [cls] (type 2)

with the position and type terms zero on the [cls] row and column (``separate_cls``). Both extra terms
are low-rank: by ``sin(a - b) = sin a cos b - cos a sin b`` (and the cosine rule) the position term is
``A_i . cos(b_j w) + B_i . sin(b_j w)`` with ``A, B`` per query, and ``same(i, j)`` is
``1 - n_i n_j + sum_t e_it e_jt`` (``n``: not [cls]; ``e_t``: one-hot of the non-[cls] type ``t``).
So each query gets ``d_model + n_seg + 2`` extra features (``n_seg`` non-[cls] token types: 2 in
Funnel) and each key the matching ones, the extra query features are zeroed on the [cls] row and
the key features on the [cls] column, and one attention call with a QK head dim of
``d_head + d_model + n_seg + 2`` (the V head dim stays ``d_head``) computes exactly the full
score. Funnel's small/medium/intermediate checkpoints (``d_model`` 768) need 836 QK features, large
and xlarge (``d_model`` 1024) 1092: the Triton kernels take up to 2048 (float16/bfloat16 above 1024).
Hugging Face's two attention types ("relative_shift" and "factorized") compute the same score (they
differ only in where they apply dropout to the sinusoids, see below), so both run this way.

Differences from Hugging Face, all outside evaluation-mode results on real inputs:

* Masked keys are removed (``-inf``), where Hugging Face subtracts ``1e6``: the same result unless
  every key of a row is masked, where Hugging Face returns an arbitrary mix (or NaN in float16) and
  this returns zeros.
* Attention dropout draws its own keep mask (Philox, see :func:`effattn.flash_attention`); dropout on
  the sinusoid features (Hugging Face's ``sin_dropout``/``cos_dropout``, active in training only)
  is not applied.
* Sinusoids are computed in float32 and cast to the model dtype; Hugging Face computes them in the
  model dtype (in float16/bfloat16 its features are off by up to 0.4/2.0 at position 512).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from effattn.flash import flash_attention
from effattn.reference import QueryPool, pool_queries
from effattn.relpos import relpos_attention

__all__ = [
    "CLS_TOKEN_TYPE",
    "FUNNEL_ROUTES",
    "FunnelRelAttention",
    "band_geometry",
    "funnel_attention",
    "pool_attention_mask",
    "pool_sequence",
    "position_features",
    "stride_select",
    "token_type_features",
    "upsample",
]

CLS_TOKEN_TYPE = 2  # Funnel's token type of [cls]: in the same segment as every token
FUNNEL_ROUTES = ("band", "features")  # how funnel_attention computes the position term (see its docstring)
SINUSOID_BASE = 10000.0


# ----------------------------------------------------------------------------------------------
# low-rank features of the position and token-type terms
# ----------------------------------------------------------------------------------------------
def _inv_freq(d_model: int, device) -> torch.Tensor:
    half = d_model // 2
    return 1.0 / SINUSOID_BASE ** (torch.arange(half, device=device, dtype=torch.float32) / half)


def position_features(c: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Features with ``q_feat_i . k_feat_j = c_i . pe(q_pos_i - k_pos_j)``.

    Args:
        c: ``(..., Tq, d_model)`` coefficients of the sinusoids (``(q + r_r) W_r``), d_model even.
        q_pos, k_pos: ``(Tq,)``, ``(Tk,)`` positions on one grid (any numeric dtype).
    Returns:
        ``q_feat (..., Tq, d_model)`` in c's dtype and ``k_feat (Tk, d_model)`` float32.
    """
    d_model = c.shape[-1]
    if d_model % 2:
        raise ValueError(f"d_model must be even for sinusoid features, got {d_model}")
    inv_freq = _inv_freq(d_model, c.device)
    qa = q_pos.to(torch.float32)[:, None] * inv_freq
    ka = k_pos.to(torch.float32)[:, None] * inv_freq
    sin_a, cos_a = torch.sin(qa).to(c.dtype), torch.cos(qa).to(c.dtype)
    c_sin, c_cos = c.chunk(2, dim=-1)  # coefficients of sin(d w) and cos(d w)
    # c_sin sin(a - b) + c_cos cos(a - b) = (c_sin sin a + c_cos cos a) cos b + (c_cos sin a - c_sin cos a) sin b
    q_feat = torch.cat([c_sin * sin_a + c_cos * cos_a, c_cos * sin_a - c_sin * cos_a], dim=-1)
    k_feat = torch.cat([torch.cos(ka), torch.sin(ka)], dim=-1)
    return q_feat, k_feat


def token_type_features(diff: torch.Tensor, same: torch.Tensor, q_types: torch.Tensor, k_types: torch.Tensor,
                        n_types: int, cls_type: int = CLS_TOKEN_TYPE) -> tuple[torch.Tensor, torch.Tensor]:
    """Features with ``q_feat_i . k_feat_j = diff_i + (same_i - diff_i) * same(i, j)``.

    ``same(i, j)`` = equal token types, or either token is [cls] (``cls_type``).

    Args:
        diff, same: ``(B, H, Tq)`` the query's score for a key of another / the same segment.
        q_types, k_types: ``(B, Tq)``, ``(B, Tk)`` integer token types in ``[0, n_types)``.
    Returns:
        ``q_feat (B, H, Tq, F)`` in diff's dtype and ``k_feat (B, Tk, F)`` float32, with ``F = 2 + ``
        the number of types in ``[0, n_types)`` other than ``cls_type``.
    """
    types = torch.tensor([t for t in range(n_types) if t != cls_type], device=q_types.device, dtype=q_types.dtype)
    # same(i, j) = 1 - n_i n_j + sum_t e_it e_jt, n = not [cls], e_t = one-hot of type t (not [cls])
    q_n = (q_types != cls_type).to(diff.dtype)
    q_e = (q_types[..., None] == types).to(diff.dtype)
    delta = same - diff
    q_feat = torch.cat([same[..., None], (-delta * q_n[:, None])[..., None], delta[..., None] * q_e[:, None]], -1)
    k_n = (k_types != cls_type).to(torch.float32)
    k_e = (k_types[..., None] == types).to(torch.float32)
    k_feat = torch.cat([torch.ones_like(k_n)[..., None], k_n[..., None], k_e], dim=-1)
    return q_feat, k_feat


# ----------------------------------------------------------------------------------------------
# the fused attention
# ----------------------------------------------------------------------------------------------
def band_geometry(q_pos: torch.Tensor, k_pos: torch.Tensor, separate_cls: bool = False):
    """``(rel_stride, key_step, offset)`` with ``q_pos_i - k_pos_j = key_step * (rel_stride * i - j) + offset``
    for every pair that carries a position term (rows/columns 0 excluded with ``separate_cls``), or a
    string saying why the positions have no such form (then only the "features" route applies).

    Funnel's positions are arithmetic progressions (the keys' step ``key_step``, the queries' step a
    multiple ``rel_stride`` of it: 2 in a pooling layer, 1 elsewhere), which is what the band needs.
    """
    s = 1 if separate_cls else 0
    qp, kp = q_pos[s:].to(torch.int64), k_pos[s:].to(torch.int64)
    if len(qp) == 0 or len(kp) == 0:  # only [cls] pairs: no position term at all
        return 1, 1, 0

    def step(x):
        if len(x) < 2:
            return None
        d = torch.diff(x)
        first = int(d[0])
        return first if bool((d == first).all()) else "not evenly spaced"

    sq, sk = step(qp), step(kp)
    for name, st in (("query", sq), ("key", sk)):
        if isinstance(st, str):
            return f"{name} positions are {st}"
    if sk is None:
        sk = sq if sq is not None and sq > 0 else 1
    if sk <= 0:
        return f"key positions must increase (step {sk})"
    if sq is None:
        sq = sk
    if sq <= 0 or sq % sk:
        return f"the query step ({sq}) is not a positive multiple of the key step ({sk})"
    rs = sq // sk
    # q_pos_i - k_pos_j with i, j counted from the first non-[cls] element
    offset = int(qp[0]) - int(kp[0]) - sk * s * (rs - 1)
    return rs, sk, offset


def _sinusoids(dist: torch.Tensor, d_model: int) -> torch.Tensor:
    """``pe(d) = [sin(d w), cos(d w)]`` (``(n, d_model)`` float32), Funnel's relative position embedding."""
    angle = dist.to(torch.float32)[:, None] * _inv_freq(d_model, dist.device)
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1)


def _band_route(q, k, v, *, r_w_bias, r_r_bias, r_kernel, r_s_bias, seg_embed, geometry, q_types, k_types,
                separate_cls, key_padding_mask, dropout_p, backend):
    B, Tq, H, Dh = q.shape
    Tk = k.shape[1]
    rs, sk, offset = geometry
    d_model = r_kernel.shape[0]
    if d_model % 2:
        raise ValueError(f"d_model must be even for sinusoid features, got {d_model}")
    dtype = v.dtype
    # table row t <-> key-unit distance t - (Tk - 1): distance q_pos - k_pos = sk * (t - (Tk - 1)) + offset
    t = torch.arange(rs * (Tq - 1) + Tk if Tq else Tk, device=q.device, dtype=torch.int64)
    pe = _sinusoids(sk * (t - (Tk - 1)) + offset, d_model).to(r_kernel.dtype)
    R = torch.einsum("td,dnh->nth", pe, r_kernel).to(dtype)  # (H, NR, Dh): autograd carries dR to r_kernel
    tt = None
    if q_types is not None:
        tt = torch.einsum("bind,snd->bnis", q + r_s_bias, seg_embed).to(dtype)  # (B, H, Tq, 2): diff, same
    out = relpos_attention((q + r_w_bias).transpose(1, 2).to(dtype), k.transpose(1, 2).to(dtype),
                           v.transpose(1, 2), (q + r_r_bias).transpose(1, 2).to(dtype), R, rel_stride=rs,
                           separate_cls=separate_cls, tt=tt, q_types=q_types if tt is not None else None,
                           k_types=k_types if tt is not None else None, cls_type=CLS_TOKEN_TYPE,
                           key_padding_mask=key_padding_mask, scale=1.0, dropout_p=dropout_p, backend=backend)
    return out.transpose(1, 2)


def funnel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, r_w_bias: torch.Tensor,
                     r_r_bias: torch.Tensor, r_kernel: torch.Tensor, r_s_bias: torch.Tensor | None = None,
                     seg_embed: torch.Tensor | None = None, q_pos: torch.Tensor, k_pos: torch.Tensor,
                     q_types: torch.Tensor | None = None, k_types: torch.Tensor | None = None,
                     n_types: int | None = None, separate_cls: bool = False,
                     key_padding_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                     backend: str | None = None, route: str | None = None) -> torch.Tensor:
    """Funnel's relative attention score and softmax-weighted values, in one fused attention call.

    Two routes compute the same score:

    * ``"band"`` (the default where the positions allow it): :func:`effattn.relpos_attention` with the
      table ``R[h, t] = pe(distance(t)) @ r_kernel`` (``rel_stride * (Tq - 1) + Tk`` rows, built here;
      autograd carries its gradient to ``r_kernel``) and the token-type term as two scores per query
      picked per pair inside the kernel. The position term then costs about the content term. It needs
      positions in arithmetic progression (:func:`band_geometry`; Funnel's always are).
    * ``"features"``: the position and token-type terms as ``d_model + n_types + 2`` extra QK features
      of one :func:`effattn.flash_attention` call (module docstring); ~13x the content QK FLOPs at
      Funnel's base size, kept as the measured alternative and for positions the band cannot express.

    ``route=None`` takes "band", or "features" when :func:`band_geometry` gives a reason.

    Args:
        q: ``(B, Tq, H, Dh)`` projected queries, **already scaled** by ``1/sqrt(Dh)`` (as Funnel does);
            k: ``(B, Tk, H, Dh)``; v: ``(B, Tk, H, Dv)``.
        r_w_bias, r_r_bias, r_s_bias: ``(H, Dh)`` biases, already scaled.
        r_kernel: ``(d_model, H, Dh)`` projection of the sinusoids; seg_embed: ``(2, H, Dh)``
            (row 0: different segment, row 1: same).
        q_pos, k_pos: ``(Tq,)``, ``(Tk,)`` token positions on one grid.
        q_types, k_types: ``(B, Tq)``, ``(B, Tk)`` token types; None for no token-type term.
        n_types: number of token types (default: largest type + 1, read from the tensors).
        separate_cls: row 0 of the queries and column 0 of the keys are [cls]: only the content term.
        key_padding_mask: ``(B, Tk)`` bool, True = keep.
        route: "band", "features" or None (above); "band" on positions it cannot express raises ValueError.
    Returns:
        ``(B, Tq, H, Dv)``.
    """
    if route not in (None, *FUNNEL_ROUTES):
        raise ValueError(f"route must be one of {FUNNEL_ROUTES} or None, got {route!r}")
    if route != "features":
        geometry = band_geometry(q_pos, k_pos, separate_cls)
        if isinstance(geometry, str):
            if route == "band":
                raise ValueError(f"route='band' needs evenly spaced positions: {geometry}")
        else:
            return _band_route(q, k, v, r_w_bias=r_w_bias, r_r_bias=r_r_bias, r_kernel=r_kernel, r_s_bias=r_s_bias,
                               seg_embed=seg_embed, geometry=geometry, q_types=q_types, k_types=k_types,
                               separate_cls=separate_cls, key_padding_mask=key_padding_mask, dropout_p=dropout_p,
                               backend=backend)
    B, Tq, H, Dh = q.shape
    dtype = q.dtype
    content_q = q + r_w_bias
    c = torch.einsum("bind,mnd->bnim", q + r_r_bias, r_kernel)  # (B, H, Tq, d_model)
    q_pos_feat, k_pos_feat = position_features(c, q_pos, k_pos)
    q_parts = [content_q.transpose(1, 2), q_pos_feat]
    k_parts = [k.transpose(1, 2), k_pos_feat.to(dtype).expand(B, H, -1, -1)]
    if q_types is not None:
        if n_types is None:
            n_types = int(torch.maximum(q_types.max(), k_types.max()).item()) + 1 if q_types.numel() else 1
        seg = torch.einsum("bind,snd->bnis", q + r_s_bias, seg_embed)  # (B, H, Tq, 2): diff, same
        q_tt, k_tt = token_type_features(seg[..., 0], seg[..., 1], q_types, k_types, n_types)
        q_parts.append(q_tt)
        k_parts.append(k_tt.to(dtype)[:, None].expand(-1, H, -1, -1))
    # One dtype for the kernel: under autocast the projections are half precision, the biases float32.
    q_ext = torch.cat(q_parts, dim=-1).to(v.dtype)
    k_ext = torch.cat(k_parts, dim=-1).to(v.dtype)
    if separate_cls:  # [cls] pairs keep the content term only
        q_ext = _zero_extra(q_ext, Dh)
        k_ext = _zero_extra(k_ext, Dh)
    out = flash_attention(q_ext, k_ext, v.transpose(1, 2), scale=1.0, key_padding_mask=key_padding_mask,
                          dropout_p=dropout_p, backend=backend)
    return out.transpose(1, 2)


def _zero_extra(x: torch.Tensor, Dh: int) -> torch.Tensor:
    """Zero the extra (non-content) features of row 0 along the sequence axis of ``(B, H, T, D)``."""
    keep = torch.ones(x.shape[2], x.shape[3], dtype=x.dtype, device=x.device)
    keep[0, Dh:] = 0
    return x * keep


class FunnelRelAttention(nn.Module):
    """Funnel's relative multi-head attention layer, fused (Hugging Face ``FunnelRelMultiheadAttention``).

    Same parameters (names and shapes) as Hugging Face's layer, so state dicts load unchanged:
    ``q_head`` (no bias), ``k_head``, ``v_head``, ``r_w_bias``, ``r_r_bias``, ``r_kernel``, ``r_s_bias``,
    ``seg_embed``, ``post_proj``, ``layer_norm``. ``forward`` returns
    ``LayerNorm(query + dropout(post_proj(attention)))`` like Hugging Face's layer.
    """

    def __init__(self, d_model: int, n_head: int, d_head: int, *, hidden_dropout: float = 0.0,
                 attention_dropout: float = 0.0, layer_norm_eps: float = 1e-9, backend: str | None = None,
                 route: str | None = None):
        super().__init__()
        self.route = route  # funnel_attention's route: "band", "features" or None (the default)
        self.d_model, self.n_head, self.d_head = d_model, n_head, d_head
        self.scale = d_head ** -0.5
        self.backend = backend
        self.hidden_dropout = nn.Dropout(hidden_dropout)
        self.attention_dropout = nn.Dropout(attention_dropout)
        self.q_head = nn.Linear(d_model, n_head * d_head, bias=False)
        self.k_head = nn.Linear(d_model, n_head * d_head)
        self.v_head = nn.Linear(d_model, n_head * d_head)
        self.r_w_bias = nn.Parameter(torch.zeros(n_head, d_head))
        self.r_r_bias = nn.Parameter(torch.zeros(n_head, d_head))
        self.r_kernel = nn.Parameter(torch.zeros(d_model, n_head, d_head))
        self.r_s_bias = nn.Parameter(torch.zeros(n_head, d_head))
        self.seg_embed = nn.Parameter(torch.zeros(2, n_head, d_head))
        self.post_proj = nn.Linear(n_head * d_head, d_model)
        self.layer_norm = nn.LayerNorm(d_model, eps=layer_norm_eps)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, q_pos: torch.Tensor,
                k_pos: torch.Tensor, q_types: torch.Tensor | None = None, k_types: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None, separate_cls: bool = False,
                n_types: int | None = None) -> torch.Tensor:
        """query ``(B, Tq, d_model)`` (pooled hidden states in a pooling layer), key/value ``(B, Tk, d_model)``;
        positions, token types and mask as in :func:`funnel_attention`. Returns ``(B, Tq, d_model)``."""
        return _layer_forward(self, query, key, value, q_pos=q_pos, k_pos=k_pos, q_types=q_types, k_types=k_types,
                              key_padding_mask=key_padding_mask, separate_cls=separate_cls, n_types=n_types,
                              backend=self.backend, route=self.route)


def _layer_forward(layer: nn.Module, query, key, value, *, q_pos, k_pos, q_types, k_types, key_padding_mask,
                   separate_cls, n_types, backend, route=None):
    """The body of a Funnel attention layer, for any module with Funnel's parameter names."""
    B, Tq, _ = query.shape
    Tk = key.shape[1]
    H, Dh = layer.r_w_bias.shape
    scale = Dh ** -0.5
    q = layer.q_head(query).view(B, Tq, H, Dh) * scale
    k = layer.k_head(key).view(B, Tk, H, Dh)
    v = layer.v_head(value).view(B, Tk, H, Dh)
    dropout_p = layer.attention_dropout.p if layer.training else 0.0
    attn = funnel_attention(q, k, v, r_w_bias=layer.r_w_bias * scale, r_r_bias=layer.r_r_bias * scale,
                            r_kernel=layer.r_kernel, r_s_bias=layer.r_s_bias * scale, seg_embed=layer.seg_embed,
                            q_pos=q_pos, k_pos=k_pos, q_types=q_types, k_types=k_types, n_types=n_types,
                            separate_cls=separate_cls, key_padding_mask=key_padding_mask, dropout_p=dropout_p,
                            backend=backend, route=route)
    out = layer.hidden_dropout(layer.post_proj(attn.reshape(B, Tq, H * Dh)))
    return layer.layer_norm(query + out)


# ----------------------------------------------------------------------------------------------
# encoder pooling and decoder up-sampling
# ----------------------------------------------------------------------------------------------
def pool_sequence(x: torch.Tensor, *, mode: str = "mean", stride: int = 2, separate_cls: bool = True,
                  truncate: bool = True) -> torch.Tensor:
    """Funnel's ``pool_tensor`` on hidden states ``(B, T, D)`` -> ``(B, Tp, D)`` (mean or max, ceil mode)."""
    pooled = pool_queries(x[:, None], QueryPool(stride, mode, separate_cls, truncate))
    return pooled[:, 0]


def stride_select(x: torch.Tensor, *, stride: int = 2, separate_cls: bool = True, truncate: bool = True,
                  dim: int = -1) -> torch.Tensor:
    """Funnel's ``stride_pool``: keep the first element of each pooling window along ``dim``.

    For per-token data that is picked, not averaged: positions, token types."""
    dim %= x.dim()
    n = x.shape[dim]
    if separate_cls and n:
        rows = [0] + list(range(n - 1 if truncate else n))
    else:
        rows = list(range(n))
    index = torch.tensor(rows[::stride], device=x.device, dtype=torch.long)
    return x.index_select(dim, index)


def pool_attention_mask(mask: torch.Tensor, *, stride: int = 2, separate_cls: bool = True,
                        truncate: bool = True) -> torch.Tensor:
    """The attention mask of the pooled sequence ``(B, T) -> (B, Tp)``: min-pooled as Hugging Face does
    (a pooled token is kept only if all its tokens are). Bool or float masks, returned in kind."""
    pooled = -pool_queries(-mask[:, None, :, None].to(torch.float32), QueryPool(stride, "max", separate_cls, truncate))
    pooled = pooled[:, 0, :, 0]
    return pooled > 0.5 if mask.dtype == torch.bool else pooled.to(mask.dtype)


def upsample(x: torch.Tensor, *, stride: int, target_len: int, separate_cls: bool = True,
             truncate: bool = True) -> torch.Tensor:
    """Funnel's decoder up-sampling ``(B, Tp, D) -> (B, target_len, D)``.

    Every pooled token is repeated ``stride`` times (``2 ** (n_blocks - 1)`` in Funnel); with
    ``separate_cls`` the [cls] token is split off first and re-attached at position 0, and tokens
    cut by truncation come back as zeros.
    """
    if stride == 1:
        return x
    cls, body = (x[:, :1], x[:, 1:]) if separate_cls else (None, x)
    out = torch.repeat_interleave(body, stride, dim=1)
    if not separate_cls:
        return out[:, :target_len]
    if truncate:
        out = F.pad(out, (0, 0, 0, stride - 1))
    return torch.cat([cls, out[:, :target_len - 1]], dim=1)
