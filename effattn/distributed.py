"""Context parallelism over ``torch.distributed``: a sequence split across processes.

* :func:`ring_attention`: every rank keeps its shard of the queries; the key/value shards travel around
  the ring (``isend``/``irecv``, the next block's transfer overlapping this block's compute); each
  block's partial output is merged by log-sum-exp in fp32. The backward sends the key/value shards
  round again with their dK/dV accumulators and uses the global ``out``/``lse``, so each block's
  gradient is exact. Blocks that a causal or window rule empties are neither computed nor sent
  (:func:`ring_plan`).
* :func:`ring_pooled_attention`: Funnel's pooled queries (:func:`effattn.pooled_attention`) under
  the ring; shards aligned to the stride, the [cls] rules right across shards.
* :func:`ulysses_attention`: DeepSpeed-Ulysses: all-to-all from sequence to head sharding, any effattn
  op on the whole sequence, all-to-all back.
* :func:`shard` / :func:`unshard`: the layouts. ``"contiguous"``: rank ``r`` holds chunk ``r`` of
  ``P``; ``"zigzag"``: chunks ``r`` and ``2P - 1 - r`` of ``2P``, which balances causal work.

The process group is the caller's (gloo on CPU tensors, NCCL on CUDA tensors); every rank must make
the same calls, as with any collective. Each block runs on effattn's kernels (``backend`` as in
:func:`effattn.flash_attention`).
"""

from __future__ import annotations

import zlib
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from effattn import _op, _validate
from effattn.flash import attention_bwd, attention_fwd, flash_attention
from effattn.pooled import _check_pool_args
from effattn.reference import QueryPool, compute_dtype, pool_queries

__all__ = ["LAYOUTS", "RingPlan", "Traffic", "count_traffic", "ring_attention", "ring_plan", "ring_pooled_attention",
           "segments", "shard", "ulysses_attention", "ulysses_heads", "unshard"]

LAYOUTS = ("zigzag", "contiguous")


# ----------------------------------------------------------------------------------------------
# layouts
# ----------------------------------------------------------------------------------------------
def _group(group):
    return dist.group.WORLD if group is None else group


