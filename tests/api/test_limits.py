"""effattn.limits: one statement of the kernels' size limits, read by the backends, the launchers and
the kernels, equal to the C++ launcher's constants; every limit is a reason before any launch."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import effattn
from effattn import BlockMask, _op, backends, block_mask, limits
from effattn.backends import BACKENDS, AttentionCall, CudaBackend, TritonBackend
from effattn.kernels import block_attn_map, cluster_blocks, flash_attn
from effattn.reference import QueryPool

LAUNCH_CU = Path(__file__).resolve().parents[2] / "csrc" / "cuda" / "launch.cu"


def _constexprs(path: Path) -> dict[str, int]:
    return {m[1]: int(m[2]) for m in re.finditer(r"constexpr\s+int\s+(\w+)\s*=\s*(\d+)\s*;", path.read_text())}


def test_cuda_launcher_constants_equal_limits():
    found = _constexprs(LAUNCH_CU)
    assert found["kMaxGridYZ"] == limits.MAX_GRID_YZ
    assert found["kMinSparseBlock"] == limits.CUDA_MIN_SPARSE_BLOCK
    assert found["kMaxHeadDim"] == limits.CUDA_MAX_HEAD_DIM


def test_kernels_and_backends_read_limits():
    assert flash_attn.MAX_HEAD_DIM == TritonBackend.max_head_dim_v == limits.TRITON_MAX_HEAD_DIM_V
    assert flash_attn.MAX_HEAD_DIM_QK == TritonBackend.max_head_dim_qk == limits.TRITON_MAX_HEAD_DIM_QK
    assert max(flash_attn.HEAD_DIM_CLASSES) == limits.TRITON_MAX_HEAD_DIM_QK  # a config class for every dim
    assert flash_attn.MAX_POOL_STRIDE == TritonBackend.max_pool_stride == limits.TRITON_MAX_POOL_STRIDE
    assert flash_attn.MIN_BLOCK_D == limits.MIN_DOT_SIZE
    assert block_attn_map.MIN_BLOCK == cluster_blocks.MIN_BLOCK == block_mask.MIN_BLOCK_SIZE == limits.MIN_BLOCK_SIZE
    assert TritonBackend.max_grid_yz == CudaBackend.max_grid_yz == limits.MAX_GRID_YZ
    assert CudaBackend.max_head_dim == limits.CUDA_MAX_HEAD_DIM
    assert CudaBackend.min_sparse_block == limits.CUDA_MIN_SPARSE_BLOCK


def _call(device="cuda", **kw):
    base = dict(device=torch.device(device), dtype=torch.float16, head_dim_qk=64, head_dim_v=64, Tq=128, Tk=128,
                dropout=False)
    return AttentionCall(**{**base, **kw})


def test_call_fields():
    assert not _call().sparse and _call(block_size=(64, 64)).sparse and _call().mask == "none"
    with pytest.raises(ValueError, match="mask must be one of"):
        _call(mask="float")


def test_limits_are_reasons():
    cuda, triton = BACKENDS["cuda"], BACKENDS["triton"]
    small = "; ".join(cuda.not_supported_reasons(_call(block_size=(16, 64))))
    assert "the CUDA block-sparse kernels need block sizes >= 64, the mask has 16 x 64" in small
    assert "block sizes" not in "; ".join(cuda.not_supported_reasons(_call(block_size=(64, 128))))
    assert "more than 128" in "; ".join(cuda.not_supported_reasons(_call(head_dim_qk=160)))
    for backend in (cuda, triton):
        assert "must each be <= 65535" in "; ".join(backend.not_supported_reasons(_call(batch=limits.MAX_GRID_YZ + 1)))
    pool = QueryPool(stride=limits.TRITON_MAX_POOL_STRIDE + 1, mode="mean", separate_cls=False, truncate=True)
    assert "pooling stride 17 is more than 16" in "; ".join(triton.not_supported_reasons(_call(pool=pool)))
    long = _call(dropout=True, Tq=limits.DROPOUT_MAX_LEN + 1)
    assert "32-bit Philox" in "; ".join(triton.not_supported_reasons(long))


def test_auto_dispatch_skips_a_backend_a_rule_excludes(monkeypatch):
    """A backend earlier in the automatic order that declines the call (here: the CUDA kernels and a
    mask of 16 x 16 blocks) is passed over for the next one."""
    monkeypatch.setattr(backends, "AUTO_ORDER", ("cuda", "reference"))
    monkeypatch.setattr(CudaBackend, "_extension_reasons", lambda self, build: [])
    monkeypatch.setattr(CudaBackend, "_device_reasons", lambda self: [])
    assert backends.select_backend(_call(block_size=(16, 16))).name == "reference"
    assert backends.select_backend(_call(block_size=(64, 64))).name == "cuda"


def test_public_functions_say_what_the_rules_need(monkeypatch):
    seen = []

    def spy(call, backend=None):
        seen.append(call)
        return BACKENDS["reference"]

    monkeypatch.setattr(_op, "select_backend", spy)
    q = torch.randn(1, 2, 40, 16)
    effattn.sparse_attention(q, q, q, BlockMask.causal(40, 40, block_size=(16, 32)),
                             key_padding_mask=torch.ones(1, 40, dtype=torch.bool))
    effattn.scaled_dot_product_attention(q, q, q, attn_mask=torch.zeros(40, 40))
    effattn.flash_attention(q, q, q)
    effattn.pooled_attention(q, q, q, stride=4)
    sparse, sdpa, flash, pooled = seen
    assert sparse.block_size == (16, 32) and sparse.sparse and sparse.mask == "bool"
    assert sdpa.mask == "additive" and not sdpa.sparse
    assert flash.mask == "none" and flash.block_size is None
    assert pooled.pool.stride == 4 and pooled.Tq == 10
