"""Learned block-mask predictors on a small model's attention: recall against block sparsity, and their cost.

    python -m bench.studies.predictors                   # CPU-sized (about a minute on 2 cores)
    python -m bench.studies.predictors --preset tiny     # seconds, for the tests

The model is a randomly initialised ``transformers`` BERT encoder (seeded; nothing is downloaded), fed
real English text found on this machine: this repository's README.md followed by the docstrings of a
few standard-library modules, tokenised byte-level (ids = bytes + 4 special ids) and cut into sequences
of ``T`` bytes. Forward hooks on every layer's self-attention ``query`` / ``key`` / ``value`` Linear
capture the projected ``q, k, v (B, H, T, D)``. BERT attends bidirectionally: every metric is
non-causal. NOTE: the weights are random (``initializer_range`` of the preset, larger than BERT's 0.02
so that attention is not uniform); the recall here is that of a random model's attention, not a
trained one's, and says how well the predictors follow a given attention, not what a trained model
would allow.

The first ``n_train`` sequences fit, per layer, a ``SparseFinder`` (``sf_steps`` hinge-loss steps, then
k-means for each cluster count of the sweep, the projections shared) and a ``BlockGate`` (``gate_steps``
KL steps); the other ``n_eval`` sequences are evaluated. Operating points:

* ``sparsefinder``: ``(n_clusters, top_c)`` of ``sf_points``; ``sparsefinder+window``: the same united
  with a sliding window of ``window`` tokens each side; ``sparsefinder-top_k``: at ``sf_top_k_point``,
  the ``top_k`` kv blocks per q block with the most token pairs sharing a cluster.
* ``gate``: ``top_k`` kv blocks per q block (diagonal kept); ``gate-thr``: gate probability thresholds.
* ``oracle``: the ``top_k`` kv blocks of the true attention mass (computed densely): the best any
  predictor keeping that many blocks can do.

Per row: ``sparsity`` (``block_sparsity``, the share of blocks cut), ``recall`` (``attention_recall``:
mean share of each query row's softmax mass inside the mask), ``exact`` (``exact_row_recall``: rows
with recall >= 0.999), ``pred_ms`` (the predictor's ``predict`` on the eval batch), ``sparse_ms``
(``effattn.sparse_attention`` with the predicted mask) and ``dense_ms`` (``effattn.flash_attention``,
no mask) on the same batch; ``pred_flops`` (the predictor's analytic ``predict_flops``), ``saved_flops``
(``saved_attention_flops``: the forward attention FLOPs of the blocks its mask cuts) and their ratio
``pred_per_saved_flops`` (the prediction's cost as a share of the work it saves, device-independent),
and ``pred_per_dense_time`` (measured). On CPU effattn runs the chunked reference, whose time does not fall with
sparsity: the CPU times say what prediction costs next to a reference attention, not the GPU's ratios.
Writes ``predictors.json`` (metadata + rows) and ``predictors.md`` after every row, and
``predictors_recall.png`` (recall against sparsity, one curve per predictor and layer) at the end.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import sys
import time
from pathlib import Path

import torch

from bench import harness, metadata
from bench.bench_attention import positive_float, positive_int

PRESETS = {
    "cpu": dict(T=512, layers=2, hidden=128, heads=4, n_train=6, n_eval=2, block=32, sf_steps=100, gate_steps=300,
                sf_points=((4, 1), (8, 1), (16, 1), (16, 2)), sf_top_k_point=(16, 1), window=32,
                gate_top_k=(1, 2, 4, 8),
                gate_thresholds=(0.1, 0.02), min_run_time=0.05),
    "tiny": dict(T=128, layers=1, hidden=64, heads=2, n_train=2, n_eval=1, block=16, sf_steps=3, gate_steps=10,
                 sf_points=((4, 1), (8, 2)), sf_top_k_point=(8, 2), window=16, gate_top_k=(1, 4, 8),
                 gate_thresholds=(0.05,),
                 min_run_time=0.01),
}
TEXT_MODULES = ("inspect", "collections", "functools", "itertools", "argparse", "json", "pathlib",
                "dataclasses", "threading", "subprocess", "unittest", "logging", "re", "random", "statistics")
N_SPECIAL = 4  # ids 0..3 reserved (pad, cls, sep, mask); byte b -> b + N_SPECIAL
INITIALIZER_RANGE = 0.2
SEED = 0
REPO_ROOT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------------------
# text, model, q / k / v
# ----------------------------------------------------------------------------------------------
def corpus_text() -> str:
    """README.md and standard-library docstrings: real English text, available offline."""
    parts = []
    readme = REPO_ROOT / "README.md"
    if readme.exists():
        parts.append(readme.read_text(encoding="utf-8", errors="replace"))
    for name in TEXT_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        parts.append(inspect.getdoc(mod) or "")
        for _, obj in sorted(vars(mod).items()):
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and getattr(obj, "__module__", None) == name:
                parts.append(inspect.getdoc(obj) or "")
    return "\n\n".join(p for p in parts if p)


def sequences(n: int, T: int) -> torch.Tensor:
    """``(n, T)`` byte-level token ids of consecutive pieces of :func:`corpus_text`."""
    data = corpus_text().encode("utf-8")
    if len(data) < n * T:
        raise SystemExit(f"only {len(data)} bytes of text, need {n * T}")
    ids = torch.tensor(list(data[:n * T]), dtype=torch.long) + N_SPECIAL
    return ids.view(n, T)


def make_model(T, layers, hidden, heads):
    from transformers import BertConfig, BertModel

    torch.manual_seed(SEED)
    config = BertConfig(vocab_size=256 + N_SPECIAL, hidden_size=hidden, num_attention_heads=heads,
                        num_hidden_layers=layers, intermediate_size=2 * hidden, max_position_embeddings=max(T, 512),
                        initializer_range=INITIALIZER_RANGE, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return BertModel(config, add_pooling_layer=False).eval()


@torch.no_grad()
def capture_qkv(model, ids) -> list[dict[str, torch.Tensor]]:
    """Per layer ``{"q", "k", "v"}``, each ``(B, H, T, D)`` float32, from hooks on the Linear outputs."""
    H = model.config.num_attention_heads
    found: list[dict[str, torch.Tensor]] = [{} for _ in model.encoder.layer]
    handles = []

    def hook(layer, name):
        def fn(_module, _inputs, out):
            B, T, C = out.shape
            found[layer][name] = out.detach().view(B, T, H, C // H).transpose(1, 2).contiguous().float()
        return fn

    for i, layer in enumerate(model.encoder.layer):
        attn = layer.attention.self
        for name, lin in (("q", attn.query), ("k", attn.key), ("v", attn.value)):
            handles.append(lin.register_forward_hook(hook(i, name)))
    try:
        model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return found


# ----------------------------------------------------------------------------------------------
# predictors
# ----------------------------------------------------------------------------------------------
def oracle_mask(q, k, block, top_k):
    """The ``top_k`` kv blocks of each q block with the most true attention mass (dense computation)."""
    from effattn import BlockMask

    B, H, T, D = q.shape
    p = torch.softmax(q @ k.transpose(-1, -2) / D ** 0.5, dim=-1)
    nb = T // block
    mass = p.view(B, H, nb, block, nb, block).sum(dim=(3, 5))
    picked = mass.topk(min(top_k, nb), dim=-1).indices
    keep = torch.zeros_like(mass, dtype=torch.bool).scatter_(-1, picked, True)
    return BlockMask.from_dense_blocks(keep, T, T, (block, block))


def operating_points(cfg, layer, train, heads, head_dim):
    """``[(predictor, setting, predict(q, k), flops(B, T))]`` of one layer, fitted on ``train`` (q and k
    lists); ``flops`` is the predictor's analytic ``predict_flops`` (None for the dense oracle)."""
    from effattn.sparsity import BlockGate, SparseFinder

    block = cfg["block"]
    qs, ks = train
    points = []
    base = SparseFinder(heads, head_dim, rank=4, n_clusters=4, margin=10.0, seed=SEED).to(qs[0].device)
    base.fit(qs, ks, steps=cfg["sf_steps"], lr=3e-2, clusters=False)
    for C, top_c in cfg["sf_points"]:
        sf = SparseFinder(heads, head_dim, rank=4, n_clusters=C, top_c=top_c, margin=10.0, seed=SEED).to(qs[0].device)
        sf.load_state_dict({**base.state_dict(), "centroids": sf.centroids}, strict=False)
        sf.fit_clusters(qs, ks)
        def flops(B, T, sf=sf):
            return sf.predict_flops(T, T, batch=B, block_size=block)

        points.append(("sparsefinder", f"C={C} top_c={top_c}",
                       lambda q, k, sf=sf: sf.predict(q, k, block_size=block), flops))
        points.append(("sparsefinder+window", f"C={C} top_c={top_c} w={cfg['window']}",
                       lambda q, k, sf=sf: sf.predict(q, k, window=cfg["window"], block_size=block), flops))
        if (C, top_c) == cfg["sf_top_k_point"]:
            for top_k in cfg["gate_top_k"]:
                points.append(("sparsefinder-top_k", f"C={C} top_c={top_c} top_k={top_k}",
                               lambda q, k, sf=sf, t=top_k: sf.predict(q, k, block_size=block, top_k=t),
                               lambda B, T, sf=sf, t=top_k: sf.predict_flops(T, T, batch=B, block_size=block,
                                                                             top_k=t)))
    gate = BlockGate(heads, head_dim, block_size=(block, block)).to(qs[0].device)
    torch.manual_seed(SEED + layer)
    gate.reset_parameters()
    gate.fit(qs, ks, steps=cfg["gate_steps"], lr=1e-2)

    def gate_flops(B, T):
        return gate.predict_flops(T, T, batch=B)

    for top_k in cfg["gate_top_k"]:
        points.append(("gate", f"top_k={top_k}", lambda q, k, t=top_k: gate.predict(q, k, top_k=t), gate_flops))
        points.append(("oracle", f"top_k={top_k}", lambda q, k, t=top_k: oracle_mask(q, k, block, t), None))
    for thr in cfg["gate_thresholds"]:
        points.append(("gate-thr", f"threshold={thr:g}", lambda q, k, t=thr: gate.predict(q, k, threshold=t),
                       gate_flops))
    return points