def _world(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("effattn.distributed needs an initialised torch.distributed process group "
                           "(torch.distributed.init_process_group)")
    return dist.get_rank(group), dist.get_world_size(group)


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def _unit(layout: str, world: int) -> int:
    return 2 * world if layout == "zigzag" else world


def _check_divisible(name: str, T: int, layout: str, world: int) -> None:
    unit = _unit(layout, world)
    if T % unit:
        raise ValueError(f"{name}: a sequence of {T} cannot be split in layout {layout!r} over {world} ranks: "
                         f"it must be a multiple of {unit} ({'2P' if layout == 'zigzag' else 'P'} chunks)")


def segments(layout: str, rank: int, world: int, local_len: int) -> list[tuple[int, int, int]]:
    """The pieces of rank ``rank``'s shard: ``(local offset, global start, length)`` each."""
    if layout == "contiguous":
        return [(0, rank * local_len, local_len)]
    half = local_len // 2
    return [(0, rank * half, half), (half, (2 * world - 1 - rank) * half, half)]


def shard(x: torch.Tensor, group=None, layout: str = "zigzag", dim: int = 2) -> torch.Tensor:
    """This rank's shard of the whole tensor ``x`` along ``dim`` (2 for ``(B, H, T, D)``, 1 for a
    ``(B, T)`` key padding mask), in ``layout``. Every rank passes the same ``x``."""
    _check_layout(layout)
    rank, world = _world(_group(group))
    T = x.shape[dim]
    _check_divisible("shard", T, layout, world)
    return torch.cat([x.narrow(dim, g, n) for _, g, n in segments(layout, rank, world, T // world)], dim=dim)


def _gather_order(layout: str, world: int, local_len: int) -> list[tuple[int, int, int]]:
    """``(rank, local offset, length)`` of the pieces of the whole sequence, in global order."""
    pieces = [(g, r, o, n) for r in range(world) for o, g, n in segments(layout, r, world, local_len)]
    return [(r, o, n) for _, r, o, n in sorted(pieces)]


def _assemble(parts: list[torch.Tensor], layout: str, dim: int) -> torch.Tensor:
    local_len = parts[0].shape[dim]
    return torch.cat([parts[r].narrow(dim, o, n) for r, o, n in _gather_order(layout, len(parts), local_len)],
                     dim=dim)


class _Unshard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, layout, dim):
        ctx.group, ctx.layout, ctx.dim = group, layout, dim
        parts = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return _assemble(parts, layout, dim)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)  # each rank's loss reaches every shard
        return shard(grad, ctx.group, ctx.layout, ctx.dim), None, None, None


def unshard(x: torch.Tensor, group=None, layout: str = "zigzag", dim: int = 2) -> torch.Tensor:
    """The whole tensor from every rank's shard (the inverse of :func:`shard`), on every rank.
    Differentiable: the backward sums the gradient over ranks and returns this rank's shard of it."""
    _check_layout(layout)
    group = _group(group)
    _world(group)
    if x.dtype == torch.bool:
        return unshard(x.to(torch.uint8), group, layout, dim).bool()
    return _Unshard.apply(x, group, layout, dim)


def _check_same(group, what: str, fields: dict[str, object]) -> None:
    """Raise on every rank when ``fields`` differ across ranks (one small all-gather)."""
    keys = list(fields)
    code = torch.tensor([zlib.crc32(str(fields[k]).encode()) for k in keys], dtype=torch.int64)
    world = dist.get_world_size(group)
    codes = [torch.empty_like(code) for _ in range(world)]
    dist.all_gather(codes, code, group=group)
    bad = [k for i, k in enumerate(keys) if any(int(c[i]) != int(code[i]) for c in codes)]
    if bad:
        raise ValueError(f"{what}: the inputs differ across ranks in {', '.join(bad)} (every rank must pass shards "
                         f"of one problem; this rank, {dist.get_rank(group)}, has "
                         + ", ".join(f"{k}={fields[k]}" for k in bad) + ")")


# ----------------------------------------------------------------------------------------------
# the ring's plan: which blocks are computed and sent
# ----------------------------------------------------------------------------------------------
def _visible(qg: int, ql: int, kg: int, kl: int, left: int, right: int) -> bool:
    """Whether any query of ``[qg, qg+ql)`` sees a key of ``[kg, kg+kl)`` under the window
    ``[i - left, i + right]`` (-1: unbounded)."""
    if ql == 0 or kl == 0:
        return False
    if right >= 0 and kg > qg + ql - 1 + right:
        return False
    return not (left >= 0 and kg + kl - 1 < qg - left)


@dataclass(frozen=True)
class RingPlan:
    """Who computes and who sends what, for ``world`` ranks of ``local_len`` queries and keys each.

    ``needs[src][dst]``: rank ``dst``'s queries see some key of rank ``src``'s shard. The key/value
    shard of ``src`` goes round the ring ``src -> src+1 -> ...`` only as far as the last rank that needs
    it (``last_hop[src]`` hops; -1: nobody). ``pairs[dst]``: the (query, key) pairs rank ``dst``
    computes (its causal/window work; the load balance of a layout)."""
    world: int
    layout: str
    needs: tuple[tuple[bool, ...], ...]
    last_hop: tuple[int, ...]
    pairs: tuple[int, ...]

    def holds(self, src: int, step: int) -> bool:
        """Whether the shard of ``src`` is at rank ``src + step`` at ``step`` of the ring."""
        return step <= self.last_hop[src]

    def sends(self, rank: int, step: int) -> bool:
        """Whether ``rank`` sends the shard it holds at ``step`` on to ``rank + 1``."""
        return self.holds((rank - step) % self.world, step + 1)

    def transfers(self) -> int:
        """Key/value shard transfers of one forward (the backward sends each again with its dK/dV)."""
        return sum(max(h, 0) for h in self.last_hop)


def _pairs_in(qg, ql, kg, kl, left, right) -> int:
    i = torch.arange(qg, qg + ql)[:, None]
    j = torch.arange(kg, kg + kl)[None, :]
    keep = torch.ones(ql, kl, dtype=torch.bool)
    if left >= 0:
        keep &= j >= i - left
    if right >= 0:
        keep &= j <= i + right
    return int(keep.sum())


def ring_plan(seq_len: int, world: int, *, layout: str = "zigzag", causal: bool = False, window=None,
              q_segments=None) -> RingPlan:
    """The :class:`RingPlan` of :func:`ring_attention` on a sequence of ``seq_len`` over ``world`` ranks
    (``q_segments``: per rank, ``(global start, length)`` of its queries; default: the layout's)."""
    _check_layout(layout)
    _check_divisible("ring_plan", seq_len, layout, world)
    left, right = _window(causal, window)
    local = seq_len // world
    kv = [[(g, n) for _, g, n in segments(layout, r, world, local)] for r in range(world)]
    qs = kv if q_segments is None else q_segments
    needs = tuple(tuple(any(_visible(qg, ql, kg, kl, left, right) for qg, ql in qs[dst] for kg, kl in kv[src])
                        for dst in range(world)) for src in range(world))
    last_hop = tuple(max((t for t in range(world) if needs[src][(src + t) % world]), default=-1)
                     for src in range(world))
    pairs = tuple(sum(_pairs_in(qg, ql, kg, kl, left, right) for qg, ql in qs[dst] for src in range(world)
                      for kg, kl in kv[src]) for dst in range(world)) if q_segments is None else (0,) * world
    return RingPlan(world=world, layout=layout, needs=needs, last_hop=last_hop, pairs=pairs)


def _window(causal: bool, window) -> tuple[int, int]:
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    left, right = _validate.window_bounds(window)
    if causal:
        right = 0 if right < 0 else min(right, 0)
    return left, right


# ----------------------------------------------------------------------------------------------
# the ring
# ----------------------------------------------------------------------------------------------
class Traffic:
    """Bytes this rank sent, by ``(phase, step)``: what :func:`count_traffic` collects."""

    def __init__(self):
        self.sent: dict[tuple[str, int], int] = {}

    def add(self, phase: str, step: int, nbytes: int) -> None:
        self.sent[phase, step] = self.sent.get((phase, step), 0) + nbytes

    def total(self, phase: str | None = None) -> int:
        return sum(n for (p, _), n in self.sent.items() if phase is None or p == phase)


_counters: list[Traffic] = []


@contextmanager
def count_traffic():
    """``with count_traffic() as t:`` counts the bytes this rank sends (``t.sent``, ``t.total()``)."""
    t = Traffic()
    _counters.append(t)
    try:
        yield t
    finally:
        _counters.remove(t)


def _count(phase: str, step: int, tensors) -> None:
    for t in _counters:
        t.add(phase, step, sum(x.numel() * x.element_size() for x in tensors))


def _p2p(group, sends=(), recvs=(), phase: str = "", step: int = 0):
    """Start ``sends`` and ``recvs``, each a list of ``(tensor, group rank)``; returns the requests."""
    ops = [dist.P2POp(dist.isend, t, dist.get_global_rank(group, peer), group) for t, peer in sends]
    ops += [dist.P2POp(dist.irecv, t, dist.get_global_rank(group, peer), group) for t, peer in recvs]
    _count(phase, step, [t for t, _ in sends])
    return dist.batch_isend_irecv(ops) if ops else []


def _wait(reqs) -> None:
    for req in reqs:
        req.wait()


@dataclass
class _Ring:
    """One ring call's fixed parts: the group, the plan, the window and the kernel arguments."""
    group: object
    rank: int
    world: int
    layout: str
    plan: RingPlan
    q_segs: list[tuple[int, int, int]]  # this rank's queries: (local offset, global start, length)
    kv_len: int
    left: int
    right: int
    scale: float
    backend: str

    def kv_segs(self, src: int):
        return segments(self.layout, src, self.world, self.kv_len)

    def blocks(self, src: int):
        """The (query piece, key piece) pairs of this rank against ``src``'s keys that see something."""
        for qo, qg, ql in self.q_segs:
            for ko, kg, kl in self.kv_segs(src):
                if _visible(qg, ql, kg, kl, self.left, self.right):
                    yield (qo, ql, qg - kg), (ko, kl)

    def ring(self, step: int) -> tuple[int | None, int | None]:
        """Peers of ``step``'s prefetch: to whom the held shard goes, from whom the next one comes."""
        to = (self.rank + 1) % self.world if self.plan.sends(self.rank, step) else None
        frm = (self.rank - 1) % self.world if self.plan.sends((self.rank - 1) % self.world, step) else None
        return to, frm


def _wire(mask):
    """A key padding mask as it travels (uint8: not every process-group backend sends bool)."""
    return None if mask is None else mask.to(torch.uint8)


def _mask4(mask):
    return None if mask is None else mask.bool()[:, None, None, :]


def _merge(out, lse, o, lo):
    """Fold a block's ``(o, lo)`` into the running ``(out, lse)`` by log-sum-exp (in place)."""
    new = torch.logaddexp(lse, lo)
    ref = torch.where(torch.isinf(new), torch.zeros_like(new), new)  # both -inf: nothing seen yet
    a, b = torch.exp(lse - ref), torch.exp(lo - ref)
    out.mul_(a[..., None]).add_(o.to(out.dtype) * b[..., None])
    lse.copy_(new)


def _kv_buffers(k, v, mask):
    return [t.contiguous() for t in (k, v, mask) if t is not None]


def _split_kv(bufs, has_mask):
    return bufs[0], bufs[1], (bufs[2] if has_mask else None)


def _ring_forward(ring: _Ring, q, k, v, mask):
    acc = compute_dtype(q.dtype)
    B, Hq, Tq, _ = q.shape
    out = torch.zeros(B, Hq, Tq, v.shape[-1], dtype=acc, device=q.device)
    lse = torch.full((B, Hq, Tq), float("-inf"), dtype=acc, device=q.device)
    held = own = _kv_buffers(k, v, mask)
    for step in range(ring.world):
        src = (ring.rank - step) % ring.world
        to, frm = ring.ring(step)
        nxt = [torch.empty_like(t) for t in own] if frm is not None else None  # every shard has one shape
        reqs = _p2p(ring.group, [(t, to) for t in held] if to is not None else (),
                    [(t, frm) for t in nxt] if frm is not None else (), "forward", step)
        if ring.plan.holds(src, step) and ring.plan.needs[src][ring.rank]:
            kk, vv, mm = _split_kv(held, mask is not None)
            for (qo, ql, diag), (ko, kl) in ring.blocks(src):
                m = _mask4(mm[:, ko:ko + kl]) if mm is not None else None
                o, lo = attention_fwd(q[:, :, qo:qo + ql], kk[:, :, ko:ko + kl], vv[:, :, ko:ko + kl], m, ring.scale,
                                      ring.left, ring.right, diag, 0.0, 0, 0.0, None, ring.backend)
                _merge(out[:, :, qo:qo + ql], lse[:, :, qo:qo + ql], o, lo.to(acc))
        _wait(reqs)
        held = nxt if nxt is not None else []
    return out.to(q.dtype), lse


def _ring_backward(ring: _Ring, dout, q, k, v, mask, out, lse, dlse):
    acc = compute_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    held = own = _kv_buffers(k, v, mask)
    grads = [torch.zeros(k.shape, dtype=acc, device=k.device), torch.zeros(v.shape, dtype=acc, device=v.device)]
    mine = None  # this rank's dK/dV, once home
    plan, rank, world = ring.plan, ring.rank, ring.world
    if plan.last_hop[rank] <= 0:
        mine = grads
    for step in range(world):
        src = (rank - step) % world
        to, frm = ring.ring(step)
        nxt = [torch.empty_like(t) for t in own] if frm is not None else None  # every shard has one shape
        reqs = _p2p(ring.group, [(t, to) for t in held] if to is not None else (),
                    [(t, frm) for t in nxt] if frm is not None else (), "backward", step)
        here = plan.holds(src, step)
        if here and plan.needs[src][rank]:
            kk, vv, mm = _split_kv(held, mask is not None)
            for (qo, ql, diag), (ko, kl) in ring.blocks(src):
                m = _mask4(mm[:, ko:ko + kl]) if mm is not None else None
                rows = slice(qo, qo + ql)
                g = attention_bwd(dout[:, :, rows], q[:, :, rows], kk[:, :, ko:ko + kl], vv[:, :, ko:ko + kl],
                                  out[:, :, rows], lse[:, :, rows], m,
                                  None if dlse is None else dlse[:, :, rows].contiguous(), ring.scale, ring.left,
                                  ring.right, diag, 0.0, 0, 0.0, None, ring.backend)
                dq[:, :, rows] += g[0]
                grads[0][:, :, ko:ko + kl] += g[1]
                grads[1][:, :, ko:ko + kl] += g[2]
        # dK/dV go on with their shard, or home from its last holder
        send_to = None
        if here and step < plan.last_hop[src]:
            send_to = (rank + 1) % world
        elif here and step == plan.last_hop[src] and step > 0:
            send_to = src
        prev = (rank - 1) % world
        recv_from, incoming = None, None
        if plan.holds((prev - step) % world, step + 1) and step + 1 < world:
            recv_from = prev
        home_from = (rank + plan.last_hop[rank]) % world if step == plan.last_hop[rank] and step > 0 else None
        sends = [(t, send_to) for t in grads] if send_to is not None else []
        recvs = []
        if recv_from is not None:
            incoming = [torch.empty_like(t) for t in grads]
            recvs += [(t, recv_from) for t in incoming]
        if home_from is not None:
            mine = [torch.empty_like(t) for t in grads]
            recvs += [(t, home_from) for t in mine]
        _wait(reqs)
        _wait(_p2p(ring.group, sends, recvs, "backward", step))
        held = nxt if nxt is not None else []
        grads = incoming if incoming is not None else grads
    if mine is None:  # nobody needed this rank's keys
        mine = [torch.zeros(k.shape, dtype=acc, device=k.device), torch.zeros(v.shape, dtype=acc, device=v.device)]
    return dq.to(q.dtype), mine[0].to(k.dtype), mine[1].to(v.dtype)


class _RingFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, ring):
        out, lse = _ring_forward(ring, q, k, v, mask)
        ctx.save_for_backward(q, k, v, mask, out, lse)
        ctx.ring = ring
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, mask, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = _ring_backward(ctx.ring, dout.contiguous(), q, k, v, mask, out, lse, dlse)
        return dq, dk, dv, None, None


def _prepare(name, q, k, v, key_padding_mask, group, layout, scale, backend, extra: dict):
    """Checks shared by the ring functions: shapes, the mask, agreement across ranks, the backend."""
    _check_layout(layout)
    group = _group(group)
    rank, world = _world(group)
    shape = _validate.check_qkv(q, k, v)
    if shape.Tq != shape.Tk:
        raise ValueError(f"{name}: q and k shards must have the same length, got {shape.Tq} and {shape.Tk}")
    _validate.check_scale(scale)
    _validate.check_key_padding_mask(key_padding_mask, shape, q.device)
    _check_same(group, name, {"q": (tuple(q.shape), q.dtype), "k": tuple(k.shape), "v": tuple(v.shape),
                              "key_padding_mask": key_padding_mask is not None, "layout": layout, **extra})
    _check_divisible(name, shape.Tk * world, layout, world)
    return group, rank, world, shape


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group=None, causal: bool = False,
                   window=None, key_padding_mask: torch.Tensor | None = None, scale: float | None = None,
                   layout: str = "zigzag", backend: str | None = None, return_lse: bool = False):
    """:func:`effattn.flash_attention` of a sequence sharded over the ranks of ``group``.

    Args:
        q, k, v: this rank's shards ``(B, Hq, T/P, Dqk)``, ``(B, Hkv, T/P, Dqk)``, ``(B, Hkv, T/P, Dv)``
            in ``layout`` (:func:`shard`); GQA/MQA and ``Dqk != Dv`` as in flash_attention.
        causal, window, scale, backend: as in :func:`effattn.flash_attention`, on global positions.
        key_padding_mask: this rank's shard ``(B, T/P)`` bool of the whole sequence's mask (True = keep).
        layout: ``"zigzag"`` (default; balances causal work) or ``"contiguous"``.
        return_lse: also return this rank's shard of ``lse (B, Hq, T/P)`` (differentiable).

    Returns:
        This rank's shard of ``out (B, Hq, T, Dv)`` (and of lse): the same numbers, up to rounding, as
        flash_attention on the gathered tensors; gradients likewise.
    """
    left, right = _window(causal, window)
    group, rank, world, shape = _prepare("ring_attention", q, k, v, key_padding_mask, group, layout, scale, backend,
                                         {"causal": causal, "window": (left, right)})
    backend, scale = _op.prepare(q, shape, backend, scale, mask=_mask4(key_padding_mask))
    T = shape.Tk * world
    plan = ring_plan(T, world, layout=layout, causal=causal, window=window)
    ring = _Ring(group=group, rank=rank, world=world, layout=layout, plan=plan,
                 q_segs=segments(layout, rank, world, shape.Tq), kv_len=shape.Tk, left=left, right=right,
                 scale=scale, backend=backend)
    out, lse = _RingFunction.apply(q, k, v, _wire(key_padding_mask), ring)
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------------------------
# pooled queries under the ring
# ----------------------------------------------------------------------------------------------
class _Halo(torch.autograd.Function):
    """The last row of the previous rank's shard (rank 0: its own first row, [cls]); the backward sends
    the halo's gradient back to where the row came from."""

    @staticmethod
    def forward(ctx, x, group, rank, world):
        ctx.group, ctx.rank, ctx.world, ctx.shape = group, rank, world, x.shape
        last = x[:, :, -1:].contiguous()
        halo = x[:, :, :1].clone() if rank == 0 else torch.empty_like(last)
        _wait(_p2p(group, [(last, rank + 1)] if rank + 1 < world else (), [(halo, rank - 1)] if rank > 0 else (),
                   "forward", 0))
        return halo

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        back = torch.zeros_like(grad)
        _wait(_p2p(ctx.group, [(grad, ctx.rank - 1)] if ctx.rank > 0 else (),
                   [(back, ctx.rank + 1)] if ctx.rank + 1 < ctx.world else (), "backward", 0))
        dx = grad.new_zeros(ctx.shape)
        dx[:, :, -1:] = back
        if ctx.rank == 0:
            dx[:, :, :1] += grad
        return dx, None, None, None


