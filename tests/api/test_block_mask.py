"""BlockMask: every constructor against a dense mask built independently over (i, j), block kinds exact
or safe, compressed lists and their transposes, union / intersection, broadcasting, FlexAttention."""

import math

import pytest
import torch

import effattn.block_mask as bmod
from effattn.block_mask import FULL, NONE, PARTIAL, BlockMask, MaskRule, intersection, union

# the eight compressed lists, in the order of BlockMask.from_lists
LIST_NAMES = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks", "q_indices",
              "full_q_num_blocks", "full_q_indices")
SIZES = [(1, 1), (17, 17), (17, 100), (100, 17), (100, 100), (33, 64)]
BLOCKS = [(16, 16), (32, 16), (16, 64)]


# ----------------------------------------------------------------------------------------------
# independent dense oracles and checks
# ----------------------------------------------------------------------------------------------
def dense_rule(Tq, Tk, *, left=-1, right=-1, diag=0, q_seg=None, kv_seg=None, n_global=0):
    """(B|1, Tq, Tk) bool, written out over the (i, j) grid with plain torch."""
    i = torch.arange(Tq)[:, None]
    j = torch.arange(Tk)[None, :]
    win = torch.ones(Tq, Tk, dtype=torch.bool)
    if left >= 0:
        win &= j >= i + diag - left
    if right >= 0:
        win &= j <= i + diag + right
    win = win[None]
    if q_seg is not None:
        kv_seg = q_seg if kv_seg is None else kv_seg
        win = win & (q_seg[:, :, None] == kv_seg[:, None, :])
    glob = (i < n_global) | (j < n_global)
    return win | glob[None]


def block_counts(dense, block):
    """Visible and existing element counts per block of a (B, H, Tq, Tk) bool mask."""
    bq, bk = block
    Tq, Tk = dense.shape[-2:]
    nq, nk = math.ceil(Tq / bq), math.ceil(Tk / bk)
    pad = (0, nk * bk - Tk, 0, nq * bq - Tq)
    vis = torch.nn.functional.pad(dense.long(), pad)
    exist = torch.nn.functional.pad(torch.ones(Tq, Tk, dtype=torch.long), pad)

    def fold(x):
        return x.unflatten(-2, (nq, bq)).unflatten(-1, (nk, bk)).sum((-3, -1))
    return fold(vis), fold(exist)


def check_mask(bm, dense, exact=True):
    """to_dense equals ``dense``; FULL blocks are entirely visible, NONE blocks entirely invisible, and
    (``exact``) PARTIAL blocks really mixed; lists and transposes consistent."""
    bm.check()
    got = bm.to_dense()
    dense = dense.expand(got.shape) if dense.dim() == 4 else dense[:, None].expand(got.shape)
    assert torch.equal(got, dense)
    vis, exist = block_counts(dense, bm.block_size)
    kinds = bm.block_kinds().expand(vis.shape)
    assert bool((vis[kinds == FULL] == exist.expand(vis.shape)[kinds == FULL]).all()), "a FULL block is not full"
    assert bool((vis[kinds == NONE] == 0).all()), "a NONE block has visible elements"
    if exact:
        part = kinds == PARTIAL
        assert bool(((vis[part] > 0) & (vis[part] < exist.expand(vis.shape)[part])).all()), "inexact PARTIAL"
    # forward and transposed lists, rebuilt from the block kinds independently
    k = bm.block_kinds()
    for num, idx, want in ((bm.kv_num_blocks, bm.kv_indices, k == PARTIAL), (bm.full_kv_num_blocks,
                           bm.full_kv_indices, k == FULL), (bm.q_num_blocks, bm.q_indices,
                           (k == PARTIAL).transpose(-1, -2)), (bm.full_q_num_blocks, bm.full_q_indices,
                           (k == FULL).transpose(-1, -2))):
        assert num.dtype == idx.dtype == torch.int32
        assert torch.equal(num, want.sum(-1, dtype=torch.int32))
        for flat_n, flat_i, flat_w in zip(num.flatten(), idx.flatten(0, -2), want.flatten(0, -2)):
            n = int(flat_n)
            assert flat_i[:n].tolist() == torch.nonzero(flat_w).flatten().tolist()
    return got


