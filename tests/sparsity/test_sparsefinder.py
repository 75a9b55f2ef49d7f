"""SparseFinder (effattn.sparsity.sparsefinder): projections, the gold graph, the hinge loss, clusters ->
block mask against a dense construction, planted-structure recall / sparsity, window and global union,
argument errors. CPU, small sizes."""

import pytest
import torch

from effattn.block_mask import FULL, NONE, BlockMask
from effattn.sparsity.sparsefinder import SparseFinder, gold_positives
from tests.helpers import pool_token_pairs

pytestmark = pytest.mark.usefixtures("one_thread")


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
    return pool_token_pairs((mq.float() @ mk.float().transpose(-1, -2)) > 0, bq, bk)


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


@pytest.mark.parametrize("Tq,Tk", [(20, 20), (12, 30), (30, 12)])
def test_causal_gold_positives(Tq, Tk):
    """A decoder's gold graph: the causal softmax's positives, never a key the query does not see; a row
    that sees no key (Tq > Tk) has none."""
    g = torch.Generator().manual_seed(1)
    q, k = 2 * torch.randn(2, 3, Tq, 8, generator=g), torch.randn(2, 3, Tk, 8, generator=g)
    pos = gold_positives(q, k, mass=0.8, chunk=7, causal=True)
    rows, cols = torch.arange(Tq)[:, None], torch.arange(Tk)[None, :]
    visible = cols <= rows + (Tk - Tq)
    assert not bool((pos & ~visible).any())
    s = (q @ k.transpose(-1, -2) / 8 ** 0.5).double().masked_fill(~visible, float("-inf"))
    p = torch.nan_to_num(torch.softmax(s, dim=-1), nan=0.0)
    seen = visible.any(-1)
    held = (p * pos).sum(-1)
    assert bool((held[..., seen] >= 0.8 - 1e-5).all())
    assert not bool(pos[..., ~seen, :].any())
    # the positives are the top visible keys
    smallest = p.masked_fill(~pos, 2.0).amin(-1)
    largest_neg = p.masked_fill(pos | ~visible, -1.0).amax(-1)
    assert bool((largest_neg[..., seen] <= smallest[..., seen]).all())


def test_causal_loss_by_hand():
    """Two tokens, identity projections: query 0 prefers key 1, query 1 prefers key 1. Causal, query 0 sees
    key 0 alone (no negative to draw: it does not count) and query 1's negative is key 0:
    ``relu(margin + |q1 - k1|^2 - |q1 - k0|^2)``. Bidirectional, query 0 counts too."""
    sf = SparseFinder(1, 2, rank=2, n_clusters=1, margin=1000.0)
    with torch.no_grad():
        sf.W_q.copy_(torch.eye(2)[None])
        sf.W_k.copy_(torch.eye(2)[None])
    q = torch.tensor([[[[5.0, 0.0], [10.0, 0.0]]]])
    k = torch.tensor([[[[-10.0, 0.0], [10.0, 0.0]]]])
    row1 = 1000.0 + 0.0 - 400.0
    row0 = 1000.0 + 25.0 - 225.0
    assert float(sf.loss(q, k, causal=True)) == pytest.approx(row1)
    assert float(sf.loss(q, k)) == pytest.approx((row0 + row1) / 2)
    q2, k2 = planted(T=64, K=4, seed=5)
    sf2 = SparseFinder(2, 16, rank=4, n_clusters=4, seed=5)
    hist = sf2.fit(q2, k2, steps=20, lr=0.05, scale=2.0, clusters=False, causal=True)
    assert hist[-1] < hist[0]


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


@pytest.mark.parametrize("top_k", [1, 3, 10])
def test_predict_top_k(top_k):
    """top_k keeps, per q block, the kv blocks with the most token pairs sharing a cluster (counted
    densely here), at most top_k of them and only ones the any-rule keeps."""
    g = torch.Generator().manual_seed(top_k)
    Tq, Tk, block = 100, 130, 16
    q, k = torch.randn(2, 3, Tq, 8, generator=g), torch.randn(2, 3, Tk, 8, generator=g)
    sf = SparseFinder(3, 8, rank=2, n_clusters=12, top_c=2, seed=3)
    sf.fit_clusters(q, k)
    mq, mk = sf.memberships(q, k)
    shared = mq.float() @ mk.float().transpose(-1, -2)
    counts = pool_token_pairs(shared, block, block, "sum")
    kept = sf.predict(q, k, block_size=block, top_k=top_k).block_kinds() == FULL
    any_rule = sf.predict(q, k, block_size=block).block_kinds() == FULL
    assert bool((kept.sum(-1) == torch.minimum(torch.tensor(top_k), (counts > 0).sum(-1))).all())
    assert bool((kept <= any_rule).all())
    # every kept block counts at least as many pairs as every cut one of its row
    lowest_kept = torch.where(kept, counts, torch.inf).amin(-1)
    highest_cut = torch.where(kept, -torch.inf, counts).amax(-1)
    assert bool((lowest_kept >= highest_cut).all())
    # the window is united in on top of the top_k: exactly the union of the two
    windowed = sf.predict(q, k, block_size=block, top_k=top_k, window=8).to_dense()
    alone = sf.predict(q, k, block_size=block, top_k=top_k).to_dense()
    window = BlockMask.sliding_window(Tq, Tk, 8, 8, block).to_dense()
    assert torch.equal(windowed, alone | window)


