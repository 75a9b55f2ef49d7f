"""The implementations compared, each able to say why it cannot run a case here.

A provider serves the ops in its ``ops``. For one case it builds a function of the op's ``args``
(:mod:`bench.ops`): for ``attention``, ``pooled`` and ``sparse`` ``fn(q, k, v) -> out`` with
``q (B, Hq, Tq, D)``, ``k, v (B, Hkv, Tk, D)``, causal meaning bottom-right aligned (query ``i`` sees
keys ``j <= i + Tk - Tq``), scale ``1/sqrt(D)``; for ``funnel`` ``fn(x) -> out``; for ``predict``
``fn(q, k) -> BlockMask``, with ``fn.reference`` the same predictor in another precision. Before
building it, the runner asks :meth:`Provider.not_supported_reasons`; a non-empty list is shown in
place of a time. A provider may also raise :class:`NotSupportedError` (or effattn's
``UnsupportedInputError``) from the call itself.

What each provider does per op:

* ``naive``: materialises the ``(B, H, Tq, Tk)`` scores (pooled: pools q first; sparse: the mask
  expanded to elements; funnel: Hugging Face's eager Funnel layer of the case's attention type;
  funnel-model: Hugging Face's FunnelBaseModel; varlen: the sequences padded to a batch, key padding as a mask;
  predict: the oracle, the top blocks of the true attention's block-max map).
* ``sdpa*``, ``flex``: pooled: q pooled in PyTorch first; sparse: SDPA with the expanded boolean mask,
  FlexAttention with the same mask converted (``BlockMask.to_flex``).
* ``effattn*``: ``flash_attention``, ``pooled_attention`` (pooling inside the kernel), ``varlen_attention``
  (varlen: the packed sequences natively; decode: the KV cache as varlen caches, split-KV on a GPU),
  ``sparse_attention``, the fused Funnel layer (``effattn.integrations.funnel``: the relative-position
  band kernel); ``effattn-prepool``: pooled with q pooled in PyTorch first, then ``flash_attention``;
  ``effattn-features``: the fused Funnel layer with the position term as ``d_model`` extra q/k features;
  ``effattn-padded``, ``effattn-segments``: varlen as padding + dense ``flash_attention`` with a key padding
  mask, or as one packed row with ``segment_ids`` (the block-sparse kernels); ``effattn-flash``: decode as a
  plain ``flash_attention`` call.
* ``gate``, ``sparsefinder``: ``effattn.sparsity``'s predictors (untrained weights, seeded: the cost of
  a prediction does not depend on training).

Peers (``peer=True``) are the torch implementations that effattn is measured against: the best of
them in a case gives the "vs best peer" speed-up.
"""

from __future__ import annotations

import abc
import contextlib
import copy
import functools
import math
import warnings
from collections.abc import Callable

import torch

from bench.cases import FUNNEL_OPS, OP_NAMES, Case

AttentionFn = Callable[..., object]

# Copies of the (B, Hq, Tq, Tk) score matrix alive at once in a materialising implementation
# (scores, probabilities, masks, and the tensors autograd saves for the backward): an estimate, used
# to skip cases that cannot fit rather than to predict the peak.
SCORE_COPIES = {"fwd": 3, "bwd": 5, "fwd+bwd": 5}
GIB = 1 << 30
# What torch's SDPA raises when the forced backend cannot run the input (CUDA; CPU).
NO_SDPA_KERNEL = ("No available kernel", "No viable backend")
# Torch recompiles FlexAttention for every new shape, dtype and mask; a sweep needs more than dynamo's default.
FLEX_RECOMPILE_LIMIT = 512
FUNNEL_REASON = {"sdpa": "no Funnel layer built on SDPA: its relative-position and token-type terms would enter as "
                         "a materialised (B, H, Tp, T) float attn_mask (not written)",
                 "flex": "no Funnel layer built on FlexAttention: its relative-position and token-type terms would "
                         "need a score_mod gathering a (Tp, 2T) position table per head (not written)"}
# Largest forward tile asked of FlexAttention for a sparse mask (its kernels' own limit on an H100).
FLEX_MAX_TILE = 128
CPU_FLEX_REASON = ("FlexAttention is compiled (torch.compile) for every shape, seconds each on a small CPU; "
                   "name it in --providers to run it anyway")


