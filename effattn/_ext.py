"""Find, build and load the compiled extension ``effattn._C`` (csrc/).

Order: the module built at install time (``setup.py``, next to this file) unless the sources changed
since; else a build in the JIT
cache, ``$EFFATTN_CACHE`` or ``~/.cache/effattn/ext-<hash>`` (the hash covers the sources, flags and
tools, so an edit rebuilds), built on first use under a file lock so that parallel processes (test
workers) build it once. ``EFFATTN_JIT=0`` turns the JIT build off. Nothing here imports torch.
"""

from __future__ import annotations

import fcntl
import functools
import importlib.util
import os
import sys
import types

from effattn import _build

ENV_CACHE = "EFFATTN_CACHE"
ENV_JIT = "EFFATTN_JIT"


class ExtensionUnavailable(RuntimeError):
    """The extension is neither installed nor buildable here; the message says why."""


def cache_root() -> str:
    return os.environ.get(ENV_CACHE) or os.path.join(os.path.expanduser("~"), ".cache", "effattn")


def _load_from(path: str, module: str = _build.MODULE) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(f"effattn.{module}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[spec.name] = module
    return module


def _installed(path: str | None = None) -> str | None:
    """The module built by setup.py, unless the sources it was built from have changed since (a source
    checkout: its ``.key`` file holds the hash of the sources it was built from and the CUDA archs it was
    built for, :func:`effattn._build.key_line`; the hash is compared with this checkout's for those archs)."""
    path = path or os.path.join(os.path.dirname(os.path.abspath(__file__)), _build.module_filename())
    if not os.path.isfile(path):
        return None
    try:
        with open(path + ".key") as f:
            built_from, archs = _build.read_key_line(f.read())
    except OSError:  # no key file: stale in a source checkout, as built in an installed wheel
        return None if os.path.isdir(_build.CSRC) else path
    try:
        cfg = _build.Config(archs=archs) if archs is not None else _build.Config()
        if built_from != cfg.key():
            return None
    except OSError:  # no sources to compare with (an installed wheel)
        pass
    return path


def jit_build(cfg: _build.Config | None = None) -> _build.BuildResult | str:
    """Build into the cache (once per source hash, under a lock). Returns the BuildResult, or the
    module's path when it was already there."""
    cfg = cfg or _build.Config()
    build_dir = os.path.join(cache_root(), f"{'emu' if cfg.emu else 'ext'}-{cfg.key()}")
    os.makedirs(build_dir, exist_ok=True)
    output = os.path.join(build_dir, _build.module_filename(cfg.module))
    with open(os.path.join(build_dir, "lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if os.path.isfile(output):
                return output
            tmp = output + ".partial"
            res = _build.build(build_dir, output=tmp, cfg=cfg)
            os.replace(tmp, output)
            res.path = output
            return res
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@functools.cache
def _load() -> tuple[types.ModuleType | None, str | None]:
    path = _installed()
    if path is None:
        if os.environ.get(ENV_JIT, "1") == "0":
            return None, f"the extension was not built at install time and {ENV_JIT}=0 disables building it"
        try:
            res = jit_build()
        except (_build.BuildError, OSError) as e:
            return None, f"the extension could not be built: {e}"
        path = res if isinstance(res, str) else res.path
    try:
        return _load_from(path), None
    except ImportError as e:
        return None, f"the extension at {path} cannot be loaded: {e}"


def load() -> types.ModuleType:
    """The extension module; raises :class:`ExtensionUnavailable` with the reason when there is none."""
    module, why = _load()
    if module is None:
        raise ExtensionUnavailable(why)
    return module


def is_ready() -> bool:
    """Whether the extension can be loaded without building it (installed, already built, or loaded)."""
    if _load.cache_info().currsize:
        return True
    if _installed() is not None:
        return True
    try:
        cfg = _build.Config()
        return os.path.isfile(os.path.join(cache_root(), f"ext-{cfg.key()}", _build.module_filename()))
    except OSError:
        return False


def unavailable_reason() -> str | None:
    """None when the extension loads (building it first if needed), else why it does not."""
    return _load()[1]


# ----------------------------------------------------------------------------------------------
# the emulator's module effattn._C_emu (backend "cuda-emu"): built in the cache on first use, never installed
# ----------------------------------------------------------------------------------------------
@functools.cache
def _load_emu() -> tuple[types.ModuleType | None, str | None]:
    if os.environ.get(ENV_JIT, "1") == "0":
        return None, f"the emulator's module is built on first use and {ENV_JIT}=0 disables building it"
    if not _build.emu_sources():
        return None, "the emulator's sources (csrc/emu) are not in this installation"
    cfg = _build.Config(emu=True)
    try:
        res = jit_build(cfg)
    except (_build.BuildError, OSError) as e:
        return None, f"the emulator's module could not be built: {e}"
    path = res if isinstance(res, str) else res.path
    try:
        return _load_from(path, _build.EMU_MODULE), None
    except ImportError as e:
        return None, f"the emulator's module at {path} cannot be loaded: {e}"


def load_emu() -> types.ModuleType:
    """The emulator's module (building it first if needed); raises :class:`ExtensionUnavailable` with the reason."""
    module, why = _load_emu()
    if module is None:
        raise ExtensionUnavailable(why)
    return module


def emu_is_ready() -> bool:
    """Whether the emulator's module can be loaded without building it (already built, or loaded)."""
    if _load_emu.cache_info().currsize:
        return True
    try:
        cfg = _build.Config(emu=True)
        return os.path.isfile(os.path.join(cache_root(), f"emu-{cfg.key()}", _build.module_filename(cfg.module)))
    except OSError:
        return False


def emu_unavailable_reason() -> str | None:
    """None when the emulator's module loads (building it first if needed), else why it does not."""
    return _load_emu()[1]
