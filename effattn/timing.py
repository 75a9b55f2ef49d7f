"""Timing and peak memory of a function of no arguments (used by ``effattn.profile`` and ``bench/``).

Timing:

* CUDA: one pair of CUDA events around every call, after a warm-up; the median over the calls.
* CPU: ``torch.utils.benchmark.Timer.blocked_autorange`` (blocks of calls timed with the host clock,
  sized by the timer itself); the median over the blocks, per call.

Peak memory, in bytes above what was allocated before the call:

* CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus
  ``memory_allocated()`` before the call: what torch's caching allocator handed out, not what it
  reserved from the driver.
* CPU: the torch profiler's memory events (every allocation and free through torch's CPU allocator,
  with its time stamp), summed in time order; the peak of the running sum over one call. Memory
  that does not go through torch's allocator (BLAS workspaces, Python objects) is not seen.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

MIB = 1 << 20
# Calls that are always timed on CUDA, however long one call is.
CUDA_MIN_CALLS = 10
# And at most this many, however short.
CUDA_MAX_CALLS = 1000
# Calls used to estimate the time of one CUDA call before the warm-up.
CUDA_ESTIMATE_CALLS = 3
# Name the torch profiler gives to allocation and free events.
PROFILER_MEMORY_EVENT = "[memory]"

CPU_MEMORY_METHOD = "torch profiler allocation events (torch's CPU allocator only), peak over one call"
CUDA_MEMORY_METHOD = "torch.cuda.max_memory_allocated() minus memory_allocated() before one call"


@dataclass(frozen=True)
class TimingConfig:
    """How long to time one function: CPU ``min_run_time`` of ``blocked_autorange``, CUDA warm-up and repeat."""

    cpu_min_run_time_s: float = 0.2
    cuda_warmup_ms: float = 25.0
    cuda_rep_ms: float = 100.0


def describe_timing(device: str, config: TimingConfig) -> str:
    """One line saying how times were taken on ``device``."""
    if device == "cuda":
        return (f"CUDA events around each call, median; {config.cuda_warmup_ms:g} ms warm-up, "
                f"{config.cuda_rep_ms:g} ms of calls ({CUDA_MIN_CALLS}..{CUDA_MAX_CALLS} calls)")
    return f"torch.utils.benchmark.Timer.blocked_autorange(min_run_time={config.cpu_min_run_time_s:g}), median"


def describe_memory(device: str) -> str:
    return CUDA_MEMORY_METHOD if device == "cuda" else CPU_MEMORY_METHOD


def time_ms(fn: Callable[[], object], device: str, config: TimingConfig) -> float:
    """Median time of one call of ``fn`` in milliseconds."""
    if device == "cuda":
        return _time_cuda(fn, config)
    return _time_cpu(fn, config)


def _time_cpu(fn: Callable[[], object], config: TimingConfig) -> float:
    from torch.utils import benchmark

    fn()  # warm-up
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=config.cpu_min_run_time_s).median * 1e3


def _time_cuda(fn: Callable[[], object], config: TimingConfig) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(CUDA_ESTIMATE_CALLS):
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate_ms = max(start.elapsed_time(end) / CUDA_ESTIMATE_CALLS, 1e-3)
    n_warmup = max(1, math.ceil(config.cuda_warmup_ms / estimate_ms))
    n_calls = min(CUDA_MAX_CALLS, max(CUDA_MIN_CALLS, math.ceil(config.cuda_rep_ms / estimate_ms)))
    for _ in range(n_warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_calls)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_calls)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def peak_memory_bytes(fn: Callable[[], object], device: str) -> int | None:
    """Peak bytes allocated by one call of ``fn`` above what was allocated before it; None if not measurable."""
    if device == "cuda":
        return _peak_cuda(fn)
    return _peak_cpu(fn)


def _peak_cuda(fn: Callable[[], object]) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del result
    return peak


def _peak_cpu(fn: Callable[[], object]) -> int | None:
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    del result
    try:
        events = prof.profiler.kineto_results.events()
        changes = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == PROFILER_MEMORY_EVENT)
    except (AttributeError, RuntimeError):  # the profiler's result layout is not public API
        return None
    running = peak = 0
    for _, nbytes in changes:
        running += nbytes
        peak = max(peak, running)
    return peak


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (the profiler's C++ start/stop log lines), not Python's exceptions."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
