"""SparseFinder (effattn.sparsity.sparsefinder): projections, the gold graph, the hinge loss, clusters ->
block mask against a dense construction, planted-structure recall / sparsity, window and global union,
argument errors. CPU, small sizes."""

import pytest
import torch

from effattn.block_mask import FULL, NONE, BlockMask
from effattn.sparsity.sparsefinder import SparseFinder, gold_positives


def planted(B=1, H=2, T=256, D=16, K=8, noise=0.2, seed=0):
    """Tokens in K contiguous groups; queries and keys of a group sit near the group's centre."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(H, K, D, generator=g)
    centers = centers / centers.norm(dim=-1, keepdim=True) * 2
    base = centers[:, torch.arange(T) * K // T]
    q = base + noise * torch.randn(B, H, T, D, generator=g)
    k = base + noise * torch.randn(B, H, T, D, generator=g)
    return q, k


def recall(q, k, bm, scale):
    """Mean share of each query's softmax mass inside the mask (dense, small sizes)."""
    p = torch.softmax(scale * q @ k.transpose(-1, -2), dim=-1)
    return float((p * bm.to_dense()).sum(-1).mean())


def dense_blocks(mq, mk, bq, bk):
    """Oracle: token graph 'share a cluster' over (i, j), pooled to blocks with any()."""
    conn = (mq.float() @ mk.float().transpose(-1, -2)) > 0  # (B, H, Tq, Tk)
    B, H, Tq, Tk = conn.shape
    nq, nk = -(-Tq // bq), -(-Tk // bk)
    out = torch.zeros(B, H, nq, nk, dtype=torch.bool)
    for m in range(nq):
        for n in range(nk):
            out[:, :, m, n] = conn[:, :, m * bq:(m + 1) * bq, n * bk:(n + 1) * bk].flatten(2).any(-1)
    return out


def test_project_shapes_and_gqa():
    sf = SparseFinder(4, 8, rank=3, n_clusters=5, top_c=2)
    assert sf.W_q.shape == sf.W_k.shape == (4, 8, 3)
    q, k = torch.randn(2, 4, 7, 8), torch.randn(2, 4, 11, 8)
    qp, kp = sf.project(q, k)
    assert qp.shape == (2, 4, 7, 3) and kp.shape == (2, 4, 11, 3)
    torch.testing.assert_close(qp[1, 2], q[1, 2] @ sf.W_q[2])
    _, kp2 = sf.project(q, k[:, ::2])  # GQA: 2 kv heads for 4 query heads
    torch.testing.assert_close(kp2[:, 1], k[:, 0] @ sf.W_k[1])


@pytest.mark.parametrize("mass", [0.5, 0.9, 1.0])
def test_gold_positives_mass_and_minimal(mass):
    g = torch.Generator().manual_seed(0)
    q, k = 2 * torch.randn(2, 3, 20, 8, generator=g), torch.randn(2, 3, 30, 8, generator=g)
    pos = gold_positives(q, k, mass=mass, chunk=7)  # several chunks, one ragged
    assert torch.equal(pos, gold_positives(q, k, mass=mass))
    p = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, dim=-1).double()
    held = (p * pos).sum(-1)
    assert bool((held >= mass - 1e-5).all())
    # minimal: dropping the smallest positive falls below the share; positives are the top keys
    smallest = p.masked_fill(~pos, 2.0).amin(-1)
    assert bool((held - smallest < mass - 1e-7).all()) or mass == 1.0
    largest_neg = p.masked_fill(pos, -1.0).amax(-1)
    assert bool((largest_neg <= smallest).all())


def test_loss_decreases():
    q, k = planted(T=128, K=4, seed=3)
    sf = SparseFinder(2, 16, rank=4, n_clusters=4, seed=3)
    before = float(sf.loss(q, k, scale=2.0).detach())
    hist = sf.fit(q, k, steps=30, lr=0.05, scale=2.0, clusters=False)
    after = float(sf.loss(q, k, scale=2.0).detach())
    assert before > 0 and after < 0.5 * before and hist[-1] < hist[0]
    # by chunks of query rows (one ragged): a finite loss too
    assert torch.isfinite(sf.loss(q, k, scale=2.0, chunk=13))


