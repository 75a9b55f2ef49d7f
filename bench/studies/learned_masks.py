"""Learned block masks judged on a trained model: recall against the oracle and fixed patterns, and the
model's loss with each mask applied.

    python -m bench.studies.learned_masks                  # full: the results (2 CPU cores: 35 min, 18 cached)
    python -m bench.studies.learned_masks --preset quick   # seconds: the pipeline end to end, for the tests

1. **The model**: :mod:`bench.studies.byte_lm`, a byte-level decoder trained with effattn's causal flash
   attention on the standard library's Python sources (seeded, a fixed step count; cached by a key of
   its configuration and the text's hashes, ``--cache``).
2. **q / k** of every layer and head are captured on held-out text: the ``calib`` split fits the
   predictors, the ``test`` split measures everything below.
3. **Predictors, fitted as their papers do**, one per layer: ``SparseFinder`` (hinge loss against the
   causal gold attention graph, then k-means; the cluster count is picked per layer on the calib split
   among the preset's, by recall at 75 % sparsity) and ``BlockGate`` (KL against the block-max-pooled
   causal attention map).
4. **Equal sparsity.** Every method ranks the causal kv blocks of each q block by its own score and keeps
   the same number of them, ``k_i = max(1, round((1 - s) (i + 1)))`` for q block ``i`` (``i + 1`` causal
   blocks), the diagonal block always (so no row is empty): the masks of all methods at a target ``s``
   have the same blocks per row, hence the same sparsity (``sparsity``: the share of the causal blocks
   cut, :func:`effattn.sparsity.block_sparsity` with ``causal``). Scores: ``oracle`` the true attention
   mass of the block pair (the best any mask with those counts can do); ``sparsefinder`` the token pairs
   sharing a cluster (``cluster_block_edges``); ``gate`` the gate's logits; ``window+sink`` block 0 then
   the most recent blocks; ``bigbird`` block 0, the two blocks before the diagonal, then random blocks
   (seeded, per layer and head). Ties go to the lower kv block. ``sparsefinder-any`` is SparseFinder's
   own rule (a block pair is kept iff a query and a key in it share a cluster) at its own sparsity.
5. **Measures** per (method, layer, target): ``recall`` (:func:`effattn.sparsity.attention_recall`,
   causal: the mean share of each query row's attention mass inside the mask, on the dense model's q / k);
   ``bpb``, the test loss in bits per byte with the mask applied through :func:`effattn.sparse_attention`
   in that layer alone (layer rows) or in every layer (``layer = "all"``, recall the mean over layers),
   each mask predicted from the q / k of the masked model itself; ``pred_flops`` (the predictor's
   analytic cost), ``saved_flops`` (the causal attention FLOPs its mask cuts) and their ratio.
6. **Fine-tune** (``finetune_steps``): the model trained on with the gate's mask in the loop at each
   ``finetune_sparsity`` (the gate frozen, as in SeerAttention), against the same steps of dense
   training (the control: the model is not trained to convergence, so any further step lowers its loss).

Writes ``learned_masks.json`` (metadata, corpus record, training log, targets, rows), ``learned_masks.csv``,
``learned_masks.md`` and two plots (recall and loss against sparsity) to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from bench import metadata
from bench.studies import byte_lm
from bench.studies.byte_lm import LMConfig, TrainConfig


@dataclass(frozen=True)
class Preset:
    lm: LMConfig
    train: TrainConfig
    block: int
    n_calib: int  # windows of the calib split the predictors are fitted on
    n_test: int  # windows of the test split everything is measured on
    sparsities: tuple[float, ...]
    sf_clusters: tuple[int, ...]
    sf_rank: int = 8
    sf_steps: int = 200
    sf_lr: float = 3e-2
    sf_margin: float = 10.0
    gate_dim: int = 32
    gate_steps: int = 400
    gate_lr: float = 1e-2
    finetune_steps: int = 0
    finetune_lr: float = 3e-4
    finetune_sparsity: tuple[float, ...] = ()
    max_bytes: int | None = None
    eval_batch: int = 4
    layer_rows: bool = True  # bpb with the mask in one layer at a time


PRESETS = {
    "full": Preset(lm=LMConfig(), train=TrainConfig(steps=600), block=32, n_calib=8, n_test=16,
                   sparsities=(0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95), sf_clusters=(8, 16, 32),
                   finetune_steps=60, finetune_sparsity=(0.75, 0.9)),
    "quick": Preset(lm=LMConfig(n_layers=2, d_model=32, n_heads=2, seq_len=128),
                    train=TrainConfig(steps=20, batch=4, warmup=5), block=16, n_calib=2, n_test=2,
                    sparsities=(0.5, 0.75, 0.9), sf_clusters=(4, 8), sf_rank=4, sf_steps=5, gate_steps=10,
                    gate_dim=8, finetune_steps=2, finetune_sparsity=(0.75,), max_bytes=1_500_000, eval_batch=2),
}
BUDGETED = ("oracle", "sparsefinder", "gate", "window+sink", "bigbird")
LEARNED = ("sparsefinder", "gate")
FIXED = ("window+sink", "bigbird")
BIGBIRD_WINDOW = 2  # blocks before the diagonal block
SELECT_SPARSITY = 0.75  # SparseFinder's cluster count is picked on the calib split at this sparsity
TARGETS = dict(sparsities=(0.75, 0.9), over_fixed=0.05, of_oracle=0.9, bpb_sparsity=0.75, bpb_within=0.02)
SEED = 0


# ----------------------------------------------------------------------------------------------
# block grids
# ----------------------------------------------------------------------------------------------
def grid(T: int, block: int, device=None):
    """``(allowed, diagonal)`` bool ``(n, n)``: the causal block pairs, and the diagonal ones."""
    n = T // block
    i = torch.arange(n, device=device)
    return i[None, :] <= i[:, None], i[None, :] == i[:, None]


def budgets(T: int, block: int, sparsity: float) -> torch.Tensor:
    """Blocks kept per q block at a target ``sparsity``: ``max(1, round((1 - s) (i + 1)))``."""
    n = T // block
    return torch.tensor([max(1, round((1.0 - sparsity) * (i + 1))) for i in range(n)])


def budget_mask(scores: torch.Tensor, T: int, block: int, sparsity: float):
    """The :class:`effattn.BlockMask` keeping, per (b, h, q block), the diagonal block and the best-scored
    other causal blocks up to :func:`budgets` (ties to the lower kv block); diagonal blocks are PARTIAL
    under the causal rule."""
    from effattn.block_mask import FULL, NONE, PARTIAL, BlockMask, MaskRule

    allowed, diag = grid(T, block, scores.device)
    s = scores.float().masked_fill(~allowed, float("-inf")).masked_fill(diag, float("inf"))
    order = s.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(s.shape[-1], device=s.device).expand_as(order))
    keep = (rank < budgets(T, block, sparsity).to(s.device)[:, None]) & allowed
    kinds = torch.where(keep, torch.where(diag, PARTIAL, FULL), NONE).to(torch.uint8)
    return BlockMask.from_block_kinds(kinds, T, T, block, rule=MaskRule(window_right=0, diag_offset=0))


def block_mass(q: torch.Tensor, k: torch.Tensor, block: int) -> torch.Tensor:
    """``(B, H, n, n)`` float32: the causal softmax mass of each (q block, kv block), summed over its
    query rows (by chunks of q blocks, never the whole ``T x T`` at once for long ``T``)."""
    B, H, T, D = q.shape
    n = T // block
    out = q.new_zeros(B, H, n, n, dtype=torch.float32)
    rows_per = max(block, (1 << 22) // max(1, B * H * T) // block * block)
    cols = torch.arange(T, device=q.device)
    for r0 in range(0, T, rows_per):
        r1 = min(T, r0 + rows_per)
        s = (q[:, :, r0:r1].float() @ k.float().transpose(-1, -2)) * D ** -0.5
        s = s.masked_fill(cols[None, :] > torch.arange(r0, r1, device=q.device)[:, None], float("-inf"))
        p = torch.softmax(s, dim=-1)
        out[:, :, r0 // block:r1 // block] = p.view(B, H, (r1 - r0) // block, block, n, block).sum((3, 5))
    return out


# ----------------------------------------------------------------------------------------------
# the methods: a score per (b, h, q block, kv block) from one layer's q / k
# ----------------------------------------------------------------------------------------------
@dataclass
class Methods:
    """The fitted predictors of every layer and the fixed patterns' scores."""

    block: int
    seq_len: int
    finders: dict[int, dict[int, object]] = field(default_factory=dict)  # layer -> clusters -> SparseFinder
    selected: dict[int, int] = field(default_factory=dict)  # layer -> the cluster count picked on calib
    gates: dict[int, object] = field(default_factory=dict)
    random: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (H, n, n) BigBird's draws

    def scores(self, method: str, layer: int, q: torch.Tensor, k: torch.Tensor,
               clusters: int | None = None) -> torch.Tensor:
        from effattn.kernels.cluster_blocks import cluster_block_edges

        n = self.seq_len // self.block
        col = torch.arange(n, dtype=torch.float32)
        with torch.no_grad():
            if method == "oracle":
                return block_mass(q, k, self.block)
            if method == "sparsefinder":
                sf = self.finders[layer][clusters or self.selected[layer]]
                qi, ki = sf.cluster_ids(q, k)
                return cluster_block_edges(qi, ki, sf.n_clusters, (self.block, self.block)).float()
            if method == "gate":
                return self.gates[layer].scores(q, k).float()
            if method == "window+sink":  # block 0 first, then recency
                return torch.where(col == 0, float(2 * n), col).expand(n, n)[None, None]
            if method == "bigbird":  # block 0, the window before the diagonal, then seeded random blocks
                rows = torch.arange(n, dtype=torch.float32)[:, None]
                window = (rows - col >= 1) & (rows - col <= BIGBIRD_WINDOW)
                s = self.random[layer].clone()
                s = torch.where(window, 2.0 + (col - rows) / n, s)  # nearer first
                return torch.where(col == 0, 4.0, s)[None]
        raise ValueError(f"unknown method {method!r}")

    def mask(self, method: str, layer: int, q, k, sparsity: float, clusters: int | None = None):
        if method == "sparsefinder-any":
            from effattn.block_mask import BlockMask

            causal = BlockMask.causal(self.seq_len, self.seq_len, self.block)
            return self.finders[layer][clusters].predict(q, k, block_size=self.block) & causal
        return budget_mask(self.scores(method, layer, q, k, clusters), self.seq_len, self.block, sparsity)

    def predict_flops(self, method: str, layer: int, batch: int, clusters: int | None = None) -> int | None:
        T = self.seq_len
        if method == "gate":
            return self.gates[layer].predict_flops(T, T, batch=batch)
        if method in ("sparsefinder", "sparsefinder-any"):
            sf = self.finders[layer][clusters or self.selected[layer]]
            return sf.predict_flops(T, T, batch=batch, block_size=self.block,
                                    top_k=1 if method == "sparsefinder" else None)
        return None  # the oracle computes the attention itself; the fixed patterns cost nothing per input