# ----------------------------------------------------------------------------------------------
# constructors
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("Tq,Tk", SIZES)
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("bottom_right", [True, False])
def test_causal(Tq, Tk, block, bottom_right):
    bm = BlockMask.causal(Tq, Tk, block_size=block, bottom_right=bottom_right)
    diag = Tk - Tq if bottom_right else 0
    check_mask(bm, dense_rule(Tq, Tk, right=0, diag=diag))
    assert bm.shape == (1, 1, math.ceil(Tq / block[0]), math.ceil(Tk / block[1]))


@pytest.mark.parametrize("Tq,Tk", SIZES)
@pytest.mark.parametrize("left,right", [(0, 0), (5, 0), (20, 3), (-1, 7), (40, -1), (-1, -1), (1, 100)])
@pytest.mark.parametrize("bottom_right", [True, False])
def test_sliding_window(Tq, Tk, left, right, bottom_right):
    bm = BlockMask.sliding_window(Tq, Tk, left, right, block_size=(16, 32), bottom_right=bottom_right)
    diag = Tk - Tq if bottom_right else 0
    check_mask(bm, dense_rule(Tq, Tk, left=left, right=right, diag=diag))


def test_window_none_means_open():
    a = BlockMask.sliding_window(40, 40, None, 3, block_size=16)
    b = BlockMask.sliding_window(40, 40, -5, 3, block_size=16)
    assert a.rule.same_as(b.rule) and a.rule.window_left == -1
    assert torch.equal(a.to_dense(), b.to_dense())


@pytest.mark.parametrize("Tq,Tk", SIZES)
@pytest.mark.parametrize("n_global", [0, 1, 5, 16, 40, 200])
def test_global_tokens(Tq, Tk, n_global):
    bm = BlockMask.global_tokens(Tq, Tk, n_global, block_size=(16, 32))
    check_mask(bm, dense_rule(Tq, Tk, left=0, right=0, diag=Tk, n_global=n_global))
    i, j = torch.arange(Tq)[:, None], torch.arange(Tk)[None, :]
    assert torch.equal(bm.to_dense()[0, 0], (i < n_global) | (j < n_global))


def sorted_segments(B, T, n_docs, gen):
    cuts = torch.sort(torch.randint(0, T + 1, (B, n_docs - 1), generator=gen), dim=1).values
    return (torch.arange(T)[None, None, :] >= cuts[:, :, None]).sum(1).to(torch.int32)


@pytest.mark.parametrize("T", [1, 17, 100])
@pytest.mark.parametrize("n_docs", [1, 3, 12])
@pytest.mark.parametrize("block", BLOCKS)
def test_segments_sorted(T, n_docs, block):
    gen = torch.Generator().manual_seed(T * 100 + n_docs)
    seg = sorted_segments(2, T, n_docs, gen)
    bm = BlockMask.from_segments(seg, block_size=block)
    assert bm.shape[:2] == (2, 1)
    check_mask(bm, dense_rule(T, T, q_seg=seg))


