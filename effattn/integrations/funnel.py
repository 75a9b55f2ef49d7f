"""Hugging Face Funnel-Transformer on effattn's fused attention.

``patch(model)`` swaps, in place, the attention of a ``transformers`` ``FunnelModel`` /
``FunnelBaseModel`` (or any model holding Funnel's attention layers) for
:func:`effattn.nn.funnel_attention`: the content, relative-position and token-type terms are
computed inside one fused attention kernel (the relative-position band kernel by default), so no
``T x T`` score, position or token-type tensor is built. Parameters, state dict and outputs stay those
of the original model (see :mod:`effattn.nn.funnel` for the few differences, none of which touch
evaluation-mode outputs on inputs with at least one unpadded key per sequence). ``unpatch(model)``
restores the original code.

How: each ``FunnelAttentionStructure`` is switched to one that carries per-token data (positions,
token types, key mask) instead of ``T x T`` matrices and pools it the way Funnel pools its matrices
(pick the first token of each window; min-pool the mask), and each ``FunnelRelMultiheadAttention``
to one that computes its output from that data. ``output_attentions=True`` is refused: the fused
layer never forms the attention probabilities.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from effattn.nn.funnel import CLS_TOKEN_TYPE, _layer_forward, pool_attention_mask, stride_select

__all__ = ["FunnelAttentionInputs", "is_patched", "patch", "unpatch"]


class FunnelAttentionInputs(NamedTuple):
    """What a fused Funnel layer needs, per token instead of per pair.

    q_pos/k_pos: ``(Tq,)``/``(Tk,)`` positions (original token indices of each token's window);
    q_types/k_types: ``(B, Tq)``/``(B, Tk)`` token types or None; key_mask: ``(B, Tk)`` bool or None.
    """

    q_pos: torch.Tensor
    k_pos: torch.Tensor
    q_types: torch.Tensor | None
    k_types: torch.Tensor | None
    key_mask: torch.Tensor | None
    n_types: int


def _classes():
    try:
        from transformers.models.funnel import modeling_funnel as mf
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("effattn.integrations.funnel needs the `transformers` package") from e
    return mf


def _make_fused_classes():
    mf = _classes()

    class FusedFunnelAttentionStructure(mf.FunnelAttentionStructure):
        """Funnel's attention structure carrying per-token data (:class:`FunnelAttentionInputs`)."""

        def _select(self, x, dim):
            return stride_select(x, separate_cls=self.config.separate_cls, truncate=self.config.truncate_seq,
                                 dim=dim)

        def init_attention_inputs(self, inputs_embeds, attention_mask=None, token_type_ids=None):
            self.pooling_mult = 1
            self.seq_len = T = inputs_embeds.size(1)
            pos = torch.arange(T, device=inputs_embeds.device)
            n_types = 0
            if token_type_ids is not None:
                n_types = int(token_type_ids.max().item()) + 1 if token_type_ids.numel() else 1
                n_types = max(n_types, CLS_TOKEN_TYPE + 1)
            mask = attention_mask.bool() if attention_mask is not None else None
            return FunnelAttentionInputs(pos, pos, token_type_ids, token_type_ids, mask, n_types)

        def pre_attention_pooling(self, output, attention_inputs):
            a = attention_inputs
            q_pos, q_types = self._select(a.q_pos, 0), a.q_types
            q_types = self._select(q_types, 1) if q_types is not None else None
            k_pos, k_types, key_mask = a.k_pos, a.k_types, a.key_mask
            if not self.config.pool_q_only:
                self.pooling_mult *= 2
                k_pos = q_pos
                k_types = q_types
                key_mask = self._pool_mask(key_mask)
            pooled = self.pool_tensor(output, mode=self.config.pooling_type)
            return pooled, FunnelAttentionInputs(q_pos, k_pos, q_types, k_types, key_mask, a.n_types)

        def post_attention_pooling(self, attention_inputs):
            a = attention_inputs
            if not self.config.pool_q_only:
                return a
            self.pooling_mult *= 2
            return FunnelAttentionInputs(a.q_pos, a.q_pos, a.q_types, a.q_types, self._pool_mask(a.key_mask),
                                         a.n_types)

        def _pool_mask(self, mask):
            if mask is None:
                return None
            return pool_attention_mask(mask, separate_cls=self.config.separate_cls,
                                       truncate=self.config.truncate_seq)

    class FusedFunnelRelMultiheadAttention(mf.FunnelRelMultiheadAttention):
        """Funnel's attention layer computing its score in one fused kernel (:func:`effattn.nn.funnel_attention`)."""

        effattn_backend: str | None = None
        effattn_route: str | None = None

        def forward(self, query, key, value, attention_inputs, output_attentions=False):
            if output_attentions:
                raise ValueError("output_attentions=True needs the attention probabilities, which the fused Funnel "
                                 "attention never forms: call effattn.integrations.funnel.unpatch(model) first")
            a = attention_inputs
            out = _layer_forward(self, query, key, value, q_pos=a.q_pos, k_pos=a.k_pos, q_types=a.q_types,
                                 k_types=a.k_types, key_padding_mask=a.key_mask,
                                 separate_cls=self.config.separate_cls, n_types=a.n_types or None,
                                 backend=self.effattn_backend, route=self.effattn_route)
            return (out,)

    return mf, FusedFunnelAttentionStructure, FusedFunnelRelMultiheadAttention


_FUSED = {}


def _fused():
    if not _FUSED:
        mf, structure, attention = _make_fused_classes()
        _FUSED.update(mf=mf, structure=structure, attention=attention)
    return _FUSED


def patch(model: torch.nn.Module, *, backend: str | None = None, route: str | None = None) -> torch.nn.Module:
    """Run the Funnel attention of ``model`` on effattn's fused kernels, in place; returns ``model``.

    ``backend``: as in :func:`effattn.flash_attention` (None: Triton on CUDA, the reference on CPU).
    ``route``: :func:`effattn.nn.funnel_attention`'s route ("band", "features"; None: the default, band).
    Raises ValueError if ``model`` holds no Funnel attention layer.
    """
    f = _fused()
    found = 0
    for module in model.modules():
        if type(module) is f["mf"].FunnelAttentionStructure:
            module.__class__ = f["structure"]
        elif isinstance(module, f["mf"].FunnelRelMultiheadAttention):
            module.__class__ = f["attention"]
            module.effattn_backend = backend
            module.effattn_route = route
            found += 1
    if not found:
        raise ValueError(f"model ({type(model).__name__}) holds no FunnelRelMultiheadAttention layer to patch")
    return model


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`patch`, in place; returns ``model``."""
    f = _fused()
    for module in model.modules():
        if type(module) is f["structure"]:
            module.__class__ = f["mf"].FunnelAttentionStructure
        elif type(module) is f["attention"]:
            module.__class__ = f["mf"].FunnelRelMultiheadAttention
            del module.effattn_backend
            module.__dict__.pop("effattn_route", None)
    return model


def is_patched(model: torch.nn.Module) -> bool:
    """Whether any Funnel attention layer of ``model`` runs on effattn."""
    f = _fused()
    return any(type(m) is f["attention"] for m in model.modules())