def capture(model, ids: torch.Tensor, batch: int) -> list[dict[str, torch.Tensor]]:
    """Per layer ``{"q", "k"}`` ``(N, H, T, D)`` float32 of the dense model on ``ids (N, T + 1)``."""
    found: dict[int, dict[str, list]] = {}

    def record(layer, q, k, v):
        found.setdefault(layer, {"q": [], "k": []})
        found[layer]["q"].append(q.detach().float().contiguous())
        found[layer]["k"].append(k.detach().float().contiguous())
        return byte_lm.dense_attention(layer, q, k, v)

    with torch.no_grad():
        for i in range(0, ids.shape[0], batch):
            model(ids[i:i + batch, :-1], record)
    return [{name: torch.cat(found[layer][name]) for name in ("q", "k")} for layer in sorted(found)]


def fit(preset: Preset, calib: list[dict], log) -> Methods:
    from effattn.sparsity import BlockGate, SparseFinder, attention_recall

    lm = preset.lm
    H, D = lm.n_heads, lm.head_dim
    m = Methods(block=preset.block, seq_len=lm.seq_len)
    n = lm.seq_len // preset.block
    for layer, qk in enumerate(calib):
        qs, ks = list(qk["q"].split(1)), list(qk["k"].split(1))
        t0 = time.perf_counter()
        base = SparseFinder(H, D, rank=preset.sf_rank, n_clusters=preset.sf_clusters[0], margin=preset.sf_margin,
                            seed=SEED + layer)
        base.fit(qs, ks, steps=preset.sf_steps, lr=preset.sf_lr, clusters=False, causal=True)
        m.finders[layer] = {}
        for C in preset.sf_clusters:
            sf = SparseFinder(H, D, rank=preset.sf_rank, n_clusters=C, margin=preset.sf_margin, seed=SEED + layer)
            sf.load_state_dict({**base.state_dict(), "centroids": sf.centroids}, strict=False)
            sf.fit_clusters(qs, ks)
            m.finders[layer][C] = sf
        picks = {C: attention_recall(qk["q"], qk["k"], m.mask("sparsefinder", layer, qk["q"], qk["k"],
                                                               SELECT_SPARSITY, clusters=C), causal=True)
                 for C in preset.sf_clusters}
        m.selected[layer] = max(picks, key=lambda C: (picks[C], -C))
        torch.manual_seed(SEED + layer)
        gate = BlockGate(H, D, gate_dim=preset.gate_dim, block_size=(preset.block, preset.block))
        losses = gate.fit(qs, ks, steps=preset.gate_steps, lr=preset.gate_lr, causal=True)
        m.gates[layer] = gate
        m.random[layer] = torch.rand(H, n, n, generator=torch.Generator().manual_seed(SEED + 100 + layer))
        log(f"layer {layer}: fitted in {time.perf_counter() - t0:.1f} s; SparseFinder calib recall at "
            f"{SELECT_SPARSITY:.0%} by clusters {({C: round(r, 3) for C, r in picks.items()})} -> C="
            f"{m.selected[layer]}; gate KL {losses[0]:.3f} -> {losses[-1]:.3f}")
    return m


