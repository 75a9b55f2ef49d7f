"""Block-sparse attention benchmarks: time against the kept-block fraction, and the cost of building masks.

    python -m bench.bench_sparse                     # CPU-sized
    python -m bench.bench_sparse --preset h100 --out bench/results/...   # on a GPU

Part ``density``: block-sparse attention (fwd, fwd+bwd) over random block masks at several kept
fractions and over structured masks (causal, a causal sliding window of T/8, BigBird). Random masks
keep exactly ``max(1, round(fraction * nKb))`` kv blocks in every query-block row (drawn per head from
a seeded ``torch.Generator``, shared over the batch), always including the block of the diagonal, so
that every query row sees a key; the fraction reported is the mask's own (``1 - sparsity()``).
Providers: ``effattn`` (``effattn.sparse_attention``, automatic backend: the Triton kernels on CUDA,
the chunked reference on CPU), ``flex`` (FlexAttention compiled with ``torch.compile``, with
``BlockMask.to_flex()``, forward tiles set to the mask's blocks; CUDA only. torch 2.13's default
H100 backward config of FlexAttention needs blocks that are multiples of 128: with the h100 preset's
(128, 64) its fwd+bwd is expected to fail and is reported as an error; ``--block 128 128`` compares
it), ``sdpa-masked`` (torch SDPA with the dense bool mask
``BlockMask.to_dense()``: O(T^2) mask memory, the dense baseline) and, once per size,
``effattn-dense`` (``effattn.flash_attention`` with no mask: dense flash attention, the reference
point of the speed-ups).

FLOPs are counted on the kept work: ``4 * B * H * D * BLOCK_Q * BLOCK_KV * kept_blocks`` forward (kept
blocks summed over the mask's heads and broadcast over the batch; PARTIAL blocks count whole), 3.5x
that for forward+backward (the backward recomputes the scores: 2.5x the forward). Every provider of a
mask is charged the same FLOPs, however much it really computes (``sdpa-masked`` computes all of the
T^2 scores), so TFLOP/s compare times. ``effattn-dense`` is charged ``4 * B * H * T^2 * D``.
``vs dense`` is effattn-dense's time / the row's time at the same size and mode. ``mask MiB``: the
mask as the provider holds it (effattn and flex: the compressed block lists; sdpa-masked: the dense
bool mask), not counted in ``peak MiB`` (made before the call).

Part ``build``: the time to build masks at the preset's sizes (``BlockMask.causal``,
``sliding_window``, ``from_segments`` of packed documents, ``bigbird``, and a random mask: top-k of
random block scores then ``from_dense_blocks``, as a learned block predictor would), against the time
of effattn's attention with that mask, so that the mask's share of a step can be read off.

Every output is checked against the first provider's (``effattn-dense`` against torch SDPA with no
mask) before it is timed; a mismatch is reported as ``wrong`` and not timed, and the script exits
with 1. Writes ``sparse.json`` and ``sparse.md`` to ``--out`` after every row, and the plot
``sparse_density.png`` (time against kept fraction) after every size of the density part.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from pathlib import Path

import torch

from bench import harness, metadata

PRESETS = {
    "cpu": dict(cases=[(1, 2, 512, 64), (1, 2, 1024, 64)], dtype="fp32", block=(64, 64),
                fractions=(1.0, 0.5, 0.25, 0.1, 0.05), build_fraction=0.1),
    "h100": dict(cases=[(4, 16, 4096, 64), (4, 16, 4096, 128), (4, 16, 16384, 64), (4, 16, 16384, 128)],
                 dtype="bf16", block=(128, 64), fractions=(1.0, 0.5, 0.25, 0.1, 0.05), build_fraction=0.1),
    "tiny": dict(cases=[(1, 2, 256, 32)], dtype="fp32", block=(64, 64), fractions=(1.0, 0.25), build_fraction=0.25),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 1e-2}  # max abs error vs the first provider
PROVIDERS = ("effattn", "flex", "sdpa-masked")  # per mask, in this order; the first is the reference output
DENSE = "effattn-dense"
SEED = 0
BWD_FACTOR = 3.5  # forward+backward FLOPs / forward FLOPs
N_DOCUMENTS = 8  # packed documents per sequence, for from_segments


class Skipped(Exception):
    """A provider that cannot run here (reported as ``skipped: ...``)."""


# ----------------------------------------------------------------------------------------------
# masks
# ----------------------------------------------------------------------------------------------
def random_mask(H, T, block, fraction, generator, device):
    """Per head (batch 1, broadcast), ``max(1, round(fraction * nKb))`` kept kv blocks in every query-block
    row, the diagonal's among them; every kept block FULL."""
    from effattn import BlockMask

    bq, bk = block
    nq, nk = math.ceil(T / bq), math.ceil(T / bk)
    keep = max(1, round(fraction * nk))
    scores = torch.rand(1, H, nq, nk, generator=generator)
    rows = torch.arange(nq)
    scores[:, :, rows, (rows * bq) // bk] = 2.0  # the block of each q block's first row: always kept
    picked = scores.topk(keep, dim=-1).indices
    blocks = torch.zeros(1, H, nq, nk, dtype=torch.bool).scatter_(-1, picked, True)
    return BlockMask.from_dense_blocks(blocks.to(device), T, T, block)


def _documents(B, T, generator):
    """Segment ids ``(B, T)`` of ``N_DOCUMENTS`` packed documents of random lengths per sequence."""
    cuts = torch.stack([torch.randperm(T - 1, generator=generator)[:N_DOCUMENTS - 1].sort().values + 1
                        for _ in range(B)])
    ids = torch.zeros(B, T, dtype=torch.int32)
    ids.scatter_add_(1, cuts.long(), torch.ones_like(cuts, dtype=torch.int32))
    return ids.cumsum(1, dtype=torch.int32)


def structured_masks(B, H, T, block, device):
    """``{name: builder}``: the structured masks, each builder a function of no argument."""
    from effattn import BlockMask

    bk = block[1]
    seg = _documents(B, T, torch.Generator().manual_seed(SEED)).to(device)
    return {
        "causal": lambda: BlockMask.causal(T, T, block, device=device),
        "sliding T/8": lambda: BlockMask.sliding_window(T, T, T // 8, 0, block, device=device),
        "bigbird": lambda: BlockMask.bigbird(T, T, bk, 2 * bk, 3, block, torch.Generator().manual_seed(SEED),
                                             heads=H, device=device),
        "documents": lambda: BlockMask.from_segments(seg, block_size=block),
    }


def _mask_bytes(bm) -> int:
    from effattn.block_mask import _LIST_NAMES
    return sum(getattr(bm, name).nbytes for name in _LIST_NAMES)


def kept_flops(bm, B, H, D) -> int:
    """Forward FLOPs of the kept blocks: ``4 * D * BLOCK_Q * BLOCK_KV`` per kept (b, h, q block, kv block)."""
    Bm, Hm = bm.shape[:2]
    kept = int(bm.kept_blocks().sum()) * (B // Bm) * (H // Hm)
    return 4 * D * bm.block_size[0] * bm.block_size[1] * kept


# ----------------------------------------------------------------------------------------------
# providers
# ----------------------------------------------------------------------------------------------
_FLEX = None


def _flex():
    global _FLEX
    if _FLEX is None:
        import torch._dynamo.config as dynamo_config
        from torch.nn.attention.flex_attention import flex_attention

        # every mask's mask_mod is a new closure: one compilation each, beyond dynamo's default limit of 8
        for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                     "accumulated_cache_size_limit"):
            if hasattr(dynamo_config, name):
                setattr(dynamo_config, name, max(getattr(dynamo_config, name), 512))
        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def prepare(name, bm, device):
    """``(fn(q, k, v), mask bytes)`` of provider ``name`` for mask ``bm``; raises Skipped."""
    import torch.nn.functional as F

    import effattn

    if name == "effattn":
        return (lambda q, k, v: effattn.sparse_attention(q, k, v, bm)), _mask_bytes(bm)
    if name == "flex":
        if device != "cuda":
            raise Skipped("needs CUDA")
        flex, fm = _flex(), bm.to_flex()
        # the forward's tiles = the mask's blocks (flex's default H100 tile may be wider than a 64 kv block)
        options = {"fwd_BLOCK_M": min(bm.block_size[0], 128), "fwd_BLOCK_N": min(bm.block_size[1], 128)}
        return (lambda q, k, v: flex(q, k, v, block_mask=fm, kernel_options=options)), _mask_bytes(bm)
    if name == "sdpa-masked":
        dense = bm.to_dense()
        return (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=dense)), dense.nbytes
    raise ValueError(f"unknown provider {name!r}")


def effattn_backend(B, H, T, D, dtype, device) -> str:
    """The backend ``effattn.sparse_attention`` picks on its own for this input."""
    from effattn.backends import AttentionCall, select_backend

    call = AttentionCall(device=torch.device(device), dtype=dtype, head_dim_qk=D, head_dim_v=D, Tq=T, Tk=T,
                         dropout=False, batch=B, heads=H)
    return select_backend(call).name


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------
def _sparse(q, k, v, bm):
    import effattn
    return effattn.sparse_attention(q, k, v, bm)


def _measure(fn, device, timing):
    ms = harness.time_ms(fn, device, timing)
    peak = harness.peak_memory_bytes(fn, device)
    return ms, peak


def _calls(fn, qkv, dout):
    def fwd():
        with torch.no_grad():
            return fn(*qkv)

    def fwd_bwd():
        return torch.autograd.grad(fn(*qkv), qkv, dout)

    return (("fwd", 1.0, fwd), ("fwd+bwd", BWD_FACTOR, fwd_bwd))


def _time_checked(fn, expected, qkv, dout, dtype, device, timing, row, rows, on_row):
    """Check ``fn``'s output against ``expected`` (None: it becomes the reference), then time both modes.
    Appends the rows; returns the reference output."""
    out = fn(*qkv)
    if expected is None:
        expected = out.detach().float()
    err = (out.detach().float() - expected).abs().max().item()
    del out
    if not err <= TOLERANCE[dtype]:
        rows.append({**row, "status": f"wrong (max err {err:.3g})"})
        _progress(rows[-1])
        on_row()
        return expected
    for mode, mult, call in _calls(fn, qkv, dout):
        try:
            ms, peak = _measure(call, device, timing)
            rows.append({**row, "mode": mode, "ms": ms, "tflops": row["flops_fwd"] * mult / ms / 1e9,
                         "peak_mib": None if peak is None else peak / 2**20, "max_err": err, "status": "ok"})
        except Exception as e:  # one mode may fail where the other runs (e.g. a backward that does not compile)
            rows.append(_error_row(e, {**row, "mode": mode}, device))
        _progress(rows[-1])
        on_row()
    return expected


def _error_row(e, row, device):
    if device == "cuda":
        torch.cuda.empty_cache()
    return {**row, "status": f"error: {type(e).__name__}: {str(e)[:120]}"}


def _speedups(rows):
    """``vs_dense`` of every ok density row: effattn-dense's time at its size and mode / the row's time."""
    def key(r):
        return (r["B"], r["H"], r["T"], r["D"], r.get("mode"))

    dense = {key(r): r["ms"] for r in rows if r["part"] == "density" and r["provider"] == DENSE
             and r["status"] == "ok"}
    for r in rows:
        if r["part"] == "density" and r["status"] == "ok" and key(r) in dense:
            r["vs_dense"] = dense[key(r)] / r["ms"]


def run_density(cases, dtype, block, fractions, device, timing, rows, attn_ms, on_row=lambda: None,
                on_case=lambda: None):
    import torch.nn.functional as F

    import effattn

    for B, H, T, D in cases:
        qkv = tuple(torch.randn(B, H, T, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        dout = torch.randn(B, H, T, D, device=device, dtype=dtype)
        base = dict(part="density", B=B, H=H, T=T, D=D, block=list(block), dtype=str(dtype),
                    backend=effattn_backend(B, H, T, D, dtype, device))

        row = {**base, "provider": DENSE, "mask": "dense (no mask)", "kept": 1.0, "sparsity": 0.0,
               "flops_fwd": 4 * B * H * T * T * D, "mask_mib": 0.0}
        try:
            with torch.no_grad():
                expected = F.scaled_dot_product_attention(*qkv).float()
            _time_checked(lambda q, k, v: effattn.flash_attention(q, k, v), expected, qkv, dout, dtype, device,
                          timing, row, rows, on_row)
        except Exception as e:  # reported in the table
            rows.append(_error_row(e, row, device))
            _progress(rows[-1])
            on_row()

        generator = torch.Generator().manual_seed(SEED)
        builders = {f"random {f:g}": functools.partial(random_mask, H, T, block, f, generator, device)
                    for f in fractions}
        structured = structured_masks(B, H, T, block, device)
        builders.update({name: structured[name] for name in ("causal", "sliding T/8", "bigbird")})
        seen = set()
        for mask_name, build in builders.items():
            bm = build()
            if mask_name.startswith("random"):  # two fractions that round to the same blocks: one row
                signature = bm.kept_blocks().sum().item()
                if signature in seen:
                    continue
                seen.add(signature)
            sparsity = bm.sparsity()
            mask_row = {**base, "mask": mask_name, "kept": 1.0 - sparsity, "sparsity": sparsity,
                        "flops_fwd": kept_flops(bm, B, H, D)}
            expected = None
            for name in PROVIDERS:
                row = {**mask_row, "provider": name}
                try:
                    fn, nbytes = prepare(name, bm, device)
                    row["mask_mib"] = nbytes / 2**20
                    n_before = len(rows)
                    expected = _time_checked(fn, expected, qkv, dout, dtype, device, timing, row, rows, on_row)
                    if name == "effattn":
                        for r in rows[n_before:]:
                            if r["status"] == "ok":
                                attn_ms[(B, H, T, D, mask_name, r["mode"])] = r["ms"]
                    del fn
                except Skipped as e:
                    rows.append({**row, "status": f"skipped: {e}"})
                    _progress(rows[-1])
                    on_row()
                except Exception as e:
                    rows.append(_error_row(e, row, device))
                    _progress(rows[-1])
                    on_row()
                if device == "cuda":
                    torch.cuda.empty_cache()
            del bm
        on_case()


def run_build(cases, dtype, block, fraction, device, timing, rows, attn_ms, on_row=lambda: None):

    for B, H, T, D in cases:
        builders = structured_masks(B, H, T, block, device)
        builders[f"random {fraction:g}"] = functools.partial(random_mask, H, T, block, fraction,
                                                             torch.Generator().manual_seed(SEED), device)
        qkv = dout = None
        for mask_name, build in builders.items():
            row = dict(part="build", mask=mask_name, B=B, H=H, T=T, D=D, block=list(block), dtype=str(dtype))
            try:
                bm = build()
                row["kept"] = 1.0 - bm.sparsity()
                row["build_ms"] = harness.time_ms(build, device, timing)
                for mode in ("fwd", "fwd+bwd"):
                    key = (B, H, T, D, mask_name, mode)
                    if key not in attn_ms:  # not timed by the density part: time it here
                        if qkv is None:
                            qkv = tuple(torch.randn(B, H, T, D, device=device, dtype=dtype, requires_grad=True)
                                        for _ in range(3))
                            dout = torch.randn(B, H, T, D, device=device, dtype=dtype)
                        fn = functools.partial(_sparse, bm=bm)
                        calls = {m: c for m, _, c in _calls(fn, qkv, dout)}
                        attn_ms[key] = harness.time_ms(calls[mode], device, timing)
                    row[f"attn_{mode}_ms"] = attn_ms[key]
                    row[f"build_over_{mode}"] = row["build_ms"] / attn_ms[key]
                row["status"] = "ok"
                rows.append(row)
            except Exception as e:
                rows.append(_error_row(e, row, device))
            _progress(rows[-1])
            on_row()


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------
def _progress(row):
    keys = ("part", "provider", "mask", "mode", "B", "H", "T", "D", "kept", "ms", "tflops", "vs_dense", "peak_mib",
            "build_ms", "status")
    print("  ".join(f"{k}={row[k]:.4g}" if isinstance(row.get(k), float) else f"{k}={row.get(k)}"
                    for k in keys if k in row), flush=True)


def _f(x):
    return "" if x is None else f"{x:.4g}"


def format_markdown(rows, meta) -> str:
    lines = ["# effattn block-sparse attention benchmarks", ""]
    lines += [f"- **{k}**: `{v}`" for k, v in meta.items()]
    lines += ["", "## Time against the kept-block fraction", "",
              f"TFLOP/s on the kept work: `4*B*H*D*BLOCK_Q*BLOCK_KV*kept_blocks` forward, x{BWD_FACTOR} forward+"
              "backward, the same for every provider of a mask; effattn-dense: `4*B*H*T^2*D`. `vs dense`: "
              "effattn-dense's time / the row's. `mask MiB`: the mask as the provider holds it (not in peak). "
              "effattn's backend (automatic): "
              f"{', '.join(sorted({r['backend'] for r in rows if r['part'] == 'density'})) or '-'}.", "",
              "| mode | B | H | T | D | block | mask | kept | provider | ms | TFLOP/s | vs dense | peak MiB | mask MiB "
              "| status |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["part"] != "density":
            continue
        vs = f"{r['vs_dense']:.2f}x" if r.get("vs_dense") else ""
        lines.append(f"| {r.get('mode', '-')} | {r['B']} | {r['H']} | {r['T']} | {r['D']} | "
                     f"{'x'.join(map(str, r['block']))} | {r['mask']} | {_f(r.get('kept'))} | {r['provider']} | "
                     f"{_f(r.get('ms'))} | {_f(r.get('tflops'))} | {vs} | {_f(r.get('peak_mib'))} | "
                     f"{_f(r.get('mask_mib'))} | {r['status']} |")
    lines += ["", "## Building the mask, against effattn's attention with it", "",
              "| B | H | T | D | block | mask | kept | build ms | attn fwd ms | build / fwd | attn fwd+bwd ms "
              "| build / fwd+bwd | status |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["part"] != "build":
            continue
        ratio = [f"{100 * r[k]:.3g} %" if r.get(k) is not None else "" for k in ("build_over_fwd",
                                                                             "build_over_fwd+bwd")]
        lines.append(f"| {r['B']} | {r['H']} | {r['T']} | {r['D']} | {'x'.join(map(str, r['block']))} | "
                     f"{r['mask']} | {_f(r.get('kept'))} | {_f(r.get('build_ms'))} | {_f(r.get('attn_fwd_ms'))} | "
                     f"{ratio[0]} | {_f(r.get('attn_fwd+bwd_ms'))} | {ratio[1]} | {r['status']} |")
    return "\n".join(lines) + "\n"


def write_plot(path: Path, rows) -> str | None:
    """Time against kept fraction (log-log), one panel per size and mode; returns a note when not written."""
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed: plot skipped"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["part"] == "density" and r["status"] == "ok"]
    panels = {}
    for r in ok:
        panels.setdefault((r["mode"], r["B"], r["H"], r["T"], r["D"]), []).append(r)
    if not panels:
        return "no successful density rows: plot skipped"
    from bench.report import panel_grid, save_grid, style_axis

    providers = list(dict.fromkeys(r["provider"] for r in ok))
    colors = {p: f"C{i % 10}" for i, p in enumerate(providers)}
    fig, axes = panel_grid(len(panels))
    for ax, ((mode, B, H, T, D), group) in zip(axes.flat, sorted(panels.items())):
        for p in providers:
            mine = [r for r in group if r["provider"] == p]
            if p == DENSE:
                for r in mine:
                    ax.axhline(r["ms"], color=colors[p], linestyle="--", linewidth=1)
                continue
            random = sorted((r["kept"], r["ms"]) for r in mine if r["mask"].startswith("random"))
            if random:
                ax.plot(*zip(*random), "o-", color=colors[p], markersize=3)
            for r in mine:
                if not r["mask"].startswith("random"):
                    ax.plot(r["kept"], r["ms"], "s", color=colors[p], markersize=4, fillstyle="none")
                    ax.annotate(r["mask"], (r["kept"], r["ms"]), fontsize=5, xytext=(2, 2),
                                textcoords="offset points")
        ax.set_xscale("log")
        ax.set_yscale("log")
        style_axis(ax, f"{mode} B={B} H={H} T={T} D={D}", "kept-block fraction", "ms")
    handles = [plt.Line2D([], [], color=colors[p], marker="" if p == DENSE else "o",
                          linestyle="--" if p == DENSE else "-", label=p) for p in providers]
    handles.append(plt.Line2D([], [], color="gray", marker="s", fillstyle="none", linestyle="", label="structured"))
    save_grid(fig, axes, len(panels), handles, path)
    return None


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"a kept fraction must lie in (0, 1], got {value:g}")
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="sizes (default: h100 on CUDA, cpu otherwise)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--parts", nargs="+", choices=("density", "build"), default=("density", "build"))
    parser.add_argument("--fractions", nargs="+", type=_fraction, default=None,
                        help="kept fractions of the random masks (default: the preset's)")
    parser.add_argument("--block", nargs=2, type=int, default=None, metavar=("BLOCK_Q", "BLOCK_KV"),
                        help="the masks' block size (default: the preset's)")
    parser.add_argument("--min-run-time", type=float, default=0.2,
                        help="CPU timing: blocked_autorange's min_run_time in seconds (default 0.2)")
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    args = parser.parse_args(argv)
    if args.device not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda, got {args.device!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    if not args.min_run_time > 0:
        parser.error(f"--min-run-time must be > 0, got {args.min_run_time:g}")
    if args.block is not None and any(b < 16 or b & (b - 1) for b in args.block):
        parser.error(f"--block sizes must be powers of two >= 16, got {args.block}")
    preset = dict(PRESETS[args.preset or ("h100" if args.device == "cuda" else "cpu")])
    if args.block is not None:
        preset["block"] = tuple(args.block)
    dtype = DTYPES[preset["dtype"]]
    fractions = tuple(args.fractions or preset["fractions"])
    timing = harness.TimingConfig(cpu_min_run_time_s=args.min_run_time, cuda_warmup_ms=10.0, cuda_rep_ms=50.0)
    rows: list[dict] = []
    attn_ms: dict = {}  # effattn's times per (B, H, T, D, mask, mode), shared by the two parts
    start = time.perf_counter()
    command = "python -m bench.bench_sparse " + " ".join(argv if argv is not None else sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []

    def write():  # after every row, so that a run stopped by a time limit still leaves its files
        _speedups(rows)
        meta = metadata.collect(args.device, command,
                                {"preset": args.preset, "dtype": preset["dtype"], "block": list(preset["block"]),
                                 "fractions": list(fractions), "seed": SEED,
                                 "timing": harness.describe_timing(args.device, timing),
                                 "memory": harness.describe_memory(args.device),
                                 "seconds": round(time.perf_counter() - start, 1), "notes": notes})
        (args.out / "sparse.json").write_text(json.dumps({"metadata": meta, "rows": rows}, indent=1) + "\n")
        (args.out / "sparse.md").write_text(format_markdown(rows, meta))
        return meta

    def plot():
        note = write_plot(args.out / "sparse_density.png", rows)
        if note and note not in notes:
            notes.append(note)
            print(note, flush=True)

    torch.manual_seed(SEED)
    if "density" in args.parts:
        run_density(preset["cases"], dtype, preset["block"], fractions, args.device, timing, rows, attn_ms,
                    on_row=write, on_case=plot)
    if "build" in args.parts:
        run_build(preset["cases"], dtype, preset["block"], preset["build_fraction"], args.device, timing, rows,
                  attn_ms, on_row=write)
    print(format_markdown(rows, write()))
    bad = [r for r in rows if r["status"].startswith("wrong")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