@pytest.mark.parametrize("Tq,Tk", [(17, 100), (100, 33), (64, 64)])
def test_segments_unsorted_and_cross(Tq, Tk):
    torch.manual_seed(0)
    q_seg = torch.randint(0, 4, (3, Tq)) * 7  # sparse, unsorted ids (int64, converted to int32)
    kv_seg = torch.randint(0, 5, (3, Tk)) * 7
    kv_seg[:, : Tk // 2] = 100  # a context segment no query belongs to
    bm = BlockMask.from_segments(q_seg, kv_seg, block_size=(16, 16))
    assert bm.rule.q_segments.dtype == torch.int32
    check_mask(bm, dense_rule(Tq, Tk, q_seg=q_seg, kv_seg=kv_seg))


def test_segments_question_context_split():
    # DeFormer-style: the question (segment 0) and the context (segment 1) attend within themselves
    seg = torch.tensor([[0] * 20 + [1] * 77])
    bm = BlockMask.from_segments(seg, block_size=16)
    check_mask(bm, dense_rule(97, 97, q_seg=seg))
    assert bm.sparsity() == pytest.approx(10 / 49)  # question block 0 x context blocks 2..6, and back


def test_segments_ids_not_consecutive():
    # block ranges overlap ({0, 2} vs {1}) without a shared id: the bitset finds NONE
    q_seg = torch.tensor([[0] * 16 + [2] * 16])
    kv_seg = torch.tensor([[1] * 16 + [2] * 16])
    bm = BlockMask.from_segments(q_seg, kv_seg, block_size=32)
    check_mask(bm, dense_rule(32, 32, q_seg=q_seg, kv_seg=kv_seg))
    q2 = torch.tensor([[0] * 8 + [2] * 8 + [2] * 16])
    kv2 = torch.tensor([[1] * 16 + [2] * 16])
    bm2 = BlockMask.from_segments(q2, kv2, block_size=16)
    assert bm2.block_kinds()[0, 0].tolist() == [[NONE, PARTIAL], [NONE, FULL]]


def test_segments_many_ids_conservative(monkeypatch):
    # beyond SEGMENT_BITSET_MAX distinct ids only disjoint ranges give NONE: still safe
    monkeypatch.setattr(bmod, "SEGMENT_BITSET_MAX", 2)
    torch.manual_seed(1)
    seg = torch.randint(0, 6, (2, 70))
    bm = BlockMask.from_segments(seg, block_size=16)
    check_mask(bm, dense_rule(70, 70, q_seg=seg), exact=False)
    s2 = torch.arange(70)[None] // 9  # sorted: ranges are exact here
    check_mask(BlockMask.from_segments(s2, block_size=16), dense_rule(70, 70, q_seg=s2))


@pytest.mark.parametrize("Tq,Tk", [(17, 100), (100, 100), (77, 45)])
@pytest.mark.parametrize("window,n_global", [((9, 9), 3), ((0, -1), 20), ((-1, 4), 40), ((30, 0), 16)])
def test_from_rule_window_global_exact(Tq, Tk, window, n_global):
    rule = MaskRule(window_left=window[0], window_right=window[1], diag_offset=Tk - Tq, n_global=n_global)
    bm = BlockMask.from_rule(rule, Tq, Tk, block_size=(16, 32), heads=2)
    assert bm.shape[:2] == (1, 2)
    check_mask(bm, dense_rule(Tq, Tk, left=window[0], right=window[1], diag=Tk - Tq, n_global=n_global))


@pytest.mark.parametrize("seed", range(4))
def test_from_rule_everything_safe(seed):
    gen = torch.Generator().manual_seed(seed)
    Tq, Tk = 50 + seed * 13, 90 - seed * 11
    q_seg = torch.randint(0, 3, (2, Tq), generator=gen)
    kv_seg = torch.randint(0, 3, (2, Tk), generator=gen)
    rule = MaskRule(window_left=int(torch.randint(0, 30, (), generator=gen)), window_right=seed - 1,
                    diag_offset=seed * 3 - 4, q_segments=q_seg, kv_segments=kv_seg, n_global=seed * 5)
    bm = BlockMask.from_rule(rule, Tq, Tk, block_size=(16, 16))
    dense = dense_rule(Tq, Tk, left=rule.window_left, right=rule.window_right, diag=rule.diag_offset, q_seg=q_seg,
                       kv_seg=kv_seg, n_global=rule.n_global)
    check_mask(bm, dense, exact=False)  # window and segments cutting one block: PARTIAL, maybe empty


def test_causal_packed_documents():
    # the combination of a window and segments: one rule (two masks with different rules can't be combined)
    gen = torch.Generator().manual_seed(3)
    seg = sorted_segments(2, 100, 4, gen)
    rule = MaskRule(window_right=0, q_segments=seg)
    bm = BlockMask.from_rule(rule, 100, 100, block_size=16)
    check_mask(bm, dense_rule(100, 100, right=0, q_seg=seg), exact=False)
    assert bm.sparsity() > 0.5


def test_from_dense_blocks_and_block_kinds():
    torch.manual_seed(0)
    blocks = torch.rand(2, 3, 4, 5) < 0.4
    bm = BlockMask.from_dense_blocks(blocks, 50, 70, block_size=16)
    assert bm.rule is None
    assert torch.equal(bm.block_kinds(), blocks.to(torch.uint8) * FULL)
    expanded = blocks.repeat_interleave(16, 2).repeat_interleave(16, 3)[:, :, :50, :70]
    check_mask(bm, expanded)
    assert torch.equal(bm.kept_blocks(), blocks.sum((-1, -2)))
    assert bm.sparsity() == pytest.approx(1 - blocks.float().mean().item())


def test_from_block_kinds_round_trip():
    torch.manual_seed(2)
    kinds = torch.randint(0, 3, (1, 2, 3, 4), dtype=torch.uint8)
    rule = MaskRule(window_right=0)
    bm = BlockMask.from_block_kinds(kinds, 40, 64, (16, 16), rule)
    assert torch.equal(bm.block_kinds(), kinds)
    fresh = BlockMask.from_lists(*(getattr(bm, n) for n in LIST_NAMES), q_len=40, kv_len=64,
                                 block_size=(16, 16), rule=rule)
    assert torch.equal(fresh.block_kinds(), kinds)  # rebuilt from the lists
    i, j = torch.arange(40)[:, None], torch.arange(64)[None]
    k = kinds.repeat_interleave(16, 2).repeat_interleave(16, 3)[:, :, :40, :64]
    assert torch.equal(fresh.to_dense(), (k == FULL) | ((k == PARTIAL) & (j <= i)))
    assert torch.equal(fresh.dense_rows(7, 33), fresh.to_dense()[:, :, 7:33])


def _round_trip_masks():
    seg = torch.tensor([[0] * 20 + [1] * 13 + [2] * 7, [5] * 40], dtype=torch.int32)
    kv_seg = torch.tensor([[0] * 30 + [1] * 34, [5] * 60 + [6] * 4], dtype=torch.int32)
    yield BlockMask.random(40, 64, 0.5, (16, 32), batch=2, heads=3, generator=torch.Generator().manual_seed(0))
    yield BlockMask.causal(40, 64, block_size=16)
    yield BlockMask.bigbird(64, 64, window=(5, 3), n_global=2, n_random_blocks=1, block_size=16,
                            generator=torch.Generator().manual_seed(1))
    yield BlockMask.from_rule(MaskRule(window_right=0, diag_offset=24, q_segments=seg, kv_segments=kv_seg), 40, 64,
                              (16, 16), heads=2)


@pytest.mark.parametrize("index", range(4))
def test_as_tuple_round_trip(index):
    bm = list(_round_trip_masks())[index]
    tensors, ints = bm.as_tuple()
    assert all(t is None or isinstance(t, torch.Tensor) for t in tensors)
    assert all(type(i) is int for i in ints)
    back = BlockMask.from_tuple(bm.as_tuple())
    assert back.same_as(bm) and bm.same_as(back)
    assert (back.rule is None) == (bm.rule is None)
    if bm.rule is not None:
        assert back.rule.same_as(bm.rule)
    assert torch.equal(back.to_dense(), bm.to_dense())
    for name in LIST_NAMES:
        assert torch.equal(getattr(back, name), getattr(bm, name))


def test_as_tuple_keeps_an_empty_rule_and_from_tuple_checks():
    bm = BlockMask.from_block_kinds(torch.ones(1, 1, 2, 2, dtype=torch.uint8), 32, 32, 16, MaskRule())
    back = BlockMask.from_tuple(bm.as_tuple())
    assert back.rule is not None and back.rule.same_as(MaskRule())
    no_rule = BlockMask.causal(32, 32, block_size=16)
    assert not no_rule.same_as(bm) and not bm.same_as(BlockMask.sliding_window(32, 32, 3, 0, block_size=16))
    assert not bm.same_as(None)
    tensors, ints = bm.as_tuple()
    with pytest.raises(TypeError, match=r"pair \(tensors, ints\)"):
        BlockMask.from_tuple(tensors)
    with pytest.raises(ValueError, match="tensors must be a list of 10"):
        BlockMask.from_tuple((tensors[:8], ints))
    with pytest.raises(ValueError, match="ints must be a list of 9"):
        BlockMask.from_tuple((tensors, ints[:4]))
    with pytest.raises(ValueError, match="kv_num_blocks must have shape"):
        BlockMask.from_tuple((tensors, [48, *ints[1:]]))


def test_bigbird():
    Tq = Tk = 130
    block = (16, 16)

    def make(seed):
        return BlockMask.bigbird(Tq, Tk, window=9, n_global=3, n_random_blocks=2, block_size=block,
                                 generator=torch.Generator().manual_seed(seed), heads=2)
    a, b, c = make(0), make(0), make(1)
    for name in LIST_NAMES:
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.block_kinds(), c.block_kinds())
    rule_dense = dense_rule(Tq, Tk, left=9, right=9, n_global=3)
    dense = check_mask(a, a.to_dense(), exact=True)  # lists and kinds against its own dense mask
    assert bool((dense | rule_dense[:, None] == dense).all()), "the rule mask is not contained"
    extra = dense & ~rule_dense[:, None]
    kinds = a.block_kinds().repeat_interleave(16, 2).repeat_interleave(16, 3)[:, :, :Tq, :Tk]
    assert bool((kinds[extra] == FULL).all()), "elements beyond the rule come from FULL random blocks"
    base = BlockMask.from_rule(MaskRule(window_left=9, window_right=9, n_global=3), Tq, Tk, block, heads=2)
    check_mask(base, rule_dense)
    new_full = (a.block_kinds() == FULL).sum(-1) - (base.block_kinds() == FULL).sum(-1)
    assert bool((new_full == 2).all()), "two random blocks per q block, not already FULL"
    assert a.rule.same_as(base.rule)


