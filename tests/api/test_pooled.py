"""Pool-query-only strided attention (Funnel): every backend vs the float64 reference (the ``backend``
fixture, tests/conftest.py), and the reference vs an independent, loop-by-loop implementation of
Funnel's pooling and masking."""

from __future__ import annotations

import math

import pytest
import torch

import effattn
from effattn.reference import QueryPool, pool_queries, pool_queries_backward
from effattn.testing import DTYPES, TOLERANCES, assert_close
from tests.helpers import compare_with_reference, make_qkv

MODES = ["mean", "max"]
CLS_TRUNC = [(False, True), (True, True), (True, False)]  # truncate only matters with separate_cls


# ----------------------------------------------------------------------------------------------
# an independent implementation: windows listed one by one, the full score matrix, autograd
# ----------------------------------------------------------------------------------------------
def _windows(T, stride, separate_cls, truncate):
    """Funnel's pooling windows as lists of unpooled row indices, written out from the definition."""
    rows = list(range(T))
    if separate_cls and T > 0:
        rows = [0] + (rows[:-1] if truncate else rows)
    return [rows[i:i + stride] for i in range(0, len(rows), stride)]


def _naive_pooled(q, k, v, *, stride, pool, separate_cls, truncate, causal, key_padding_mask=None, scale=None):
    B, H, T, D = q.shape
    wins = _windows(T, stride, separate_cls, truncate)
    pooled = []
    for w in wins:
        x = q[:, :, w]
        pooled.append(x.mean(2) if pool == "mean" else x.max(2).values)
    qp = torch.stack(pooled, 2)
    G = H // k.shape[1]
    kk, vv = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    s = qp @ kk.transpose(-1, -2) * (scale or 1 / math.sqrt(D))
    keep = torch.ones(B, 1, len(wins), T, dtype=torch.bool)
    if causal:
        # position of a pooled row = its first token (the [cls] row's window is [0, 0]: token 0)
        first = torch.tensor([w[0] for w in wins])
        keep = keep & (torch.arange(T)[None, :] <= first[:, None])
    if key_padding_mask is not None:
        keep = keep & key_padding_mask[:, None, None, :]
    s = s.masked_fill(~keep, float("-inf"))
    empty = (~keep).all(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0)
    return p @ vv


@pytest.mark.parametrize("separate_cls,truncate", CLS_TRUNC)
@pytest.mark.parametrize("pool", MODES)
@pytest.mark.parametrize("T", [1, 2, 7, 18])
def test_reference_matches_loop_implementation(separate_cls, truncate, pool, T):
    q, k, v = make_qkv(B=2, Hq=2, Tq=T, D=8, dtype=torch.float64)
    kpm = torch.rand(2, T) > 0.3
    kpm[:, 0] = True
    kw = dict(stride=2, pool=pool, separate_cls=separate_cls, truncate=truncate, causal=T % 2 == 1,
              key_padding_mask=kpm)
    out = effattn.pooled_attention(q, k, v, backend="reference", **kw)
    ref = _naive_pooled(q, k, v, **kw)
    assert_close(out, ref, torch.float64, "fwd", "out")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad((out * dout).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * dout).sum(), (q, k, v))
    for name, g, rg in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(g, rg, torch.float64, "grad", name)