# ----------------------------------------------------------------------------------------------
# measuring
# ----------------------------------------------------------------------------------------------
def masked_attention(methods: Methods, method: str, sparsity: float, layers, clusters: int | None = None):
    """An ``attention(layer, q, k, v)`` applying ``method``'s mask (predicted from this q / k) in ``layers``
    through :func:`effattn.sparse_attention`, dense causal attention elsewhere."""
    import effattn

    def attention(layer, q, k, v):
        if layer not in layers:
            return byte_lm.dense_attention(layer, q, k, v)
        with torch.no_grad():
            mask = methods.mask(method, layer, q.detach(), k.detach(), sparsity, clusters)
        return effattn.sparse_attention(q, k, v, mask)
    return attention


def causal_pairs_saved(mask, T: int, block: int, heads: int, batch: int, head_dim: int) -> int:
    from effattn.block_mask import BlockMask
    from effattn.profile import kept_pairs

    dense = int(kept_pairs(BlockMask.causal(T, T, block)).sum()) * heads * batch
    kept = int(kept_pairs(mask).expand(batch, heads).sum())
    return (dense - kept) * 4 * head_dim


def evaluate(preset: Preset, model, methods: Methods, test_ids, test_qk, log) -> list[dict]:
    from effattn.sparsity import attention_recall, block_sparsity

    lm, rows = preset.lm, []
    T, B, L = lm.seq_len, test_ids.shape[0], lm.n_layers
    layers = list(range(L))
    dense_bpb = byte_lm.bits_per_byte(model, test_ids, batch=preset.eval_batch)
    rows.append(dict(method="dense", setting="", layer="all", target=0.0, sparsity=0.0, recall=1.0, bpb=dense_bpb,
                     pred_flops=None, saved_flops=0, pred_per_saved_flops=None))
    log(f"dense: {dense_bpb:.4f} bits/byte")
    points = [(meth, s, None) for s in preset.sparsities for meth in BUDGETED]
    points += [("sparsefinder-any", None, C) for C in preset.sf_clusters]
    for method, target, clusters in points:
        t0 = time.perf_counter()
        setting = f"C={clusters}" if clusters else ("C=" + ",".join(str(methods.selected[i]) for i in layers)
                                                    if method == "sparsefinder" else "")
        per_layer = []
        for layer in layers:
            q, k = test_qk[layer]["q"], test_qk[layer]["k"]
            mask = methods.mask(method, layer, q, k, target, clusters)
            pf = methods.predict_flops(method, layer, B, clusters)
            saved = causal_pairs_saved(mask, T, preset.block, lm.n_heads, B, lm.head_dim)
            row = dict(method=method, setting=setting, layer=layer, target=target,
                       sparsity=block_sparsity(mask, causal=True), recall=attention_recall(q, k, mask, causal=True),
                       bpb=None, pred_flops=pf, saved_flops=saved,
                       pred_per_saved_flops=pf / saved if pf is not None and saved > 0 else None)
            if preset.layer_rows:
                row["bpb"] = byte_lm.bits_per_byte(model, test_ids, masked_attention(methods, method, target, {layer},
                                                                                     clusters), preset.eval_batch)
            per_layer.append(row)
        bpb = byte_lm.bits_per_byte(model, test_ids, masked_attention(methods, method, target, set(layers), clusters),
                                    preset.eval_batch)
        pf = [r["pred_flops"] for r in per_layer]
        saved = sum(r["saved_flops"] for r in per_layer)
        total_pf = None if None in pf else sum(pf)
        rows += per_layer
        rows.append(dict(method=method, setting=setting, layer="all", target=target,
                         sparsity=sum(r["sparsity"] for r in per_layer) / L,
                         recall=sum(r["recall"] for r in per_layer) / L, bpb=bpb, pred_flops=total_pf,
                         saved_flops=saved, pred_per_saved_flops=total_pf / saved if total_pf and saved else None))
        log(f"{method:<16} {setting:<10} target {target if target is not None else '-'}: sparsity "
            f"{rows[-1]['sparsity']:.3f} recall {rows[-1]['recall']:.3f} bpb {bpb:.4f} "
            f"({time.perf_counter() - t0:.1f} s)")
    return rows


