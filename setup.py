"""effattn: fused, IO-aware attention kernels for PyTorch.

Packages: ``effattn`` (Python API, autograd ops, reference) and ``effattn.kernels`` (the Triton
kernels, from the top-level ``kernels/`` directory). The C++/CUDA extension ``effattn._C`` (``csrc/``)
is built here with ninja (``effattn/_build.py``): with ``nvcc`` for sm_80 and sm_90 plus PTX, without
it for the CPU only. A failed or skipped build never fails the install: the extension is then built
on first use (``effattn/_ext.py``). ``EFFATTN_SKIP_EXT_BUILD=1`` skips it at install time.
"""

import importlib.util
import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_build_module():
    """effattn/_build.py without importing effattn (which needs torch)."""
    spec = importlib.util.spec_from_file_location("_effattn_build", os.path.join(ROOT, "effattn", "_build.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class NinjaBuildExt(build_ext):
    """Builds ``effattn._C`` with the ninja build of effattn/_build.py; never fails the install."""

    def build_extension(self, ext):
        target = os.path.abspath(self.get_ext_fullpath(ext.name))
        if os.environ.get("EFFATTN_SKIP_EXT_BUILD", "0") == "1":
            print("effattn: EFFATTN_SKIP_EXT_BUILD=1: the extension will be built on first use", flush=True)
            return
        try:
            build = _load_build_module()
            cfg = build.Config()
            if not cfg.with_cuda:
                print("effattn: nvcc not found: building the extension for the CPU only (the 'cuda' backend "
                      "will be unavailable; set CUDA_HOME or put nvcc on the PATH for CUDA)", flush=True)
            res = build.build(os.path.join(os.path.abspath(self.build_temp), "effattn_ext"), output=target, cfg=cfg)
            with open(target + ".key", "w") as f:  # effattn/_ext.py rebuilds when the sources change
                f.write(build.key_line(cfg))
            warnings = sum("warning" in line.lower() for line in res.log.splitlines())
            print(f"effattn: built {target} in {res.seconds:.0f} s (CUDA: {res.with_cuda}, archs "
                  f"{','.join(cfg.archs) if res.with_cuda else '-'}; compiler warnings: {warnings})", flush=True)
        except Exception as e:  # the extension is optional at install time
            print(f"effattn: the C++/CUDA extension was not built ({e}); it will be built on first use", flush=True)

    def copy_extensions_to_source(self):
        """Editable installs: the module's ``.key`` (the hash of its sources) travels with it."""
        super().copy_extensions_to_source()
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            inplace_file, regular_file = self._get_inplace_equivalent(build_py, ext)
            if os.path.exists(regular_file + ".key"):
                self.copy_file(regular_file + ".key", inplace_file + ".key", level=self.verbose)


setup(
    name="effattn",
    version="0.1.0",
    description="Fused, IO-aware attention kernels (flash, pooled-query, block-sparse) for PyTorch",
    python_requires=">=3.10",
    packages=["effattn", "effattn.kernels", "effattn.nn", "effattn.integrations", "effattn.sparsity",
              "bench", "bench.studies"],  # bench: the benchmark harness, for the effattn-bench console script
    package_dir={"effattn": "effattn", "effattn.kernels": "kernels", "bench": "bench"},
    ext_modules=[Extension("effattn._C", sources=[], optional=True)],  # optional: not built = built on first use
    cmdclass={"build_ext": NinjaBuildExt},
    # Tested: torch 2.13 with Triton 3.9 (CPU), torch 2.11 with Triton 3.6 (CUDA); older ones are not.
    install_requires=["torch>=2.11", "triton>=3.6"],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3", "hypothesis>=6", "numpy", "transformers>=4.40", "pybind11>=2.12",
                 "ninja"],
        "ext": ["pybind11>=2.12", "ninja"],
        "funnel": ["transformers>=4.40"],
        "transformers": ["transformers>=5.24"],  # effattn.integrations.transformers (the attention interface)
        "bench": ["matplotlib", "pytest-benchmark"],
        "lint": ["ruff"],
    },
    entry_points={"console_scripts": ["effattn-info=effattn.info:main", "effattn-bench=bench.__main__:main"]},
)
