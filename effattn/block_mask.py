"""Block masks of effattn's block-sparse attention: which ``(BLOCK_Q x BLOCK_KV)`` tiles of the score
matrix are computed, and how the cut ones are masked inside.

The score matrix ``(Tq, Tk)`` is cut into a grid of ``nQb x nKb`` blocks (``nQb = ceil(Tq / BLOCK_Q)``,
``nKb = ceil(Tk / BLOCK_KV)``; a ragged last block holds only the rows/columns that exist). Every block
is of one kind:

* ``NONE``: no element visible; the kernel skips it.
* ``FULL``: every existing element visible; the kernel computes it without an elementwise mask.
* ``PARTIAL``: some elements visible; the kernel applies the mask's elementwise :class:`MaskRule`.

Stored like FlexAttention's block mask (compressed rows): per ``(b, h, q block)`` the number of PARTIAL
kv blocks and their indices (ascending, then padding), the same for FULL kv blocks, and the transpose
(per kv block, its q blocks) for the backward. ``B`` and ``H`` may be 1 (broadcast over the batch /
heads of q).

Constructors (:meth:`BlockMask.causal`, :meth:`~BlockMask.sliding_window`, :meth:`~BlockMask.global_tokens`,
:meth:`~BlockMask.from_segments`, :meth:`~BlockMask.bigbird`, :meth:`~BlockMask.from_rule`) classify
blocks on the block grid from per-block ranges of positions and segment ids: none of them builds a
dense ``Tq x Tk`` tensor. Classification is always safe (a FULL block is entirely visible, a NONE block
entirely invisible) and exact (a PARTIAL block is really mixed) for windows (causal, sliding), global
tokens, their union, and segments (with up to :data:`SEGMENT_BITSET_MAX` distinct ids, any order);
a window and segments that both cut one block give PARTIAL even when their intersection is empty
or full there.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass

import torch

from effattn import limits

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "FULL",
    "MIN_BLOCK_SIZE",
    "NONE",
    "PARTIAL",
    "SEGMENT_BITSET_MAX",
    "BlockMask",
    "MaskRule",
    "intersection",
    "union",
]

NONE, PARTIAL, FULL = 0, 1, 2  # block kinds, ordered so that union = max and intersection = min
KIND_DTYPE = torch.uint8
INDEX_DTYPE = torch.int32  # every block count / index list, and segment ids
MIN_BLOCK_SIZE = limits.MIN_BLOCK_SIZE
DEFAULT_BLOCK_SIZE = (64, 64)
SEGMENT_BITSET_MAX = 4096  # up to this many distinct segment ids, NONE blocks are found exactly (bitsets)
_WORD_BITS = 63  # bits per int64 word of a segment bitset (the sign bit is left unused)
_INT32 = torch.iinfo(torch.int32)


# ----------------------------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------------------------
def _int(name: str, value, minimum: int | None = None) -> int:
    if isinstance(value, bool) or isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _bound(name: str, value) -> int:
    """A window bound: an int, negative or None meaning unbounded (normalised to -1)."""
    if value is None:
        return -1
    value = _int(name, value)
    return -1 if value < 0 else value


def _block_size(block_size, name: str = "block_size") -> tuple[int, int]:
    if isinstance(block_size, (tuple, list)):
        if len(block_size) != 2:
            raise ValueError(f"{name} must be an int or a pair (BLOCK_Q, BLOCK_KV), got {block_size!r}")
        sizes = tuple(_int(f"{name}[{i}]", s) for i, s in enumerate(block_size))
    else:
        s = _int(name, block_size)
        sizes = (s, s)
    for s in sizes:
        if s < MIN_BLOCK_SIZE or s & (s - 1):
            raise ValueError(f"{name} must be powers of two >= {MIN_BLOCK_SIZE}, got {block_size!r}")
    return sizes


def _segments(name: str, seg) -> torch.Tensor:
    if not isinstance(seg, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of segment ids (B, T), got {type(seg).__name__}")
    if seg.dtype == torch.bool or seg.is_floating_point() or seg.is_complex():
        raise TypeError(f"{name} must hold integer segment ids, got {seg.dtype}")
    if seg.dim() != 2:
        raise ValueError(f"{name} must be 2-D (B, T), got shape {tuple(seg.shape)}")
    if seg.dtype != INDEX_DTYPE:
        if seg.numel() and (int(seg.min()) < _INT32.min or int(seg.max()) > _INT32.max):
            raise ValueError(f"{name} holds ids outside the int32 range")
        seg = seg.to(INDEX_DTYPE)
    return seg


def _equal_tensors(pairs) -> bool:
    return all(a.shape == b.shape and a.device == b.device and torch.equal(a, b) for a, b in pairs)


def _num_blocks(length: int, block: int) -> int:
    return (length + block - 1) // block


def _import_flex():
    try:
        from torch.nn.attention import flex_attention
    except ImportError as e:  # pragma: no cover - torch without FlexAttention
        raise ImportError("BlockMask.to_flex / from_flex need torch.nn.attention.flex_attention "
                          f"(torch >= 2.5); this torch is {torch.__version__}") from e
    return flex_attention


# ----------------------------------------------------------------------------------------------
# the elementwise rule
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class MaskRule:
    """Elementwise rule inside PARTIAL blocks: ``visible(i, j) = (window(i, j) and segment(i, j)) or global(i, j)``.

    * window: ``-window_left <= j - i - diag_offset <= window_right`` (a negative bound = unbounded side;
      both unbounded = always true). Causal attention is ``window_right = 0``; ``diag_offset = Tk - Tq``
      aligns it to the bottom-right corner.
    * segment: ``q_segments[b, i] == kv_segments[b, j]`` (True when ``q_segments`` is None).
      ``q_segments (B, Tq)`` and ``kv_segments (B, Tk)`` are integer ids stored as int32, ``B`` may be 1
      (broadcast); ``kv_segments`` defaults to ``q_segments``.
    * global: ``i < n_global or j < n_global`` (False when ``n_global == 0``).

    Window bounds are normalised (any negative bound, or None, becomes -1). Rules compare by identity
    (``eq=False``); :meth:`same_as` compares their contents.
    """

    window_left: int = -1
    window_right: int = -1
    diag_offset: int = 0
    q_segments: torch.Tensor | None = None
    kv_segments: torch.Tensor | None = None
    n_global: int = 0

    def __post_init__(self):
        set_ = object.__setattr__  # frozen: normalise in place once
        set_(self, "window_left", _bound("window_left", self.window_left))
        set_(self, "window_right", _bound("window_right", self.window_right))
        set_(self, "diag_offset", _int("diag_offset", self.diag_offset))
        set_(self, "n_global", _int("n_global", self.n_global, minimum=0))
        if self.q_segments is None:
            if self.kv_segments is not None:
                raise ValueError("kv_segments given without q_segments: pass q_segments too")
            return
        qs = _segments("q_segments", self.q_segments)
        ks = qs if self.kv_segments is None else _segments("kv_segments", self.kv_segments)
        if qs.shape[0] != ks.shape[0] and 1 not in (qs.shape[0], ks.shape[0]):
            raise ValueError(f"q_segments and kv_segments have batch sizes {qs.shape[0]} and {ks.shape[0]}: "
                             "they must be equal or 1")
        if qs.device != ks.device:
            raise ValueError(f"q_segments is on {qs.device}, kv_segments on {ks.device}")
        set_(self, "q_segments", qs)
        set_(self, "kv_segments", ks)

    @property
    def has_window(self) -> bool:
        return self.window_left >= 0 or self.window_right >= 0

    @property
    def batch(self) -> int:
        """Batch size of the segments (1 without segments, or when both broadcast)."""
        if self.q_segments is None:
            return 1
        return max(self.q_segments.shape[0], self.kv_segments.shape[0])

    def visible(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Visibility of query rows ``rows (R,)`` against keys ``cols (C,)`` (int64 positions):
        bool ``(Bs, R, C)``, ``Bs`` = :attr:`batch` (1 without segments)."""
        rows, cols = rows.long(), cols.long()
        keep = torch.ones(1, rows.shape[0], cols.shape[0], dtype=torch.bool, device=rows.device)
        if self.has_window:
            d = cols[None, :] - rows[:, None] - self.diag_offset
            if self.window_left >= 0:
                keep = keep & (d >= -self.window_left)
            if self.window_right >= 0:
                keep = keep & (d <= self.window_right)
        if self.q_segments is not None:
            qs = self.q_segments.to(rows.device)[:, rows]
            ks = self.kv_segments.to(rows.device)[:, cols]
            keep = keep & (qs[:, :, None] == ks[:, None, :])
        if self.n_global > 0:
            keep = keep | (rows < self.n_global)[:, None] | (cols < self.n_global)[None, :]
        return keep

    def same_as(self, other: MaskRule | None) -> bool:
        """True if ``other`` is this rule or a rule with the same fields and segment tensors."""
        if other is self:
            return True
        if not isinstance(other, MaskRule):
            return False
        if (self.window_left, self.window_right, self.diag_offset, self.n_global) != (
                other.window_left, other.window_right, other.diag_offset, other.n_global):
            return False
        if (self.q_segments is None) != (other.q_segments is None):
            return False
        if self.q_segments is None:
            return True
        return _equal_tensors(((self.q_segments, other.q_segments), (self.kv_segments, other.kv_segments)))

    def check_lengths(self, q_len: int, kv_len: int) -> None:
        """Raise ValueError unless the segments cover ``q_len`` queries and ``kv_len`` keys."""
        if self.q_segments is None:
            return
        if self.q_segments.shape[1] != q_len:
            raise ValueError(f"q_segments has {self.q_segments.shape[1]} positions, the mask q_len={q_len}")
        if self.kv_segments.shape[1] != kv_len:
            raise ValueError(f"kv_segments has {self.kv_segments.shape[1]} positions, the mask kv_len={kv_len}")

    def to(self, device) -> MaskRule:
        """The rule with its segment tensors on ``device``."""
        if self.q_segments is None:
            return self
        return dataclasses.replace(self, q_segments=self.q_segments.to(device),
                                   kv_segments=self.kv_segments.to(device))

    def __repr__(self) -> str:
        parts = []
        if self.has_window:
            parts.append(f"window=({self.window_left}, {self.window_right}), diag_offset={self.diag_offset}")
        if self.q_segments is not None:
            parts.append(f"segments={tuple(self.q_segments.shape)}x{tuple(self.kv_segments.shape)}")
        if self.n_global:
            parts.append(f"n_global={self.n_global}")
        return f"MaskRule({', '.join(parts)})"


