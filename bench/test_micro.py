"""Micro-benchmarks (pytest-benchmark): effattn against naive and torch SDPA at small sizes, for the
attention, pooled and block-sparse ops.

Not part of the test suite (``pytest tests/``). Run from the repository root::

    PYTHONPATH=. python -m pytest bench/ --benchmark-json=bench/out/micro.json

The device is CUDA when present (float16 there, float32 on CPU); ``BENCH_DEVICE=cpu`` forces the CPU.
Every provider's output (and gradients, for ``fwd+bwd``) is checked against the reference before it
is timed, and its inputs rotate as in ``python -m bench``. Each benchmark records its FLOP count,
and its TFLOP/s at the median, in ``extra_info``.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

from bench.cases import Case
from bench.flops import tflops_per_s
from bench.ops import OPS
from bench.providers import PROVIDERS
from bench.runner import make_inputs, timed_call
from bench.validate import check, compute_reference, provider_outputs

pytest.importorskip("pytest_benchmark")

DEVICE = os.environ.get("BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = "fp16" if DEVICE == "cuda" else "fp32"
BATCH, HEADS, HEADDIM = 1, 4, 64
SEQLENS = (256, 1024)
MODES = ("fwd", "fwd+bwd")
MICRO_PROVIDERS = ("naive", "sdpa", "effattn")
SEED = 0
# (op, causal, stride, pattern, sparsity, block) of each micro-benchmarked variant.
VARIANTS = {
    "dense": dict(op="attention"),
    "causal": dict(op="attention", causal=True),
    "pooled2": dict(op="pooled", stride=2),
    "sparse90": dict(op="sparse", pattern="random", sparsity=0.9, block=64),
    "documents": dict(op="sparse", pattern="documents", block=64),
}


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seqlen", SEQLENS)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("provider", MICRO_PROVIDERS)
def test_attention(benchmark, provider, variant, seqlen, mode):
    case = Case(batch=BATCH, heads_q=HEADS, heads_kv=HEADS, seqlen_q=seqlen, seqlen_k=seqlen, headdim=HEADDIM,
                dtype=DTYPE, mode=mode, device=DEVICE, **{"causal": False, **VARIANTS[variant]})
    reasons = PROVIDERS[provider].not_supported_reasons(case)
    if reasons:
        pytest.skip("; ".join(reasons))
    op = OPS[case.op]
    context = op.context(case)
    sets = make_inputs(case, SEED)
    attn = PROVIDERS[provider].build(case, context, sets[0])
    reference = compute_reference(case, sets[0], context)
    _, failure = check(case, provider_outputs(case, attn, sets[0]), reference)
    assert failure is None, f"{provider} on {case.label()}: {failure}"

    call = timed_call(case, attn, sets)
    grad_mode = torch.no_grad if mode == "fwd" else contextlib.nullcontext

    def run():
        with grad_mode():
            call()
        _sync()

    flops = op.cost(case, context).flops(mode)
    benchmark.group = f"{mode} {variant} T={seqlen} {DTYPE} {DEVICE}"
    benchmark.extra_info.update(case=case.label(), flops=flops)
    benchmark(run)
    if benchmark.stats is not None:  # None under --benchmark-disable (one plain call)
        benchmark.extra_info["tflops_at_median"] = tflops_per_s(flops, benchmark.stats.stats.median * 1e3)
