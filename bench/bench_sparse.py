"""Deprecated: ``python -m bench.bench_sparse`` is now ``python -m bench --preset sparse`` (``h100-sparse`` on
a GPU), writing ``sparse.*``.

The harness runs what this command measured: block-sparse attention over random masks at several
kept shares and over the structured masks, next to dense attention of the same shape (the ``sparse``
op with dense ``attention`` rows), every mask's build time (the ``mask_ms`` of each sparse row, and
the sparse section of ``sparse.md``), and the plot of time against the kept share
(``sparse_sparse.png``). This command translates its options into the harness's, says so, and runs
it. ``--fractions F`` (kept shares) become ``--sparsity 1-F``; the harness's blocks are square.
"""

from __future__ import annotations

import argparse
import sys

from bench import _deprecated

OLD = "python -m bench.bench_sparse"
# This command's presets and the harness's arguments that replace them.
PRESETS = {
    "cpu": ["--preset", "sparse"],
    "h100": ["--preset", "h100-sparse"],
    "tiny": ["--preset", "sparse", "--seqlen", "256", "--headdim", "32", "--sparsity", "0", "0.75"],
}
STEM = "sparse"


def _kept_fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"a kept fraction must lie in (0, 1], got {value:g}")
    return value


def harness_argv(argv: list[str] | None = None) -> list[str]:
    """The ``python -m bench`` arguments equivalent to this command's ``argv``."""
    parser = _deprecated.parser(OLD, __doc__, PRESETS)
    parser.add_argument("--parts", nargs="+", choices=("density", "build"), default=("density", "build"),
                        help="build alone: only the sparse rows (each has its mask's build time)")
    parser.add_argument("--fractions", nargs="+", type=_kept_fraction, default=None,
                        help="kept fractions of the random masks (default: the preset's)")
    parser.add_argument("--block", nargs=2, type=int, default=None, metavar=("BLOCK_Q", "BLOCK_KV"),
                        help="the masks' block size, square (default: the preset's)")
    parser.add_argument("--min-run-time", type=float, default=None, help="CPU timing: blocked_autorange's "
                        "min_run_time in seconds (default: the preset's)")
    args = parser.parse_args(argv)
    if args.block is not None and args.block[0] != args.block[1]:
        parser.error(f"--block: the harness's blocks are square, got {args.block[0]} x {args.block[1]}")
    out = PRESETS[_deprecated.preset_name(args)] + _deprecated.common_argv(args, STEM)
    if set(args.parts) == {"build"}:
        out += ["--op", "sparse"]
    if args.fractions:
        out += ["--sparsity", *(f"{round(1.0 - f, 6):g}" for f in dict.fromkeys(args.fractions))]
    if args.block:
        out += ["--block", str(args.block[0])]
    if args.min_run_time is not None:
        out += ["--min-run-time", f"{args.min_run_time:g}"]
    return out


def main(argv: list[str] | None = None) -> int:
    return _deprecated.forward(OLD, "python -m bench", harness_argv(argv))


if __name__ == "__main__":
    sys.exit(main())
