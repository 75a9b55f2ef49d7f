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
    from tests import interpreter as _interpreter

    _interpreter.install()  # the interpreter without its per-call re-patching (tests/interpreter.py)
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
    monkeypatch.setattr("effattn.kernels.relpos_attn._alloc", poisoned_empty)


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


# ----------------------------------------------------------------------------------------------
# grids thinned on the Triton interpreter and the CUDA emulator
# ----------------------------------------------------------------------------------------------
# The interpreter runs a Triton kernel as Python, thousands of times slower than the compiled kernel,
# and the CUDA emulator (backend "cuda-emu") runs a CUDA kernel's threads as fibers, so a grid that
# sweeps a parameter densely (window edges, lengths, options) runs on them at the points that
# exercise the kernels' own code paths (block sizes, ragged edges, each flag), named beside the test
# with ``@pytest.mark.interpreter_subset(name=[values], ...)``. The compiled backends (the C++ CPU
# kernels here, Triton and CUDA on a GPU) run every point. With ``EFFATTN_FULL_GRIDS=1`` the slow
# backends run every point too.
_FULL_GRIDS = os.environ.get("EFFATTN_FULL_GRIDS", "") not in ("", "0")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "interpreter_subset(**values): on the Triton interpreter, run only the grid points whose "
                   "parameters take the listed values, or those of another such marker (every point elsewhere, "
                   "or with EFFATTN_FULL_GRIDS=1)")


def _on_interpreter(item) -> bool:
    """Whether the item runs kernels on a slow backend: a Triton or emulator target of the backend fixtures
    with CPU tensors (Triton: through the interpreter), a ``backend`` parameter naming one, or (no backend
    parameter) any test while the interpreter is on."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    target = params.get("backend", params.get("any_backend"))
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if target is None:
        return interpreted
    name, device = (target, DEVICE) if isinstance(target, str) else (target.name, target.device)
    if name == "cuda-emu":
        return True
    return interpreted and name == "triton" and device == "cpu"


def _in_subset(item, subset: dict) -> bool:
    params = item.callspec.params
    for name, values in subset.items():
        if name not in params:
            raise pytest.UsageError(f"{item.nodeid}: interpreter_subset names {name!r}, not a parameter of the test")
        if params[name] not in values:
            return False
    return True


def pytest_collection_modifyitems(config, items):
    """Deselect, on the interpreter, the points of a grid outside its ``interpreter_subset`` markers
    (several markers: a point runs if it is in any of them)."""
    if _FULL_GRIDS:
        return
    kept, thinned = [], []
    for item in items:
        subsets = [m.kwargs for m in item.iter_markers("interpreter_subset")]
        if subsets and _on_interpreter(item) and not any(_in_subset(item, s) for s in subsets):
            thinned.append(item)
        else:
            kept.append(item)
    if thinned:
        config.hook.pytest_deselected(items=thinned)
        items[:] = kept
        config._effattn_thinned = len(thinned)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    n = getattr(config, "_effattn_thinned", 0)
    if n:
        terminalreporter.write_line(f"effattn: {n} grid points left to the compiled backends on the Triton interpreter "
                                    f"(interpreter_subset markers; EFFATTN_FULL_GRIDS=1 runs them)")