def finetune(preset: Preset, model, methods: Methods, streams, test_ids, log) -> list[dict]:
    """Rows ``dense+finetune`` and ``gate+finetune`` (one per ``finetune_sparsity``): the test loss after
    ``finetune_steps`` more steps, dense and with the gate's mask in every layer."""
    if not preset.finetune_steps:
        return []
    lm, rows = preset.lm, []
    layers = set(range(lm.n_layers))
    tc = replace(preset.train, steps=preset.finetune_steps, lr=preset.finetune_lr, warmup=1, min_lr_ratio=1.0,
                 seed=preset.train.seed + 7)
    quiet = lambda _msg: None  # noqa: E731
    runs = [("dense+finetune", 0.0, None)] + [("gate+finetune", s, masked_attention(methods, "gate", s, layers))
                                              for s in preset.finetune_sparsity]
    for name, target, attention in runs:
        t0 = time.perf_counter()
        tuned, _ = byte_lm.train(lm, tc, streams["train"], log=quiet, model=copy.deepcopy(model),
                                 **({} if attention is None else {"attention": attention}))
        bpb = byte_lm.bits_per_byte(tuned, test_ids, **({} if attention is None else {"attention": attention}),
                                    batch=preset.eval_batch)
        rows.append(dict(method=name, setting=f"{preset.finetune_steps} steps lr {preset.finetune_lr:g}", layer="all",
                         target=target, sparsity=target, recall=None, bpb=bpb, pred_flops=None, saved_flops=None,
                         pred_per_saved_flops=None))
        log(f"{name} at {target:.2f}: {bpb:.4f} bits/byte ({time.perf_counter() - t0:.0f} s)")
    return rows


