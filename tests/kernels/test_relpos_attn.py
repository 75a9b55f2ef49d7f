"""The Triton relative-position ("band") attention kernels against the float64 reference (the contract).

``relpos_attn_forward`` / ``relpos_attn_backward`` are called directly (no custom op): outputs, lse and
every gradient (dq, dk, dv, dqr, dR, dtt, with a dlse) against ``effattn.reference.relpos_attention``
differentiated by autograd in float64, and, once, against a dense float64 formula of the contract
written out here. Under the interpreter the kernels run with 16 x 16 tiles (``INTERPRET_CONFIGS``), so
the sizes below (T = 1, 9, 17, 25, 33, 50) cover several tiles, ragged edges and, with ``rel_stride`` 2, bands
wider than a tile. Outputs are NaN-poisoned (tests/conftest.py): every element must be written.
"""

from __future__ import annotations

import pytest
import torch

import effattn.reference as reference
from effattn.kernels import relpos_attn as ra
from effattn.testing import assert_close, poisoned_empty

CLS = 2


def _make(B, H, Hkv, Tq, Tk, D, Dv, rs, dtype, device, tt=True, kpm=True, empty_batch=None):
    """Inputs in ``dtype`` (and their float64 copies for the reference)."""
    NR = rs * (Tq - 1) + Tk
    x = dict(q=torch.randn(B, H, Tq, D), k=torch.randn(B, Hkv, Tk, D), v=torch.randn(B, Hkv, Tk, Dv),
             qr=torch.randn(B, H, Tq, D), R=torch.randn(H, NR, D))
    x["tt"] = torch.randn(B, H, Tq, 2) if tt else None
    x = {n: (t.to(dtype).to(device) if t is not None else None) for n, t in x.items()}
    q_types = torch.randint(0, 3, (B, Tq), dtype=torch.int32, device=device)
    k_types = torch.randint(0, 3, (B, Tk), dtype=torch.int32, device=device)
    mask = None
    if kpm:
        mask = torch.rand(B, Tk, device=device) > 0.25
        mask[:, 0] = True
        if empty_batch is not None:
            mask[empty_batch] = False  # every row of that batch sees no key
    return x, q_types, k_types, mask


def _kernel(x, q_types, k_types, mask, dout, dlse, **kw):
    out, lse = ra.relpos_attn_forward(x["q"], x["k"], x["v"], x["qr"], x["R"], x["tt"], q_types, k_types, mask, **kw)
    grads = ra.relpos_attn_backward(dout, x["q"], x["k"], x["v"], x["qr"], x["R"], x["tt"], q_types, k_types, mask,
                                    out, lse, dlse, **kw)
    return out, lse, grads


def _reference(x, q_types, k_types, mask, dout, dlse, *, rel_stride, separate_cls, cls_type, scale, dropout_p, seed):
    """Reference out, lse and the gradients of ``sum(out * dout) + sum(lse * dlse)`` (finite lse only)."""
    x64 = {n: (t.detach().double().requires_grad_() if t is not None else None) for n, t in x.items()}
    out, lse = reference.relpos_attention(
        x64["q"], x64["k"], x64["v"], x64["qr"], x64["R"], scale=scale, rel_stride=rel_stride,
        separate_cls=separate_cls, tt=x64["tt"], q_types=q_types, k_types=k_types, cls_type=cls_type,
        key_padding_mask=mask, dropout_p=dropout_p, seed=seed)
    loss = (out * dout.double()).sum()
    if dlse is not None:
        loss = loss + torch.where(torch.isinf(lse), 0.0, lse * dlse.double()).sum()
    loss.backward()
    names = ("q", "k", "v", "qr", "R", "tt")
    return out, lse, tuple(x64[n].grad if x64[n] is not None else None for n in names)


