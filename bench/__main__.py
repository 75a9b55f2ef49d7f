"""``python -m bench`` and the console script ``effattn-bench``: the harness (:mod:`bench.bench_attention`)."""

from bench.bench_attention import main

if __name__ == "__main__":
    raise SystemExit(main())
