"""Build the ``effattn._C`` extension with ninja: used by ``setup.py`` and by the JIT path of
:mod:`effattn._ext`. Standard library only (``setup.py`` loads this file without importing effattn).

The extension is a pybind11 module that does not link against libtorch: the C++ sources
(``csrc/bindings.cpp``, the CPU implementation) are compiled by the host C++ compiler, the CUDA
sources (``csrc/cuda/*.cu``) by ``nvcc``, and the module links the CUDA runtime statically
(``libcudart_static.a``), so that it loads without ``libcudart.so`` on the library path and runs
on any driver recent enough for the toolkit it was built with. Without ``nvcc`` it is built for
the CPU only (the ``"cpp"`` backend); its CUDA launchers then raise an error that says so.

Environment:

* ``EFFATTN_CUDA_ARCHS``: compute capabilities to build, default ``"80;90"`` (sm_80 and sm_90
  cubins plus compute_90 PTX for newer GPUs). ``"90"`` alone halves the build.
* ``EFFATTN_NVCC``: the nvcc to use (default: ``nvcc`` on the PATH, else ``$CUDA_HOME/bin/nvcc``,
  else ``/usr/local/cuda/bin/nvcc``); ``EFFATTN_NO_CUDA=1`` builds the CPU-only module.
* ``CXX``: the host compiler (default ``c++``); ``MAX_JOBS``: ninja's parallelism.
"""

from __future__ import annotations

import glob
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
MODULE = "_C"
DEFAULT_ARCHS = "80;90"
CXX_SOURCES = ("bindings.cpp", "cpu/attn_cpu.cpp", "cpu/attn_tiled.cpp", "cpu/thread_pool.cpp",
               "cpu/relpos_tiled.cpp", "cpu/simd_portable.cpp", "cpu/simd_avx2.cpp", "cpu/simd_avx512.cpp")
# Flags of the CPU micro-kernels compiled once per instruction set (x86-64 only; the run-time choice is in
# csrc/cpu/simd_portable.cpp); -ffp-contract=fast lets a * b + c become one FMA in all of them.
X86_ISA_FLAGS = {
    "cpu/simd_avx2.cpp": ("-mavx2", "-mfma", "-mf16c"),
    "cpu/simd_avx512.cpp": ("-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx2", "-mfma", "-mf16c"),
}
SIMD_FLAGS = ("-ffp-contract=fast",)
CUDA_SOURCES = ("cuda/launch.cu", "cuda/flash_fwd_hdim64.cu", "cuda/flash_fwd_hdim128.cu",
                "cuda/flash_bwd_hdim64.cu", "cuda/flash_bwd_hdim128.cu")
HEADERS = ("common/params.h", "common/params_binding.h", "common/attn_rules.h", "common/check.h",
           "common/philox.h", "cpu/attn_cpu.h", "cpu/attn_tiled.h", "cpu/relpos_tiled.h", "cpu/host_types.h",
           "cpu/simd.h", "cpu/simd_kernels.inc", "cpu/thread_pool.h", "cpu/varlen.h", "cuda/launch.h",
           "cuda/flash_kernels.cuh", "cuda/mma.cuh", "cuda/cuda_check.cuh", "cuda/device.cuh")
WARNING_FLAGS = ("-Wall", "-Wextra")
# The emulator's module (backend "cuda-emu"): the CUDA sources compiled by the host compiler against the
# emulator of csrc/emu (its own headers stand in for CUDA's), with csrc/emu's sources; never built at
# install time, only when the backend is named.
EMU_MODULE = "_C_emu"
EMU_FLAGS = ("-x", "c++", "-DEFFATTN_CUDA_EMU", "-O2", "-Wno-unknown-pragmas")  # #pragma unroll is nvcc's


def emu_sources() -> tuple[str, ...]:
    """csrc/emu's C++ sources (relative to csrc), the emulator's own test module aside."""
    found = sorted(os.path.relpath(f, CSRC) for f in glob.glob(os.path.join(CSRC, "emu", "*.cpp")))
    return tuple(f for f in found if not f.endswith("test_module.cpp"))