def _pooled_rows(q, pool: QueryPool, group, rank, world):
    """This rank's pooled query rows, as :func:`effattn.pooled_attention` pools the whole sequence.

    With [cls] kept apart, Funnel's rewrite ``[x_0] + x[:-1]`` shifts the grid by one row, so each rank
    pools the previous rank's last row (the halo; on rank 0, [cls] again) with its own rows but its
    last (which the next rank takes); the last rank keeps it when not truncating (one more, short,
    window)."""
    plain = QueryPool(stride=pool.stride, mode=pool.mode, separate_cls=False, truncate=False)
    if not pool.separate_cls:
        return pool_queries(q, plain)
    halo = _Halo.apply(q, group, rank, world)
    body = q if (rank == world - 1 and not pool.truncate) else q[:, :, :-1]
    return pool_queries(torch.cat([halo, body], dim=2), plain)


def ring_pooled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group=None, stride: int = 2,
                          pool: str = "mean", separate_cls: bool = False, truncate: bool = True,
                          key_padding_mask: torch.Tensor | None = None, scale: float | None = None,
                          layout: str = "contiguous", backend: str | None = None, return_lse: bool = False):
    """:func:`effattn.pooled_attention` (Funnel's pooled queries, keys at full length) of a sequence
    sharded contiguously over the ranks of ``group``.

    Each shard's length must be a multiple of ``stride``, so pooling windows do not straddle ranks
    (with ``separate_cls`` the [cls] shift moves one row across each boundary; handled). Rank ``r``
    gets pooled rows ``[r c / stride, (r + 1) c / stride)`` (``c = T / P``); with ``separate_cls`` and
    not ``truncate`` the last rank also gets the one extra row. The queries are pooled per shard in
    torch (``O(T D)``) and attend through the ring's kernels; causal/windowed pooling is not offered
    here (Funnel's attention is bidirectional; use :func:`ulysses_attention` with ``pooled_attention``).
    """
    _check_pool_args(stride, pool, separate_cls, truncate)
    if layout != "contiguous":
        raise ValueError(f"ring_pooled_attention: layout must be 'contiguous' (pooling windows follow the "
                         f"sequence order), got {layout!r}")
    group, rank, world, shape = _prepare("ring_pooled_attention", q, k, v, key_padding_mask, group, layout, scale,
                                         backend, {"pool": (stride, pool, separate_cls, truncate)})
    if shape.Tq % stride:
        raise ValueError(f"ring_pooled_attention: each rank's shard ({shape.Tq} rows) must be a multiple of "
                         f"stride ({stride}), so that no pooling window straddles two ranks")
    qp = _pooled_rows(q, QueryPool(stride=stride, mode=pool, separate_cls=separate_cls, truncate=truncate), group,
                      rank, world)
    pooled_shape = _validate.QKVShape(B=shape.B, Hq=shape.Hq, Hkv=shape.Hkv, Tq=qp.shape[2], Tk=shape.Tk,
                                      Dqk=shape.Dqk, Dv=shape.Dv)
    backend, scale = _op.prepare(q, pooled_shape, backend, scale, mask=_mask4(key_padding_mask))
    base = shape.Tq // stride
    extra = int(separate_cls and not truncate)  # the last rank's short window
    q_segments = [[(r * base, base + (extra if r == world - 1 else 0))] for r in range(world)]
    plan = ring_plan(shape.Tk * world, world, layout=layout, q_segments=q_segments)
    ring = _Ring(group=group, rank=rank, world=world, layout=layout, plan=plan, q_segs=[(0, rank * base, qp.shape[2])],
                 kv_len=shape.Tk, left=-1, right=-1, scale=scale, backend=backend)
    out, lse = _RingFunction.apply(qp, k, v, _wire(key_padding_mask), ring)
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------------------------
# Ulysses: all-to-all between sequence and head sharding
# ----------------------------------------------------------------------------------------------
def _split_sizes(total: int, world: int) -> list[int]:
    """Contiguous parts of a sequence of ``total`` rows: equal, any remainder to the last rank."""
    base = total // world
    return [base] * (world - 1) + [total - base * (world - 1)]


