"""The CUDA C++ kernels (``backend="cuda"``) against the float64 reference, on a GPU.

The same comparisons as the Triton kernels' tests: poisoned outputs (tests/conftest.py), odd sizes
and head dims (padded to 64 / 128 in the kernels), GQA, Tq != Tk, causal / window / masks, pooled
queries, block-sparse masks, gradients, determinism, and Triton side by side. Skipped without a GPU.
"""

from __future__ import annotations

import pytest
import torch

import effattn
from effattn import BlockMask
from effattn.testing import assert_close
from tests.helpers import compare_with_reference, make_qkv

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA kernels need a GPU")

DTYPES = [torch.float16, torch.bfloat16]
CUDA = "cuda"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D,Dv", [(64, 64), (128, 128), (16, 16), (40, 72), (96, 128), (8, 24)])
@pytest.mark.parametrize("causal", [False, True])
def test_dense_head_dims(dtype, D, Dv, causal):
    q, k, v = make_qkv(B=2, Hq=4, Hkv=2, Tq=137, Tk=201, D=D, Dv=Dv, dtype=dtype, device=CUDA)
    kpm = torch.rand(2, 201, device=CUDA) > 0.3
    compare_with_reference(q, k, v, backend="cuda", causal=causal, key_padding_mask=kpm, lse_grad=True)


@pytest.mark.parametrize("Tq,Tk", [(1, 1), (17, 17), (1, 300), (300, 1), (64, 64), (65, 129), (513, 257)])
@pytest.mark.parametrize("causal", [False, True])
def test_dense_sizes(Tq, Tk, causal):
    q, k, v = make_qkv(B=1, Hq=3, Hkv=1, Tq=Tq, Tk=Tk, D=64, dtype=torch.float16, device=CUDA)
    compare_with_reference(q, k, v, backend="cuda", causal=causal)


@pytest.mark.parametrize("layout", ["bhtd", "bthd"])
@pytest.mark.parametrize("window", [(0, 0), (33, 7), (None, 70), (100, None)])
def test_windows_and_layouts(layout, window):
    q, k, v = make_qkv(B=2, Hq=2, Tq=190, Tk=170, D=128, dtype=torch.bfloat16, device=CUDA, layout=layout)
    compare_with_reference(q, k, v, backend="cuda", window=window)


def test_unaligned_views():
    """Views whose rows are not 16-byte aligned take the kernels' element-wise load path."""
    q, k, v = (torch.randn(1, 2, 99, 70, dtype=torch.float16, device=CUDA)[..., 3:67].requires_grad_()
               for _ in range(3))
    compare_with_reference(q, k, v, backend="cuda", causal=True)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_sdpa_masks(kind):
    q, k, v = make_qkv(B=2, Hq=2, Tq=90, Tk=130, D=64, dtype=torch.float16, device=CUDA)
    if kind == "bool":
        mask = torch.rand(2, 1, 90, 130, device=CUDA) > 0.4
    else:
        mask = torch.randn(1, 2, 90, 130, device=CUDA, dtype=torch.float16)
    out = effattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend="cuda")
    ref = effattn.scaled_dot_product_attention(*(x.detach().double().cpu() for x in (q, k, v)),
                                               attn_mask=mask.cpu() if kind == "bool" else mask.double().cpu(),
                                               backend="reference")
    assert_close(out.cpu(), ref, torch.float16, "fwd", "out")


