"""The cluster-sharing block-mask kernels (effattn.kernels.cluster_blocks): bitsets and block pairs against
the torch reference and against a dense token-graph construction, ragged blocks, ids to ignore, many
words, argument errors. CPU runs the kernels through Triton's interpreter."""

import pytest
import torch

from effattn.kernels import cluster_blocks as cb
from tests.helpers import pool_token_pairs


def _poisoned_alloc(*size, dtype=None, device=None, **kw):
    """Outputs start as values the kernels never write (0x5A5A5A5A words, 0xA5 bytes)."""
    t = torch.empty(*size, dtype=dtype, device=device, **kw)
    return t.fill_(0xA5) if dtype == torch.uint8 else t.fill_(0x5A5A5A5A)


@pytest.fixture(autouse=True)
def _poison(monkeypatch, one_thread):
    monkeypatch.setattr(cb, "_alloc", _poisoned_alloc)


def random_ids(B, H, T, top_c, n_clusters, seed, invalid=True):
    """Random cluster ids; with ``invalid`` a few out of range (-1 and >= n_clusters), to be ignored."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, n_clusters, (B, H, T, top_c), generator=g)
    if invalid:
        drop = torch.rand(ids.shape, generator=g) < 0.1
        bad = torch.where(torch.rand(ids.shape, generator=g) < 0.5, -1,
                          n_clusters + torch.randint(0, 3, ids.shape, generator=g))
        ids = torch.where(drop, bad, ids)
    return ids.to(torch.int32)


def dense_presence(ids, n_clusters, block):
    """bool (B, H, nBlocks, n_clusters) by a plain loop over blocks (no bit packing)."""
    B, H, T, _ = ids.shape
    nb = -(-T // block)
    onehot = torch.zeros(B, H, T, n_clusters + 1, dtype=torch.bool)
    valid = (ids >= 0) & (ids < n_clusters)
    onehot.scatter_(-1, torch.where(valid, ids.long(), n_clusters), True)
    onehot = onehot[..., :n_clusters]
    return torch.stack([onehot[:, :, m * block:(m + 1) * block].any(2) for m in range(nb)], dim=2)


def dense_kept(q_ids, k_ids, n_clusters, bq, bk):
    """Oracle: the token graph 'share a cluster' (Tq x Tk, small sizes), pooled to blocks with any()."""
    pq, pk = dense_presence(q_ids, n_clusters, 1), dense_presence(k_ids, n_clusters, 1)
    return pool_token_pairs((pq.float() @ pk.float().transpose(-1, -2)) > 0, bq, bk)


CASES = [  # B, H, Tq, Tk, n_clusters, top_c, block_size
    (2, 3, 100, 70, 40, 2, (16, 32)),   # ragged blocks, 2 words (the second partly used)
    (1, 2, 33, 17, 5, 3, 16),           # odd T, one word partly used, top_c > 1
    (1, 1, 150, 90, 64, 1, 64),         # exactly 2 words
    (2, 1, 1, 1, 3, 1, 16),             # one token each
    (1, 2, 77, 77, 33, 2, (32, 16)),    # bit 0 of a second word, bit 31 of the first
    (1, 1, 600, 300, 10, 1, (256, 128)),  # blocks above the kernel's token tile: read in two tiles
]


@pytest.mark.parametrize("B,H,Tq,Tk,n_clusters,top_c,block_size", CASES)
def test_kernels_match_reference_and_dense(B, H, Tq, Tk, n_clusters, top_c, block_size, device):
    q_ids = random_ids(B, H, Tq, top_c, n_clusters, seed=Tq)
    k_ids = random_ids(B, H, Tk, top_c, n_clusters, seed=Tk + 1)
    bq, bk = (block_size, block_size) if isinstance(block_size, int) else block_size
    # bitsets: kernel == reference == the dense presence packed by hand
    for ids, block in ((q_ids, bq), (k_ids, bk)):
        ref = cb.cluster_bitsets_reference(ids, n_clusters, block)
        got = cb.cluster_bitsets(ids.to(device), n_clusters, block).cpu()
        assert got.dtype == torch.int32 and got.shape == (B, H, -(-ids.shape[2] // block), cb.num_words(n_clusters))
        assert torch.equal(got, ref)
        pres = dense_presence(ids, n_clusters, block)
        unpacked = ((ref.long()[..., None] >> torch.arange(32)) & 1).bool().flatten(-2)[..., :n_clusters]
        assert torch.equal(unpacked, pres)
        assert not bool(((ref.long()[..., None] >> torch.arange(32)) & 1).bool().flatten(-2)[..., n_clusters:].any())
    # pairs: kernel == reference == dense token graph pooled to blocks
    ref = cb.cluster_block_kinds_reference(q_ids, k_ids, n_clusters, block_size)
    got = cb.cluster_block_kinds(q_ids.to(device), k_ids.to(device), n_clusters, block_size).cpu()
    assert got.dtype == torch.bool
    assert torch.equal(got, ref)
    assert torch.equal(ref, dense_kept(q_ids, k_ids, n_clusters, bq, bk))
    auto = cb.cluster_block_kinds_auto(q_ids.to(device), k_ids.to(device), n_clusters, block_size).cpu()
    assert torch.equal(auto, ref)


def test_many_words_and_strided_ids(device):
    """More clusters than one word tile (1100 clusters: 35 words, two tiles), int64 non-contiguous ids."""
    n_clusters = 1100
    q_ids = random_ids(1, 2, 40, 2, n_clusters, seed=3, invalid=False).long().transpose(0, 1)  # (2, 1, T, c)
    k_ids = random_ids(1, 2, 24, 2, n_clusters, seed=4, invalid=False).long().transpose(0, 1)
    k_ids[1, 0, 3, 0] = q_ids[1, 0, 20, 1]  # one shared cluster: q block 1, kv block 0 of head-batch 1
    got = cb.cluster_block_kinds(q_ids.to(device), k_ids.to(device), n_clusters, 16).cpu()
    assert torch.equal(got, cb.cluster_block_kinds_reference(q_ids, k_ids, n_clusters, 16))
    assert torch.equal(got, dense_kept(q_ids, k_ids, n_clusters, 16, 16))
    assert bool(got[1, 0, 1, 0])
    bits = cb.cluster_bitsets(q_ids.to(device), n_clusters, 16).cpu()
    assert torch.equal(bits, cb.cluster_bitsets_reference(q_ids, n_clusters, 16))


def test_ids_beyond_int32_are_ignored(device):
    """int64 ids past int32's range are out of range, not wrapped into it by the int32 conversion."""
    ids = torch.full((1, 1, 20, 1), 2 ** 32 + 5, dtype=torch.int64)
    ids[0, 0, 3, 0] = 2
    got = cb.cluster_bitsets(ids.to(device), 8, 16).cpu()
    assert torch.equal(got, cb.cluster_bitsets_reference(ids, 8, 16))
    assert got.flatten().tolist() == [1 << 2, 0]


