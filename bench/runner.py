"""The sweep: for every case and provider, validate the output, then time it and measure its memory.

Inputs are drawn once per problem (the modes of one problem share them, and the reference):
several input sets when one is smaller than a few times the last-level cache, rotated from call to
call so that a repeated call does not find its inputs in cache. A provider that cannot run a case
(its reasons, or an "unsupported" error), a wrong output, an out-of-memory and any other error each
become a row with the reason instead of a time; the sweep goes on. A time budget, once spent, and
Ctrl-C (SIGINT) turn the remaining rows into skipped rows, so that the files are still written.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields

import torch

from bench import harness
from bench.cases import Case
from bench.flops import attention_flops, tflops_per_s
from bench.providers import BASELINE, PROVIDERS, AttentionFn, unsupported_errors
from bench.validate import Inputs, Reference, check, compute_reference, provider_outputs

STATUS_OK = "ok"
STATUS_SKIPPED = "skipped"
STATUS_WRONG = "WRONG"
STATUS_OOM = "OOM"
STATUS_ERROR = "error"

# Input sets are rotated until together they are this many times the last-level cache ...
CACHE_MULTIPLE = 2
# ... but there are never more than this many.
MAX_INPUT_SETS = 8
# Cache size assumed when the machine does not say.
DEFAULT_CACHE_BYTES = 32 << 20
# Longest error message kept in a row.
MAX_REASON_CHARS = 300


@dataclass
class Row:
    """One provider on one case: a time and its derived rates, or a status and the reason."""

    provider: str
    mode: str
    dtype: str
    batch: int
    heads_q: int
    heads_kv: int
    seqlen_q: int
    seqlen_k: int
    headdim: int
    causal: bool
    device: str
    flops: int
    status: str = STATUS_OK
    reason: str = ""
    ms: float | None = None
    tflops: float | None = None
    peak_mib: float | None = None
    rel_err: float | None = None
    speedup_naive: float | None = None
    speedup_peer: float | None = None
    best_peer: str = ""

    @classmethod
    def for_case(cls, provider: str, case: Case) -> Row:
        flops = attention_flops(case.batch, case.heads_q, case.seqlen_q, case.seqlen_k, case.headdim, case.causal,
                                case.mode)
        return cls(provider=provider, flops=flops, **asdict(case))

    def case_key(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(Case))


@dataclass
class Progress:
    """One line per finished row on ``stream`` (stderr): count, elapsed time, provider, case, outcome."""

    total: int
    stream: object = field(default_factory=lambda: sys.stderr)
    enabled: bool = True
    done: int = 0
    start: float = field(default_factory=time.perf_counter)

    def report(self, case: Case, row: Row) -> None:
        self.done += 1
        if not self.enabled:
            return
        outcome = f"{row.ms:.3f} ms" if row.status == STATUS_OK else f"{row.status}: {row.reason}"
        width = len(str(self.total))
        print(f"[{self.done:>{width}}/{self.total} {time.perf_counter() - self.start:6.1f}s] "
              f"{row.provider:<15} {case.label()}: {outcome}", file=self.stream, flush=True)


def cache_bytes(device: str) -> int:
    """Size of the last-level cache: the GPU's L2 on CUDA, the largest CPU cache listed in sysfs on CPU."""
    if device == "cuda":
        return int(getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 0)
                   or DEFAULT_CACHE_BYTES)
    sizes = []
    for index in range(8):
        try:
            with open(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size") as f:
                text = f.read().strip()
        except OSError:
            break
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * unit)
    return max(sizes, default=DEFAULT_CACHE_BYTES)


def make_inputs(case: Case, seed: int) -> list[Inputs]:
    """Random input sets for ``case`` (leaves with ``requires_grad``), enough to rotate out of the cache."""
    shapes = {"q": (case.batch, case.heads_q, case.seqlen_q, case.headdim),
              "k": (case.batch, case.heads_kv, case.seqlen_k, case.headdim),
              "v": (case.batch, case.heads_kv, case.seqlen_k, case.headdim),
              "dout": (case.batch, case.heads_q, case.seqlen_q, case.headdim)}
    set_bytes = sum(math.prod(s) for s in shapes.values()) * case.torch_dtype.itemsize
    n_sets = min(MAX_INPUT_SETS, max(1, math.ceil(CACHE_MULTIPLE * cache_bytes(case.device) / set_bytes)))
    gen = torch.Generator(device=case.device).manual_seed(seed)

    def rand(name):
        x = torch.randn(shapes[name], generator=gen, device=case.device, dtype=case.torch_dtype)
        return x if name == "dout" else x.requires_grad_()

    return [Inputs(**{name: rand(name) for name in shapes}) for _ in range(n_sets)]


def timed_call(case: Case, attn: AttentionFn, sets: Sequence[Inputs]) -> Callable[[], object]:
    """The function to time: one call of ``case.mode``, on the next input set each time.

    ``fwd`` gets inputs that need no gradient (and runs under ``no_grad``: the caller's job); ``bwd``
    runs every set's forward here, once, and times ``autograd.grad`` on the kept graph.
    """
    if case.mode == "fwd":
        nxt = itertools.cycle([s.qkv_inference for s in sets]).__next__
        return lambda: attn(*nxt())
    if case.mode == "bwd":
        graphs = itertools.cycle([(attn(*s.qkv), s) for s in sets]).__next__

        def backward():
            out, s = graphs()
            return torch.autograd.grad(out, s.qkv, s.dout, retain_graph=True)

        return backward

    nxt = itertools.cycle(sets).__next__

    def forward_backward():
        s = nxt()
        return torch.autograd.grad(attn(*s.qkv), s.qkv, s.dout)

    return forward_backward


