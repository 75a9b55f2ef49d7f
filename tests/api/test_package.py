"""The package's layout: a package scan sees effattn's own modules only, effattn.kernels resolves
(installed, editable, or from an uninstalled checkout), and the ops share helpers without importing
each other's private names."""

from __future__ import annotations

import ast
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import torch
import triton

import effattn

PACKAGE_DIR = Path(effattn.__file__).resolve().parent
ROOT = PACKAGE_DIR.parent


def test_walk_packages_lists_only_effattn_modules():
    def fail(name):
        raise AssertionError(f"importing {name} failed during the scan")

    names = [m.name for m in pkgutil.walk_packages(effattn.__path__, "effattn.", onerror=fail)]
    assert [Path(p).resolve() for p in effattn.__path__] == [PACKAGE_DIR]
    own = {p.name.split(".")[0] for p in PACKAGE_DIR.iterdir()}
    assert names and all(n.split(".")[1] in own for n in names), names
    for stray in ("effattn.effattn", "effattn.setup", "effattn.bench", "effattn.tests"):
        assert stray not in names
    assert {"effattn.flash", "effattn.limits", "effattn.nn.funnel", "effattn.sparsity.gate"} <= set(names)


def test_kernels_import_as_effattn_kernels():
    from effattn.kernels import flash_attn

    assert flash_attn.__name__ == "effattn.kernels.flash_attn"
    assert Path(flash_attn.__file__).resolve().parent.name == "kernels"


def test_uninstalled_checkout_finds_kernels(tmp_path):
    """Without site (no editable-install finder): only the checkout on the path, torch and triton beside."""
    libs = {str(Path(m.__file__).resolve().parent.parent) for m in (torch, triton)}
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(PYTHONNOUSERSITE="1", PYTHONPATH=os.pathsep.join([str(ROOT), *sorted(libs)]), TRITON_INTERPRET="1")
    script = """
import importlib.util, pkgutil, sys
import effattn
from effattn.kernels import flash_attn
assert not any('Editable' in getattr(f, '__name__', type(f).__name__) for f in sys.meta_path), sys.meta_path
print(flash_attn.__file__)
print(importlib.util.find_spec('effattn.setup'), importlib.util.find_spec('effattn.tests'))
print(len(list(pkgutil.walk_packages(effattn.__path__, 'effattn.'))))
"""
    res = subprocess.run([sys.executable, "-S", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    kernels_file, specs, count = res.stdout.strip().splitlines()
    assert Path(kernels_file).resolve() == ROOT / "kernels" / "flash_attn.py"
    assert specs == "None None"
    assert int(count) > 0


OPS = ("flash", "pooled", "sparse")


def _imports(module: str) -> list[tuple[str, str]]:
    tree = ast.parse((PACKAGE_DIR / f"{module}.py").read_text())
    return [(node.module or "", alias.name) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
            for alias in node.names]


def test_ops_import_no_other_ops_privates():
    for op in OPS:
        for module, name in _imports(op):
            other = module.removeprefix("effattn.")
            if other in OPS:
                assert not name.startswith("_"), f"effattn/{op}.py imports {name} from {module}"
    # the block-sparse op is a leaf: flash's segment_ids path imports it, not the other way round
    assert not any(m == "effattn.flash" for m, _ in _imports("sparse") + _imports("pooled"))
