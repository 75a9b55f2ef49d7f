"""The block-sparse benchmark (``python -m bench.bench_sparse``): end to end on a tiny preset on CPU, the
random masks and the FLOP count, the wrong-output path, the plot without matplotlib, argument errors."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from bench import bench_sparse

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CPU_PROVIDERS = ("effattn", "sdpa-masked", bench_sparse.DENSE)  # must run (status ok) on CPU
FAST = ["--device", "cpu", "--min-run-time", "0.01"]


def _run(tmp_path, *args):
    rc = bench_sparse.main(["--preset", "tiny", "--out", str(tmp_path), *FAST, *args])
    return rc, json.loads((tmp_path / "sparse.json").read_text())


def test_end_to_end_tiny(tmp_path):
    rc, data = _run(tmp_path)
    assert rc == 0
    meta, rows = data["metadata"], data["rows"]
    for key in ("device", "torch", "git_commit", "command", "timing", "memory", "fractions", "block"):
        assert key in meta, key
    assert meta["device"] == "cpu"
    assert (tmp_path / "sparse.md").read_text().startswith("# effattn block-sparse attention benchmarks")
    assert (tmp_path / "sparse_density.png").read_bytes()[:8] == PNG_MAGIC
    assert not [r for r in rows if r["status"].startswith("wrong")]

    (B, H, T, D), = bench_sparse.PRESETS["tiny"]["cases"]
    density = [r for r in rows if r["part"] == "density"]
    masks = {r["mask"] for r in density if r["provider"] == "effattn"}
    assert masks == {"random 1", "random 0.25", "causal", "sliding T/8", "bigbird"}
    for r in density:
        for key in ("provider", "mask", "kept", "sparsity", "B", "H", "T", "D", "block", "flops_fwd", "status"):
            assert key in r, (key, r)
        assert (r["B"], r["H"], r["T"], r["D"]) == (B, H, T, D)
        assert r["kept"] == pytest.approx(1 - r["sparsity"])
        if r["provider"] in CPU_PROVIDERS:
            assert r["status"] == "ok", r
            assert r["ms"] > 0 and r["tflops"] > 0 and r["vs_dense"] > 0, r
            mult = 1.0 if r["mode"] == "fwd" else bench_sparse.BWD_FACTOR
            assert r["tflops"] == pytest.approx(r["flops_fwd"] * mult / r["ms"] / 1e9)
        else:
            assert r["provider"] == "flex" and r["status"] == "skipped: needs CUDA", r
    for mode in ("fwd", "fwd+bwd"):
        dense = [r for r in density if r["provider"] == bench_sparse.DENSE and r["mode"] == mode]
        assert len(dense) == 1 and dense[0]["vs_dense"] == pytest.approx(1.0)
        assert dense[0]["flops_fwd"] == 4 * B * H * T * T * D
        for r in density:
            if r.get("mode") == mode and r["status"] == "ok":
                assert r["vs_dense"] == pytest.approx(dense[0]["ms"] / r["ms"])
    quarter = [r for r in density if r["mask"] == "random 0.25" and r["provider"] == "effattn"]
    assert quarter and all(r["kept"] == pytest.approx(0.25) for r in quarter)

    build = [r for r in rows if r["part"] == "build"]
    assert {r["mask"] for r in build} == {"causal", "sliding T/8", "bigbird", "documents", "random 0.25"}
    for r in build:
        assert r["status"] == "ok", r
        assert r["build_ms"] > 0 and r["attn_fwd_ms"] > 0 and r["attn_fwd+bwd_ms"] > 0
        assert r["build_over_fwd"] == pytest.approx(r["build_ms"] / r["attn_fwd_ms"])


def test_build_part_alone(tmp_path):
    rc, data = _run(tmp_path, "--parts", "build", "--block", "32", "64")
    assert rc == 0
    rows = data["rows"]
    assert rows and all(r["part"] == "build" and r["status"] == "ok" and r["block"] == [32, 64] for r in rows)
    assert not (tmp_path / "sparse_density.png").exists()  # no density rows: no plot


def test_wrong_output_is_reported_and_not_timed(tmp_path, monkeypatch):
    prepare = bench_sparse.prepare

    def off_by_one(name, bm, device):
        fn, nbytes = prepare(name, bm, device)
        return ((lambda q, k, v: fn(q, k, v) + 1) if name == "sdpa-masked" else fn), nbytes

    monkeypatch.setattr(bench_sparse, "prepare", off_by_one)
    rc, data = _run(tmp_path, "--parts", "density", "--fractions", "0.5")
    assert rc == 1
    wrong = [r for r in data["rows"] if r["status"].startswith("wrong")]
    assert wrong and all(r["provider"] == "sdpa-masked" and "ms" not in r for r in wrong)
    assert "wrong (max err" in (tmp_path / "sparse.md").read_text()


def test_random_mask_and_flops():
    H, T, block = 3, 512, (64, 32)
    bm = bench_sparse.random_mask(H, T, block, 0.25, torch.Generator().manual_seed(1), "cpu")
    assert bm.shape == (1, H, 8, 16)
    kinds = bm.block_kinds()
    kept = kinds > 0
    assert (kept.sum(-1) == 4).all()  # round(0.25 * 16) blocks in every query-block row
    assert kept[0, :, torch.arange(8), torch.arange(8) * 2].all()  # the diagonal's block among them
    assert bm.sparsity() == pytest.approx(0.75)
    assert bench_sparse.kept_flops(bm, 2, H, 16) == 4 * 16 * 64 * 32 * (2 * H * 8 * 4)
    again = bench_sparse.random_mask(H, T, block, 0.25, torch.Generator().manual_seed(1), "cpu")
    assert torch.equal(again.block_kinds(), kinds)  # seeded
    tiny = bench_sparse.random_mask(1, T, block, 0.001, torch.Generator().manual_seed(1), "cpu")
    assert (tiny.block_kinds().sum(-1) > 0).all()  # at least one block per row


def test_plot_skipped_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    note = bench_sparse.write_plot(tmp_path / "p.png", [])
    assert "matplotlib" in note and not (tmp_path / "p.png").exists()


@pytest.mark.parametrize("args", [["--parts", "nope"], ["--preset", "nope"], ["--fractions", "0"],
                                  ["--fractions", "1.5"], ["--fractions", "half"], ["--min-run-time", "0"],
                                  ["--device", "tpu"], ["--block", "48", "64"], ["--block", "64"]])
def test_bad_arguments(tmp_path, capsys, args):
    with pytest.raises(SystemExit) as e:
        bench_sparse.main(["--out", str(tmp_path), *args])
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "sparse.json").exists()
