"""Every command line of the project answers ``--help``: ``python -m bench``, every ``python -m bench.<module>``
that has a main, ``python -m effattn.info``, and the console scripts ``effattn-bench`` and ``effattn-info``."""

from __future__ import annotations

import importlib
import os
import runpy
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
CONSOLE_SCRIPTS = {"effattn-bench": "bench", "effattn-info": "effattn"}  # script: the package it runs
MAIN_GUARD = 'if __name__ == "__main__":'


def _modules_with_main() -> list[str]:
    """``bench``, ``bench.<module>`` and ``bench.<package>.<module>`` of every file with a main guard."""
    names = []
    for path in sorted((REPO_ROOT / "bench").rglob("*.py")):
        if MAIN_GUARD in path.read_text():
            parts = path.relative_to(REPO_ROOT).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__main__" else parts))
    return names


BENCH_MODULES = _modules_with_main()


def test_every_bench_command_is_found():
    assert {"bench", "bench.bench_sparse", "bench.bench_funnel", "bench.bench_predictors",
            "bench.studies.predictors"} <= set(BENCH_MODULES)


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # runpy, on a module imported before
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the deprecated commands' own (tested with them)
@pytest.mark.parametrize("module", [*BENCH_MODULES, "effattn.info"])
def test_module_help(module, monkeypatch, capsys):
    """``python -m MODULE --help``, run as ``-m`` runs it (in this process: no second torch import)."""
    monkeypatch.setattr(sys, "argv", [module, "--help"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_module(module, run_name="__main__", alter_sys=False)
    assert exc.value.code in (0, None)
    out = capsys.readouterr().out
    assert out.startswith("usage: ") and "--help" in out


def _console_script(name: str) -> Path:
    entry = {ep.name: ep for ep in metadata.entry_points(group="console_scripts")}.get(name)
    if entry is None:
        pytest.skip(f"{name} is not installed (pip install -e . installs it)")
    script = Path(sys.executable).parent / name
    if not script.is_file():
        pytest.skip(f"{name} is not beside {sys.executable}")
    return script


@pytest.mark.parametrize("name", list(CONSOLE_SCRIPTS))
def test_console_script_points_into_its_package(name):
    _console_script(name)
    entry = {ep.name: ep for ep in metadata.entry_points(group="console_scripts")}[name]
    assert entry.module.split(".")[0] == CONSOLE_SCRIPTS[name], entry.value
    assert callable(entry.load())


@pytest.mark.parametrize("name", list(CONSOLE_SCRIPTS))
def test_console_script_help(name, tmp_path):
    script = _console_script(name)
    # from another directory: the installed script must find its package without the checkout on the path
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([str(script), "--help"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage: ")


def _gpu_check_invocations() -> list[list[str]]:
    """The argument lists of every ``"$PYTHON" -m bench ...`` in bench/gpu_check.sh."""
    text = (REPO_ROOT / "bench" / "gpu_check.sh").read_text().replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        if '"$PYTHON" -m bench' in line:
            words = shlex.split(line.split('"$PYTHON" -m ', 1)[1])
            found.append(words)
    return found


def test_gpu_check_runs_the_harness_with_valid_arguments():
    from bench import bench_attention
    from bench.cases import expand

    invocations = _gpu_check_invocations()
    studies = [words for words in invocations if words[0].startswith("bench.studies.")]
    invocations = [words for words in invocations if words not in studies]
    assert [words[0] for words in invocations] == ["bench"] * len(invocations)  # no deprecated command
    assert [words[0] for words in studies] == ["bench.studies.funnel_model"]  # the whole model on the GPU
    for words in studies:
        args = importlib.import_module(words[0]).build_parser().parse_args(words[1:])
        assert args.device == "cuda", words
    presets = {words[words.index("--preset") + 1] for words in invocations}
    assert presets == {"h100", "h100-ops", "h100-sparse", "h100-funnel", "h100-varlen"}
    for words in invocations:
        args = bench_attention.build_parser().parse_args(words[1:])
        assert args.device == "cuda" and expand(bench_attention.resolve_sweep(args), "cuda"), words
