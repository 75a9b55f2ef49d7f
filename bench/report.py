"""Results out: the aligned table printed on stdout, and JSON, CSV, markdown and PNG files.

Files, under the output directory, all named ``<stem>.*`` (stem ``attention``):

* ``<stem>.json``: ``{"metadata": {...}, "rows": [...]}``, every field of every row.
* ``<stem>.csv``: one line per row, each tagged with :data:`bench.metadata.ROW_TAGS`.
* ``<stem>.md``: the metadata, the summary, the table and, with sparse rows, their times against
  dense attention and their masks' build times; ``<stem>_summary.md``: the summary alone.
* ``<stem>_time.png``, ``<stem>_tflops.png``, ``<stem>_memory.png``: time, TFLOP/s and peak memory
  against sequence length, one line per provider, one panel per (op, mode, dtype, causal, shape).
* ``<stem>_sparse.png``: sparse time against the share of mask blocks kept, per provider, with
  the dense attention of the same shape (when a sweep has sparse cases of several densities).
* ``<stem>_roofline.png``: every timed row on the roofline of the device's measured matmul and copy
  ceilings (when they were measured).

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
    ("op", lambda r: r.case().op_label(), False),
    ("mode", lambda r: r.mode, False),
    ("dtype", lambda r: r.dtype, False),
    ("B", lambda r: str(r.batch), True),
    ("H", lambda r: _pair(r.heads_q, r.heads_kv), True),
    ("T", lambda r: _pair(r.seqlen_q, r.seqlen_k), True),
    ("D", lambda r: str(r.headdim), True),
    ("causal", lambda r: "yes" if r.causal else "no", False),
    ("ms", lambda r: _sig(r.ms), True),
    ("TFLOP/s", lambda r: _sig(r.tflops), True),
    ("GB/s", lambda r: _sig(r.gbps), True),
    ("kept", lambda r: "-" if r.kept is None else f"{r.kept:.0%}", True),
    ("peak MiB", lambda r: _sig(r.peak_mib), True),
    ("vs naive", lambda r: "-" if r.speedup_naive is None else f"{_sig(r.speedup_naive)}x", True),
    ("vs peer", lambda r: "-" if r.speedup_peer is None else f"{_sig(r.speedup_peer)}x", True),
    ("note", _note, False),
)
COLUMN_NOTES = ("H is Hq or Hq/Hkv (GQA), T is T or Tq/Tk (before pooling); GB/s: the op's minimal bytes (inputs "
                "read and outputs written once) over the time; kept: share of mask blocks kept (sparse, predict); "
                "vs naive / vs peer: time of naive / of the best sdpa* or flex row of the same case over this "
                "row's time (> 1: faster)")
SUMMARY_NOTE = ("Per effattn provider (and predictor), op, mode and dtype: geometric means over the cases of the "
                "speed-up over naive and over the best peer (sdpa*, flex) of the same case, the peer that was best "
                "most often, the highest TFLOP/s, and the geometric mean of peak memory over naive's (< 1: less).")
# The columns that name a case (provider and measurements excluded).
CASE_COLUMNS = slice(1, 9)


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
    case_headers = [h for h, _, _ in COLUMNS[CASE_COLUMNS]]
    lines = []
    for by_provider in cases.values():
        first = next(iter(by_provider.values()))
        case_cells = [cell(first) for _, cell, _ in COLUMNS[CASE_COLUMNS]]
        values = []
        for p in providers:
            r = by_provider.get(p)
            values.append("" if r is None else _sig(getattr(r, attr)) if r.status == STATUS_OK else r.status)
        lines.append(case_cells + values)
    headers = case_headers + providers
    widths = [max([len(h)] + [len(line[i]) for line in lines]) for i, h in enumerate(headers)]
    right = [right for _, _, right in COLUMNS[CASE_COLUMNS]] + [True] * len(providers)

    def fmt(values):
        return "  ".join(v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right)).rstrip()

    return "\n".join([fmt(headers), fmt(["-" * w for w in widths])] + [fmt(line) for line in lines])


SUMMARY_HEADERS = ("provider", "op", "mode", "dtype", "cases", "vs naive", "vs best peer", "best peer",
                   "TFLOP/s max", "memory vs naive")


def _geomean(values: Sequence[float]) -> float | None:
    values = [v for v in values if v is not None and v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def summary_lines(rows: Sequence[Row]) -> list[list[str]]:
    """Per (effattn provider or predictor, op, mode, dtype): cases run, geometric means of the speed-ups
    over naive and over the best peer, the peer that was best most often, the highest TFLOP/s, and the
    geometric mean of peak memory over naive's."""
    from bench.providers import PROVIDERS

    naive = {r.case_key(): r for r in rows if r.provider == "naive" and r.status == STATUS_OK}
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        if r.status == STATUS_OK and r.provider != "naive" and not PROVIDERS[r.provider].peer:
            op = r.case().op_label().split(" b")[0] if r.op in ("sparse", "predict") else r.case().op_label()
            groups.setdefault((r.provider, op, r.mode, r.dtype), []).append(r)
    lines = []
    for (provider, op, mode, dtype), group in groups.items():
        memory = [r.peak_mib / naive[r.case_key()].peak_mib for r in group
                  if r.case_key() in naive and r.peak_mib and naive[r.case_key()].peak_mib]
        peers = Counter(r.best_peer for r in group if r.best_peer)
        tflops = [r.tflops for r in group if r.tflops is not None]
        vs_naive, vs_peer, mem = (_geomean([r.speedup_naive for r in group]),
                                  _geomean([r.speedup_peer for r in group]), _geomean(memory))
        lines.append([provider, op, mode, dtype, str(len(group)),
                      "-" if vs_naive is None else f"{_sig(vs_naive)}x",
                      "-" if vs_peer is None else f"{_sig(vs_peer)}x",
                      peers.most_common(1)[0][0] if peers else "-",
                      _sig(max(tflops)) if tflops else "-",
                      "-" if mem is None else f"{_sig(mem)}x"])
    return lines


