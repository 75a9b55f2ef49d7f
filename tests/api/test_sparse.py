"""Block-sparse attention: the Triton kernels against the float64 reference (which expands the mask
by chunks of query rows), and that reference against naive attention with the whole mask expanded."""

from __future__ import annotations

import pytest
import torch

import effattn
from effattn import BlockMask
from effattn.reference import naive_attention
from effattn.testing import assert_close
from tests.helpers import compare_with_reference, make_qkv

BLOCKS = [(16, 32), (32, 16), (16, 16)]


def _random_blocks(B, H, Tq, Tk, block, density, device):
    nq, nk = -(-Tq // block[0]), -(-Tk // block[1])
    return BlockMask.from_dense_blocks(torch.rand(B, H, nq, nk, device=device) < density, Tq, Tk, block)


def compare_sparse(q, k, v, block_mask, **kw):
    """Triton vs the float64 reference (out, lse, dq, dk, dv); returns the Triton (out, lse)."""
    ref_mask = block_mask.to("cpu")

    def op(q, k, v, *, backend, **kw):
        return effattn.sparse_attention(q, k, v, ref_mask if backend == "reference" else block_mask,
                                        backend=backend, **kw)

    return compare_with_reference(q, k, v, op=op, **kw)


@pytest.mark.parametrize("density", [0.0, 0.15, 0.5, 1.0])
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("Tq,Tk", [(1, 1), (45, 45), (70, 33)])
def test_random_block_masks(device, density, block, Tq, Tk):
    q, k, v = make_qkv(B=2, Hq=2, Tq=Tq, Tk=Tk, D=32, dtype=torch.float32, device=device)
    bm = _random_blocks(2, 2, Tq, Tk, block, density, device)
    out, lse = compare_sparse(q, k, v, bm)
    if density == 0.0:
        assert (out == 0).all() and torch.isneginf(lse).all()


@pytest.mark.parametrize("name", ["causal", "causal_top_left", "window", "segments", "global", "bigbird"])
def test_rule_masks(device, name):
    Tq = Tk = 77
    block = (16, 32)
    if name == "causal":
        bm = BlockMask.causal(Tq, Tk, block_size=block)
    elif name == "causal_top_left":
        bm = BlockMask.causal(50, 77, block_size=block, bottom_right=False)
        Tq = 50
    elif name == "window":
        bm = BlockMask.sliding_window(Tq, Tk, 20, 5, block_size=block)
    elif name == "segments":
        seg = torch.tensor([[0] * 30 + [1] * 47, [0] * 10 + [1] * 20 + [2] * 47], dtype=torch.int32)
        bm = BlockMask.from_segments(seg, block_size=block)
    elif name == "global":
        bm = BlockMask.global_tokens(Tq, Tk, 5, block_size=block)
    else:
        bm = BlockMask.bigbird(Tq, Tk, window=9, n_global=3, n_random_blocks=1, block_size=block,
                               generator=torch.Generator().manual_seed(0))
    q, k, v = make_qkv(B=2, Hq=2, Tq=Tq, Tk=Tk, D=40, dtype=torch.float32, device=device)
    compare_sparse(q, k, v, bm.to(device))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sparse_half_gqa_padding(device, dtype):
    q, k, v = make_qkv(B=2, Hq=4, Hkv=2, Tq=64, D=64, dtype=dtype, device=device, layout="bthd")
    kpm = torch.rand(2, 64, device=device) > 0.3
    bm = BlockMask.sliding_window(64, 64, 24, 0, block_size=(16, 16)).to(device)
    compare_sparse(q, k, v, bm, key_padding_mask=kpm)


def test_per_head_masks_and_lse_grad(device):
    q, k, v = make_qkv(B=1, Hq=3, Tq=48, D=16, Dv=24, dtype=torch.float32, device=device)
    compare_sparse(q, k, v, _random_blocks(1, 3, 48, 48, (16, 16), 0.4, device), lse_grad=True)


@pytest.mark.parametrize("block", [(64, 64), (128, 64)])
def test_gpu_block_sizes_long_sequence(device, block):
    """The GPU's tile sizes, T = 1000 (not a multiple), a causal sliding window with global tokens."""
    from effattn.block_mask import MaskRule

    rule = MaskRule(window_left=100, window_right=0, n_global=4)
    bm = BlockMask.from_rule(rule, 1000, 1000, block_size=block).to(device)
    assert bm.sparsity() > 0.5
    compare_sparse(*make_qkv(B=1, Hq=1, Tq=1000, D=16, dtype=torch.float16, device=device), bm)


def test_reference_matches_naive_with_the_mask_expanded():
    """The chunked sparse reference against naive attention with to_dense() as its mask (float64)."""
    q, k, v = make_qkv(B=2, Hq=2, Tq=37, Tk=45, D=8, dtype=torch.float64)
    bm = BlockMask.sliding_window(37, 45, 6, 2, block_size=(16, 16)) | _random_blocks(2, 2, 37, 45, (16, 16),
                                                                                      0.2, "cpu")
    out = effattn.sparse_attention(q, k, v, bm, backend="reference")
    ref = naive_attention(q, k, v, bm.to_dense())
    assert_close(out, ref, torch.float64, "fwd", "out")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad((out * dout).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * dout).sum(), (q, k, v))
    for name, g, rg in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(g, rg, torch.float64, "grad", name)


