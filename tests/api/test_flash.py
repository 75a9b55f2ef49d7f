"""``effattn.flash_attention`` on every backend against the float64 reference: forward, lse and gradients.

Each case runs on every backend of the ``backend`` fixture (tests/conftest.py) that supports it and is
skipped, with the backend's reasons, on the others. Outputs are NaN-poisoned (tests/conftest.py), so an
element a kernel forgets to write fails. The Triton kernels run on the test device (on CPU through
Triton's interpreter, whose bf16 ``tl.dot`` is wrong, so the kernels upcast its operands there, and only
there); the C++ CPU implementation runs on 16 x 16 tiles; the CUDA kernels pad head dims to 64 or 128.
"""

import pytest
import torch

import effattn
from effattn.testing import DTYPES, TOLERANCES
from tests.helpers import compare_with_reference, make_qkv


@pytest.mark.parametrize("T", [1, 17, 64, 128, 129])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.interpreter_subset(T=[1, 17])
@pytest.mark.interpreter_subset(T=[129], causal=[True])
def test_seqlens(backend, T, causal):
    compare_with_reference(*make_qkv(Tq=T, D=64, device=backend.device), backend=backend, causal=causal)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.interpreter_subset(causal=[])  # the compiled backends only: on the interpreter, T <= 300 walks every tile
def test_seqlen_1000(backend, causal):
    compare_with_reference(*make_qkv(B=1, Hq=1, Tq=1000, D=64, device=backend.device), backend=backend,
                           causal=causal)


@pytest.mark.parametrize("D,Dv", [(16, 16), (40, 40), (64, 64), (80, 80), (96, 96), (128, 128), (160, 160),
                                  (256, 256), (8, 24), (40, 24), (40, 72), (64, 24), (96, 128), (256, 200)])
def test_head_dims(backend, D, Dv):
    compare_with_reference(*make_qkv(B=1, Hq=2, Tq=45, D=D, Dv=Dv, device=backend.device), backend=backend,
                           causal=True)


@pytest.mark.parametrize("D", [1, 8])
def test_tiny_head_dims(backend, D):
    compare_with_reference(*make_qkv(B=1, Hq=1, Tq=20, D=D, device=backend.device), backend=backend)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal,padding,D,Dv", [(False, False, 48, 40), (True, True, 96, 128)])
@pytest.mark.interpreter_subset(causal=[False])
@pytest.mark.interpreter_subset(causal=[True], dtype=[torch.bfloat16])
def test_dtypes(backend, dtype, causal, padding, D, Dv):
    """Every dtype, GQA and the lse gradient; without masks at a head dim padded to 64 in the CUDA
    kernels, causal with key padding at one padded to 128."""
    q, k, v = make_qkv(Hq=2, Hkv=1, Tq=70, Tk=50, D=D, Dv=Dv, dtype=dtype, device=backend.device)
    kpm = torch.rand(2, 50, device=backend.device) > 0.3 if padding else None
    compare_with_reference(q, k, v, backend=backend, causal=causal, key_padding_mask=kpm, lse_grad=True)


