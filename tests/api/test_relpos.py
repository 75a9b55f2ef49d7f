"""effattn.relpos_attention (relative-position "band" attention) on every backend against the float64
reference (effattn.reference.relpos_attention), with and without dropout, its argument checks, determinism
and FLOP count."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import effattn
import effattn.relpos_cpu as relpos_cpu
from effattn import reference
from effattn.profile import relpos_flops
from effattn.testing import DTYPES, assert_close, poisoned_empty
from tests.helpers import skip_if_unsupported


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Outputs of the C++ launcher start as NaN; small tiles so that every tile walk is exercised."""
    monkeypatch.setattr(relpos_cpu, "_alloc", poisoned_empty)
    monkeypatch.setattr(relpos_cpu, "CPU_TILE", (16, 16))


def _inputs(B=2, Hq=4, Hkv=2, Tq=17, Tk=None, D=16, Dv=None, rel_stride=1, tt=True, mask=False, dtype=torch.float32,
            device="cpu", full_mask_row=False):
    Tk = Tq * rel_stride if Tk is None else Tk
    Dv = D if Dv is None else Dv
    g = lambda *s: torch.randn(*s, dtype=dtype, device=device)  # noqa: E731
    q, k, v, qr = g(B, Hq, Tq, D), g(B, Hkv, Tk, D), g(B, Hkv, Tk, Dv), g(B, Hq, Tq, D)
    R = g(Hq, rel_stride * (Tq - 1) + Tk, D)
    kw = dict(rel_stride=rel_stride)
    if tt:
        kw.update(tt=g(B, Hq, Tq, 2), q_types=torch.randint(0, 3, (B, Tq), device=device),
                  k_types=torch.randint(0, 3, (B, Tk), device=device))
    if mask or full_mask_row:
        m = torch.rand(B, Tk, device=device) > 0.3
        m[:, 0] = True
        if full_mask_row:
            m[0] = False  # every row of batch 0 sees no key
        kw["key_padding_mask"] = m
    return (q, k, v, qr, R), kw


