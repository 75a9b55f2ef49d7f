"""Funnel-Transformer benchmarks: pooled-query attention and Funnel's relative attention layer.

    python -m bench.bench_funnel                     # CPU-sized
    python -m bench.bench_funnel --preset h100 --out bench/results/...   # on a GPU

Part ``pooled``: attention of stride-2 mean-pooled queries (separate [cls]) against full-length keys:
``effattn`` pools inside the kernel (``effattn.pooled_attention``); ``effattn-prepool`` pools in
PyTorch and calls effattn's flash kernel; ``sdpa`` and ``flex`` pool in PyTorch and call
``torch.nn.functional.scaled_dot_product_attention`` / compiled FlexAttention; ``naive`` pools and
materialises the scores. FLOPs: ``4 * B * H * Tp * T * D`` forward, 3.5x that for forward+backward.

Part ``funnel``: one Funnel attention layer (Hugging Face ``FunnelRelMultiheadAttention``, content +
relative position + token type terms, projections and layer norm included), the pooling layer of
block 1 (queries pooled, keys full length), forward+backward: Hugging Face's eager code for both
attention types against the fused layer of ``effattn.integrations.funnel``.

Every output is checked against the first provider's before it is timed; a mismatch is reported
as ``wrong`` and not timed. Writes ``funnel.json`` and ``funnel.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from bench import harness, metadata

PRESETS = {
    "cpu": dict(pooled=[(1, 4, 512, 64), (1, 4, 2048, 64)], funnel=[(1, 256), (1, 1024)], dtype="fp32",
                d_model=256, n_head=4, d_head=64),
    "h100": dict(pooled=[(8, 16, 1024, 64), (1, 16, 16384, 64), (2, 16, 4096, 128)],
                 funnel=[(8, 512), (2, 2048)], dtype="bf16", d_model=768, n_head=12, d_head=64),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 1e-2}  # max abs error vs the first provider


def _pool(x):
    from effattn.reference import QueryPool, pool_queries
    return pool_queries(x, QueryPool(2, "mean", separate_cls=True, truncate=True))


def _pooled_providers(device):
    import torch.nn.functional as F

    import effattn
    from effattn.reference import naive_attention

    providers = {
        "sdpa": lambda q, k, v: F.scaled_dot_product_attention(_pool(q), k, v),
        "effattn": lambda q, k, v: effattn.pooled_attention(q, k, v, separate_cls=True),
        "effattn-prepool": lambda q, k, v: effattn.flash_attention(_pool(q), k, v),
        "naive": lambda q, k, v: naive_attention(_pool(q), k, v),
    }
    if device == "cuda":
        from torch.nn.attention.flex_attention import flex_attention
        flex = torch.compile(flex_attention, dynamic=False)
        providers["flex"] = lambda q, k, v: flex(_pool(q), k, v)
    return providers


def _measure(fn, device, timing):
    ms = harness.time_ms(fn, device, timing)
    peak = harness.peak_memory_bytes(fn, device)
    return ms, peak


def run_pooled(cases, dtype, device, timing, rows, on_row=lambda: None):
    providers = _pooled_providers(device)
    for B, H, T, D in cases:
        Tp = (T + 1) // 2
        flops_fwd = 4 * B * H * Tp * T * D
        q, k, v = (torch.randn(B, H, T, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        dout = torch.randn(B, H, Tp, D, device=device, dtype=dtype)
        expected = None
        for name, fn in providers.items():
            row = dict(part="pooled", provider=name, B=B, H=H, T=T, D=D, Tp=Tp, dtype=str(dtype))
            try:
                out = fn(q, k, v)
                if expected is None:
                    expected = out.detach().float()
                err = (out.detach().float() - expected).abs().max().item()
                if not err <= TOLERANCE[dtype]:
                    rows.append({**row, "status": f"wrong (max err {err:.3g})"})
                    continue
                for mode, mult in (("fwd", 1.0), ("fwd+bwd", 3.5)):
                    if mode == "fwd":
                        def call(fn=fn, qkv=(q, k, v)):
                            with torch.no_grad():
                                return fn(*qkv)
                    else:
                        def call(fn=fn, qkv=(q, k, v), dout=dout):
                            return torch.autograd.grad(fn(*qkv), qkv, dout)
                    ms, peak = _measure(call, device, timing)
                    rows.append({**row, "mode": mode, "ms": ms, "tflops": flops_fwd * mult / ms / 1e9,
                                 "peak_mib": None if peak is None else peak / 2**20, "status": "ok"})
            except Exception as e:  # reported in the table
                if device == "cuda":
                    torch.cuda.empty_cache()
                rows.append({**row, "status": f"error: {type(e).__name__}: {str(e)[:120]}"})
            _progress(rows[-1])
            on_row()


def _funnel_layers(d_model, n_head, d_head, attention_type, device, dtype):
    from bench.ops import funnel_layers

    # the same seeded weights for both attention types: they compute the same function
    return funnel_layers(d_model, n_head, d_head, device, dtype, attention_type=attention_type)


def run_funnel(cases, dtype, device, timing, rows, d_model, n_head, d_head, on_row=lambda: None):
    for B, T in cases:
        x = torch.randn(B, T, d_model, device=device, dtype=dtype, requires_grad=True)
        mask = torch.ones(B, T, device=device, dtype=dtype)
        mask[-1, T - T // 4:] = 0
        types = torch.zeros(B, T, device=device, dtype=torch.long)
        types[:, 0] = 2
        types[:, T // 2:] = 1
        expected = None
        for attention_type in ("relative_shift", "factorized"):
            layer, structure, fused, fused_structure = _funnel_layers(d_model, n_head, d_head, attention_type,
                                                                      device, dtype)
            for name, lay, struct in ((f"hf-{attention_type}", layer, structure),
                                      (f"effattn-{attention_type}", fused, fused_structure)):
                row = dict(part="funnel", provider=name, B=B, T=T, d_model=d_model, H=n_head, D=d_head,
                           dtype=str(dtype), mode="fwd+bwd")

                def call(lay=lay, struct=struct, x=x, mask=mask, types=types):
                    inputs = struct.init_attention_inputs(x, attention_mask=mask, token_type_ids=types)
                    pooled, inputs = struct.pre_attention_pooling(x, inputs)
                    (out,) = lay(pooled, x, x, inputs)
                    return out

                try:
                    out = call()
                    if expected is None:
                        expected = out.detach().float()
                        w = torch.randn_like(out)
                    err = (out.detach().float() - expected).abs().max().item()
                    if not err <= 10 * TOLERANCE[dtype]:
                        rows.append({**row, "status": f"wrong (max err {err:.3g})"})
                        _progress(rows[-1])
                        continue

                    def step(call=call, lay=lay, x=x, w=w):
                        return torch.autograd.grad((call() * w).sum(), [x, *lay.parameters()])

                    ms, peak = _measure(step, device, timing)
                    rows.append({**row, "ms": ms, "peak_mib": None if peak is None else peak / 2**20, "status": "ok"})
                except Exception as e:
                    if device == "cuda":
                        torch.cuda.empty_cache()
                    rows.append({**row, "status": f"error: {type(e).__name__}: {str(e)[:120]}"})
                _progress(rows[-1])
                on_row()


def _progress(row):
    keys = ("part", "provider", "mode", "B", "H", "T", "D", "ms", "tflops", "peak_mib", "status")
    print("  ".join(f"{k}={row[k]:.4g}" if isinstance(row.get(k), float) else f"{k}={row.get(k)}"
                    for k in keys if k in row), flush=True)


def format_markdown(rows, meta) -> str:
    lines = ["# effattn Funnel benchmarks", ""]
    lines += [f"- **{k}**: `{v}`" for k, v in meta.items()]
    lines += ["", "## Pooled-query attention (stride 2, mean, separate [cls])", "",
              "| mode | B | H | T | D | provider | ms | TFLOP/s | peak MiB | vs sdpa | status |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    pooled = [r for r in rows if r["part"] == "pooled"]
    base = {(r.get("mode"), r["B"], r["H"], r["T"], r["D"]): r["ms"] for r in pooled
            if r["provider"] == "sdpa" and r["status"] == "ok"}
    for r in pooled:
        key = (r.get("mode"), r["B"], r["H"], r["T"], r["D"])
        ratio = f"{base[key] / r['ms']:.2f}x" if key in base and r.get("ms") else ""
        lines.append(f"| {r.get('mode', '-')} | {r['B']} | {r['H']} | {r['T']} | {r['D']} | {r['provider']} | "
                     f"{_f(r.get('ms'))} | {_f(r.get('tflops'))} | {_f(r.get('peak_mib'))} | {ratio} | {r['status']} |")
    lines += ["", "## Funnel attention layer, pooling layer of block 1, forward+backward", "",
              "| B | T | provider | ms | peak MiB | vs HF same type | status |", "|---|---|---|---|---|---|---|"]
    funnel = [r for r in rows if r["part"] == "funnel"]
    hf = {(r["B"], r["T"], r["provider"].split("-", 1)[1]): r.get("ms")
          for r in funnel if r["provider"].startswith("hf")}
    for r in funnel:
        ref = hf.get((r["B"], r["T"], r["provider"].split("-", 1)[1]))
        ratio = f"{ref / r['ms']:.2f}x" if ref and r.get("ms") else ""
        lines.append(f"| {r['B']} | {r['T']} | {r['provider']} | {_f(r.get('ms'))} | {_f(r.get('peak_mib'))} | "
                     f"{ratio} | {r['status']} |")
    return "\n".join(lines) + "\n"


def _f(x):
    return "" if x is None else f"{x:.4g}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="sizes (default: h100 on CUDA, cpu otherwise)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--parts", nargs="+", choices=("pooled", "funnel"), default=("pooled", "funnel"))
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset or ("h100" if args.device == "cuda" else "cpu")]
    dtype = DTYPES[preset["dtype"]]
    timing = harness.TimingConfig(cpu_min_run_time_s=0.2, cuda_warmup_ms=10.0, cuda_rep_ms=50.0)
    rows: list[dict] = []
    start = time.perf_counter()
    command = "python -m bench.bench_funnel " + " ".join(argv if argv is not None else sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)

    def write():  # after every part, so that a run stopped by a time limit still leaves its files
        meta = metadata.collect(args.device, command,
                                {"preset": args.preset, "timing": harness.describe_timing(args.device, timing),
                                 "memory": harness.describe_memory(args.device),
                                 "seconds": round(time.perf_counter() - start, 1)})
        (args.out / "funnel.json").write_text(json.dumps({"metadata": meta, "rows": rows}, indent=1) + "\n")
        (args.out / "funnel.md").write_text(format_markdown(rows, meta))
        return meta

    torch.manual_seed(0)
    if "funnel" in args.parts:
        run_funnel(preset["funnel"], dtype, args.device, timing, rows, preset["d_model"], preset["n_head"],
                   preset["d_head"], on_row=write)
    if "pooled" in args.parts:
        run_pooled(preset["pooled"], dtype, args.device, timing, rows, on_row=write)
    print(format_markdown(rows, write()))
    bad = [r for r in rows if r["status"].startswith("wrong")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
