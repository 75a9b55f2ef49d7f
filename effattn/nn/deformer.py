"""DeFormer on effattn's kernels (Cao et al. 2020, "DeFormer: Decomposing Pre-trained Transformers for
Faster Question Answering").

A transformer encoder over a packed ``[question; context]`` sequence whose lower ``split_layer`` layers
attend only within each segment (the question within the question, the context within the context)
and whose upper layers attend jointly over the whole sequence. The context's lower-layer states then do
not depend on the question: they can be computed once per context and reused for every question.

* :class:`EncoderLayer` — a minimal post-LN transformer layer (BERT's and
  ``torch.nn.TransformerEncoderLayer(norm_first=False, batch_first=True)``'s order):
  ``x = LN1(x + Dropout(SelfAttn(x)))``, ``x = LN2(x + Dropout(FFN(x)))``. Its attention is
  :func:`effattn.sparse_attention` when given a :class:`effattn.BlockMask`, else
  :func:`effattn.flash_attention`.
* :class:`DeFormerEncoder` — the decomposed encoder, in two modes:

  - **packed** (training, or one-off inference): ``forward(x, segment_ids, key_padding_mask=None)``.
    The lower layers run with ``BlockMask.from_segments(segment_ids)``: blocks that pair two different
    segments are NONE and never visited by the kernels, so the lower layers cost about
    ``Tq^2 + Tc^2`` instead of ``(Tq + Tc)^2`` (at block granularity); no ``T x T`` tensor is formed.
  - **cached** (inference): ``key = encode_context(context)`` runs the context through the lower
    layers once and keeps the result in an LRU cache; ``forward_question(question, key)`` runs only
    the question through the lower layers, concatenates the cached context states after it and runs
    the upper layers jointly. The result equals the packed mode on ``[question; context]`` with
    segment ids ``[0] * Tq + [1] * Tc``.

The encoder takes hidden states (embeddings already added). For the cache to be valid the context's
embeddings must not depend on the question either: e.g. position ids counted from the start of each
segment, as DeFormer does, not from the start of the packed sequence.

Conventions: ``key_padding_mask`` is bool with True = a real token (effattn's convention; the opposite
of torch's ``src_key_padding_mask``). A padded query row still attends to the real keys of its
segment; its output is not meaningful and no real token sees it. A query row that sees no key at all
(a segment made only of padding) gets attention output 0, as everywhere in effattn.
"""

from __future__ import annotations

import hashlib
import itertools
import operator
from collections import OrderedDict
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from effattn.block_mask import DEFAULT_BLOCK_SIZE, BlockMask
from effattn.flash import flash_attention
from effattn.sparse import sparse_attention

__all__ = [
    "CacheInfo",
    "CachedContext",
    "ContextKey",
    "DeFormerEncoder",
    "EncoderLayer",
]

_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu}


# ----------------------------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------------------------
def _check_states(name: str, x, d_model: int | None = None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (B, T, d_model), got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"{name} must be 3-D (B, T, d_model), got shape {tuple(x.shape)}")
    if d_model is not None and x.shape[-1] != d_model:
        raise ValueError(f"{name} has last dim {x.shape[-1]}, expected d_model={d_model}")


def _check_padding(name: str, mask, batch: int, length: int, device: torch.device) -> None:
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a bool torch.Tensor (B, T) or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be bool (True = real token), got {mask.dtype}")
    if tuple(mask.shape) != (batch, length):
        raise ValueError(f"{name} must have shape (B, T) = {(batch, length)}, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device}, the hidden states on {device}")


