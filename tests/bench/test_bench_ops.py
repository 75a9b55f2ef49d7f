"""The benchmark harness's per-op FLOP and byte counts against independent counts.

Independent counts: ``FlopCounterMode`` on plain PyTorch implementations (naive attention on
pre-pooled queries; four ``Linear`` projections and naive attention for the Funnel layer), the
elements of a block mask expanded to a dense tensor, and the bytes of the tensors an op reads and
writes.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.cases import PRESETS, Case, expand
from bench.ops import OPS, kept_top_k, query_pool, sparse_mask
from effattn.reference import naive_attention, pool_queries

CASE = Case(batch=2, heads_q=4, heads_kv=4, seqlen_q=100, seqlen_k=100, headdim=16, dtype="fp32", causal=False,
            mode="fwd", device="cpu")


def _count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _qkv(case, requires_grad=False):
    B, H, T, D = case.batch, case.heads_q, case.seqlen_q, case.headdim
    return [torch.randn(B, H, T, D, requires_grad=requires_grad) for _ in range(3)]


def _cost(case):
    op = OPS[case.op]
    return op.cost(case, op.context(case))


@pytest.mark.parametrize("causal", [False, True])
def test_attention_cost_matches_flop_counter_and_tensor_bytes(causal):
    case = dataclasses.replace(CASE, causal=causal)
    q, k, v = _qkv(case)
    cost = _cost(case)
    counted = _count(lambda: naive_attention(q, k, v, window_right=0 if causal else -1))
    if causal:  # naive attention multiplies the whole matrix; the count is of the visible pairs
        assert cost.fwd_flops == 4 * 2 * 4 * 16 * (100 * 101 // 2)
        assert counted == 4 * 2 * 4 * 16 * 100 * 100
    else:
        assert cost.fwd_flops == counted
    out_bytes = q.nbytes  # out has q's shape; lse is float32 (B, H, T)
    assert cost.fwd_bytes == q.nbytes + k.nbytes + v.nbytes + out_bytes + 2 * 4 * 100 * 4
    assert cost.flops("fwd+bwd") == cost.fwd_flops * 7 // 2 and cost.bytes("fwd+bwd") > cost.fwd_bytes


@pytest.mark.parametrize("stride", [2, 3, 4])
def test_pooled_cost_counts_pooled_rows(stride):
    case = dataclasses.replace(CASE, op="pooled", stride=stride)
    q, k, v = _qkv(case)
    pooled = pool_queries(q, query_pool(case))
    assert pooled.shape[2] == query_pool(case).pooled_len(100)
    cost = _cost(case)
    assert cost.fwd_flops == _count(lambda: naive_attention(pooled, k, v))
    # q read at full length, the output at the pooled length
    assert cost.fwd_bytes == q.nbytes + k.nbytes + v.nbytes + pooled.nbytes + pooled[..., 0].numel() * 4


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_sparse_cost_counts_kept_elements(sparsity):
    case = dataclasses.replace(CASE, op="sparse", pattern="random", sparsity=sparsity, block=16)
    mask = sparse_mask(case)
    dense = mask.to_dense().expand(2, 4, 100, 100)  # random masks keep whole blocks: every element visible
    cost = _cost(case)
    assert cost.fwd_flops == 4 * 16 * int(dense.sum())
    assert cost.bwd_flops == 10 * 16 * int(dense.sum())
    n_kv = math.ceil(100 / 16)
    kept_per_row = max(1, round((1 - sparsity) * n_kv))
    assert int(mask.kept_blocks().sum()) == 4 * n_kv * kept_per_row


@pytest.mark.parametrize("pattern", ["causal", "sliding", "documents", "bigbird"])
def test_structured_sparse_cost_bounds_visible_pairs(pattern):
    case = dataclasses.replace(CASE, op="sparse", pattern=pattern, block=16)
    mask = sparse_mask(case)
    visible = int(mask.to_dense().expand(2, 4, 100, 100).sum())
    cost = _cost(case)
    # partial blocks count in full: at least the visible pairs, at most the kept blocks' elements
    assert 4 * 16 * visible <= cost.fwd_flops <= 4 * 16 * int(mask.kept_blocks().expand(2, 4).sum()) * 16 * 16


def test_funnel_cost_is_an_ordinary_layer():
    case = dataclasses.replace(CASE, op="funnel", stride=2)
    B, T, H, D = case.batch, case.seqlen_q, case.heads_q, case.headdim
    d = H * D
    tp = query_pool(case).pooled_len(T)
    x = torch.randn(B, T, d)
    w = [torch.randn(d, d) for _ in range(4)]
    pooled = x[:, :tp]

    def plain_layer():
        heads = lambda t: t.view(B, -1, H, D).transpose(1, 2)  # noqa: E731
        attn = naive_attention(heads(pooled @ w[0]), heads(x @ w[1]), heads(x @ w[2]))
        return attn.transpose(1, 2).reshape(B, tp, d) @ w[3]

    assert _cost(case).fwd_flops == _count(plain_layer)


def test_funnel_model_cost_is_a_plain_model_of_its_layers():
    case = dataclasses.replace(CASE, op="funnel-model", stride=2, batch=1, seqlen_q=101, seqlen_k=101)
    B, T, H, D = case.batch, case.seqlen_q, case.heads_q, case.headdim
    d, tp = H * D, query_pool(case).pooled_len(case.seqlen_q)
    w = [torch.randn(d, d) for _ in range(4)] + [torch.randn(d, 4 * d), torch.randn(4 * d, d)]
    heads = lambda t: t.view(B, -1, H, D).transpose(1, 2)  # noqa: E731

    def layer(q_in, kv_in):  # attention (queries from q_in) and the feed-forward block
        attn = naive_attention(heads(q_in @ w[0]), heads(kv_in @ w[1]), heads(kv_in @ w[2]))
        out = attn.transpose(1, 2).reshape(B, q_in.shape[1], d) @ w[3]
        return (out @ w[4]) @ w[5]

    def plain_model():  # blocks [2, 2]: the third layer pools its queries
        x = torch.randn(B, T, d)
        x = layer(layer(x, x), x)
        return layer(layer(x[:, :tp], x), x[:, :tp])

    cost = _cost(case)
    assert OPS["funnel-model"].out_len(case) == tp == 51
    assert cost.fwd_flops == _count(plain_model)
    assert cost.bwd_flops > 2 * cost.fwd_flops


def test_varlen_cost_counts_each_sequence_and_no_padding():
    case = dataclasses.replace(CASE, op="varlen", batch=3, seqlen_q=40, seqlen_k=40, causal=True)
    lengths = [40, 12, 24]  # bench.ops.VARLEN_SHARES of 40
    assert OPS["varlen"].context(case).lengths == lengths
    pairs = sum(L * (L + 1) // 2 for L in lengths)
    assert _cost(case).fwd_flops == 4 * case.heads_q * case.headdim * pairs


def test_decode_cost_is_one_row_per_head():
    case = dataclasses.replace(CASE, op="decode", seqlen_q=1, seqlen_k=300, heads_kv=2)
    assert _cost(case).fwd_flops == 4 * case.batch * case.heads_q * 300 * case.headdim


def test_predict_counts_no_flops_and_top_k():
    case = dataclasses.replace(CASE, op="predict", sparsity=0.75, block=16)
    cost = _cost(case)
    assert cost.fwd_flops == 0 and cost.fwd_bytes == 2 * 2 * 4 * 100 * 16 * 4
    assert kept_top_k(case) == round(0.25 * 7)
    assert kept_top_k(dataclasses.replace(case, sparsity=0.99)) == 1


def test_presets_expand_every_op():
    for name, sweep in PRESETS.items():
        cases = expand(sweep, "cpu")
        assert {c.op for c in cases} == set(sweep.ops).union(*(part.ops for part in sweep.parts)), name
        assert all(c.mode == "fwd" for c in cases if c.op in ("predict", "decode"))
        assert all(c.gqa == 1 for c in cases if c.op not in ("attention", "decode"))
        assert all(not c.causal for c in cases if c.op not in ("attention", "varlen"))
        assert all(c.seqlen_q == 1 for c in cases if c.op == "decode")
