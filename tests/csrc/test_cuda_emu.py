"""The CUDA C++ kernels (csrc/cuda) on the host emulator of the PTX primitives they use (``backend="cuda-emu"``,
csrc/emu): the CUDA backend's grid against the float64 reference, with the emulator's checks on.

Every launch runs with shared memory written by a ``cp.async`` group poisoned (NaN) until its
``wait_group``, every tensor in a guarded copy whose end touches an unmapped page (memcheck), barriers and warp
collectives checked for divergence and deadlock, and outputs NaN-poisoned beforehand
(tests/conftest.py). The grid is the one the kernels must cover: dense, pooled and block-sparse attention,
forward and backward (with the lse gradient), float16 and bfloat16, head dims 64 and 128 and padded ones,
causal (bottom-right), windows, key padding (a row that sees no key), GQA/MQA, Tq != Tk, odd lengths (below
one tile, one past a tile); then a few cases under the emulator's warp-by-warp schedules (a missing
``__syncthreads`` shows under one of them). The public functions' tests (tests/api/) also run on this
backend through the ``backend`` fixture. With a GPU, :func:`test_emulator_matches_the_device` compares the two on one
input.
"""

from __future__ import annotations

import pytest
import torch

import effattn
from effattn import BlockMask
from effattn.testing import assert_close
from tests.helpers import compare_with_reference, make_qkv

EMU = "cuda-emu"
DTYPES = [torch.float16, torch.bfloat16]
# The emulator's schedules (csrc/emu/core.h): warps in near lockstep, or one warp as far ahead (behind) of the
# others as the barriers allow, so that a missing __syncthreads shows as wrong data.
SCHEDULES = ["round_robin", "warps_ahead", "warps_behind"]


@pytest.fixture
def schedule(request):
    from effattn import _emu

    ext = _emu.load()
    ext.set_schedule(request.param)
    yield request.param
    ext.set_schedule("round_robin")

DENSE = {
    "d64": dict(shape=dict(B=1, Hq=2, Tq=64, D=64), kw=dict()),
    "d128_causal_odd": dict(shape=dict(B=1, Hq=2, Tq=129, D=128), kw=dict(causal=True)),
    "d40_padded_tq_above_tk": dict(shape=dict(B=2, Hq=2, Tq=70, Tk=33, D=40), kw=dict(causal=True)),
    "d96_dv_differs": dict(shape=dict(B=1, Hq=2, Tq=50, Tk=90, D=96, Dv=32), kw=dict()),
    "window_gqa": dict(shape=dict(B=1, Hq=4, Hkv=2, Tq=100, D=64), kw=dict(window=(16, 3))),
    "mqa_one_row": dict(shape=dict(B=2, Hq=4, Hkv=1, Tq=1, Tk=150, D=64), kw=dict()),
    "below_one_tile": dict(shape=dict(B=1, Hq=1, Tq=5, Tk=7, D=16), kw=dict(causal=True)),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(DENSE))
def test_dense(case, dtype):
    q, k, v = make_qkv(**DENSE[case]["shape"], dtype=dtype)
    compare_with_reference(q, k, v, backend=EMU, lse_grad=True, **DENSE[case]["kw"])


