"""The C++ CPU implementation of the extension (``backend="cpp"``) against the float64 reference.

It runs the tiled algorithm of the CUDA kernels (csrc/cuda) with the same shared rules
(csrc/common/attn_rules.h): masks, pooling windows, tile walks, block lists, online softmax. Outputs
are NaN-poisoned (tests/conftest.py), so an element the implementation forgets to write fails.
"""

from __future__ import annotations

import pytest
import torch

import effattn
from effattn import BlockMask, cuda_ops
from effattn.testing import assert_close
from tests.helpers import compare_with_reference, make_qkv

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _small_tiles(monkeypatch):
    """Tiles of 16 x 16 queries x keys: several tiles, ragged edges and every walk at small sizes."""
    monkeypatch.setattr(cuda_ops, "CPU_TILE", (16, 16))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal,kpm", [(False, False), (True, True)])
def test_dense_dtypes(dtype, causal, kpm):
    q, k, v = make_qkv(B=2, Hq=4, Hkv=2, Tq=37, Tk=53, D=24, Dv=40, dtype=dtype)
    mask = torch.rand(2, 53) > 0.3 if kpm else None
    compare_with_reference(q, k, v, backend="cpp", causal=causal, key_padding_mask=mask, lse_grad=True)


@pytest.mark.parametrize("Tq,Tk", [(1, 1), (17, 17), (1, 40), (40, 1), (100, 130), (130, 33)])
@pytest.mark.parametrize("causal", [False, True])
def test_dense_sizes(Tq, Tk, causal):
    q, k, v = make_qkv(B=1, Hq=3, Hkv=1, Tq=Tq, Tk=Tk, D=16, dtype=torch.float32)
    compare_with_reference(q, k, v, backend="cpp", causal=causal)


@pytest.mark.parametrize("D,Dv", [(16, 16), (40, 24), (64, 64), (96, 80), (128, 128), (256, 200)])
def test_head_dims(D, Dv):
    q, k, v = make_qkv(B=1, Hq=2, Tq=21, Tk=19, D=D, Dv=Dv, dtype=torch.float32)
    compare_with_reference(q, k, v, backend="cpp", causal=True)


@pytest.mark.parametrize("window", [(0, 0), (5, 3), (None, 4), (7, None)])
def test_windows(window):
    q, k, v = make_qkv(B=2, Hq=2, Tq=45, Tk=38, D=16, dtype=torch.float32, layout="bthd")
    compare_with_reference(q, k, v, backend="cpp", window=window)


def test_causal_rows_without_keys_are_zero():
    q, k, v = make_qkv(B=1, Hq=2, Tq=30, Tk=10, D=16, dtype=torch.float32)
    out, lse = compare_with_reference(q, k, v, backend="cpp", causal=True)
    assert (out[:, :, :20] == 0).all() and torch.isneginf(lse[:, :, :20]).all()


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_sdpa_masks(kind):
    q, k, v = make_qkv(B=2, Hq=2, Tq=19, Tk=27, D=16, dtype=torch.float32)
    if kind == "bool":
        mask = torch.rand(2, 1, 19, 27) > 0.4
    else:
        mask = torch.randn(1, 2, 19, 27, dtype=torch.float32)
    out = effattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend="cpp")
    ref = effattn.scaled_dot_product_attention(*(x.detach().double() for x in (q, k, v)),
                                               attn_mask=mask if kind == "bool" else mask.double(),
                                               backend="reference")
    assert_close(out, ref, torch.float32, "fwd", "out")
    out = effattn.scaled_dot_product_attention(q, k, v, is_causal=True, backend="cpp")
    ref = effattn.scaled_dot_product_attention(*(x.detach().double() for x in (q, k, v)), is_causal=True,
                                               backend="reference")
    assert_close(out, ref, torch.float32, "fwd", "out")


