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
from bench.flops import tflops_per_s
from bench.ops import OPS, Cost, Reference
from bench.providers import BASELINE, PROVIDERS, AttentionFn, unsupported_errors
from bench.validate import Inputs, check, compute_reference, grad_targets, provider_outputs

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
# Characters of the progress bar.
PROGRESS_BAR_WIDTH = 20
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
    op: str
    stride: int
    pattern: str
    sparsity: float
    block: int
    flops: int
    bytes: int
    status: str = STATUS_OK
    reason: str = ""
    ms: float | None = None
    tflops: float | None = None
    gbps: float | None = None
    kept: float | None = None
    mask_ms: float | None = None
    peak_mib: float | None = None
    rel_err: float | None = None
    speedup_naive: float | None = None
    speedup_peer: float | None = None
    best_peer: str = ""

    @classmethod
    def for_case(cls, provider: str, case: Case, cost: Cost) -> Row:
        return cls(provider=provider, flops=cost.flops(case.mode), bytes=cost.bytes(case.mode), **asdict(case))

    def case_key(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(Case))

    def case(self) -> Case:
        return Case(*self.case_key())


@dataclass
class Progress:
    """One line per finished row on ``stream`` (stderr): a bar, count, elapsed and remaining time, provider,
    case, outcome. The remaining time is the mean time per row so far times the rows left."""

    total: int
    stream: object = field(default_factory=lambda: sys.stderr)
    enabled: bool = True
    done: int = 0
    start: float = field(default_factory=time.perf_counter)

    def bar(self) -> str:
        filled = PROGRESS_BAR_WIDTH * self.done // max(1, self.total)
        elapsed = time.perf_counter() - self.start
        left = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        width = len(str(self.total))
        return (f"[{'#' * filled}{'.' * (PROGRESS_BAR_WIDTH - filled)}] {self.done:>{width}}/{self.total} "
                f"{elapsed:6.1f}s, ~{left:.0f}s left")

    def report(self, case: Case, row: Row) -> None:
        self.done += 1
        if not self.enabled:
            return
        outcome = f"{row.ms:.3f} ms" if row.status == STATUS_OK else f"{row.status}: {row.reason}"
        print(f"{self.bar()} {row.provider:<14} {case.label()}: {outcome}", file=self.stream, flush=True)


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
    """Random input sets for ``case`` (the op's args, leaves with ``requires_grad`` where the op has a
    backward, and ``dout``), enough to rotate out of the cache."""
    shapes = OPS[case.op].shapes(case)
    set_bytes = sum(math.prod(s) for s in shapes.values() if s is not None) * case.torch_dtype.itemsize
    n_sets = min(MAX_INPUT_SETS, max(1, math.ceil(CACHE_MULTIPLE * cache_bytes(case.device) / set_bytes)))
    gen = torch.Generator(device=case.device).manual_seed(seed)

    def rand(shape, grad):
        x = torch.randn(shape, generator=gen, device=case.device, dtype=case.torch_dtype)
        return x.requires_grad_() if grad else x

    sets = []
    for _ in range(n_sets):
        args = tuple(rand(shape, shapes["dout"] is not None) for name, shape in shapes.items() if name != "dout")
        sets.append(Inputs(args=args, dout=None if shapes["dout"] is None else rand(shapes["dout"], False)))
    return sets


def timed_call(case: Case, fn: AttentionFn, sets: Sequence[Inputs]) -> Callable[[], object]:
    """The function to time: one call of ``case.mode``, on the next input set each time.

    ``fwd`` gets inputs that need no gradient (and runs under ``no_grad``: the caller's job); ``bwd``
    runs every set's forward here, once, and times ``autograd.grad`` on the kept graph. A backward
    differentiates the args and the provider's weights, if it has any (:func:`bench.validate.grad_targets`).
    """
    if case.mode == "fwd":
        nxt = itertools.cycle([s.args_inference for s in sets]).__next__
        return lambda: fn(*nxt())
    if case.mode == "bwd":
        graphs = itertools.cycle([(fn(*s.args), s) for s in sets]).__next__

        def backward():
            out, s = graphs()
            return torch.autograd.grad(out, grad_targets(fn, s.args), s.dout, retain_graph=True)

        return backward

    nxt = itertools.cycle(sets).__next__

    def forward_backward():
        s = nxt()
        return torch.autograd.grad(fn(*s.args), grad_targets(fn, s.args), s.dout)

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
    """Context, cost, inputs and reference of one problem, each made when first needed."""

    def __init__(self, case: Case, seed: int):
        self.case, self.seed = case, seed
        self.sets: list[Inputs] | None = None
        self.ref: Reference | None = None
        self._context = self._cost = self._context_ms = None
        self._has_context = self._has_context_ms = False

    def context(self) -> object:
        if not self._has_context:
            self._context, self._has_context = OPS[self.case.op].context(self.case), True
        return self._context

    def context_ms(self, timing: harness.TimingConfig) -> float | None:
        """Time to build the context, measured once per problem (None where the op has nothing to build)."""
        if not self._has_context_ms:
            self._context_ms, self._has_context_ms = OPS[self.case.op].context_ms(self.case, timing), True
        return self._context_ms

    def cost(self) -> Cost:
        if self._cost is None:
            self._cost = OPS[self.case.op].cost(self.case, self.context())
        return self._cost

    def inputs(self) -> list[Inputs]:
        if self.sets is None:
            self.sets = make_inputs(self.case, self.seed)
        return self.sets

    def reference(self, case: Case) -> Reference:
        self.ref = compute_reference(case, self.inputs()[0], self.context(), self.ref)
        return self.ref

    def release(self) -> None:
        self.sets = self.ref = self._context = None
        self._has_context = False