def test_bigbird_more_random_than_blocks():
    bm = BlockMask.bigbird(40, 40, window=(2, 0), n_global=0, n_random_blocks=10, block_size=16,
                           generator=torch.Generator().manual_seed(0))
    assert bm.sparsity() == 0.0
    assert bool((bm.block_kinds() == FULL).all())


# ----------------------------------------------------------------------------------------------
# union, intersection, broadcasting
# ----------------------------------------------------------------------------------------------
def random_blocks(B, H, Tq, Tk, block, seed):
    g = torch.Generator().manual_seed(seed)
    nq, nk = math.ceil(Tq / block[0]), math.ceil(Tk / block[1])
    return BlockMask.from_dense_blocks(torch.rand(B, H, nq, nk, generator=g) < 0.4, Tq, Tk, block)


@pytest.mark.parametrize("Tq,Tk", [(37, 45), (100, 17)])
def test_union_intersection(Tq, Tk):
    block = (16, 16)
    win = BlockMask.sliding_window(Tq, Tk, 6, 2, block_size=block)
    rnd = random_blocks(2, 3, Tq, Tk, block, 0)
    for combined, op in ((win | rnd, torch.logical_or), (win & rnd, torch.logical_and),
                         (union(rnd, win), torch.logical_or), (intersection(rnd, win), torch.logical_and)):
        assert combined.shape[:2] == (2, 3)  # (1, 1) broadcast against (2, 3)
        check_mask(combined, op(win.to_dense(), rnd.to_dense()), exact=False)
        assert combined.rule is win.rule
    # the same rule on both sides (equal, not the same object) is exact too
    win2 = BlockMask.sliding_window(Tq, Tk, 6, 2, block_size=block)
    glob = BlockMask.global_tokens(Tq, Tk, 5, block_size=block)
    both = win | win2
    check_mask(both, win.to_dense())
    rnd2 = random_blocks(1, 3, Tq, Tk, block, 1)
    check_mask(rnd | rnd2, rnd.to_dense() | rnd2.to_dense())
    check_mask(rnd & rnd2, rnd.to_dense() & rnd2.to_dense())
    with pytest.raises(ValueError, match="different elementwise rules"):
        win | glob
    with pytest.raises(ValueError, match="different elementwise rules"):
        intersection(win, BlockMask.causal(Tq, Tk, block_size=block))