def _check(x, q_types, k_types, mask, *, dlse=True, **kw):
    B, H, Tq, _ = x["q"].shape
    dtype = x["q"].dtype
    dout = torch.randn(B, H, Tq, x["v"].shape[-1], device=x["q"].device).to(dtype)
    dl = torch.randn(B, H, Tq, device=x["q"].device) if dlse else None
    out, lse, grads = _kernel(x, q_types, k_types, mask, dout, dl, **kw)
    ref_out, ref_lse, ref_grads = _reference(x, q_types, k_types, mask, dout, dl, **kw)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_close(out, ref_out, dtype, "fwd", "out")
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), "lse: -inf rows differ"
    assert_close(torch.nan_to_num(lse, neginf=0.0), torch.nan_to_num(ref_lse, neginf=0.0), dtype, "lse", "lse")
    for name, g, ref, inp in zip(("dq", "dk", "dv", "dqr", "dR", "dtt"), grads, ref_grads,
                                 (x["q"], x["k"], x["v"], x["qr"], x["R"], x["tt"])):
        if inp is None:
            assert g is None, name
            continue
        assert g.shape == inp.shape and g.dtype == inp.dtype, name
        assert_close(g, ref, dtype, "grad", name)
    return out, lse, grads


# (B, H, Hkv, Tq, Tk, D, Dv, rel_stride, separate_cls, tt, kpm, dtype)
CASES = {
    # Funnel's pooled block: Tq = Tk / 2, rel_stride 2, [cls] separate, token types, padding, GQA
    "pooled-fp32": (1, 2, 1, 25, 50, 16, 32, 2, True, True, True, torch.float32),
    "pooled-fp16-b2": (2, 2, 2, 9, 17, 32, 16, 2, True, True, True, torch.float16),
    "pooled-bf16": (1, 2, 1, 9, 17, 16, 16, 2, False, True, True, torch.bfloat16),
    # unpooled: rel_stride 1, Tq = Tk
    "self-fp16": (1, 2, 1, 33, 33, 16, 16, 1, True, True, False, torch.float16),
    "self-bf16-no-tt": (1, 2, 2, 17, 17, 24, 8, 1, False, False, True, torch.bfloat16),
    "self-fp32-D128": (1, 1, 1, 17, 17, 128, 64, 1, True, True, True, torch.float32),
    # Tq != Tk other ways; a single query ([cls] pooled to one row); a single key
    "rs1-Tq<Tk-fp32": (1, 2, 1, 17, 33, 16, 16, 1, False, True, True, torch.float32),
    "rs2-Tq1-fp32": (1, 2, 1, 1, 17, 16, 16, 2, True, True, True, torch.float32),
    "T1-fp16": (1, 2, 1, 1, 1, 16, 16, 1, False, True, False, torch.float16),
}


@pytest.mark.parametrize("case", CASES)
def test_matches_reference(case, device):
    B, H, Hkv, Tq, Tk, D, Dv, rs, sep, tt, kpm, dtype = CASES[case]
    x, qt, kt, mask = _make(B, H, Hkv, Tq, Tk, D, Dv, rs, dtype, device, tt=tt, kpm=kpm)
    _check(x, qt, kt, mask, rel_stride=rs, separate_cls=sep, cls_type=CLS, scale=D ** -0.5, dropout_p=0.0, seed=0)


def test_fully_masked_rows_and_no_dlse(device):
    """A batch whose keys are all padded: out 0, lse -inf, zero gradients (and dR from the other batch)."""
    x, qt, kt, mask = _make(2, 2, 1, 9, 17, 16, 16, 2, torch.float32, device, empty_batch=1)
    out, lse, grads = _check(x, qt, kt, mask, dlse=False, rel_stride=2, separate_cls=True, cls_type=CLS,
                             scale=0.25, dropout_p=0.0, seed=0)
    assert torch.isneginf(lse[1]).all() and (out[1] == 0).all()
    dq, dk, dv, dqr, _, dtt = grads
    assert all((g[1] == 0).all() for g in (dq, dk, dv, dqr, dtt))


def test_dropout_matches_reference(device):
    """Dropout draws flash's Philox bits: the reference drops the same probabilities."""
    x, qt, kt, mask = _make(1, 2, 1, 9, 17, 16, 16, 2, torch.float32, device)
    _check(x, qt, kt, mask, rel_stride=2, separate_cls=True, cls_type=CLS, scale=0.25, dropout_p=0.3, seed=1234)