def test_pairs_kernel_tiles(device):
    """More q and kv blocks than one tile of the pair kernel, from random bitsets (sign bit included)."""
    g = torch.Generator().manual_seed(5)
    q_bits = torch.randint(-2 ** 31, 2 ** 31, (1, 1, cb.TILE_M + 3, 2), generator=g, dtype=torch.int64)
    k_bits = torch.randint(-2 ** 31, 2 ** 31, (1, 1, cb.TILE_N + 5, 2), generator=g, dtype=torch.int64)
    sparse = torch.rand(q_bits.shape, generator=g) < 0.9  # mostly empty words: some pairs cut
    q_bits = torch.where(sparse, q_bits & (1 << 31), q_bits).to(torch.int32)
    k_bits = torch.where(torch.rand(k_bits.shape, generator=g) < 0.9, 0, k_bits).to(torch.int32)
    ref = cb.cluster_block_pairs_reference(q_bits, k_bits)
    assert 0 < int(ref.sum()) < ref.numel()
    assert torch.equal(cb.cluster_block_pairs(q_bits.to(device), k_bits.to(device)).cpu(), ref)


@pytest.mark.parametrize("B,H,Tq,Tk,n_clusters,top_c,block_size", CASES)
def test_edge_counts_match_dense(B, H, Tq, Tk, n_clusters, top_c, block_size):
    """cluster_block_edges == the token graph's shared clusters summed per block pair (distinct ids per
    token, as nearest centroids are, plus ids to ignore); zero exactly where the any-rule cuts."""
    g = torch.Generator().manual_seed(Tq + Tk)

    def distinct_ids(T):
        ids = torch.rand(B, H, T, n_clusters, generator=g).topk(min(top_c, n_clusters), dim=-1).indices
        drop = torch.rand(ids.shape, generator=g) < 0.1
        return torch.where(drop, -1, ids).to(torch.int32)

    q_ids, k_ids = distinct_ids(Tq), distinct_ids(Tk)
    bq, bk = (block_size, block_size) if isinstance(block_size, int) else block_size
    pq, pk = dense_presence(q_ids, n_clusters, 1).float(), dense_presence(k_ids, n_clusters, 1).float()
    shared = pq @ pk.transpose(-1, -2)  # (B, H, Tq, Tk): clusters each token pair shares
    want = pool_token_pairs(shared, bq, bk, "sum")
    got = cb.cluster_block_edges(q_ids, k_ids, n_clusters, block_size)
    assert got.dtype == torch.float64 and torch.equal(got, want.double())
    assert torch.equal(got > 0, cb.cluster_block_kinds_reference(q_ids, k_ids, n_clusters, block_size))


def test_errors():
    ids = torch.zeros(1, 1, 8, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="block"):
        cb.cluster_bitsets_reference(ids, 4, 24)
    with pytest.raises(ValueError, match="n_clusters"):
        cb.cluster_bitsets_reference(ids, 0, 16)
    with pytest.raises(TypeError, match="integer"):
        cb.cluster_bitsets_reference(ids.float(), 4, 16)
    with pytest.raises(ValueError, match="4-D"):
        cb.cluster_bitsets_reference(ids[0], 4, 16)
    with pytest.raises(ValueError, match=r"\(B, H\)"):
        cb.cluster_block_kinds_reference(ids, torch.zeros(1, 2, 8, 1, dtype=torch.int32), 4, 16)
    with pytest.raises(ValueError, match="n_words"):
        cb.cluster_block_pairs_reference(torch.zeros(1, 1, 2, 1, dtype=torch.int32),
                                         torch.zeros(1, 1, 2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="block_size"):
        cb.cluster_block_kinds_reference(ids, ids, 4, (16, 16, 16))