@pytest.mark.parametrize("separate_cls,truncate", CLS_TRUNC)
@pytest.mark.parametrize("pool", MODES)
@pytest.mark.parametrize("stride", [1, 2, 3])
def test_pool_backward_matches_autograd(separate_cls, truncate, pool, stride):
    x = torch.randn(2, 3, 11, 5, dtype=torch.float64, requires_grad=True)
    qp = QueryPool(stride, pool, separate_cls, truncate)
    y = pool_queries(x, qp)
    assert y.shape[2] == qp.pooled_len(11) == len(_windows(11, stride, separate_cls, truncate))
    g = torch.randn_like(y)
    (expected,) = torch.autograd.grad(y, x, g)
    # float64 against float64 autograd of the same sums and maxima: tighter than any kernel tolerance
    torch.testing.assert_close(pool_queries_backward(g, x.detach(), qp), expected, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# kernels vs the float64 reference
# ----------------------------------------------------------------------------------------------
def compare_pooled(q, k, v, **kw):
    """``effattn.pooled_attention`` on ``backend`` vs the float64 reference: out, lse, dq (unpooled), dk, dv.

    Mean-pooled half-precision queries are rounded to the input dtype before the dot (as pooling in
    that dtype would be), so lse carries the inputs' rounding: the "fwd" tolerance applies to it."""
    lse_kind = "fwd" if q.dtype in (torch.float16, torch.bfloat16) else "lse"
    return compare_with_reference(q, k, v, op=effattn.pooled_attention, lse_kind=lse_kind, **kw)


@pytest.mark.parametrize("separate_cls,truncate", CLS_TRUNC)
@pytest.mark.parametrize("pool", MODES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("T", [1, 2, 17, 100])
@pytest.mark.interpreter_subset(T=[17])
@pytest.mark.interpreter_subset(T=[1, 2], causal=[False], pool=["mean"])
@pytest.mark.interpreter_subset(T=[100], separate_cls=[True], truncate=[True], causal=[True])
def test_pooled_vs_reference(backend, separate_cls, truncate, pool, causal, T):
    compare_pooled(*make_qkv(B=2, Hq=2, Tq=T, D=32, dtype=torch.float32, device=backend.device), backend=backend,
                   pool=pool, separate_cls=separate_cls, truncate=truncate, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pool", MODES)
def test_pooled_dtypes(backend, dtype, pool):
    compare_pooled(*make_qkv(B=1, Hq=2, Tq=70, D=48, dtype=dtype, device=backend.device), backend=backend, pool=pool,
                   separate_cls=True, causal=True)


@pytest.mark.parametrize("D,Dv", [(16, 16), (40, 24), (100, 100), (256, 64)])
def test_pooled_head_dims(backend, D, Dv):
    compare_pooled(*make_qkv(B=1, Hq=1, Tq=45, D=D, Dv=Dv, dtype=torch.float16, device=backend.device),
                   backend=backend, separate_cls=True)


@pytest.mark.parametrize("stride", [1, 3, 4])
@pytest.mark.parametrize("pool", MODES)
def test_pooled_strides(backend, stride, pool):
    compare_pooled(*make_qkv(B=1, Hq=2, Tq=50, D=16, dtype=torch.float32, device=backend.device), backend=backend,
                   stride=stride, pool=pool, causal=True)


def test_pooled_stride3_separate_cls(backend):
    compare_pooled(*make_qkv(B=1, Hq=2, Tq=31, D=16, dtype=torch.float32, device=backend.device), backend=backend,
                   stride=3, separate_cls=True, truncate=False, causal=True)


@pytest.mark.parametrize("T", [1, 2, 5, 64])
def test_pooled_short_half(backend, T):
    """Sequences shorter than, equal to and a multiple of the stride, in float16, max-pooled with [cls]."""
    compare_pooled(*make_qkv(B=1, Hq=2, Tq=T, D=32, dtype=torch.float16, device=backend.device), backend=backend,
                   stride=4, pool="max", separate_cls=True, causal=True)


def test_pooled_gqa_layout_padding_lse_grad(backend):
    q, k, v = make_qkv(B=2, Hq=4, Hkv=2, Tq=53, D=32, dtype=torch.float16, device=backend.device, layout="bthd")
    kpm = torch.rand(2, 53, device=backend.device) > 0.4
    kpm[1] = False  # batch 1: every key padded, so every row of it is empty
    out, lse = compare_pooled(q, k, v, backend=backend, separate_cls=True, key_padding_mask=kpm, lse_grad=True)
    assert torch.isneginf(lse[1]).all() and (out[1] == 0).all()


# With the case above: strides 2 and 3, both poolings, every ([cls], truncate), both causalities, with
# GQA, key padding and the lse gradient; head dims below, at and above 64 (the CUDA kernels pad to 64, 128).
@pytest.mark.parametrize("stride,pool,separate_cls,truncate,causal,D,Dv", [
    (3, "max", False, True, False, 16, 24), (3, "mean", True, True, True, 64, 64),
    (2, "max", True, False, False, 96, 96),
])
def test_pooled_gqa_padding_strides(backend, stride, pool, separate_cls, truncate, causal, D, Dv):
    q, k, v = make_qkv(B=2, Hq=4, Hkv=2, Tq=37, D=D, Dv=Dv, dtype=torch.float16, device=backend.device)
    kpm = torch.rand(2, 37, device=backend.device) > 0.3
    compare_pooled(q, k, v, backend=backend, stride=stride, pool=pool, separate_cls=separate_cls, truncate=truncate,
                   causal=causal, key_padding_mask=kpm, lse_grad=True)


def test_pooled_dropout_matches_reference(backend):
    compare_pooled(*make_qkv(B=1, Hq=2, Tq=40, D=16, dtype=torch.float32, device=backend.device), backend=backend,
                   separate_cls=True, dropout_p=0.3, dropout_seed=7)


def test_mean_pooling_equals_flash_on_pooled_queries(backend):
    """Mean pooling on load equals flash attention on explicitly pooled queries (same kernels otherwise)."""
    q, k, v = make_qkv(B=1, Hq=2, Tq=64, D=32, dtype=torch.float32, device=backend.device, requires_grad=False)
    out = backend.run(effattn.pooled_attention, q, k, v)
    qp = pool_queries(q, QueryPool(2, "mean"))
    expected = backend.run(effattn.flash_attention, qp, k, v)
    atol, rtol = TOLERANCES[torch.float32]["fwd"]
    torch.testing.assert_close(out, expected, atol=atol, rtol=rtol)


# ----------------------------------------------------------------------------------------------
# helpers: positions and the pooled mask, against Funnel's rules written out
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T", [1, 2, 8, 9])
@pytest.mark.parametrize("separate_cls,truncate", CLS_TRUNC)
def test_pooled_positions_follow_funnel(T, separate_cls, truncate):
    pos = torch.arange(T)
    if separate_cls:  # Funnel's stride_pool_pos, block 1
        expected = torch.cat([torch.tensor([-1]), (pos[1:-1] if truncate else pos[1:])[::2]])
    else:
        expected = pos[::2]
    got = effattn.pooled_positions(T, separate_cls=separate_cls, truncate=truncate)
    assert got.tolist() == expected.tolist()


def test_pool_key_padding_mask_is_min_pool():
    mask = torch.tensor([[1, 1, 1, 0, 1, 1, 0], [1, 0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    got = effattn.pool_key_padding_mask(mask, separate_cls=True, truncate=True)
    # windows {0}, {1,2}, {3,4}, {5}: kept iff all kept (the last token is cut by truncation)
    assert got.tolist() == [[True, True, False, True], [True, False, True, True]]
    got = effattn.pool_key_padding_mask(mask)
    assert got.tolist() == [[True, False, True, False], [False, True, True, True]]


# ----------------------------------------------------------------------------------------------
# errors and op registration
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,match", [
    (dict(stride=0), "stride"), (dict(stride=2.0), "stride"), (dict(pool="min"), "pool must be"),
    (dict(separate_cls=1), "separate_cls"), (dict(causal="yes"), "causal"),
])
def test_pooled_bad_arguments(kw, match):
    q, k, v = make_qkv(B=1, Hq=1, Tq=8, D=16)
    with pytest.raises((TypeError, ValueError), match=match):
        effattn.pooled_attention(q, k, v, **kw)


def test_pooled_length_mismatch():
    q, k, v = make_qkv(B=1, Hq=1, Tq=8, Tk=10, D=16)
    with pytest.raises(ValueError, match="same \\(unpooled\\) length"):
        effattn.pooled_attention(q, k, v)


def test_pooled_unsupported_on_triton_says_why(device):
    q, k, v = make_qkv(B=1, Hq=1, Tq=8, D=16, dtype=torch.float32, device=device)
    with pytest.raises(effattn.UnsupportedInputError, match="separate_cls with stride 1"):
        effattn.pooled_attention(q, k, v, stride=1, separate_cls=True, backend="triton")
    with pytest.raises(effattn.UnsupportedInputError, match="stride 17"):
        effattn.pooled_attention(q, k, v, stride=17, backend="triton")


def test_pooled_opcheck():
    q, k, v = make_qkv(B=1, Hq=2, Tq=9, D=8, dtype=torch.float32)
    args = (q, k, v, None, 0.3, -1, 0, 2, "mean", True, True, 0.0, 0, "reference")
    torch.library.opcheck(torch.ops.effattn.pooled_attention_fwd.default, args)