def test_union_checks_sizes_and_broadcast():
    a = BlockMask.causal(32, 32, block_size=16)
    with pytest.raises(ValueError, match="different sizes"):
        a | BlockMask.causal(32, 48, block_size=16)
    with pytest.raises(ValueError, match="different sizes"):
        a | BlockMask.causal(32, 32, block_size=32)
    with pytest.raises(ValueError, match="do not broadcast"):
        random_blocks(2, 1, 32, 32, (16, 16), 0) | random_blocks(3, 1, 32, 32, (16, 16), 1)
    with pytest.raises(TypeError, match="must be a BlockMask"):
        union(a, torch.ones(2, 2, dtype=torch.bool))


def test_segments_batch_broadcast_with_blocks():
    seg = torch.tensor([[0] * 20 + [1] * 30, [0] * 45 + [1] * 5])
    bm = BlockMask.from_segments(seg, block_size=16)
    rnd = random_blocks(1, 2, 50, 50, (16, 16), 3)
    check_mask(bm | rnd, bm.to_dense() | rnd.to_dense(), exact=False)
    check_mask(bm & rnd, bm.to_dense() & rnd.to_dense(), exact=False)
    assert (bm | rnd).shape[:2] == (2, 2)


def test_sparsity_and_kept_blocks():
    bm = BlockMask.causal(100, 100, block_size=16)
    vis, _ = block_counts(bm.to_dense(), bm.block_size)
    assert bm.sparsity() == pytest.approx((vis == 0).float().mean().item())
    assert bm.kept_blocks().tolist() == [[int((vis > 0).sum())]]
    assert "BlockMask(q_len=100" in repr(bm) and len(repr(bm)) < 300