# ----------------------------------------------------------------------------------------------
# the verdict and the outputs
# ----------------------------------------------------------------------------------------------
def _main_rows(rows, layer="all"):
    """``{(method, target): row}`` of the equal-sparsity methods at ``layer``."""
    return {(r["method"], r["target"]): r for r in rows if r["layer"] == layer and r["method"] in BUDGETED}


def targets(rows) -> list[dict]:
    """The issue's targets, each with the numbers it was judged on and ``met``."""
    main = _main_rows(rows)
    dense = next(r["bpb"] for r in rows if r["method"] == "dense")
    out = []
    for s in TARGETS["sparsities"]:
        if ("oracle", s) not in main:
            continue
        fixed = max(main[(f, s)]["recall"] for f in FIXED)
        oracle = main[("oracle", s)]["recall"]
        for meth in LEARNED:
            rec = main[(meth, s)]["recall"]
            out.append(dict(target=f"{meth} recall at {s:.0%} >= best fixed + {TARGETS['over_fixed']} and >= "
                                   f"{TARGETS['of_oracle']} x oracle",
                            value=rec, best_fixed=fixed, oracle=oracle,
                            met=rec >= fixed + TARGETS["over_fixed"] and rec >= TARGETS["of_oracle"] * oracle))
    s = TARGETS["bpb_sparsity"]
    for meth in LEARNED:
        if (meth, s) in main:
            bpb = main[(meth, s)]["bpb"]
            out.append(dict(target=f"{meth} loss at {s:.0%} within {TARGETS['bpb_within']:.0%} of dense", value=bpb,
                            dense=dense, ratio=bpb / dense, met=bpb <= (1 + TARGETS["bpb_within"]) * dense))
    return out


