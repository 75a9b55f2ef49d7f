"""The compiled extension ``effattn._C``: it compiles, links and imports here (with nvcc: its CUDA
kernels too, built for sm_80 and sm_90 + PTX); its launchers check their arguments; without a GPU a
CUDA launcher raises the CUDA runtime's error, and the "cuda" backend says why it cannot run."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch

import effattn
from effattn import _build, _ext, cuda_ops
from tests.helpers import make_qkv

HAS_NVCC = _build.find_nvcc() is not None
requires_nvcc = pytest.mark.skipif(not HAS_NVCC, reason="nvcc not found: the extension is built for the CPU only")
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour on a machine without a GPU")


def test_extension_loads():
    ext = _ext.load()
    assert _ext.unavailable_reason() is None and _ext.is_ready()
    assert ext.WITH_CUDA == HAS_NVCC
    p = ext.AttnParams()
    p.sq = ext.Strides4(1, 2, 3, 4)
    assert (p.sq.b, p.sq.h, p.sq.t, p.sq.d) == (1, 2, 3, 4) and p.pool_stride == 1 and p.mask_kind == 0


@requires_nvcc
def test_cuda_build_targets():
    ext = _ext.load()
    key = ext.__file__ + ".key"
    archs = _build.read_key_line(open(key).read())[1] if os.path.isfile(key) else None
    assert ext.CUDA_ARCHS.split(",") == list(archs or _build.Config().archs)  # the archs it was built for
    assert ext.CUDA_RUNTIME_VERSION >= 12000


def _dummy_params(ext, **fields):
    p = ext.AttnParams()
    p.q = p.k = p.v = p.o = p.lse = 1 << 20  # never dereferenced: every check runs first
    p.B, p.Hq, p.Hkv, p.Tq, p.Tk, p.T_in, p.T_src, p.Dqk, p.Dv, p.dtype = 1, 2, 1, 4, 4, 4, 4, 64, 64, 1
    for name, value in fields.items():
        setattr(p, name, value)
    return p


@requires_nvcc
@no_gpu
def test_cuda_launcher_without_gpu_raises_cuda_error():
    ext = _ext.load()
    with pytest.raises(ext.CudaError, match=r"cudaError\w+: .+ \(in cuda\w+\(") as info:
        ext.cuda_forward(_dummy_params(ext))
    assert isinstance(info.value, RuntimeError)
    with pytest.raises(ext.CudaError, match="cudaGetDeviceCount"):
        ext.cuda_device_count()


@no_gpu
def test_cuda_backend_without_gpu_gives_reasons():
    q, k, v = make_qkv(B=1, Hq=2, Tq=8, D=64, dtype=torch.float16)
    with pytest.raises(effattn.UnsupportedInputError, match=r"backend='cuda' cannot run this input: .*"
                                                           r"tensors must be on cuda, got cpu"):
        effattn.flash_attention(q, k, v, backend="cuda")
    reasons = effattn.BACKENDS["cuda"].unavailable_reasons()
    assert any("no CUDA device" in r or "without CUDA" in r for r in reasons), reasons


@pytest.mark.parametrize("fields,msg", [
    (dict(Hq=3, Hkv=2), "Hq must be a multiple of Hkv"),
    (dict(q=0), "q, k, v addresses must be set"),
    (dict(Dqk=0), "head dims must be >= 1"),
    (dict(pool_stride=0), "pool_stride must be >= 1"),
    (dict(mask_kind=1), "mask address must be set"),
    (dict(dtype=9), "unknown dtype code 9"),
])
def test_launchers_check_params(fields, msg):
    ext = _ext.load()
    with pytest.raises(ValueError, match=msg):
        ext.cpu_forward(_dummy_params(ext, **fields))
    if ext.WITH_CUDA:
        with pytest.raises(ValueError, match=msg):
            ext.cuda_forward(_dummy_params(ext, **fields))


@requires_nvcc
def test_cuda_launcher_checks_before_cuda_calls():
    ext = _ext.load()
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        ext.cuda_forward(_dummy_params(ext, dtype=0))
    with pytest.raises(ValueError, match="head dims up to 128"):
        ext.cuda_forward(_dummy_params(ext, Dqk=160, Dv=160))
    lists = ext.BlockList()
    lists.num = lists.idx = 1 << 20
    with pytest.raises(ValueError, match="powers of two >= 64"):
        ext.cuda_forward(_dummy_params(ext, sparse=1, block_q=16, block_kv=64, kv_partial=lists, kv_full=lists))


def test_python_launcher_validates_tensors():
    q, k, v = make_qkv(B=1, Hq=2, Tq=8, D=16, dtype=torch.float32, requires_grad=False)
    with pytest.raises(ValueError, match="inconsistent shapes"):
        cuda_ops.attn_forward(q, k[:, :, :, :8], v, None, scale=1.0)
    with pytest.raises(ValueError, match="dtype torch.float16"):
        cuda_ops.attn_forward(q, k.half(), v, None, scale=1.0)
    with pytest.raises(ValueError, match="does not broadcast"):
        cuda_ops.attn_forward(q, k, v, torch.ones(3, 1, 1, 8, dtype=torch.bool), scale=1.0)
    with pytest.raises(ValueError, match="dropout_p must be in"):
        cuda_ops.attn_forward(q, k, v, None, scale=1.0, dropout_p=1.5)
    with pytest.raises(ValueError, match="seed must be"):
        cuda_ops.attn_forward(q, k, v, None, scale=1.0, dropout_p=0.1, seed=-1)
    out, lse = cuda_ops.attn_forward(q, k, v, None, scale=1.0)
    with pytest.raises(ValueError, match="dout has shape"):
        cuda_ops.attn_backward(out[:, :, :4], q, k, v, out, lse, None, scale=1.0)
    bm = effattn.BlockMask.causal(8, 8, block_size=16)
    bad = effattn.BlockMask.from_lists(bm.kv_num_blocks, bm.kv_indices + 5, bm.full_kv_num_blocks,
                                       bm.full_kv_indices, bm.q_num_blocks, bm.q_indices, bm.full_q_num_blocks,
                                       bm.full_q_indices, q_len=8, kv_len=8, block_size=16, rule=bm.rule)
    with pytest.raises(ValueError, match="block indices out of range"):
        cuda_ops.sparse_forward(q, k, v, bad, scale=1.0)


@requires_nvcc
def test_sources_compile_without_warnings(tmp_path):
    """The C++ CPU kernels and the CUDA host code with warnings as errors (the build, at install or on first
    use, compiles every file with the same warning flags, its nvcc rule with -Werror all-warnings: a warning
    in a kernel file fails that build, and with it every test of the extension)."""
    cfg = _build.Config(archs=("90",))
    nvcc = [cfg.nvcc, "-std=c++17", "-O1", "-Xcompiler", "-fPIC,-Wall,-Wextra,-Werror", f"-I{_build.CSRC}",
            "-Werror", "all-warnings", *cfg.gencode(), "-c"]
    cxx = [cfg.cxx, "-std=c++17", "-O1", "-fPIC", "-Wall", "-Wextra", "-Werror", f"-I{_build.CSRC}", "-c"]
    for cmd, src in ((cxx, "cpu/attn_cpu.cpp"), (nvcc, "cuda/launch.cu")):
        res = subprocess.run([*cmd, os.path.join(_build.CSRC, src), "-o", str(tmp_path / "x.o")],
                             capture_output=True, text=True)
        assert res.returncode == 0 and "warning" not in (res.stdout + res.stderr).lower(), res.stdout + res.stderr


@pytest.mark.skipif(shutil.which("c++") is None, reason="no host compiler")
def test_jit_build_cpu_only(tmp_path, monkeypatch):
    """The JIT path: a CPU-only build into a fresh cache directory, under the lock, then found in the cache.
    A debug build (-O0): the path is under test, not the optimiser (the suite's own first use builds -O3)."""
    monkeypatch.setenv(_ext.ENV_CACHE, str(tmp_path))
    cfg = _build.Config(nvcc=None, debug=True)
    res = _ext.jit_build(cfg)
    assert not isinstance(res, str) and os.path.isfile(res.path) and not res.with_cuda
    assert "warning" not in res.log.lower(), res.log
    assert _ext.jit_build(cfg) == res.path  # cached: no second build


def test_installed_module_key_names_its_archs(tmp_path):
    """An installed module is used while its ``.key`` matches this checkout's sources for the archs it names
    (setup.sh builds one arch on a machine without a GPU); a stale hash, or a key of other archs, is not."""
    path = tmp_path / _build.module_filename()
    path.write_bytes(b"")
    key = tmp_path / (path.name + ".key")
    one_arch = _build.Config(archs=("90",))
    key.write_text(_build.key_line(one_arch))
    assert _ext._installed(str(path)) == str(path)
    key.write_text(f"{one_arch.key()} 80;90")  # the hash of one arch's build, claimed for two
    assert _ext._installed(str(path)) is None
    key.write_text("0123456789abcdef 90")  # sources changed since
    assert _ext._installed(str(path)) is None
    key.write_text(_build.Config().key())  # the older one-field key: the default archs
    assert _ext._installed(str(path)) == str(path)
