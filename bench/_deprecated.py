"""The deprecated commands' way out: their old options read, what replaces them said, and that run."""

from __future__ import annotations

import argparse
import shlex
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path


def parser(old: str, doc: str, presets: Sequence[str]) -> argparse.ArgumentParser:
    """An argument parser for ``old`` with the options its benchmarks shared: ``--preset`` (one of
    ``presets``; default ``h100`` on CUDA, ``cpu`` otherwise), ``--device`` and ``--out``."""
    p = argparse.ArgumentParser(prog=old, description=doc.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(presets), default=None,
                   help="sizes (default: h100 on CUDA, cpu otherwise)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available, else cpu")
    p.add_argument("--out", type=Path, default=Path("bench/out"), help="directory of the files written")
    return p


def preset_name(args: argparse.Namespace) -> str:
    """The preset asked for, or the default: ``h100`` on CUDA (``--device``, else whether torch sees one)."""
    if args.preset:
        return args.preset
    if args.device is not None:
        return "h100" if args.device == "cuda" else "cpu"
    import torch

    return "h100" if torch.cuda.is_available() else "cpu"


def common_argv(args: argparse.Namespace, stem: str) -> list[str]:
    """The harness's arguments for ``--device`` and ``--out``, the files named ``stem.*``."""
    return ["--stem", stem, "--out", str(args.out)] + (["--device", args.device] if args.device else [])


def forward(old: str, new: str, argv: Sequence[str], main: Callable[[list[str]], int] | None = None) -> int:
    """Warn that ``old`` is deprecated in favour of ``new argv...`` (a DeprecationWarning and a note on
    stderr, which is shown whatever the warning filters), then run ``main(argv)``: the harness's
    (``python -m bench``) unless another is given."""
    command = f"{new} {shlex.join(argv)}".rstrip()
    message = f"`{old}` is deprecated and will be removed; it runs `{command}`, use that instead"
    warnings.warn(message, DeprecationWarning, stacklevel=2)
    print(f"note: {message}", file=sys.stderr, flush=True)
    if main is None:
        from bench.bench_attention import main
    return main(list(argv))
