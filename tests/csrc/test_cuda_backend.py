"""What is particular to the CUDA C++ kernels (``backend="cuda"``), on a GPU: what they decline and
why, determinism at a size of many thread blocks and the Triton kernels side by side, streams.

Their comparisons with the float64 reference (odd sizes, head dims padded to 64 / 128, GQA, Tq != Tk,
masks, pooled queries, block-sparse masks, gradients) are the tests of the public functions
(tests/api/), which run on every backend through the ``backend`` fixture (tests/conftest.py).
Skipped without a GPU.
"""

from __future__ import annotations

import pytest
import torch

import effattn
from effattn import BlockMask
from effattn.testing import assert_close
from tests.helpers import make_qkv

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA kernels need a GPU")

CUDA = "cuda"


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
