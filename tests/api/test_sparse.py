"""Block-sparse attention: every backend (the ``backend`` fixture, tests/conftest.py) against the float64
reference (which expands the mask by chunks of query rows), and that reference against naive attention
with the whole mask expanded."""

from __future__ import annotations

import pytest
import torch

import effattn
from effattn import BlockMask
from effattn.reference import naive_attention
from effattn.testing import TOLERANCES, assert_close
from tests.helpers import compare_with_reference, make_qkv

BLOCKS = [(16, 32), (32, 16), (16, 16)]
LARGE_BLOCKS = [(64, 64), (128, 64), (64, 128)]  # the CUDA kernels' block sizes (powers of two >= 64)


def compare_sparse(q, k, v, block_mask, **kw):
    """``backend`` vs the float64 reference (out, lse, dq, dk, dv); returns the backend's (out, lse)."""
    ref_mask = block_mask.to("cpu")

    def op(q, k, v, *, backend, **kw):
        return effattn.sparse_attention(q, k, v, ref_mask if backend == "reference" else block_mask,
                                        backend=backend, **kw)

    return compare_with_reference(q, k, v, op=op, **kw)


@pytest.mark.parametrize("density", [0.0, 0.15, 0.5, 1.0])
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("Tq,Tk", [(1, 1), (45, 45), (70, 33)])
@pytest.mark.interpreter_subset(density=[0.5], Tq=[45, 70])
@pytest.mark.interpreter_subset(density=[0.0, 0.15, 1.0], Tq=[70], block=[(16, 32)])
@pytest.mark.interpreter_subset(density=[0.0], Tq=[1], block=[(32, 16)])
def test_random_block_masks(backend, density, block, Tq, Tk):
    q, k, v = make_qkv(B=2, Hq=2, Tq=Tq, Tk=Tk, D=32, dtype=torch.float32, device=backend.device)
    bm = BlockMask.random(Tq, Tk, density, block, batch=2, heads=2, device=backend.device)
    out, lse = compare_sparse(q, k, v, bm, backend=backend)
    if density == 0.0:
        assert (out == 0).all() and torch.isneginf(lse).all()


@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("block", LARGE_BLOCKS)
@pytest.mark.parametrize("Tq,Tk", [(1, 1), (150, 100)])
def test_random_large_blocks_lse_grad(backend, density, block, Tq, Tk):
    """One mask for every head (heads=1 broadcasts), the lse gradient."""
    q, k, v = make_qkv(B=1, Hq=2, Tq=Tq, Tk=Tk, D=64, dtype=torch.float16, device=backend.device)
    bm = BlockMask.random(Tq, Tk, density, block, device=backend.device)
    out, lse = compare_sparse(q, k, v, bm, backend=backend, lse_grad=True)
    if density == 0.0:
        assert (out == 0).all() and torch.isneginf(lse).all()


def _rule_mask(name, T, block):
    if name == "causal":
        return BlockMask.causal(T, T, block_size=block)
    if name == "causal_top_left":
        return BlockMask.causal(T - 27, T, block_size=block, bottom_right=False)
    if name == "window":
        return BlockMask.sliding_window(T, T, 20, 5, block_size=block)
    if name == "segments":
        seg = torch.tensor([[0] * 30 + [1] * (T - 30), [0] * 10 + [1] * 20 + [2] * (T - 30)], dtype=torch.int32)
        return BlockMask.from_segments(seg, block_size=block)
    if name == "global":
        return BlockMask.global_tokens(T, T, 5, block_size=block)
    return BlockMask.bigbird(T, T, window=9, n_global=3, n_random_blocks=1, block_size=block,
                             generator=torch.Generator().manual_seed(0))


RULES = ["causal", "causal_top_left", "window", "segments", "global", "bigbird"]


@pytest.mark.parametrize("name,T,block,D,dtype", [
    *((name, 77, (16, 32), 40, torch.float32) for name in RULES),
    *((name, 130, (64, 64), 128, torch.bfloat16) for name in ("causal", "window", "segments", "global")),
])
@pytest.mark.interpreter_subset(T=[77], name=["window", "bigbird"])
@pytest.mark.interpreter_subset(T=[130], name=["segments"])
def test_rule_masks(backend, name, T, block, D, dtype):
    """The rule masks (PARTIAL blocks evaluate the rule), GQA, (B, T, H, D) views and key padding."""
    bm = _rule_mask(name, T, block)
    q, k, v = make_qkv(B=2, Hq=2, Hkv=1, Tq=bm.q_len, Tk=T, D=D, dtype=dtype, device=backend.device, layout="bthd")
    kpm = torch.rand(2, T, device=backend.device) > 0.2
    compare_sparse(q, k, v, bm.to(backend.device), backend=backend, key_padding_mask=kpm)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.interpreter_subset(dtype=[torch.bfloat16])  # float16 through the sparse kernels: the lse-grad grid
def test_sparse_half_gqa_padding(backend, dtype):
    q, k, v = make_qkv(B=2, Hq=4, Hkv=2, Tq=64, D=64, dtype=dtype, device=backend.device, layout="bthd")
    kpm = torch.rand(2, 64, device=backend.device) > 0.3
    bm = BlockMask.sliding_window(64, 64, 24, 0, block_size=(16, 16)).to(backend.device)
    compare_sparse(q, k, v, bm, backend=backend, key_padding_mask=kpm)


def test_per_head_masks_and_lse_grad(backend):
    q, k, v = make_qkv(B=1, Hq=3, Tq=48, D=16, Dv=24, dtype=torch.float32, device=backend.device)
    bm = BlockMask.random(48, 48, 0.4, (16, 16), heads=3, device=backend.device)
    compare_sparse(q, k, v, bm, backend=backend, lse_grad=True)


