"""A whole Hugging Face Funnel model, eager against effattn's fused attention on the same weights.

``python -m bench.studies.funnel_model`` times a ``FunnelBaseModel`` (random weights, seeded; the
configuration of the Funnel benchmark rows: d_model 768, 12 heads of 64, d_inner 3072, block_sizes
[2, 2], dropout off) forward (no grad) and forward+backward (gradients of every weight), for each
sequence length, in three versions of one model:

* ``eager``: Hugging Face's own attention (``attn_implementation`` has no other choice for Funnel);
* ``band``: ``effattn.integrations.funnel.patch(model)``, the default route (the relative-position
  band kernel, :func:`effattn.relpos_attention`);
* ``features``: ``patch(model, route="features")``, the position term as ``d_model`` extra q/k features.

Before timing, each fused model's output and input-embedding gradient are checked against the eager
model's (float32 tolerances of a whole model). Times are the median of ``--repeats`` calls after a
warm-up; peak memory is torch's CPU allocator's (profiler allocation events) or CUDA's peak. Writes
``funnel_model.json`` (metadata + rows) and ``funnel_model.md`` to ``--out``, after every row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from bench import harness, metadata

SIZES = {  # d_model, n_head, d_head, d_inner, block_sizes
    "base": (768, 12, 64, 3072, (2, 2)),
    "tiny": (64, 2, 32, 128, (1, 1)),  # for the tests
}
SEED = 0
VERSIONS = ("eager", "band", "features")
CHECK_TOL = dict(atol=2e-3, rtol=2e-3)  # float32, a whole model: errors add up over its layers


def make_models(device: str, backend: str | None, size: str = "base"):
    from bench.ops import funnel_models

    d_model, n_head, d_head, d_inner, block_sizes = SIZES[size]
    return funnel_models(d_model, n_head, d_head, device, torch.float32, d_inner=d_inner, block_sizes=block_sizes,
                         backend=backend)


def step_fn(model, embeds: torch.Tensor, mode: str):
    """One call: forward without autograd, or forward + backward into every weight and the embeddings."""
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return model(inputs_embeds=embeds).last_hidden_state
    else:
        x = embeds.detach().requires_grad_()

        def step():
            model.zero_grad(set_to_none=True)
            x.grad = None
            model(inputs_embeds=x).last_hidden_state.sum().backward()
            return x.grad
    return step


def check(models: dict, embeds: torch.Tensor) -> dict:
    """Max abs differences of the fused versions from eager: output, and the embeddings' gradient."""
    ref_out = step_fn(models["eager"], embeds, "fwd")()
    ref_grad = step_fn(models["eager"], embeds, "fwd+bwd")()
    errors = {}
    for name in VERSIONS[1:]:
        out = step_fn(models[name], embeds, "fwd")()
        grad = step_fn(models[name], embeds, "fwd+bwd")()
        torch.testing.assert_close(out, ref_out, **CHECK_TOL, msg=lambda m, n=name: f"{n} output: {m}")
        torch.testing.assert_close(grad, ref_grad, **CHECK_TOL, msg=lambda m, n=name: f"{n} gradient: {m}")
        errors[name] = {"out": float((out - ref_out).abs().max()), "grad": float((grad - ref_grad).abs().max())}
    return errors


def time_s(step, device: str, repeats: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def format_markdown(rows: list[dict], meta: dict) -> str:
    lines = ["# Funnel model: Hugging Face eager vs effattn's fused attention", "",
             f"- {meta['model']}", f"- device `{meta['device']}` ({meta.get('device_name')}), torch "
             f"`{meta['torch']}`, commit `{meta.get('git_commit')}`, {meta['date_utc']}",
             f"- timing: {meta['timing']}", "",
             "| T | mode | eager s | band s | band speed-up | features s | features speed-up | peak MiB eager / band "
             "/ features |", "|---:|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        t, m = r["seconds"], r["peak_mib"]
        peaks = " / ".join("-" if m[n] is None else f"{m[n]:.0f}" for n in VERSIONS)
        lines.append(f"| {r['T']} | {r['mode']} | {t['eager']:.3f} | {t['band']:.3f} | "
                     f"**{t['eager'] / t['band']:.2f}x** | {t['features']:.3f} | {t['eager'] / t['features']:.2f}x | "
                     f"{peaks} |")
    return "\n".join(lines) + "\n"


def write(out: Path, rows: list[dict], meta: dict, t_start: float) -> None:
    meta["wall_s"] = time.perf_counter() - t_start
    (out / "funnel_model.json").write_text(json.dumps({"metadata": meta, "rows": rows}, indent=1) + "\n")
    (out / "funnel_model.md").write_text(format_markdown(rows, meta))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seqlen", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--backend", default=None, help="effattn backend of the fused versions (default: automatic)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", choices=sorted(SIZES), default="base", help="model size (tiny: for the tests)")
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda, got {args.device!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    if args.repeats < 1 or min(args.seqlen) < 2:
        parser.error("--repeats must be >= 1 and every --seqlen >= 2")

    t_start = time.perf_counter()
    cfg, models = make_models(args.device, args.backend, args.size)
    meta = metadata.collect(args.device, " ".join(["python -m bench.studies.funnel_model", *(argv or sys.argv[1:])]), {
        "model": (f"random-init FunnelBaseModel (d_model {cfg.d_model}, {cfg.n_head} heads of {cfg.d_head}, d_inner "
                  f"{cfg.d_inner}, block_sizes {cfg.block_sizes}, attention_type {cfg.attention_type}, seed {SEED}), "
                  "float32, "
                  f"batch 1; fused versions on backend {args.backend or 'automatic'}"),
        "timing": f"median of {args.repeats} calls after one warm-up (time.perf_counter)",
        "memory": harness.describe_memory(args.device) + " (the C++ kernels' scratch is not counted)",
    })
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for T in args.seqlen:
        embeds = torch.randn(1, T, cfg.d_model, generator=torch.Generator().manual_seed(SEED + T)).to(args.device)
        errors = check(models, embeds)
        for mode in ("fwd", "fwd+bwd"):
            seconds, peak = {}, {}
            for name in VERSIONS:
                step = step_fn(models[name], embeds, mode)
                seconds[name] = time_s(step, args.device, args.repeats)
                nbytes = harness.peak_memory_bytes(step, args.device)
                peak[name] = None if nbytes is None else nbytes / harness.MIB
            rows.append({"T": T, "mode": mode, "seconds": seconds, "peak_mib": peak, "max_abs_err": errors})
            print(f"T={T} {mode}: " + ", ".join(f"{n} {s:.3f} s" for n, s in seconds.items())
                  + f" | band {seconds['eager'] / seconds['band']:.2f}x, features "
                  f"{seconds['eager'] / seconds['features']:.2f}x", flush=True)
            write(args.out, rows, meta, t_start)  # after every row: a run cut short keeps what it measured
    print(f"wrote {args.out}/funnel_model.json, funnel_model.md in {meta['wall_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
