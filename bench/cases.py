"""Benchmark cases, the named presets and the sweep that expands a preset into cases.

A case is one problem of one op in one dtype, timed in one mode: ``fwd``, ``bwd`` (the backward alone,
its forward run outside the timed region) or ``fwd+bwd``. The ops (:mod:`bench.ops` says what each
computes and counts):

* ``attention``: ``q (B, Hq, Tq, D)``, ``k, v (B, Hkv, Tk, D)``, dense or causal (bottom-right
  aligned); GQA cases have ``Hq = G * Hkv`` with ``G`` from ``gqa``.
* ``pooled``: Funnel's pool-query-only attention: q, k, v ``(B, H, T, D)``, the queries mean-pooled
  with ``stride`` ([cls] kept apart, truncated), keys and values at full length.
* ``sparse``: block-sparse attention over a :class:`effattn.BlockMask` of ``pattern`` (``random``
  at ``sparsity``, the share of blocks cut; ``causal``, ``sliding``, ``documents``, ``bigbird``)
  with square blocks of ``block`` tokens.
* ``funnel``: one Funnel relative-attention layer (d_model = ``H * D``) at its pooling block
  (``stride`` 2): hidden states ``(B, T, H * D)`` in, ``(B, Tp, H * D)`` out; ``pattern`` is Hugging
  Face's attention type (``relative_shift`` or ``factorized``, the same function computed two ways).
* ``funnel-model``: a whole Hugging Face ``FunnelBaseModel`` (d_model = ``H * D``, ``H`` heads of ``D``,
  d_inner 4 d_model, block_sizes [2, 2]: 4 layers, the third pools with ``stride`` 2): input embeddings
  ``(B, T, d_model)`` in, the last hidden state out; ``pattern`` as for ``funnel``.
* ``varlen``: ``B`` packed sequences of mixed lengths (at most ``T``; :func:`bench.ops.varlen_lengths`),
  q, k, v ``(total, H, D)`` (flash-attn's varlen layout), dense or causal within each sequence.
* ``decode``: one query per sequence against a KV cache of ``T`` keys (``Tq = 1``), GQA: q ``(B, Hq, 1, D)``,
  k, v ``(B, Hkv, T, D)``; forward only.
* ``predict``: block-mask prediction from ``q, k (B, H, T, D)`` keeping ``1 - sparsity`` of the kv
  blocks per query block (forward only).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from bench.harness import TimingConfig

DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
MODES = ("fwd", "bwd", "fwd+bwd")
CAUSAL_CHOICES: dict[str, tuple[bool, ...]] = {"false": (False,), "true": (True,), "both": (False, True)}
DEVICES = ("auto", "cpu", "cuda")
OP_NAMES = ("attention", "pooled", "sparse", "funnel", "funnel-model", "varlen", "decode", "predict")
# The ops of the Funnel-Transformer: one attention layer, a whole model.
FUNNEL_OPS = ("funnel", "funnel-model")
PATTERNS = ("random", "causal", "sliding", "documents", "bigbird")
# Hugging Face's two implementations of Funnel's relative attention (the same function, other work).
FUNNEL_TYPES = ("relative_shift", "factorized")
# Ops whose every case is forward only (no gradient through a predicted mask).
FORWARD_ONLY_OPS = ("predict", "decode")


@dataclass(frozen=True)
class Case:
    """One problem in one mode on one device (``dtype`` is a key of :data:`DTYPES`)."""

    batch: int
    heads_q: int
    heads_kv: int
    seqlen_q: int
    seqlen_k: int
    headdim: int
    dtype: str
    causal: bool
    mode: str
    device: str
    op: str = "attention"
    stride: int = 1
    pattern: str = ""
    sparsity: float = 0.0
    block: int = 0

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def gqa(self) -> int:
        """Query heads per KV head (1 = multi-head attention)."""
        return self.heads_q // self.heads_kv

    @property
    def problem(self) -> Case:
        """The case with the mode blanked: cases of one problem share inputs and reference."""
        return dataclasses.replace(self, mode="")

    @property
    def needs_grad(self) -> bool:
        return self.mode != "fwd"

    def op_label(self) -> str:
        """The op and its parameters: ``attention``, ``pooled/2``, ``sparse random 0.9 b64``, ``funnel/2``."""
        if self.op in FUNNEL_OPS and self.pattern not in ("", FUNNEL_TYPES[0]):
            return f"{self.op}/{self.stride} {self.pattern}"
        if self.op in ("pooled", *FUNNEL_OPS):
            return f"{self.op}/{self.stride}"
        if self.op == "sparse":
            what = f"random {self.sparsity:g}" if self.pattern == "random" else self.pattern
            return f"sparse {what} b{self.block}"
        if self.op == "predict":
            return f"predict {self.sparsity:g} b{self.block}"
        return self.op

    def label(self) -> str:
        kind = "causal" if self.causal else "dense"
        gqa = f" gqa{self.gqa}" if self.gqa > 1 else ""
        op = "" if self.op == "attention" else f"{self.op_label()} "
        return (f"{op}{self.mode} {self.dtype} B={self.batch} H={self.heads_q}/{self.heads_kv} "
                f"T={self.seqlen_q}/{self.seqlen_k} D={self.headdim} {kind}{gqa}")


@dataclass(frozen=True)
class Sweep:
    """The axes of a sweep (a preset, possibly overridden from the command line).

    ``tokens``, when set, replaces ``batch``: ``B = max(1, tokens // T)`` (FlashAttention's benchmarks
    hold ``B * T`` at 16k tokens). ``model_dim``, when set, replaces ``heads``: ``Hq = model_dim // D``.
    ``parts``: more sweeps whose cases follow this one's (a preset that is not one product of axes,
    such as a few rows in another dtype); an axis given on the command line replaces theirs too
    (:meth:`replace`), and a case that two parts share is run once. Their ``timing`` and
    ``time_budget_s`` are this sweep's.
    """

    seqlens: tuple[int, ...]
    headdims: tuple[int, ...]
    dtypes: tuple[str, ...]
    causal: tuple[bool, ...]
    modes: tuple[str, ...]
    name: str = ""
    description: str = ""
    batch: tuple[int, ...] = (1,)
    heads: tuple[int, ...] = (4,)
    gqa: tuple[int, ...] = (1,)
    tokens: int | None = None
    model_dim: int | None = None
    ops: tuple[str, ...] = ("attention",)
    strides: tuple[int, ...] = (2,)
    patterns: tuple[str, ...] = ("random",)
    sparsities: tuple[float, ...] = (0.5, 0.9)
    block: int = 64
    funnel_types: tuple[str, ...] = (FUNNEL_TYPES[0],)
    timing: TimingConfig = TimingConfig()
    time_budget_s: float | None = None
    parts: tuple[Sweep, ...] = ()

    def batches_for(self, seqlen: int) -> tuple[int, ...]:
        return (max(1, self.tokens // seqlen),) if self.tokens else self.batch

    def heads_for(self, headdim: int) -> tuple[int, ...]:
        return (max(1, self.model_dim // headdim),) if self.model_dim else self.heads

    def replace(self, **changes) -> Sweep:
        """This sweep and its parts with ``changes`` (axes given on the command line) applied to each, but for
        ``ops``: it replaces this sweep's, and a part keeps only those of its ops that it names (a part left
        with none is dropped), so that ``--op sparse`` on a preset runs the sparse cases of every part."""
        parts = []
        for part in self.parts:
            if "ops" in changes:
                kept = tuple(op for op in part.ops if op in changes["ops"])
                if not kept:
                    continue
                part = part.replace(**{**changes, "ops": kept})
            else:
                part = part.replace(**changes)
            parts.append(part)
        return dataclasses.replace(self, **changes, parts=tuple(parts))


# Funnel's pooling layers halve the sequence.
FUNNEL_STRIDE = 2
# Tokens per batch (B * T) and model width (Hq * D) of FlashAttention's own benchmarks.
FA_BENCH_TOKENS = 16 * 1024
FA_BENCH_MODEL_DIM = 2048
KI = 1024
# The structured sparse patterns (every one but random).
STRUCTURED = PATTERNS[1:]
# Kept shares 1, 1/2, 1/4, 1/10, 1/20 of a sparse sweep against density.
DENSITY_SPARSITIES = (0.0, 0.5, 0.75, 0.9, 0.95)
# Funnel-Transformer's base size: d_model 768 = 12 heads of 64.
FUNNEL_BASE_HEADS = 12
# Sequences of a varlen case in the quick preset; KV-cache lengths of its decoding rows.
VARLEN_SEQS = 8
DECODE_CACHE_LENS = (4 * 1024, 16 * 1024, 32 * 1024)
# Ops that only a preset's parts run (their sizes are their own).
PART_ONLY_OPS = ("funnel-model", "varlen", "decode")
CPU_TIMING = TimingConfig(cpu_min_run_time_s=0.05)
GPU_TIMING = TimingConfig(cuda_warmup_ms=10.0, cuda_rep_ms=50.0)

PRESETS: dict[str, Sweep] = {
    preset.name: preset
    for preset in (
        Sweep(
            name="quick",
            description=("CPU-sized, fp32, B=1, H=8, D=64, fwd and fwd+bwd: at T=1k and 2k attention (dense, causal), "
                         "pooled (stride 2), sparse (random, 50 and 90 % of the 64x64 blocks cut); at T=1k also "
                         "GQA, pooled stride 4, sparse documents, the Funnel layer, mask prediction, and one dense "
                         "forward row each in fp16 and bf16; then T=2k; 8 packed sequences of mixed lengths up to "
                         "1k (varlen); decoding one query (32 heads, 8 KV heads, D=128) against caches of 4k-32k; "
                         "last the whole Funnel base model (d_model 768, 12 heads) at T=1k; time-boxed to 420 s"),
            seqlens=(KI,), headdims=(64,), dtypes=("fp32",), causal=(False, True), modes=("fwd", "fwd+bwd"),
            batch=(1,), heads=(8,), gqa=(1, 4), ops=tuple(op for op in OP_NAMES if op not in PART_ONLY_OPS),
            strides=(2, 4), patterns=("random", "documents"),
            sparsities=(0.5, 0.9), block=64, timing=CPU_TIMING, time_budget_s=420.0,
            parts=(
                Sweep(seqlens=(KI,), headdims=(64,), dtypes=("fp16", "bf16"), causal=(False,), modes=("fwd",),
                      heads=(8,)),
                Sweep(seqlens=(2 * KI,), headdims=(64,), dtypes=("fp32",), causal=(False, True),
                      modes=("fwd", "fwd+bwd"), heads=(8,), ops=("attention", "pooled", "sparse"), strides=(2,),
                      patterns=("random",), sparsities=(0.5, 0.9)),
                Sweep(seqlens=(KI,), headdims=(64,), dtypes=("fp32",), causal=(False, True), modes=("fwd", "fwd+bwd"),
                      batch=(VARLEN_SEQS,), heads=(8,), ops=("varlen",)),
                Sweep(seqlens=DECODE_CACHE_LENS, headdims=(128,), dtypes=("fp32",), causal=(False,), modes=("fwd",),
                      batch=(1,), heads=(32,), gqa=(4,), ops=("decode",)),
                Sweep(seqlens=(KI,), headdims=(64,), dtypes=("fp32",), causal=(False,), modes=("fwd", "fwd+bwd"),
                      heads=(FUNNEL_BASE_HEADS,), ops=("funnel-model",)),
            ),
        ),
        Sweep(
            name="tiny",
            description="test-suite size: every op at T=64 and 128, D=32, blocks of 16, fwd and fwd+bwd, seconds",
            seqlens=(64, 128), headdims=(32,), dtypes=("fp32",), causal=(False, True),
            modes=("fwd", "fwd+bwd"), batch=(1,), heads=(4,), gqa=(1, 4), ops=OP_NAMES, strides=(2,),
            patterns=("random", "documents"), sparsities=(0.5,), block=16,
            timing=TimingConfig(cpu_min_run_time_s=0.005, cuda_warmup_ms=2.0, cuda_rep_ms=5.0),
        ),
        Sweep(
            name="sparse",
            description=("CPU-sized block-sparse sweep: time against the kept share of 64x64 blocks (random masks "
                         "keeping 1, 1/2, 1/4, 1/10, 1/20; causal, sliding, documents, BigBird) next to dense "
                         "attention, and each mask's build time; fp32, B=1, H=2, T=512 and 1k, D=64"),
            seqlens=(KI // 2, KI), headdims=(64,), dtypes=("fp32",), causal=(False,), modes=("fwd", "fwd+bwd"),
            heads=(2,), ops=("attention", "sparse"), patterns=PATTERNS, sparsities=DENSITY_SPARSITIES, block=64,
            timing=CPU_TIMING,
        ),
        Sweep(
            name="funnel",
            description=("CPU-sized Funnel sweep: pooled attention (stride 2; in the kernel, pooled first, SDPA) at "
                         "B=1, H=4, T=512 and 2k, D=64, and the Funnel layer (d_model 256, both of Hugging Face's "
                         "attention types) at T=256 and 1k; fp32, fwd and fwd+bwd"),
            seqlens=(KI // 2, 2 * KI), headdims=(64,), dtypes=("fp32",), causal=(False,), modes=("fwd", "fwd+bwd"),
            heads=(4,), ops=("pooled",), strides=(FUNNEL_STRIDE,), timing=CPU_TIMING,
            parts=(Sweep(seqlens=(KI // 4, KI), headdims=(64,), dtypes=("fp32",), causal=(False,),
                         modes=("fwd", "fwd+bwd"), heads=(4,), ops=("funnel",), funnel_types=FUNNEL_TYPES),),
        ),
        Sweep(
            name="h100",
            description=("GPU: attention, bf16, D=64/128, T=1k/4k/16k with B*T=16k tokens and Hq*D=2048, dense "
                         "and causal, fwd and fwd+bwd; time-boxed to 100 s (a full sweep took 200 s on an H100)"),
            seqlens=(KI, 4 * KI, 16 * KI), headdims=(64, 128), dtypes=("bf16",),
            causal=(False, True), modes=("fwd", "fwd+bwd"), tokens=FA_BENCH_TOKENS, model_dim=FA_BENCH_MODEL_DIM,
            timing=GPU_TIMING, time_budget_s=100.0,
        ),
        Sweep(
            name="h100-ops",
            description=("GPU: pooled (stride 2, 4), sparse (random 50/90/97 %, sliding, documents, bigbird; "
                         "blocks of 64), Funnel layer, mask prediction; bf16, D=64, T=4k/16k with B*T=16k "
                         "tokens and Hq*D=1024, fwd and fwd+bwd; time-boxed to 150 s"),
            seqlens=(4 * KI, 16 * KI), headdims=(64,), dtypes=("bf16",), causal=(False,),
            modes=("fwd", "fwd+bwd"), tokens=FA_BENCH_TOKENS, model_dim=FA_BENCH_MODEL_DIM // 2,
            ops=("pooled", "sparse", "funnel", "predict"), strides=(2, 4),
            patterns=("random", "sliding", "documents", "bigbird"), sparsities=(0.5, 0.9, 0.97), block=64,
            timing=GPU_TIMING, time_budget_s=150.0,
        ),
        Sweep(
            name="h100-sparse",
            description=("GPU block-sparse sweep against density: B=4, H=16, T=4k and 16k, D=64 and 128, bf16, "
                         "blocks of 64, random masks keeping 1 to 1/20 of the blocks and the structured ones, next "
                         "to dense attention; time-boxed to 90 s"),
            seqlens=(4 * KI, 16 * KI), headdims=(64, 128), dtypes=("bf16",), causal=(False,),
            modes=("fwd", "fwd+bwd"), batch=(4,), heads=(16,), ops=("attention", "sparse"), patterns=PATTERNS,
            sparsities=DENSITY_SPARSITIES, block=64, timing=GPU_TIMING, time_budget_s=90.0,
        ),
        Sweep(
            name="h100-funnel",
            description=("GPU Funnel sweep: pooled attention (stride 2) with B*T=8k tokens, H=16, T=1k/4k/16k, "
                         "D=64/128, and the Funnel layer (d_model 768, 12 heads, both attention types) with "
                         "B*T=4k tokens at T=512 and 2k; bf16, fwd and fwd+bwd; time-boxed to 90 s"),
            seqlens=(KI, 4 * KI, 16 * KI), headdims=(64, 128), dtypes=("bf16",), causal=(False,),
            modes=("fwd", "fwd+bwd"), tokens=8 * KI, heads=(16,), ops=("pooled",), strides=(FUNNEL_STRIDE,),
            timing=GPU_TIMING, time_budget_s=90.0,
            parts=(Sweep(seqlens=(KI // 2, 2 * KI), headdims=(64,), dtypes=("bf16",), causal=(False,),
                         modes=("fwd", "fwd+bwd"), tokens=4 * KI, heads=(12,), ops=("funnel",),
                         funnel_types=FUNNEL_TYPES),),
        ),
        Sweep(
            name="h100-varlen",
            description=("GPU varlen and decoding: 16 packed sequences of mixed lengths up to 4k (varlen; dense and "
                         "causal, fwd and fwd+bwd), then one query per sequence (B=1 and 8) against caches of "
                         "4k-32k (decode, 32 heads, 8 KV heads); bf16, D=128; time-boxed to 90 s"),
            seqlens=(4 * KI,), headdims=(128,), dtypes=("bf16",), causal=(False, True), modes=("fwd", "fwd+bwd"),
            batch=(16,), heads=(16,), ops=("varlen",), timing=GPU_TIMING, time_budget_s=90.0,
            parts=(Sweep(seqlens=DECODE_CACHE_LENS, headdims=(128,), dtypes=("bf16",), causal=(False,),
                         modes=("fwd",), batch=(1, 8), heads=(32,), gqa=(4,), ops=("decode",)),),
        ),
    )
}
DEFAULT_PRESET = "quick"


def _variants(sweep: Sweep, op: str) -> list[dict]:
    """The op's own axes: ``causal``, ``gqa``, ``stride``, ``pattern``, ``sparsity``, ``block`` of each variant."""
    if op == "attention":
        return [dict(causal=c, gqa=g) for c in sweep.causal for g in sweep.gqa]
    if op == "pooled":
        return [dict(stride=s) for s in sweep.strides]
    if op in FUNNEL_OPS:
        return [dict(stride=FUNNEL_STRIDE, pattern=t) for t in sweep.funnel_types]
    if op == "sparse":
        return [dict(pattern=p, sparsity=s if p == "random" else 0.0, block=sweep.block)
                for p in sweep.patterns for s in (sweep.sparsities if p == "random" else (0.0,))]
    if op == "predict":
        return [dict(sparsity=s, block=sweep.block) for s in sweep.sparsities]
    if op == "varlen":
        return [dict(causal=c) for c in sweep.causal]
    if op == "decode":
        return [dict(gqa=g, seqlen_q=1) for g in sweep.gqa]
    raise ValueError(f"op must be one of {OP_NAMES}, got {op!r}")