def _check(target, tensors, kw, dtype, lse_grad=True, dropout_p=0.0, seed=0):
    tensors = [t.requires_grad_() for t in tensors]
    tt = kw.get("tt")
    if tt is not None:
        tt.requires_grad_()
    with skip_if_unsupported():
        out, lse = effattn.relpos_attention(*tensors, return_lse=True, backend=target.name, dropout_p=dropout_p,
                                            dropout_seed=seed, **kw)
    as64 = lambda x: x.detach().cpu().double().requires_grad_() if x.is_floating_point() else x.cpu()  # noqa: E731
    ref_t = [as64(t) for t in tensors]
    ref_kw = {n: (as64(a) if isinstance(a, torch.Tensor) else a) for n, a in kw.items()}
    ref_out, ref_lse = reference.relpos_attention(*ref_t, scale=tensors[0].shape[-1] ** -0.5, dropout_p=dropout_p,
                                                  seed=seed, **ref_kw)
    assert out.dtype == dtype
    assert_close(out.cpu(), ref_out, dtype, "fwd", "out")
    assert torch.equal(torch.isneginf(lse.cpu()), torch.isneginf(ref_lse))
    fin = torch.isfinite(ref_lse)
    assert_close(lse.cpu()[fin], ref_lse[fin], dtype, "lse", "lse")
    dout = torch.randn_like(out)
    loss = (out * dout).float().sum()
    ref_loss = (ref_out * dout.cpu().double()).sum()
    if lse_grad:
        dlse = torch.randn_like(lse)
        loss = loss + (lse.masked_fill(torch.isinf(lse), 0) * dlse).sum()
        ref_loss = ref_loss + (ref_lse.masked_fill(torch.isinf(ref_lse), 0) * dlse.cpu().double()).sum()
    wrt = tensors + ([tt] if tt is not None else [])
    ref_wrt = ref_t + ([ref_kw["tt"]] if tt is not None else [])
    grads = torch.autograd.grad(loss, wrt)
    ref_grads = torch.autograd.grad(ref_loss, ref_wrt)
    for name, g, rg in zip(("dq", "dk", "dv", "dqr", "dR", "dtt"), grads, ref_grads):
        assert g.dtype == dtype and g.shape == rg.shape, name
        assert_close(g.cpu(), rg, dtype, "grad", name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.interpreter_subset(dtype=[torch.float32])  # fp16/bf16 there: tests/kernels/test_relpos_attn.py
def test_dtypes(backend, dtype):
    tensors, kw = _inputs(Tq=16 if backend.name == "triton" else 17, dtype=dtype, device=backend.device, mask=True)
    _check(backend, tensors, kw, dtype)


CASES = {
    "stride1": dict(rel_stride=1),
    "stride2-cls-tt-mask": dict(rel_stride=2, tt=True, mask=True),
    "no-tt": dict(rel_stride=2, tt=False),
    "full-mask-row": dict(full_mask_row=True),
    "gqa-odd": dict(Hq=6, Hkv=2, Tq=100, Tk=37, D=24, Dv=8),
    "T1": dict(Tq=1, Tk=1, B=1),
    "mqa-cross": dict(Hq=3, Hkv=1, Tq=17, Tk=5, rel_stride=3),
    "stride4": dict(Tq=9, rel_stride=4, mask=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("separate_cls", [False, True])
@pytest.mark.interpreter_subset(case=["stride2-cls-tt-mask", "T1", "stride4"], separate_cls=[False])
def test_cases(any_backend, case, separate_cls):
    """Every backend, the reference's written-out backward included, against the reference differentiated
    by autograd in float64."""
    spec = dict(CASES[case])
    tensors, kw = _inputs(device=any_backend.device, **spec)
    _check(any_backend, tensors, dict(kw, separate_cls=separate_cls), torch.float32)


DROPOUT_CASES = {
    "stride1": dict(Tq=37, Tk=75),
    "stride2-cls-mask-full-row": dict(Tq=37, Tk=75, rel_stride=2, full_mask_row=True, separate_cls=True),
    "stride4-no-tt": dict(Tq=9, rel_stride=4, tt=False, mask=True),
    "gqa-odd-cls": dict(Hq=6, Hkv=2, Tq=37, Tk=75, D=24, Dv=8, separate_cls=True),
    "below-tile": dict(B=1, Tq=5, Tk=7, tt=False, mask=True),
}


@pytest.mark.parametrize("case", sorted(DROPOUT_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.interpreter_subset(case=["below-tile"], dtype=[torch.float32])
def test_dropout(any_backend, dtype, case):
    """Dropout draws the reference's keep bits (same seed, same kept scores): outputs and every gradient
    against the float64 reference, autograd through its dropped probabilities."""
    spec = dict(DROPOUT_CASES[case])
    separate_cls = spec.pop("separate_cls", False)
    tensors, kw = _inputs(device=any_backend.device, dtype=dtype, **spec)
    _check(any_backend, tensors, dict(kw, separate_cls=separate_cls), dtype, dropout_p=0.3, seed=20240611)


def test_cpp_dropout_keeps_the_reference_scores():
    """With v the identity over the keys, out[b, h, i, j] = P * Z: zero exactly where the reference's
    Philox draw drops score (b, h, i, j) (P > 0 everywhere: no mask); another seed draws other bits."""
    B, Hq, Tq, Tk, rs = 2, 3, 37, 75, 2
    (q, k, _, qr, R), kw = _inputs(B=B, Hq=Hq, Hkv=1, Tq=Tq, Tk=Tk, rel_stride=rs, D=8)
    v = torch.eye(Tk).expand(B, 1, Tk, Tk)
    outs = {}
    for seed in (7, 8):
        with skip_if_unsupported():
            outs[seed] = effattn.relpos_attention(q, k, v, qr, R, dropout_p=0.4, dropout_seed=seed, backend="cpp",
                                                  separate_cls=True, **kw)
    bh = torch.arange(B * Hq).view(B, Hq, 1, 1)
    rows, cols = torch.arange(Tq).view(-1, 1), torch.arange(Tk).view(1, -1)
    for seed, out in outs.items():
        keep = reference.dropout_keep(seed, 0.4, bh, rows, cols)
        assert torch.equal(out != 0, keep)
        assert 0.5 < keep.float().mean() < 0.7
    assert not torch.equal(outs[7] != 0, outs[8] != 0)


def test_cpp_backend_takes_dropout():
    call = effattn.backends.AttentionCall(device=torch.device("cpu"), dtype=torch.float32, head_dim_qk=64,
                                          head_dim_v=64, Tq=128, Tk=256, dropout=True)
    assert effattn.BACKENDS["cpp"].relpos_reasons(call) == []


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_cpp_bit_identical_across_thread_counts(dropout_p):
    tensors, kw = _inputs(B=2, Hq=4, Hkv=2, Tq=40, rel_stride=2, mask=True)
    tensors = [t.requires_grad_() for t in tensors]
    kw["tt"].requires_grad_()
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            with skip_if_unsupported():
                out = effattn.relpos_attention(*tensors, backend="cpp", separate_cls=True, dropout_p=dropout_p,
                                               dropout_seed=5, **kw)
            grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(),
                                        tensors + [kw["tt"]])
            results.append((out, *grads))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_flop_formula_is_registered():
    tensors, kw = _inputs(B=2, Hq=4, Hkv=2, Tq=20, rel_stride=2, tt=False)
    tensors = [t.requires_grad_() for t in tensors]
    with FlopCounterMode(display=False) as counter:
        effattn.relpos_attention(*tensors, backend="reference", **kw).sum().backward()
    fwd = relpos_flops(2, 4, 20, 40, 16, 16, 2)
    bwd = relpos_flops(2, 4, 20, 40, 16, 16, 2, backward=True)
    assert counter.get_total_flops() == fwd + bwd


def test_bad_inputs_name_the_argument():
    (q, k, v, qr, R), kw = _inputs(tt=True)

    def run(**over):
        args = [over.pop(n, x) for n, x in zip(("q", "k", "v", "qr", "R"), (q, k, v, qr, R))]
        return effattn.relpos_attention(*args, **dict(kw, **over))

    with pytest.raises(ValueError, match="R must have shape"):
        run(R=R[:, :-1])
    with pytest.raises(ValueError, match="qr must have"):
        run(qr=qr[:, :, :-1])
    with pytest.raises(TypeError, match="qr must have q's dtype"):
        run(qr=qr.double())
    with pytest.raises(ValueError, match="rel_stride"):
        run(rel_stride=0)
    with pytest.raises(ValueError, match="tt must have shape"):
        run(tt=kw["tt"][..., :1])
    with pytest.raises(ValueError, match="q_types is required"):
        run(q_types=None)
    with pytest.raises(TypeError, match="k_types must be an integer"):
        run(k_types=kw["k_types"].float())
    with pytest.raises(ValueError, match="only used with tt"):
        run(tt=None)
    with pytest.raises(TypeError, match="separate_cls"):
        run(separate_cls=1)
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        run(key_padding_mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(effattn.UnsupportedInputError, match="relative-position attention is not implemented"):
        run(backend="cuda")