@pytest.mark.parametrize("block", [(64, 64), (128, 64)])
@pytest.mark.interpreter_subset(block=[(128, 64)])  # 64 x 64 blocks on the interpreter: test_rule_masks
def test_gpu_block_sizes_long_sequence(backend, block):
    """The GPU's tile sizes, T = 1000 (not a multiple), a causal sliding window with global tokens."""
    rule = effattn.MaskRule(window_left=100, window_right=0, n_global=4)
    bm = BlockMask.from_rule(rule, 1000, 1000, block_size=block).to(backend.device)
    assert bm.sparsity() > 0.5
    compare_sparse(*make_qkv(B=1, Hq=1, Tq=1000, D=16, dtype=torch.float16, device=backend.device), bm,
                   backend=backend)


def test_reference_matches_naive_with_the_mask_expanded():
    """The chunked sparse reference against naive attention with to_dense() as its mask (float64)."""
    q, k, v = make_qkv(B=2, Hq=2, Tq=37, Tk=45, D=8, dtype=torch.float64)
    bm = BlockMask.sliding_window(37, 45, 6, 2, block_size=(16, 16)) | BlockMask.random(37, 45, 0.2, (16, 16),
                                                                                        batch=2, heads=2)
    out = effattn.sparse_attention(q, k, v, bm, backend="reference")
    ref = naive_attention(q, k, v, bm.to_dense())
    assert_close(out, ref, torch.float64, "fwd", "out")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad((out * dout).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * dout).sum(), (q, k, v))
    for name, g, rg in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(g, rg, torch.float64, "grad", name)


def test_dense_mask_equals_flash(backend):
    q, k, v = make_qkv(B=1, Hq=2, Tq=50, D=32, dtype=torch.float32, device=backend.device, requires_grad=False)
    bm = BlockMask.causal(50, 50, block_size=(16, 16)).to(backend.device)
    atol, rtol = TOLERANCES[torch.float32]["fwd"]
    torch.testing.assert_close(backend.run(effattn.sparse_attention, q, k, v, bm),
                               backend.run(effattn.flash_attention, q, k, v, causal=True), atol=atol, rtol=rtol)


def test_sparse_errors():
    q, k, v = make_qkv(B=2, Hq=2, Tq=32, D=16)
    with pytest.raises(TypeError, match="block_mask must be an effattn.BlockMask"):
        effattn.sparse_attention(q, k, v, torch.ones(2, 2, 2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="built for"):
        effattn.sparse_attention(q, k, v, BlockMask.causal(16, 32, block_size=(16, 16)))
    with pytest.raises(ValueError, match="\\(B, H\\)"):
        effattn.sparse_attention(q, k, v, BlockMask.random(32, 32, 0.5, (16, 16), batch=3))


def test_sparse_opcheck():
    q, k, v = make_qkv(B=1, Hq=2, Tq=20, D=8, dtype=torch.float32)
    bm = BlockMask.causal(20, 20, block_size=(16, 16))
    args = (q, k, v, None, *bm.as_tuple(), 0.3, "reference")
    torch.library.opcheck(torch.ops.effattn.sparse_attention_fwd.default, args)


# ----------------------------------------------------------------------------------------------
# segment_ids in flash_attention (packed documents, DeFormer): block-sparse underneath
# ----------------------------------------------------------------------------------------------
def test_segment_ids_equal_running_each_segment_alone(backend):
    lengths = [23, 1, 40, 17]
    T = sum(lengths)
    seg = torch.cat([torch.full((n,), i, dtype=torch.int32) for i, n in enumerate(lengths)])[None].to(backend.device)
    q, k, v = make_qkv(B=1, Hq=2, Tq=T, D=32, dtype=torch.float32, device=backend.device, requires_grad=False)
    out = backend.run(effattn.flash_attention, q, k, v, causal=True, segment_ids=seg)
    atol, rtol = TOLERANCES[torch.float32]["fwd"]
    start = 0
    for n in lengths:
        part = slice(start, start + n)
        alone = backend.run(effattn.flash_attention, q[:, :, part], k[:, :, part], v[:, :, part], causal=True)
        torch.testing.assert_close(out[:, :, part], alone, atol=atol, rtol=rtol)
        start += n


def test_segment_ids_vs_reference_with_window_padding_grads(backend):
    B, T = 2, 90
    seg = torch.stack([torch.arange(T) // 30, torch.arange(T) // 45]).to(backend.device)
    kpm = torch.rand(B, T, device=backend.device) > 0.2
    q, k, v = make_qkv(B=B, Hq=4, Hkv=2, Tq=T, D=24, dtype=torch.float16, device=backend.device)
    compare_with_reference(q, k, v, backend=backend, segment_ids=seg, window=(20, 0), key_padding_mask=kpm)


def test_segment_ids_random_causal(backend):
    """Random sorted segment ids (some segments empty), causal, float32."""
    q, k, v = make_qkv(B=2, Hq=2, Tq=50, D=16, dtype=torch.float32, device=backend.device)
    seg = torch.randint(0, 3, (2, 50)).sort(-1).values.to(backend.device)
    compare_with_reference(q, k, v, backend=backend, segment_ids=seg, causal=True)


def test_segment_ids_pair_for_cross_attention(backend):
    q, k, v = make_qkv(B=1, Hq=1, Tq=20, Tk=36, D=16, dtype=torch.float32, device=backend.device)
    q_seg = (torch.arange(20) // 10)[None].to(backend.device)
    kv_seg = (torch.arange(36) // 18)[None].to(backend.device)
    compare_with_reference(q, k, v, backend=backend, segment_ids=(q_seg, kv_seg))


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