@pytest.mark.parametrize("mode", ["mean", "max"])
@pytest.mark.parametrize("separate_cls,truncate", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("stride", [2, 3])
def test_pooled(mode, separate_cls, truncate, stride):
    q, k, v = make_qkv(B=2, Hq=4, Hkv=2, Tq=37, D=16, Dv=24, dtype=torch.float32)
    kpm = torch.rand(2, 37) > 0.3
    for causal in (False, True):
        compare_with_reference(q, k, v, backend="cpp", op=effattn.pooled_attention, stride=stride, pool=mode,
                               separate_cls=separate_cls, truncate=truncate, causal=causal, key_padding_mask=kpm,
                               lse_grad=True)


@pytest.mark.parametrize("T", [1, 2, 5, 64])
def test_pooled_short_and_half(T):
    q, k, v = make_qkv(B=1, Hq=2, Tq=T, D=32, dtype=torch.float16)
    compare_with_reference(q, k, v, backend="cpp", op=effattn.pooled_attention, stride=4, pool="max",
                           separate_cls=True, causal=True)


def _random_blocks(B, H, Tq, Tk, block, density):
    nq, nk = -(-Tq // block[0]), -(-Tk // block[1])
    return BlockMask.from_dense_blocks(torch.rand(B, H, nq, nk) < density, Tq, Tk, block)


def _sparse_op(block_mask):
    def op(q, k, v, **kw):
        return effattn.sparse_attention(q, k, v, block_mask, **kw)
    return op


@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("block", [(16, 32), (32, 16), (64, 64)])
@pytest.mark.parametrize("Tq,Tk", [(1, 1), (70, 45)])
def test_sparse_random(density, block, Tq, Tk):
    q, k, v = make_qkv(B=2, Hq=2, Tq=Tq, Tk=Tk, D=16, dtype=torch.float32)
    bm = _random_blocks(2, 1, Tq, Tk, block, density)
    out, lse = compare_with_reference(q, k, v, backend="cpp", op=_sparse_op(bm), lse_grad=True)
    if density == 0.0:
        assert (out == 0).all() and torch.isneginf(lse).all()


@pytest.mark.parametrize("name", ["causal", "window", "segments", "global", "bigbird"])
def test_sparse_rules(name):
    Tq = Tk = 77
    block = (16, 32)
    if name == "causal":
        bm = BlockMask.causal(Tq, Tk, block_size=block)
    elif name == "window":
        bm = BlockMask.sliding_window(Tq, Tk, 20, 5, block_size=block)
    elif name == "segments":
        seg = torch.tensor([[0] * 30 + [1] * 47, [0] * 10 + [1] * 20 + [2] * 47], dtype=torch.int32)
        bm = BlockMask.from_segments(seg, block_size=block)
    elif name == "global":
        bm = BlockMask.global_tokens(Tq, Tk, 5, block_size=block)
    else:
        bm = BlockMask.bigbird(Tq, Tk, window=(16, 16), n_global=4, n_random_blocks=1, block_size=block)
    q, k, v = make_qkv(B=2, Hq=4, Hkv=2, Tq=Tq, Tk=Tk, D=16, dtype=torch.float32, layout="bthd")
    kpm = torch.rand(2, Tk) > 0.2
    compare_with_reference(q, k, v, backend="cpp", op=_sparse_op(bm), key_padding_mask=kpm)


def test_segment_ids_go_block_sparse():
    q, k, v = make_qkv(B=2, Hq=2, Tq=50, D=16, dtype=torch.float32)
    seg = torch.randint(0, 3, (2, 50)).sort(-1).values
    compare_with_reference(q, k, v, backend="cpp", segment_ids=seg, causal=True)


def test_deterministic():
    q, k, v = make_qkv(B=1, Hq=4, Hkv=2, Tq=40, D=16, dtype=torch.float32)
    runs = []
    for _ in range(2):
        out = effattn.flash_attention(q, k, v, causal=True, backend="cpp")
        runs.append((out, *torch.autograd.grad(out.sum(), (q, k, v))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_env_selects_cpp(monkeypatch):
    monkeypatch.setenv("EFFATTN_BACKEND", "cpp")
    q, k, v = make_qkv(B=1, Hq=2, Tq=9, D=16, dtype=torch.float32, requires_grad=False)
    out = effattn.flash_attention(q, k, v)
    ref = effattn.flash_attention(q.double(), k.double(), v.double(), backend="reference")
    assert_close(out, ref, torch.float32, "fwd", "out")


def test_cpp_declines_dropout():
    q, k, v = make_qkv(B=1, Hq=2, Tq=9, D=16, dtype=torch.float32)
    with pytest.raises(effattn.UnsupportedInputError, match="dropout is not implemented"):
        effattn.flash_attention(q, k, v, dropout_p=0.1, backend="cpp")


def test_not_in_automatic_order():
    assert "cpp" not in effattn.backends.AUTO_ORDER and "cuda" not in effattn.backends.AUTO_ORDER


# ----------------------------------------------------------------------------------------------
# the registered ops (custom ops with fake implementations and autograd) on the cpp backend
# ----------------------------------------------------------------------------------------------
def test_opcheck_flash():
    q, k, v = make_qkv(Hq=4, Hkv=2, Tq=9, Tk=13, D=16, dtype=torch.float32)
    mask = torch.rand(2, 1, 1, 13) > 0.2
    args = (q, k, v, mask, 0.25, 3, 0, k.shape[2] - q.shape[2], 0.0, 0, "cpp")
    torch.library.opcheck(torch.ops.effattn.attention_fwd.default, args)


def test_opcheck_pooled():
    q, k, v = make_qkv(Hq=2, Tq=11, D=16, dtype=torch.float32)
    args = (q, k, v, None, 0.25, -1, 0, 2, "mean", True, False, 0.0, 0, "cpp")
    torch.library.opcheck(torch.ops.effattn.pooled_attention_fwd.default, args)


def test_opcheck_sparse():
    q, k, v = make_qkv(Hq=2, Tq=40, Tk=40, D=16, dtype=torch.float32)
    bm = BlockMask.causal(40, 40, block_size=16)
    args = (q, k, v, None, bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices,
            bm.q_num_blocks, bm.q_indices, bm.full_q_num_blocks, bm.full_q_indices, None, None, 0.25, 16, 16,
            -1, 0, 0, 0, True, "cpp")
    torch.library.opcheck(torch.ops.effattn.sparse_attention_fwd.default, args)
