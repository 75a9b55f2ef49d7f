"""What each benchmarked op computes, its inputs, its reference and the work it must do.

One :class:`Op` per name of :data:`bench.cases.OPS`. An op says:

* :meth:`Op.shapes`: the differentiable inputs (``args``, in call order) and ``dout``, the gradient
  the backward modes push through the output (``None``: forward only);
* :meth:`Op.context`: what every provider of one problem shares and that is not a random input: the
  :class:`effattn.BlockMask` of a sparse case, the Funnel layer's weights (deterministic, seeded);
* :meth:`Op.context_ms`: the time to build that context when a step would pay for it (a sparse
  case's mask: reported beside the attention's time);
* :meth:`Op.cost`: FLOPs and minimal bytes (:class:`effattn.profile.AttentionCost` conventions:
  FlashAttention's FLOP count of the pairs the op must compute, the inputs read and outputs
  written once), by mode;
* :meth:`Op.reference`: the output (and gradients) every provider is checked against, computed in
  float64 (float32 for half-precision inputs on CUDA) with effattn's reference or, for the Funnel
  layer, Hugging Face's layer in that precision.

Counting, per op (:mod:`effattn.profile` for the FLOP convention):

* ``attention``: the visible pairs (causal: exact, bottom-right).
* ``pooled``: ``Tp * T`` pairs of the ``Tp`` pooled queries; q is read at full length.
* ``sparse``: the elements of the mask's kept blocks (what a block-sparse kernel computes; partial
  blocks count in full), plus the index lists read.
* ``funnel``: an ordinary attention layer of the same shape: the four ``d_model x d_model``
  projections (q on the pooled rows) and the content attention of ``Tp x T`` pairs. The relative
  position and token-type terms are extra work no provider is credited for (Hugging Face's eager
  code and effattn's fused features do them differently). Backward: twice the projections (input
  and weight gradients), 2.5 times the attention.
* ``funnel-model``: per layer as ``funnel``, plus the feed-forward block (``2 d_model d_inner`` per
  row, twice).
* ``varlen``: the visible pairs of each sequence (causal: exact), no padding; bytes of the packed tensors.
* ``decode``: ``Tk`` pairs per query head and sequence; bytes: the caches read once.
* ``predict``: no FLOP count (the predictors' work is small and not matmul-shaped); bytes: q and k
  read once.
"""

from __future__ import annotations

import abc
import copy
import functools
import math
from dataclasses import dataclass

import torch

from bench.cases import FUNNEL_TYPES, PATTERNS, Case

# Seed of a problem's deterministic context (masks, layer weights): the same for every provider and run.
CONTEXT_SEED = 0
# Packed documents per sequence of a sparse ``documents`` case.
N_DOCUMENTS = 8
# Funnel layer: feed-forward width, the share of the last sequence that is padding, token types.
FUNNEL_INNER_MULTIPLE = 4
FUNNEL_PAD_FRACTION = 4  # the last quarter of the last sequence is padding
FUNNEL_WEIGHT_STD = 0.05
# Predictors in the predict op: SparseFinder's low rank and cluster count, the gate's width.
SPARSEFINDER_RANK = 4
SPARSEFINDER_CLUSTERS = 16
GATE_DIM = 32
# Linear layers: backward FLOPs (input and weight gradients) over forward FLOPs.
LINEAR_BWD_FACTOR = 2


@dataclass(frozen=True)
class Cost:
    """FLOPs and minimal bytes of one call, forward and backward (the backward alone)."""

    fwd_flops: int
    bwd_flops: int
    fwd_bytes: int
    bwd_bytes: int

    def flops(self, mode: str) -> int:
        return {"fwd": self.fwd_flops, "bwd": self.bwd_flops, "fwd+bwd": self.fwd_flops + self.bwd_flops}[mode]

    def bytes(self, mode: str) -> int:
        return {"fwd": self.fwd_bytes, "bwd": self.bwd_bytes, "fwd+bwd": self.fwd_bytes + self.bwd_bytes}[mode]


@dataclass
class Reference:
    """Reference output and, once asked for, the gradients of ``args`` (``lse`` where the op has one)."""

    out: torch.Tensor
    lse: torch.Tensor | None = None
    grads: tuple[torch.Tensor, ...] | None = None