# ----------------------------------------------------------------------------------------------
# block classification of a rule, on the block grid
# ----------------------------------------------------------------------------------------------
def _segment_stats(seg: torch.Tensor, start: torch.Tensor, block: int, n_blocks: int, ranks: torch.Tensor | None,
                   n_ids: int):
    """Per-block min, max and (with ``ranks``) presence bitsets of the segment ids at positions
    ``p >= start[p // block]`` (the positions of each block that are kept). Returns ``(lo, hi, words)``,
    ``(Bs, n_blocks)`` int64 each and ``(Bs, n_blocks, W)`` int64 or None."""
    Bs, T = seg.shape
    pos = torch.arange(T, device=seg.device)
    blk = pos // block
    kept = pos >= start[blk]
    big = torch.iinfo(torch.int64).max
    s = seg.long()
    idx = blk.expand(Bs, T)
    lo = torch.full((Bs, n_blocks), big, dtype=torch.int64, device=seg.device)
    hi = torch.full((Bs, n_blocks), -big, dtype=torch.int64, device=seg.device)
    lo.scatter_reduce_(1, idx, s.masked_fill(~kept, big), "amin")
    hi.scatter_reduce_(1, idx, s.masked_fill(~kept, -big), "amax")
    words = None
    if ranks is not None:
        n_words = max(1, _num_blocks(n_ids, _WORD_BITS))
        present = torch.zeros(Bs, n_blocks, n_words * _WORD_BITS, dtype=torch.bool, device=seg.device)
        b = torch.arange(Bs, device=seg.device)[:, None].expand(Bs, T)
        present[b[:, kept], idx[:, kept], ranks[:, kept]] = True
        bits = torch.arange(_WORD_BITS, device=seg.device)
        words = (present.view(Bs, n_blocks, n_words, _WORD_BITS).long() << bits).sum(-1)
    return lo, hi, words