def _all_to_all(x: torch.Tensor, group, send_sizes: list[int], recv_sizes: list[int]) -> torch.Tensor:
    """All-to-all along dim 0: rows ``send_sizes[j]`` go to rank j; ``recv_sizes[i]`` come from rank i."""
    out = x.new_empty((sum(recv_sizes), *x.shape[1:]))
    row = x[0].numel() * x.element_size() if x.shape[0] else 0
    rank = dist.get_rank(group)
    for t in _counters:
        t.add("all_to_all", 0, row * (sum(send_sizes) - send_sizes[rank]))  # rows that leave this rank
    dist.all_to_all_single(out, x.contiguous(), recv_sizes, send_sizes, group=group)
    return out


def _seq_to_heads(x, group, rank, world, layout):
    """``(B, H, t, D)`` sequence shard -> ``(B, H/P, T, D)`` head shard in global order."""
    B, H, t, D = x.shape
    heads = H // world
    send = x.reshape(B, world, heads, t, D).permute(1, 3, 0, 2, 4).reshape(world * t, B, heads, D)
    got = _all_to_all(send, group, [t] * world, [t] * world)  # rank i's rows, in rank order
    whole = got.reshape(world, t, B, heads, D).permute(2, 3, 0, 1, 4).reshape(B, heads, world, t, D)
    parts = [whole[:, :, r] for r in range(world)]
    return _assemble(parts, layout, 2)