def reference_dtype(case: Case) -> torch.dtype:
    """float64, except half-precision inputs on CUDA: float32 (its error is far below half tolerances)."""
    half = case.torch_dtype in (torch.float16, torch.bfloat16)
    return torch.float32 if half and case.device == "cuda" else torch.float64


def _scale(case: Case) -> float:
    return 1.0 / math.sqrt(case.headdim)


class Op(abc.ABC):
    """One benchmarked operation (see the module docstring)."""

    name = ""
    grad_names: tuple[str, ...] = ("dq", "dk", "dv")
    # Tolerances are the project's table (effattn.testing.TOLERANCES) times this.
    tolerance_factor = 1.0

    def shapes(self, case: Case) -> dict[str, tuple[int, ...] | None]:
        """``{arg name: shape, ..., "dout": shape or None}``."""
        B, Hq, Hkv, Tq, Tk, D = (case.batch, case.heads_q, case.heads_kv, case.seqlen_q, case.seqlen_k,
                                 case.headdim)
        return {"q": (B, Hq, Tq, D), "k": (B, Hkv, Tk, D), "v": (B, Hkv, Tk, D),
                "dout": (B, Hq, self.out_len(case), D)}

    def out_len(self, case: Case) -> int:
        return case.seqlen_q

    def context(self, case: Case) -> object:
        return None

    def context_ms(self, case: Case, timing) -> float | None:
        """Time to build the context of ``case`` when that is part of the op's cost (sparse: the mask), else None."""
        return None

    @abc.abstractmethod
    def cost(self, case: Case, context: object) -> Cost:
        """FLOPs and minimal bytes of one call."""

    @abc.abstractmethod
    def reference(self, case: Case, args: tuple[torch.Tensor, ...], dout: torch.Tensor | None, context: object,
                  ref: Reference | None) -> Reference:
        """The reference on ``args`` (upcast here); gradients added when ``case`` needs them (reusing ``ref``)."""


def _attention_cost(case: Case, pairs_per_head: int, out_len: int, q_rows: int | None = None):
    from effattn.profile import attention_cost

    return attention_cost(case.batch, case.heads_q, case.heads_kv, out_len, case.seqlen_k, case.headdim,
                          case.headdim, pairs_per_head, case.torch_dtype.itemsize, q_rows=q_rows)


def _as_cost(c, extra_bytes: int = 0) -> Cost:
    return Cost(c.fwd_flops, c.bwd_flops, c.fwd_bytes + extra_bytes, c.bwd_bytes + extra_bytes)


class AttentionOp(Op):
    name = "attention"

    def _mask(self, case: Case) -> dict:
        return dict(scale=_scale(case), window_right=0 if case.causal else -1,
                    diag_offset=case.seqlen_k - case.seqlen_q)

    def cost(self, case, context):
        from bench.flops import visible_pairs

        return _as_cost(_attention_cost(case, visible_pairs(case.seqlen_q, case.seqlen_k, case.causal),
                                        case.seqlen_q))

    def reference(self, case, args, dout, context, ref):
        from effattn.reference import attention_backward, attention_forward

        dt = reference_dtype(case)
        q, k, v = (x.detach().to(dt) for x in args)
        if ref is None:
            out, lse = attention_forward(q, k, v, **self._mask(case))
            ref = Reference(out=out, lse=lse)
        if case.needs_grad and ref.grads is None:
            ref.grads = attention_backward(dout.to(dt), q, k, v, ref.out, ref.lse, **self._mask(case))
        return ref


def query_pool(case: Case):
    """Funnel's pooling of the queries in a pooled case: mean, ``stride``, [cls] apart, truncated."""
    from effattn.reference import QueryPool

    return QueryPool(case.stride, "mean", separate_cls=True, truncate=True)


class PooledOp(Op):
    name = "pooled"

    def out_len(self, case):
        return query_pool(case).pooled_len(case.seqlen_q)

    def cost(self, case, context):
        tp = self.out_len(case)
        return _as_cost(_attention_cost(case, tp * case.seqlen_k, tp, q_rows=case.seqlen_q))

    def reference(self, case, args, dout, context, ref):
        from effattn.reference import attention_backward, attention_forward

        dt = reference_dtype(case)
        q, k, v = (x.detach().to(dt) for x in args)
        kw = dict(scale=_scale(case), pool=query_pool(case))
        if ref is None:
            ref = Reference(*attention_forward(q, k, v, **kw))
        if case.needs_grad and ref.grads is None:
            ref.grads = attention_backward(dout.to(dt), q, k, v, ref.out, ref.lse, **kw)
        return ref


