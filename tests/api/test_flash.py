"""The Triton flash-attention kernels against the float64 reference: forward, lse and gradients.

On CPU the kernels run through Triton's interpreter (conftest.py), on CUDA for real; bf16 is
covered on both (the interpreter's bf16 ``tl.dot`` is wrong, so the kernels upcast its operands
there, and only there).
"""

import pytest
import torch

import effattn
from tests.helpers import compare_with_reference, make_qkv

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.mark.parametrize("T", [1, 17, 128, 129])
@pytest.mark.parametrize("causal", [False, True])
def test_seqlens(device, T, causal):
    compare_with_reference(*make_qkv(Tq=T, D=64, device=device), causal=causal)


@pytest.mark.parametrize("causal", [False, True])
def test_seqlen_1000(device, causal):
    compare_with_reference(*make_qkv(B=1, Hq=1, Tq=1000, D=64, device=device), causal=causal)


@pytest.mark.parametrize("D", [16, 40, 64, 80, 96, 128, 160, 256])
def test_head_dims(device, D):
    compare_with_reference(*make_qkv(B=1, Hq=2, Tq=45, D=D, device=device), causal=True)


@pytest.mark.parametrize("D", [1, 8])
def test_tiny_head_dims(device, D):
    compare_with_reference(*make_qkv(B=1, Hq=1, Tq=20, D=D, device=device))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_dtypes(device, dtype, causal):
    compare_with_reference(*make_qkv(Tq=70, Tk=50, D=48, dtype=dtype, device=device), causal=causal)


@pytest.mark.parametrize("Tq,Tk", [(17, 100), (100, 17), (64, 1), (1, 64)])
@pytest.mark.parametrize("causal", [False, True])
def test_unequal_lengths_bottom_right_causal(device, Tq, Tk, causal):
    """Causal is aligned bottom-right; with Tq > Tk the first Tq - Tk rows see nothing (out 0)."""
    out, lse = compare_with_reference(*make_qkv(Tq=Tq, Tk=Tk, D=32, device=device), causal=causal)
    if causal and Tq > Tk:
        assert torch.all(out[:, :, : Tq - Tk] == 0)
        assert torch.all(torch.isneginf(lse[:, :, : Tq - Tk]))


@pytest.mark.parametrize("Hq,Hkv", [(4, 2), (6, 1), (8, 4)])
def test_gqa_mqa(device, Hq, Hkv):
    compare_with_reference(*make_qkv(Hq=Hq, Hkv=Hkv, Tq=40, Tk=56, D=32, device=device), causal=True)


