"""Command line of the benchmark harness: ``python -m bench`` or ``effattn-bench`` ``[--preset NAME] [options]``.

A preset fixes every axis of the sweep; an axis given on the command line replaces the preset's (in
every part of a preset made of several sweeps; ``--op`` keeps the parts that have those ops).
Examples::

    python -m bench                                   # quick preset (every op), CUDA if present
    python -m bench --preset h100 --device cuda --out bench/results
    python -m bench --op attention --batch 2 --heads 8 --seqlen 512 1024 --headdim 64 128 \\
        --dtype fp16 bf16 --causal both --mode fwd fwd+bwd --providers naive sdpa effattn
    python -m bench --op pooled --stride 2 4 --seqlen 4096
    python -m bench --op sparse --pattern random documents --sparsity 0.5 0.9 0.97 --block 64
    python -m bench --op funnel predict --seqlen 1024 --funnel-type relative_shift factorized
    python -m bench --preset sparse --stem sparse    # sparse time against the kept share, mask build times
    python -m bench --preset funnel --stem funnel    # pooled in the kernel or first; the Funnel layer vs HF

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

from bench import cases as bench_cases
from bench import harness, metadata, report
from bench.cases import CAUSAL_CHOICES, DEFAULT_PRESET, DEVICES, DTYPES, MODES, PRESETS, Sweep, expand
from bench.providers import PROVIDERS
from bench.runner import STATUS_WRONG, run_sweep

# Block sizes of a BlockMask: powers of two from 16.
MIN_BLOCK = 16
DEFAULT_OUT = Path(__file__).resolve().parent / "out"
EXIT_WRONG = 1
EXIT_INTERRUPTED = 130


def _number(kind: type, accept, rule: str):
    """An argparse type: ``text`` as ``kind`` (int or float), rejected unless ``accept(value)``, saying ``rule``."""
    noun = "an integer" if kind is int else "a number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {noun}: {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value

    parse.__name__ = f"{kind.__name__} {rule}"  # argparse names the type in its messages
    return parse


positive_int = _number(int, lambda v: v > 0, "> 0")
positive_float = _number(float, lambda v: v > 0, "> 0")
_fraction = _number(float, lambda v: 0.0 <= v < 1.0, "in [0, 1)")


def _stem(text: str) -> str:
    if not text or not all(c.isalnum() or c in "-_" for c in text):
        raise argparse.ArgumentTypeError(f"letters, digits, - and _ only, got {text!r}")
    return text


def _block(text: str) -> int:
    value = positive_int(text)
    if value < MIN_BLOCK or value & (value - 1):
        raise argparse.ArgumentTypeError(f"must be a power of two >= {MIN_BLOCK}, got {value}")
    return value


def _help(text: str) -> str:
    """``text`` as an argparse help string: argparse expands ``%`` there, a literal one must be ``%%``."""
    return text.replace("%", "%%")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench (effattn-bench)", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Benchmark effattn's ops (attention, pooled, sparse, Funnel layer, mask prediction) against "
                    "naive attention, torch SDPA and FlexAttention. A preset fixes every axis of the sweep; an "
                    "axis given here replaces the preset's.",
        epilog="Examples:" + __doc__.split("Examples::")[1])
    p.add_argument("--preset", choices=list(PRESETS), default=DEFAULT_PRESET,
                   help=_help("named sweep: " + "; ".join(f"{n}: {s.description}" for n, s in PRESETS.items())))
    p.add_argument("--device", choices=DEVICES, default="auto", help="auto: cuda when available, else cpu")
    p.add_argument("--providers", nargs="+", choices=list(PROVIDERS), metavar="NAME",
                   help=f"implementations to compare (default: all): {', '.join(PROVIDERS)}; naming one runs it "
                        "even where it would decline by default (flex on CPU)")
    sizes = p.add_argument_group("sweep axes (each replaces the preset's)")
    sizes.add_argument("--op", nargs="+", choices=bench_cases.OP_NAMES,
                       help="ops: attention (flash), pooled (Funnel's pool-query-only), sparse (block-sparse), "
                            "funnel (a Funnel relative-attention layer), predict (block-mask prediction)")
    sizes.add_argument("--stride", nargs="+", type=positive_int, metavar="S", help="pooled: pooling strides")
    sizes.add_argument("--pattern", nargs="+", choices=bench_cases.PATTERNS, help="sparse: mask patterns")
    sizes.add_argument("--sparsity", nargs="+", type=_fraction, metavar="S",
                       help="share of blocks cut: sparse random masks, predict (kept per query block)")
    sizes.add_argument("--block", type=_block, metavar="N", help="sparse, predict: block size (tokens)")
    sizes.add_argument("--funnel-type", nargs="+", choices=bench_cases.FUNNEL_TYPES,
                       help="funnel: Hugging Face's attention types (the same layer computed two ways)")
    batch = sizes.add_mutually_exclusive_group()
    batch.add_argument("--batch", nargs="+", type=positive_int, metavar="B", help="batch sizes")
    batch.add_argument("--tokens", type=positive_int, metavar="N", help="batch = max(1, N // T) (B*T held at N)")
    heads = sizes.add_mutually_exclusive_group()
    heads.add_argument("--heads", nargs="+", type=positive_int, metavar="H", help="query heads")
    heads.add_argument("--model-dim", type=positive_int, metavar="W", help="query heads = W // D")
    sizes.add_argument("--gqa", nargs="+", type=positive_int, metavar="G",
                       help="query heads per KV head (1: multi-head; 4: Hq = 4 Hkv)")
    sizes.add_argument("--seqlen", nargs="+", type=positive_int, metavar="T", help="sequence lengths (Tq = Tk)")
    sizes.add_argument("--headdim", nargs="+", type=positive_int, metavar="D", help="head dims")
    sizes.add_argument("--dtype", nargs="+", choices=list(DTYPES), help="input dtypes")
    sizes.add_argument("--causal", choices=list(CAUSAL_CHOICES), help="dense (false), causal (true) or both")
    sizes.add_argument("--mode", nargs="+", choices=MODES, help="fwd, bwd (backward alone) and/or fwd+bwd")
    run = p.add_argument_group("run")
    run.add_argument("--time-budget", type=positive_float, metavar="S",
                     help="seconds after which the remaining rows are skipped (default: the preset's)")
    run.add_argument("--min-run-time", type=positive_float, metavar="S",
                     help="CPU timing: blocked_autorange's min_run_time per row (default: the preset's)")
    run.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    run.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory of the JSON/CSV/markdown/PNG files")
    run.add_argument("--stem", default=report.STEM, type=_stem,
                     help=f"file names under --out: STEM.json, STEM.csv, ... (default {report.STEM})")
    run.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    run.add_argument("--no-ceilings", action="store_true",
                     help="do not measure the device's matmul and copy ceilings (nor draw the roofline)")
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
                       ("mode", "modes"), ("op", "ops"), ("stride", "strides"), ("pattern", "patterns"),
                       ("sparsity", "sparsities"), ("funnel_type", "funnel_types")):
        if getattr(args, axis):
            changes[attr] = tuple(dict.fromkeys(getattr(args, axis)))
    if args.causal:
        changes["causal"] = CAUSAL_CHOICES[args.causal]
    if args.block:
        changes["block"] = args.block
    if args.time_budget:
        changes["time_budget_s"] = args.time_budget
    if args.min_run_time:
        changes["timing"] = dataclasses.replace(sweep.timing, cpu_min_run_time_s=args.min_run_time)
    return sweep.replace(**changes)


def resolve_device(parser: argparse.ArgumentParser, name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: cuda asked for, but torch.cuda.is_available() is False")
    return name


def list_everything(device: str, sweep: Sweep) -> str:
    cases = expand(sweep, device)
    lines = ["presets:"] + [f"  {n:<8} {s.description}" for n, s in PRESETS.items()]
    lines += [f"providers on {device} (reasons for the first case of each op of preset {sweep.name}):"]
    for name, provider in PROVIDERS.items():
        lines.append(f"  {name:<15} {provider.description}")
        lines.append(f"  {'':<15} ops: {', '.join(provider.ops)}")
        for op in provider.ops:
            first = next((c for c in cases if c.op == op), None)
            why = [] if first is None else provider.not_supported_reasons(first)
            if why:
                lines.append(f"  {'':<15} not run ({first.label()}): {'; '.join(why)}")
    return "\n".join(lines)


def prepare_extension() -> str:
    """Load the compiled extension, building it first when the sources changed since its last build: the
    automatic backend never builds it, and would time the reference in place of the C++ kernels. Returns its
    state for the metadata."""
    from effattn import _ext

    if not _ext.is_ready():
        print("building the effattn extension (csrc/) first ...", file=sys.stderr)
    why = _ext.unavailable_reason()
    if why:
        print(f"note: the effattn extension is unavailable ({why}); effattn's rows run other backends",
              file=sys.stderr)
    return "loaded" if why is None else f"unavailable: {why}"


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
    if device == "cpu" and sweep.name.startswith("h100"):
        print("note: the h100 preset is sized for a GPU; on CPU most of it will not fit its time budget",
              file=sys.stderr)
    print(f"preset {sweep.name}, device {device}: {len(cases)} cases x {len(providers)} providers"
          + (f", time budget {sweep.time_budget_s:g} s" if sweep.time_budget_s else ""), file=sys.stderr)

    extension = prepare_extension()
    start = time.perf_counter()
    rows = run_sweep(cases, providers, timing=sweep.timing, requested=args.providers or (),
                     time_budget_s=sweep.time_budget_s, seed=args.seed, progress=not args.quiet)
    elapsed = time.perf_counter() - start
    interrupted = any(r.reason == "interrupted" for r in rows)

    meta = metadata.collect(device, "python -m bench " + shlex.join(argv), extra={
        "preset": sweep.name,
        "timing": harness.describe_timing(device, sweep.timing),
        "memory": harness.describe_memory(device),
        "flops": "4*B*Hq*D*pairs forward, the pairs the op must compute (causal: exact; pooled: Tp*T; sparse: "
                 "kept blocks; funnel: projections + content attention); bwd 2.5x (linear layers 2x)",
        "bytes": "inputs read and outputs written once (bench.ops)",
        "sweep_seconds": round(elapsed, 1),
        "extension": extension,
    })
    ceilings = None
    if not args.no_ceilings:
        from effattn.profile import measure_ceilings

        ceilings = measure_ceilings(device, config=sweep.timing)
        meta["ceilings"] = dataclasses.asdict(ceilings)
    print(report.format_table(rows))
    paths, notes = report.write_all(args.out, rows, meta, plots=not args.no_plots, stem=args.stem,
                                    ceilings=ceilings)
    print("\nSummary:")
    print(report.format_summary(rows))
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