class NotSupportedError(RuntimeError):
    """A provider cannot run a case; the message says why."""


def unsupported_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "cannot run this case" rather than "broken"."""
    errors: list[type[BaseException]] = [NotSupportedError]
    try:
        from effattn import UnsupportedInputError
        errors.append(UnsupportedInputError)
    except ImportError:
        pass
    return tuple(errors)


class Provider(abc.ABC):
    """One implementation: ``name``, ``description``, whether it is a torch ``peer``, the ``ops`` it serves."""

    name = ""
    description = ""
    peer = False
    ops: tuple[str, ...] = ("attention",)

    def not_supported_reasons(self, case: Case, requested: bool = False) -> list[str]:
        """Why this provider cannot (or should not, unless ``requested`` by name) run ``case`` here; [] if it can."""
        return []

    @abc.abstractmethod
    def build(self, case: Case, context: object = None, sample=None) -> AttentionFn:
        """The function of the op's args for ``case``; ``context``: the op's (:meth:`bench.ops.Op.context`),
        ``sample``: one input set (:class:`bench.validate.Inputs`), for what must be fitted to inputs."""


def _pool_q(case: Case):
    """``q -> pooled q``: Funnel's query pooling of a pooled case, in PyTorch."""
    from bench.ops import query_pool
    from effattn.reference import pool_queries

    pool = query_pool(case)
    return lambda q: pool_queries(q, pool)


def _available_bytes(device: str) -> int | None:
    """Memory a new allocation could still get: free device memory plus torch's unused cache; host MemAvailable."""
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return free + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _materialised_reasons(case: Case, element_size: int, copies: int | None = None) -> list[str]:
    """A reason when the ``(B, Hq, Tq, Tk)`` score copies of a materialising implementation cannot fit."""
    scores = case.batch * case.heads_q * case.seqlen_q * case.seqlen_k * element_size
    copies = SCORE_COPIES[case.mode] if copies is None else copies
    need = copies * scores
    available = _available_bytes(case.device)
    if available is not None and need > available:
        return [f"materialises {copies} x {scores / GIB:.1f} GiB of scores, "
                f"{available / GIB:.1f} GiB available"]
    return []


def _needs_cuda(case: Case, what: str) -> list[str]:
    return [] if case.device == "cuda" else [f"{what} on CUDA only"]


def _import_reasons(module: str) -> list[str]:
    try:
        __import__(module)
    except Exception as e:  # any import failure is a reason, not a crash
        return [f"{module} cannot be imported ({type(e).__name__}: {e})"]
    return []


class NaiveProvider(Provider):
    name = "naive"
    description = ("effattn.reference.naive_attention: the full (B, Hq, Tq, Tk) softmax in memory, autograd backward "
                   "(funnel: Hugging Face's eager layer; predict: the oracle's dense block map)")
    ops = OP_NAMES

    def not_supported_reasons(self, case, requested=False):
        reasons = _import_reasons("effattn.reference")
        if case.op in FUNNEL_OPS:
            reasons += _import_reasons("transformers")
        return reasons or _materialised_reasons(case, case.torch_dtype.itemsize)

    def build(self, case, context=None, sample=None):
        from effattn.reference import naive_attention

        if case.op == "funnel":
            return context.call(fused=False)
        if case.op == "funnel-model":
            return context.call("eager")
        if case.op == "varlen":
            mask = _padded_mask(case, context)
            return lambda q, k, v: context.unpad(naive_attention(context.pad(q), context.pad(k), context.pad(v), mask))
        if case.op == "predict":
            return _oracle(case)
        if case.op == "pooled":
            pool = _pool_q(case)
            return lambda q, k, v: naive_attention(pool(q), k, v)
        if case.op == "sparse":
            dense = context.to_dense()
            return lambda q, k, v: naive_attention(q, k, v, dense)

        window_right = 0 if case.causal else -1
        diag_offset = case.seqlen_k - case.seqlen_q

        def attn(q, k, v):
            return naive_attention(q, k, v, window_right=window_right, diag_offset=diag_offset)

        return attn