@pytest.mark.parametrize("mode", ["mean", "max"])
@pytest.mark.parametrize("separate_cls,truncate", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("stride", [2, 3])
@pytest.mark.parametrize("D", [64, 96])
def test_pooled(mode, separate_cls, truncate, stride, D):
    q, k, v = make_qkv(B=2, Hq=4, Hkv=2, Tq=157, D=D, dtype=torch.float16, device=CUDA)
    kpm = torch.rand(2, 157, device=CUDA) > 0.3
    for causal in (False, True):
        compare_with_reference(q, k, v, backend="cuda", op=effattn.pooled_attention, stride=stride, pool=mode,
                               separate_cls=separate_cls, truncate=truncate, causal=causal, key_padding_mask=kpm,
                               lse_grad=True)


def _sparse_op(block_mask):
    def op(q, k, v, *, backend, **kw):
        bm = block_mask if backend != "reference" else block_mask.to("cpu")
        return effattn.sparse_attention(q, k, v, bm, backend=backend, **kw)
    return op


@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("block", [(64, 64), (128, 64), (64, 128)])
@pytest.mark.parametrize("Tq,Tk", [(1, 1), (300, 200)])
def test_sparse_random(density, block, Tq, Tk):
    q, k, v = make_qkv(B=2, Hq=2, Tq=Tq, Tk=Tk, D=64, dtype=torch.float16, device=CUDA)
    nq, nk = -(-Tq // block[0]), -(-Tk // block[1])
    bm = BlockMask.from_dense_blocks(torch.rand(2, 1, nq, nk, device=CUDA) < density, Tq, Tk, block)
    out, lse = compare_with_reference(q, k, v, backend="cuda", op=_sparse_op(bm), lse_grad=True)
    if density == 0.0:
        assert (out == 0).all() and torch.isneginf(lse).all()


@pytest.mark.parametrize("name", ["causal", "window", "segments", "global"])
def test_sparse_rules(name):
    T = 333
    block = (64, 64)
    if name == "causal":
        bm = BlockMask.causal(T, T, block_size=block, device=CUDA)
    elif name == "window":
        bm = BlockMask.sliding_window(T, T, 90, 20, block_size=block, device=CUDA)
    elif name == "segments":
        seg = torch.tensor([[0] * 100 + [1] * 233, [0] * 10 + [1] * 200 + [2] * 123], dtype=torch.int32, device=CUDA)
        bm = BlockMask.from_segments(seg, block_size=block)
    else:
        bm = BlockMask.global_tokens(T, T, 5, block_size=block, device=CUDA)
    q, k, v = make_qkv(B=2, Hq=4, Hkv=2, Tq=T, Tk=T, D=128, dtype=torch.bfloat16, device=CUDA)
    kpm = torch.rand(2, T, device=CUDA) > 0.2
    compare_with_reference(q, k, v, backend="cuda", op=_sparse_op(bm), key_padding_mask=kpm)


def test_sparse_small_blocks_are_declined():
    q, k, v = make_qkv(B=1, Hq=2, Tq=64, D=64, dtype=torch.float16, device=CUDA)
    bm = BlockMask.causal(64, 64, block_size=16, device=CUDA)
    with pytest.raises(effattn.UnsupportedInputError, match="block sizes >= 64"):
        effattn.sparse_attention(q, k, v, bm, backend="cuda")


def test_reasons():
    q, k, v = make_qkv(B=1, Hq=2, Tq=8, D=160, dtype=torch.float16, device=CUDA)
    with pytest.raises(effattn.UnsupportedInputError, match="head dim of q/k is 160, more than 128"):
        effattn.flash_attention(q, k, v, backend="cuda")
    q, k, v = make_qkv(B=1, Hq=2, Tq=8, D=64, dtype=torch.float32, device=CUDA)
    with pytest.raises(effattn.UnsupportedInputError, match="dtype torch.float32 not supported"):
        effattn.flash_attention(q, k, v, backend="cuda")


def test_deterministic_and_matches_triton():
    q, k, v = make_qkv(B=2, Hq=8, Hkv=2, Tq=700, D=128, dtype=torch.float16, device=CUDA)
    runs = []
    for _ in range(2):
        out = effattn.flash_attention(q, k, v, causal=True, backend="cuda")
        runs.append((out, *torch.autograd.grad(out.float().square().sum(), (q, k, v))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    tri = effattn.flash_attention(q, k, v, causal=True, backend="triton")
    assert_close(runs[0][0].double(), tri.double(), torch.float16, "fwd", "cuda vs triton")


def test_other_stream_and_device_guard():
    q, k, v = make_qkv(B=1, Hq=2, Tq=300, D=64, dtype=torch.float16, device=CUDA, requires_grad=False)
    ref = effattn.flash_attention(q, k, v, backend="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = effattn.flash_attention(q, k, v, backend="cuda")
    torch.cuda.current_stream().wait_stream(stream)
    assert torch.equal(out, ref)
