"""Benchmark cases, the named presets and the sweep that expands a preset into cases.

A case is one attention problem ``q (B, Hq, Tq, D)``, ``k, v (B, Hkv, Tk, D)`` in one dtype, dense or
causal (bottom-right aligned), timed in one mode: ``fwd``, ``bwd`` (the backward alone, its forward
run outside the timed region) or ``fwd+bwd``. GQA cases have ``Hq = G * Hkv`` with ``G`` from ``gqa``.
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

    def label(self) -> str:
        kind = "causal" if self.causal else "dense"
        gqa = f" gqa{self.gqa}" if self.gqa > 1 else ""
        return (f"{self.mode} {self.dtype} B={self.batch} H={self.heads_q}/{self.heads_kv} "
                f"T={self.seqlen_q}/{self.seqlen_k} D={self.headdim} {kind}{gqa}")


@dataclass(frozen=True)
class Sweep:
    """The axes of a sweep (a preset, possibly overridden from the command line).

    ``tokens``, when set, replaces ``batch``: ``B = max(1, tokens // T)`` (FlashAttention's benchmarks
    hold ``B * T`` at 16k tokens). ``model_dim``, when set, replaces ``heads``: ``Hq = model_dim // D``.
    """

    name: str
    description: str
    seqlens: tuple[int, ...]
    headdims: tuple[int, ...]
    dtypes: tuple[str, ...]
    causal: tuple[bool, ...]
    modes: tuple[str, ...]
    batch: tuple[int, ...] = (1,)
    heads: tuple[int, ...] = (4,)
    gqa: tuple[int, ...] = (1,)
    tokens: int | None = None
    model_dim: int | None = None
    timing: TimingConfig = TimingConfig()
    time_budget_s: float | None = None

    def batches_for(self, seqlen: int) -> tuple[int, ...]:
        return (max(1, self.tokens // seqlen),) if self.tokens else self.batch

    def heads_for(self, headdim: int) -> tuple[int, ...]:
        return (max(1, self.model_dim // headdim),) if self.model_dim else self.heads


# Tokens per batch (B * T) and model width (Hq * D) of FlashAttention's own benchmarks.
FA_BENCH_TOKENS = 16 * 1024
FA_BENCH_MODEL_DIM = 2048
KI = 1024

PRESETS: dict[str, Sweep] = {
    preset.name: preset
    for preset in (
        Sweep(
            name="quick",
            description="CPU-sized: dense, causal and GQA at T=256 and 1024, fp32, fwd and fwd+bwd (under a minute)",
            seqlens=(256, KI), headdims=(64,), dtypes=("fp32",), causal=(False, True), modes=("fwd", "fwd+bwd"),
            batch=(1,), heads=(4,), gqa=(1, 4), timing=TimingConfig(cpu_min_run_time_s=0.2),
        ),
        Sweep(
            name="tiny",
            description="test-suite size: dense, causal and GQA at T=64 and 128, fwd and fwd+bwd, a few seconds",
            seqlens=(64, 128), headdims=(32,), dtypes=("fp32",), causal=(False, True),
            modes=("fwd", "fwd+bwd"), batch=(1,), heads=(4,), gqa=(1, 4),
            timing=TimingConfig(cpu_min_run_time_s=0.005, cuda_warmup_ms=2.0, cuda_rep_ms=5.0),
        ),
        Sweep(
            name="h100",
            description=("GPU: bf16, D=64/128, T=1k/4k/16k with B*T=16k tokens and Hq*D=2048, dense and "
                         "causal, fwd and fwd+bwd; time-boxed to 100 s (a full sweep took 200 s on an H100)"),
            seqlens=(KI, 4 * KI, 16 * KI), headdims=(64, 128), dtypes=("bf16",),
            causal=(False, True), modes=("fwd", "fwd+bwd"), tokens=FA_BENCH_TOKENS, model_dim=FA_BENCH_MODEL_DIM,
            timing=TimingConfig(cuda_warmup_ms=10.0, cuda_rep_ms=50.0), time_budget_s=100.0,
        ),
    )
}
DEFAULT_PRESET = "quick"


def expand(sweep: Sweep, device: str) -> list[Case]:
    """All cases of ``sweep`` on ``device``, the modes of one problem next to each other.

    Order: dtype, head dim, causal, GQA, heads, sequence length, batch, mode.
    Raises ValueError when a head count is not a multiple of a GQA group size.
    """
    cases = []
    for dtype in sweep.dtypes:
        for headdim in sweep.headdims:
            for causal in sweep.causal:
                for gqa in sweep.gqa:
                    for heads in sweep.heads_for(headdim):
                        if heads % gqa:
                            raise ValueError(f"--heads {heads} is not a multiple of --gqa {gqa}")
                        for seqlen in sweep.seqlens:
                            for batch in sweep.batches_for(seqlen):
                                for mode in sweep.modes:
                                    cases.append(Case(batch=batch, heads_q=heads, heads_kv=heads // gqa,
                                                      seqlen_q=seqlen, seqlen_k=seqlen, headdim=headdim,
                                                      dtype=dtype, causal=causal, mode=mode, device=device))
    return cases
