"""The library never imports the benchmark harness: ``import effattn`` and the import of every effattn
submodule leave no ``bench`` module in ``sys.modules``, though ``bench`` is importable (the checkout is on
the path)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

# In a fresh interpreter: import effattn and each of its submodules, list the bench modules loaded and the
# imports that failed; then import the harness and list them again (the probe's own check: it sees bench).
PROBE = """
import importlib, json, pkgutil, sys

def bench_modules():
    return sorted(m for m in sys.modules if m == "bench" or m.startswith("bench."))

import effattn
names = ["effattn"] + sorted(m.name for m in pkgutil.walk_packages(effattn.__path__, "effattn."))
failed = {}
for name in names:
    try:
        importlib.import_module(name)
    except Exception as e:
        failed[name] = f"{type(e).__name__}: {e}"
after_effattn = bench_modules()
import bench.cases
print(json.dumps({"imported": names, "failed": failed, "bench": after_effattn, "control": bench_modules()}))
"""


def test_effattn_never_imports_bench():
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO_ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["bench"] == [], f"effattn imported the harness: {found['bench']}"
    assert not found["failed"], found["failed"]
    assert {"effattn", "effattn.info", "effattn.profile", "effattn.timing"} <= set(found["imported"])
    assert {"bench", "bench.cases"} <= set(found["control"])  # the same probe sees the harness once imported