def test_matches_dense_contract(device):
    """Independent of effattn.reference: the contract's formula, dense, in float64."""
    B, H, Hkv, Tq, Tk, D, rs = 1, 2, 1, 9, 17, 16, 2
    x, qt, kt, mask = _make(B, H, Hkv, Tq, Tk, D, D, rs, torch.float32, device)
    scale = 0.3
    out, lse = ra.relpos_attn_forward(x["q"], x["k"], x["v"], x["qr"], x["R"], x["tt"], qt, kt, mask,
                                      rel_stride=rs, separate_cls=True, cls_type=CLS, scale=scale)
    d = {n: t.double() for n, t in x.items()}
    i = torch.arange(Tq, device=device)[:, None]
    j = torch.arange(Tk, device=device)[None, :]
    t = rs * i - j + Tk - 1
    extra = (i != 0) & (j != 0)
    k = d["k"].repeat_interleave(H // Hkv, 1)
    v = d["v"].repeat_interleave(H // Hkv, 1)
    pos = torch.einsum("bhid,bhijd->bhij", d["qr"], d["R"][None][:, :, t])  # (B, H, Tq, Tk)
    same = (qt[:, :, None] == kt[:, None, :]) | (qt == CLS)[:, :, None] | (kt == CLS)[:, None, :]
    typ = torch.where(same[:, None], d["tt"][..., 1:2], d["tt"][..., 0:1])
    s = scale * (d["q"] @ k.transpose(-1, -2) + extra * (pos + typ))
    s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    assert_close(out, torch.softmax(s, -1) @ v, torch.float32, "fwd", "out")
    assert_close(lse, torch.logsumexp(s, -1), torch.float32, "lse", "lse")


def test_backward_is_deterministic(device):
    """Two runs of the backward are bit-identical (no float atomics; dR reduced in batch order)."""
    x, qt, kt, mask = _make(2, 1, 1, 9, 17, 16, 16, 2, torch.float16, device)
    kw = dict(rel_stride=2, separate_cls=True, cls_type=CLS, scale=0.25, dropout_p=0.0, seed=0)
    dout = torch.randn(2, 1, 9, 16, device=device).to(torch.float16)
    dlse = torch.randn(2, 1, 9, device=device)
    first = _kernel(x, qt, kt, mask, dout, dlse, **kw)
    second = _kernel(x, qt, kt, mask, dout, dlse, **kw)
    for a, b in zip((first[0], first[1], *first[2]), (second[0], second[1], *second[2])):
        assert torch.equal(a, b)


def test_no_pairwise_buffer(device, monkeypatch):
    """Every buffer the launchers allocate, forward and backward, is O(T): none has a Tq and a Tk axis."""
    shapes = []

    def recording(*size, **kw):
        shape = tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else size
        shapes.append(shape)
        return poisoned_empty(*size, **kw)

    monkeypatch.setattr(ra, "_alloc", recording)
    Tq, Tk = 9, 17
    x, qt, kt, mask = _make(2, 2, 1, Tq, Tk, 16, 16, 2, torch.float32, device)
    kw = dict(rel_stride=2, separate_cls=True, cls_type=CLS, scale=0.25, dropout_p=0.0, seed=0)
    _kernel(x, qt, kt, mask, torch.randn(2, 2, Tq, 16, device=device), None, **kw)
    assert len(shapes) >= 9  # out, lse; dq, dk, dv, dqr, dR, dtt, delta (+ the batch partials of dR)
    assert not [s for s in shapes if Tq in s and Tk in s], shapes


def test_outputs_are_poisoned():
    """tests/conftest.py swaps this module's allocator for the NaN-filling one (so unwritten elements fail)."""
    assert ra._alloc is poisoned_empty


def test_band_tiles():
    """The launchers' tiles keep the band within twice the key tile where the stride allows it."""
    for rs in (1, 2, 4):
        for bm, bn in ((64, 64), (32, 32), (16, 32)):
            m = ra._row_block(bm, bn, rs)
            assert m >= 16 and m & (m - 1) == 0
            if rs * 16 <= bn:
                assert rs * m <= bn and ra.band_width(m, bn, rs) <= 2 * bn


def test_unsupported_dtype_raises(device):
    x, qt, kt, mask = _make(1, 1, 1, 4, 4, 16, 16, 1, torch.float64, device)
    with pytest.raises(NotImplementedError, match="dtype"):
        ra.relpos_attn_forward(x["q"], x["k"], x["v"], x["qr"], x["R"], x["tt"], qt, kt, mask, scale=1.0)
