"""Timing and peak memory of one benchmark function: :mod:`effattn.timing` (the one implementation,
shared with :mod:`effattn.profile`), under the name the benchmarks use."""

from effattn.timing import (  # noqa: F401
    CPU_MEMORY_METHOD,
    CUDA_MEMORY_METHOD,
    MIB,
    TimingConfig,
    describe_memory,
    describe_timing,
    peak_memory_bytes,
    time_ms,
)