def test_predict_top_k_ties_go_to_lower_blocks():
    """One cluster: every block pair counts the same edges; top_k keeps the first top_k kv blocks."""
    q, k = torch.randn(1, 2, 64, 8), torch.randn(1, 2, 1024, 8)
    sf = SparseFinder(2, 8, rank=2, n_clusters=1, seed=0)
    sf.fit_clusters(q, k)
    kinds = sf.predict(q, k, block_size=16, top_k=3).block_kinds()
    want = torch.zeros(kinds.shape, dtype=torch.bool)
    want[..., :3] = True
    assert torch.equal(kinds == FULL, want)
    with pytest.raises(ValueError, match="top_k"):
        sf.predict(q, k, top_k=0)


def offset_keys(k, norm=20.0, seed=0):
    """``k`` shifted by a large constant vector per head: softmax(q k^T) is unchanged (shift invariance)."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(k.shape[1], 1, k.shape[3], generator=g)
    return k + norm * c / c.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("seed", [0, 1])
def test_planted_structure_with_offset_keys(seed):
    """Queries and keys offset from each other by a large constant, the gold graph still the planted
    groups: the projected clouds must still share clusters (before centring, q' and k' fell in disjoint
    k-means clusters and the mask kept no block)."""
    q, k = planted(T=256, K=8, seed=seed)
    k_off = offset_keys(k, seed=seed + 10)
    p, p_off = (torch.softmax(2.0 * q @ kk.transpose(-1, -2), dim=-1) for kk in (k, k_off))
    torch.testing.assert_close(p_off, p, atol=1e-4, rtol=1e-3)  # the same attention, the same gold graph
    sf = SparseFinder(2, 16, rank=4, n_clusters=8, top_c=1, margin=10.0, kmeans_iters=20, seed=seed)
    sf.fit(q, k_off, steps=40, lr=0.05, scale=2.0)
    mq, mk = sf.memberships(q, k_off)
    assert bool((mq.any(2) & mk.any(2)).any(-1).all()), "queries and keys share no cluster"
    bm = sf.predict(q, k_off, block_size=16)
    r, s = recall(q, k_off, bm, 2.0), bm.sparsity()
    assert r >= 0.9 and s >= 0.6, (r, s)


def test_centers():
    """fit_centers stores the per-head means; project subtracts them; fit and fit_clusters fit them once."""
    g = torch.Generator().manual_seed(2)
    qs = [torch.randn(2, 3, 20, 8, generator=g) + 5 for _ in range(2)]
    ks = [torch.randn(2, 3, 30, 8, generator=g) - 3 for _ in range(2)]
    sf = SparseFinder(3, 8, rank=2, n_clusters=4, seed=2)
    sf.fit_centers(qs, ks)
    torch.testing.assert_close(sf.q_center, torch.cat(qs, 0).mean(dim=(0, 2)))
    torch.testing.assert_close(sf.k_center, torch.cat(ks, 0).mean(dim=(0, 2)))
    qp, kp = sf.project(qs[1], ks[1])
    torch.testing.assert_close(qp[1, 2], (qs[1][1, 2] - sf.q_center[2]) @ sf.W_q[2])
    torch.testing.assert_close(kp[0, 1], (ks[1][0, 1] - sf.k_center[1]) @ sf.W_k[1])
    # GQA: the centre of kv head j serves the query heads it is repeated to
    sf2 = SparseFinder(4, 8, rank=2, seed=2)
    k2 = ks[0][:, :2]
    sf2.fit_centers(torch.randn(2, 4, 20, 8, generator=g), k2)
    torch.testing.assert_close(sf2.k_center, k2.mean(dim=(0, 2)).repeat_interleave(2, dim=0))
    # fit_clusters fits the centres when they are not yet, and leaves fitted ones alone
    sf3 = SparseFinder(3, 8, rank=2, n_clusters=4, seed=2)
    sf3.fit_clusters(qs[0], ks[0])
    torch.testing.assert_close(sf3.q_center, qs[0].mean(dim=(0, 2)))
    sf3.fit_clusters(qs[1], ks[1])
    torch.testing.assert_close(sf3.q_center, qs[0].mean(dim=(0, 2)))
    sf3.fit(qs[1], ks[1], steps=1, clusters=False)
    torch.testing.assert_close(sf3.q_center, qs[0].mean(dim=(0, 2)))


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
