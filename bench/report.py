"""Results out: the aligned table printed on stdout, and JSON, CSV, markdown and PNG files.

Files, under the output directory, all named ``<stem>.*`` (stem ``attention``):

* ``<stem>.json``: ``{"metadata": {...}, "rows": [...]}``, every field of every row.
* ``<stem>.csv``: one line per row, each tagged with :data:`bench.metadata.ROW_TAGS`.
* ``<stem>.md``: the metadata and the table.
* ``<stem>_time.png``, ``<stem>_tflops.png``, ``<stem>_memory.png``: time, TFLOP/s and peak memory
  against sequence length, one line per provider, one panel per (mode, dtype, causal, shape).

A provider that ran in no case (say, CUDA only on a CPU run) gets one "not run" line under the
table, with its reasons, rather than a row per case.
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path

from bench.metadata import ROW_TAGS
from bench.runner import STATUS_OK, STATUS_SKIPPED, Row

STEM = "attention"
SIGNIFICANT_DIGITS = 3
PLOT_PANEL_INCHES = (4.2, 3.2)
PLOT_MAX_COLUMNS = 4
PLOT_DPI = 100
# Fixed margins (a layout engine measures every tick label, and costs seconds); spacing as fractions of a panel.
PLOT_MARGIN_INCHES = {"left": 0.75, "right": 0.2, "bottom": 0.5, "top": 0.6}
PLOT_SPACING = (0.35, 0.55)
# What each plot shows: file suffix, row field, y label, logarithmic y axis.
PLOTS = (("time", "ms", "median time (ms)", True),
         ("tflops", "tflops", "TFLOP/s", False),
         ("memory", "peak_mib", "peak memory (MiB)", True))


def _sig(x: float | None, digits: int = SIGNIFICANT_DIGITS) -> str:
    """``x`` with about ``digits`` significant digits and no exponent; "-" for None."""
    if x is None or not math.isfinite(x):
        return "-"
    if x == 0:
        return "0"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(x))))
    return f"{x:.{decimals}f}"


def _pair(a: int, b: int) -> str:
    return str(a) if a == b else f"{a}/{b}"


def _length_label(t: int) -> str:
    """Sequence length as an axis label: 512, 1k, 16k."""
    return f"{t // 1024}k" if t >= 1024 and t % 1024 == 0 else str(t)


def _minor_label(y: float, _position=None) -> str:
    """Label of a minor tick of a logarithmic axis: only 2 and 5 times a power of ten."""
    leading = round(y / 10 ** math.floor(math.log10(y))) if y > 0 else 0
    return _sig(y, 1) if leading in (2, 5) else ""


def _note(row: Row) -> str:
    return "" if row.status == STATUS_OK else f"{row.status}: {row.reason}"


# Table columns: header, cell of a row, right-aligned.
COLUMNS = (
    ("provider", lambda r: r.provider, False),
    ("mode", lambda r: r.mode, False),
    ("dtype", lambda r: r.dtype, False),
    ("B", lambda r: str(r.batch), True),
    ("H", lambda r: _pair(r.heads_q, r.heads_kv), True),
    ("T", lambda r: _pair(r.seqlen_q, r.seqlen_k), True),
    ("D", lambda r: str(r.headdim), True),
    ("causal", lambda r: "yes" if r.causal else "no", False),
    ("ms", lambda r: _sig(r.ms), True),
    ("TFLOP/s", lambda r: _sig(r.tflops), True),
    ("peak MiB", lambda r: _sig(r.peak_mib), True),
    ("vs naive", lambda r: "-" if r.speedup_naive is None else f"{_sig(r.speedup_naive)}x", True),
    ("vs peer", lambda r: "-" if r.speedup_peer is None else f"{_sig(r.speedup_peer)}x", True),
    ("note", _note, False),
)
COLUMN_NOTES = ("H is Hq or Hq/Hkv (GQA), T is T or Tq/Tk; vs naive / vs peer: time of naive / of the best "
                "sdpa* or flex row of the same case over this row's time (> 1: faster)")


def split_not_run(rows: Sequence[Row]) -> tuple[list[Row], list[str]]:
    """Rows to tabulate, and one line per provider skipped in every case, with its reasons."""
    by_provider: dict[str, list[Row]] = {}
    for row in rows:
        by_provider.setdefault(row.provider, []).append(row)
    collapsed, lines = set(), []
    for name, group in by_provider.items():
        if not all(r.status == STATUS_SKIPPED for r in group):
            continue
        collapsed.add(name)
        reasons = Counter(r.reason for r in group)
        why = "; ".join(reason if len(reasons) == 1 else f"{reason} ({n} cases)" for reason, n in reasons.items())
        lines.append(f"{name}: not run ({len(group)} cases): {why}")
    return [r for r in rows if r.provider not in collapsed], lines


def _cells(rows: Sequence[Row]) -> list[list[str]]:
    return [[cell(r) for _, cell, _ in COLUMNS] for r in rows]


def format_table(rows: Sequence[Row]) -> str:
    """Plain-text table, columns aligned, a blank line between cases; "not run" lines under it."""
    shown, not_run = split_not_run(rows)
    headers = [h for h, _, _ in COLUMNS]
    cells = _cells(shown)
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(headers)]

    def line(values):
        parts = [v.rjust(w) if right else v.ljust(w) for v, w, (_, _, right) in zip(values, widths, COLUMNS)]
        return "  ".join(parts).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    previous = None
    for row, values in zip(shown, cells):
        if previous is not None and row.case_key() != previous:
            out.append("")
        previous = row.case_key()
        out.append(line(values))
    out += [""] + not_run if not_run else []
    return "\n".join(out)


def format_pivot(rows: Sequence[Row], attr: str = "tflops") -> str:
    """Compact table: one line per case, one column per provider that ran somewhere, ``attr`` in the cells.

    A cell of a row that did not run holds its status (skipped, WRONG, OOM, error).
    """
    providers = list(dict.fromkeys(r.provider for r in rows if r.status == STATUS_OK))
    cases: dict[tuple, dict[str, Row]] = {}
    for r in rows:
        cases.setdefault(r.case_key(), {})[r.provider] = r
    case_headers = [h for h, _, _ in COLUMNS[1:8]]
    lines = []
    for by_provider in cases.values():
        first = next(iter(by_provider.values()))
        case_cells = [cell(first) for _, cell, _ in COLUMNS[1:8]]
        values = []
        for p in providers:
            r = by_provider.get(p)
            values.append("" if r is None else _sig(getattr(r, attr)) if r.status == STATUS_OK else r.status)
        lines.append(case_cells + values)
    headers = case_headers + providers
    widths = [max([len(h)] + [len(line[i]) for line in lines]) for i, h in enumerate(headers)]
    right = [right for _, _, right in COLUMNS[1:8]] + [True] * len(providers)

    def fmt(values):
        return "  ".join(v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right)).rstrip()

    return "\n".join([fmt(headers), fmt(["-" * w for w in widths])] + [fmt(line) for line in lines])


def format_markdown(rows: Sequence[Row], meta: dict) -> str:
    shown, not_run = split_not_run(rows)
    headers = [h for h, _, _ in COLUMNS]
    out = ["# effattn attention benchmark", ""]
    out += [f"- **{k}**: `{v}`" for k, v in meta.items()]
    out += ["", COLUMN_NOTES + ".", ""]
    out.append("| " + " | ".join(headers) + " |")
    out.append("|" + "|".join("---:" if right else "---" for _, _, right in COLUMNS) + "|")
    for values in _cells(shown):
        out.append("| " + " | ".join(v.replace("|", "\\|") for v in values) + " |")
    if not_run:
        out += ["", "Not run:", ""] + [f"- {line}" for line in not_run]
    return "\n".join(out) + "\n"


def _finite_or_none(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _row_dict(row: Row) -> dict:
    return {k: _finite_or_none(v) for k, v in asdict(row).items()}


def write_json(path: Path, rows: Sequence[Row], meta: dict) -> None:
    doc = {"metadata": meta, "rows": [_row_dict(r) for r in rows]}
    path.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")


def write_csv(path: Path, rows: Sequence[Row], meta: dict) -> None:
    names = [f.name for f in fields(Row)] + list(ROW_TAGS)
    tags = {k: meta.get(k) for k in ROW_TAGS}
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        for row in rows:
            writer.writerow({**_row_dict(row), **tags})


def _panels(rows: Sequence[Row]) -> dict[str, list[Row]]:
    """Successful rows grouped into plot panels (title -> rows); x is the sequence length.

    A panel holds one mode, dtype, causal flag, head dim and head counts; the batch too, unless it is
    tied to the sequence length (one batch per length, as with a fixed number of tokens).
    """
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        if r.status == STATUS_OK:
            groups.setdefault((r.mode, r.dtype, r.causal, r.headdim, r.heads_q, r.heads_kv), []).append(r)
    panels = {}
    for (mode, dtype, causal, headdim, hq, hkv), group in groups.items():
        base = f"{mode} {dtype} {'causal' if causal else 'dense'} D={headdim} H={_pair(hq, hkv)}"
        batches_per_length: dict[int, set[int]] = {}
        for r in group:
            batches_per_length.setdefault(r.seqlen_q, set()).add(r.batch)
        if all(len(b) == 1 for b in batches_per_length.values()):
            tokens = {r.batch * r.seqlen_q for r in group}
            panels[base + (f" B*T={tokens.pop()}" if len(tokens) == 1 else "")] = group
        else:
            for batch in sorted({r.batch for r in group}):
                panels[f"{base} B={batch}"] = [r for r in group if r.batch == batch]
    return panels


def write_plots(out_dir: Path, rows: Sequence[Row], stem: str = STEM) -> tuple[list[Path], str | None]:
    """PNG plots of time, TFLOP/s and peak memory against T; ``(paths, note)``, note saying why not."""
    try:
        import matplotlib
    except ImportError:
        return [], "matplotlib is not installed: plots skipped"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    panels = _panels(rows)
    if not panels:
        return [], "no successful rows: plots skipped"
    providers = list(dict.fromkeys(r.provider for group in panels.values() for r in group))
    colors = {p: f"C{i % 10}" for i, p in enumerate(providers)}
    ncols = min(PLOT_MAX_COLUMNS, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    paths = []
    for suffix, attr, ylabel, log_y in PLOTS:
        fig, axes = plt.subplots(nrows, ncols, squeeze=False,
                                 figsize=(PLOT_PANEL_INCHES[0] * ncols, PLOT_PANEL_INCHES[1] * nrows))
        for ax, (title, group) in zip(axes.flat, panels.items()):
            for provider in providers:
                points = sorted((r.seqlen_q, getattr(r, attr)) for r in group
                                if r.provider == provider and getattr(r, attr) is not None)
                if points:
                    ax.plot(*zip(*points), "o-", color=colors[provider], label=provider, markersize=3)
            ax.set_xscale("log", base=2)
            lengths = sorted({r.seqlen_q for r in group})
            ax.xaxis.set_major_locator(ticker.FixedLocator(lengths))
            ax.xaxis.set_major_formatter(ticker.FixedFormatter([_length_label(t) for t in lengths]))
            ax.xaxis.set_minor_locator(ticker.NullLocator())
            if log_y:
                ax.set_yscale("log")
                ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, _: _sig(y, 1)))
                ax.yaxis.set_minor_formatter(ticker.FuncFormatter(_minor_label))
            ax.set_title(title, fontsize=8)
            ax.set_xlabel("sequence length T", fontsize=8)
            ax.set_ylabel(ylabel, fontsize=8)
            ax.tick_params(which="both", labelsize=7)
            ax.grid(True, which="both", alpha=0.3)
        for ax in list(axes.flat)[len(panels):]:
            ax.set_visible(False)
        handles = [plt.Line2D([], [], color=colors[p], marker="o", label=p) for p in providers]
        fig.legend(handles=handles, loc="upper center", ncol=min(len(providers), 6), fontsize=8)
        width, height = fig.get_size_inches()
        fig.subplots_adjust(left=PLOT_MARGIN_INCHES["left"] / width, right=1 - PLOT_MARGIN_INCHES["right"] / width,
                            bottom=PLOT_MARGIN_INCHES["bottom"] / height, top=1 - PLOT_MARGIN_INCHES["top"] / height,
                            wspace=PLOT_SPACING[0], hspace=PLOT_SPACING[1])
        path = out_dir / f"{stem}_{suffix}.png"
        fig.savefig(path, dpi=PLOT_DPI)
        plt.close(fig)
        paths.append(path)
    return paths, None


def write_all(out_dir: Path, rows: Sequence[Row], meta: dict, plots: bool = True,
              stem: str = STEM) -> tuple[list[Path], list[str]]:
    """Write every output file into ``out_dir`` (created); ``(paths written, notes)``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.csv", out_dir / f"{stem}.md"]
    write_json(paths[0], rows, meta)
    write_csv(paths[1], rows, meta)
    paths[2].write_text(format_markdown(rows, meta))
    notes = []
    if plots:
        pngs, note = write_plots(out_dir, rows, stem)
        paths += pngs
        notes += [note] if note else []
    return paths, notes
