"""What is particular to the C++ CPU implementation of the extension (``backend="cpp"``): selection by
``EFFATTN_BACKEND``, what it declines, that automatic dispatch never picks it, and its registered ops.

It runs the tiled algorithm of the CUDA kernels (csrc/cuda) with the same shared rules
(csrc/common/attn_rules.h). Its comparisons with the float64 reference are the tests of the public
functions (tests/api/), which run on every backend through the ``backend`` fixture (tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

import effattn
from effattn import BlockMask, cuda_ops
from effattn.testing import assert_close
from tests.helpers import make_qkv


@pytest.fixture(autouse=True)
def _small_tiles(monkeypatch):
    """Tiles of 16 x 16 queries x keys: several tiles, ragged edges and every walk at small sizes."""
    monkeypatch.setattr(cuda_ops, "CPU_TILE", (16, 16))


def test_env_selects_cpp(monkeypatch):
    monkeypatch.setenv("EFFATTN_BACKEND", "cpp")
    q, k, v = make_qkv(B=1, Hq=2, Tq=9, D=16, dtype=torch.float32, requires_grad=False)
    out = effattn.flash_attention(q, k, v)
    ref = effattn.flash_attention(q.double(), k.double(), v.double(), backend="reference")
    assert_close(out, ref, torch.float32, "fwd", "out")


def test_cpp_dropout_bad_probability():
    """Dropout runs in the C++ kernels (tests/csrc/test_cpu_kernel.py); a probability outside [0, 1) is
    refused before any kernel, naming the argument."""
    q, k, v = make_qkv(B=1, Hq=2, Tq=9, D=16, dtype=torch.float32, requires_grad=False)
    with pytest.raises(ValueError, match="dropout_p"):
        effattn.flash_attention(q, k, v, dropout_p=1.0, backend="cpp")


def test_automatic_order():
    """CPU tensors run the C++ kernels automatically (before the reference); the CUDA C++ kernels only when named."""
    order = effattn.backends.AUTO_ORDER
    assert order.index("cpp") < order.index("reference") and "cuda" not in order


def test_automatic_choice_on_cpu():
    from effattn.backends import AttentionCall, select_backend

    def call(dtype, dropout=False):
        return AttentionCall(device=torch.device("cpu"), dtype=dtype, head_dim_qk=64, head_dim_v=64, Tq=8, Tk=8,
                             dropout=dropout)

    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert select_backend(call(dtype)).name == "cpp"
    assert select_backend(call(torch.float64)).name == "reference"  # the float64 path is the reference
    assert select_backend(call(torch.float32, dropout=True)).name == "cpp"  # dropout with the reference's bits
    assert select_backend(call(torch.float64), "cpp").name == "cpp"  # named: its scalar float64 path


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
    args = (q, k, v, None, *bm.as_tuple(), 0.25, "cpp")
    torch.library.opcheck(torch.ops.effattn.sparse_attention_fwd.default, args)
