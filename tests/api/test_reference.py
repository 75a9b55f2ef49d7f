"""The chunked reference (the CPU backend and the tests' oracle) against independent computations.

* forward and hand-written backward vs autograd through the materialised naive attention, float64;
* the torch Philox against Triton's ``tl.philox`` bit for bit (the dropout masks of the kernels and
  the reference are the same stream).
"""

import pytest
import torch
import triton
import triton.language as tl

from effattn import reference


def _naive_grads(q, k, v, mask, dout, **kw):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = reference.naive_attention(*leaves, mask, **kw)
    return (out, *torch.autograd.grad(out, leaves, dout))


CASES = {
    "plain": dict(),
    "causal-br": dict(window_right=0, diag_offset=13),
    "window": dict(window_left=5, window_right=3, diag_offset=13),
    "left-only": dict(window_left=2, diag_offset=-4),
    "dropout": dict(dropout_p=0.25, seed=99),
    "causal-dropout": dict(window_right=0, dropout_p=0.4, seed=2**50 + 3),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_chunked_matches_naive(monkeypatch, case, mask_kind):
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 3 * 4 * 40)  # force several chunks of a few rows
    kw = CASES[case]
    B, Hq, Hkv, Tq, Tk, D, Dv = 2, 4, 2, 27, 40, 16, 12
    q = torch.randn(B, Hq, Tq, D, dtype=torch.float64)
    k = torch.randn(B, Hkv, Tk, D, dtype=torch.float64)
    v = torch.randn(B, Hkv, Tk, Dv, dtype=torch.float64)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(B, 1, Tq, Tk) > 0.3
        mask[0, 0, 4] = False  # an empty row
    elif mask_kind == "float":
        mask = torch.randn(1, Hq, Tq, Tk, dtype=torch.float64)
    scale = 0.3
    out, lse = reference.attention_forward(q, k, v, mask, scale=scale, **kw)
    dout = torch.randn_like(out)
    n_out, n_dq, n_dk, n_dv = _naive_grads(q, k, v, mask, dout, scale=scale, **kw)
    # float64 chunked against float64 naive: tighter than the table's float64 rows, which bound kernels
    torch.testing.assert_close(out, n_out, atol=1e-12, rtol=1e-12)
    dq, dk, dv = reference.attention_backward(dout, q, k, v, out, lse, mask, scale=scale, **kw)
    for g, ng in ((dq, n_dq), (dk, n_dk), (dv, n_dv)):
        torch.testing.assert_close(g, ng, atol=1e-11, rtol=1e-11)


def test_lse_and_its_gradient():
    q, k, v = (torch.randn(1, 2, 9, 8, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(1, 1, 9, 9) > 0.3
    mask[..., 2, :] = False
    out, lse = reference.attention_forward(q, k, v, mask, scale=0.5)
    s = (q @ k.transpose(-1, -2) * 0.5).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(s, -1))
    assert torch.isneginf(lse[..., 2]).all() and (out[..., 2, :] == 0).all()
    # d(sum lse * w)/dq through the backward's dlse path vs autograd through logsumexp
    w = torch.randn_like(lse).masked_fill(torch.isinf(lse), 0)
    qq = q.clone().requires_grad_()
    ss = (qq @ k.transpose(-1, -2) * 0.5).masked_fill(~mask, float("-inf"))
    lse_ag = torch.logsumexp(ss, -1)
    (g_ref,) = torch.autograd.grad(lse_ag.masked_fill(torch.isinf(lse_ag), 0).mul(w).sum(), qq)
    dq, _, _ = reference.attention_backward(torch.zeros_like(out), q, k, v, out, lse, mask, w, scale=0.5)
    torch.testing.assert_close(dq, g_ref)


@triton.jit
def _philox_kernel(out, seed, bh, R: tl.constexpr, C: tl.constexpr):
    rows = tl.arange(0, R)[:, None]
    cols = tl.arange(0, C)[None, :]
    zero = (rows + cols) * 0
    r, _, _, _ = tl.philox(seed, (cols + zero).to(tl.uint32), (rows + zero).to(tl.uint32),
                           (zero + bh).to(tl.uint32), zero.to(tl.uint32))
    tl.store(out + rows * C + cols, (r >> 8).to(tl.int32))


@pytest.mark.parametrize("seed", [0, 12345, 2**33 + 7, 2**62 - 1])
def test_philox_matches_triton(device, seed):
    out = torch.empty(16, 32, dtype=torch.int32, device=device)
    _philox_kernel[(1,)](out, seed, 5, 16, 32)
    expect = reference.philox_randint(seed, torch.arange(32)[None, :], torch.arange(16)[:, None], torch.tensor(5),
                                      torch.tensor(0)) >> 8
    assert torch.equal(out.cpu().long(), expect)


def test_philox_known_answer():
    """Philox-4x32-10 known-answer vector (Random123): counter 0, key 0 -> 0x6627e8d5."""
    z = torch.zeros(1, dtype=torch.int64)
    assert int(reference.philox_randint(0, z, z, z, z)) == 0x6627E8D5


def test_dropout_keep_rate():
    keep = reference.dropout_keep(7, 0.3, torch.arange(4).view(4, 1, 1), torch.arange(64).view(1, 64, 1),
                                  torch.arange(64).view(1, 1, 64))
    assert abs(keep.double().mean().item() - 0.7) < 0.02
    assert reference.dropout_scale(0.3) == pytest.approx(1 / 0.7, rel=1e-6)