def _is_oom(error: BaseException) -> bool:
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and "can't allocate memory" in str(error)


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(error).__name__}: {first}"[:MAX_REASON_CHARS]


def _free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


class _Problem:
    """Inputs and reference of one problem, made when first needed."""

    def __init__(self, case: Case, seed: int):
        self.case, self.seed = case, seed
        self.sets: list[Inputs] | None = None
        self.ref: Reference | None = None

    def inputs(self) -> list[Inputs]:
        if self.sets is None:
            self.sets = make_inputs(self.case, self.seed)
        return self.sets

    def reference(self, case: Case) -> Reference:
        self.ref = compute_reference(case, self.inputs()[0], self.ref)
        return self.ref


def run_one(case: Case, provider_name: str, problem: _Problem, timing: harness.TimingConfig,
            requested: bool = False) -> Row:
    """Validate, time and measure one provider on one case."""
    row = Row.for_case(provider_name, case)
    provider = PROVIDERS[provider_name]
    reasons = provider.not_supported_reasons(case, requested=requested)
    if reasons:
        row.status, row.reason = STATUS_SKIPPED, "; ".join(reasons)
        return row
    try:
        sets = problem.inputs()
        ref = problem.reference(case)
    except Exception as e:
        row.status, row.reason = (STATUS_OOM if _is_oom(e) else STATUS_ERROR), "inputs/reference: " + _short(e)
        _free_memory(case.device)
        return row
    call = None
    failed = False
    try:
        attn = provider.build(case)
        row.rel_err, failure = check(case, provider_outputs(case, attn, sets[0]), ref)
        if failure:
            row.status, row.reason = STATUS_WRONG, failure
            return row
        call = timed_call(case, attn, sets)
        grad_mode = torch.no_grad() if case.mode == "fwd" else contextlib.nullcontext()
        with grad_mode:
            row.ms = harness.time_ms(call, case.device, timing)
            peak = harness.peak_memory_bytes(call, case.device)
        row.tflops = tflops_per_s(row.flops, row.ms)
        row.peak_mib = None if peak is None else peak / harness.MIB
    except unsupported_errors() as e:
        row.status, row.reason = STATUS_SKIPPED, str(e).replace("\n", " ")[:MAX_REASON_CHARS]
    except Exception as e:
        row.status, row.reason = (STATUS_OOM if _is_oom(e) else STATUS_ERROR), _short(e)
        row.ms = row.tflops = row.peak_mib = None
        failed = True
    del call
    if failed:  # after the except block, so that the traceback no longer holds the tensors
        _free_memory(case.device)
    return row


def run_sweep(cases: Sequence[Case], providers: Sequence[str], *, timing: harness.TimingConfig,
              requested: Sequence[str] = (), time_budget_s: float | None = None, seed: int = 0,
              progress: bool = True) -> list[Row]:
    """Rows for every (case, provider), in case order; speed-ups filled in at the end.

    ``requested``: providers named on the command line (runs what they would otherwise decline, such
    as flex on CPU). ``time_budget_s``: once spent, remaining rows are skipped.
    """
    items = [(case, name) for case in cases for name in providers]
    meter = Progress(total=len(items), enabled=progress)
    start = time.perf_counter()
    rows: list[Row] = []
    problems: dict[Case, _Problem] = {}
    try:
        for case, name in items:
            problem = problems.get(case.problem)
            if problem is None:
                for old in problems.values():  # one problem's tensors in memory at a time
                    old.sets = old.ref = None
                problems = {case.problem: _Problem(case, seed + len(rows))}
                problem = problems[case.problem]
            if time_budget_s is not None and time.perf_counter() - start > time_budget_s:
                row = Row.for_case(name, case)
                row.status, row.reason = STATUS_SKIPPED, f"time budget of {time_budget_s:g} s spent"
            else:
                row = run_one(case, name, problem, timing, requested=name in requested)
            rows.append(row)
            meter.report(case, row)
    except KeyboardInterrupt:
        for case, name in items[len(rows):]:
            row = Row.for_case(name, case)
            row.status, row.reason = STATUS_SKIPPED, "interrupted"
            rows.append(row)
        print(f"interrupted: {len(items) - meter.done} rows not run", file=sys.stderr)
    problems.clear()
    add_speedups(rows)
    return rows


def add_speedups(rows: Sequence[Row]) -> None:
    """Fill ``speedup_naive`` (naive's time / this time) and ``speedup_peer`` (best peer's time / this time)."""
    by_case: dict[tuple, list[Row]] = {}
    for row in rows:
        by_case.setdefault(row.case_key(), []).append(row)
    for group in by_case.values():
        ok = [r for r in group if r.status == STATUS_OK]
        naive = next((r for r in ok if r.provider == BASELINE), None)
        peers = [r for r in ok if PROVIDERS[r.provider].peer]
        best = min(peers, key=lambda r: r.ms, default=None)
        for r in ok:
            if naive is not None:
                r.speedup_naive = naive.ms / r.ms
            if best is not None:
                r.speedup_peer = best.ms / r.ms
                r.best_peer = best.provider
