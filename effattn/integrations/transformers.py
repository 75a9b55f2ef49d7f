"""effattn as a Hugging Face ``transformers`` attention implementation: ``attn_implementation="effattn"``.

Importing this module registers the name ``"effattn"`` with transformers' ``AttentionInterface`` (the
attention function) and ``AttentionMaskInterface`` (the mask it is handed); :func:`register` does it
again explicitly (idempotent) and :func:`unregister` removes both. Every model that calls attention
through ``ALL_ATTENTION_FUNCTIONS.get_interface`` (BERT, Llama, Mistral, Qwen, Gemma, Bart, T5, ...)
then runs on effattn::

    import effattn.integrations.transformers  # noqa: F401  (registers "effattn")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="effattn")
    model.set_attn_implementation("sdpa")      # and back: model.set_attn_implementation("effattn")
    out = model.generate(**inputs, max_new_tokens=20)

What maps to what:

============================  ========================================================================
transformers                  :func:`effattn.flash_attention`
============================  ========================================================================
query, key, value             q, k, v as they are, ``(B, H, T, D)``; GQA/MQA natively (``Hq`` a
                              multiple of ``Hkv``: k/v are not repeated); output ``(B, Tq, Hq, D)``
2-D ``attention_mask``        ``key_padding_mask (B, Tk)`` bool, True = keep (never a dense mask);
                              none when nothing is padded
causal mask                   ``causal=True``, bottom-right aligned: a decode step with a KV cache
                              (``Tq < Tk``) sees the whole past
causal sliding window ``w``   ``window=(w - 1, 0)``: transformers keeps ``q - w < kv <= q`` (``w``
                              keys, the query's own included)
bidirectional window ``w``    ``window=(w, w)``: transformers keeps ``|q - kv| <= w``
bidirectional mask            ``causal=False`` (encoders, cross-attention)
``scaling``                   ``scale``
``dropout`` (training)        ``dropout_p`` (effattn's Philox stream: docs/semantics.md)
``softcap`` (Gemma-2)         ``softcap`` when :func:`effattn.flash_attention` takes it, else
                              NotImplementedError (never dropped)
no mask (``None``)            ``causal`` from ``is_causal``, else ``module.is_causal``; a
                              ``sliding_window`` keyword as in the rows above
============================  ========================================================================

The mask hand-off. transformers builds masks once per forward through the mask interface, from a
``mask_function(batch, head, q_idx, kv_idx)`` plus the 2-D padding mask and the query/key offsets
of the cache. :func:`create_mask` (the registered mask function) recognizes the mask functions
transformers' masking utilities build (causal, bidirectional, and their sliding-window forms; by
their code objects, not by calling them) and returns an :class:`EffattnMask`: the key padding
mask, ``causal`` and ``window``, computed once and shared by every layer. Keys past the last
query's diagonal (the not yet written slots of a ``StaticCache``) are cut off there, so that the
bottom-right alignment holds. The masks ``generate`` builds ahead for a ``StaticCache`` come back
to the mask function as the model's ``attention_mask`` and are returned as they are.

What falls back to the SDPA drop-in :func:`effattn.scaled_dot_product_attention` with a dense
``(B, 1, Tq, Tk)`` mask (built by transformers' own ``sdpa_mask``, so the pattern is exactly
transformers'), and why:

* a mask function it does not recognize: packed sequences (``position_ids`` restarting inside a row,
  no 2-D mask), ``or_mask_function``/``and_mask_function`` overlays (e.g. bidirectional image
  tokens), ``block_sequence_ids``, chunked attention (Llama-4; its chunks start after the left
  padding, so it is not a key mask), or a model's own mask function — none is key padding + causal
  + window;
* query/key offsets that the bottom-right alignment cannot express (a sliding window whose last key
  is not the last query's position);
* a 4-D mask given by the user: transformers passes it through as it is;
* ``position_bias`` (T5-style additive biases): added to the mask as in transformers' SDPA path
  (effattn refuses gradients with respect to a float mask, so a trained bias cannot be learned).

Left padding is not among them: transformers always applies padding to keys only (a padded query
row is computed, with its padded keys masked), which is a key padding mask.

Differences from ``"sdpa"``: a query row that sees no key (a left-padded query under a causal mask)
is 0 in effattn; compare outputs on non-padded positions. ``output_attentions=True`` returns no
weights (a warning says so, as for SDPA). Attention sinks (``s_aux``/``sinks``) raise
NotImplementedError.
"""

from __future__ import annotations

import inspect
from functools import partial

import torch

import effattn

