"""The learned-mask study (``python -m bench.studies.learned_masks``): its quick mode end to end (a tiny
model trained for seconds: files written, every method present, recall in [0, 1], the oracle at least as
good as every method at equal sparsity, not the numbers), and its pieces: the equal-budget masks, the
oracle's block mass, the corpus split, the cached checkpoint."""

import csv
import json
import math

import pytest
import torch

from bench.studies import byte_lm, learned_masks
from effattn.block_mask import NONE, PARTIAL
from effattn.sparsity import attention_recall, block_sparsity

TOL = 1e-6


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("learned_masks")
    assert learned_masks.main(["--preset", "quick", "--out", str(out), "--cache", str(out / "cache")]) == 0
    return out, json.loads((out / "learned_masks.json").read_text())


def test_quick_mode_writes_every_method(quick):
    out, data = quick
    rows = data["rows"]
    preset = learned_masks.PRESETS["quick"]
    methods = {r["method"] for r in rows}
    assert methods == {"dense", *learned_masks.BUDGETED, "sparsefinder-any", "dense+finetune", "gate+finetune"}
    layers = set(range(preset.lm.n_layers)) | {"all"}
    for meth in learned_masks.BUDGETED:
        for s in preset.sparsities:
            got = {r["layer"] for r in rows if r["method"] == meth and r["target"] == s}
            assert got == layers, (meth, s)
    for r in rows:
        for key in ("method", "layer", "sparsity", "recall", "bpb"):
            assert key in r
        assert 0.0 <= r["sparsity"] <= 1.0
        if r["recall"] is not None:
            assert 0.0 <= r["recall"] <= 1.0 + TOL, r
        if r["bpb"] is not None:
            assert math.isfinite(r["bpb"]) and r["bpb"] > 0
        if r["layer"] == "all":
            assert r["bpb"] is not None
    with open(out / "learned_masks.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    md = (out / "learned_masks.md").read_text()
    assert "## Targets" in md and md.count("\n| ") >= len(rows)
    for name in ("learned_masks_recall.png", "learned_masks_loss.png"):
        assert (out / name).stat().st_size > 0
    assert data["targets"] and all(isinstance(t["met"], bool) for t in data["targets"])
    assert data["corpus"]["bytes"] > 0 and data["train_log"]["tokens"] > 0


def test_quick_mode_oracle_bounds_every_method_at_equal_sparsity(quick):
    _, data = quick
    rows = [r for r in data["rows"] if r["method"] in learned_masks.BUDGETED]
    for r in rows:
        same = [o for o in rows if o["target"] == r["target"] and o["layer"] == r["layer"]]
        oracle = next(o for o in same if o["method"] == "oracle")
        assert r["sparsity"] == pytest.approx(oracle["sparsity"], abs=1e-12)  # equal blocks per row
        assert oracle["recall"] >= r["recall"] - TOL, (r, oracle)


def test_budget_masks_keep_the_budget_the_diagonal_and_causality():
    T, block, s = 160, 16, 0.7
    scores = torch.randn(2, 3, T // block, T // block, generator=torch.Generator().manual_seed(0))
    mask = learned_masks.budget_mask(scores, T, block, s)
    kinds = mask.block_kinds()
    allowed, diag = learned_masks.grid(T, block)
    kept = kinds != NONE
    budget = learned_masks.budgets(T, block, s)
    assert torch.equal(kept.sum(-1), budget.expand(2, 3, -1))
    assert bool((kinds[..., diag] == PARTIAL).all()) and not bool((kept & ~allowed).any())
    # the best-scored blocks: every kept off-diagonal block scores at least any dropped causal block
    off = allowed & ~diag
    kept_min = scores.masked_fill(~(kept & off), float("inf")).amin(-1)
    dropped_max = scores.masked_fill(~(~kept & off), float("-inf")).amax(-1)
    assert bool((kept_min >= dropped_max).all())
    n_causal = int(allowed.sum())
    assert block_sparsity(mask, causal=True) == pytest.approx(1 - int(budget.sum()) / n_causal)


def test_block_mass_is_the_causal_softmax_pooled():
    g = torch.Generator().manual_seed(1)
    B, H, T, D, block = 2, 2, 64, 8, 16
    q, k = 3 * torch.randn(B, H, T, D, generator=g), torch.randn(B, H, T, D, generator=g)
    mass = learned_masks.block_mass(q, k, block)
    s = (q @ k.transpose(-1, -2)) * D ** -0.5
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    p = torch.softmax(s.double(), -1)
    ref = p.view(B, H, T // block, block, T // block, block).sum((3, 5))
    torch.testing.assert_close(mass.double(), ref, atol=1e-5, rtol=1e-5)


def test_oracle_recall_bounds_other_scores():
    """The oracle keeps, per q block, the blocks of most attention mass: no other choice of as many blocks
    per row recalls more (a peaked random attention, several sparsities)."""
    g = torch.Generator().manual_seed(2)
    B, H, T, D, block = 1, 2, 128, 16, 16
    q, k = 4 * torch.randn(B, H, T, D, generator=g), torch.randn(B, H, T, D, generator=g)
    n = T // block
    for s in (0.5, 0.75, 0.9):
        oracle = attention_recall(q, k, learned_masks.budget_mask(learned_masks.block_mass(q, k, block), T, block, s),
                                  causal=True)
        for seed in range(3):
            other = torch.rand(B, H, n, n, generator=torch.Generator().manual_seed(seed))
            r = attention_recall(q, k, learned_masks.budget_mask(other, T, block, s), causal=True)
            assert oracle >= r - TOL


def test_corpus_splits_are_disjoint_and_hashed():
    streams, record = byte_lm.corpus(max_bytes=300_000)
    names = [set(record["splits"][s]["names"]) for s in byte_lm.SPLITS]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    assert sum(len(n) for n in names) == record["files"] > 0
    import hashlib

    for s in byte_lm.SPLITS:
        blob = bytes(streams[s].tolist())
        assert hashlib.sha256(blob).hexdigest() == record["splits"][s]["sha256"]
        assert len(blob) == record["splits"][s]["bytes"]
    text = bytes(streams["train"][:4000].tolist()).decode("utf-8", errors="replace")
    assert "def " in text or "import " in text  # Python source


def test_checkpoint_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv(byte_lm.CACHE_ENV, str(tmp_path))
    streams, record = byte_lm.corpus(max_bytes=300_000)
    lm = byte_lm.LMConfig(n_layers=1, d_model=16, n_heads=2, seq_len=32)
    tc = byte_lm.TrainConfig(steps=3, batch=2, warmup=1)
    a, info_a = byte_lm.trained_model(lm, tc, streams, record, log=lambda _m: None)
    b, info_b = byte_lm.trained_model(lm, tc, streams, record, log=lambda _m: None)
    assert not info_a["cached"] and info_b["cached"] and info_a["checkpoint"] == info_b["checkpoint"]
    for (na, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), na
    # another configuration trains another model
    c, info_c = byte_lm.trained_model(lm, byte_lm.TrainConfig(steps=2, batch=2, warmup=1), streams, record,
                                      log=lambda _m: None)
    assert not info_c["cached"] and info_c["checkpoint"] != info_a["checkpoint"]


def test_model_errors_and_loss():
    lm = byte_lm.LMConfig(n_layers=1, d_model=16, n_heads=2, seq_len=32)
    model = byte_lm.ByteLM(lm)
    with pytest.raises(ValueError, match="at most 32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    ids = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(0))
    # a fresh model predicts nearly uniformly: about 8 bits per byte
    assert byte_lm.bits_per_byte(model, ids) == pytest.approx(8.0, abs=0.5)
    with pytest.raises(ValueError, match="windows"):
        byte_lm.windows(torch.zeros(10, dtype=torch.uint8), 2, 6)


def test_windows_sample_the_whole_split():
    stream = torch.arange(100, dtype=torch.uint8)
    w = byte_lm.windows(stream, 4, 10)
    assert w[0, 0] == 0 and w[-1, -1] == 99  # first at the start, last at the end
    assert bool((w[1:, 0] >= w[:-1, -1] + 1).all())  # in order, not overlapping
    assert torch.equal(byte_lm.windows(stream, 10, 10).flatten(), stream.long())  # exactly filled


@pytest.mark.parametrize("argv", [["--preset", "nope"], ["--bogus"]])
def test_bad_arguments_exit(argv, tmp_path):
    with pytest.raises(SystemExit):
        learned_masks.main([*argv, "--out", str(tmp_path)])