def _check_segments(segment_ids, batch: int, length: int, device: torch.device) -> None:
    if not isinstance(segment_ids, torch.Tensor):
        raise TypeError(f"segment_ids must be an integer torch.Tensor (B, T), got {type(segment_ids).__name__}")
    if segment_ids.dtype == torch.bool or segment_ids.is_floating_point() or segment_ids.is_complex():
        raise TypeError(f"segment_ids must hold integer ids (0 = question, 1 = context), got {segment_ids.dtype}")
    if tuple(segment_ids.shape) != (batch, length):
        raise ValueError(f"segment_ids must have shape (B, T) = {(batch, length)} like x's first two dims, "
                         f"got {tuple(segment_ids.shape)}")
    if segment_ids.device != device:
        raise ValueError(f"segment_ids is on {segment_ids.device}, x on {device}")


def _tensor_digest(t: torch.Tensor) -> str:
    """blake2b of a tensor's shape, dtype and bytes (copied to the CPU when on a GPU)."""
    h = hashlib.blake2b(digest_size=20)
    h.update(repr((tuple(t.shape), str(t.dtype))).encode())
    data = t.detach().contiguous().cpu()
    if data.numel():
        h.update(data.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# the layer
# ----------------------------------------------------------------------------------------------
class EncoderLayer(nn.Module):
    """A post-LN transformer encoder layer whose attention runs on effattn's kernels.

    ``x = norm1(x + dropout1(out_proj(attn(x))))``, ``x = norm2(x + dropout2(linear2(dropout(act(linear1(x))))))``
    — the order and parameter shapes of ``torch.nn.TransformerEncoderLayer(norm_first=False)`` (and
    BERT's), with ``qkv`` holding torch's ``self_attn.in_proj_weight`` / ``in_proj_bias`` and ``out_proj``
    its ``self_attn.out_proj``. ``dropout`` applies to the two residual branches and inside the FFN;
    the attention probabilities are not dropped (block-sparse attention has no dropout), which differs
    from torch's layer in training only.

    Args:
        d_model: model width; ``n_head`` must divide it.
        n_head: attention heads (head dim ``d_model // n_head``).
        d_ff: FFN width.
        dropout: residual / FFN dropout probability.
        activation: ``"gelu"`` (BERT) or ``"relu"`` (torch's default).
        layer_norm_eps: LayerNorm epsilon (torch's default 1e-5; BERT uses 1e-12).
        backend: effattn backend name for the attention calls (None: automatic).
    """

    def __init__(self, d_model: int, n_head: int, d_ff: int, dropout: float = 0.0, *, activation: str = "gelu",
                 layer_norm_eps: float = 1e-5, backend: str | None = None):
        super().__init__()
        d_model, n_head, d_ff = (operator.index(v) for v in (d_model, n_head, d_ff))
        if d_model < 1 or n_head < 1 or d_ff < 1:
            raise ValueError(f"d_model, n_head and d_ff must be >= 1, got {(d_model, n_head, d_ff)}")
        if d_model % n_head:
            raise ValueError(f"n_head={n_head} must divide d_model={d_model}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        self.d_model, self.n_head, self.d_ff = d_model, n_head, d_ff
        self.activation = activation
        self.backend = backend
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.linear1 = nn.Linear(d_model, d_ff)
        self.linear2 = nn.Linear(d_ff, d_model)
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def attention(self, x: torch.Tensor, block_mask: BlockMask | None = None,
                  key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Multi-head self-attention of ``x (B, T, d_model)``, before ``out_proj``: ``(B, T, d_model)``."""
        B, T, _ = x.shape
        H = self.n_head
        q, k, v = self.qkv(x).view(B, T, 3, H, self.d_model // H).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, T, Dh)
        if block_mask is None:
            out = flash_attention(q, k, v, key_padding_mask=key_padding_mask, backend=self.backend)
        else:
            out = sparse_attention(q, k, v, block_mask, key_padding_mask=key_padding_mask, backend=self.backend)
        return out.transpose(1, 2).reshape(B, T, self.d_model)

    def forward(self, x: torch.Tensor, block_mask: BlockMask | None = None,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x (B, T, d_model)``; ``block_mask``: a :class:`effattn.BlockMask` for ``(T, T)`` (None: every
        token sees every token); ``key_padding_mask (B, T)`` bool, True = real token. Returns ``(B, T, d_model)``."""
        _check_states("x", x, self.d_model)
        x = self.norm1(x + self.dropout1(self.out_proj(self.attention(x, block_mask, key_padding_mask))))
        ff = self.linear2(self.dropout(_ACTIVATIONS[self.activation](self.linear1(x))))
        return self.norm2(x + self.dropout2(ff))


# ----------------------------------------------------------------------------------------------
# the cache's records
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ContextKey:
    """Handle of a context in a :class:`DeFormerEncoder`'s cache (returned by ``encode_context``).

    ``ident`` identifies the context: the digest of its states' bytes (or of the ``context_id`` given),
    its shape, dtype and device, and its padding mask. ``version`` is the encoder's
    :attr:`~DeFormerEncoder.parameter_version` when it was encoded: a key of an older version is stale."""

    ident: Hashable
    version: int


class CachedContext(NamedTuple):
    """A cache entry: the context's states after the lower layers ``(Bc, Tc, d_model)`` (detached) and its
    padding mask ``(Bc, Tc)`` bool or None."""

    states: torch.Tensor
    key_padding_mask: torch.Tensor | None


class CacheInfo(NamedTuple):
    """Statistics of the context cache. ``hits`` / ``misses``: lookups that found / did not find their
    context (a miss in ``encode_context`` computes it); ``evictions``: entries dropped as least recently
    used; ``invalidations``: times the lower layers' parameters changed and the cache was emptied."""

    hits: int
    misses: int
    size: int
    max_size: int
    evictions: int
    invalidations: int


# ----------------------------------------------------------------------------------------------
# the encoder
# ----------------------------------------------------------------------------------------------
class DeFormerEncoder(nn.Module):
    """A transformer encoder decomposed at ``split_layer``: layers ``< split_layer`` attend within each
    segment, layers ``>= split_layer`` over the whole sequence. See the module docstring.

    Args:
        layers: the stack (an ``nn.ModuleList`` or an iterable of modules), each called as
            ``layer(x, block_mask=None, key_padding_mask=None)`` like :class:`EncoderLayer`.
        split_layer: number of lower (decomposed) layers, ``0 <= split_layer <= len(layers)``. 0 is the
            plain joint encoder, ``len(layers)`` encodes the segments entirely separately.
        block_size: block size of the lower layers' segment mask (int or ``(BLOCK_Q, BLOCK_KV)``, powers
            of two >= 16).
        cache_size: the most contexts the LRU cache keeps (>= 1).

    The cache (``encode_context`` / ``forward_question``):

    * **Key**: blake2b of the context states' bytes (or, when ``context_id`` is given, that id: a tensor
      of token ids is hashed by its bytes, any other hashable is used as it is), plus the states' shape,
      dtype and device and the bytes of the context's padding mask; and the encoder's
      :attr:`parameter_version`.
    * **Invalidation**: :attr:`parameter_version` changes, and every entry is dropped, when anything the
      lower layers' output depends on changes: ``split_layer``, the lower layer modules, their training
      flags (``train()`` / ``eval()``), and any of their parameters or buffers — replaced (new data
      pointer, shape, dtype or device) or modified in place through autograd-visible ops (the tensor's
      ``_version`` counter: optimizer steps, ``load_state_dict``, ``nn.init``, in-place ops under
      ``torch.no_grad()``). Writes through ``p.data`` bypass ``_version`` and are *not* seen: call
      :meth:`clear_cache` after them. The upper layers do not take part: training them keeps the cache.
    * **Gradients**: cached states are computed under ``torch.no_grad()`` and are detached. In
      ``forward_question`` gradients reach the question states, the upper layers and (through the
      question only) the lower layers, never the context states. Use the packed mode to train.
    * With dropout active (``train()`` and ``dropout > 0``) the cached states hold one dropout draw.
    """

    def __init__(self, layers: nn.ModuleList | Iterable[nn.Module], split_layer: int, *,
                 block_size=DEFAULT_BLOCK_SIZE, cache_size: int = 32):
        super().__init__()
        if isinstance(layers, nn.Module) and not isinstance(layers, nn.ModuleList):
            raise TypeError("layers must be an nn.ModuleList or an iterable of modules, got a single "
                            f"{type(layers).__name__}")
        layers = list(layers)
        for i, layer in enumerate(layers):
            if not isinstance(layer, nn.Module):
                raise TypeError(f"layers[{i}] must be an nn.Module, got {type(layer).__name__}")
        self.layers = nn.ModuleList(layers)
        if isinstance(split_layer, bool) or not isinstance(split_layer, int):
            raise TypeError(f"split_layer must be an int, got {type(split_layer).__name__}")
        if not 0 <= split_layer <= len(layers):
            raise ValueError(f"split_layer must lie in [0, {len(layers)}] (the number of layers), got {split_layer}")
        self._split_layer = split_layer
        BlockMask.from_segments(torch.zeros(1, 1, dtype=torch.int32), block_size=block_size)  # checks block_size
        self.block_size = block_size
        if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 1:
            raise ValueError(f"cache_size must be an int >= 1, got {cache_size!r}")
        self.cache_size = cache_size
        self._cache: OrderedDict[ContextKey, CachedContext] = OrderedDict()
        self._hits = self._misses = self._evictions = self._invalidations = 0
        self._fingerprint: tuple | None = None
        self._version = 0

    @classmethod
    def build(cls, n_layers: int, d_model: int, n_head: int, d_ff: int, split_layer: int, *, dropout: float = 0.0,
              activation: str = "gelu", layer_norm_eps: float = 1e-5, backend: str | None = None,
              block_size=DEFAULT_BLOCK_SIZE, cache_size: int = 32) -> DeFormerEncoder:
        """A DeFormer over ``n_layers`` fresh :class:`EncoderLayer` s."""
        layers = [EncoderLayer(d_model, n_head, d_ff, dropout, activation=activation, layer_norm_eps=layer_norm_eps,
                               backend=backend) for _ in range(n_layers)]
        return cls(layers, split_layer, block_size=block_size, cache_size=cache_size)

    # -- structure ---------------------------------------------------------------------------------
    @property
    def split_layer(self) -> int:
        return self._split_layer

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def lower_layers(self) -> nn.ModuleList:
        """Layers ``< split_layer`` (attend within a segment)."""
        return self.layers[:self._split_layer]

    @property
    def upper_layers(self) -> nn.ModuleList:
        """Layers ``>= split_layer`` (attend jointly)."""
        return self.layers[self._split_layer:]

    def segment_mask(self, segment_ids: torch.Tensor) -> BlockMask:
        """The lower layers' mask: ``BlockMask.from_segments(segment_ids)`` (token ``i`` sees ``j`` iff
        their ids are equal), ``(B, 1, nQb, nKb)``."""
        return BlockMask.from_segments(segment_ids, block_size=self.block_size)

    # -- packed mode -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, segment_ids: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The packed sequence through the whole encoder.

        Args:
            x: ``(B, T, d_model)`` hidden states of ``[question; context]`` (any layout of segments).
            segment_ids: ``(B, T)`` integer ids, 0 = question and 1 = context (any ids work: in the lower
                layers a token sees the tokens with its id, so several contexts or packed examples can
                share a row).
            key_padding_mask: ``(B, T)`` bool, True = real token; None = no padding.
        Returns:
            ``(B, T, d_model)``.
        """
        _check_states("x", x)
        B, T, _ = x.shape
        _check_segments(segment_ids, B, T, x.device)
        _check_padding("key_padding_mask", key_padding_mask, B, T, x.device)
        if self._split_layer:
            mask = self.segment_mask(segment_ids)
            for layer in self.lower_layers:
                x = layer(x, block_mask=mask, key_padding_mask=key_padding_mask)
        return self.upper(x, key_padding_mask)

    def lower(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One segment alone ``(B, T, d_model)`` through the lower layers (no mask but padding)."""
        _check_states("x", x)
        _check_padding("key_padding_mask", key_padding_mask, x.shape[0], x.shape[1], x.device)
        for layer in self.lower_layers:
            x = layer(x, key_padding_mask=key_padding_mask)
        return x

    def upper(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Lower-layer states ``(B, T, d_model)`` through the upper layers, jointly (no mask but padding)."""
        _check_states("x", x)
        _check_padding("key_padding_mask", key_padding_mask, x.shape[0], x.shape[1], x.device)
        for layer in self.upper_layers:
            x = layer(x, key_padding_mask=key_padding_mask)
        return x

    # -- cached mode -------------------------------------------------------------------------------
    @property
    def parameter_version(self) -> int:
        """A counter that moves whenever the lower layers' output may have changed (see the class
        docstring); checked, and the cache emptied, on every cache access."""
        lower = self.lower_layers
        items = [self._split_layer]
        for m in lower:
            items.append(id(m))
            items.extend(sub.training for sub in m.modules())
        for t in itertools.chain(lower.parameters(), lower.buffers()):
            items.append((t.data_ptr(), t._version, tuple(t.shape), t.dtype, t.device))
        fingerprint = tuple(items)
        if fingerprint != self._fingerprint:
            if self._cache:
                self._invalidations += 1
            self._cache.clear()
            self._fingerprint = fingerprint
            self._version += 1
        return self._version

    def _context_ident(self, states: torch.Tensor, mask: torch.Tensor | None, context_id) -> Hashable:
        if context_id is None:
            what = ("states", _tensor_digest(states))
        elif isinstance(context_id, torch.Tensor):
            what = ("id-tensor", _tensor_digest(context_id))
        else:
            try:
                hash(context_id)
            except TypeError:
                raise TypeError(f"context_id must be hashable or a tensor, got {type(context_id).__name__}") from None
            what = ("id", context_id)
        return (what, tuple(states.shape), str(states.dtype), str(states.device),
                None if mask is None else _tensor_digest(mask))

    def _encode(self, context_states, key_padding_mask, context_id) -> tuple[ContextKey, CachedContext]:
        _check_states("context_states", context_states)
        Bc, Tc, _ = context_states.shape
        _check_padding("context key_padding_mask", key_padding_mask, Bc, Tc, context_states.device)
        key = ContextKey(self._context_ident(context_states, key_padding_mask, context_id), self.parameter_version)
        entry = self._cache.get(key)
        if entry is not None:
            self._hits += 1
            self._cache.move_to_end(key)
            return key, entry
        self._misses += 1
        with torch.no_grad():
            states = self.lower(context_states, key_padding_mask)
        if states is context_states:  # split_layer == 0: keep our own copy
            states = states.detach().clone()
        mask = None if key_padding_mask is None else key_padding_mask.clone()
        entry = CachedContext(states, mask)
        self._cache[key] = entry
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
            self._evictions += 1
        return key, entry

    def encode_context(self, context_states: torch.Tensor, key_padding_mask: torch.Tensor | None = None, *,
                       context_id=None) -> ContextKey:
        """Run a context ``(Bc, Tc, d_model)`` through the lower layers once, cache the result and return
        its key (a hit returns the key without computing anything).

        ``key_padding_mask (Bc, Tc)`` bool, True = real token. ``context_id``: optional identity of the
        context (e.g. its token ids, or a document id) used in the key instead of hashing the states'
        bytes; it promises that equal ids mean equal states. ``Bc`` is 1 (one context shared by a batch
        of questions) or the questions' batch size."""
        return self._encode(context_states, key_padding_mask, context_id)[0]

    def cached_context(self, key: ContextKey) -> CachedContext:
        """The cache entry of ``key`` (its tensors, not copies); counts as a lookup. KeyError if it is
        stale (the lower layers changed since) or was evicted / cleared."""
        if not isinstance(key, ContextKey):
            raise TypeError(f"key must be a ContextKey from encode_context, got {type(key).__name__}")
        version = self.parameter_version
        entry = self._cache.get(key)
        if entry is None:
            self._misses += 1
            if key.version != version:
                raise KeyError(f"stale context key (version {key.version}, the encoder is at {version}): the lower "
                               "layers changed since the context was encoded; call encode_context again")
            raise KeyError("context key not in the cache (evicted or cleared); call encode_context again")
        self._hits += 1
        self._cache.move_to_end(key)
        return entry

    def forward_question(self, question_states: torch.Tensor, context, *,
                         question_padding_mask: torch.Tensor | None = None,
                         context_padding_mask: torch.Tensor | None = None, context_id=None) -> torch.Tensor:
        """Questions against a cached context: the question alone through the lower layers, then
        ``[question; cached context]`` jointly through the upper layers.

        Args:
            question_states: ``(B, Tq, d_model)``.
            context: a :class:`ContextKey` from :meth:`encode_context`, or the context states
                ``(Bc, Tc, d_model)`` (encoded, or found in the cache, on the way; with
                ``context_padding_mask`` and ``context_id`` as in :meth:`encode_context`).
            question_padding_mask: ``(B, Tq)`` bool, True = real token.
        Returns:
            ``(B, Tq + Tc, d_model)``: equal to ``forward`` on ``[question; context]`` with segment ids
            ``[0] * Tq + [1] * Tc``. Gradients do not reach the context (its cached states are detached).
        """
        if isinstance(context, ContextKey):
            if context_padding_mask is not None or context_id is not None:
                raise ValueError("context_padding_mask / context_id are given to encode_context, not with a "
                                 "ContextKey (the cache entry holds the mask)")
            entry = self.cached_context(context)
        elif isinstance(context, torch.Tensor):
            entry = self._encode(context, context_padding_mask, context_id)[1]
        else:
            raise TypeError(f"context must be a ContextKey or a tensor of context states, got {type(context).__name__}")
        c, c_mask = entry
        _check_states("question_states", question_states, c.shape[-1])
        B, Tq, _ = question_states.shape
        if c.shape[0] not in (1, B):
            raise ValueError(f"the context has batch {c.shape[0]}: expected 1 or the questions' batch {B}")
        if question_states.device != c.device or question_states.dtype != c.dtype:
            raise ValueError(f"question_states are {question_states.dtype} on {question_states.device}, the cached "
                             f"context {c.dtype} on {c.device}")
        _check_padding("question_padding_mask", question_padding_mask, B, Tq, question_states.device)
        q = self.lower(question_states, question_padding_mask)
        c = c.expand(B, -1, -1)
        mask = None
        if question_padding_mask is not None or c_mask is not None:
            qm, cm = question_padding_mask, None if c_mask is None else c_mask.expand(B, -1)
            qm = torch.ones(B, Tq, dtype=torch.bool, device=c.device) if qm is None else qm
            cm = torch.ones(B, c.shape[1], dtype=torch.bool, device=c.device) if cm is None else cm
            mask = torch.cat([qm, cm], dim=1)
        return self.upper(torch.cat([q, c], dim=1), mask)

    # -- cache management --------------------------------------------------------------------------
    def cache_info(self) -> CacheInfo:
        """Hits, misses, size, max size, evictions and invalidations of the context cache."""
        self.parameter_version  # noqa: B018 - drops stale entries, so that size counts live ones
        return CacheInfo(self._hits, self._misses, len(self._cache), self.cache_size, self._evictions,
                         self._invalidations)

    def clear_cache(self) -> None:
        """Drop every cached context and reset the statistics."""
        self._cache.clear()
        self._hits = self._misses = self._evictions = self._invalidations = 0

    def extra_repr(self) -> str:
        return f"split_layer={self._split_layer}, block_size={self.block_size}, cache_size={self.cache_size}"