def test_dense_mask_equals_flash(device):
    q, k, v = make_qkv(B=1, Hq=2, Tq=50, D=32, dtype=torch.float32, device=device, requires_grad=False)
    bm = BlockMask.causal(50, 50, block_size=(16, 16)).to(device)
    torch.testing.assert_close(effattn.sparse_attention(q, k, v, bm, backend="triton"),
                               effattn.flash_attention(q, k, v, causal=True, backend="triton"), atol=2e-5, rtol=2e-5)


def test_sparse_errors():
    q, k, v = make_qkv(B=2, Hq=2, Tq=32, D=16)
    with pytest.raises(TypeError, match="block_mask must be an effattn.BlockMask"):
        effattn.sparse_attention(q, k, v, torch.ones(2, 2, 2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="built for"):
        effattn.sparse_attention(q, k, v, BlockMask.causal(16, 32, block_size=(16, 16)))
    with pytest.raises(ValueError, match="\\(B, H\\)"):
        effattn.sparse_attention(q, k, v, _random_blocks(3, 1, 32, 32, (16, 16), 0.5, "cpu"))


def test_sparse_opcheck():
    q, k, v = make_qkv(B=1, Hq=2, Tq=20, D=8, dtype=torch.float32)
    bm = BlockMask.causal(20, 20, block_size=(16, 16))
    r = bm.rule
    args = (q, k, v, None, bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices,
            bm.q_num_blocks, bm.q_indices, bm.full_q_num_blocks, bm.full_q_indices, None, None, 0.3, 16, 16,
            r.window_left, r.window_right, r.diag_offset, r.n_global, True, "reference")
    torch.library.opcheck(torch.ops.effattn.sparse_attention_fwd.default, args)


# ----------------------------------------------------------------------------------------------
# segment_ids in flash_attention (packed documents, DeFormer): block-sparse underneath
# ----------------------------------------------------------------------------------------------
def test_segment_ids_equal_running_each_segment_alone(device):
    lengths = [23, 1, 40, 17]
    T = sum(lengths)
    seg = torch.cat([torch.full((n,), i, dtype=torch.int32) for i, n in enumerate(lengths)])[None].to(device)
    q, k, v = make_qkv(B=1, Hq=2, Tq=T, D=32, dtype=torch.float32, device=device, requires_grad=False)
    out = effattn.flash_attention(q, k, v, causal=True, segment_ids=seg, backend="triton")
    start = 0
    for n in lengths:
        part = slice(start, start + n)
        alone = effattn.flash_attention(q[:, :, part], k[:, :, part], v[:, :, part], causal=True, backend="triton")
        torch.testing.assert_close(out[:, :, part], alone, atol=2e-5, rtol=2e-5)
        start += n


def test_segment_ids_vs_reference_with_window_padding_grads(device):
    B, T = 2, 90
    seg = torch.stack([torch.arange(T) // 30, torch.arange(T) // 45]).to(device)
    kpm = torch.rand(B, T, device=device) > 0.2
    q, k, v = make_qkv(B=B, Hq=4, Hkv=2, Tq=T, D=24, dtype=torch.float16, device=device)
    compare_with_reference(q, k, v, segment_ids=seg, window=(20, 0), key_padding_mask=kpm)


def test_segment_ids_pair_for_cross_attention(device):
    q, k, v = make_qkv(B=1, Hq=1, Tq=20, Tk=36, D=16, dtype=torch.float32, device=device)
    q_seg = (torch.arange(20) // 10)[None].to(device)
    kv_seg = (torch.arange(36) // 18)[None].to(device)
    compare_with_reference(q, k, v, segment_ids=(q_seg, kv_seg))


def test_segment_ids_errors():
    q, k, v = make_qkv(B=2, Hq=1, Tq=16, D=16)
    seg = torch.zeros(2, 16, dtype=torch.int64)
    with pytest.raises(ValueError, match="dropout"):
        effattn.flash_attention(q, k, v, segment_ids=seg, dropout_p=0.1)
    with pytest.raises(ValueError, match="integer tensor of shape"):
        effattn.flash_attention(q, k, v, segment_ids=seg.float())
    with pytest.raises(ValueError, match="integer tensor of shape"):
        effattn.flash_attention(q, k, v, segment_ids=seg[:, :8])
    q2, k2, v2 = make_qkv(B=2, Hq=1, Tq=8, Tk=16, D=16)
    with pytest.raises(ValueError, match="pass \\(q_segment_ids, kv_segment_ids\\)"):
        effattn.flash_attention(q2, k2, v2, segment_ids=seg)