try:
    from transformers import masking_utils
    from transformers.integrations.sdpa_attention import create_position_bias_mask
    from transformers.masking_utils import AttentionMaskInterface, prepare_padding_mask, sdpa_mask
    from transformers.modeling_utils import AttentionInterface
    from transformers.utils import logging
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("effattn.integrations.transformers needs the `transformers` package: install the "
                      "`transformers` extra (pip install 'effattn[transformers]')") from e

__all__ = ["NAME", "EffattnMask", "attention_forward", "create_mask", "register", "unregister"]

NAME = "effattn"

logger = logging.get_logger(__name__)


class EffattnMask:
    """The mask the attention function is handed: the pattern as effattn arguments, or a dense fallback.

    Attributes:
        key_padding_mask: ``(B, Tk)`` bool (True = keep) or None.
        causal: bottom-right causal.
        window: ``(left, right)`` as :func:`effattn.flash_attention` reads it, or None.
        kv_length: the keys the mask is for (the attention's ``Tk``).
        keys: how many leading keys the pattern reaches; the attention function drops the rest.
        fused: True when :func:`effattn.flash_attention` runs it; False when only the dense mask can.

    ``generate`` builds the masks of a compileable cache (``StaticCache``) ahead and hands them to the
    model as its ``attention_mask``; ``ndim`` (4, a prepared mask's) is what transformers reads of it
    before the mask function, which returns it as it is.
    """

    ndim = 4

    def __init__(self, make_dense, kv_length, *, key_padding_mask=None, causal=False, window=None, keys=None,
                 fused=True):
        self.kv_length = kv_length
        self.key_padding_mask = key_padding_mask
        self.causal = causal
        self.window = window
        self.keys = keys
        self.fused = fused
        self._make_dense = make_dense
        self._dense = None if fused else make_dense()

    def dense(self) -> torch.Tensor:
        """The ``(B, 1, Tq, Tk)`` bool mask transformers' ``sdpa_mask`` builds (made once, on first use)."""
        if self._dense is None:
            self._dense = self._make_dense()
        return self._dense

    def __repr__(self):
        if not self.fused:
            return f"EffattnMask(dense {tuple(self._dense.shape)})"
        kpm = None if self.key_padding_mask is None else tuple(self.key_padding_mask.shape)
        return f"EffattnMask(causal={self.causal}, window={self.window}, key_padding_mask={kpm}, keys={self.keys})"


def _closure(fn) -> dict:
    return dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__ or ())))


_AND_MASKS = masking_utils.and_masks(masking_utils.causal_mask_function).__code__
_SLIDING_CAUSAL = masking_utils.sliding_window_overlay(1).__code__
_SLIDING_BIDIRECTIONAL = masking_utils.sliding_window_bidirectional_overlay(1).__code__


def _pattern(mask_function) -> tuple[bool, tuple[int, int] | None] | None:
    """``(causal, window)`` of the mask functions transformers' masking utilities build; None for any other."""
    if mask_function is masking_utils.causal_mask_function:
        return True, None
    if mask_function is masking_utils.bidirectional_mask_function:
        return False, None
    if getattr(mask_function, "__code__", None) is not _AND_MASKS:
        return None
    parts = _closure(mask_function).get("mask_functions", ())
    if len(parts) != 2 or not hasattr(parts[0], "__code__"):
        return None
    overlay, base = parts
    w = _closure(overlay).get("sliding_window")
    if not isinstance(w, int) or w < 1:
        return None
    if overlay.__code__ is _SLIDING_CAUSAL and base is masking_utils.causal_mask_function:
        return True, (w - 1, 0)  # q - w < kv <= q
    if overlay.__code__ is _SLIDING_BIDIRECTIONAL and base is masking_utils.bidirectional_mask_function:
        return False, (w, w)  # |q - kv| <= w
    return None


