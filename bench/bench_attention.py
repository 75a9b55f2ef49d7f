"""Command line of the attention benchmark: ``python -m bench [--preset NAME] [sweep options]``.

A preset fixes every axis of the sweep; an axis given on the command line replaces the preset's.
Examples::

    python -m bench                                   # quick preset, CUDA if present
    python -m bench --preset h100 --device cuda --out bench/results
    python -m bench --batch 2 --heads 8 --seqlen 512 1024 --headdim 64 128 --dtype fp16 bf16 \\
        --causal both --mode fwd fwd+bwd --providers naive sdpa effattn

Exit status: 0, or 1 when some provider's output was wrong (the files are written all the same),
2 for bad arguments, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from bench import harness, metadata, report
from bench.cases import CAUSAL_CHOICES, DEFAULT_PRESET, DEVICES, DTYPES, MODES, PRESETS, Sweep, expand
from bench.providers import PROVIDERS
from bench.runner import STATUS_WRONG, run_sweep

DEFAULT_OUT = Path(__file__).resolve().parent / "out"
EXIT_WRONG = 1
EXIT_INTERRUPTED = 130


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Benchmark effattn's attention against naive attention, torch SDPA and FlexAttention. "
                    "A preset fixes every axis of the sweep; an axis given here replaces the preset's.",
        epilog="Examples:" + __doc__.split("Examples::")[1])
    p.add_argument("--preset", choices=list(PRESETS), default=DEFAULT_PRESET,
                   help="named sweep: " + "; ".join(f"{n}: {s.description}" for n, s in PRESETS.items()))
    p.add_argument("--device", choices=DEVICES, default="auto", help="auto: cuda when available, else cpu")
    p.add_argument("--providers", nargs="+", choices=list(PROVIDERS), metavar="NAME",
                   help=f"implementations to compare (default: all): {', '.join(PROVIDERS)}; naming one runs it "
                        "even where it would decline by default (flex on CPU)")
    sizes = p.add_argument_group("sweep axes (each replaces the preset's)")
    batch = sizes.add_mutually_exclusive_group()
    batch.add_argument("--batch", nargs="+", type=_positive_int, metavar="B", help="batch sizes")
    batch.add_argument("--tokens", type=_positive_int, metavar="N", help="batch = max(1, N // T) (B*T held at N)")
    heads = sizes.add_mutually_exclusive_group()
    heads.add_argument("--heads", nargs="+", type=_positive_int, metavar="H", help="query heads")
    heads.add_argument("--model-dim", type=_positive_int, metavar="W", help="query heads = W // D")
    sizes.add_argument("--gqa", nargs="+", type=_positive_int, metavar="G",
                       help="query heads per KV head (1: multi-head; 4: Hq = 4 Hkv)")
    sizes.add_argument("--seqlen", nargs="+", type=_positive_int, metavar="T", help="sequence lengths (Tq = Tk)")
    sizes.add_argument("--headdim", nargs="+", type=_positive_int, metavar="D", help="head dims")
    sizes.add_argument("--dtype", nargs="+", choices=list(DTYPES), help="input dtypes")
    sizes.add_argument("--causal", choices=list(CAUSAL_CHOICES), help="dense (false), causal (true) or both")
    sizes.add_argument("--mode", nargs="+", choices=MODES, help="fwd, bwd (backward alone) and/or fwd+bwd")
    run = p.add_argument_group("run")
    run.add_argument("--time-budget", type=_positive_float, metavar="S",
                     help="seconds after which the remaining rows are skipped (default: the preset's)")
    run.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    run.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory of the JSON/CSV/markdown/PNG files")
    run.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    run.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    run.add_argument("--list", action="store_true", help="list presets and providers (and why not, here) and exit")
    return p


def resolve_sweep(args: argparse.Namespace) -> Sweep:
    """The preset with the axes given on the command line replaced."""
    sweep = PRESETS[args.preset]
    changes = {}
    if args.batch:
        changes.update(batch=tuple(args.batch), tokens=None)
    if args.tokens:
        changes.update(tokens=args.tokens)
    if args.heads:
        changes.update(heads=tuple(args.heads), model_dim=None)
    if args.model_dim:
        changes.update(model_dim=args.model_dim)
    for axis, attr in (("gqa", "gqa"), ("seqlen", "seqlens"), ("headdim", "headdims"), ("dtype", "dtypes"),
                       ("mode", "modes")):
        if getattr(args, axis):
            changes[attr] = tuple(dict.fromkeys(getattr(args, axis)))
    if args.causal:
        changes["causal"] = CAUSAL_CHOICES[args.causal]
    if args.time_budget:
        changes["time_budget_s"] = args.time_budget
    return dataclasses.replace(sweep, **changes)


def resolve_device(parser: argparse.ArgumentParser, name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: cuda asked for, but torch.cuda.is_available() is False")
    return name


def list_everything(device: str, sweep: Sweep) -> str:
    cases = expand(sweep, device)
    lines = ["presets:"] + [f"  {n:<6} {s.description}" for n, s in PRESETS.items()]
    lines += [f"providers on {device} (first case of preset {sweep.name}: {cases[0].label()}):"]
    for name, provider in PROVIDERS.items():
        why = provider.not_supported_reasons(cases[0])
        lines.append(f"  {name:<15} {provider.description}")
        if why:
            lines.append(f"  {'':<15} not run: {'; '.join(why)}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    device = resolve_device(parser, args.device)
    sweep = resolve_sweep(args)
    try:
        cases = expand(sweep, device)
    except ValueError as e:
        parser.error(str(e))
    if args.list:
        print(list_everything(device, sweep))
        return 0
    providers = args.providers or list(PROVIDERS)
    if device == "cpu" and sweep.name == "h100":
        print("note: the h100 preset is sized for a GPU; on CPU most of it will not fit its time budget",
              file=sys.stderr)
    print(f"preset {sweep.name}, device {device}: {len(cases)} cases x {len(providers)} providers"
          + (f", time budget {sweep.time_budget_s:g} s" if sweep.time_budget_s else ""), file=sys.stderr)

    start = time.perf_counter()
    rows = run_sweep(cases, providers, timing=sweep.timing, requested=args.providers or (),
                     time_budget_s=sweep.time_budget_s, seed=args.seed, progress=not args.quiet)
    elapsed = time.perf_counter() - start
    interrupted = any(r.reason == "interrupted" for r in rows)

    meta = metadata.collect(device, "python -m bench " + shlex.join(argv), extra={
        "preset": sweep.name,
        "timing": harness.describe_timing(device, sweep.timing),
        "memory": harness.describe_memory(device),
        "flops": "4*B*Hq*D*visible_pairs forward (causal: exact bottom-right pairs); bwd 2.5x, fwd+bwd 3.5x",
        "sweep_seconds": round(elapsed, 1),
    })
    print(report.format_table(rows))
    paths, notes = report.write_all(args.out, rows, meta, plots=not args.no_plots)
    print("\nTFLOP/s by provider:")
    print(report.format_pivot(rows, "tflops"))
    for note in notes:
        print(f"note: {note}")
    print(f"\n{len(rows)} rows in {elapsed:.1f} s on {meta['device_name']}; wrote {', '.join(str(p) for p in paths)}")
    wrong = [r for r in rows if r.status == STATUS_WRONG]
    if wrong:
        print(f"{len(wrong)} rows WRONG: " + ", ".join(sorted({r.provider for r in wrong})), file=sys.stderr)
    if any(r.provider.startswith("effattn") for r in wrong):  # a wrong peer is reported, not a failure of ours
        return EXIT_WRONG
    return EXIT_INTERRUPTED if interrupted else 0
