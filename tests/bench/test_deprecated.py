"""The deprecated commands (bench/_deprecated.py): each warns, says what replaces it, and runs that."""

from __future__ import annotations

import pytest

from bench import bench_attention, bench_funnel, bench_sparse


@pytest.mark.parametrize("module, preset", [(bench_sparse, "sparse"), (bench_funnel, "funnel")])
def test_old_command_warns_and_runs_the_harness(module, preset, monkeypatch, capsys, tmp_path):
    seen = []
    monkeypatch.setattr(bench_attention, "main", lambda argv: seen.append(argv) or 7)
    with pytest.warns(DeprecationWarning, match=f"runs `python -m bench --preset {preset} "):
        assert module.main(["--device", "cpu", "--out", str(tmp_path)]) == 7  # the harness's exit status
    assert seen == [["--preset", preset, "--stem", preset, "--out", str(tmp_path), "--device", "cpu"]]
    err = capsys.readouterr().err
    assert f"`{module.OLD}` is deprecated" in err and f"--stem {preset}" in err  # shown whatever the filters
