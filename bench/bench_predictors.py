"""Deprecated: ``python -m bench.bench_predictors`` is now ``python -m bench.studies.predictors`` (the same
study, the same options)."""

from __future__ import annotations

import sys

from bench import _deprecated


def main(argv: list[str] | None = None) -> int:
    from bench.studies.predictors import main as study

    argv = list(sys.argv[1:] if argv is None else argv)
    return _deprecated.forward("python -m bench.bench_predictors", "python -m bench.studies.predictors", argv, study)


if __name__ == "__main__":
    sys.exit(main())