def _segment_kinds(rule: MaskRule, gr0, gc0, bq: int, bk: int, nq: int, nk: int):
    """``(all, none)`` bool ``(Bs, nq, nk)``: the segment term true on all / none of each block's kept
    rectangle (rows ``>= gr0``, columns ``>= gc0``). Exact with at most SEGMENT_BITSET_MAX distinct ids."""
    qs, ks = rule.q_segments, rule.kv_segments
    ids, inverse = torch.unique(torch.cat([qs.flatten(), ks.flatten()]), return_inverse=True)
    exact = ids.numel() <= SEGMENT_BITSET_MAX
    q_ranks = inverse[:qs.numel()].view(qs.shape) if exact else None
    k_ranks = inverse[qs.numel():].view(ks.shape) if exact else None
    qlo, qhi, qw = _segment_stats(qs, gr0, bq, nq, q_ranks, ids.numel())
    klo, khi, kw = _segment_stats(ks, gc0, bk, nk, k_ranks, ids.numel())
    qlo, qhi, klo, khi = qlo[:, :, None], qhi[:, :, None], klo[:, None, :], khi[:, None, :]
    all_ = (qlo == qhi) & (klo == khi) & (qlo == klo)
    none = (qhi < klo) | (khi < qlo)
    if exact:
        meet = torch.zeros_like(none)
        for w in range(qw.shape[-1]):
            meet |= (qw[:, :, None, w] & kw[:, None, :, w]) != 0
        none = none | ~meet
    return all_, none


def _classify(rule: MaskRule, q_len: int, kv_len: int, block_size: tuple[int, int], device) -> torch.Tensor:
    """Block kinds ``(Bs, nQb, nKb)`` uint8 of ``rule``, from per-block position ranges and segment stats.

    The global term is false exactly on the sub-rectangle rows ``>= n_global`` x columns ``>= n_global``
    of a block; the block is FULL iff that sub-rectangle is empty or ``window and segment`` holds on all
    of it, NONE iff it is the whole block and ``window and segment`` holds nowhere on it.
    """
    bq, bk = block_size
    nq, nk = _num_blocks(q_len, bq), _num_blocks(kv_len, bk)
    n = rule.n_global
    r0 = torch.arange(nq, device=device) * bq
    r1 = (r0 + bq).clamp_max(q_len)
    c0 = torch.arange(nk, device=device) * bk
    c1 = (c0 + bk).clamp_max(kv_len)
    gr0, gc0 = r0.clamp_min(n), c0.clamp_min(n)  # the rectangle where the global term is false
    global_all = (gr0 >= r1)[:, None] | (gc0 >= c1)[None, :]
    global_some = (gr0 > r0)[:, None] | (gc0 > c0)[None, :]

    # window on rows [gr0, r1) x cols [gc0, c1): d = j - i - diag takes every value in [dmin, dmax]
    dmin = gc0[None, :] - (r1 - 1)[:, None] - rule.diag_offset
    dmax = (c1 - 1)[None, :] - gr0[:, None] - rule.diag_offset
    ws_all = torch.ones(1, nq, nk, dtype=torch.bool, device=device)
    ws_none = torch.zeros(1, nq, nk, dtype=torch.bool, device=device)
    if rule.window_left >= 0:
        ws_all = ws_all & (dmin >= -rule.window_left)
        ws_none = ws_none | (dmax < -rule.window_left)
    if rule.window_right >= 0:
        ws_all = ws_all & (dmax <= rule.window_right)
        ws_none = ws_none | (dmin > rule.window_right)
    if rule.q_segments is not None:
        seg_all, seg_none = _segment_kinds(rule.to(device), gr0, gc0, bq, bk, nq, nk)
        ws_all = ws_all & seg_all
        ws_none = ws_none | seg_none

    full = global_all | ws_all
    none = ~global_some & ws_none
    kinds = torch.full(full.shape, PARTIAL, dtype=KIND_DTYPE, device=device)
    kinds.masked_fill_(none, NONE)
    return kinds.masked_fill_(full, FULL)