def evaluate(layer, points, q, k, v, cfg, device, timing, fit_s, rows, on_row):
    """Append one row per operating point of ``points`` on the eval batch ``q, k, v``."""
    import effattn
    from effattn.sparsity import attention_recall, block_sparsity, exact_row_recall, saved_attention_flops

    B, H, T, D = q.shape
    dense_ms = harness.time_ms(lambda: effattn.flash_attention(q, k, v), device, timing)
    for predictor, setting, predict, flops in points:
        bm = predict(q, k)
        pred_flops = None if flops is None else flops(B, T)
        saved_flops = saved_attention_flops(bm, D, batch=B, heads=H)
        pred_ms = harness.time_ms(lambda predict=predict: predict(q, k), device, timing)
        sparse_ms = harness.time_ms(lambda bm=bm: effattn.sparse_attention(q, k, v, bm), device, timing)
        r = {"layer": layer, "predictor": predictor, "setting": setting, "B": q.shape[0], "H": q.shape[1],
             "T": q.shape[2], "D": q.shape[3], "block": cfg["block"], "sparsity": block_sparsity(bm),
             "recall": attention_recall(q, k, bm), "exact_row_recall": exact_row_recall(q, k, bm),
             "pred_ms": pred_ms, "sparse_ms": sparse_ms, "dense_ms": dense_ms, "fit_s": fit_s,
             "pred_flops": pred_flops, "saved_flops": saved_flops,
             "pred_per_saved_flops": None if pred_flops is None or not saved_flops else pred_flops / saved_flops,
             "pred_per_dense_time": pred_ms / dense_ms}
        rows.append(r)
        print(f"L{layer} {predictor:<20} {setting:<22} sparsity {r['sparsity']:.3f} recall {r['recall']:.3f} "
              f"exact {r['exact_row_recall']:.3f} pred {pred_ms:.2f} ms sparse {sparse_ms:.2f} ms "
              f"dense {dense_ms:.2f} ms pred/saved flops {_f(r['pred_per_saved_flops'], '.4f')}", flush=True)
        on_row()