def _oracle(case: Case):
    """The oracle predictor: the top ``kept_top_k`` kv blocks of each q block of the dense attention's
    block-max map (what a predictor keeping as many blocks would keep at best)."""
    from bench.ops import kept_top_k
    from effattn import BlockMask

    top_k, block = kept_top_k(case), case.block

    def predict(q, k):
        B, H, Tq, _ = q.shape
        Tk = k.shape[2]
        p = torch.softmax(q @ k.transpose(-1, -2) * case.headdim ** -0.5, dim=-1)
        nq, nk = math.ceil(Tq / block), math.ceil(Tk / block)
        p = torch.nn.functional.pad(p, (0, nk * block - Tk, 0, nq * block - Tq))
        block_max = p.view(B, H, nq, block, nk, block).amax(dim=(3, 5))
        picked = block_max.topk(min(top_k, nk), dim=-1).indices
        keep = torch.zeros_like(block_max, dtype=torch.bool).scatter_(-1, picked, True)
        return BlockMask.from_dense_blocks(keep, Tq, Tk, (block, block))

    predict.reference = predict
    return predict


class SdpaProvider(Provider):
    """``torch.nn.functional.scaled_dot_product_attention``, on torch's choice of backend or a forced one."""

    peer = True
    ops = ("attention", "pooled", "sparse", *FUNNEL_OPS, "varlen", "decode")

    def __init__(self, backend_name: str | None = None):
        self.backend_name = backend_name
        suffix = {None: "", "MATH": "-math", "FLASH_ATTENTION": "-flash", "EFFICIENT_ATTENTION": "-efficient",
                  "CUDNN_ATTENTION": "-cudnn"}[backend_name]
        self.name = "sdpa" + suffix
        self.description = ("torch.nn.functional.scaled_dot_product_attention"
                            + (f" forced to SDPBackend.{backend_name}" if backend_name else ", torch's choice"))

    def _backend(self):
        from torch.nn.attention import SDPBackend

        member = getattr(SDPBackend, self.backend_name, None)
        if member is None:
            raise NotSupportedError(f"this torch has no SDPBackend.{self.backend_name}")
        return member

    def not_supported_reasons(self, case, requested=False):
        if case.op in FUNNEL_OPS:
            return [FUNNEL_REASON["sdpa"]]
        reasons = []
        if case.op == "sparse":  # the boolean mask, expanded to elements
            reasons += _materialised_reasons(case, 1, copies=1)
        if self.backend_name is None:
            return reasons
        reasons += _needs_cuda(case, "forcing an SDPA backend is benchmarked")
        if not reasons and self.backend_name == "MATH":
            reasons += _materialised_reasons(case, torch.float32.itemsize)  # the math path computes in fp32
        return reasons

    def _plain(self, case, context):
        """SDPA of ``(q, k, v)`` for ``case`` on torch's choice of backend."""
        import torch.nn.functional as F

        if case.op == "pooled":
            pool = _pool_q(case)
            return lambda q, k, v: F.scaled_dot_product_attention(pool(q), k, v)
        if case.op == "sparse":
            dense = context.to_dense()
            return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
        if case.op == "varlen":
            mask, gqa = _padded_mask(case, context), case.gqa > 1
            return lambda q, k, v: context.unpad(F.scaled_dot_product_attention(
                context.pad(q), context.pad(k), context.pad(v), attn_mask=mask, enable_gqa=gqa))
        kwargs = {"enable_gqa": case.gqa > 1}
        if case.causal and case.seqlen_q == case.seqlen_k:
            kwargs["is_causal"] = True
        elif case.causal:  # SDPA's is_causal is top-left aligned; this bias is bottom-right, like the others
            from torch.nn.attention.bias import causal_lower_right
            kwargs["attn_mask"] = causal_lower_right(case.seqlen_q, case.seqlen_k)
        return functools.partial(F.scaled_dot_product_attention, **kwargs)

    def build(self, case, context=None, sample=None):
        plain = self._plain(case, context)
        if self.backend_name is None:
            return plain

        from torch.nn.attention import sdpa_kernel

        backend = self._backend()

        def attn(q, k, v):
            try:
                with sdpa_kernel([backend]):
                    return plain(q, k, v)
            except RuntimeError as e:
                if not any(text in str(e) for text in NO_SDPA_KERNEL):
                    raise
            # Torch says why the forced backend declined in warnings; run again to collect them.
            with warnings.catch_warnings(record=True) as caught, sdpa_kernel([backend]):
                warnings.simplefilter("always")
                with contextlib.suppress(RuntimeError):
                    plain(q, k, v)
            why = "; ".join(dict.fromkeys(str(w.message).strip().splitlines()[0] for w in caught))
            raise NotSupportedError(f"SDPBackend.{self.backend_name} declined: {why or 'no reason given'}")

        return attn