# ----------------------------------------------------------------------------------------------
# compressed lists
# ----------------------------------------------------------------------------------------------
def _compress(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool ``(..., R, C)`` -> counts int32 ``(..., R)`` and indices int32 ``(..., R, C)``: the kept
    columns of each row first, ascending, then zeros."""
    num = keep.sum(-1, dtype=INDEX_DTYPE)
    order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)
    slot = torch.arange(keep.shape[-1], device=keep.device)
    idx = torch.where(slot < num[..., None], order, 0).to(INDEX_DTYPE)
    return num.contiguous(), idx.contiguous()


def _expand_list(num: torch.Tensor, idx: torch.Tensor, n_cols: int) -> torch.Tensor:
    """Inverse of :func:`_compress`: bool ``(..., R, n_cols)``; indices past ``n_cols`` are dropped."""
    listed = torch.arange(idx.shape[-1], device=idx.device) < num[..., None].long()
    cols = torch.where(listed & (idx >= 0) & (idx < n_cols), idx.long(), n_cols)
    out = torch.zeros(*idx.shape[:-1], n_cols + 1, dtype=torch.bool, device=idx.device)
    return out.scatter_(-1, cols, True)[..., :n_cols]


_LIST_NAMES = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
               "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")
# BlockMask.as_tuple(): the tensors are the lists then the rule's segments (or None); the ints are these.
_INT_NAMES = ("q_len", "kv_len", "block_q", "block_kv", "has_rule", "window_left", "window_right", "diag_offset",
              "n_global")


class BlockMask:
    """Block mask of block-sparse attention over queries ``(B, H, Tq, D)`` and keys ``(B, H, Tk, D)``.

    Attributes:
        q_len, kv_len: ``Tq``, ``Tk``.
        block_size: ``(BLOCK_Q, BLOCK_KV)``, powers of two >= 16.
        kv_num_blocks ``(B, H, nQb)`` int32: PARTIAL kv blocks per q block;
        kv_indices ``(B, H, nQb, nKb)`` int32: their indices first (ascending), then padding (0);
        full_kv_num_blocks, full_kv_indices: the same for FULL kv blocks;
        q_num_blocks ``(B, H, nKb)``, q_indices ``(B, H, nKb, nQb)``, full_q_num_blocks, full_q_indices:
        the transpose (per kv block, its PARTIAL / FULL q blocks), for the backward.
        rule: the :class:`MaskRule` applied inside PARTIAL blocks; None when there are none.

    ``B`` and ``H`` may be 1 (broadcast). Build one with the constructors (:meth:`causal`,
    :meth:`sliding_window`, :meth:`global_tokens`, :meth:`from_segments`, :meth:`bigbird`,
    :meth:`from_rule`, :meth:`from_block_kinds`, :meth:`from_dense_blocks`, :meth:`from_flex`) and
    combine with ``|`` / ``&``. :meth:`from_lists` (and the constructor) take the eight lists as they
    are, checking shapes and dtypes only; :meth:`check` also checks their values. :meth:`as_tuple` /
    :meth:`from_tuple` turn a mask into a list of tensors and a list of ints and back (as it crosses the
    boundary of a torch op).
    """

    def __init__(self, kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor, full_kv_num_blocks: torch.Tensor,
                 full_kv_indices: torch.Tensor, q_num_blocks: torch.Tensor, q_indices: torch.Tensor,
                 full_q_num_blocks: torch.Tensor, full_q_indices: torch.Tensor, *, q_len: int, kv_len: int,
                 block_size, rule: MaskRule | None = None):
        self.q_len = _int("q_len", q_len, minimum=1)
        self.kv_len = _int("kv_len", kv_len, minimum=1)
        self.block_size = _block_size(block_size)
        if rule is not None and not isinstance(rule, MaskRule):
            raise TypeError(f"rule must be a MaskRule or None, got {type(rule).__name__}")
        lists = (kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, q_num_blocks, q_indices,
                 full_q_num_blocks, full_q_indices)
        nq, nk = _num_blocks(self.q_len, self.block_size[0]), _num_blocks(self.kv_len, self.block_size[1])
        for name, t in zip(_LIST_NAMES, lists):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype != INDEX_DTYPE:
                raise TypeError(f"{name} must be int32, got {t.dtype}")
        B, H = kv_indices.shape[:2] if kv_indices.dim() == 4 else (None, None)
        expect = {"kv_num_blocks": (nq,), "kv_indices": (nq, nk), "q_num_blocks": (nk,), "q_indices": (nk, nq)}
        for name, t in zip(_LIST_NAMES, lists):
            tail = expect[name.removeprefix("full_")]
            if B is None or tuple(t.shape) != (B, H, *tail):
                raise ValueError(f"{name} must have shape (B, H, {', '.join(map(str, tail))}) for q_len={q_len}, "
                                 f"kv_len={kv_len}, block_size={self.block_size} (B, H as in kv_indices), "
                                 f"got {tuple(t.shape)}")
            if t.device != kv_indices.device:
                raise ValueError(f"{name} is on {t.device}, kv_indices on {kv_indices.device}")
        if rule is not None:
            rule.check_lengths(self.q_len, self.kv_len)
            if rule.batch not in (1, B) and B != 1:
                raise ValueError(f"rule's segments have batch {rule.batch}, the block lists {B}: "
                                 "they must be equal or 1")
            rule = rule.to(kv_indices.device)
        (self.kv_num_blocks, self.kv_indices, self.full_kv_num_blocks, self.full_kv_indices, self.q_num_blocks,
         self.q_indices, self.full_q_num_blocks, self.full_q_indices) = lists
        self.rule = rule
        self._kinds: torch.Tensor | None = None

    # ------------------------------------------------------------------------------------------
    # constructors
    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_lists(cls, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, q_num_blocks, q_indices,
                   full_q_num_blocks, full_q_indices, *, q_len: int, kv_len: int, block_size,
                   rule: MaskRule | None = None) -> BlockMask:
        """The eight compressed lists as they are (shapes and dtypes checked, values not: see :meth:`check`)."""
        return cls(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, q_num_blocks, q_indices,
                   full_q_num_blocks, full_q_indices, q_len=q_len, kv_len=kv_len, block_size=block_size, rule=rule)

    def as_tuple(self) -> tuple[list[torch.Tensor | None], list[int]]:
        """The mask as ``(tensors, ints)``, the argument types of a torch custom op (``Tensor?[]``, ``int[]``):
        the eight lists and the rule's segment ids (None without), then the lengths, the block size and
        the rule's scalars. :meth:`from_tuple` rebuilds the mask."""
        rule = self.rule
        tensors = [getattr(self, name) for name in _LIST_NAMES]
        tensors += [None, None] if rule is None else [rule.q_segments, rule.kv_segments]
        window = (-1, -1, 0, 0) if rule is None else (rule.window_left, rule.window_right, rule.diag_offset,
                                                       rule.n_global)
        return tensors, [self.q_len, self.kv_len, *self.block_size, int(rule is not None), *window]

    @classmethod
    def from_tuple(cls, value) -> BlockMask:
        """Inverse of :meth:`as_tuple`: the mask from ``(tensors, ints)`` (shapes and dtypes checked)."""
        if not isinstance(value, (tuple, list)) or len(value) != 2:
            raise TypeError(f"from_tuple takes the pair (tensors, ints) of BlockMask.as_tuple(), got {value!r}")
        tensors, ints = value
        n_tensors = len(_LIST_NAMES) + 2
        if not isinstance(tensors, (tuple, list)) or len(tensors) != n_tensors:
            raise ValueError(f"from_tuple: tensors must be a list of {n_tensors} (the lists, then q and kv segments)")
        if not isinstance(ints, (tuple, list)) or len(ints) != len(_INT_NAMES):
            raise ValueError(f"from_tuple: ints must be a list of {len(_INT_NAMES)}: {', '.join(_INT_NAMES)}")
        q_len, kv_len, block_q, block_kv, has_rule, window_left, window_right, diag_offset, n_global = ints
        *lists, q_segments, kv_segments = tensors
        rule = None
        if has_rule:
            rule = MaskRule(window_left=window_left, window_right=window_right, diag_offset=diag_offset,
                            q_segments=q_segments, kv_segments=kv_segments, n_global=n_global)
        return cls(*lists, q_len=q_len, kv_len=kv_len, block_size=(block_q, block_kv), rule=rule)

    @classmethod
    def from_block_kinds(cls, kinds: torch.Tensor, q_len: int, kv_len: int, block_size=DEFAULT_BLOCK_SIZE,
                         rule: MaskRule | None = None) -> BlockMask:
        """From block kinds ``(B, H, nQb, nKb)`` (uint8, or any integer dtype, values NONE/PARTIAL/FULL).

        PARTIAL blocks need ``rule``. The forward and transposed lists are built here, once."""
        if not isinstance(kinds, torch.Tensor):
            raise TypeError(f"kinds must be a torch.Tensor, got {type(kinds).__name__}")
        if kinds.dtype == torch.bool or kinds.is_floating_point() or kinds.is_complex():
            raise TypeError(f"kinds must be uint8 (NONE=0, PARTIAL=1, FULL=2), got {kinds.dtype}")
        q_len, kv_len = _int("q_len", q_len, minimum=1), _int("kv_len", kv_len, minimum=1)
        bq, bk = _block_size(block_size)
        nq, nk = _num_blocks(q_len, bq), _num_blocks(kv_len, bk)
        if kinds.dim() != 4 or tuple(kinds.shape[2:]) != (nq, nk):
            raise ValueError(f"kinds must have shape (B, H, {nq}, {nk}) for q_len={q_len}, kv_len={kv_len}, "
                             f"block_size={(bq, bk)}, got {tuple(kinds.shape)}")
        if kinds.numel() and (int(kinds.min()) < NONE or int(kinds.max()) > FULL):
            raise ValueError(f"kinds must hold NONE={NONE}, PARTIAL={PARTIAL} or FULL={FULL}")
        partial, full = kinds == PARTIAL, kinds == FULL
        if rule is None and bool(partial.any()):
            raise ValueError("kinds has PARTIAL blocks but rule is None: PARTIAL blocks need an elementwise rule")
        lists = (*_compress(partial), *_compress(full), *_compress(partial.transpose(-1, -2)),
                 *_compress(full.transpose(-1, -2)))
        mask = cls(*lists, q_len=q_len, kv_len=kv_len, block_size=(bq, bk), rule=rule)
        mask._kinds = kinds.to(KIND_DTYPE).contiguous()
        return mask

    @classmethod
    def from_dense_blocks(cls, blocks: torch.Tensor, q_len: int, kv_len: int,
                          block_size=DEFAULT_BLOCK_SIZE) -> BlockMask:
        """From a bool block grid ``(B, H, nQb, nKb)``: kept blocks are FULL, there is no rule."""
        if not isinstance(blocks, torch.Tensor) or blocks.dtype != torch.bool:
            raise TypeError("blocks must be a bool torch.Tensor (B, H, nQb, nKb), got "
                            f"{blocks.dtype if isinstance(blocks, torch.Tensor) else type(blocks).__name__}")
        return cls.from_block_kinds(blocks.to(KIND_DTYPE) * FULL, q_len, kv_len, block_size)

    @classmethod
    def from_rule(cls, rule: MaskRule, q_len: int, kv_len: int, block_size=DEFAULT_BLOCK_SIZE, batch: int = 1,
                  heads: int = 1, device=None) -> BlockMask:
        """Blocks classified for any :class:`MaskRule` (see the module notes on exactness).

        The result has ``B = max(batch, rule.batch)`` (a segment batch > 1 must equal ``batch`` or
        ``batch`` must be 1) and ``H = heads`` (all heads alike). ``device`` defaults to the segments'
        device, else CPU."""
        if not isinstance(rule, MaskRule):
            raise TypeError(f"rule must be a MaskRule, got {type(rule).__name__}")
        q_len, kv_len = _int("q_len", q_len, minimum=1), _int("kv_len", kv_len, minimum=1)
        batch, heads = _int("batch", batch, minimum=1), _int("heads", heads, minimum=1)
        block_size = _block_size(block_size)
        rule.check_lengths(q_len, kv_len)
        if rule.batch != 1 and batch not in (1, rule.batch):
            raise ValueError(f"batch={batch} but the rule's segments have batch {rule.batch}")
        if device is None:
            device = rule.q_segments.device if rule.q_segments is not None else "cpu"
        kinds = _classify(rule, q_len, kv_len, block_size, torch.device(device))
        B = max(batch, kinds.shape[0])
        kinds = kinds[:, None].expand(B, heads, *kinds.shape[1:]).contiguous()
        return cls.from_block_kinds(kinds, q_len, kv_len, block_size, rule)

    @classmethod
    def causal(cls, q_len: int, kv_len: int, block_size=DEFAULT_BLOCK_SIZE, bottom_right: bool = True,
               device=None) -> BlockMask:
        """Causal mask: query ``i`` sees keys ``j <= i + diag_offset``, ``diag_offset = kv_len - q_len``
        (``bottom_right``, FlashAttention's alignment) or 0 (top-left, torch SDPA's ``is_causal``)."""
        return cls.sliding_window(q_len, kv_len, -1, 0, block_size, bottom_right, device)

    @classmethod
    def sliding_window(cls, q_len: int, kv_len: int, left: int | None, right: int | None,
                       block_size=DEFAULT_BLOCK_SIZE, bottom_right: bool = True, device=None) -> BlockMask:
        """Query ``i`` sees keys ``i + off - left <= j <= i + off + right`` (``off = kv_len - q_len`` with
        ``bottom_right``, else 0); a negative or None bound leaves that side open."""
        q_len, kv_len = _int("q_len", q_len, minimum=1), _int("kv_len", kv_len, minimum=1)
        rule = MaskRule(window_left=_bound("left", left), window_right=_bound("right", right),
                        diag_offset=kv_len - q_len if bottom_right else 0)
        return cls.from_rule(rule, q_len, kv_len, block_size, device=device)

    @classmethod
    def global_tokens(cls, q_len: int, kv_len: int, n_global: int, block_size=DEFAULT_BLOCK_SIZE,
                      device=None) -> BlockMask:
        """Only the global rows and columns visible: ``i < n_global or j < n_global``.

        (The rule's window is made empty — width 0 at ``diag_offset = kv_len``, beyond every key — so
        that only its global term remains.)"""
        q_len, kv_len = _int("q_len", q_len, minimum=1), _int("kv_len", kv_len, minimum=1)
        rule = MaskRule(window_left=0, window_right=0, diag_offset=kv_len, n_global=_int("n_global", n_global, 0))
        return cls.from_rule(rule, q_len, kv_len, block_size, device=device)

    @classmethod
    def from_segments(cls, q_segments: torch.Tensor, kv_segments: torch.Tensor | None = None,
                      block_size=DEFAULT_BLOCK_SIZE) -> BlockMask:
        """Block-diagonal by segment: query ``i`` sees key ``j`` iff ``q_segments[b, i] == kv_segments[b, j]``.

        ``q_segments (B, Tq)``, ``kv_segments (B, Tk)`` (default ``q_segments``): integer ids, any order
        (packed documents, a question/context split). A block pair is FULL iff both blocks hold one and
        the same id; NONE iff they share no id (exact up to SEGMENT_BITSET_MAX distinct ids; beyond, only
        disjoint id ranges give NONE)."""
        rule = MaskRule(q_segments=q_segments, kv_segments=kv_segments)
        return cls.from_rule(rule, rule.q_segments.shape[1], rule.kv_segments.shape[1], block_size)

    @classmethod
    def bigbird(cls, q_len: int, kv_len: int, window, n_global: int, n_random_blocks: int,
                block_size=DEFAULT_BLOCK_SIZE, generator: torch.Generator | None = None, *, batch: int = 1,
                heads: int = 1, bottom_right: bool = True, device=None) -> BlockMask:
        """BigBird: (sliding window ``window`` ∪ ``n_global`` global tokens) ∪ ``n_random_blocks`` random
        FULL kv blocks per ``(b, h, q block)``.

        ``window``: ``w`` (``left = right = w``) or ``(left, right)``. The random blocks are drawn from
        ``generator`` (CPU; reproducible), distinct, among the blocks not already FULL first."""
        if isinstance(window, (tuple, list)):
            if len(window) != 2:
                raise ValueError(f"window must be an int or a pair (left, right), got {window!r}")
            left, right = _bound("window[0]", window[0]), _bound("window[1]", window[1])
        else:
            left = right = _int("window", window, minimum=0)
        n_random_blocks = _int("n_random_blocks", n_random_blocks, minimum=0)
        q_len, kv_len = _int("q_len", q_len, minimum=1), _int("kv_len", kv_len, minimum=1)
        rule = MaskRule(window_left=left, window_right=right, diag_offset=kv_len - q_len if bottom_right else 0,
                        n_global=_int("n_global", n_global, minimum=0))
        base = cls.from_rule(rule, q_len, kv_len, block_size, batch=batch, heads=heads, device=device)
        if n_random_blocks == 0:
            return base
        kinds = base.block_kinds()
        scores = torch.rand(kinds.shape, generator=generator).to(kinds.device)
        scores = scores.masked_fill(kinds == FULL, -1.0)  # already fully visible: drawn last
        picked = scores.topk(min(n_random_blocks, base.num_kv_blocks), dim=-1).indices
        random = torch.zeros(kinds.shape, dtype=torch.bool, device=kinds.device).scatter_(-1, picked, True)
        return base | cls.from_dense_blocks(random, q_len, kv_len, base.block_size)

    @classmethod
    def random(cls, q_len: int, kv_len: int, density: float, block_size=DEFAULT_BLOCK_SIZE, *, batch: int = 1,
               heads: int = 1, per_row: bool = False, keep_diagonal: bool = False,
               generator: torch.Generator | None = None, device=None) -> BlockMask:
        """Random FULL blocks (no rule), for tests and benchmarks.

        Each block is kept with probability ``density``; with ``per_row``, every ``(b, h, q block)`` row
        keeps exactly ``max(1, round(density * nKb))`` blocks (a learned predictor's top-k). With
        ``keep_diagonal`` the block holding each query block's first row on the diagonal is among them
        (so no row is empty). Drawn from ``generator`` on the CPU (reproducible on any ``device``)."""
        q_len, kv_len = _int("q_len", q_len, minimum=1), _int("kv_len", kv_len, minimum=1)
        batch, heads = _int("batch", batch, minimum=1), _int("heads", heads, minimum=1)
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 <= density <= 1.0:
            raise ValueError(f"density must be a number in [0, 1], got {density!r}")
        bq, bk = _block_size(block_size)
        nq, nk = _num_blocks(q_len, bq), _num_blocks(kv_len, bk)
        scores = torch.rand(batch, heads, nq, nk, generator=generator)
        if keep_diagonal:
            rows = torch.arange(nq)
            scores[:, :, rows, torch.clamp((rows * bq) // bk, max=nk - 1)] = 2.0  # above every draw
        if per_row:
            picked = scores.topk(max(1, round(density * nk)), dim=-1).indices
            blocks = torch.zeros(scores.shape, dtype=torch.bool).scatter_(-1, picked, True)
        else:
            blocks = scores >= 1.0 - density  # probability density; the diagonal's 2.0 always
        return cls.from_dense_blocks(blocks.to(device or "cpu"), q_len, kv_len, (bq, bk))

    # ------------------------------------------------------------------------------------------
    # FlexAttention
    # ------------------------------------------------------------------------------------------
    def to_flex(self):
        """An equivalent ``torch.nn.attention.flex_attention.BlockMask``: the same PARTIAL / FULL lists and
        block size, and a ``mask_mod`` giving this mask's elementwise visibility (block kind, then the rule
        in PARTIAL blocks), so that ``create_mask(to_flex().mask_mod, ...)`` equals :meth:`to_dense`."""
        flex = _import_flex()
        kinds = self.block_kinds()
        B, H, nq, nk = kinds.shape
        bq, bk = self.block_size
        q_last, kv_last = self.q_len - 1, self.kv_len - 1
        rule = self.rule
        qs = ks = None
        if rule is not None and rule.q_segments is not None:
            qs, ks = rule.q_segments, rule.kv_segments

        def mask_mod(b, h, q_idx, kv_idx):
            # indices are clamped: flex may evaluate the mask past the ends of the sequences
            qi, ki = q_idx.clamp(0, q_last), kv_idx.clamp(0, kv_last)
            kind = kinds[b if B > 1 else 0, h if H > 1 else 0, qi // bq, ki // bk]
            visible = kind == FULL
            if rule is None:
                return visible
            keep = qi >= 0
            d = ki - qi - rule.diag_offset
            if rule.window_left >= 0:
                keep = keep & (d >= -rule.window_left)
            if rule.window_right >= 0:
                keep = keep & (d <= rule.window_right)
            if qs is not None:
                keep = keep & (qs[b if qs.shape[0] > 1 else 0, qi] == ks[b if ks.shape[0] > 1 else 0, ki])
            if rule.n_global > 0:
                keep = keep | (qi < rule.n_global) | (ki < rule.n_global)
            return visible | ((kind == PARTIAL) & keep)

        return flex.BlockMask.from_kv_blocks(self.kv_num_blocks, self.kv_indices, self.full_kv_num_blocks,
                                             self.full_kv_indices, BLOCK_SIZE=self.block_size, mask_mod=mask_mod,
                                             seq_lengths=(self.q_len, self.kv_len))

    @classmethod
    def from_flex(cls, flex_mask, rule: MaskRule | None = None) -> BlockMask:
        """From a FlexAttention ``BlockMask``: its ``kv_num_blocks`` / ``kv_indices`` (partial blocks) and
        ``full_kv_num_blocks`` / ``full_kv_indices`` (full blocks, may be None), ``BLOCK_SIZE`` and
        ``seq_lengths``. Flex's ``mask_mod`` cannot be converted: pass the equivalent ``rule`` (needed when
        there are partial blocks). Lists with more blocks than ``seq_lengths`` need are cut.

        (``create_block_mask`` pads a ragged last block with masked elements, so such a block comes
        back PARTIAL even where every existing element is visible: safe, not minimal.)"""
        flex = _import_flex()
        if not isinstance(flex_mask, flex.BlockMask):
            raise TypeError(f"flex_mask must be a torch.nn.attention.flex_attention.BlockMask, "
                            f"got {type(flex_mask).__name__}")
        q_len, kv_len = (int(s) for s in flex_mask.seq_lengths)
        bq, bk = _block_size(tuple(flex_mask.BLOCK_SIZE), "flex_mask.BLOCK_SIZE")
        nq, nk = _num_blocks(q_len, bq), _num_blocks(kv_len, bk)
        num, idx = flex_mask.kv_num_blocks, flex_mask.kv_indices
        if idx.dim() != 4 or idx.shape[2] < nq:
            raise ValueError(f"flex_mask.kv_indices must have shape (B, H, >= {nq}, nKb), got {tuple(idx.shape)}")
        partial = _expand_list(num, idx, nk)[:, :, :nq]
        full = torch.zeros_like(partial)
        if flex_mask.full_kv_num_blocks is not None:
            full = _expand_list(flex_mask.full_kv_num_blocks, flex_mask.full_kv_indices, nk)[:, :, :nq]
            if bool((partial & full).any()):
                raise ValueError("flex_mask lists a block both as partial and as full")
        kinds = partial.to(KIND_DTYPE) * PARTIAL + full.to(KIND_DTYPE) * FULL
        if rule is None and bool(partial.any()):
            raise ValueError("flex_mask has partial blocks: pass rule=, the MaskRule equivalent to its mask_mod "
                             "(a mask_mod cannot be converted)")
        return cls.from_block_kinds(kinds, q_len, kv_len, (bq, bk), rule)

    # ------------------------------------------------------------------------------------------
    # properties and views
    # ------------------------------------------------------------------------------------------
    @property
    def num_q_blocks(self) -> int:
        return self.kv_indices.shape[2]

    @property
    def num_kv_blocks(self) -> int:
        return self.kv_indices.shape[3]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(B, H, nQb, nKb)`` of the lists (``B``, ``H`` may be 1)."""
        return tuple(self.kv_indices.shape)

    @property
    def device(self) -> torch.device:
        return self.kv_indices.device

    def to(self, device) -> BlockMask:
        """The mask (lists and rule segments) on ``device``."""
        device = torch.device(device)
        lists = [getattr(self, name).to(device) for name in _LIST_NAMES]
        mask = type(self)(*lists, q_len=self.q_len, kv_len=self.kv_len, block_size=self.block_size,
                          rule=None if self.rule is None else self.rule.to(device))
        if self._kinds is not None:
            mask._kinds = self._kinds.to(device)
        return mask

    def same_as(self, other: BlockMask | None) -> bool:
        """True if ``other`` is a BlockMask of the same sizes with equal lists and the same rule."""
        if other is self:
            return True
        return (isinstance(other, BlockMask)
                and (self.q_len, self.kv_len, self.block_size) == (other.q_len, other.kv_len, other.block_size)
                and (other.rule is None if self.rule is None else self.rule.same_as(other.rule))
                and _equal_tensors((getattr(self, name), getattr(other, name)) for name in _LIST_NAMES))

    def block_kinds(self) -> torch.Tensor:
        """uint8 ``(B, H, nQb, nKb)``: NONE / PARTIAL / FULL, reconstructed from the forward lists."""
        if self._kinds is None:
            nk = self.num_kv_blocks
            partial = _expand_list(self.kv_num_blocks, self.kv_indices, nk)
            full = _expand_list(self.full_kv_num_blocks, self.full_kv_indices, nk)
            kinds = partial.to(KIND_DTYPE) * PARTIAL
            self._kinds = kinds.masked_fill_(full, FULL)
        return self._kinds

    def dense_rows(self, r0: int, r1: int) -> torch.Tensor:
        """Elementwise visibility of query rows ``[r0, r1)``: bool ``(B, H, r1 - r0, kv_len)`` (FULL block:
        True, PARTIAL: the rule, NONE: False). ``B`` is broadcast with the rule's segment batch."""
        r0, r1 = _int("r0", r0), _int("r1", r1)
        if not 0 <= r0 <= r1 <= self.q_len:
            raise ValueError(f"need 0 <= r0 <= r1 <= q_len={self.q_len}, got r0={r0}, r1={r1}")
        bq, bk = self.block_size
        rows = torch.arange(r0, r1, device=self.device)
        cols = torch.arange(self.kv_len, device=self.device)
        kinds = self.block_kinds()
        kind = kinds[:, :, rows // bq][:, :, :, cols // bk]
        visible = kind == FULL
        if self.rule is not None:
            visible = visible | ((kind == PARTIAL) & self.rule.visible(rows, cols)[:, None])
        return visible

    def to_dense(self) -> torch.Tensor:
        """bool ``(B, H, q_len, kv_len)``: the whole mask, for debugging and tests."""
        return self.dense_rows(0, self.q_len)

    def sparsity(self) -> float:
        """Fraction of the ``(b, h, q block, kv block)`` pairs that are NONE (over the lists' ``B x H``)."""
        total = math.prod(self.shape)
        return 1.0 - float(self.kept_blocks().sum()) / total

    def kept_blocks(self) -> torch.Tensor:
        """int64 ``(B, H)``: PARTIAL + FULL blocks per batch / head."""
        return self.kv_num_blocks.sum(-1, dtype=torch.int64) + self.full_kv_num_blocks.sum(-1, dtype=torch.int64)

    def check(self) -> None:
        """Check the lists' values (ValueError): counts in range, listed indices ascending and in range,
        no block both PARTIAL and FULL, transposes consistent, a rule when PARTIAL blocks exist."""
        nq, nk = self.num_q_blocks, self.num_kv_blocks
        for num_name, idx_name, n in (("kv_num_blocks", "kv_indices", nk),
                                      ("full_kv_num_blocks", "full_kv_indices", nk),
                                      ("q_num_blocks", "q_indices", nq), ("full_q_num_blocks", "full_q_indices", nq)):
            num, idx = getattr(self, num_name).long(), getattr(self, idx_name).long()
            if bool(((num < 0) | (num > n)).any()):
                raise ValueError(f"{num_name} must lie in [0, {n}]")
            listed = torch.arange(n, device=idx.device) < num[..., None]
            if bool((listed & ((idx < 0) | (idx >= n))).any()):
                raise ValueError(f"{idx_name} lists an index outside [0, {n})")
            if bool((listed[..., 1:] & (idx[..., 1:] <= idx[..., :-1])).any()):
                raise ValueError(f"{idx_name} must list its indices strictly ascending")
        partial = _expand_list(self.kv_num_blocks, self.kv_indices, nk)
        full = _expand_list(self.full_kv_num_blocks, self.full_kv_indices, nk)
        if bool((partial & full).any()):
            raise ValueError("a block is listed both as PARTIAL and as FULL")
        if not torch.equal(_expand_list(self.q_num_blocks, self.q_indices, nq), partial.transpose(-1, -2)):
            raise ValueError("q_num_blocks / q_indices are not the transpose of kv_num_blocks / kv_indices")
        if not torch.equal(_expand_list(self.full_q_num_blocks, self.full_q_indices, nq), full.transpose(-1, -2)):
            raise ValueError("full_q_num_blocks / full_q_indices are not the transpose of the full kv lists")
        if self.rule is None and bool(partial.any()):
            raise ValueError("PARTIAL blocks exist but rule is None")

    def __or__(self, other: BlockMask) -> BlockMask:
        return union(self, other)

    def __and__(self, other: BlockMask) -> BlockMask:
        return intersection(self, other)

    def __repr__(self) -> str:
        B, H, nq, nk = self.shape
        return (f"BlockMask(q_len={self.q_len}, kv_len={self.kv_len}, block_size={self.block_size}, "
                f"shape=({B}, {H}, {nq}, {nk}), rule={self.rule!r}, device={self.device})")


# ----------------------------------------------------------------------------------------------
# union and intersection
# ----------------------------------------------------------------------------------------------
def _combine(a: BlockMask, b: BlockMask, name: str, op) -> BlockMask:
    for arg, m in (("a", a), ("b", b)):
        if not isinstance(m, BlockMask):
            raise TypeError(f"{name}: {arg} must be a BlockMask, got {type(m).__name__}")
    if (a.q_len, a.kv_len, a.block_size) != (b.q_len, b.kv_len, b.block_size):
        raise ValueError(f"{name} of masks built for different sizes: (q_len, kv_len, block_size) = "
                         f"{(a.q_len, a.kv_len, a.block_size)} and {(b.q_len, b.kv_len, b.block_size)}")
    if a.device != b.device:
        raise ValueError(f"{name} of masks on different devices: {a.device} and {b.device}")
    if a.rule is None:
        rule = b.rule
    elif b.rule is None or a.rule.same_as(b.rule):
        rule = a.rule
    else:
        raise ValueError(f"{name} of two masks with different elementwise rules ({a.rule!r} and {b.rule!r}): "
                         "one rule per mask cannot express both in their PARTIAL blocks. Build the combined "
                         "mask from one MaskRule (BlockMask.from_rule), e.g. a window and segments together")
    ka, kb = a.block_kinds(), b.block_kinds()
    try:
        ka, kb = torch.broadcast_tensors(ka, kb)
    except RuntimeError:
        raise ValueError(f"{name}: masks of shapes {a.shape} and {b.shape} do not broadcast (B, H)") from None
    return BlockMask.from_block_kinds(op(ka, kb), a.q_len, a.kv_len, a.block_size, rule)


def union(a: BlockMask, b: BlockMask) -> BlockMask:
    """Elementwise union of visibility (``a | b``), on block kinds: FULL if either is FULL, NONE if both
    are NONE, else PARTIAL. Exact when at most one mask has a rule, or both have the same rule (the
    result takes it); two different rules raise ValueError. ``B`` / ``H`` broadcast."""
    return _combine(a, b, "union", torch.maximum)


def intersection(a: BlockMask, b: BlockMask) -> BlockMask:
    """Elementwise intersection of visibility (``a & b``), on block kinds: NONE if either is NONE, FULL
    if both are FULL, else PARTIAL. Same rule and broadcasting conditions as :func:`union`."""
    return _combine(a, b, "intersection", torch.minimum)