def emu_headers() -> tuple[str, ...]:
    return tuple(sorted(os.path.relpath(f, CSRC) for pattern in ("*.h", "include/*.h")
                        for f in glob.glob(os.path.join(CSRC, "emu", pattern))))


class BuildError(RuntimeError):
    """The extension could not be built; the message holds the compiler output."""


def find_nvcc() -> str | None:
    if os.environ.get("EFFATTN_NO_CUDA", "0") == "1":
        return None
    explicit = os.environ.get("EFFATTN_NVCC")
    if explicit:
        return explicit if os.path.isfile(explicit) else None
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return None


def find_ninja() -> str | None:
    try:
        import ninja  # the PyPI package ships the binary
        path = os.path.join(ninja.BIN_DIR, "ninja")
        if os.path.isfile(path):
            return path
    except ImportError:
        pass
    return shutil.which("ninja")


def pybind11_include() -> str:
    try:
        import pybind11
    except ImportError as e:
        raise BuildError("pybind11 is needed to build the effattn extension: pip install pybind11") from e
    return pybind11.get_include()


def cuda_lib_dir(nvcc: str) -> str:
    """The directory of ``libcudart_static.a`` of the toolkit that ``nvcc`` belongs to (``nvcc`` may be a
    wrapper script: ``CUDA_HOME`` / ``CUDA_PATH``, the toolkit above the real binary, then ``/usr/local/cuda``)."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
             os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
    try:  # the toolkit nvcc reports (works through wrapper scripts)
        out = subprocess.run([nvcc, "--dryrun", "--version"], capture_output=True, text=True, timeout=60).stderr
        homes += [line.split("=", 1)[1].strip() for line in out.splitlines() if line.startswith("#$ TOP=")]
    except (OSError, subprocess.SubprocessError):
        pass
    homes.append("/usr/local/cuda")
    for home in filter(None, homes):
        for sub in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib")):
            if os.path.isfile(os.path.join(home, sub, "libcudart_static.a")):
                return os.path.join(home, sub)
    raise BuildError(f"libcudart_static.a not found (looked under {', '.join(filter(None, homes))}); set CUDA_HOME")


def _x86_64() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def module_filename(module: str = MODULE) -> str:
    return module + (sysconfig.get_config_var("EXT_SUFFIX") or ".so")


@dataclass
class Config:
    """What one build compiles, and with what."""

    nvcc: str | None = field(default_factory=find_nvcc)
    archs: tuple[str, ...] = field(
        default_factory=lambda: tuple(a for a in os.environ.get("EFFATTN_CUDA_ARCHS", DEFAULT_ARCHS).split(";") if a))
    cxx: str = field(default_factory=lambda: os.environ.get("CXX", "c++"))
    debug: bool = False
    emu: bool = False  # the emulator's module (EMU_MODULE) instead of the extension

    @property
    def module(self) -> str:
        return EMU_MODULE if self.emu else MODULE

    def sources(self) -> tuple[str, ...]:
        """Every file the build reads (relative to csrc)."""
        if self.emu:
            return emu_sources() + emu_headers() + HEADERS + CUDA_SOURCES
        return CXX_SOURCES + HEADERS + (CUDA_SOURCES if self.with_cuda else ())

    @property
    def with_cuda(self) -> bool:
        return self.nvcc is not None

    def gencode(self) -> list[str]:
        flags = []
        for a in self.archs:
            flags.append(f"-gencode=arch=compute_{a},code=sm_{a}")
        if self.archs:  # PTX of the newest arch: JIT-compiled by the driver on later GPUs
            flags.append(f"-gencode=arch=compute_{self.archs[-1]},code=compute_{self.archs[-1]}")
        return flags

    def key(self) -> str:
        """Hash of the sources, the flags and the tools: the JIT cache directory's name."""
        h = hashlib.sha256()
        for rel in self.sources():
            with open(os.path.join(CSRC, rel), "rb") as f:
                h.update(rel.encode() + b"\0" + f.read())
        with open(os.path.abspath(__file__), "rb") as f:
            h.update(f.read())
        h.update(repr((self.nvcc, self.archs, self.cxx, self.debug, self.emu, sys.version, sys.platform)).encode())
        if self.nvcc:
            h.update(_tool_version([self.nvcc, "--version"]).encode())
        h.update(_tool_version([self.cxx, "--version"]).encode())
        return h.hexdigest()[:16]


