"""The benchmark harness: effattn's ops against the naive baseline, torch SDPA and FlexAttention.

``python -m bench`` (console script ``effattn-bench``) runs it (``python -m bench --help`` for the sweep
options, ``--preset`` for the named sweeps). Modules, one job each:

* :mod:`bench.cases`: one benchmark case (op, shape, dtype, causal, mode), the named presets, the sweep.
* :mod:`bench.flops`: FLOP counts of attention in the harness's terms, from :mod:`effattn.profile`.
* :mod:`bench.ops`: what each op computes, its inputs, reference, masks and cost.
* :mod:`bench.providers`: the implementations compared, each saying why it cannot run a case.
* :mod:`bench.validate`: each provider's output checked against the reference before it is timed.
* :mod:`bench.harness`: timing (CUDA events or ``torch.utils.benchmark``) and peak memory.
* :mod:`bench.runner`: the sweep loop: inputs, validation, timing, time budget, progress.
* :mod:`bench.metadata`: host, device, versions, commit, date, command line.
* :mod:`bench.report`: the printed table and the JSON, CSV, markdown and PNG files.
* :mod:`bench.bench_attention`: the command line.

Studies, which answer one question with these pieces, are in :mod:`bench.studies`. ``bench_sparse``,
``bench_funnel`` and ``bench_predictors`` are deprecated commands that run their replacements.
effattn itself never imports this package.
"""
