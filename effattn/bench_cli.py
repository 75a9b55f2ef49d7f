"""``effattn-bench``: the console script of the benchmark harness (``python -m bench`` in a checkout).

The harness lives in the repository's ``bench/`` directory, next to this package, and is not
installed as a package of its own (its name would be a top-level ``bench``). This entry point finds
it beside ``effattn/`` (an editable install, as ``setup.sh`` makes) and runs it; from an installed
wheel it says where to get it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    if not (REPO_ROOT / "bench" / "bench_attention.py").is_file():
        print(f"effattn-bench: the benchmark harness (bench/) is not beside {Path(__file__).parent}: install "
              "effattn from a checkout in editable mode (pip install -e .) or run `python -m bench` in one",
              file=sys.stderr)
        return EXIT_USAGE
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from bench.bench_attention import main as bench_main

    return bench_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