def _documents(batch: int, seqlen: int, generator: torch.Generator) -> torch.Tensor:
    """Segment ids ``(B, T)`` of :data:`N_DOCUMENTS` packed documents of random lengths per sequence."""
    cuts = torch.stack([torch.randperm(seqlen - 1, generator=generator)[:N_DOCUMENTS - 1].sort().values + 1
                        for _ in range(batch)])
    ids = torch.zeros(batch, seqlen, dtype=torch.int32)
    ids.scatter_add_(1, cuts.long(), torch.ones_like(cuts, dtype=torch.int32))
    return ids.cumsum(1, dtype=torch.int32)


def mask_builder(case: Case):
    """A function of no argument that builds the :class:`effattn.BlockMask` of a sparse case, the same one
    at every call (seeded with :data:`CONTEXT_SEED`); what it does is what a sparse step pays for its mask.

    * ``random``: per head (one draw shared over the batch), ``max(1, round((1 - sparsity) * nKb))`` FULL kv
      blocks of every query-block row, the diagonal's among them (``BlockMask.random`` with ``per_row``:
      the top-k of random block scores, as a learned block predictor would keep);
    * ``causal``; ``sliding``: a causal window of ``T/8`` tokens; ``documents``: :data:`N_DOCUMENTS` packed
      documents of random lengths per sequence (``from_segments``); ``bigbird``: a window of one block each
      side, two blocks of global tokens and three random blocks per row, per head.
    """
    from effattn import BlockMask

    T, block, device = case.seqlen_q, (case.block, case.block), case.device
    if case.pattern == "random":
        return lambda: BlockMask.random(T, T, 1.0 - case.sparsity, block, heads=case.heads_q, per_row=True,
                                        keep_diagonal=True, generator=torch.Generator().manual_seed(CONTEXT_SEED),
                                        device=device)
    if case.pattern == "causal":
        return lambda: BlockMask.causal(T, T, block, device=device)
    if case.pattern == "sliding":
        return lambda: BlockMask.sliding_window(T, T, T // 8, 0, block, device=device)
    if case.pattern == "bigbird":
        return lambda: BlockMask.bigbird(T, T, case.block, 2 * case.block, 3, block,
                                         torch.Generator().manual_seed(CONTEXT_SEED), heads=case.heads_q,
                                         device=device)
    if case.pattern == "documents":
        segments = _documents(case.batch, T, torch.Generator().manual_seed(CONTEXT_SEED)).to(device)
        return lambda: BlockMask.from_segments(segments, block_size=block)
    raise ValueError(f"sparse pattern must be one of {', '.join(PATTERNS)}; got {case.pattern!r}")


@functools.lru_cache(maxsize=8)
def sparse_mask(case: Case):
    """The :class:`effattn.BlockMask` of a sparse case (``case.problem``): :func:`mask_builder`'s."""
    return mask_builder(case)()


def kept_fraction(block_mask) -> float:
    """Share of the mask's (b, h, q block, kv block) grid kept (PARTIAL or FULL)."""
    grid = block_mask.num_q_blocks * block_mask.num_kv_blocks
    return float(block_mask.kept_blocks().double().mean()) / grid


class SparseOp(Op):
    name = "sparse"

    def context(self, case):
        return sparse_mask(case.problem)

    def context_ms(self, case, timing):
        from bench import harness

        return harness.time_ms(mask_builder(case.problem), case.device, timing)

    def cost(self, case, context):
        from effattn.profile import attention_cost, kept_pairs

        pairs = int(kept_pairs(context).expand(case.batch, case.heads_q).sum())
        base = _attention_cost(case, 0, case.seqlen_q)
        lists = sum(t.nbytes for t in context.as_tuple()[0] if t is not None)  # block lists, segment ids
        # the pairs differ from head to head: their sum, counted as the pairs of one (batch, head)
        work = attention_cost(1, 1, 1, case.seqlen_q, case.seqlen_k, case.headdim, case.headdim, pairs)
        return Cost(fwd_flops=work.fwd_flops, bwd_flops=work.bwd_flops,
                    fwd_bytes=base.fwd_bytes + lists, bwd_bytes=base.bwd_bytes + lists)

    def reference(self, case, args, dout, context, ref):
        from effattn.backends import BACKENDS

        backend = BACKENDS["reference"]
        dt = reference_dtype(case)
        q, k, v = (x.detach().to(dt) for x in args)
        if ref is None:
            ref = Reference(*backend.sparse_forward(q, k, v, context, None, scale=_scale(case)))
        if case.needs_grad and ref.grads is None:
            ref.grads = backend.sparse_backward(dout.to(dt), q, k, v, ref.out, ref.lse, None, context, None,
                                                scale=_scale(case))
        return ref


@dataclass
class FunnelContext:
    """Hugging Face's Funnel layer and attention structure, effattn's fused copies, and the layer's inputs."""

    layer: torch.nn.Module
    structure: torch.nn.Module
    fused: torch.nn.Module
    fused_structure: torch.nn.Module
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor
    fused_features: torch.nn.Module | None = None

    def call(self, fused: bool, route: str | None = None):
        """``x (B, T, d_model) -> (B, Tp, d_model)``: the pooling layer's attention, Hugging Face's or fused
        (``route``: None for the default, the relative-position band; "features" for the wide-feature route).

        Its ``params`` are the layer's weights: a backward computes their gradients too (a training step)."""
        layer, structure = (self.fused, self.fused_structure) if fused else (self.layer, self.structure)
        if fused and route == "features":
            layer = self.fused_features
        mask, types = self.attention_mask, self.token_type_ids

        def forward(x):
            inputs = structure.init_attention_inputs(x, attention_mask=mask.to(x.dtype), token_type_ids=types)
            pooled, inputs = structure.pre_attention_pooling(x, inputs)
            (out,) = layer(pooled, x, x, inputs)
            return out

        forward.params = tuple(layer.parameters())
        return forward


def funnel_layers(d_model: int, n_head: int, d_head: int, device, dtype,
                  attention_type: str = FUNNEL_TYPES[0]) -> tuple:
    """``(layer, structure, fused layer, fused structure, fused layer on the features route)``: Hugging Face's
    Funnel attention (block 1: the first pooling layer; weights seeded, the same for both attention types)
    and effattn's patched copies."""
    from transformers import FunnelConfig
    from transformers.models.funnel import modeling_funnel as mf

    from effattn.integrations import funnel as ef

    cfg = FunnelConfig(d_model=d_model, n_head=n_head, d_head=d_head, d_inner=FUNNEL_INNER_MULTIPLE * d_model,
                       block_sizes=[1, 1, 1], attention_type=attention_type, hidden_dropout=0.0,
                       attention_dropout=0.0)
    layer = mf.FunnelRelMultiheadAttention(cfg, block_index=1)
    gen = torch.Generator().manual_seed(CONTEXT_SEED)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * FUNNEL_WEIGHT_STD)
    layer = layer.to(device, dtype).eval()
    fused = ef.patch(copy.deepcopy(layer))
    fused_features = ef.patch(copy.deepcopy(layer), route="features")
    structure = mf.FunnelAttentionStructure(cfg).eval()
    fused_structure = copy.deepcopy(structure)
    fused_structure.__class__ = ef._fused()["structure"]
    return layer, structure, fused, fused_structure, fused_features


