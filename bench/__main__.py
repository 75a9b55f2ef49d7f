"""``python -m bench``: the attention benchmark (see :mod:`bench.bench_attention`)."""

from bench.bench_attention import main

if __name__ == "__main__":
    raise SystemExit(main())