def format_summary(rows: Sequence[Row], markdown: bool = False) -> str:
    """The summary of :func:`summary_lines` as aligned text or a markdown table."""
    lines = summary_lines(rows)
    if not lines:
        return "(no effattn row ran)"
    if markdown:
        out = ["| " + " | ".join(SUMMARY_HEADERS) + " |",
               "|" + "|".join("---" if i < 4 or i == 7 else "---:" for i in range(len(SUMMARY_HEADERS))) + "|"]
        return "\n".join(out + ["| " + " | ".join(line) + " |" for line in lines])
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(SUMMARY_HEADERS)]

    def fmt(values):
        return "  ".join(v.ljust(w) if i < 4 or i == 7 else v.rjust(w)
                         for i, (v, w) in enumerate(zip(values, widths))).rstrip()

    return "\n".join([fmt(SUMMARY_HEADERS), fmt(["-" * w for w in widths])] + [fmt(line) for line in lines])


def format_summary_markdown(rows: Sequence[Row], meta: dict) -> str:
    """The summary alone, with the machine and versions in one line: for a README."""
    where = (f"{meta.get('device_name')} ({meta.get('device')}), torch {meta.get('torch')}, "
             f"triton {meta.get('triton')}, commit {str(meta.get('git_commit'))[:7]}, {meta.get('date_utc')}, "
             f"`{meta.get('command')}`")
    return f"Measured on {where}.\n\n{SUMMARY_NOTE}\n\n{format_summary(rows, markdown=True)}\n"


def format_markdown(rows: Sequence[Row], meta: dict) -> str:
    shown, not_run = split_not_run(rows)
    headers = [h for h, _, _ in COLUMNS]
    out = ["# effattn benchmark", ""]
    out += [f"- **{k}**: `{v}`" for k, v in meta.items()]
    out += ["", "## Summary", "", SUMMARY_NOTE, "", format_summary(rows, markdown=True), "", "## All rows", "",
            COLUMN_NOTES + ".", ""]
    out.append("| " + " | ".join(headers) + " |")
    out.append("|" + "|".join("---:" if right else "---" for _, _, right in COLUMNS) + "|")
    for values in _cells(shown):
        out.append("| " + " | ".join(v.replace("|", "\\|") for v in values) + " |")
    if not_run:
        out += ["", "Not run:", ""] + [f"- {line}" for line in not_run]
    sparse = format_sparse_markdown(rows)
    out += ["", sparse.rstrip("\n")] if sparse else []
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
            key = (r.case().op_label(), r.mode, r.dtype, r.causal, r.headdim, r.heads_q, r.heads_kv)
            groups.setdefault(key, []).append(r)
    panels = {}
    for (op, mode, dtype, causal, headdim, hq, hkv), group in groups.items():
        kind = ("causal " if causal else "dense ") if op == "attention" else ""
        base = f"{op} {mode} {dtype} {kind}D={headdim} H={_pair(hq, hkv)}"
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


