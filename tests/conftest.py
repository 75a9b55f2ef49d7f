"""Test set-up: device choice, the Triton interpreter on CPU, seeds, NaN-poisoned outputs.

The device is ``cuda`` when a GPU is present and ``cpu`` otherwise; ``EFFATTN_TEST_DEVICE`` forces
one. On CPU the Triton kernels run through Triton's interpreter, which must be switched on before
triton is first imported: this file does it.
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
from effattn.kernels import block_sparse_attn, flash_attn  # noqa: E402


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture(autouse=True)
def _seed(request):
    """A different, reproducible seed for every test."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def _poisoned_alloc(*size, dtype=None, device=None, **kw):
    t = torch.empty(*size, dtype=dtype, device=device, **kw)
    return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-1)


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """Every output buffer of the kernels and the reference starts as NaN: unwritten elements fail."""
    monkeypatch.setattr(flash_attn, "_alloc", _poisoned_alloc)
    monkeypatch.setattr(block_sparse_attn, "_alloc", _poisoned_alloc)
    monkeypatch.setattr(reference, "_alloc", _poisoned_alloc)
    monkeypatch.setattr(cuda_ops, "_alloc", _poisoned_alloc)


@pytest.fixture
def one_thread():
    """One CPU thread for the test: small tensors, where threads only contend under ``pytest -n``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
