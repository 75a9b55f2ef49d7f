"""The CUDA kernels of ``csrc/cuda`` on a host emulator of the PTX primitives they use (``csrc/emu``).

:func:`load` returns the module ``effattn._C_emu`` (built with the host compiler on first use, into the
extension's cache): the kernels' launchers (``cuda_forward`` / ``cuda_backward`` on an ``AttnParams``,
as ``effattn._C``'s, for CPU tensors), the switch of the emulator's ``cp.async`` check, and the
emulator's self-tests (``mma_m16n8k16``, ``ldmatrix``, ``shfl``, conversions, scenarios), which
``tests/csrc/test_emu_primitives.py`` compares with tables written from the PTX ISA. Backend
``"cuda-emu"`` (:mod:`effattn.backends`) runs the ops through it, only when named.
"""

from __future__ import annotations

import types

from effattn import _ext


def load() -> types.ModuleType:
    """The emulator's module; raises :class:`effattn._ext.ExtensionUnavailable` with the reason."""
    return _ext.load_emu()


def unavailable_reason() -> str | None:
    return _ext.emu_unavailable_reason()