def panel_grid(n_panels: int):
    """``(fig, axes)``: a grid of at most :data:`PLOT_MAX_COLUMNS` columns for ``n_panels`` panels."""
    import matplotlib.pyplot as plt

    ncols = min(PLOT_MAX_COLUMNS, n_panels)
    nrows = math.ceil(n_panels / ncols)
    return plt.subplots(nrows, ncols, squeeze=False, figsize=(PLOT_PANEL_INCHES[0] * ncols,
                                                              PLOT_PANEL_INCHES[1] * nrows))


def style_axis(ax, title: str, xlabel: str, ylabel: str) -> None:
    """Title, labels, small ticks and a light grid, the same on every panel."""
    ax.set_title(title, fontsize=8)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(which="both", labelsize=7)
    ax.grid(True, which="both", alpha=0.3)


def save_grid(fig, axes, n_panels: int, handles, path: Path, dpi: int = PLOT_DPI) -> Path:
    """Hide the unused panels, put the legend on top, fix the margins, write ``path`` and close ``fig``."""
    import matplotlib.pyplot as plt

    for ax in list(axes.flat)[n_panels:]:
        ax.set_visible(False)
    fig.legend(handles=handles, loc="upper center", ncol=min(len(handles), 6), fontsize=8)
    width, height = fig.get_size_inches()
    fig.subplots_adjust(left=PLOT_MARGIN_INCHES["left"] / width, right=1 - PLOT_MARGIN_INCHES["right"] / width,
                        bottom=PLOT_MARGIN_INCHES["bottom"] / height, top=1 - PLOT_MARGIN_INCHES["top"] / height,
                        wspace=PLOT_SPACING[0], hspace=PLOT_SPACING[1])
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


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
    handles = [plt.Line2D([], [], color=colors[p], marker="o", label=p) for p in providers]
    paths = []
    for suffix, attr, ylabel, log_y in PLOTS:
        fig, axes = panel_grid(len(panels))
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
            style_axis(ax, title, "sequence length T", ylabel)
        paths.append(save_grid(fig, axes, len(panels), handles, out_dir / f"{stem}_{suffix}.png"))
    return paths, None


def _shape_key(r: Row) -> tuple:
    return (r.mode, r.dtype, r.batch, r.heads_q, r.seqlen_q, r.headdim)


def dense_rows(rows: Sequence[Row]) -> dict[tuple, Row]:
    """Successful dense attention rows (not causal, no GQA), by (provider, mode, dtype, B, H, T, D): what a
    sparse row of the same shape is set against."""
    return {(r.provider, *_shape_key(r)): r for r in rows
            if r.status == STATUS_OK and r.op == "attention" and not r.causal and r.heads_q == r.heads_kv}


def _sparse_panels(rows: Sequence[Row]) -> dict[str, list[Row]]:
    """Successful sparse rows, one panel per (mode, dtype, shape, block) with masks of several kept shares;
    x is the kept share."""
    panels: dict[str, list[Row]] = {}
    for r in rows:
        if r.status == STATUS_OK and r.op == "sparse" and r.kept is not None:
            title = (f"sparse {r.mode} {r.dtype} B={r.batch} H={r.heads_q} T={_length_label(r.seqlen_q)} "
                     f"D={r.headdim} b{r.block}")
            panels.setdefault(title, []).append(r)
    return {t: g for t, g in panels.items() if len({r.kept for r in g}) > 1}


