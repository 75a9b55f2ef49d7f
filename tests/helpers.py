"""Shared test helpers: random inputs, the backends to test, and the comparison of a backend with the
float64 reference."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import pytest
import torch

import effattn
from effattn.testing import TOLERANCES, assert_close


@contextlib.contextmanager
def skip_if_unsupported():
    """Skip the test when the backend named in the call declines it: the skip message is the
    :class:`effattn.UnsupportedInputError`'s, which lists the backend's ``not_supported_reasons``."""
    try:
        yield
    except effattn.UnsupportedInputError as e:
        pytest.skip(str(e))


@dataclass(frozen=True)
class Target:
    """A backend of ``effattn.BACKENDS`` and the device of the inputs it is tested on."""

    name: str
    device: str

    def run(self, fn, *args, **kwargs):
        """``fn(*args, backend=name, **kwargs)``, skipped with the backend's reasons where it declines."""
        with skip_if_unsupported():
            return fn(*args, backend=self.name, **kwargs)


def backend_targets(test_device: str, include_reference: bool = False) -> list:
    """``pytest.param`` of a :class:`Target` per backend and device (the test device and the CPU).

    Nothing here says which backend runs where: a backend that cannot run a case on a device (the
    CUDA kernels on CPU tensors, Triton on CPU without the interpreter, the C++ CPU code on CUDA
    tensors, a dtype, a head dim, dropout, ...) declines the call and the case is skipped with its
    reasons. The reference is the oracle of the comparisons and is left out unless asked for. The CUDA
    emulator ("cuda-emu", CPU tensors) is left out where the test device is a GPU (the real kernels run
    there) unless ``EFFATTN_TEST_EMU=1``."""
    devices = sorted({test_device, "cpu"})
    skip = {"reference"} if not include_reference else set()
    if test_device == "cuda" and os.environ.get("EFFATTN_TEST_EMU", "") in ("", "0"):
        skip.add("cuda-emu")
    return [pytest.param(Target(name, device), id=name if len(devices) == 1 else f"{name}-{device}")
            for name in effattn.BACKENDS if name not in skip for device in devices]


def make_qkv(B=2, Hq=2, Hkv=None, Tq=33, Tk=None, D=64, Dv=None, dtype=torch.float16, device="cpu",
             layout="bhtd", requires_grad=True):
    """Random q ``(B, Hq, Tq, D)``, k ``(B, Hkv, Tk, D)``, v ``(B, Hkv, Tk, Dv)``.

    ``layout="bthd"`` makes them non-contiguous views of ``(B, T, H, D)`` storage, as a model that
    splits heads after a projection produces.
    """
    Hkv = Hq if Hkv is None else Hkv
    Tk = Tq if Tk is None else Tk
    Dv = D if Dv is None else Dv

    def rand(b, h, t, d):
        if layout == "bthd":
            x = torch.randn(b, t, h, d, dtype=dtype, device=device).transpose(1, 2)
        else:
            x = torch.randn(b, h, t, d, dtype=dtype, device=device)
        return x.requires_grad_(requires_grad)

    return rand(B, Hq, Tq, D), rand(B, Hkv, Tk, D), rand(B, Hkv, Tk, Dv)


def _as_ref(x):
    return None if x is None else x.detach().to("cpu", torch.float64 if x.is_floating_point() else x.dtype)


def compare_with_reference(q, k, v, *, backend="triton", grad=True, lse_grad=False, op=None, lse_kind="lse",
                           **kwargs):
    """Run ``op`` (default ``effattn.flash_attention``) on ``backend`` (a name or a :class:`Target`) and
    on the float64 reference; compare out, lse, grads (``lse_kind``: the tolerance row for lse). Returns
    the backend's ``(out, lse)``; skips the test with the backend's reasons where it declines the input."""
    op = op or effattn.flash_attention
    dtype = q.dtype
    with skip_if_unsupported():
        out, lse = op(q, k, v, return_lse=True, backend=getattr(backend, "name", backend), **kwargs)
    assert out.dtype == dtype and out.shape[-1] == v.shape[-1]
    if op is effattn.flash_attention:
        assert out.shape == (*q.shape[:3], v.shape[-1])
    ref_kwargs = {n: (_as_ref(a) if isinstance(a, torch.Tensor) else a) for n, a in kwargs.items()}
    qr, kr, vr = (_as_ref(x).requires_grad_(grad) for x in (q, k, v))
    ref_out, ref_lse = op(qr, kr, vr, return_lse=True, backend="reference", **ref_kwargs)
    assert_close(out.cpu(), ref_out, dtype, "fwd", "out")
    assert torch.equal(torch.isneginf(lse.cpu()), torch.isneginf(ref_lse)), "lse: rows with no visible key differ"
    finite = torch.isfinite(ref_lse)
    assert_close(lse.cpu()[finite], ref_lse[finite], dtype, lse_kind, "lse")
    if not grad:
        return out, lse
    dout = torch.randn_like(out)
    loss = (out * dout).float().sum()
    ref_loss = (ref_out * _as_ref(dout)).sum()
    if lse_grad:
        dlse = torch.randn_like(lse)
        loss = loss + (lse.masked_fill(torch.isinf(lse), 0) * dlse).sum()
        ref_loss = ref_loss + (ref_lse.masked_fill(torch.isinf(ref_lse), 0) * _as_ref(dlse)).sum()
    grads = torch.autograd.grad(loss, (q, k, v))
    ref_grads = torch.autograd.grad(ref_loss, (qr, kr, vr))
    for name, g, rg in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert g.dtype == dtype and g.shape == rg.shape
        assert_close(g.cpu(), rg, dtype, "grad", name)
    return out, lse


__all__ = ["TOLERANCES", "Target", "backend_targets", "compare_with_reference", "make_qkv", "skip_if_unsupported"]


def pool_token_pairs(pairs: torch.Tensor, block_q: int, block_kv: int, how: str = "any") -> torch.Tensor:
    """A token-pair tensor ``(B, H, Tq, Tk)`` (small sizes) pooled to the block grid ``(B, H, nQb, nKb)``
    by a plain loop over blocks: ``any`` of a bool graph, or ``sum`` of counts (ragged edge blocks
    pooled over their existing tokens)."""
    B, H, Tq, Tk = pairs.shape
    nq, nk = -(-Tq // block_q), -(-Tk // block_kv)
    out = torch.zeros(B, H, nq, nk, dtype=torch.bool if how == "any" else pairs.dtype)
    for m in range(nq):
        for n in range(nk):
            tile = pairs[:, :, m * block_q:(m + 1) * block_q, n * block_kv:(n + 1) * block_kv].flatten(2)
            out[:, :, m, n] = tile.any(-1) if how == "any" else tile.sum(-1)
    return out