def test_to_device_and_dense_rows():
    seg = torch.tensor([[0] * 20 + [1] * 30])
    bm = BlockMask.from_segments(seg, block_size=16)
    moved = bm.to("cpu")
    assert moved.device == torch.device("cpu") and moved.rule.q_segments.device.type == "cpu"
    assert torch.equal(moved.to_dense(), bm.to_dense())
    assert bm.dense_rows(5, 5).shape == (1, 1, 0, 50)
    with pytest.raises(ValueError, match="r0 <= r1"):
        bm.dense_rows(10, 60)


def test_mask_rule_visible():
    rule = MaskRule(window_left=3, window_right=1, diag_offset=2, q_segments=torch.tensor([[0, 0, 1, 1, 1]]),
                    kv_segments=torch.tensor([[0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]), n_global=1)
    assert rule.batch == 2
    rows, cols = torch.arange(5), torch.arange(6)
    want = dense_rule(5, 6, left=3, right=1, diag=2, q_seg=rule.q_segments, kv_seg=rule.kv_segments, n_global=1)
    assert torch.equal(rule.visible(rows, cols), want)
    assert rule.visible(rows[2:4], cols[1:]).shape == (2, 2, 5)
    assert MaskRule().visible(rows, cols).shape == (1, 5, 6)


# ----------------------------------------------------------------------------------------------
# FlexAttention
# ----------------------------------------------------------------------------------------------
flex = pytest.importorskip("torch.nn.attention.flex_attention")


@pytest.mark.parametrize("make", [
    lambda: BlockMask.causal(100, 77, block_size=(16, 32)),
    lambda: BlockMask.sliding_window(64, 64, 10, 0, block_size=16),
    lambda: BlockMask.bigbird(70, 70, 5, 2, 1, block_size=16, generator=torch.Generator().manual_seed(0), heads=2),
    lambda: BlockMask.from_segments(torch.tensor([[0] * 30 + [1] * 20, [0] * 5 + [2] * 45]), block_size=16),
    lambda: random_blocks(2, 1, 33, 40, (16, 16), 4),
])
def test_flex_round_trip(make):
    bm = make()
    fm = bm.to_flex()
    B, H = torch.broadcast_shapes(bm.shape[:2], (bm.rule.batch if bm.rule else 1, 1))
    dense = flex.create_mask(fm.mask_mod, B, H, bm.q_len, bm.kv_len, device="cpu")
    assert torch.equal(dense, bm.to_dense().expand(dense.shape))
    assert tuple(fm.BLOCK_SIZE) == bm.block_size and tuple(fm.seq_lengths) == (bm.q_len, bm.kv_len)
    back = BlockMask.from_flex(fm, rule=bm.rule)
    assert torch.equal(back.block_kinds(), bm.block_kinds())
    assert torch.equal(back.to_dense(), bm.to_dense())


@pytest.mark.parametrize("Tq,Tk", [(64, 128), (50, 77)])
def test_from_flex_create_block_mask(Tq, Tk):
    diag = Tk - Tq

    def causal(b, h, q, kv):
        return kv <= q + diag
    fm = flex.create_block_mask(causal, 1, 1, Tq, Tk, device="cpu", BLOCK_SIZE=(16, 32))
    rule = MaskRule(window_right=0, diag_offset=diag)
    bm = BlockMask.from_flex(fm, rule)
    bm.check()
    assert torch.equal(bm.to_dense(), flex.create_mask(causal, 1, 1, Tq, Tk, device="cpu"))
    ours = BlockMask.causal(Tq, Tk, block_size=(16, 32))
    if Tq % 16 == 0 and Tk % 32 == 0:
        assert torch.equal(bm.block_kinds(), ours.block_kinds())
    else:  # flex pads ragged blocks with masked elements: more PARTIAL, never a different visibility
        assert bool((bm.block_kinds() == ours.block_kinds()).sum() > 0)
        assert torch.equal(bm.block_kinds() > 0, ours.block_kinds() > 0)
    with pytest.raises(ValueError, match="pass rule="):
        BlockMask.from_flex(fm)
    with pytest.raises(TypeError, match="flex_mask must be"):
        BlockMask.from_flex(ours)


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("block_size,exc,match", [
    (24, ValueError, "powers of two >= 16"), (8, ValueError, "powers of two >= 16"),
    ((16, 48), ValueError, "powers of two"), ((16,), ValueError, "pair"), (16.0, TypeError, "block_size must be"),
    ((16, True), TypeError, r"block_size\[1\] must be an int"),
])
def test_bad_block_size(block_size, exc, match):
    with pytest.raises(exc, match=match):
        BlockMask.causal(32, 32, block_size=block_size)


def test_bad_rules():
    with pytest.raises(ValueError, match="n_global must be >= 0"):
        MaskRule(n_global=-1)
    with pytest.raises(TypeError, match="window_left must be an int"):
        MaskRule(window_left=2.5)
    with pytest.raises(TypeError, match="diag_offset must be an int"):
        MaskRule(diag_offset=torch.tensor(1))
    with pytest.raises(TypeError, match="q_segments must hold integer"):
        MaskRule(q_segments=torch.zeros(1, 4))
    with pytest.raises(TypeError, match="q_segments must be a torch.Tensor"):
        MaskRule(q_segments=[[0, 1]])
    with pytest.raises(ValueError, match=r"q_segments must be 2-D \(B, T\)"):
        MaskRule(q_segments=torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="kv_segments given without q_segments"):
        MaskRule(kv_segments=torch.zeros(1, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="batch sizes 2 and 3"):
        MaskRule(q_segments=torch.zeros(2, 4, dtype=torch.int32), kv_segments=torch.zeros(3, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="int32 range"):
        MaskRule(q_segments=torch.tensor([[0, 2**40]]))
    seg = torch.zeros(2, 10, dtype=torch.int32)
    with pytest.raises(ValueError, match="q_segments has 10 positions"):
        BlockMask.from_rule(MaskRule(q_segments=seg), 12, 10, 16)
    with pytest.raises(ValueError, match="batch=3"):
        BlockMask.from_rule(MaskRule(q_segments=seg), 10, 10, 16, batch=3)
    with pytest.raises(TypeError, match="rule must be a MaskRule"):
        BlockMask.from_rule(None, 10, 10, 16)
    with pytest.raises(ValueError, match="n_global must be >= 0"):
        BlockMask.global_tokens(10, 10, -2)
    with pytest.raises(ValueError, match="q_len must be >= 1"):
        BlockMask.causal(0, 10)
    with pytest.raises(ValueError, match="n_random_blocks must be >= 0"):
        BlockMask.bigbird(32, 32, 4, 1, -1, block_size=16)


def test_bad_kinds_and_lists():
    with pytest.raises(ValueError, match="PARTIAL blocks need an elementwise rule"):
        BlockMask.from_block_kinds(torch.ones(1, 1, 2, 2, dtype=torch.uint8), 32, 32, 16)
    with pytest.raises(ValueError, match=r"kinds must have shape \(B, H, 2, 3\)"):
        BlockMask.from_block_kinds(torch.zeros(1, 1, 2, 2, dtype=torch.uint8), 32, 33, 16)
    with pytest.raises(TypeError, match="kinds must be uint8"):
        BlockMask.from_block_kinds(torch.zeros(1, 1, 2, 2), 32, 32, 16)
    with pytest.raises(ValueError, match="NONE=0, PARTIAL=1 or FULL=2"):
        BlockMask.from_block_kinds(torch.full((1, 1, 2, 2), 3, dtype=torch.uint8), 32, 32, 16)
    with pytest.raises(TypeError, match="blocks must be a bool"):
        BlockMask.from_dense_blocks(torch.ones(1, 1, 2, 2), 32, 32, 16)
    bm = BlockMask.causal(40, 40, block_size=16)
    lists = [getattr(bm, n) for n in LIST_NAMES]
    kw = dict(q_len=40, kv_len=40, block_size=16, rule=bm.rule)
    with pytest.raises(TypeError, match="kv_indices must be int32"):
        BlockMask.from_lists(lists[0], lists[1].long(), *lists[2:], **kw)
    with pytest.raises(ValueError, match=r"q_indices must have shape \(B, H, 3, 3\)"):
        BlockMask.from_lists(*lists[:5], lists[5][:, :, :2], *lists[6:], **kw)
    with pytest.raises(ValueError, match="full_kv_num_blocks must have shape"):
        BlockMask.from_lists(*lists[:2], lists[2].expand(2, 1, 3), *lists[3:], **kw)
    with pytest.raises(TypeError, match="rule must be a MaskRule"):
        BlockMask.from_lists(*lists, q_len=40, kv_len=40, block_size=16, rule="causal")
    # values are checked by check()
    swapped = BlockMask.from_lists(*lists[:4], lists[6], lists[7], lists[4], lists[5], **kw)
    with pytest.raises(ValueError, match="not the transpose"):
        swapped.check()
    two = BlockMask.from_block_kinds(torch.tensor([[[[1, 1, 0], [0, 2, 2], [0, 0, 0]]]], dtype=torch.uint8),
                                     40, 40, 16, bm.rule)
    lists2 = [getattr(two, n) for n in LIST_NAMES]
    assert lists2[1][0, 0, 0, :2].tolist() == [0, 1]
    bad = lists2[1].clone()
    bad[0, 0, 0, :2] = torch.tensor([1, 0], dtype=torch.int32)
    with pytest.raises(ValueError, match="strictly ascending"):
        BlockMask.from_lists(lists2[0], bad, *lists2[2:], **kw).check()
    bad[0, 0, 0, :2] = torch.tensor([0, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"kv_indices lists an index outside \[0, 3\)"):
        BlockMask.from_lists(lists2[0], bad, *lists2[2:], **kw).check()
    no_rule = BlockMask.from_lists(*lists, q_len=40, kv_len=40, block_size=16)
    with pytest.raises(ValueError, match="rule is None"):
        no_rule.check()
