"""effattn.distributed against single-process attention on the gathered tensors (gloo, loopback).

Workers are spawned processes joined with a timeout, so a hung peer fails the test instead of hanging."""

import datetime
import os
import socket
import traceback

import pytest
import torch
import torch.multiprocessing as mp

TOL = dict(rtol=1e-5, atol=1e-5)


def _close(fails, what, a, b):
    try:
        torch.testing.assert_close(a, b, **TOL)
    except AssertionError as e:
        fails.append(f"{what}: {str(e)[:300]}")


def _ring_cases(rank, world, fails):
    import effattn
    from effattn import distributed as ed

    for layout in ("zigzag", "contiguous"):
        for causal, window, pad in ((False, None, False), (True, None, False), (False, (5, 3), True),
                                    (True, (7, 0), True)):
            torch.manual_seed(0)
            B, Hq, Hkv, T, D, Dv = 2, 4, 2, 48, 16, 8
            q, k = torch.randn(B, Hq, T, D, requires_grad=True), torch.randn(B, Hkv, T, D, requires_grad=True)
            v = torch.randn(B, Hkv, T, Dv, requires_grad=True)
            m = torch.ones(B, T, dtype=torch.bool)
            m[1, :20] = False  # whole shards of keys masked; with causal, rows that see no key
            mm = m if pad else None
            o, lse = effattn.flash_attention(q, k, v, causal=causal, window=window, key_padding_mask=mm,
                                             return_lse=True)
            do, dl = torch.randn_like(o), torch.randn_like(lse)
            ((o * do).sum() + (torch.where(torch.isinf(lse), 0, lse) * dl).sum()).backward()
            s = lambda x, dim=2, layout=layout: ed.shard(x, layout=layout, dim=dim)  # noqa: E731
            qs, ks, vs = (s(x.detach()).requires_grad_() for x in (q, k, v))
            o2, l2 = ed.ring_attention(qs, ks, vs, causal=causal, window=window, layout=layout, return_lse=True,
                                       key_padding_mask=None if mm is None else s(m, 1))
            ((o2 * s(do)).sum() + (torch.where(torch.isinf(l2), 0, l2) * s(dl)).sum()).backward()
            case = f"ring {layout} causal={causal} window={window} pad={pad}"
            for name, a, b in (("out", o2, s(o)), ("lse", l2, s(lse)), ("dq", qs.grad, s(q.grad)),
                               ("dk", ks.grad, s(k.grad)), ("dv", vs.grad, s(v.grad))):
                _close(fails, f"{case} {name}", a, b)


def _pooled_cases(rank, world, fails):
    import effattn
    from effattn import distributed as ed

    for pool in ("mean", "max"):
        for sep, trunc in ((False, True), (True, True), (True, False)):
            torch.manual_seed(1)
            B, H, T, D = 2, 2, 16, 8
            q, k, v = (torch.randn(B, H, T, D, requires_grad=True) for _ in range(3))
            m = torch.ones(B, T, dtype=torch.bool)
            m[0, -3:] = False
            o = effattn.pooled_attention(q, k, v, pool=pool, separate_cls=sep, truncate=trunc, key_padding_mask=m)
            do = torch.randn_like(o)
            (o * do).sum().backward()
            qs, ks, vs = (ed.shard(x.detach(), layout="contiguous").requires_grad_() for x in (q, k, v))
            o2 = ed.ring_pooled_attention(qs, ks, vs, pool=pool, separate_cls=sep, truncate=trunc,
                                          key_padding_mask=ed.shard(m, layout="contiguous", dim=1))
            base = T // world // 2
            rows = slice(rank * base, (rank + 1) * base + (o.shape[2] - world * base if rank == world - 1 else 0))
            (o2 * do[:, :, rows]).sum().backward()
            case = f"pooled {pool} separate_cls={sep} truncate={trunc}"
            _close(fails, f"{case} out", o2, o[:, :, rows])
            for name, a, b in (("dq", qs.grad, q.grad), ("dk", ks.grad, k.grad), ("dv", vs.grad, v.grad)):
                _close(fails, f"{case} {name}", a, ed.shard(b, layout="contiguous"))


