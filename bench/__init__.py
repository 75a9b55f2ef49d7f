"""Benchmarks of effattn's attention against the naive baseline, torch SDPA and FlexAttention.

``python -m bench`` runs the attention benchmark (``python -m bench --help`` for the sweep options).
Modules, one job each:

* :mod:`bench.cases`: one benchmark case (shape, dtype, causal, mode), the named presets, the sweep.
* :mod:`bench.flops`: FLOP counts (FlashAttention's convention, exact visible pairs for causal).
* :mod:`bench.providers`: the attention implementations compared, each saying why it cannot run a case.
* :mod:`bench.validate`: each provider's output checked against the reference before it is timed.
* :mod:`bench.harness`: timing (CUDA events or ``torch.utils.benchmark``) and peak memory.
* :mod:`bench.runner`: the sweep loop: inputs, validation, timing, time budget, progress.
* :mod:`bench.metadata`: host, device, versions, commit, date, command line.
* :mod:`bench.report`: the printed table and the JSON, CSV, markdown and PNG files.
* :mod:`bench.bench_attention`: the command line.
"""
