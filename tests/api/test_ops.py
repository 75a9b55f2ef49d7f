"""The torch ops: custom-op registration (opcheck), fake tensors, torch.compile, dispatch, info."""

import subprocess
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import effattn
from effattn import BlockMask, backends
from effattn.backends import AttentionCall
from tests.helpers import make_qkv


def _op_args(q, k, v, mask=None, backend="reference", softcap=0.0, alibi=None):
    return (q, k, v, mask, 0.25, 3, 0, k.shape[2] - q.shape[2], 0.0, 0, softcap, alibi, backend)


@pytest.mark.parametrize("score_mods", [False, True], ids=["plain", "softcap-alibi"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_opcheck_forward(device, backend, score_mods):
    if backend == "reference" and device != "cpu":
        device = "cpu"
    q, k, v = make_qkv(Hq=4, Hkv=2, Tq=9, Tk=13, D=16, dtype=torch.float32, device=device)
    mask = torch.rand(2, 1, 1, 13, device=device) > 0.2
    mods = dict(softcap=3.0, alibi=torch.rand(2, 4, device=device)) if score_mods else {}
    torch.library.opcheck(torch.ops.effattn.attention_fwd.default, _op_args(q, k, v, mask, backend, **mods))


def test_fake_tensors_propagate_shapes():
    with FakeTensorMode():
        q = torch.empty(2, 8, 100, 64, dtype=torch.float16)
        k = torch.empty(2, 2, 120, 64, dtype=torch.float16)
        v = torch.empty(2, 2, 120, 48, dtype=torch.float16)
        out, lse = effattn.flash_attention(q, k, v, causal=True, return_lse=True, backend="reference")
        assert out.shape == (2, 8, 100, 48) and out.dtype == torch.float16
        assert lse.shape == (2, 8, 100) and lse.dtype == torch.float32


def test_torch_compile_fwd_bwd():
    q, k, v = make_qkv(Hq=4, Hkv=2, Tq=24, D=16, dtype=torch.float32)
    kpm = torch.rand(2, 24) > 0.2

    def f(q, k, v):
        return effattn.flash_attention(q, k, v, causal=True, key_padding_mask=kpm, backend="reference")

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out = compiled(q, k, v)
    g = torch.autograd.grad(out.sum(), (q, k, v))
    ref = f(q, k, v)
    g_ref = torch.autograd.grad(ref.sum(), (q, k, v))
    torch.testing.assert_close(out, ref)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("rule", ["causal", "segments", "none"])
def test_opcheck_sparse(rule):
    q, k, v = make_qkv(B=2, Hq=2, Tq=20, Tk=36, D=8, dtype=torch.float32)
    if rule == "causal":
        bm = BlockMask.causal(20, 36, block_size=(16, 16))
    elif rule == "segments":
        bm = BlockMask.from_segments(torch.tensor([[0] * 12 + [1] * 8, [2] * 20]),
                                     torch.tensor([[0] * 10 + [1] * 26, [2] * 30 + [3] * 6]), block_size=16)
    else:
        bm = BlockMask.random(20, 36, 0.6, (16, 16), heads=2, keep_diagonal=True)
    kpm = torch.rand(2, 36) > 0.2
    torch.library.opcheck(torch.ops.effattn.sparse_attention_fwd.default,
                          (q, k, v, kpm, *bm.as_tuple(), 0.3, "reference"))


def test_torch_compile_sparse_fwd_bwd():
    q, k, v = make_qkv(Hq=2, Tq=40, D=16, dtype=torch.float32)
    bm = BlockMask.sliding_window(40, 40, 9, 0, block_size=16)

    def f(q, k, v):
        return effattn.sparse_attention(q, k, v, bm, backend="reference")

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out = compiled(q, k, v)
    g = torch.autograd.grad(out.sum(), (q, k, v))
    ref = f(q, k, v)
    g_ref = torch.autograd.grad(ref.sum(), (q, k, v))
    torch.testing.assert_close(out, ref)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)


def test_auto_dispatch_cpu(monkeypatch):
    call = AttentionCall(torch.device("cpu"), torch.float32, 64, 64, 10, 10, False)
    expected = "cpp" if not backends.BACKENDS["cpp"].not_supported_reasons(call) else "reference"
    assert backends.select_backend(call).name == expected  # the C++ kernels when the extension is built
    assert backends.select_backend(call, "reference").name == "reference"
    monkeypatch.setenv("EFFATTN_BACKEND", "reference")
    assert backends.select_backend(call).name == "reference"


def test_auto_dispatch_cuda_is_triton():
    call = AttentionCall(torch.device("cuda"), torch.float16, 128, 128, 10, 10, False)
    reasons = backends.BACKENDS["triton"].not_supported_reasons(call)
    if torch.cuda.is_available():
        assert reasons == [] and backends.select_backend(call).name == "triton"
    else:
        assert any("CUDA" in r for r in reasons) or backends.BACKENDS["triton"].interpret


def test_auto_dispatch_falls_back_for_float64(device):
    call = AttentionCall(torch.device(device), torch.float64, 64, 64, 10, 10, False)
    assert backends.select_backend(call).name == "reference"


def test_info_runs():
    res = subprocess.run([sys.executable, "-m", "effattn.info"], capture_output=True, text=True, check=True)
    assert "triton" in res.stdout and "reference" in res.stdout and "torch" in res.stdout