def _ulysses_cases(rank, world, fails):
    import effattn
    from effattn import distributed as ed

    for layout in ("zigzag", "contiguous"):
        torch.manual_seed(2)
        B, H, T, D = 2, 4, 16, 8
        q, k, v = (torch.randn(B, H, T, D, requires_grad=True) for _ in range(3))
        o = effattn.flash_attention(q, k, v, causal=True)
        do = torch.randn_like(o)
        (o * do).sum().backward()
        qs, ks, vs = (ed.shard(x.detach(), layout=layout).requires_grad_() for x in (q, k, v))
        o2 = ed.ulysses_attention(qs, ks, vs, layout=layout, causal=True)
        (o2 * ed.shard(do, layout=layout)).sum().backward()
        for name, a, b in (("out", o2, o), ("dq", qs.grad, q.grad), ("dk", ks.grad, k.grad), ("dv", vs.grad, v.grad)):
            _close(fails, f"ulysses {layout} {name}", a, ed.shard(b, layout=layout))


def _ulysses_op_cases(rank, world, fails):
    """Ulysses around the other ops: sparse (a whole-sequence BlockMask), pooled (an output of uneven
    length, split contiguously), and the fused Funnel layer (per-head tensors sliced with ulysses_heads)."""
    import effattn
    from effattn import distributed as ed

    s = lambda x, dim=2: ed.shard(x, layout="contiguous", dim=dim)  # noqa: E731
    B, H, T, D = 2, 4, 64, 8
    torch.manual_seed(4)
    q, k, v = (torch.randn(B, H, T, D, requires_grad=True) for _ in range(3))
    m = torch.ones(B, T, dtype=torch.bool)
    m[1, -5:] = False
    blocks = torch.rand(1, 1, T // 16, T // 16) < 0.5
    blocks[..., 0, :] = False  # the first block row sees no key: its rows return 0
    bm = effattn.BlockMask.from_dense_blocks(blocks, T, T, block_size=16)
    cases = {
        "sparse": (lambda q, k, v, **kw: effattn.sparse_attention(q, k, v, bm, **kw), {}),
        "pooled": (effattn.pooled_attention, dict(pool="mean", separate_cls=True, truncate=False)),
    }
    for name, (op, kw) in cases.items():
        o = op(q, k, v, key_padding_mask=m, **kw)
        do = torch.randn_like(o)
        (o * do).sum().backward()
        qs, ks, vs = (s(x.detach()).requires_grad_() for x in (q, k, v))
        o2 = ed.ulysses_attention(qs, ks, vs, attn=op, layout="contiguous", key_padding_mask=s(m, 1), **kw)
        sizes = [o.shape[2] // world] * world
        sizes[-1] += o.shape[2] - sum(sizes)  # an uneven output: the remainder on the last rank
        rows = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
        (o2 * do[:, :, rows]).sum().backward()
        _close(fails, f"ulysses {name} out", o2, o[:, :, rows])
        for g, a, b in (("dq", qs.grad, q.grad), ("dk", ks.grad, k.grad), ("dv", vs.grad, v.grad)):
            _close(fails, f"ulysses {name} {g}", a, s(b))
        for x in (q, k, v):
            x.grad = None

    # the fused Funnel layer: qr = q + r_bias and tt from q, R and the biases per head
    bias = torch.randn(H, D, requires_grad=True)
    R = torch.randn(H, 2 * T - 1, D, requires_grad=True)
    seg = torch.randn(H, D, 2, requires_grad=True)
    types = torch.randint(0, 2, (B, T))

    def funnel(q, k, v, heads=slice(None), **kw):
        qr = q + bias[heads][None, :, None]
        tt = torch.einsum("bhtd,hdc->bhtc", q, seg[heads])
        return effattn.relpos_attention(q, k, v, qr, R[heads], tt=tt, q_types=types, k_types=types,
                                        separate_cls=True, **kw)

    o = funnel(q, k, v, key_padding_mask=m)
    do = torch.randn_like(o)
    (o * do).sum().backward()
    ref = {n: x.grad.clone() for n, x in (("dbias", bias), ("dR", R), ("dseg", seg), ("dq", q), ("dk", k), ("dv", v))}
    for x in (bias, R, seg):
        x.grad = None
    qs, ks, vs = (s(x.detach()).requires_grad_() for x in (q, k, v))
    heads = ed.ulysses_heads(H)
    o2 = ed.ulysses_attention(qs, ks, vs, attn=lambda q, k, v, **kw: funnel(q, k, v, heads, **kw),
                              key_padding_mask=s(m, 1))
    (o2 * s(do)).sum().backward()
    _close(fails, "ulysses funnel out", o2, s(o))
    for g, a, b in (("dq", qs.grad, ref["dq"]), ("dk", ks.grad, ref["dk"]), ("dv", vs.grad, ref["dv"])):
        _close(fails, f"ulysses funnel {g}", a, s(b))
    for g, x in (("dbias", bias), ("dR", R), ("dseg", seg)):  # this rank's heads only; the rest untouched
        _close(fails, f"ulysses funnel {g} (own heads)", x.grad[heads], ref[g][heads])
        rest = x.grad.clone()
        rest[heads] = 0
        if rest.any():
            fails.append(f"ulysses funnel {g}: gradient outside this rank's heads {heads}")


def _error_cases(rank, world, fails):
    from effattn import distributed as ed

    x = torch.randn(1, 2, 4 * world + 1, 8)
    for layout in ("zigzag", "contiguous"):
        try:
            ed.shard(x, layout=layout)
            fails.append(f"shard of an indivisible length ({layout}): no error")
        except ValueError as e:
            if layout not in str(e):
                fails.append(f"shard error does not name the layout: {e}")
    T = 8 if rank == 0 else 12  # shapes that differ across ranks
    q = torch.randn(1, 2, T, 8)
    try:
        ed.ring_attention(q, q, q, layout="contiguous")
        fails.append("mismatched shapes across ranks: no error")
    except ValueError as e:
        if "differ across ranks" not in str(e):
            fails.append(f"mismatch error: {e}")
    q = torch.randn(1, 2, 5, 8)  # shards of an odd length: the zigzag layout cannot hold them
    try:
        ed.ring_attention(q, q, q, layout="zigzag")
        fails.append("ring_attention on an indivisible length: no error")
    except ValueError as e:
        if "zigzag" not in str(e) or "multiple of" not in str(e):
            fails.append(f"ring_attention indivisible-length error: {e}")
    q = torch.randn(1, 3, 8, 8)
    try:
        ed.ulysses_attention(q, q, q)
        fails.append("ulysses with H % P != 0: no error")
    except ValueError:
        pass
    torch.manual_seed(3)
    y = torch.randn(2, 3, 4 * world, 5)
    _close(fails, "unshard(shard(x))", ed.unshard(ed.shard(y)), y)  # the group still works after the errors


CASES = dict(ring=_ring_cases, pooled=_pooled_cases, ulysses=_ulysses_cases, ulysses_ops=_ulysses_op_cases,
             errors=_error_cases)


def _worker(rank, world, port, names, queue):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    fails = []
    try:
        for name in names:
            CASES[name](rank, world, fails)
    except Exception:
        fails.append(traceback.format_exc())
    queue.put((rank, fails))
    dist.destroy_process_group()


def _run(world, names, timeout=240):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, world, port, names, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in range(world):
            rank, fails = queue.get(timeout=timeout)
            results[rank] = fails
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return results


@pytest.mark.parametrize("world", [2, 4])
def test_against_single_process(world):
    results = _run(world, list(CASES))
    assert sorted(results) == list(range(world))
    failed = {r: f for r, f in results.items() if f}
    assert not failed, "\n".join(f"rank {r}: {x}" for r, f in failed.items() for x in f)