def test_gqa_grads_sum_over_group(device):
    """dK/dV of a shared KV head equal those of explicitly repeated heads, summed over the group."""
    q, k, v = make_qkv(Hq=4, Hkv=2, Tq=30, D=32, dtype=torch.float32, device=device)
    out = effattn.flash_attention(q, k, v, backend="triton")
    g = torch.autograd.grad(out.sum(), (k, v))
    k_rep = k.detach().repeat_interleave(2, 1).requires_grad_()
    v_rep = v.detach().repeat_interleave(2, 1).requires_grad_()
    out_rep = effattn.flash_attention(q.detach(), k_rep, v_rep, backend="triton")
    g_rep = torch.autograd.grad(out_rep.sum(), (k_rep, v_rep))
    for a, b in zip(g, g_rep):
        torch.testing.assert_close(a, b.unflatten(1, (2, 2)).sum(2), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("window", [(8, 8), (0, 0), (20, None), (None, 5), (3, -1), (40, 100)])
def test_sliding_window(device, window):
    compare_with_reference(*make_qkv(Tq=70, Tk=90, D=32, device=device), window=window)


@pytest.mark.parametrize("window", [(10, None), (0, None), (33, 4)])
def test_causal_window(device, window):
    compare_with_reference(*make_qkv(Tq=80, D=32, device=device), causal=True, window=window)


def test_key_padding_mask(device):
    q, k, v = make_qkv(B=3, Tq=40, Tk=75, D=32, device=device)
    kpm = torch.rand(3, 75, device=device) > 0.4
    kpm[1] = False  # every row of batch 1 is empty
    kpm[2, 60:] = False  # right padding
    out, lse = compare_with_reference(q, k, v, key_padding_mask=kpm, causal=True)
    assert torch.all(out[1] == 0) and torch.all(torch.isneginf(lse[1]))


def test_fully_masked_rows_zero_grads(device):
    q, k, v = make_qkv(Tq=20, Tk=20, D=32, dtype=torch.float32, device=device)
    kpm = torch.ones(2, 20, dtype=torch.bool, device=device)
    kpm[0] = False
    out = effattn.flash_attention(q, k, v, key_padding_mask=kpm, backend="triton")
    dq, dk, dv = torch.autograd.grad(out.square().sum() + out.sum(), (q, k, v))
    for g in (dq, dk, dv):
        assert torch.isfinite(g).all()
        assert torch.all(g[0] == 0)


def test_value_head_dim_differs(device):
    compare_with_reference(*make_qkv(Tq=33, D=64, Dv=24, device=device), causal=True)


def test_non_contiguous_inputs(device):
    q, k, v = make_qkv(Hq=4, Hkv=2, Tq=37, D=40, layout="bthd", device=device)
    assert not q.is_contiguous()
    compare_with_reference(q, k, v, causal=True)


def test_lse_gradient(device):
    compare_with_reference(*make_qkv(Tq=30, Tk=45, D=32, dtype=torch.float32, device=device), causal=True,
                           lse_grad=True)


def test_scale(device):
    compare_with_reference(*make_qkv(Tq=30, D=32, device=device), scale=0.3)


def test_backward_deterministic(device):
    q, k, v = make_qkv(Hq=4, Hkv=1, Tq=50, D=32, device=device)
    dout = torch.randn(2, 4, 50, 32, dtype=q.dtype, device=device)

    def grads():
        out = effattn.flash_attention(q, k, v, causal=True, backend="triton")
        return torch.autograd.grad(out, (q, k, v), dout)

    for a, b in zip(grads(), grads()):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# dropout
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_dropout_matches_reference_exactly(device, dtype):
    """Same seed -> the same keep mask in the kernel and in the reference, forward and backward."""
    q, k, v = make_qkv(Hq=4, Hkv=2, Tq=40, Tk=52, D=32, dtype=dtype, device=device)
    compare_with_reference(q, k, v, causal=True, dropout_p=0.3, dropout_seed=2**40 + 17)


def test_dropout_replay_and_seeds(device):
    q, k, v = make_qkv(Tq=40, D=32, dtype=torch.float32, device=device)
    a = effattn.flash_attention(q, k, v, dropout_p=0.5, dropout_seed=5, backend="triton")
    b = effattn.flash_attention(q, k, v, dropout_p=0.5, dropout_seed=5, backend="triton")
    c = effattn.flash_attention(q, k, v, dropout_p=0.5, dropout_seed=6, backend="triton")
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    torch.manual_seed(3)
    d = effattn.flash_attention(q, k, v, dropout_p=0.5, backend="triton")
    torch.manual_seed(3)
    e = effattn.flash_attention(q, k, v, dropout_p=0.5, backend="triton")
    assert torch.equal(d, e)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_statistics(device, p):
    """With v = identity-like one-hot values, out = the dropped, rescaled probabilities: check the
    kept fraction and that the expectation over seeds is the undropped output."""
    T = 64
    q = torch.randn(1, 2, T, 16, device=device)
    k = torch.randn(1, 2, T, 16, device=device)
    v = torch.eye(T, device=device).expand(1, 2, T, T).contiguous()
    probs = effattn.flash_attention(q, k, v, backend="triton")
    dropped = effattn.flash_attention(q, k, v, dropout_p=p, dropout_seed=11, backend="triton")
    kept = dropped != 0
    n = kept.numel()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * sigma
    torch.testing.assert_close(dropped[kept], probs[kept] / (1 - p), atol=1e-5, rtol=1e-4)
    mean = sum(effattn.flash_attention(q, k, v, dropout_p=p, dropout_seed=s, backend="triton") for s in range(24)) / 24
    assert (mean - probs).abs().mean() < 0.25 * probs.abs().mean()


# Window edges that sit one before, on and one after block boundaries, for the interpreter's
# block sizes (16, 32) and the GPU's (32..128): a segment bound that is off by one shows up here.
_EDGES = [14, 15, 16, 17, 31, 33, 63, 64, 127]


@pytest.mark.parametrize("Tq,Tk", [(150, 150), (100, 170), (170, 100)])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("w", _EDGES)
def test_window_edges_sweep(device, Tq, Tk, side, w):
    window = (w, None) if side == "left" else (None, w)
    compare_with_reference(*make_qkv(B=1, Hq=1, Tq=Tq, Tk=Tk, D=16, device=device), window=window)


def test_huge_window_is_unbounded(device):
    """A window wider than both sequences (clamped on the host) equals no window."""
    q, k, v = make_qkv(Tq=40, Tk=50, D=32, device=device)
    wide = effattn.flash_attention(q, k, v, window=(2**40, 2**35), backend="triton")
    torch.testing.assert_close(wide, effattn.flash_attention(q, k, v, backend="triton"), atol=0, rtol=0)
