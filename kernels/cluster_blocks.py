"""Cluster-sharing block masks in Triton: SparseFinder's token clusters turned into kept block pairs.

Every token belongs to ``top_c`` clusters (its nearest k-means centroids), given as int32 ids
``(B, H, T, top_c)`` in ``[0, n_clusters)``; a query and a key are connected iff they share a cluster
(Treviso et al. 2022). On the block grid:

1. **Bitsets** (:func:`cluster_bitsets`). Per block of ``BLOCK`` tokens, the set of clusters present
   among its tokens, packed as ``n_words = ceil(n_clusters / 32)`` int32 words: bit ``c % 32`` of word
   ``c // 32`` is set iff some token of the block has cluster ``c`` among its ids. Output
   ``(B, H, nBlocks, n_words)`` int32 (all 32 bits used: a word with bit 31 set is negative).
   One program per ``(block, head, batch)``; each token sets one bit per id, and the words are an OR
   reduction over the block's tokens (``TOKEN_TILE`` tokens and ``WORD_TILE`` words at a time).
2. **Pairs** (:func:`cluster_block_pairs`). q block ``m`` and kv block ``n`` are kept iff their
   bitsets intersect: ``OR_w (Q_BITS[m, w] & K_BITS[n, w]) != 0``. Output ``(B, H, nQb, nKb)`` bool.
   One program per ``(TILE_M q blocks, head, batch)``, looping over tiles of ``TILE_N`` kv blocks.

A kept pair holds at least one connected (query, key) pair, and a cut pair none: the block mask is the
token graph pooled with ``any`` — computed without a ``Tq x Tk`` (or even a ``Tq x n_clusters``)
tensor. Ids outside ``[0, n_clusters)`` (e.g. -1 as padding) are ignored; tokens past ``T`` in a ragged
last block too.

3. **Edge counts** (:func:`cluster_block_edges`). ``any`` keeps a pair as soon as one of its
   ``BLOCK_Q x BLOCK_KV`` token pairs is connected: with many tokens per block and few clusters, nearly
   every pair is (each block holds most clusters). The number of connected token pairs ranks the blocks
   instead: per block the histogram of its tokens' clusters ``(B, H, nBlocks, n_clusters)`` (a
   scatter-add), and ``edges[m, n] = sum_c hist_q[m, c] hist_k[n, c]``, one matmul on the block grid —
   still no ``Tq x Tk`` tensor. Plain torch (a scatter-add and a batched matmul) on every device.

:func:`cluster_bitsets_reference` / :func:`cluster_block_pairs_reference` are the same computations in
plain torch (the tests' reference and the CPU fallback of :func:`cluster_block_kinds_auto`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from effattn import limits
from effattn.kernels.flash_attn import INTERPRET, _on_tensor_device

__all__ = ["WORD_BITS", "cluster_bitsets", "cluster_bitsets_reference", "cluster_block_edges",
           "cluster_block_kinds", "cluster_block_kinds_auto", "cluster_block_kinds_reference", "cluster_block_pairs",
           "cluster_block_pairs_reference", "cluster_histograms", "num_words"]

WORD_BITS = 32  # clusters per int32 word of a bitset
MIN_BLOCK = limits.MIN_BLOCK_SIZE  # the smallest block of a BlockMask
MAX_WORD_TILE = 32  # words (1024 clusters) reduced at once by the bitset kernel
MAX_TOKEN_TILE = 128  # tokens of a block read at once by the bitset kernel (larger blocks: a loop)
TILE_M, TILE_N = 64, 64  # (q blocks, kv blocks) per tile of the pair kernel
NUM_WARPS = 4  # bitset kernel
PAIR_NUM_WARPS = 8  # pair kernel: a 64 x 64 int32 tile held across 256 threads

# Every output buffer comes from here (tests swap in a poisoning allocator).
_alloc = torch.empty


def num_words(n_clusters: int) -> int:
    return (n_clusters + WORD_BITS - 1) // WORD_BITS


def _num_blocks(length: int, block: int) -> int:
    return (length + block - 1) // block


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _bit_or(a, b):
    return a | b


@triton.jit
def _cluster_bitset_kernel(
    IDS, BITS,
    stride_ib, stride_ih, stride_it, stride_ic,
    stride_bb, stride_bh, stride_bn, stride_bw,
    T, top_c, n_clusters, n_words,
    BLOCK: tl.constexpr, TOKEN_TILE: tl.constexpr, WORD_TILE: tl.constexpr, WORD_BITS: tl.constexpr,
):
    pid_n = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    offs_w = tl.arange(0, WORD_TILE)
    ids_base = IDS + tl.cast(b, tl.int64) * stride_ib + tl.cast(h, tl.int64) * stride_ih
    out_base = BITS + tl.cast(b, tl.int64) * stride_bb + tl.cast(h, tl.int64) * stride_bh + \
        tl.cast(pid_n, tl.int64) * stride_bn
    one = tl.full([TOKEN_TILE], 1, dtype=tl.int32)
    for w0 in range(0, n_words, WORD_TILE):
        words = tl.zeros([WORD_TILE], dtype=tl.int32)
        for t0 in range(0, BLOCK, TOKEN_TILE):  # the block's tokens, TOKEN_TILE at a time
            offs_t = pid_n * BLOCK + t0 + tl.arange(0, TOKEN_TILE)
            t_ok = offs_t < T
            for j in range(0, top_c):
                # -- each token's id: its word and its bit --
                ids = tl.load(ids_base + offs_t * stride_it + j * stride_ic, mask=t_ok, other=-1)
                ok = t_ok & (ids >= 0) & (ids < n_clusters)
                word = tl.where(ok, ids // WORD_BITS, -1)
                bit = one << tl.where(ok, ids % WORD_BITS, 0)
                # -- OR of the tokens' bits, word by word --
                hit = word[:, None] == (w0 + offs_w)[None, :]
                words = words | tl.reduce(tl.where(hit, bit[:, None], 0), 0, _bit_or)
        tl.store(out_base + (w0 + offs_w) * stride_bw, words, mask=(w0 + offs_w) < n_words)


@triton.jit
def _cluster_pairs_kernel(
    QB, KB, OUT,
    stride_qb, stride_qh, stride_qm, stride_qw,
    stride_kb, stride_kh, stride_kn, stride_kw,
    stride_ob, stride_oh, stride_om, stride_on,
    n_q_blocks, n_kv_blocks, n_words,
    TILE_M: tl.constexpr, TILE_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    offs_m = pid_m * TILE_M + tl.arange(0, TILE_M)
    m_ok = offs_m < n_q_blocks
    q_base = QB + tl.cast(b, tl.int64) * stride_qb + tl.cast(h, tl.int64) * stride_qh + offs_m * stride_qm
    k_base = KB + tl.cast(b, tl.int64) * stride_kb + tl.cast(h, tl.int64) * stride_kh
    o_base = OUT + tl.cast(b, tl.int64) * stride_ob + tl.cast(h, tl.int64) * stride_oh + \
        tl.cast(offs_m, tl.int64)[:, None] * stride_om
    for n0 in range(0, n_kv_blocks, TILE_N):
        offs_n = n0 + tl.arange(0, TILE_N)
        n_ok = offs_n < n_kv_blocks
        # -- do the two blocks share a cluster: AND of their bitsets, OR over the words --
        meet = tl.zeros([TILE_M, TILE_N], dtype=tl.int32)
        for w in range(0, n_words):
            qw = tl.load(q_base + w * stride_qw, mask=m_ok, other=0)
            kw = tl.load(k_base + offs_n * stride_kn + w * stride_kw, mask=n_ok, other=0)
            meet = meet | (qw[:, None] & kw[None, :])
        kept = (meet != 0).to(tl.uint8)
        tl.store(o_base + offs_n[None, :] * stride_on, kept, mask=m_ok[:, None] & n_ok[None, :])


# ----------------------------------------------------------------------------------------------
# argument checks (shared by the launchers and the references)
# ----------------------------------------------------------------------------------------------
def _check_block(name: str, block) -> int:
    if isinstance(block, bool) or not isinstance(block, int) or block < MIN_BLOCK or block & (block - 1):
        raise ValueError(f"{name} must be a power of two >= {MIN_BLOCK}, got {block!r}")
    return block


def _block_pair(block_size) -> tuple[int, int]:
    if isinstance(block_size, (tuple, list)):
        if len(block_size) != 2:
            raise ValueError(f"block_size must be an int or a pair (BLOCK_Q, BLOCK_KV), got {block_size!r}")
        return _check_block("block_size[0]", block_size[0]), _check_block("block_size[1]", block_size[1])
    block = _check_block("block_size", block_size)
    return block, block


def _check_ids(name: str, ids) -> None:
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (B, H, T, top_c), got {type(ids).__name__}")
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise TypeError(f"{name} must hold integer cluster ids, got {ids.dtype}")
    if ids.dim() != 4:
        raise ValueError(f"{name} must be 4-D (B, H, T, top_c), got shape {tuple(ids.shape)}")


def _check_n_clusters(n_clusters) -> int:
    if isinstance(n_clusters, bool) or not isinstance(n_clusters, int) or n_clusters < 1:
        raise ValueError(f"n_clusters must be a positive int, got {n_clusters!r}")
    return n_clusters


def _check_bits(q_bits, k_bits) -> None:
    for name, t in (("q_bits", q_bits), ("k_bits", k_bits)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.dtype != torch.int32:
            raise ValueError(f"{name} must be an int32 tensor (B, H, nBlocks, n_words)")
    if q_bits.shape[:2] != k_bits.shape[:2] or q_bits.shape[3] != k_bits.shape[3]:
        raise ValueError(f"q_bits {tuple(q_bits.shape)} and k_bits {tuple(k_bits.shape)} must agree on "
                         "(B, H) and n_words")
    if q_bits.device != k_bits.device:
        raise ValueError(f"q_bits is on {q_bits.device}, k_bits on {k_bits.device}")


def _check_pair(q_ids, k_ids) -> None:
    _check_ids("q_ids", q_ids)
    _check_ids("k_ids", k_ids)
    if q_ids.shape[:2] != k_ids.shape[:2]:
        raise ValueError(f"q_ids {tuple(q_ids.shape)} and k_ids {tuple(k_ids.shape)} must agree on (B, H)")
    if q_ids.device != k_ids.device:
        raise ValueError(f"q_ids is on {q_ids.device}, k_ids on {k_ids.device}")


def _kernel_device_ok(t: torch.Tensor, name: str) -> None:
    if t.device.type != "cuda" and not INTERPRET:
        raise RuntimeError(f"{name} needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors "
                           "(or use the *_reference / cluster_block_kinds_auto functions)")


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
@_on_tensor_device
def cluster_bitsets(ids: torch.Tensor, n_clusters: int, block: int) -> torch.Tensor:
    """Per block of ``block`` tokens, the clusters present: int32 ``(B, H, ceil(T / block), n_words)``,
    by the Triton kernel. ``ids (B, H, T, top_c)`` integer cluster ids (any strides; converted to int32),
    ``n_clusters >= 1``, ``block`` a power of two >= 16."""
    _check_ids("ids", ids)
    n_clusters, block = _check_n_clusters(n_clusters), _check_block("block", block)
    _kernel_device_ok(ids, "cluster_bitsets")
    if ids.dtype != torch.int32:  # out-of-range ids become -1 first: a cast would wrap them into range
        ids = torch.where((ids >= 0) & (ids < n_clusters), ids, -1).to(torch.int32)
    B, H, T, top_c = ids.shape
    nb, W = _num_blocks(T, block), num_words(n_clusters)
    bits = _alloc(B, H, nb, W, dtype=torch.int32, device=ids.device)
    if bits.numel():
        if top_c == 0:
            return bits.zero_()
        _cluster_bitset_kernel[(nb, H, B)](
            ids, bits, *ids.stride(), *bits.stride(), T, top_c, n_clusters, W,
            BLOCK=block, TOKEN_TILE=min(block, MAX_TOKEN_TILE),
            WORD_TILE=min(triton.next_power_of_2(W), MAX_WORD_TILE), WORD_BITS=WORD_BITS, num_warps=NUM_WARPS,
        )
    return bits


@_on_tensor_device
def cluster_block_pairs(q_bits: torch.Tensor, k_bits: torch.Tensor) -> torch.Tensor:
    """bool ``(B, H, nQb, nKb)``: True iff q block ``m`` and kv block ``n`` share a cluster, from the
    bitsets of :func:`cluster_bitsets` (int32 ``(B, H, nQb | nKb, n_words)``), by the Triton kernel."""
    _check_bits(q_bits, k_bits)
    _kernel_device_ok(q_bits, "cluster_block_pairs")
    B, H, nq, W = q_bits.shape
    nk = k_bits.shape[2]
    out = _alloc(B, H, nq, nk, dtype=torch.uint8, device=q_bits.device)
    if out.numel():
        _cluster_pairs_kernel[(triton.cdiv(nq, TILE_M), H, B)](
            q_bits, k_bits, out, *q_bits.stride(), *k_bits.stride(), *out.stride(), nq, nk, W,
            TILE_M=TILE_M, TILE_N=TILE_N, num_warps=PAIR_NUM_WARPS,
        )
    return out.view(torch.bool)


def cluster_block_kinds(q_ids: torch.Tensor, k_ids: torch.Tensor, n_clusters: int, block_size) -> torch.Tensor:
    """Kept block pairs bool ``(B, H, nQb, nKb)`` of the token graph "share a cluster", by the kernels:
    :func:`cluster_bitsets` of ``q_ids (B, H, Tq, top_c)`` and ``k_ids (B, H, Tk, top_c')`` with
    ``block_size`` (an int or ``(BLOCK_Q, BLOCK_KV)``), then :func:`cluster_block_pairs`."""
    _check_pair(q_ids, k_ids)
    bq, bk = _block_pair(block_size)
    return cluster_block_pairs(cluster_bitsets(q_ids, n_clusters, bq), cluster_bitsets(k_ids, n_clusters, bk))


# ----------------------------------------------------------------------------------------------
# plain-torch reference (and CPU fallback)
# ----------------------------------------------------------------------------------------------
def cluster_bitsets_reference(ids: torch.Tensor, n_clusters: int, block: int) -> torch.Tensor:
    """:func:`cluster_bitsets` in plain torch: presence scattered into a bool
    ``(B, H, nBlocks, 32 n_words)`` tensor, then packed into int32 words."""
    _check_ids("ids", ids)
    n_clusters, block = _check_n_clusters(n_clusters), _check_block("block", block)
    B, H, T, top_c = ids.shape
    nb, W = _num_blocks(T, block), num_words(n_clusters)
    width = W * WORD_BITS
    ids = ids.long()
    valid = (ids >= 0) & (ids < n_clusters)
    blk = (torch.arange(T, device=ids.device) // block)[:, None]
    slot = torch.where(valid, blk * width + ids, nb * width)  # invalid ids land in one spare slot
    present = torch.zeros(B, H, nb * width + 1, dtype=torch.bool, device=ids.device)
    present.scatter_(-1, slot.reshape(B, H, T * top_c), True)
    present = present[..., :nb * width].view(B, H, nb, W, WORD_BITS)
    words = (present.long() << torch.arange(WORD_BITS, device=ids.device)).sum(-1)  # [0, 2^32)
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)  # two's complement


def cluster_block_pairs_reference(q_bits: torch.Tensor, k_bits: torch.Tensor) -> torch.Tensor:
    """:func:`cluster_block_pairs` in plain torch, one word at a time over the ``(nQb, nKb)`` grid."""
    _check_bits(q_bits, k_bits)
    B, H, nq, W = q_bits.shape
    meet = torch.zeros(B, H, nq, k_bits.shape[2], dtype=torch.bool, device=q_bits.device)
    for w in range(W):
        meet |= (q_bits[..., :, None, w] & k_bits[..., None, :, w]) != 0
    return meet


def cluster_block_kinds_reference(q_ids: torch.Tensor, k_ids: torch.Tensor, n_clusters: int,
                                  block_size) -> torch.Tensor:
    """:func:`cluster_block_kinds` in plain torch."""
    _check_pair(q_ids, k_ids)
    bq, bk = _block_pair(block_size)
    return cluster_block_pairs_reference(cluster_bitsets_reference(q_ids, n_clusters, bq),
                                         cluster_bitsets_reference(k_ids, n_clusters, bk))


def cluster_block_kinds_auto(q_ids: torch.Tensor, k_ids: torch.Tensor, n_clusters: int, block_size, *,
                             use_kernel: bool | None = None) -> torch.Tensor:
    """:func:`cluster_block_kinds` on CUDA, :func:`cluster_block_kinds_reference` elsewhere; ``use_kernel``
    forces the choice (True on CPU needs ``TRITON_INTERPRET=1``)."""
    if use_kernel is None:
        use_kernel = q_ids.device.type == "cuda"
    fn = cluster_block_kinds if use_kernel else cluster_block_kinds_reference
    return fn(q_ids, k_ids, n_clusters, block_size)


# ----------------------------------------------------------------------------------------------
# edge counts (plain torch on every device)
# ----------------------------------------------------------------------------------------------
def cluster_histograms(ids: torch.Tensor, n_clusters: int, block: int) -> torch.Tensor:
    """float32 ``(B, H, nBlocks, n_clusters)``: per block of ``block`` tokens, how many of its tokens have
    cluster ``c`` among their ids (ids outside ``[0, n_clusters)`` ignored)."""
    _check_ids("ids", ids)
    n_clusters, block = _check_n_clusters(n_clusters), _check_block("block", block)
    B, H, T, top_c = ids.shape
    nb = _num_blocks(T, block)
    ids = ids.long()
    valid = (ids >= 0) & (ids < n_clusters)
    blk = (torch.arange(T, device=ids.device) // block)[:, None]
    slot = torch.where(valid, blk * n_clusters + ids, nb * n_clusters)  # invalid ids: one spare slot
    hist = torch.zeros(B, H, nb * n_clusters + 1, dtype=torch.float32, device=ids.device)
    hist.scatter_add_(-1, slot.reshape(B, H, T * top_c), torch.ones(B, H, T * top_c, device=ids.device))
    return hist[..., :nb * n_clusters].view(B, H, nb, n_clusters)


def cluster_block_edges(q_ids: torch.Tensor, k_ids: torch.Tensor, n_clusters: int, block_size) -> torch.Tensor:
    """float64 ``(B, H, nQb, nKb)``: connected (query, key, shared cluster) triples per block pair, i.e.
    ``hist_q @ hist_k^T`` of :func:`cluster_histograms` (the number of token pairs sharing a cluster when
    each token has one id). Exact integers: the product runs in float64 (no reduced-precision matmul
    path), on the small block grid. Zero iff :func:`cluster_block_kinds` cuts the pair."""
    _check_pair(q_ids, k_ids)
    bq, bk = _block_pair(block_size)
    hq, hk = cluster_histograms(q_ids, n_clusters, bq), cluster_histograms(k_ids, n_clusters, bk)
    return hq.double() @ hk.double().transpose(-1, -2)