@pytest.mark.parametrize("Tq,Tk", [(17, 100), (100, 17), (64, 1), (1, 64), (300, 1), (1, 300), (130, 33),
                                   (65, 129)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.interpreter_subset(Tq=[17, 100])
@pytest.mark.interpreter_subset(Tq=[64, 1], Tk=[1, 64], causal=[True])
@pytest.mark.interpreter_subset(Tq=[130], causal=[True])
def test_unequal_lengths_bottom_right_causal(backend, Tq, Tk, causal):
    """Causal is aligned bottom-right; with Tq > Tk the first Tq - Tk rows see nothing (out 0)."""
    out, lse = compare_with_reference(*make_qkv(Tq=Tq, Tk=Tk, D=32, device=backend.device), backend=backend,
                                      causal=causal)
    if causal and Tq > Tk:
        assert torch.all(out[:, :, : Tq - Tk] == 0)
        assert torch.all(torch.isneginf(lse[:, :, : Tq - Tk]))


@pytest.mark.parametrize("Hq,Hkv", [(4, 2), (6, 1), (8, 4)])
@pytest.mark.interpreter_subset(Hq=[6])
def test_gqa_mqa(backend, Hq, Hkv):
    compare_with_reference(*make_qkv(Hq=Hq, Hkv=Hkv, Tq=40, Tk=56, D=32, device=backend.device), backend=backend,
                           causal=True)


def test_gqa_grads_sum_over_group(backend):
    """dK/dV of a shared KV head equal those of explicitly repeated heads, summed over the group."""
    q, k, v = make_qkv(Hq=4, Hkv=2, Tq=30, D=32, dtype=torch.float32, device=backend.device)
    out = backend.run(effattn.flash_attention, q, k, v)
    g = torch.autograd.grad(out.sum(), (k, v))
    k_rep = k.detach().repeat_interleave(2, 1).requires_grad_()
    v_rep = v.detach().repeat_interleave(2, 1).requires_grad_()
    out_rep = backend.run(effattn.flash_attention, q.detach(), k_rep, v_rep)
    g_rep = torch.autograd.grad(out_rep.sum(), (k_rep, v_rep))
    atol, rtol = TOLERANCES[torch.float32]["grad"]
    for a, b in zip(g, g_rep):
        torch.testing.assert_close(a, b.unflatten(1, (2, 2)).sum(2), atol=atol, rtol=rtol)


@pytest.mark.parametrize("window", [(8, 8), (0, 0), (20, None), (None, 5), (3, -1), (40, 100), (33, 7), (None, 70)])
@pytest.mark.interpreter_subset(window=[(8, 8), (3, -1), (None, 70)])
def test_sliding_window(backend, window):
    compare_with_reference(*make_qkv(Tq=70, Tk=90, D=32, device=backend.device), backend=backend, window=window)


@pytest.mark.parametrize("window", [(10, None), (0, None), (33, 4)])
def test_causal_window(backend, window):
    compare_with_reference(*make_qkv(Tq=80, D=32, device=backend.device), backend=backend, causal=True,
                           window=window)


def test_key_padding_mask(backend):
    q, k, v = make_qkv(B=3, Tq=40, Tk=75, D=32, device=backend.device)
    kpm = torch.rand(3, 75, device=backend.device) > 0.4
    kpm[1] = False  # every row of batch 1 is empty
    kpm[2, 60:] = False  # right padding
    out, lse = compare_with_reference(q, k, v, backend=backend, key_padding_mask=kpm, causal=True)
    assert torch.all(out[1] == 0) and torch.all(torch.isneginf(lse[1]))


def test_fully_masked_rows_zero_grads(backend):
    q, k, v = make_qkv(Tq=20, Tk=20, D=32, dtype=torch.float32, device=backend.device)
    kpm = torch.ones(2, 20, dtype=torch.bool, device=backend.device)
    kpm[0] = False
    out = backend.run(effattn.flash_attention, q, k, v, key_padding_mask=kpm)
    dq, dk, dv = torch.autograd.grad(out.square().sum() + out.sum(), (q, k, v))
    for g in (dq, dk, dv):
        assert torch.isfinite(g).all()
        assert torch.all(g[0] == 0)


@pytest.mark.parametrize("window", [None, (5, 3)])
def test_non_contiguous_inputs(backend, window):
    q, k, v = make_qkv(Hq=4, Hkv=2, Tq=37, Tk=45, D=40, layout="bthd", device=backend.device)
    assert not q.is_contiguous()
    compare_with_reference(q, k, v, backend=backend, causal=window is None, window=window)


def test_unaligned_views(backend):
    """Views whose rows are not 16-byte aligned (the CUDA kernels' element-wise load path)."""
    q, k, v = (torch.randn(1, 2, 99, 70, dtype=torch.float16, device=backend.device)[..., 3:67].requires_grad_()
               for _ in range(3))
    compare_with_reference(q, k, v, backend=backend, causal=True)


def test_lse_gradient(backend):
    compare_with_reference(*make_qkv(Tq=30, Tk=45, D=32, dtype=torch.float32, device=backend.device),
                           backend=backend, causal=True, lse_grad=True)


def test_scale(backend):
    compare_with_reference(*make_qkv(Tq=30, D=32, device=backend.device), backend=backend, scale=0.3)


def test_deterministic(backend):
    """Two runs are bit-equal, forward and backward (GQA: dK, dV summed over the group)."""
    if backend.name == "triton" and backend.device == "cpu":
        pytest.skip("the Triton interpreter runs the programs one after another: nothing can race")
    q, k, v = make_qkv(Hq=4, Hkv=1, Tq=50, D=32, device=backend.device)
    dout = torch.randn(2, 4, 50, 32, dtype=q.dtype, device=backend.device)

    def run():
        out = backend.run(effattn.flash_attention, q, k, v, causal=True)
        return (out, *torch.autograd.grad(out, (q, k, v), dout))

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# score modifiers: soft-capping and ALiBi (flash-attn's softcap and alibi_slopes)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("softcap,alibi", [(2.0, None), (0.0, "heads"), (0.5, "batch-heads")])
@pytest.mark.parametrize("Tq,Tk,causal,window", [(37, 75, True, None), (75, 37, True, None), (40, 40, False, None),
                                                 (53, 61, False, (9, 4))])
@pytest.mark.interpreter_subset(Tq=[37], softcap=[0.5])
@pytest.mark.interpreter_subset(Tq=[53], softcap=[0.0])
def test_softcap_alibi(backend, softcap, alibi, Tq, Tk, causal, window):
    """Against the reference with GQA, key padding (a fully padded batch row), bottom-right positions either way."""
    q, k, v = make_qkv(Hq=4, Hkv=2, Tq=Tq, Tk=Tk, D=40, device=backend.device)
    slopes = {None: None, "heads": torch.rand(4), "batch-heads": torch.rand(2, 4)}[alibi]
    kpm = torch.rand(2, Tk, device=backend.device) > 0.25
    kpm[1] = False
    compare_with_reference(q, k, v, backend=backend, causal=causal, window=window, key_padding_mask=kpm,
                           softcap=softcap, alibi_slopes=None if slopes is None else slopes.to(backend.device),
                           lse_grad=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.interpreter_subset(dtype=[torch.bfloat16])
def test_softcap_alibi_dtypes(backend, dtype):
    q, k, v = make_qkv(Hq=2, Tq=45, Tk=66, D=64, dtype=dtype, device=backend.device)
    compare_with_reference(q, k, v, backend=backend, causal=True, softcap=1.5,
                           alibi_slopes=torch.tensor([0.5, 0.0625], device=backend.device))


def test_softcap_alibi_with_dropout(backend):
    q, k, v = make_qkv(Hq=2, Tq=33, Tk=47, D=32, dtype=torch.float32, device=backend.device)
    compare_with_reference(q, k, v, backend=backend, softcap=1.0, alibi_slopes=torch.rand(2, device=backend.device),
                           dropout_p=0.3, dropout_seed=7)


def test_score_modifiers_change_the_output(backend):
    """A modifier a backend ignored would leave the plain output: each one must move it."""
    q, k, v = make_qkv(B=1, Hq=2, Tq=20, D=16, dtype=torch.float32, device=backend.device)
    plain = backend.run(effattn.flash_attention, q, k, v)
    for kwargs in (dict(softcap=0.5), dict(alibi_slopes=torch.ones(2, device=backend.device))):
        modified = backend.run(effattn.flash_attention, q, k, v, **kwargs)
        assert (modified - plain).abs().max() > 1e-2, kwargs


def test_alibi_and_softcap_are_flash_attn_formulas():
    """The reference's ALiBi is flash-attn's bias ``-slope·|i + Tk - Tq - j|`` (given here as a float mask) and its
    soft cap ``softcap·tanh(s / softcap)`` (written out in PyTorch), causal bottom-right."""
    q, k, v = make_qkv(B=2, Hq=3, Hkv=1, Tq=11, Tk=19, D=8, dtype=torch.float64)
    slopes = torch.rand(2, 3, dtype=torch.float64)
    i, j = torch.arange(11)[:, None], torch.arange(19)[None, :]
    bias = -slopes[:, :, None, None] * (i + 19 - 11 - j).abs()
    got = effattn.flash_attention(q, k, v, causal=True, alibi_slopes=slopes, backend="reference")
    want = effattn.scaled_dot_product_attention(q, k, v, attn_mask=bias.masked_fill(j > i + 8, float("-inf")),
                                                enable_gqa=True, backend="reference")
    torch.testing.assert_close(got, want)
    s = 2.0 * torch.tanh(q @ k.transpose(-1, -2) / 8 ** 0.5 / 2.0)
    want = torch.softmax(s, -1) @ v
    torch.testing.assert_close(effattn.flash_attention(q, k, v, softcap=2.0, backend="reference"), want)


# ----------------------------------------------------------------------------------------------
# dropout
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.interpreter_subset(dtype=[torch.float16])
def test_dropout_matches_reference_exactly(backend, dtype):
    """Same seed -> the same keep mask in the kernel and in the reference, forward and backward."""
    q, k, v = make_qkv(Hq=4, Hkv=2, Tq=40, Tk=52, D=32, dtype=dtype, device=backend.device)
    compare_with_reference(q, k, v, backend=backend, causal=True, dropout_p=0.3, dropout_seed=2**40 + 17)


def test_dropout_replay_and_seeds(backend):
    q, k, v = make_qkv(Tq=40, D=32, dtype=torch.float32, device=backend.device)
    a = backend.run(effattn.flash_attention, q, k, v, dropout_p=0.5, dropout_seed=5)
    b = backend.run(effattn.flash_attention, q, k, v, dropout_p=0.5, dropout_seed=5)
    c = backend.run(effattn.flash_attention, q, k, v, dropout_p=0.5, dropout_seed=6)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    torch.manual_seed(3)
    d = backend.run(effattn.flash_attention, q, k, v, dropout_p=0.5)
    torch.manual_seed(3)
    e = backend.run(effattn.flash_attention, q, k, v, dropout_p=0.5)
    assert torch.equal(d, e)


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.interpreter_subset(p=[0.1])
def test_dropout_statistics(backend, p):
    """With v = identity-like one-hot values, out = the dropped, rescaled probabilities: check the
    kept fraction and that the expectation over seeds is the undropped output."""
    T = 64
    q = torch.randn(1, 2, T, 16, device=backend.device)
    k = torch.randn(1, 2, T, 16, device=backend.device)
    v = torch.eye(T, device=backend.device).expand(1, 2, T, T).contiguous()
    dropped = backend.run(effattn.flash_attention, q, k, v, dropout_p=p, dropout_seed=11)
    probs = backend.run(effattn.flash_attention, q, k, v)
    kept = dropped != 0
    n = kept.numel()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * sigma
    # a kept probability is the undropped one times 1 / (1 - p), rounded once more in float32
    torch.testing.assert_close(dropped[kept], probs[kept] / (1 - p), atol=1e-5, rtol=1e-4)
    # the mean's relative error is about 0.8 sqrt(p / ((1 - p) seeds)): 0.09 at p = 0.1 over 8, 0.16 at 0.5 over 24
    seeds = 8 if p <= 0.1 else 24
    mean = sum(backend.run(effattn.flash_attention, q, k, v, dropout_p=p, dropout_seed=s) for s in range(seeds)) / seeds
    assert (mean - probs).abs().mean() < 0.25 * probs.abs().mean()


# Window edges that sit one before, on and one after block boundaries, for the interpreter's
# block sizes (16, 32), the C++ tiles (16) and the GPU's (32..128): a segment bound that is off by
# one shows up here.
_EDGES = [14, 15, 16, 17, 31, 33, 63, 64, 127]


@pytest.mark.parametrize("Tq,Tk", [(150, 150), (100, 170), (170, 100)])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("w", _EDGES)
@pytest.mark.interpreter_subset(w=[17], Tq=[100, 170])
@pytest.mark.interpreter_subset(w=[16], side=["left"], Tq=[100])
@pytest.mark.interpreter_subset(w=[15, 33], side=["right"], Tq=[170])
def test_window_edges_sweep(backend, Tq, Tk, side, w):
    window = (w, None) if side == "left" else (None, w)
    compare_with_reference(*make_qkv(B=1, Hq=1, Tq=Tq, Tk=Tk, D=16, device=backend.device), backend=backend,
                           window=window)


def test_huge_window_is_unbounded(backend):
    """A window wider than both sequences (clamped on the host) equals no window, bit for bit."""
    q, k, v = make_qkv(Tq=40, Tk=50, D=32, device=backend.device)
    wide = backend.run(effattn.flash_attention, q, k, v, window=(2**40, 2**35))
    torch.testing.assert_close(wide, backend.run(effattn.flash_attention, q, k, v), atol=0, rtol=0)  # identity
