"""The SeerAttention-style block gate: the block-pooled attention-map kernel, the gate, and the metrics."""

import math

import pytest
import torch

import effattn
from effattn.block_mask import FULL, NONE, PARTIAL, BlockMask
from effattn.kernels import block_attn_map as bam
from effattn.sparsity.gate import BlockGate, attention_block_map
from effattn.sparsity.metrics import attention_recall, block_sparsity, exact_row_recall, row_recall


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Small tensors: one CPU thread (the kernel outputs are NaN-poisoned by tests/conftest.py)."""


# The block map is a kernel output without a row in effattn.testing.TOLERANCES (attention out, lse and
# gradients): its float32 and bfloat16 tolerances against the float64 map are the literals below; 1e-12
# marks float64 against float64 (the reference against the dense construction, chunked against whole).


# ----------------------------------------------------------------------------------------------
# helpers: dense computations (small sizes only)
# ----------------------------------------------------------------------------------------------
def _dense_probs(q, k, scale, causal):
    Tq, Tk = q.shape[2], k.shape[2]
    kk = k.double().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = q.double() @ kk.transpose(-1, -2) * scale
    if causal:
        s = s.masked_fill(torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).triu(Tk - Tq + 1), float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.nan_to_num(torch.softmax(s, -1), nan=0.0)
    return p, lse


def _dense_block_maps(p, block_size):
    bq, bk = (block_size, block_size) if isinstance(block_size, int) else block_size
    B, H, Tq, Tk = p.shape
    nq, nk = -(-Tq // bq), -(-Tk // bk)
    mx = torch.zeros(B, H, nq, nk, dtype=p.dtype)
    sm = torch.zeros_like(mx)
    for m in range(nq):
        for n in range(nk):
            tile = p[:, :, m * bq:(m + 1) * bq, n * bk:(n + 1) * bk]
            mx[:, :, m, n] = tile.amax(dim=(-1, -2))
            sm[:, :, m, n] = tile.sum(dim=(-1, -2))
    return mx, sm


# ----------------------------------------------------------------------------------------------
# the kernel
# ----------------------------------------------------------------------------------------------
KERNEL_CASES = [  # B, Hq, Hkv, Tq, Tk, D, block_size, causal
    (2, 4, 2, 100, 70, 16, (16, 32), True),
    (2, 4, 2, 100, 70, 16, (16, 32), False),
    (1, 2, 1, 17, 100, 8, 16, False),
    (1, 2, 1, 17, 100, 8, 16, True),
    (1, 1, 1, 1, 1, 32, 16, True),
    (1, 1, 1, 1, 17, 40, 16, False),
    (1, 2, 2, 70, 17, 24, (32, 16), True),  # Tq > Tk causal: the first 53 queries see no key
    (2, 3, 1, 64, 64, 16, 32, True),
]


@pytest.mark.parametrize("B,Hq,Hkv,Tq,Tk,D,block_size,causal", KERNEL_CASES)
def test_kernel_matches_reference_and_dense(B, Hq, Hkv, Tq, Tk, D, block_size, causal, device):
    q, k = torch.randn(B, Hq, Tq, D, device=device), torch.randn(B, Hkv, Tk, D, device=device)
    scale = 1.0 / math.sqrt(D)
    p, lse = _dense_probs(q, k, scale, causal)
    dense_max, dense_sum = _dense_block_maps(p.cpu(), block_size)
    ref_max, ref_sum = bam.block_attn_map_reference(q.double(), k.double(), scale=scale, block_size=block_size,
                                                    causal=causal, return_sum=True)
    torch.testing.assert_close(ref_max.cpu(), dense_max, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ref_sum.cpu(), dense_sum, rtol=1e-12, atol=1e-12)
    out_max, out_sum = bam.block_attn_map(q, k, lse.float(), scale=scale, block_size=block_size, causal=causal,
                                          return_sum=True)
    assert out_max.dtype == torch.float32 and out_max.shape == dense_max.shape
    assert not out_max.isnan().any() and not out_sum.isnan().any()
    torch.testing.assert_close(out_max.double().cpu(), dense_max, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out_sum.double().cpu(), dense_sum, rtol=1e-4, atol=1e-5)
    only_max = bam.block_attn_map(q, k, lse.float(), scale=scale, block_size=block_size, causal=causal)
    torch.testing.assert_close(only_max, out_max)


def test_kernel_block_sums_add_up_and_strided_inputs(device):
    B, H, T, D = 2, 2, 50, 16
    q = torch.randn(B, T, H, D, device=device).transpose(1, 2)  # (B, H, T, D) view with (B, T, H, D) strides
    k = torch.randn(B, T, H, D, device=device).transpose(1, 2)
    p, lse = _dense_probs(q, k, 0.3, True)
    out_max, out_sum = bam.block_attn_map(q, k, lse.float(), scale=0.3, block_size=16, causal=True, return_sum=True)
    torch.testing.assert_close(out_max.double().cpu(), _dense_block_maps(p.cpu(), 16)[0], rtol=1e-4, atol=1e-5)
    rows_per_block = torch.tensor([16.0, 16.0, 16.0, 2.0], dtype=torch.float64)
    torch.testing.assert_close(out_sum.double().cpu().sum(-1), rows_per_block.expand(B, H, 4), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_kernel_with_flash_lse(causal, device):
    """The lse of effattn.flash_attention (same bottom-right causal alignment) drives the kernel."""
    q, k, v = (torch.randn(1, h, t, 16, device=device) for h, t in ((4, 40), (2, 33), (2, 33)))
    _, lse = effattn.flash_attention(q, k, v, causal=causal, return_lse=True)
    out = bam.block_attn_map(q, k, lse, scale=0.25, block_size=16, causal=causal)
    expect = bam.block_attn_map_reference(q.double(), k.double(), scale=0.25, block_size=16, causal=causal)
    torch.testing.assert_close(out.double(), expect, rtol=1e-4, atol=1e-5)
    auto = attention_block_map(q, k, block_size=16, causal=causal, use_kernel=True)  # lse by the Triton flash
    torch.testing.assert_close(auto.double(), expect, rtol=1e-4, atol=1e-5)


def test_kernel_bfloat16(device):
    q, k = torch.randn(1, 2, 33, 16, device=device), torch.randn(1, 2, 40, 16, device=device)
    _, lse = _dense_probs(q.bfloat16(), k.bfloat16(), 0.25, False)
    out = bam.block_attn_map(q.bfloat16(), k.bfloat16(), lse.float(), scale=0.25, block_size=16)
    expect = bam.block_attn_map_reference(q.bfloat16().double(), k.bfloat16().double(), scale=0.25, block_size=16)
    torch.testing.assert_close(out.double(), expect, rtol=1e-3, atol=1e-4)


def test_reference_chunks(monkeypatch):
    """Many small chunks give the same maps as one."""
    q, k = torch.randn(2, 2, 100, 8, dtype=torch.float64), torch.randn(2, 1, 77, 8, dtype=torch.float64)
    whole = bam.block_attn_map_reference(q, k, block_size=16, causal=True, return_sum=True)
    monkeypatch.setattr(bam, "REFERENCE_CHUNK_ELEMENTS", 1)
    chunked = bam.block_attn_map_reference(q, k, block_size=16, causal=True, return_sum=True)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_kernel_bad_inputs():
    q, k, lse = torch.randn(1, 2, 20, 16), torch.randn(1, 2, 20, 16), torch.zeros(1, 2, 20)
    with pytest.raises(TypeError, match="float64"):
        bam.block_attn_map(q.double(), k.double(), lse, scale=1.0, block_size=16)
    with pytest.raises(ValueError, match="block_size"):
        bam.block_attn_map(q, k, lse, scale=1.0, block_size=24)
    with pytest.raises(ValueError, match="block_size"):
        bam.block_attn_map(q, k, lse, scale=1.0, block_size=(16, 8))
    with pytest.raises(ValueError, match="lse"):
        bam.block_attn_map(q, k, lse[:, :, :5], scale=1.0, block_size=16)
    with pytest.raises(ValueError, match="multiple"):
        bam.block_attn_map(torch.randn(1, 3, 20, 16), k, torch.zeros(1, 3, 20), scale=1.0, block_size=16)
    with pytest.raises(ValueError, match="4-D"):
        bam.block_attn_map_reference(q[0], k, block_size=16)


# ----------------------------------------------------------------------------------------------
# the gate
# ----------------------------------------------------------------------------------------------
def test_gate_scores_shapes_gqa_and_ragged():
    gate = BlockGate(4, 16, gate_dim=8, block_size=(16, 32), k_pooling=("max", "mean"))
    q, k = torch.randn(2, 4, 50, 16), torch.randn(2, 2, 70, 16)
    s = gate.scores(q, k)
    assert s.shape == (2, 4, 4, 3) and s.dtype == torch.float32 and torch.isfinite(s).all()
    assert gate.k_weight.shape == (4, 32, 8)
    # GQA equals the same keys repeated per query head
    torch.testing.assert_close(s, gate(q, k.repeat_interleave(2, dim=1)))
    # ragged last blocks pool only their existing rows: padding the sequence changes nothing before it
    q_pad = torch.cat([q, torch.randn(2, 4, 14, 16)], dim=2)
    torch.testing.assert_close(gate.scores(q_pad, k)[:, :, :3], s[:, :, :3])


@pytest.mark.parametrize("Tq,Tk,causal", [(100, 100, False), (100, 100, True), (40, 100, True), (100, 40, True),
                                          (1, 17, True), (17, 1, False)])
def test_predict_top_k(Tq, Tk, causal):
    gate = BlockGate(2, 8, gate_dim=8, block_size=16)
    q, k = torch.randn(2, 2, Tq, 8), torch.randn(2, 2, Tk, 8)
    top_k = 3
    bm = gate.predict(q, k, top_k=top_k, causal=causal)
    bm.check()
    kinds = bm.block_kinds()
    nq, nk = -(-Tq // 16), -(-Tk // 16)
    assert kinds.shape == (2, 2, nq, nk)
    kept = (kinds != NONE).sum(-1)
    if not causal:
        assert (kept == min(top_k, nk)).all() and not (kinds == PARTIAL).any()
        return
    allowed = BlockMask.causal(Tq, Tk, 16).block_kinds()[0, 0]
    n_allowed = (allowed != NONE).sum(-1)
    assert (kept == n_allowed.clamp_max(top_k)).all()
    # kept blocks are the causal ones, with their causal kind (PARTIAL on the diagonal)
    assert ((kinds == NONE) | (kinds == allowed)).all()
    assert (bm.to_dense() <= BlockMask.causal(Tq, Tk, 16).to_dense()).all()
    # the diagonal (last visible) block of every q block that sees any key is kept
    for m in range(nq):
        if n_allowed[m] > 0:
            assert (kinds[:, :, m, n_allowed[m] - 1] != NONE).all()
    if (kinds == PARTIAL).any():
        assert bm.rule.window_right == 0 and bm.rule.diag_offset == Tk - Tq


def test_predict_threshold_and_top_k_order():
    gate = BlockGate(1, 8, gate_dim=8, block_size=16)
    q, k = torch.randn(1, 1, 64, 8), torch.randn(1, 1, 128, 8)
    s = gate.scores(q, k)
    probs = torch.softmax(s, -1)
    bm = gate.predict(q, k, threshold=0.15, keep_diagonal=False)
    assert torch.equal(bm.block_kinds() == FULL, probs >= 0.15)
    bm = gate.predict(q, k, threshold=1.0, keep_diagonal=True)  # only the diagonal blocks
    diag = (torch.arange(4) + 1) * 16 - 1 + 64
    assert torch.equal((bm.block_kinds()[0, 0] != NONE).nonzero()[:, 1], diag // 16)
    bm = gate.predict(q, k, top_k=2, keep_diagonal=False)
    assert torch.equal(bm.block_kinds() != NONE, torch.zeros_like(s, dtype=torch.bool).scatter_(
        -1, s.topk(2, -1).indices, True))


def test_loss_is_the_kl_divergence():
    gate = BlockGate(2, 8, gate_dim=8, block_size=16)
    q, k = torch.randn(1, 2, 70, 8), torch.randn(1, 2, 40, 8)
    target = attention_block_map(q, k, block_size=16, causal=True)
    loss = gate.loss(q, k, target, causal=True)
    logp = gate.log_probs(q, k, causal=True)
    t = target / target.sum(-1, keepdim=True)
    rows = target.sum(-1) > 0
    assert not rows.all()  # Tq > Tk: the first q blocks see no key and are left out
    kl = torch.where(t > 0, t * (t.log() - logp), 0.0).sum(-1)[rows].mean()
    torch.testing.assert_close(loss, kl)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in gate.parameters())
    with torch.no_grad():
        assert float(gate.loss(q, k, torch.softmax(logp, -1).nan_to_num(0.0), causal=True)) < 1e-5


def _planted(B, H, T, D, block, causal, strength=3.0, noise=0.3):
    """q / k where every query block attends to one kv block: keys of kv block n carry a signature
    u_n, queries of q block m carry strength * u_{pi(m)} (pi(m) <= m when causal)."""
    nb = T // block
    u = torch.randn(B, H, nb, D)
    u = u / u.norm(dim=-1, keepdim=True) * math.sqrt(D)
    k = u.repeat_interleave(block, 2) + noise * torch.randn(B, H, T, D)
    if causal:
        target = (torch.rand(B, H, nb) * (torch.arange(nb) + 1)).long()  # uniform in [0, m]
    else:
        target = torch.stack([torch.stack([torch.randperm(nb) for _ in range(H)]) for _ in range(B)])
    sig = torch.gather(u, 2, target[..., None].expand(-1, -1, -1, D))
    q = strength * sig.repeat_interleave(block, 2) + noise * torch.randn(B, H, T, D)
    return q, k


@pytest.mark.parametrize("causal", [False, True])
def test_fit_planted_blocks(causal):
    B, H, T, D, block = 4, 2, 256, 16, 16
    train = [_planted(B, H, T, D, block, causal) for _ in range(8)]  # enough rows for the gate not to overfit
    gate = BlockGate(H, D, gate_dim=16, block_size=block)
    losses = gate.fit([b[0] for b in train], [b[1] for b in train], steps=150, lr=3e-2, causal=causal)
    assert len(losses) == 150 and losses[-1] < 0.2 * losses[0]
    q, k = _planted(B, H, T, D, block, causal)  # unseen data
    bm = gate.predict(q, k, top_k=2, causal=causal, keep_diagonal=causal)
    bm.check()
    sparsity = block_sparsity(bm, causal=causal)
    recall = attention_recall(q, k, bm, causal=causal)
    assert sparsity >= 0.75, sparsity
    assert recall >= 0.9, recall


# ----------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("Tq,Tk,causal", [(50, 50, False), (50, 70, True), (70, 40, True), (1, 17, False)])
def test_metrics_match_dense(Tq, Tk, causal, monkeypatch):
    import effattn.sparsity.metrics as metrics

    monkeypatch.setattr(metrics, "CHUNK_ELEMENTS", 300)  # several row chunks
    q, k = torch.randn(2, 4, Tq, 8, dtype=torch.float64), torch.randn(2, 2, Tk, 8, dtype=torch.float64)
    blocks = torch.rand(2, 1, -(-Tq // 16), -(-Tk // 16)) < 0.5  # H = 1: broadcast over heads
    bm = BlockMask.from_dense_blocks(blocks, Tq, Tk, 16)
    if causal:
        bm = bm & BlockMask.causal(Tq, Tk, 16)
    p, _ = _dense_probs(q, k, 0.4, causal)
    rec = (p * bm.to_dense()).sum(-1)
    seen = p.sum(-1) > 0
    got = row_recall(q, k, bm, scale=0.4, causal=causal)
    assert torch.equal(got.isnan(), ~seen)
    torch.testing.assert_close(got[seen], rec[seen], rtol=1e-12, atol=1e-12)
    assert attention_recall(q, k, bm, scale=0.4, causal=causal) == pytest.approx(float(rec[seen].mean()), abs=1e-12)
    assert exact_row_recall(q, k, bm, scale=0.4, causal=causal, eps=1e-3) == pytest.approx(
        float((rec[seen] >= 1 - 1e-3).double().mean()), abs=1e-12)
    assert block_sparsity(bm) == pytest.approx(1 - float((bm.block_kinds() != NONE).double().mean()))
    full = BlockMask.from_dense_blocks(torch.ones(1, 1, -(-Tq // 16), -(-Tk // 16), dtype=torch.bool), Tq, Tk, 16)
    assert attention_recall(q, k, full, causal=causal) == pytest.approx(1.0)
    assert block_sparsity(BlockMask.causal(Tq, Tk, 16), causal=True) == 0.0


def test_bad_inputs():
    with pytest.raises(ValueError, match="k_pooling"):
        BlockGate(2, 8, k_pooling=("median",))
    with pytest.raises(ValueError, match="n_heads"):
        BlockGate(0, 8)
    with pytest.raises(ValueError, match="block_size"):
        BlockGate(2, 8, block_size=(16, 12))
    gate = BlockGate(2, 8, block_size=16)
    q, k = torch.randn(1, 2, 32, 8), torch.randn(1, 2, 32, 8)
    with pytest.raises(ValueError, match="exactly one"):
        gate.predict(q, k)
    with pytest.raises(ValueError, match="exactly one"):
        gate.predict(q, k, top_k=1, threshold=0.1)
    with pytest.raises(ValueError, match="top_k"):
        gate.predict(q, k, top_k=0)
    with pytest.raises(ValueError, match="threshold"):
        gate.predict(q, k, threshold=1.5)
    with pytest.raises(ValueError, match="heads"):
        gate.scores(torch.randn(1, 3, 32, 8), k)
    with pytest.raises(ValueError, match="heads"):
        gate.scores(q, torch.randn(1, 3, 32, 8))
    with pytest.raises(ValueError, match="target_map"):
        gate.loss(q, k, torch.zeros(1, 2, 3, 3))
    with pytest.raises(ValueError, match="q batches"):
        gate.fit([q], [], steps=1)
    bm = BlockMask.causal(32, 32, 16)
    with pytest.raises(TypeError, match="BlockMask"):
        attention_recall(q, k, "mask")
    with pytest.raises(ValueError, match="q_len"):
        attention_recall(q[:, :, :20], k, bm)
    with pytest.raises(ValueError, match="eps"):
        exact_row_recall(q, k, bm, eps=1.0)