def _heads_to_seq(y, group, rank, world, layout, sizes):
    """``(B, H/P, T, D)`` head shard in global order -> ``(B, H, t_r, D)`` sequence shard (``sizes``:
    the contiguous split when the output is not the input's sequence, e.g. pooled)."""
    B, heads, T, D = y.shape
    if sizes is None:
        y = torch.cat([y.narrow(2, g, n) for r in range(world) for _, g, n in
                       segments(layout, r, world, T // world)], dim=2)  # rank order
        sizes = [T // world] * world
    send = y.permute(2, 0, 1, 3)  # (T, B, heads, D), rank order
    mine = sizes[rank]
    got = _all_to_all(send, group, sizes, [mine] * world)  # from head group i: my rows
    return got.reshape(world, mine, B, heads, D).permute(2, 0, 3, 1, 4).reshape(B, world * heads, mine, D)


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, rank, world, layout):
        ctx.args = (group, rank, world, layout)
        return _seq_to_heads(x, group, rank, world, layout)

    @staticmethod
    def backward(ctx, grad):
        return _heads_to_seq(grad.contiguous(), *ctx.args, None), None, None, None, None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, group, rank, world, layout, sizes):
        ctx.args = (group, rank, world, layout)
        ctx.sizes = sizes
        return _heads_to_seq(y, group, rank, world, layout, sizes)

    @staticmethod
    def backward(ctx, grad):
        group, rank, world, layout = ctx.args
        if ctx.sizes is None:
            return _seq_to_heads(grad.contiguous(), group, rank, world, layout), None, None, None, None, None
        # uneven (contiguous) split: rows of each rank's part back to their head group
        B, H, mine, D = grad.shape
        heads = H // world
        send = grad.reshape(B, world, heads, mine, D).permute(1, 3, 0, 2, 4).reshape(world * mine, B, heads, D)
        got = _all_to_all(send, group, [mine] * world, ctx.sizes)
        return got.permute(1, 2, 0, 3), None, None, None, None, None


def ulysses_heads(heads: int, group=None) -> slice:
    """The heads this rank holds inside :func:`ulysses_attention` (for per-head tensors an ``attn``
    callable must slice itself, e.g. the relative-position bias of the fused Funnel layer)."""
    rank, world = _world(_group(group))
    if heads % world:
        raise ValueError(f"ulysses_heads: {heads} heads are not a multiple of the {world} ranks")
    return slice(rank * heads // world, (rank + 1) * heads // world)


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group=None, attn=flash_attention,
                      layout: str = "contiguous", key_padding_mask: torch.Tensor | None = None, **kwargs):
    """DeepSpeed-Ulysses: ``attn`` on the whole sequence, each rank taking ``H/P`` of the heads.

    ``q, k, v`` are sequence shards (``(B, H, T/P, D)`` in ``layout``); one all-to-all each turns them
    into head shards ``(B, H/P, T, D)``; ``attn(q, k, v, key_padding_mask=..., **kwargs)`` runs locally
    (any effattn op: :func:`~effattn.flash_attention`, :func:`~effattn.pooled_attention`,
    :func:`~effattn.sparse_attention` with a whole-sequence BlockMask, ...); an all-to-all returns each
    output tensor (``out``, and ``lse`` with ``return_lse``) to sequence sharding. An output whose length
    is not ``T`` (pooled queries) comes back split contiguously, any remainder on the last rank.
    ``key_padding_mask``: this rank's ``(B, T/P)`` shard; gathered whole for ``attn``.
    """
    group = _group(group)
    rank, world = _world(group)
    _check_layout(layout)
    for name, x in (("q", q), ("k", k), ("v", v)):
        _validate.check_tensor(name, x, 4, "(B, H, T/P, D)")
        if x.shape[1] % world:
            raise ValueError(f"ulysses_attention: {name} has {x.shape[1]} heads, not a multiple of the {world} ranks "
                             f"(each rank takes H/P heads)")
    _check_same(group, "ulysses_attention", {"q": (tuple(q.shape), q.dtype), "k": tuple(k.shape),
                                             "v": tuple(v.shape), "layout": layout,
                                             "key_padding_mask": key_padding_mask is not None})
    _check_divisible("ulysses_attention", q.shape[2] * world, layout, world)
    T = q.shape[2] * world
    parts = [_SeqToHeads.apply(x, group, rank, world, layout) for x in (q, k, v)]
    if key_padding_mask is not None:
        kwargs["key_padding_mask"] = unshard(key_padding_mask, group, layout, dim=1)
    result = attn(*parts, **kwargs)
    outs = result if isinstance(result, tuple) else (result,)
    back = []
    for y in outs:
        flat = y.unsqueeze(-1) if y.dim() == 3 else y  # lse (B, H/P, T)
        if flat.shape[2] == T:
            sizes = None
        elif layout == "contiguous":
            sizes = _split_sizes(flat.shape[2], world)
        else:
            raise ValueError(f"ulysses_attention: an output of length {flat.shape[2]} != T ({T}) needs "
                             f"layout='contiguous', got {layout!r}")
        z = _HeadsToSeq.apply(flat, group, rank, world, layout, sizes)
        back.append(z.squeeze(-1) if y.dim() == 3 else z)
    return tuple(back) if isinstance(result, tuple) else back[0]