@pytest.mark.parametrize("dtype", DTYPES)
def test_key_padding_and_a_row_without_keys(dtype):
    """Key padding, the second batch entry padding every key: its rows give out 0, lse -inf, zero gradients."""
    q, k, v = make_qkv(B=2, Hq=2, Tq=40, Tk=90, D=64, dtype=dtype)
    kpm = torch.rand(2, 90) > 0.3
    kpm[1] = False
    out, lse = compare_with_reference(q, k, v, backend=EMU, key_padding_mask=kpm)
    assert torch.isneginf(lse[1]).all() and torch.equal(out[1], torch.zeros_like(out[1]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_and_unaligned_rows(dtype):
    """(B, T, H, D) views (the strides of a projection split into heads), and a head dim whose rows are not
    16-byte aligned (the kernels' element-wise load path)."""
    q, k, v = make_qkv(B=1, Hq=2, Tq=70, D=64, dtype=dtype, layout="bthd")
    compare_with_reference(q, k, v, backend=EMU, causal=True)
    q, k, v = make_qkv(B=1, Hq=2, Tq=33, D=36, dtype=dtype)
    compare_with_reference(q, k, v, backend=EMU)


POOLED = {
    "mean_stride2": dict(stride=2),
    "max_stride4_cls": dict(stride=4, pool="max", separate_cls=True),
    "mean_cls_no_truncate": dict(stride=2, separate_cls=True, truncate=False),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(POOLED))
def test_pooled(case, dtype):
    """Queries pooled on load; dQ carried back to the unpooled rows (odd T: a ragged last window). The pooled
    queries are rounded to the input dtype before the product, so lse has the output's tolerance."""
    q, k, v = make_qkv(B=1, Hq=2, Tq=77, D=64, dtype=dtype)
    kpm = torch.rand(1, 77) > 0.2
    compare_with_reference(q, k, v, backend=EMU, op=effattn.pooled_attention, lse_kind="fwd",
                           key_padding_mask=kpm, **POOLED[case])


def _sparse_op(block_mask):
    def op(q, k, v, *, backend, **kw):
        return effattn.sparse_attention(q, k, v, block_mask, backend=backend, **kw)
    return op


SPARSE = {
    "random_full": lambda T: BlockMask.random(T, T, 0.5, block_size=64, keep_diagonal=True),
    "causal_partial": lambda T: BlockMask.causal(T, T, block_size=64),
    "window_128x64": lambda T: BlockMask.sliding_window(T, T, 70, 10, block_size=(128, 64)),
    "segments": lambda T: BlockMask.from_segments(torch.div(torch.arange(T), 90, rounding_mode="floor")[None],
                                                  block_size=64),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(SPARSE))
def test_block_sparse(case, dtype):
    """FULL blocks without their rule, PARTIAL blocks with it (causal, window, segments), ragged last blocks."""
    T = 200
    q, k, v = make_qkv(B=1, Hq=2, Tq=T, D=64, dtype=dtype)
    compare_with_reference(q, k, v, backend=EMU, op=_sparse_op(SPARSE[case](T)), lse_grad=True)


SCHEDULED = {
    "dense_causal": lambda q, k, v: compare_with_reference(q, k, v, backend=EMU, causal=True, lse_grad=True),
    "dense_window": lambda q, k, v: compare_with_reference(q, k, v, backend=EMU, window=(16, 3)),
    "pooled": lambda q, k, v: compare_with_reference(q, k, v, backend=EMU, op=effattn.pooled_attention,
                                                     lse_kind="fwd", stride=2, separate_cls=True),
    "sparse": lambda q, k, v: compare_with_reference(q, k, v, backend=EMU, lse_grad=True,
                                                     op=_sparse_op(BlockMask.causal(q.shape[2], q.shape[2],
                                                                                    block_size=64))),
}


@pytest.mark.parametrize("schedule", SCHEDULES[1:], indirect=True)
@pytest.mark.parametrize("case", list(SCHEDULED))
def test_under_warp_schedules(case, schedule):
    """One warp as far ahead (behind) of the others as the barriers allow: every kernel's shared-memory
    hand-offs are fenced by its __syncthreads (several tiles per walk: T = 150, D = 128 and 64)."""
    q, k, v = make_qkv(B=1, Hq=2, Hkv=1, Tq=150, D=128 if case == "dense_causal" else 64, dtype=torch.float16)
    SCHEDULED[case](q, k, v)


def test_deterministic():
    q, k, v = make_qkv(B=1, Hq=2, Hkv=1, Tq=90, D=64, dtype=torch.float16)
    runs = []
    for _ in range(2):
        out = effattn.flash_attention(q, k, v, causal=True, backend=EMU)
        runs.append((out, *torch.autograd.grad(out.float().square().sum(), (q, k, v))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# the emulator's checks reach the kernels' launches
# ----------------------------------------------------------------------------------------------
def test_launches_run_on_guarded_copies():
    """Memcheck (on by default) runs each launch on guarded copies of its tensors and copies the outputs back:
    the same results as a launch on the tensors themselves (the mechanism's own tests, with out-of-bounds
    accesses, are tests/csrc/test_emu_primitives.py's memcheck scenarios)."""
    from effattn import _emu

    ext = _emu.load()
    q, k, v = make_qkv(B=2, Hq=2, Hkv=1, Tq=70, D=64, dtype=torch.float16)
    guarded = effattn.flash_attention(q, k, v, causal=True, backend=EMU)
    grads = torch.autograd.grad(guarded.float().sum(), (q, k, v))
    ext.set_memcheck(False)
    try:
        plain = effattn.flash_attention(q, k, v, causal=True, backend=EMU)
        plain_grads = torch.autograd.grad(plain.float().sum(), (q, k, v))
    finally:
        ext.set_memcheck(True)
    for a, b in zip((guarded, *grads), (plain, *plain_grads)):
        assert torch.equal(a, b)


def test_cp_async_check_can_be_switched_off():
    """With the check off the copies land at issue; the results are the same (the kernels wait correctly)."""
    from effattn import _emu

    ext = _emu.load()
    q, k, v = make_qkv(B=1, Hq=2, Tq=100, D=64, dtype=torch.bfloat16, requires_grad=False)
    checked = effattn.flash_attention(q, k, v, causal=True, backend=EMU)
    ext.set_cp_async_check(False)
    try:
        unchecked = effattn.flash_attention(q, k, v, causal=True, backend=EMU)
    finally:
        ext.set_cp_async_check(True)
    assert torch.equal(checked, unchecked)


def test_declines_what_the_cuda_backend_declines():
    q, k, v = make_qkv(B=1, Hq=2, Tq=8, D=64, dtype=torch.float32)
    with pytest.raises(effattn.UnsupportedInputError, match="dtype torch.float32 not supported"):
        effattn.flash_attention(q, k, v, backend=EMU)
    q, k, v = make_qkv(B=1, Hq=2, Tq=64, D=64, dtype=torch.float16)
    with pytest.raises(effattn.UnsupportedInputError, match="block sizes >= 64"):
        effattn.sparse_attention(q, k, v, BlockMask.causal(64, 64, block_size=16), backend=EMU)
    with pytest.raises(effattn.UnsupportedInputError, match="softcap is not implemented in the CUDA kernels"):
        effattn.flash_attention(q, k, v, softcap=2.0, backend=EMU)


def test_not_chosen_automatically():
    from effattn.backends import AUTO_ORDER
    assert EMU not in AUTO_ORDER


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the device's kernels against the emulator")
def test_emulator_matches_the_device():
    """The same kernels on the device and on the emulator: forward and gradients agree to the dtype's tolerance
    (not bitwise: the emulator accumulates mma products in double, and exp2 is the host's)."""
    q, k, v = make_qkv(B=1, Hq=4, Hkv=2, Tq=150, D=128, dtype=torch.float16)
    outs = []
    for backend, device in ((EMU, "cpu"), ("cuda", "cuda")):
        leaves = [x.detach().to(device).requires_grad_() for x in (q, k, v)]
        out = effattn.flash_attention(*leaves, causal=True, backend=backend)
        outs.append([out, *torch.autograd.grad(out.float().square().sum(), leaves)])
    for name, a, b in zip(("out", "dq", "dk", "dv"), *outs):
        assert_close(b.cpu().double(), a.double(), torch.float16, "fwd" if name == "out" else "grad", name)