def _f(x, fmt=".3f"):
    return "-" if x is None else format(x, fmt)


CSV_FIELDS = ("method", "setting", "layer", "target", "sparsity", "recall", "bpb", "pred_flops", "saved_flops",
              "pred_per_saved_flops")


def format_markdown(data) -> str:
    meta, rows = data["metadata"], data["rows"]
    main = _main_rows(rows)
    dense = next(r["bpb"] for r in rows if r["method"] == "dense")
    sp = sorted({t for _, t in main})
    lines = ["# Learned block masks on a trained byte-level LM", "",
             f"- {meta['model']}", f"- text: {meta['text']}", f"- training: {meta['training']}",
             f"- device `{meta['device']}` ({meta.get('device_name')}), torch `{meta['torch']}`, commit "
             f"`{meta.get('git_commit')}`, {meta['date_utc']}, {meta['wall_s']:.0f} s in all", "",
             f"Dense test loss: **{dense:.4f} bits/byte**. Recall (share of the attention mass inside the mask, "
             "mean over layers) and test loss with the mask in every layer, all methods at the same blocks per row:",
             "", "| method | " + " | ".join(f"{s:.0%}" for s in sp) + " |", "|---|" + "---:|" * len(sp)]
    for meth in BUDGETED:
        lines.append(f"| {meth} recall | " + " | ".join(_f(main[(meth, s)]["recall"]) for s in sp) + " |")
    for meth in BUDGETED:
        lines.append(f"| {meth} bits/byte | " + " | ".join(_f(main[(meth, s)]["bpb"], ".4f") for s in sp) + " |")
    lines += ["", "Achieved sparsity per target: " + ", ".join(f"{s:.0%} -> {main[('oracle', s)]['sparsity']:.3f}"
                                                               for s in sp)]
    tuned = [r for r in rows if r["method"].endswith("+finetune")]
    if tuned:
        lines += ["", f"Fine-tuned ({tuned[0]['setting']}), test loss: " + ", ".join(
            f"{r['method']} at {r['target']:.0%} {r['bpb']:.4f} bits/byte" for r in tuned)]
    lines += ["", "## Targets", ""]
    for t in data["targets"]:
        extra = ", ".join(f"{k} {_f(v, '.4f')}" for k, v in t.items() if k not in ("target", "value", "met"))
        lines.append(f"- {'met' if t['met'] else '**missed**'}: {t['target']}: {t['value']:.4f} ({extra})")
    lines += ["", "## Every row", "", "| method | setting | layer | target | sparsity | recall | bits/byte | "
              "pred / saved FLOPs |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['setting']} | {r['layer']} | {_f(r['target'], '.2f')} | "
                     f"{_f(r['sparsity'])} | {_f(r['recall'])} | {_f(r['bpb'], '.4f')} | "
                     f"{_f(r['pred_per_saved_flops'], '.4f')} |")
    return "\n".join(lines) + "\n"


