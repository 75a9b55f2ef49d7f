"""Test set-up: device choice, the Triton interpreter on CPU, seeds, NaN-poisoned outputs, the backend fixture.

The device is ``cuda`` when a GPU is present and ``cpu`` otherwise; ``EFFATTN_TEST_DEVICE`` forces
one. On CPU the Triton kernels run through Triton's interpreter, which must be switched on before
triton is first imported: this file does it.

The ``backend`` fixture runs a test on every backend of ``effattn.BACKENDS`` but the reference (the
oracle), on the test device and on the CPU; a backend that cannot run a case says why (its
``not_supported_reasons``), and the case is skipped with those reasons (:class:`tests.helpers.Target`).
"""

import os
import zlib

import pytest

_CUDA = None


def _cuda_available() -> bool:
    global _CUDA
    if _CUDA is None:
        import torch
        _CUDA = torch.cuda.is_available()
    return _CUDA


DEVICE = os.environ.get("EFFATTN_TEST_DEVICE") or ("cuda" if _cuda_available() else "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.pop("EFFATTN_BACKEND", None)

import torch  # noqa: E402

import effattn.cuda_ops as cuda_ops  # noqa: E402
import effattn.reference as reference  # noqa: E402
from effattn.kernels import block_attn_map, block_sparse_attn, flash_attn  # noqa: E402
from effattn.testing import poisoned_empty  # noqa: E402
from tests.helpers import backend_targets  # noqa: E402


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture(autouse=True)
def _seed(request):
    """A different, reproducible seed for every test."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """Every output buffer of the kernels and the reference starts as NaN: unwritten elements fail."""
    for module in (flash_attn, block_sparse_attn, block_attn_map, reference, cuda_ops):
        monkeypatch.setattr(module, "_alloc", poisoned_empty)


def _target(request, monkeypatch):
    if request.param.name == "cpp":
        # tiles of 16 x 16 queries x keys: several tiles, ragged edges and every tile walk at small sizes
        monkeypatch.setattr(cuda_ops, "CPU_TILE", (16, 16))
    return request.param


@pytest.fixture(params=backend_targets(DEVICE))
def backend(request, monkeypatch):
    """A backend (all but the reference) and the device of its inputs: see :class:`tests.helpers.Target`."""
    return _target(request, monkeypatch)


@pytest.fixture(params=backend_targets(DEVICE, include_reference=True))
def any_backend(request, monkeypatch):
    """As ``backend``, the reference included: for tests whose oracle is not the reference."""
    return _target(request, monkeypatch)


@pytest.fixture
def one_thread():
    """One CPU thread for the test: small tensors, where threads only contend under ``pytest -n``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
