#!/usr/bin/env bash
# Sets up a local virtual environment in .venv: torch==2.13.0 first (the CPU wheel; any other torch
# spec pulls the CUDA build), then effattn in editable mode with its test and bench extras.
# pybind11 and ninja come first too: the install builds the C++/CUDA extension with them (setup.py;
# with --no-build-isolation, pyproject's build requirements are not installed). Idempotent.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0 "setuptools>=64" wheel "pybind11>=2.12" ninja
# Without a visible GPU the CUDA kernels cannot run here: build them for one arch (sm_90), which checks that
# every CUDA source compiles warning-free, in half the time of the default sm_80 + sm_90. EFFATTN_CUDA_ARCHS
# chooses otherwise; on a machine with a GPU the default archs are built.
if [ -z "${EFFATTN_CUDA_ARCHS:-}" ] && ! nvidia-smi -L >/dev/null 2>&1; then
  export EFFATTN_CUDA_ARCHS=90
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --no-build-isolation -e ".[test,bench]"