# ----------------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------------
def _f(x, fmt=".3f"):
    return "-" if x is None else format(x, fmt)


def format_markdown(rows, meta) -> str:
    lines = ["# Learned block-mask predictors on a small model's attention", "",
             f"{meta['device_name']}, torch {meta['torch']}, {meta['date_utc']}, `{meta['command']}`", "",
             f"Model: {meta['model']}. Text: {meta['text']}. Timing: {meta['timing']}.", "",
             "On CPU effattn runs the chunked reference: `sparse ms` does not fall with sparsity there.", "",
             "`pred/saved flop`: the predictor's analytic FLOPs over the dense-attention forward FLOPs its mask "
             "cuts; `pred/dense time`: its measured time over the dense attention's.", "",
             "| layer | predictor | setting | sparsity | recall | exact rows | pred ms | sparse ms | dense ms "
             "| pred/saved flop | pred/dense time |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['predictor']} | {r['setting']} | {_f(r['sparsity'])} | {_f(r['recall'])} "
                     f"| {_f(r['exact_row_recall'])} | {_f(r['pred_ms'], '.2f')} | {_f(r['sparse_ms'], '.2f')} "
                     f"| {_f(r['dense_ms'], '.2f')} | {_f(r['pred_per_saved_flops'], '.4f')} "
                     f"| {_f(r['pred_per_dense_time'], '.3f')} |")
    return "\n".join(lines) + "\n"


