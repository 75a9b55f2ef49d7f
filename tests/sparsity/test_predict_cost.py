"""Prediction cost against the work it saves: ``SparseFinder.predict_flops``, ``BlockGate.predict_flops``
and ``saved_attention_flops``, against independent counts (FlopCounterMode on the predictors' matmuls,
a dense expansion of the mask)."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from effattn.block_mask import BlockMask
from effattn.sparsity import BlockGate, SparseFinder, saved_attention_flops


def _counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("B,Tq,Tk,block", [(2, 100, 100, 32), (1, 17, 130, 16), (3, 64, 64, 64)])
def test_saved_attention_flops_matches_dense_expansion(B, Tq, Tk, block):
    H, D, Dv = 4, 24, 40
    g = torch.Generator().manual_seed(Tq + Tk)
    nq, nk = -(-Tq // block), -(-Tk // block)
    kept = torch.rand(B, H, nq, nk, generator=g) < 0.4
    bm = BlockMask.from_dense_blocks(kept, Tq, Tk, block)
    cut = int((~bm.to_dense()).sum())  # elementwise pairs outside the kept blocks (small sizes)
    assert saved_attention_flops(bm, D, head_dim_v=Dv, batch=B, heads=H) == cut * 2 * (D + Dv)
    # a mask broadcast over (B, H) counts once per (b, h)
    one = BlockMask.from_dense_blocks(kept[:1, :1], Tq, Tk, block)
    per_head = int((~one.to_dense()).sum())
    assert saved_attention_flops(one, D, batch=B, heads=H) == B * H * per_head * 4 * D
    # the dense mask saves nothing, the empty one everything
    full = BlockMask.from_dense_blocks(torch.ones(1, 1, nq, nk, dtype=torch.bool), Tq, Tk, block)
    none = BlockMask.from_dense_blocks(torch.zeros(1, 1, nq, nk, dtype=torch.bool), Tq, Tk, block)
    assert saved_attention_flops(full, D, batch=B, heads=H) == 0
    assert saved_attention_flops(none, D, batch=B, heads=H) == B * H * Tq * Tk * 4 * D


def test_saved_attention_flops_errors():
    bm = BlockMask.from_dense_blocks(torch.ones(2, 3, 2, 2, dtype=torch.bool), 32, 32, 16)
    with pytest.raises(ValueError, match="heads=4 does not match"):
        saved_attention_flops(bm, 16, batch=2, heads=4)
    with pytest.raises(ValueError, match="head_dim must be a positive int"):
        saved_attention_flops(bm, 0, batch=2, heads=3)
    with pytest.raises(TypeError, match="block_mask must be an effattn.BlockMask"):
        saved_attention_flops(torch.ones(2, 2), 16)


@pytest.mark.parametrize("Tq,Tk,block", [(128, 128, 32), (17, 100, 16)])
def test_sparsefinder_predict_flops(Tq, Tk, block):
    B, H, D, r, C = 2, 3, 24, 4, 40  # 40 clusters: two bitset words
    sf = SparseFinder(H, D, rank=r, n_clusters=C, top_c=2, seed=0)
    q, k = torch.randn(B, H, Tq, D), torch.randn(B, H, Tk, D)
    projection = _counted(lambda: sf.project(q, k))  # the projection's matmuls, counted by torch
    assert projection == 2 * B * H * (Tq + Tk) * D * r
    nq, nk = -(-Tq // block), -(-Tk // block)
    per_token = B * H * (Tq + Tk) * (D + 3 * C * r + 2)  # centring, distances, an OR per id (top_c = 2)
    bitsets = B * H * nq * nk * 2 * 2  # AND + OR per word, 2 words
    assert sf.predict_flops(Tq, Tk, batch=B, block_size=block) == projection + per_token + bitsets
    # linear in the batch; the block grid term shrinks with larger blocks
    assert sf.predict_flops(Tq, Tk, batch=2 * B, block_size=block) == 2 * sf.predict_flops(Tq, Tk, batch=B,
                                                                                           block_size=block)
    assert sf.predict_flops(Tq, Tk, block_size=64) <= sf.predict_flops(Tq, Tk, block_size=16)
    with_top_k = B * H * nq * nk * (2 * C - 2 * 2)  # the histogram product instead of the bitset words
    assert sf.predict_flops(Tq, Tk, batch=B, block_size=block, top_k=3) == \
        sf.predict_flops(Tq, Tk, batch=B, block_size=block) + with_top_k
    with pytest.raises(ValueError, match="q_len"):
        sf.predict_flops(0, Tk)
    with pytest.raises(ValueError, match="powers of two"):
        sf.predict_flops(Tq, Tk, block_size=24)


@pytest.mark.parametrize("Tq,Tk,block,pooling", [(128, 128, 32, ("max", "min", "mean")), (17, 100, 16, ("mean",))])
def test_gate_predict_flops(Tq, Tk, block, pooling):
    B, H, D, G = 2, 3, 24, 8
    gate = BlockGate(H, D, gate_dim=G, block_size=(block, block), k_pooling=pooling)
    q, k = torch.randn(B, H, Tq, D), torch.randn(B, H, Tk, D)
    nq, nk, P = -(-Tq // block), -(-Tk // block), len(pooling)
    matmuls = _counted(lambda: gate.scores(q, k))  # the linear maps and the block scores
    assert matmuls == B * H * (2 * G * (nq * D + nk * P * D) + 2 * G * nq * nk)
    pooling_ops, scaling = B * H * (Tq * D + P * Tk * D), B * H * nq * nk
    assert gate.predict_flops(Tq, Tk, batch=B) == matmuls + pooling_ops + scaling
    with pytest.raises(ValueError, match="batch"):
        gate.predict_flops(Tq, Tk, batch=0)


def test_prediction_is_cheap_at_long_sequences():
    """The design's claim, in analytic FLOPs: at T = 4096, D = 64, 64-token blocks and 90% of blocks cut,
    either predictor costs under 1% of the attention it saves."""
    T, H, D, block = 4096, 8, 64, 64
    n = T // block
    kept = torch.zeros(1, 1, n, n, dtype=torch.bool)
    kept[..., : n // 10 + 1] = True
    bm = BlockMask.from_dense_blocks(kept, T, T, block)
    saved = saved_attention_flops(bm, D, heads=H)
    sf = SparseFinder(H, D, rank=4, n_clusters=16, top_c=2)
    gate = BlockGate(H, D, block_size=(block, block))
    assert sf.predict_flops(T, T, block_size=block) < 0.01 * saved
    assert gate.predict_flops(T, T) < 0.01 * saved