def write_plots(out: Path, rows) -> str | None:
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed: plots skipped"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = _main_rows(rows)
    dense = next(r["bpb"] for r in rows if r["method"] == "dense")
    for key, name, ylabel in (("recall", "learned_masks_recall.png", "attention recall (mean over layers)"),
                              ("bpb", "learned_masks_loss.png", "test loss, bits per byte (mask in every layer)")):
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for i, meth in enumerate(BUDGETED):
            pts = sorted((r["sparsity"], r[key]) for (m, _), r in main.items() if m == meth)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, color=f"C{i}", label=meth,
                    linestyle="--" if meth == "oracle" else "-")
        if key == "bpb":
            ax.axhline(dense, color="k", lw=0.8, label="dense")
        ax.set_xlabel("block sparsity (share of the causal blocks cut)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    parser.add_argument("--cache", type=Path, default=None,
                        help=f"checkpoint folder (default ${byte_lm.CACHE_ENV} or ~/.cache/effattn/studies)")
    parser.add_argument("--no-cache", action="store_true", help="train afresh and save nothing")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    if preset.lm.seq_len % preset.block:
        parser.error(f"the preset's seq_len {preset.lm.seq_len} is not a multiple of its block {preset.block}")
    if args.cache is not None:
        import os

        os.environ[byte_lm.CACHE_ENV] = str(args.cache)
    torch.manual_seed(SEED)
    t_start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t_start:6.0f} s] {msg}", flush=True)

    streams, record = byte_lm.corpus(preset.max_bytes)
    log(f"text: {record['files']} files, {record['bytes']} bytes from {record['root']}")
    model, train_info = byte_lm.trained_model(preset.lm, preset.train, streams, record, log=log,
                                              use_cache=not args.no_cache)
    log(f"model {'loaded from' if train_info['cached'] else 'trained, saved to'} {train_info['checkpoint']}")
    T = preset.lm.seq_len
    calib_ids = byte_lm.windows(streams["calib"], preset.n_calib, T + 1)
    test_ids = byte_lm.windows(streams["test"], preset.n_test, T + 1)
    methods = fit(preset, capture(model, calib_ids, preset.eval_batch), log)
    rows = evaluate(preset, model, methods, test_ids, capture(model, test_ids, preset.eval_batch), log)
    rows += finetune(preset, model, methods, streams, test_ids, log)
    lm = preset.lm
    splits = {s: {k: v for k, v in d.items() if k != "names"} for s, d in record["splits"].items()}
    meta = metadata.collect("cpu", " ".join(["python -m bench.studies.learned_masks", *(argv or sys.argv[1:])]), {
        "preset": args.preset, "config": json.loads(json.dumps(asdict(preset))),
        "model": (f"byte-level decoder LM, {lm.n_layers} layers, d_model {lm.d_model}, {lm.n_heads} heads of "
                  f"{lm.head_dim}, T={T}, {sum(p.numel() for p in model.parameters())} parameters; blocks of "
                  f"{preset.block}"),
        "text": (f"{record['files']} standard-library Python files ({record['bytes']} bytes, {record['root']}); "
                 + "; ".join(f"{s} {d['files']} files {d['bytes']} bytes sha256 {d['sha256'][:16]}"
                             for s, d in splits.items())
                 + f"; calib {preset.n_calib} x {T}, test {preset.n_test} x {T} bytes"),
        "training": (f"{preset.train.steps} steps x {preset.train.batch} x {T} bytes "
                     f"({train_info['tokens']} tokens), AdamW lr {preset.train.lr:g}, seed {preset.train.seed}, "
                     f"{train_info['wall_s']:.0f} s{' (cached checkpoint)' if train_info['cached'] else ''}"),
        "sparsefinder_clusters": {str(k): v for k, v in methods.selected.items()},
    })
    meta["wall_s"] = time.perf_counter() - t_start
    data = {"metadata": meta, "corpus": record, "train_log": train_info, "targets": targets(rows), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "learned_masks.json").write_text(json.dumps(data, indent=1) + "\n")
    with open(args.out / "learned_masks.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    (args.out / "learned_masks.md").write_text(format_markdown(data))
    note = write_plots(args.out, rows)
    if note:
        log(note)
    for t in data["targets"]:
        log(f"{'met' if t['met'] else 'MISSED'}: {t['target']}: {t['value']:.4f}")
    log(f"wrote {args.out}/learned_masks.json, .csv, .md and plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