def create_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                mask_function=masking_utils.causal_mask_function, attention_mask: torch.Tensor | None = None,
                **kwargs) -> EffattnMask:
    """The ``AttentionMaskInterface`` function for ``"effattn"`` (the signature of transformers' ``sdpa_mask``).

    Queries are at positions ``q_offset + i`` (``i < q_length``), keys at ``kv_offset + j``; ``attention_mask``
    is the 2-D padding mask over positions. Returns an :class:`EffattnMask` (``attention_mask`` itself
    when it is one: a mask ``generate`` built ahead for this forward).
    """
    if isinstance(attention_mask, EffattnMask):
        return attention_mask
    dense_kwargs = {**kwargs, "allow_is_causal_skip": False, "allow_is_bidirectional_skip": False}
    make_dense = partial(sdpa_mask, batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                         kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                         **dense_kwargs)
    pattern = _pattern(mask_function)
    q_offset, kv_offset = int(q_offset), int(kv_offset)  # a StaticCache gives a tensor
    # effattn aligns the diagonal bottom-right: query i on key i + kv_length - q_length.
    diagonal = q_offset - kv_offset
    keys = kv_length
    if pattern is not None and pattern[0] and 0 < diagonal + q_length < kv_length:
        keys = diagonal + q_length  # keys after the last query's position: no query sees them
    if pattern is None or (diagonal != keys - q_length and (pattern[0] or pattern[1] is not None)):
        return EffattnMask(make_dense, kv_length, fused=False)
    causal, window = pattern
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if padding is not None:
        padding = padding[:, kv_offset:kv_offset + keys]
        if bool(padding.all()):
            padding = None
    return EffattnMask(make_dense, kv_length, key_padding_mask=padding, causal=causal, window=window, keys=keys)


def _refuse_unsupported(kwargs) -> None:
    for name in ("s_aux", "sinks"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"{NAME} attention does not support attention sinks ({name}=...); "
                                      "use another attn_implementation for this model")
    if kwargs.get("output_attentions", False):
        logger.warning_once(f"`{NAME}` attention does not return attention weights (output_attentions=True): "
                            "they are None. Use attn_implementation='eager' for them.")


def _flash(query, key, value, *, softcap, **kwargs) -> torch.Tensor:
    if softcap is not None:
        if "softcap" not in inspect.signature(effattn.flash_attention).parameters:
            raise NotImplementedError(f"softcap={softcap}: this version of effattn.flash_attention has no softcap "
                                      "argument (logit soft-capping, e.g. Gemma-2's attn_logit_softcapping); use "
                                      "attn_implementation='eager' for this model")
        kwargs["softcap"] = softcap
    return effattn.flash_attention(query, key, value, **kwargs)


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: EffattnMask | torch.Tensor | None, dropout: float = 0.0,
                      scaling: float | None = None, is_causal: bool | None = None, sliding_window: int | None = None,
                      softcap: float | None = None, position_bias: torch.Tensor | None = None,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """The ``AttentionInterface`` function for ``"effattn"``: ``(attn_output (B, Tq, Hq, Dv), None)``.

    ``attention_mask`` is what :func:`create_mask` built, a 4-D mask passed through by transformers
    (bool, or float added to the scores), or None. With an :class:`EffattnMask` the mask carries the
    pattern (``is_causal`` and ``sliding_window`` are not read, as SDPA does not read them with a mask).
    """
    _refuse_unsupported(kwargs)
    args = dict(scale=scaling, dropout_p=dropout)
    mask = attention_mask
    if isinstance(mask, EffattnMask) and mask.fused and position_bias is None:
        if key.shape[2] != mask.kv_length:
            raise ValueError(f"attention_mask is for {mask.kv_length} keys, but key has {key.shape[2]}")
        key, value = key[:, :, :mask.keys], value[:, :, :mask.keys]
        out = _flash(query, key, value, softcap=softcap, causal=mask.causal, window=mask.window,
                     key_padding_mask=mask.key_padding_mask, **args)
    elif mask is None and position_bias is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        window = None
        if sliding_window is not None:
            window = (sliding_window - 1, 0) if causal else (sliding_window, sliding_window)
        out = _flash(query, key, value, softcap=softcap, causal=causal, window=window, **args)
    else:
        if softcap is not None:
            raise NotImplementedError(f"softcap={softcap} with a mask that runs on effattn's SDPA drop-in "
                                      "(see effattn.integrations.transformers); use attn_implementation='eager'")
        if isinstance(mask, EffattnMask):
            mask = mask.dense()
        elif mask is not None and not isinstance(mask, torch.Tensor):
            raise TypeError(f"attention_mask must be an EffattnMask, a tensor or None, got {type(mask).__name__}")
        causal = False
        if mask is None:
            causal = query.shape[2] > 1 and (is_causal if is_causal is not None else getattr(module, "is_causal", True))
        if position_bias is not None:
            mask, causal = create_position_bias_mask(position_bias, mask, causal, query, key), False
        out = effattn.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=causal,
                                                   enable_gqa=query.shape[1] != key.shape[1], **args)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``"effattn"`` with transformers' ``AttentionInterface`` and ``AttentionMaskInterface`` (idempotent)."""
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, create_mask)


def unregister() -> None:
    """Remove ``"effattn"`` from both interfaces (models set to it then fail to find it)."""
    AttentionInterface._global_mapping.pop(NAME, None)
    AttentionMaskInterface._global_mapping.pop(NAME, None)


register()