def key_line(cfg: Config) -> str:
    """The ``.key`` file beside a module built with ``cfg``: the hash of its sources, flags and tools, and
    the CUDA archs it was built for (``3fa2c0... 80;90``), so that a build for other archs is still found."""
    return f"{cfg.key()} {';'.join(cfg.archs)}"


def read_key_line(text: str) -> tuple[str, tuple[str, ...] | None]:
    """``(hash, archs)`` of a ``.key`` file (:func:`key_line`); archs None in an older one-field key."""
    fields = text.split()
    archs = tuple(a for a in fields[1].split(";") if a) if len(fields) > 1 else None
    return (fields[0] if fields else ""), archs


def _tool_version(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _q(s: str) -> str:
    """Escape a path for a ninja file (spaces, colons, dollars)."""
    return s.replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


def write_ninja(cfg: Config, build_dir: str, output: str) -> str:
    """Write ``build.ninja`` into ``build_dir`` for the module ``output``; returns its path."""
    opt = ["-O0", "-g"] if cfg.debug else ["-O3"]
    py_inc = sysconfig.get_paths()["include"]
    cxx_flags = ["-std=c++17", "-fPIC", "-fvisibility=hidden", *opt, *WARNING_FLAGS,
                 f"-I{CSRC}", f"-I{py_inc}", f"-I{pybind11_include()}"]
    ldflags = ["-shared", "-pthread"]
    lines = ["ninja_required_version = 1.3", f"cxx = {cfg.cxx}"]
    if cfg.emu:
        return _write_emu_ninja(lines, cxx_flags, ldflags, build_dir, output)
    if cfg.with_cuda:
        archs = ",".join(cfg.archs)
        cxx_flags += ["-DEFFATTN_WITH_CUDA", f'-DEFFATTN_CUDA_ARCHS=\\"{archs}\\"']
        nvcc_flags = ["-std=c++17", *opt, "-Xcompiler", ",".join(["-fPIC", "-fvisibility=hidden", *WARNING_FLAGS]),
                      f"-I{CSRC}", "--use_fast_math", "-Werror", "all-warnings", *cfg.gencode()]
        if cfg.debug:
            nvcc_flags += ["-lineinfo"]
        lines += [f"nvcc = {_q(cfg.nvcc)}", "nvcc_flags = " + " ".join(nvcc_flags)]
        ldflags += [f"-L{cuda_lib_dir(cfg.nvcc)}", "-lcudart_static", "-lpthread", "-ldl", "-lrt"]
    lines += ["cxx_flags = " + " ".join(cxx_flags), "ldflags = " + " ".join(ldflags), "",
              "rule cxx", "  command = $cxx -MMD -MF $out.d $cxx_flags $isa_flags -c $in -o $out", "  depfile = $out.d",
              "  deps = gcc", "  description = CXX $out", ""]
    if cfg.with_cuda:
        lines += ["rule nvcc", "  command = $nvcc -MD -MF $out.d $nvcc_flags -c $in -o $out", "  depfile = $out.d",
                  "  deps = gcc", "  description = NVCC $out", ""]
    lines += ["rule link", "  command = $cxx $in -o $out $ldflags", "  description = LINK $out", ""]
    objects = []
    sources = [("cxx", s) for s in CXX_SOURCES] + ([("nvcc", s) for s in CUDA_SOURCES] if cfg.with_cuda else [])
    for rule, src in sources:
        obj = os.path.join(build_dir, src.replace("/", "_") + ".o")
        objects.append(obj)
        lines.append(f"build {_q(obj)}: {rule} {_q(os.path.join(CSRC, src))}")
        if rule == "cxx" and src.startswith("cpu/simd_"):
            isa = X86_ISA_FLAGS.get(src, ()) if _x86_64() else ()
            lines.append("  isa_flags = " + " ".join((*SIMD_FLAGS, *isa)))
    return _link_and_write(lines, objects, build_dir, output)


def _link_and_write(lines: list[str], objects: list[str], build_dir: str, output: str) -> str:
    """End a ninja file with the link of ``objects`` into ``output``; write it into ``build_dir``."""
    lines += ["", f"build {_q(output)}: link " + " ".join(_q(o) for o in objects), "", f"default {_q(output)}", ""]
    os.makedirs(build_dir, exist_ok=True)
    path = os.path.join(build_dir, "build.ninja")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def _write_emu_ninja(lines: list[str], cxx_flags: list[str], ldflags: list[str], build_dir: str, output: str) -> str:
    """The emulator's module: csrc/emu's sources, then the CUDA sources as C++ against csrc/emu/include."""
    emu_flags = [*EMU_FLAGS, f"-I{os.path.join(CSRC, 'emu', 'include')}"]
    lines += ["cxx_flags = " + " ".join(cxx_flags), "emu_flags = " + " ".join(emu_flags),
              "ldflags = " + " ".join(ldflags), "",
              "rule emucxx", "  command = $cxx -MMD -MF $out.d $cxx_flags $emu_flags -c $in -o $out",
              "  depfile = $out.d", "  deps = gcc", "  description = CXX (emulator) $out", "",
              "rule link", "  command = $cxx $in -o $out $ldflags", "  description = LINK $out", ""]
    objects = []
    for src in emu_sources() + CUDA_SOURCES:
        obj = os.path.join(build_dir, src.replace("/", "_") + ".o")
        objects.append(obj)
        lines.append(f"build {_q(obj)}: emucxx {_q(os.path.join(CSRC, src))}")
    return _link_and_write(lines, objects, build_dir, output)


@dataclass
class BuildResult:
    path: str
    seconds: float
    log: str
    with_cuda: bool


def build(build_dir: str, output: str | None = None, cfg: Config | None = None, jobs: int | None = None,
          verbose: bool = False) -> BuildResult:
    """Build the module into ``output`` (default ``build_dir/_C<EXT_SUFFIX>``) with ninja."""
    cfg = cfg or Config()
    ninja = find_ninja()
    if ninja is None:
        raise BuildError("ninja is needed to build the effattn extension: pip install ninja")
    output = os.path.abspath(output or os.path.join(build_dir, module_filename(cfg.module)))
    write_ninja(cfg, build_dir, output)
    cmd = [ninja, "-C", build_dir]
    jobs = jobs or (int(os.environ["MAX_JOBS"]) if os.environ.get("MAX_JOBS") else None)
    if jobs:
        cmd += ["-j", str(jobs)]
    if verbose:
        cmd.append("-v")
    start = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    log = res.stdout + res.stderr
    if res.returncode != 0:
        raise BuildError(f"building the effattn extension failed ({' '.join(cmd)}):\n{log[-8000:]}")
    return BuildResult(output, seconds, log, cfg.with_cuda)


def main(argv: list[str] | None = None) -> None:
    """``python effattn/_build.py BUILD_DIR``: build there and print the time and the log."""
    argv = sys.argv[1:] if argv is None else argv
    build_dir = os.path.abspath(argv[0] if argv else os.path.join(ROOT, "build", "effattn_ext"))
    res = build(build_dir, verbose="-v" in argv)
    print(res.log)
    print(f"built {res.path} in {res.seconds:.1f} s (CUDA: {res.with_cuda})")


if __name__ == "__main__":
    main()