def write_plot(path: Path, rows) -> str | None:
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed: plot skipped"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    curves: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for r in rows:
        curves.setdefault((r["predictor"], r["layer"]), []).append((r["sparsity"], r["recall"]))
    colors = {pred: f"C{i}" for i, pred in enumerate(sorted({pred for pred, _ in curves}))}  # one per predictor
    for (pred, layer), pts in sorted(curves.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=colors[pred], marker="os^vD"[layer % 5], ms=3,
                linestyle="--" if pred == "oracle" else "-", alpha=1.0 if layer == 0 else 0.6,
                label=f"{pred} L{layer}")
    ax.set_xlabel("block sparsity (share of blocks cut)")
    ax.set_ylabel("attention recall")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    ax.set_title("recall vs sparsity (random-init BERT, byte-level text)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


# ----------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--T", type=positive_int, default=None, help="sequence length (default: the preset's)")
    parser.add_argument("--min-run-time", type=positive_float, default=None,
                        help="CPU blocked_autorange min_run_time in seconds (default: the preset's)")
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    args = parser.parse_args(argv)
    cfg = dict(PRESETS[args.preset])
    if args.T is not None:
        cfg["T"] = args.T
    if args.min_run_time is not None:
        cfg["min_run_time"] = args.min_run_time
    if args.device not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda, got {args.device!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    if cfg["T"] % cfg["block"]:
        parser.error(f"--T must be a multiple of the preset's block {cfg['block']}, got {cfg['T']}")

    t_start = time.perf_counter()
    device, T = args.device, cfg["T"]
    timing = harness.TimingConfig(cpu_min_run_time_s=cfg["min_run_time"])
    model = make_model(T, cfg["layers"], cfg["hidden"], cfg["heads"])
    ids = sequences(cfg["n_train"] + cfg["n_eval"], T)
    per_layer = capture_qkv(model, ids)
    heads, head_dim = cfg["heads"], cfg["hidden"] // cfg["heads"]
    meta = metadata.collect(device, " ".join(["python -m bench.studies.predictors", *(argv or sys.argv[1:])]), {
        "preset": args.preset, "config": {k: v for k, v in cfg.items()},
        "model": (f"random-init BertModel (hidden {cfg['hidden']}, {heads} heads, {cfg['layers']} layers, "
                  f"initializer_range {INITIALIZER_RANGE}, seed {SEED}), q/k/v by forward hooks"),
        "text": (f"README.md + docstrings of {len(TEXT_MODULES)} stdlib modules, byte-level, "
                 f"{cfg['n_train']} train / {cfg['n_eval']} eval sequences of T={T}"),
        "timing": harness.describe_timing(device, timing),
    })
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []

    def write():
        (args.out / "predictors.json").write_text(json.dumps({"metadata": meta, "rows": rows}, indent=1) + "\n")
        (args.out / "predictors.md").write_text(format_markdown(rows, meta))

    n_train = cfg["n_train"]
    for layer, qkv in enumerate(per_layer):
        q_all, k_all, v_all = qkv["q"], qkv["k"], qkv["v"]
        train = tuple([t[i:i + 1].to(device) for i in range(n_train)] for t in (q_all, k_all))
        t0 = time.perf_counter()
        points = operating_points(cfg, layer, train, heads, head_dim)
        fit_s = time.perf_counter() - t0
        q, k, v = (t[n_train:].to(device) for t in (q_all, k_all, v_all))
        evaluate(layer, points, q, k, v, cfg, device, timing, fit_s, rows, write)
    meta["wall_s"] = time.perf_counter() - t_start
    note = write_plot(args.out / "predictors_recall.png", rows)
    if note:
        meta["plot"] = note
    write()
    print(f"wrote {args.out}/predictors.json, predictors.md, predictors_recall.png in {meta['wall_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
