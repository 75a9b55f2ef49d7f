"""The predictor study (``python -m bench.studies.predictors``) end to end on its tiny preset (CPU), and the
deprecated ``python -m bench.bench_predictors``, which runs it."""

import json

import pytest

from bench import bench_predictors
from bench.studies import predictors


def test_tiny_run_writes_outputs(tmp_path):
    assert predictors.main(["--preset", "tiny", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "predictors.json").read_text())
    assert data["metadata"]["preset"] == "tiny"
    rows = data["rows"]
    assert rows
    assert {r["predictor"] for r in rows} >= {"sparsefinder", "sparsefinder+window", "sparsefinder-top_k", "gate",
                                              "gate-thr", "oracle"}
    for r in rows:
        for key in ("sparsity", "recall", "exact_row_recall"):
            assert 0.0 <= r[key] <= 1.0 + 1e-6, (key, r)
        for key in ("pred_ms", "sparse_ms", "dense_ms", "pred_per_dense_time"):
            assert r[key] > 0
        # the prediction's cost against the forward attention FLOPs its mask cuts (none for the oracle)
        assert r["saved_flops"] >= 0
        if r["predictor"] == "oracle":
            assert r["pred_flops"] is None and r["pred_per_saved_flops"] is None
        else:
            assert r["pred_flops"] > 0
            if r["saved_flops"]:
                assert r["pred_per_saved_flops"] == pytest.approx(r["pred_flops"] / r["saved_flops"])
    # the oracle keeping all kv blocks sees all of the attention
    T, block = rows[0]["T"], rows[0]["block"]
    full = [r for r in rows if r["predictor"] == "oracle" and r["setting"] == f"top_k={T // block}"]
    for r in full:
        assert r["sparsity"] == 0.0 and r["recall"] == pytest.approx(1.0, abs=1e-5)
    assert (tmp_path / "predictors.md").read_text().count("\n| ") >= len(rows)
    assert (tmp_path / "predictors_recall.png").stat().st_size > 0


@pytest.mark.parametrize("argv", [
    ["--preset", "nope"],
    ["--device", "tpu"],
    ["--T", "0"],
    ["--T", "100"],  # not a multiple of the block
    ["--min-run-time", "-1"],
    ["--bogus"],
])
def test_bad_arguments_exit(argv, tmp_path):
    with pytest.raises(SystemExit):
        predictors.main([*argv, "--out", str(tmp_path)])


def test_sequences_are_real_text():
    ids = predictors.sequences(2, 64)
    assert ids.shape == (2, 64)
    text = bytes((ids.flatten() - predictors.N_SPECIAL).tolist()).decode("utf-8", errors="replace")
    assert sum(c.isalpha() for c in text) > 64  # mostly letters: English text, not noise


def test_text_starts_with_the_readme():
    readme = (predictors.REPO_ROOT / "README.md").read_text(encoding="utf-8", errors="replace")
    assert predictors.corpus_text().startswith(readme[:200])


def test_old_command_warns_and_runs_the_study(monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(predictors, "main", lambda argv: seen.append(argv) or 0)
    with pytest.warns(DeprecationWarning, match="python -m bench.studies.predictors --preset tiny"):
        assert bench_predictors.main(["--preset", "tiny"]) == 0
    assert seen == [["--preset", "tiny"]]
    assert "deprecated" in capsys.readouterr().err
