"""The Funnel model study end to end on a tiny model: the fused versions checked against eager, rows written."""

import json

import pytest

pytest.importorskip("transformers")

from bench.studies import funnel_model  # noqa: E402


def test_tiny_run_writes_outputs(tmp_path):
    rc = funnel_model.main(["--size", "tiny", "--seqlen", "33", "--repeats", "1", "--backend", "cpp",
                            "--out", str(tmp_path)])
    assert rc == 0
    doc = json.loads((tmp_path / "funnel_model.json").read_text())
    rows = doc["rows"]
    assert [(r["T"], r["mode"]) for r in rows] == [(33, "fwd"), (33, "fwd+bwd")]
    for r in rows:
        assert set(r["seconds"]) == set(funnel_model.VERSIONS) and all(t > 0 for t in r["seconds"].values())
        assert all(e["out"] < 2e-3 and e["grad"] < 2e-3 for e in r["max_abs_err"].values())
    assert "FunnelBaseModel" in doc["metadata"]["model"] and doc["metadata"]["git_commit"]
    table = [line for line in (tmp_path / "funnel_model.md").read_text().splitlines() if line.startswith("| 33 |")]
    assert len(table) == 2 and all(line.count(" | ") == 7 for line in table), table


def test_bad_arguments():
    with pytest.raises(SystemExit):
        funnel_model.main(["--device", "tpu"])
