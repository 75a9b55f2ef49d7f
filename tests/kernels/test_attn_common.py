"""The shared device helpers of the attention kernels (kernels/_attn_common.py), on their own: the online
softmax carried over two key tiles equals a one-shot softmax, empty rows give O = 0 and lse = -inf, and
the tile loads and stores keep to the matrix's bounds."""

import math

import pytest
import torch
import triton
import triton.language as tl

from effattn.kernels._attn_common import (
    LN2,
    LOG2E,
    _dot,
    _load_row_stats,
    _load_tile,
    _online_softmax,
    _scores_log2,
    _softmax_epilogue,
    _store_tile,
)

BLOCK = 16  # tl.dot's smallest tile


@triton.jit
def _two_tile_attention_kernel(Q, K, V, VIS, O, LSE, M, N, D: tl.constexpr, qk_scale,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """softmax(scale·Q K^T, masked by VIS) V over keys ``[0, 2·BLOCK_N)``, one key tile at a time."""
    rows = tl.arange(0, BLOCK_M)
    q = _load_tile(Q, 0, D, 1, M, D, BLOCK_M, BLOCK_D, False)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for j in tl.static_range(2):
        kT = _load_tile(K, j * BLOCK_N, D, 1, N, D, BLOCK_N, BLOCK_D, True)
        v = _load_tile(V, j * BLOCK_N, D, 1, N, D, BLOCK_N, BLOCK_D, False)
        cols = j * BLOCK_N + tl.arange(0, BLOCK_N)
        vis = tl.load(VIS + rows[:, None] * N + cols[None, :], mask=(rows[:, None] < M) & (cols[None, :] < N),
                      other=0)
        s = tl.where(vis != 0, _scores_log2(q, kT, qk_scale, False, "ieee"), float("-inf"))
        p, m_i, l_i, acc = _online_softmax(s, m_i, l_i, acc)
        acc = _dot(p, v, acc, False, "ieee")
    out, lse = _softmax_epilogue(acc, l_i, m_i)
    _store_tile(O, 0, D, 1, out, M, D, BLOCK_M, BLOCK_D)
    tl.store(LSE + rows, lse, mask=rows < M)


def test_constants():
    assert LOG2E == math.log2(math.e)
    assert LN2 == math.log(2.0)
    assert LOG2E * LN2 == pytest.approx(1.0, abs=1e-15)


@pytest.mark.parametrize("M,N,D", [(16, 32, 16), (13, 27, 12)])
def test_online_softmax_over_two_tiles_is_one_softmax(device, M, N, D):
    q, k, v = (torch.randn(n, D, device=device) for n in (M, N, N))
    vis = torch.rand(M, N, device=device) < 0.7
    vis[0, :BLOCK] = False  # no visible key in the first tile: m stays -inf, then the second tile starts it
    vis[0, BLOCK] = True
    vis[1] = False  # no visible key at all: an empty row
    vis[2, BLOCK:] = False  # visible keys in the first tile only
    vis[2, 0] = True
    scale = D ** -0.5
    out = torch.full((M, D), float("nan"), device=device)
    lse = torch.full((M,), float("nan"), device=device)
    _two_tile_attention_kernel[(1,)](q, k, v, vis.to(torch.uint8), out, lse, M, N, D, scale * LOG2E,
                                     BLOCK_M=BLOCK, BLOCK_N=BLOCK, BLOCK_D=BLOCK, num_warps=4)

    s = (q.double() @ k.double().T * scale).masked_fill(~vis, float("-inf"))
    ref_lse = torch.logsumexp(s, dim=-1)
    ref_out = torch.nan_to_num(torch.softmax(s, dim=-1)) @ v.double()
    assert torch.isneginf(lse[1]) and torch.equal(out[1], torch.zeros_like(out[1]))
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)


@triton.jit
def _row_stats_kernel(LSE, DELTA, LSE2_OUT, DELTA_OUT, Tq, BLOCK_M: tl.constexpr):
    offs = tl.arange(0, BLOCK_M)
    lse2, delta = _load_row_stats(LSE, DELTA, 0, offs, Tq)
    tl.store(LSE2_OUT + offs, lse2)
    tl.store(DELTA_OUT + offs, delta)


def test_row_stats_make_empty_and_missing_rows_invisible(device):
    Tq = 11
    lse = torch.randn(BLOCK, device=device)
    lse[3] = float("-inf")  # an empty row of the forward
    delta = torch.randn(BLOCK, device=device)
    lse2 = torch.full((BLOCK,), float("nan"), device=device)
    delta_out = torch.full((BLOCK,), float("nan"), device=device)
    _row_stats_kernel[(1,)](lse, delta, lse2, delta_out, Tq, BLOCK_M=BLOCK)
    want = lse * LOG2E
    want[3] = float("inf")
    want[Tq:] = float("inf")
    torch.testing.assert_close(lse2, want)
    torch.testing.assert_close(delta_out, torch.where(torch.arange(BLOCK, device=device) < Tq, delta, 0.0))