def expand(sweep: Sweep, device: str) -> list[Case]:
    """All cases of ``sweep`` and then of its parts on ``device``, the modes of one problem next to each other,
    each case once.

    Order within a sweep: op, dtype, head dim, the op's own axes (causal and GQA; stride; pattern and
    sparsity; Funnel attention type), heads, sequence length, batch, mode. Only ``attention`` has GQA
    and causal cases (``varlen`` causal, ``decode`` GQA, its ``Tq`` 1); ``predict`` and ``decode`` are forward
    only (no case when the sweep's modes have no ``fwd``).
    Raises ValueError when a head count is not a multiple of a GQA group size.
    """
    cases = []
    for op in sweep.ops:
        modes = tuple(m for m in sweep.modes if m == "fwd") if op in FORWARD_ONLY_OPS else sweep.modes
        for dtype in sweep.dtypes:
            for headdim in sweep.headdims:
                for variant in _variants(sweep, op):
                    gqa = variant.pop("gqa", 1)
                    for heads in sweep.heads_for(headdim):
                        if heads % gqa:
                            raise ValueError(f"--heads {heads} is not a multiple of --gqa {gqa}")
                        for seqlen in sweep.seqlens:
                            for batch in sweep.batches_for(seqlen):
                                for mode in modes:
                                    fields = dict(batch=batch, heads_q=heads, heads_kv=heads // gqa, seqlen_q=seqlen,
                                                  seqlen_k=seqlen, headdim=headdim, dtype=dtype, mode=mode,
                                                  device=device, op=op, causal=False)
                                    cases.append(Case(**{**fields, **variant}))
    for part in sweep.parts:
        cases += expand(part, device)
    return list(dict.fromkeys(cases))