def run_one(case: Case, provider_name: str, problem: _Problem, timing: harness.TimingConfig,
            requested: bool = False) -> Row:
    """Validate, time and measure one provider on one case."""
    row = Row.for_case(provider_name, case, _safe_cost(problem))
    provider = PROVIDERS[provider_name]
    reasons = provider.not_supported_reasons(case, requested=requested)
    if reasons:
        row.status, row.reason = STATUS_SKIPPED, "; ".join(reasons)
        return row
    try:
        problem.cost()
        sets = problem.inputs()
        ref = problem.reference(case)
    except Exception as e:
        row.status, row.reason = (STATUS_OOM if _is_oom(e) else STATUS_ERROR), "inputs/reference: " + _short(e)
        _free_memory(case.device)
        return row
    call = None
    failed = False
    try:
        fn = provider.build(case, problem.context(), sets[0])
        outputs = provider_outputs(case, fn, sets[0])
        row.rel_err, failure = check(case, outputs, ref)
        row.kept = float(outputs["kept"]) if "kept" in outputs else _kept(case, problem)
        del outputs
        if failure:
            row.status, row.reason = STATUS_WRONG, failure
            return row
        call = timed_call(case, fn, sets)
        grad_mode = torch.no_grad() if case.mode == "fwd" else contextlib.nullcontext()
        with grad_mode:
            row.ms = harness.time_ms(call, case.device, timing)
            peak = harness.peak_memory_bytes(call, case.device)
        row.tflops = tflops_per_s(row.flops, row.ms) if row.flops else None
        row.gbps = row.bytes / (row.ms * 1e-3) / 1e9 if row.bytes else None
        row.peak_mib = None if peak is None else peak / harness.MIB
        row.mask_ms = problem.context_ms(timing)
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


NO_COST = Cost(0, 0, 0, 0)


def _safe_cost(problem: _Problem) -> Cost:
    """The problem's cost, or zeros when its context cannot be made here (the row then says why)."""
    try:
        return problem.cost()
    except Exception:
        return NO_COST


def _kept(case: Case, problem: _Problem) -> float | None:
    """Share of the mask's blocks kept, for a sparse case."""
    if case.op != "sparse":
        return None
    from bench.ops import kept_fraction

    return kept_fraction(problem.context())


def run_sweep(cases: Sequence[Case], providers: Sequence[str], *, timing: harness.TimingConfig,
              requested: Sequence[str] = (), time_budget_s: float | None = None, seed: int = 0,
              progress: bool = True) -> list[Row]:
    """Rows for every (case, provider), in case order; speed-ups filled in at the end.

    ``requested``: providers named on the command line (runs what they would otherwise decline, such
    as flex on CPU). ``time_budget_s``: once spent, remaining rows are skipped.
    """
    items = [(case, name) for case in cases for name in providers if case.op in PROVIDERS[name].ops]
    meter = Progress(total=len(items), enabled=progress)
    start = time.perf_counter()
    rows: list[Row] = []
    problems: dict[Case, _Problem] = {}
    try:
        for case, name in items:
            problem = problems.get(case.problem)
            if problem is None:
                for old in problems.values():  # one problem's tensors in memory at a time
                    old.release()
                problems = {case.problem: _Problem(case, seed + len(rows))}
                problem = problems[case.problem]
            if time_budget_s is not None and time.perf_counter() - start > time_budget_s:
                row = Row.for_case(name, case, _safe_cost(problem))
                row.status, row.reason = STATUS_SKIPPED, f"time budget of {time_budget_s:g} s spent"
            else:
                row = run_one(case, name, problem, timing, requested=name in requested)
            rows.append(row)
            meter.report(case, row)
    except KeyboardInterrupt:
        for case, name in items[len(rows):]:
            row = Row.for_case(name, case, NO_COST)
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