@pytest.mark.parametrize("Tq,Tk,bs,top_c", [(64, 64, 16, 1), (100, 70, (16, 32), 2), (33, 17, 16, 3)])
def test_cluster_blocks_match_dense(Tq, Tk, bs, top_c):
    g = torch.Generator().manual_seed(Tq)
    q, k = torch.randn(2, 3, Tq, 8, generator=g), torch.randn(2, 3, Tk, 8, generator=g)
    sf = SparseFinder(3, 8, rank=2, n_clusters=6, top_c=top_c, seed=1)
    sf.fit_clusters(q, k)
    mq, mk = sf.memberships(q, k)
    # memberships: the top_c nearest centroids, recomputed independently
    qp, _ = sf.project(q, k)
    d = ((qp[..., None, :] - sf.centroids[None, :, None]) ** 2).sum(-1)
    nearest = d.argsort(-1)[..., :top_c]
    assert torch.equal(mq, torch.zeros_like(mq).scatter_(-1, nearest, True))
    assert bool((mq.sum(-1) == top_c).all() and (mk.sum(-1) == top_c).all())
    bm = sf.predict(q, k, block_size=bs)
    bm.check()
    assert bm.rule is None
    kinds = bm.block_kinds()
    assert bool(((kinds == FULL) | (kinds == NONE)).all())
    bq, bk = bm.block_size
    assert torch.equal(kinds == FULL, dense_blocks(mq, mk, bq, bk))
    # the block mask covers the token graph (over-approximation)
    conn = (mq.float() @ mk.float().transpose(-1, -2)) > 0
    assert bool((bm.to_dense() | ~conn).all())


@pytest.mark.parametrize("seed", [0, 1])
def test_planted_structure_recall_and_sparsity(seed):
    q, k = planted(T=256, K=8, seed=seed)
    sf = SparseFinder(2, 16, rank=4, n_clusters=8, top_c=1, margin=10.0, kmeans_iters=20, seed=seed)
    sf.fit(q, k, steps=40, lr=0.05, scale=2.0)
    bm = sf.predict(q, k, block_size=16)
    bm.check()
    r, s = recall(q, k, bm, 2.0), bm.sparsity()
    assert r >= 0.9 and s >= 0.6, (r, s)


def test_window_and_global_union():
    q, k = planted(B=2, T=96, K=3, seed=5)
    k = k[:, :, :80]
    sf = SparseFinder(2, 16, rank=3, n_clusters=4, seed=5)
    sf.fit_clusters(q, k)
    base = sf.predict(q, k, block_size=16).to_dense()
    i = torch.arange(96)[:, None]
    j = torch.arange(80)[None, :]
    off = 80 - 96
    for window, n_global in [(8, 0), (None, 5), ((20, 0), 3), ((None, 4), 0)]:
        bm = sf.predict(q, k, window=window, n_global=n_global, block_size=16)
        bm.check()
        vis = torch.zeros(96, 80, dtype=torch.bool)
        if window is not None:
            left, right = (window, window) if isinstance(window, int) else window
            w = torch.ones(96, 80, dtype=torch.bool)
            if left is not None:
                w &= j >= i + off - left
            if right is not None:
                w &= j <= i + off + right
            vis |= w
        vis |= (i < n_global) | (j < n_global)
        assert torch.equal(bm.to_dense(), base | vis), (window, n_global)
    # a causal decoder: intersect with the causal mask
    causal = sf.predict(q, k, window=(None, 0), block_size=16) & BlockMask.causal(96, 80, 16)
    assert not bool((causal.to_dense() & (j > i + off)).any())


def test_errors():
    with pytest.raises(ValueError, match="top_c"):
        SparseFinder(2, 8, n_clusters=3, top_c=4)
    with pytest.raises(ValueError, match="rank"):
        SparseFinder(2, 8, rank=0)
    with pytest.raises(TypeError, match="n_heads"):
        SparseFinder(2.0, 8)
    with pytest.raises(ValueError, match="mass"):
        SparseFinder(2, 8, mass=1.5)
    sf = SparseFinder(2, 8)
    q, k = torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8)
    with pytest.raises(RuntimeError, match="fit_clusters"):
        sf.predict(q, k, block_size=16)
    with pytest.raises(ValueError, match="heads"):
        sf.project(torch.randn(1, 3, 16, 8), torch.randn(1, 3, 16, 8))
    with pytest.raises(ValueError, match="head dim"):
        sf.project(torch.randn(1, 2, 16, 4), torch.randn(1, 2, 16, 4))
    with pytest.raises(ValueError, match="4-D"):
        sf.project(torch.randn(2, 16, 8), k)
    with pytest.raises(TypeError, match="floating"):
        sf.project(q.long(), k)
    with pytest.raises(ValueError, match="batch"):
        sf.project(q, torch.randn(2, 2, 16, 8))
    with pytest.raises(ValueError, match="k has 3 heads"):
        sf.project(q, torch.randn(1, 3, 16, 8))
    with pytest.raises(ValueError, match="mass"):
        gold_positives(q, k, mass=0.0)
    with pytest.raises(ValueError, match="q_batches and k_batches"):
        sf.fit([q, q], [k], steps=1)
    sf.fit_clusters(q, k)
    with pytest.raises(ValueError, match="window"):
        sf.predict(q, k, window=(1, 2, 3), block_size=16)
    with pytest.raises(ValueError, match="window"):
        sf.predict(q, k, window=-1, block_size=16)
    with pytest.raises(ValueError, match="n_global"):
        sf.predict(q, k, n_global=-1, block_size=16)
    with pytest.raises(ValueError, match="block_size"):
        sf.predict(q, k, block_size=24)
