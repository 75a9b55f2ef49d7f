"""effattn: fused, IO-aware attention kernels for PyTorch.

Packages: ``effattn`` (Python API, autograd ops, reference) and ``effattn.kernels`` (the Triton
kernels, from the top-level ``kernels/`` directory). The CUDA C++ extension in ``csrc/`` is not
built yet (see csrc/README.md).
"""

from setuptools import setup

setup(
    name="effattn",
    version="0.1.0",
    description="Fused, IO-aware attention kernels (flash, pooled-query, block-sparse) for PyTorch",
    python_requires=">=3.10",
    packages=["effattn", "effattn.kernels", "effattn.nn", "effattn.integrations", "effattn.sparsity"],
    package_dir={"effattn": "effattn", "effattn.kernels": "kernels"},
    install_requires=["torch>=2.4", "triton>=3.0"],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3", "numpy", "transformers>=4.40"],
        "funnel": ["transformers>=4.40"],
        "bench": ["matplotlib", "pytest-benchmark"],
    },
    entry_points={"console_scripts": ["effattn-info=effattn.info:main"]},
)