class FlexProvider(Provider):
    name = "flex"
    description = ("torch.nn.attention.flex_attention compiled with torch.compile: causal as a block mask, "
                   "sparse with the mask converted (BlockMask.to_flex), pooled on pre-pooled q")
    peer = True
    ops = ("attention", "pooled", "sparse", *FUNNEL_OPS, "varlen", "decode")

    def not_supported_reasons(self, case, requested=False):
        if case.op in FUNNEL_OPS:
            return [FUNNEL_REASON["flex"]]
        if case.op in ("varlen", "decode"):
            return [f"no {case.op} case built on FlexAttention (not written)"]
        reasons = _import_reasons("torch.nn.attention.flex_attention")
        if not reasons and case.device == "cpu" and case.needs_grad:
            reasons.append("FlexAttention has no backward on CPU")
        elif not reasons and case.device != "cuda" and not requested:
            reasons.append(CPU_FLEX_REASON)
        return reasons

    def build(self, case, context=None, sample=None):
        from torch.nn.attention.flex_attention import create_block_mask

        compiled = _compiled_flex_attention()
        if case.op == "pooled":
            pool = _pool_q(case)
            return lambda q, k, v: compiled(pool(q), k, v)
        if case.op == "sparse":
            flex_mask = context.to_flex()
            # the forward's tiles = the mask's blocks (flex's default tile may be wider than the mask's block)
            options = {"fwd_BLOCK_M": min(case.block, FLEX_MAX_TILE), "fwd_BLOCK_N": min(case.block, FLEX_MAX_TILE)}
            return lambda q, k, v: compiled(q, k, v, block_mask=flex_mask, kernel_options=options)
        block_mask = None
        if case.causal:
            offset = case.seqlen_k - case.seqlen_q

            def causal_bottom_right(b, h, q_idx, kv_idx):
                return kv_idx <= q_idx + offset

            block_mask = create_block_mask(causal_bottom_right, None, None, case.seqlen_q, case.seqlen_k,
                                           device=case.device)
        enable_gqa = case.gqa > 1

        def attn(q, k, v):
            return compiled(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)

        return attn


@functools.cache
def _compiled_flex_attention():
    import torch._dynamo.config as dynamo_config
    from torch.nn.attention.flex_attention import flex_attention

    for option in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                   "accumulated_cache_size_limit"):
        if hasattr(dynamo_config, option):
            setattr(dynamo_config, option, max(getattr(dynamo_config, option), FLEX_RECOMPILE_LIMIT))
    return torch.compile(flex_attention, dynamic=False)


class EffattnProvider(Provider):
    """effattn's ops on their automatic backend (None) or a named one."""

    def __init__(self, backend: str | None = None):
        self.backend = backend
        self.name = "effattn" if backend is None else f"effattn-{backend}"
        self.description = ("effattn, automatic backend (the first of effattn.backends.AUTO_ORDER that runs the "
                            "case)" if backend is None else f"effattn with backend={backend!r}")
        # The fused Funnel layer picks its backend itself (the automatic one).
        self.ops = ("attention", "pooled", "sparse", "varlen", "decode") + (FUNNEL_OPS if backend is None else ())

    def not_supported_reasons(self, case, requested=False):
        reasons = _import_reasons("effattn")
        if case.op in FUNNEL_OPS:
            reasons += _import_reasons("transformers")
        if self.backend == "triton":
            reasons += _import_reasons("triton")
            reasons += _needs_cuda(case, "the Triton kernels are timed")  # the CPU interpreter is for tests
        elif self.backend is not None and not reasons:
            reasons += self._backend_reasons(case)
        return reasons

    def _backend_reasons(self, case: Case) -> list[str]:
        """What the named backend says of this case's input, as the op would ask it (building the extension
        on first use, as a call naming it does)."""
        from bench.ops import query_pool
        from effattn.backends import BACKENDS, AttentionCall

        backend = BACKENDS.get(self.backend)
        if backend is None:
            return [f"effattn has no backend {self.backend!r} (backends: {', '.join(BACKENDS)})"]
        call = AttentionCall(device=torch.device(case.device), dtype=case.torch_dtype, head_dim_qk=case.headdim,
                             head_dim_v=case.headdim, Tq=case.seqlen_q, Tk=case.seqlen_k, dropout=False,
                             batch=case.batch, heads=case.heads_q,
                             pool=query_pool(case) if case.op == "pooled" else None,
                             varlen=case.op in ("varlen", "decode"))
        return backend.not_supported_reasons(call, forced=True)

    def build(self, case, context=None, sample=None):
        import effattn

        scale = 1.0 / math.sqrt(case.headdim)
        if case.op == "funnel":
            return context.call(fused=True)
        if case.op == "funnel-model":
            return context.call("band")
        if case.op == "pooled":
            return functools.partial(effattn.pooled_attention, stride=case.stride, separate_cls=True, truncate=True,
                                     scale=scale, backend=self.backend)
        if case.op == "sparse":
            return lambda q, k, v: effattn.sparse_attention(q, k, v, context, scale=scale, backend=self.backend)
        if case.op == "varlen":
            cu = context.cu_seqlens
            return functools.partial(effattn.varlen_attention, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=case.causal,
                                     scale=scale, backend=self.backend)
        if case.op == "decode":
            return _decode_as_varlen(case, scale, self.backend)
        return functools.partial(effattn.flash_attention, causal=case.causal, scale=scale, backend=self.backend)