def _funnel_inputs(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """``(attention_mask, token_type_ids)`` of a Funnel case: the last quarter of the last sequence is padding;
    [cls] has type 2, the first half type 0, the second half type 1."""
    B, T = case.batch, case.seqlen_q
    mask = torch.ones(B, T, device=case.device)
    mask[-1, T - T // FUNNEL_PAD_FRACTION:] = 0
    types = torch.zeros(B, T, device=case.device, dtype=torch.long)
    types[:, 0] = 2  # [cls]
    types[:, T // 2:] = 1
    return mask, types


class FunnelOp(Op):
    name = "funnel"
    grad_names = ("dx",)
    # A whole layer (projections, layer norm) against float64: errors add up beyond one attention's.
    tolerance_factor = 4.0

    def d_model(self, case: Case) -> int:
        return case.heads_q * case.headdim

    def out_len(self, case):
        return query_pool(case).pooled_len(case.seqlen_q)

    def shapes(self, case):
        d = self.d_model(case)
        return {"x": (case.batch, case.seqlen_q, d), "dout": (case.batch, self.out_len(case), d)}

    def context(self, case, dtype: torch.dtype | None = None):
        dtype = dtype or case.torch_dtype
        mask, types = _funnel_inputs(case)
        layers = funnel_layers(self.d_model(case), case.heads_q, case.headdim, case.device, dtype,
                               attention_type=case.pattern or FUNNEL_TYPES[0])
        layer, structure, fused, fused_structure, fused_features = layers
        return FunnelContext(layer, structure, fused, fused_structure, attention_mask=mask, token_type_ids=types,
                             fused_features=fused_features)

    def cost(self, case, context):
        B, T, d = case.batch, case.seqlen_q, self.d_model(case)
        tp = self.out_len(case)
        linear = 2 * B * d * d * (2 * tp + 2 * T)  # q and output projections on Tp rows, k and v on T rows
        attention = _attention_cost(case, tp * T, tp)
        weights = 4 * d * d * case.torch_dtype.itemsize
        activations = B * (T + tp) * d * case.torch_dtype.itemsize
        return Cost(fwd_flops=linear + attention.fwd_flops,
                    bwd_flops=LINEAR_BWD_FACTOR * linear + attention.bwd_flops,
                    fwd_bytes=weights + activations, bwd_bytes=2 * (weights + activations))

    def reference(self, case, args, dout, context, ref):
        dt = reference_dtype(case)
        ctx64 = self.context(case, dtype=dt)
        (x,) = args
        x = x.detach().to(dt).requires_grad_(case.needs_grad)
        with torch.set_grad_enabled(case.needs_grad):
            out = ctx64.call(fused=False)(x)
        grads = torch.autograd.grad(out, (x,), dout.to(dt)) if case.needs_grad else None
        return Reference(out=out.detach(), grads=grads)


# The whole-model op: Hugging Face FunnelBaseModel's layer blocks (4 layers; the third pools the queries).
FUNNEL_MODEL_BLOCKS = (2, 2)
# The fused models of a funnel-model case: the default route (the relative-position band) and the features route.
FUNNEL_MODEL_VERSIONS = {"band": None, "features": "features"}


def funnel_models(d_model: int, n_head: int, d_head: int, device, dtype, *, attention_type: str = FUNNEL_TYPES[0],
                  d_inner: int | None = None, block_sizes: tuple[int, ...] = FUNNEL_MODEL_BLOCKS,
                  versions=("eager", *FUNNEL_MODEL_VERSIONS), backend: str | None = None) -> tuple:
    """``(config, {version: model})``: a random-init ``FunnelBaseModel`` (torch's default init under seed
    :data:`CONTEXT_SEED`, dropout off, eval mode) as ``"eager"``, and copies of it patched by
    :func:`effattn.integrations.funnel.patch` on each route of :data:`FUNNEL_MODEL_VERSIONS` named in ``versions``."""
    from transformers import FunnelBaseModel, FunnelConfig

    from effattn.integrations import funnel as ef

    cfg = FunnelConfig(d_model=d_model, n_head=n_head, d_head=d_head,
                       d_inner=d_inner or FUNNEL_INNER_MULTIPLE * d_model, block_sizes=list(block_sizes),
                       attention_type=attention_type, hidden_dropout=0.0, attention_dropout=0.0,
                       activation_dropout=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(CONTEXT_SEED)
        eager = FunnelBaseModel(cfg)
    eager = eager.to(device, dtype).eval()
    models = {"eager": eager} if "eager" in versions else {}
    for name, route in FUNNEL_MODEL_VERSIONS.items():
        if name in versions:
            models[name] = ef.patch(copy.deepcopy(eager), backend=backend, route=route)
    return cfg, models


@dataclass
class FunnelModelContext:
    """The models of a funnel-model case (:func:`funnel_models`) and their inputs' mask and token types."""

    models: dict
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor

    def call(self, version: str):
        """``inputs_embeds (B, T, d_model) -> last hidden state``; ``params``: every weight of the model (a
        backward is a training step's)."""
        model = self.models[version]
        mask, types = self.attention_mask, self.token_type_ids

        def forward(x):
            return model(inputs_embeds=x, attention_mask=mask, token_type_ids=types).last_hidden_state

        # inputs_embeds bypasses the word embeddings: every other weight takes part
        forward.params = tuple(p for n, p in model.named_parameters() if not n.startswith("embeddings.word_"))
        return forward


class FunnelModelOp(FunnelOp):
    name = "funnel-model"
    # A whole model against float64: four layers, feed-forward blocks and layer norms add up.
    tolerance_factor = 10.0

    def out_len(self, case):
        return self._lengths(case)[-1][0]

    def _lengths(self, case) -> list[tuple[int, int]]:
        """``(query rows, keys)`` of each layer: the first layer of every block after the first pools the queries."""
        pool, T, lengths = query_pool(case), case.seqlen_q, []
        for block, size in enumerate(FUNNEL_MODEL_BLOCKS):
            for layer in range(size):
                tq = pool.pooled_len(T) if block > 0 and layer == 0 else T
                lengths.append((tq, T))
                T = tq
        return lengths

    def context(self, case, dtype: torch.dtype | None = None, versions=("eager", *FUNNEL_MODEL_VERSIONS)):
        _, models = funnel_models(self.d_model(case), case.heads_q, case.headdim, case.device,
                                  dtype or case.torch_dtype, attention_type=case.pattern or FUNNEL_TYPES[0],
                                  versions=versions)
        return FunnelModelContext(models, *_funnel_inputs(case))

    def cost(self, case, context):
        """Per layer: the four projections, the feed-forward block and the content attention of an ordinary
        layer; no credit for the position and token-type terms (as the ``funnel`` op)."""
        B, d, size = case.batch, self.d_model(case), case.torch_dtype.itemsize
        d_inner = FUNNEL_INNER_MULTIPLE * d
        fwd = bwd = 0
        for tq, tk in self._lengths(case):
            linear = 2 * B * d * (d * (2 * tq + 2 * tk) + 2 * tq * d_inner)
            fwd += linear + 4 * B * tq * tk * d  # QK^T and PV
            bwd += LINEAR_BWD_FACTOR * linear + 10 * B * tq * tk * d  # dV, dP, dQ, dK (effattn.profile)
        layers = sum(FUNNEL_MODEL_BLOCKS)
        weights = layers * (4 * d * d + 2 * d * d_inner) * size
        activations = B * (case.seqlen_q + self.out_len(case)) * d * size
        return Cost(fwd_flops=fwd, bwd_flops=bwd, fwd_bytes=weights + activations,
                    bwd_bytes=2 * (weights + activations))

    def reference(self, case, args, dout, context, ref):
        dt = reference_dtype(case)
        (x,) = args
        x = x.detach().to(dt).requires_grad_(case.needs_grad)
        with torch.set_grad_enabled(case.needs_grad):
            out = self.context(case, dtype=dt, versions=("eager",)).call("eager")(x)
        grads = torch.autograd.grad(out, (x,), dout.to(dt)) if case.needs_grad else None
        return Reference(out=out.detach(), grads=grads)


# Lengths of the sequences of a varlen case, as shares of its longest (T), cycled: mixed, none below T/20.
VARLEN_SHARES = (1.0, 0.3, 0.6, 0.15, 0.8, 0.45, 0.05, 0.9)


def varlen_lengths(case: Case) -> list[int]:
    """The ``B`` sequence lengths of a varlen case (the first is ``T``)."""
    return [max(1, round(case.seqlen_q * VARLEN_SHARES[i % len(VARLEN_SHARES)])) for i in range(case.batch)]


@dataclass
class VarlenContext:
    """A varlen case's sequences: ``cu_seqlens (B + 1,)`` int32 and the gather/scatter between the packed
    ``(total, H, D)`` rows and a right-padded ``(B, T, H, D)`` batch (what a padding implementation pays)."""

    lengths: list[int]
    cu_seqlens: torch.Tensor
    padded_index: torch.Tensor  # (total,) row of the flattened (B * T) padded batch holding each packed row
    key_padding_mask: torch.Tensor  # (B, T) bool
    segment_ids: torch.Tensor  # (1, total) sequence of each packed row

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """``(total, H, D) -> (B, H, T, D)``, zeros past each sequence."""
        B, T = self.key_padding_mask.shape
        out = x.new_zeros(B * T, *x.shape[1:])
        out = out.index_copy(0, self.padded_index, x)
        return out.view(B, T, *x.shape[1:]).transpose(1, 2)

    def unpad(self, y: torch.Tensor) -> torch.Tensor:
        """``(B, H, T, D) -> (total, H, D)``."""
        return y.transpose(1, 2).flatten(0, 1).index_select(0, self.padded_index)


class VarlenOp(Op):
    name = "varlen"

    def shapes(self, case):
        total = sum(varlen_lengths(case))
        return {"q": (total, case.heads_q, case.headdim), "k": (total, case.heads_kv, case.headdim),
                "v": (total, case.heads_kv, case.headdim), "dout": (total, case.heads_q, case.headdim)}

    def context(self, case):
        lengths = varlen_lengths(case)
        T, dev = case.seqlen_q, case.device
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=dev)
        index = torch.cat([torch.arange(L) + i * T for i, L in enumerate(lengths)]).to(dev)
        kpm = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
        segments = torch.cat([torch.full((L,), i) for i, L in enumerate(lengths)])[None].to(dev)
        return VarlenContext(lengths, cu, index, kpm.to(dev), segments)

    def cost(self, case, context):
        from bench.flops import visible_pairs

        pairs = sum(visible_pairs(L, L, case.causal) for L in context.lengths)
        total = sum(context.lengths)
        c = attention_cost_for(case, batch=1, tq=total, tk=total, pairs=pairs)
        return _as_cost(c, extra_bytes=2 * 4 * len(context.lengths))

    def reference(self, case, args, dout, context, ref):
        import effattn

        dt = reference_dtype(case)
        leaves = [x.detach().to(dt).requires_grad_(case.needs_grad) for x in args]
        with torch.set_grad_enabled(case.needs_grad):
            out, lse = effattn.varlen_attention(*leaves, context.cu_seqlens, context.cu_seqlens, causal=case.causal,
                                                scale=_scale(case), return_lse=True, backend="reference")
        grads = torch.autograd.grad(out, leaves, dout.to(dt)) if case.needs_grad else None
        return Reference(out=out.detach(), lse=lse.detach(), grads=grads)


class DecodeOp(Op):
    name = "decode"

    def cost(self, case, context):
        return _as_cost(_attention_cost(case, case.seqlen_k, case.seqlen_q))

    def reference(self, case, args, dout, context, ref):
        from effattn.reference import attention_forward

        q, k, v = (x.detach().to(reference_dtype(case)) for x in args)
        return Reference(*attention_forward(q, k, v, scale=_scale(case)))


def attention_cost_for(case: Case, *, batch: int, tq: int, tk: int, pairs: int):
    """:func:`effattn.profile.attention_cost` of ``pairs`` per head, ``batch`` rows of ``tq`` queries, ``tk`` keys."""
    from effattn.profile import attention_cost

    return attention_cost(batch, case.heads_q, case.heads_kv, tq, tk, case.headdim, case.headdim, pairs,
                          case.torch_dtype.itemsize)


class PredictOp(Op):
    name = "predict"
    grad_names = ()

    def shapes(self, case):
        shapes = super().shapes(case)
        return {"q": shapes["q"], "k": shapes["k"], "dout": None}

    def cost(self, case, context):
        read = (case.heads_q + case.heads_kv) * case.batch * case.seqlen_q * case.headdim * case.torch_dtype.itemsize
        return Cost(0, 0, read, 0)

    def reference(self, case, args, dout, context, ref):
        # Each predictor is checked against itself in float64 (bench.validate); nothing shared.
        return ref or Reference(out=torch.empty(0))


def kept_top_k(case: Case) -> int:
    """kv blocks kept per query block in a predict case: ``max(1, round((1 - sparsity) * nKb))``."""
    n_kv_blocks = math.ceil(case.seqlen_k / case.block)
    return max(1, round((1.0 - case.sparsity) * n_kv_blocks))


OPS: dict[str, Op] = {op.name: op for op in (AttentionOp(), PooledOp(), SparseOp(), FunnelOp(), FunnelModelOp(),
                                             VarlenOp(), DecodeOp(), PredictOp())}
