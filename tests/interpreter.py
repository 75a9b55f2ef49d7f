"""Triton's interpreter without its per-call re-patching of ``triton.language``.

The interpreter patches ``triton.language`` (``tl``, ``tl.core``, ``tl.math``) with its NumPy
semantics when a kernel launches, and again on every call of a ``@triton.jit`` device function inside
it (``InterpretedFunction.__call__`` → ``_patch_lang``): a scan of every member of those modules, about
1.5 ms, repeated for each helper call of each tile of each program, where it finds nothing left to
patch (a patched member is no longer a builtin). In the attention kernels, which call helpers per
tile, that scan is a third of the interpreter's time. :func:`install` skips it for a device function
whose ``triton.language`` modules the running launch has already patched (the interpreter never undoes
a device call's patches, so a module patched by one stays patched for the launch); everything else,
the semantics included, is the interpreter's own. A Triton without these internals is left as it is.
"""

from __future__ import annotations

import inspect

_active: list[frozenset[int]] = []  # the lang modules patched by each launch in progress (innermost last)
_langs_of: dict[int, frozenset[int]] = {}


def _langs(fn) -> frozenset[int]:
    key = id(fn)
    if key not in _langs_of:
        import triton.language as tl

        _langs_of[key] = frozenset(id(v) for v in fn.__globals__.values()
                                   if inspect.ismodule(v) and v in (tl, tl.core))
    return _langs_of[key]


def install() -> bool:
    """Patch the interpreter (once); False when this Triton lacks the internals it relies on."""
    try:
        from triton.runtime import interpreter as ti

        grid_call, device_call = ti.GridExecutor.__call__, ti.InterpretedFunction.__call__
        ti.InterpretedFunction.rewrite, ti.InterpreterError  # noqa: B018 - the internals used below
    except (ImportError, AttributeError):
        return False
    if getattr(device_call, "_effattn", False):
        return True

    def launch(self, *args, **kwargs):
        _active.append(_langs(self.fn))
        try:
            return grid_call(self, *args, **kwargs)
        finally:
            _active.pop()

    def call(self, *args, **kwargs):
        if not _active:
            return device_call(self, *args, **kwargs)
        if not _langs(self.fn) <= _active[-1]:  # e.g. tl.sum, whose module sees tl.core: patched from now on
            _active[-1] |= _langs(self.fn)
            return device_call(self, *args, **kwargs)
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise ti.InterpreterError(repr(e)) from e

    call._effattn = True
    ti.GridExecutor.__call__, ti.InterpretedFunction.__call__ = launch, call
    return True