class EffattnFeaturesProvider(Provider):
    """The fused Funnel layer on its other route: the relative-position term as ``d_model`` extra q/k features
    of one flash attention call (``effattn.integrations.funnel.patch(..., route="features")``)."""

    name = "effattn-features"
    description = ("funnel: the fused layer with the position term as d_model extra q/k features (the route "
                   "before the relative-position band kernel), automatic backend")
    ops = FUNNEL_OPS

    def not_supported_reasons(self, case, requested=False):
        return _import_reasons("effattn") + _import_reasons("transformers")

    def build(self, case, context=None, sample=None):
        if case.op == "funnel-model":
            return context.call("features")
        return context.call(fused=True, route="features")


def _padded_mask(case: Case, context) -> torch.Tensor:
    """The bool attention mask ``(B, 1, T, T)`` of a varlen case padded to a batch: key padding (and causal)."""
    keep = context.key_padding_mask[:, None, None, :]
    if case.causal:
        T = case.seqlen_q
        keep = keep & torch.ones(T, T, dtype=torch.bool, device=case.device).tril()
    return keep


def _decode_as_varlen(case: Case, scale: float, backend: str | None):
    """Decoding ``q (B, Hq, 1, D)`` against caches ``k, v (B, Hkv, T, D)`` through ``effattn.varlen_attention``
    (one query per sequence, the caches as (B, T, Hkv, D) views, every slot used)."""
    import effattn

    B, T = case.batch, case.seqlen_k
    cu = torch.arange(B + 1, dtype=torch.int32, device=case.device)
    used = torch.full((B,), T, dtype=torch.int32, device=case.device)

    def decode(q, k, v):
        out = effattn.varlen_attention(q[:, :, 0], k.transpose(1, 2), v.transpose(1, 2), cu, seqused_k=used,
                                       scale=scale, backend=backend)
        return out[:, :, None]

    return decode


class EffattnPaddedProvider(Provider):
    """Varlen the way it is done without varlen kernels: pad to a batch, key padding mask, dense flash attention."""

    name = "effattn-padded"
    description = "varlen: the sequences padded to a batch, effattn.flash_attention with a key padding mask"
    ops = ("varlen",)

    def not_supported_reasons(self, case, requested=False):
        return _import_reasons("effattn")

    def build(self, case, context=None, sample=None):
        import effattn

        scale, kpm = 1.0 / math.sqrt(case.headdim), context.key_padding_mask
        return lambda q, k, v: context.unpad(effattn.flash_attention(
            context.pad(q), context.pad(k), context.pad(v), causal=case.causal, key_padding_mask=kpm, scale=scale))


class EffattnSegmentsProvider(Provider):
    """Varlen as one packed row with ``segment_ids``: the block-sparse kernels skip cross-sequence blocks."""

    name = "effattn-segments"
    description = "varlen: one packed row, effattn.flash_attention(segment_ids=...) (block-sparse kernels)"
    ops = ("varlen",)

    def not_supported_reasons(self, case, requested=False):
        return _import_reasons("effattn")

    def build(self, case, context=None, sample=None):
        import effattn

        scale, ids = 1.0 / math.sqrt(case.headdim), context.segment_ids

        def attn(q, k, v):
            out = effattn.flash_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                          causal=case.causal, segment_ids=ids, scale=scale)
            return out[0].transpose(0, 1)

        return attn