def write_sparse_plot(out_dir: Path, rows: Sequence[Row], stem: str = STEM) -> Path | None:
    """``<stem>_sparse.png``: time against the share of blocks kept, per provider: random masks as lines,
    structured ones as labelled squares, the provider's dense attention of the same shape (when the sweep
    has it) as a dashed line. None without such sparse rows."""
    import matplotlib.pyplot as plt

    panels = _sparse_panels(rows)
    if not panels:
        return None
    dense = dense_rows(rows)
    providers = list(dict.fromkeys(r.provider for group in panels.values() for r in group))
    colors = {p: f"C{i % 10}" for i, p in enumerate(providers)}
    fig, axes = panel_grid(len(panels))
    for ax, (title, group) in zip(axes.flat, panels.items()):
        for provider in providers:
            mine = [r for r in group if r.provider == provider]
            points = sorted((r.kept, r.ms) for r in mine if r.pattern == "random")
            if points:
                ax.plot(*zip(*points), "o-", color=colors[provider], markersize=3)
            for r in mine:
                if r.pattern != "random":
                    ax.plot(r.kept, r.ms, "s", color=colors[provider], markersize=4, fillstyle="none")
                    ax.annotate(r.pattern, (r.kept, r.ms), fontsize=5, xytext=(2, 2), textcoords="offset points")
            if mine and (provider, *_shape_key(mine[0])) in dense:
                ax.axhline(dense[(provider, *_shape_key(mine[0]))].ms, color=colors[provider], linestyle="--",
                           linewidth=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        style_axis(ax, title, "share of blocks kept", "median time (ms)")
    handles = [plt.Line2D([], [], color=colors[p], marker="o", label=p) for p in providers]
    handles += [plt.Line2D([], [], color="gray", marker="s", fillstyle="none", linestyle="", label="structured"),
                plt.Line2D([], [], color="gray", linestyle="--", label="dense attention")]
    return save_grid(fig, axes, len(panels), handles, out_dir / f"{stem}_sparse.png")


SPARSE_HEADERS = ("provider", "op", "mode", "dtype", "B", "H", "T", "D", "kept", "ms", "dense ms", "vs dense",
                  "mask build ms", "build / attention")
SPARSE_NOTE = ("Every sparse row that ran: `dense ms` is the same provider's dense attention of the same shape "
               "and mode in this run (no mask; blank where the sweep has none), `vs dense` its time over the "
               "row's (> 1: the mask saves time); `mask build ms` is the time to build the row's BlockMask "
               "(once per problem, as a step builds it), `build / attention` its share of the row's time.")


def sparse_lines(rows: Sequence[Row]) -> list[list[str]]:
    """One line per successful sparse row: kept share, time, dense time and ratio, mask build time and share."""
    dense = dense_rows(rows)
    lines = []
    for r in rows:
        if r.status != STATUS_OK or r.op != "sparse":
            continue
        d = dense.get((r.provider, *_shape_key(r)))
        lines.append([r.provider, r.case().op_label(), r.mode, r.dtype, str(r.batch), str(r.heads_q),
                      str(r.seqlen_q), str(r.headdim), "-" if r.kept is None else f"{r.kept:.0%}", _sig(r.ms),
                      "-" if d is None else _sig(d.ms), "-" if d is None else f"{_sig(d.ms / r.ms)}x",
                      _sig(r.mask_ms), "-" if r.mask_ms is None else f"{r.mask_ms / r.ms:.1%}"])
    return lines


def format_sparse_markdown(rows: Sequence[Row]) -> str:
    """The section on sparse rows (:func:`sparse_lines`) as markdown, or "" when no sparse row ran."""
    lines = sparse_lines(rows)
    if not lines:
        return ""
    out = ["## Sparse: against dense attention, and the mask's build cost", "", SPARSE_NOTE, "",
           "| " + " | ".join(SPARSE_HEADERS) + " |", "|" + "|".join("---" if i < 4 else "---:"
                                                               for i in range(len(SPARSE_HEADERS))) + "|"]
    return "\n".join(out + ["| " + " | ".join(line) + " |" for line in lines]) + "\n"


def write_roofline(out_dir: Path, rows: Sequence[Row], ceilings, stem: str = STEM) -> Path | None:
    """``<stem>_roofline.png``: every successful row with FLOPs and bytes on the device's roofline
    (:func:`effattn.profile.roofline_plot`), one colour per provider; None when no row has both."""
    from effattn.profile import Measurement, roofline_plot

    points = [Measurement(label=r.provider, ms=r.ms, flops=r.flops, bytes=r.bytes, peak_bytes=None)
              for r in rows if r.status == STATUS_OK and r.flops and r.bytes]
    if not points:
        return None
    return roofline_plot(points, out_dir / f"{stem}_roofline.png", ceilings,
                         title=f"roofline, {ceilings.device_name}: every timed row")


def write_all(out_dir: Path, rows: Sequence[Row], meta: dict, plots: bool = True,
              stem: str = STEM, ceilings=None) -> tuple[list[Path], list[str]]:
    """Write every output file into ``out_dir`` (created); ``(paths written, notes)``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.csv", out_dir / f"{stem}.md", out_dir / f"{stem}_summary.md"]
    write_json(paths[0], rows, meta)
    write_csv(paths[1], rows, meta)
    paths[2].write_text(format_markdown(rows, meta))
    paths[3].write_text(format_summary_markdown(rows, meta))
    notes = []
    if plots:
        pngs, note = write_plots(out_dir, rows, stem)
        paths += pngs
        notes += [note] if note else []
        if pngs:
            sparse = write_sparse_plot(out_dir, rows, stem)
            roofline = write_roofline(out_dir, rows, ceilings, stem) if ceilings is not None else None
            paths += [p for p in (sparse, roofline) if p]
    return paths, notes
