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
.venv/bin/python -m pip install -q --disable-pip-version-check --no-build-isolation -e ".[test,bench]"