class EffattnFlashDecodeProvider(Provider):
    """Decoding as a plain flash attention call (one query row per sequence, one program per head)."""

    name = "effattn-flash"
    description = "decode: a plain effattn.flash_attention call of the one query against the cache"
    ops = ("decode",)

    def not_supported_reasons(self, case, requested=False):
        return _import_reasons("effattn")

    def build(self, case, context=None, sample=None):
        import effattn

        return functools.partial(effattn.flash_attention, scale=1.0 / math.sqrt(case.headdim))


class EffattnPrepoolProvider(Provider):
    """Pooled attention the way it is done without a pooling kernel: q pooled in PyTorch, then effattn's flash."""

    name = "effattn-prepool"
    description = ("pooled: q pooled in PyTorch, then effattn.flash_attention (automatic backend): what pooling "
                   "inside the kernel saves")
    ops = ("pooled",)

    def not_supported_reasons(self, case, requested=False):
        return _import_reasons("effattn")

    def build(self, case, context=None, sample=None):
        import effattn

        pool = _pool_q(case)
        scale = 1.0 / math.sqrt(case.headdim)
        return lambda q, k, v: effattn.flash_attention(pool(q), k, v, scale=scale)


class PredictorProvider(Provider):
    """A learned block-mask predictor of ``effattn.sparsity`` (seeded, untrained weights)."""

    ops = ("predict",)

    def __init__(self, kind: str):
        self.name = kind
        self.description = {
            "gate": "effattn.sparsity.BlockGate.predict(top_k): pooled q/k blocks, per-head linear maps, top-k",
            "sparsefinder": "effattn.sparsity.SparseFinder.predict: low-rank projections, k-means clusters "
                            "(fitted on the first input set), cluster-set intersection per block pair",
        }[kind]

    def not_supported_reasons(self, case, requested=False):
        return _import_reasons("effattn.sparsity")

    def _module(self, case: Case, sample):
        from bench.ops import CONTEXT_SEED, GATE_DIM, SPARSEFINDER_CLUSTERS, SPARSEFINDER_RANK
        from effattn.sparsity import BlockGate, SparseFinder

        if self.name == "gate":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(CONTEXT_SEED)
                return BlockGate(case.heads_q, case.headdim, gate_dim=GATE_DIM, block_size=(case.block, case.block))
        finder = SparseFinder(case.heads_q, case.headdim, rank=SPARSEFINDER_RANK, n_clusters=SPARSEFINDER_CLUSTERS,
                              seed=CONTEXT_SEED).to(case.device)
        q, k = sample.args_inference
        finder.fit_clusters(q.float(), k.float())
        return finder

    def build(self, case, context=None, sample=None):
        from bench.ops import kept_top_k

        module = self._module(case, sample).to(case.device)
        block = (case.block, case.block)

        def bind(m):
            if self.name == "gate":
                return lambda q, k: m.predict(q, k, top_k=kept_top_k(case))
            return lambda q, k: m.predict(q, k, block_size=block, top_k=kept_top_k(case))

        predict = bind(module)
        predict.reference = bind(copy.deepcopy(module).double())
        return predict


PROVIDERS: dict[str, Provider] = {
    p.name: p
    for p in (
        NaiveProvider(),
        SdpaProvider(),
        SdpaProvider("MATH"),
        SdpaProvider("FLASH_ATTENTION"),
        SdpaProvider("EFFICIENT_ATTENTION"),
        SdpaProvider("CUDNN_ATTENTION"),
        FlexProvider(),
        EffattnProvider(),
        EffattnProvider("triton"),
        EffattnProvider("cuda"),
        EffattnProvider("cpp"),
        EffattnPrepoolProvider(),
        EffattnFeaturesProvider(),
        EffattnPaddedProvider(),
        EffattnSegmentsProvider(),
        EffattnFlashDecodeProvider(),
        PredictorProvider("gate"),
        PredictorProvider("sparsefinder"),
    )
}
BASELINE = "naive"
