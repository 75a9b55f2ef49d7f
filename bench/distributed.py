"""Context parallelism: bytes sent, time against the number of ranks, causal load balance.

``python -m bench.distributed`` spawns ``P`` processes (gloo on loopback, one thread each) for each
``P`` of ``--ranks`` and runs, on one problem ``(B, H, T, D)``, :func:`effattn.distributed.ring_attention`
(``contiguous`` and ``zigzag``, full and causal) and :func:`~effattn.distributed.ulysses_attention`,
forward and forward+backward. Per rank it records the median time, the bytes it sent
(:func:`~effattn.distributed.count_traffic`) against the ideal (the key/value bytes its queries need
from other ranks for the ring; ``(P-1)/P`` of q, k, v and out for Ulysses), and the (query, key) pairs
it computed (:func:`~effattn.distributed.ring_plan`), whose max/mean is the layout's load imbalance.
``P = 1`` is :func:`effattn.flash_attention` in one process: the time every ratio is taken against.

Under ``torchrun`` (``WORLD_SIZE`` set) it runs as one rank of the launched group instead, on the
device given (``--device cuda``: NCCL, one GPU a rank; see ``bench/distributed_gpu.sh``).

Writes ``distributed.json`` (metadata + rows), ``distributed.csv`` and ``distributed.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

STRATEGIES = (("ring", "contiguous", False), ("ring", "zigzag", False), ("ring", "contiguous", True),
              ("ring", "zigzag", True), ("ulysses", "contiguous", False), ("ulysses", "contiguous", True))


def _time(fn, repeats: int, device: str) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _inputs(args, device):
    g = torch.Generator().manual_seed(0)
    shape = (args.batch, args.heads, args.seq, args.dim)
    return [torch.randn(shape, generator=g).to(device=device, dtype=getattr(torch, args.dtype)) for _ in range(3)]


def _step(call, mode: str, dout: torch.Tensor):
    """One timed call: forward without autograd, or forward + backward."""
    def step():
        if mode == "fwd":
            with torch.no_grad():
                return call()
        torch.autograd.backward(call(), dout)
    return step


def _rank_rows(args, device: str) -> list[dict]:
    """This rank's rows, for every strategy (the group is initialised)."""
    from functools import partial

    from effattn import distributed as ed

    rank, world = dist.get_rank(), dist.get_world_size()
    q, k, v = _inputs(args, device)
    rows = []
    for kind, layout, causal in STRATEGIES:
        if kind == "ulysses" and args.heads % world:
            continue
        qs, ks, vs = (ed.shard(x, layout=layout).requires_grad_() for x in (q, k, v))
        fn = ed.ring_attention if kind == "ring" else ed.ulysses_attention
        call = partial(fn, qs, ks, vs, causal=causal, layout=layout, backend=args.backend)
        out = call()
        dout = torch.randn_like(out)
        for mode in ("fwd", "fwd_bwd"):
            step = _step(call, mode, dout)
            seconds = _time(step, args.repeats, device)
            with ed.count_traffic() as traffic:
                step()
            rows.append(dict(strategy=kind, layout=layout, causal=causal, mode=mode, ranks=world, rank=rank,
                             seconds=seconds, bytes_sent=traffic.total(),
                             ideal_bytes=_ideal(kind, mode, layout, causal, qs, ks, vs, out, rank, world),
                             pairs=_pairs(kind, layout, causal, args, rank, world)))
    return rows


def _ideal(kind, mode, layout, causal, q, k, v, out, rank, world) -> int:
    """The fewest bytes this rank must send: ring, the key/value shards other ranks' queries need of it
    (and their dK/dV back in the backward); Ulysses, the parts of q, k, v and out that change rank."""
    from effattn.distributed import ring_plan

    nbytes = (k.numel() * k.element_size() + v.numel() * v.element_size())
    if kind == "ring":
        plan = ring_plan(q.shape[2] * world, world, layout=layout, causal=causal)
        needed = sum(plan.needs[rank][dst] for dst in range(world) if dst != rank)
        return needed * nbytes * (2 if mode == "fwd_bwd" else 1)
    moved = (q.numel() * q.element_size() + nbytes + out.numel() * out.element_size()) * (world - 1) // world
    return moved * (2 if mode == "fwd_bwd" else 1)


def _pairs(kind, layout, causal, args, rank, world) -> int:
    from effattn.distributed import ring_plan

    if kind == "ring":
        return ring_plan(args.seq, world, layout=layout, causal=causal).pairs[rank] * args.batch * args.heads
    T = args.seq
    per_head = T * (T + 1) // 2 if causal else T * T
    return per_head * args.batch * (args.heads // world)


def _single(args, device: str) -> list[dict]:
    """P = 1: flash_attention in one process (the baseline of every ratio)."""
    from functools import partial

    import effattn

    q, k, v = (x.requires_grad_() for x in _inputs(args, device))
    rows = []
    for causal in (False, True):
        call = partial(effattn.flash_attention, q, k, v, causal=causal, backend=args.backend)
        dout = torch.randn_like(call())
        for mode in ("fwd", "fwd_bwd"):
            step = _step(call, mode, dout)
            T = args.seq
            rows.append(dict(strategy="single", layout="-", causal=causal, mode=mode, ranks=1, rank=0,
                             seconds=_time(step, args.repeats, device), bytes_sent=0, ideal_bytes=0,
                             pairs=(T * (T + 1) // 2 if causal else T * T) * args.batch * args.heads))
    return rows


def _worker(rank: int, world: int, port: int, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    try:
        rows = _rank_rows(args, "cpu")
        gathered = [None] * world
        dist.all_gather_object(gathered, rows)
        if rank == 0:
            queue.put([r for part in gathered for r in part])
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(args, world: int) -> list[dict]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    rows = queue.get(timeout=args.timeout)
    for p in procs:
        p.join(timeout=60)
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """One line per (strategy, layout, causal, mode, ranks): the slowest rank's time, its ratio to one
    process, bytes per rank against the ideal, and the load imbalance (max/mean pairs)."""
    base = {(r["causal"], r["mode"]): r["seconds"] for r in rows if r["strategy"] == "single"}
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["strategy"], r["layout"], r["causal"], r["mode"], r["ranks"]), []).append(r)
    out = []
    for (kind, layout, causal, mode, ranks), rs in sorted(groups.items(), key=lambda kv: (kv[0][4], kv[0][:4])):
        slowest = max(r["seconds"] for r in rs)
        pairs = [r["pairs"] for r in rs]
        out.append(dict(strategy=kind, layout=layout, causal=causal, mode=mode, ranks=ranks, seconds=slowest,
                        speedup=base[causal, mode] / slowest, max_bytes_sent=max(r["bytes_sent"] for r in rs),
                        ideal_bytes=max(r["ideal_bytes"] for r in rs),
                        imbalance=max(pairs) / (sum(pairs) / len(pairs)) if sum(pairs) else 1.0))
    return out


def markdown(summary: list[dict], meta: dict) -> str:
    lines = [f"# Context parallelism, {meta.get('device_name', meta.get('device'))}", "",
             f"Problem: {meta['problem']}; times are the slowest rank's median; speed-up against one process "
             "running flash_attention; bytes are the most any rank sent.", "",
             "| strategy | layout | causal | mode | ranks | ms | speed-up | MB sent / rank | ideal MB | imbalance |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for s in summary:
        lines.append(f"| {s['strategy']} | {s['layout']} | {s['causal']} | {s['mode']} | {s['ranks']} | "
                     f"{s['seconds'] * 1e3:.1f} | {s['speedup']:.2f}x | {s['max_bytes_sent'] / 1e6:.2f} | "
                     f"{s['ideal_bytes'] / 1e6:.2f} | {s['imbalance']:.2f} |")
    return "\n".join(lines) + "\n"


def write(rows, args, out: Path, device: str) -> None:
    from bench import metadata

    out.mkdir(parents=True, exist_ok=True)
    meta = metadata.collect(device, " ".join(sys.argv), extra=dict(
        problem=f"B={args.batch} H={args.heads} T={args.seq} D={args.dim} {args.dtype}", threads=args.threads))
    summary = summarize(rows)
    (out / "distributed.json").write_text(json.dumps(dict(metadata=meta, rows=rows, summary=summary), indent=1))
    with open(out / "distributed.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(summary[0]))
        w.writeheader()
        w.writerows(summary)
    (out / "distributed.md").write_text(markdown(summary, meta))
    print(markdown(summary, meta))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--backend", default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank (and for P = 1)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="a small problem, for the tests")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.seq, args.heads, args.dim, args.repeats, args.ranks = 64, 4, 16, 1, [2]
    stamp = datetime.date.today().isoformat()
    if "WORLD_SIZE" in os.environ:  # launched by torchrun: one rank of its group
        backend = "nccl" if args.device == "cuda" else "gloo"
        dist.init_process_group(backend)
        device = args.device
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        rows = _rank_rows(args, device)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, rows)
        if dist.get_rank() == 0:
            rows = _single(args, device) + [r for part in gathered for r in part]
            write(rows, args, args.out or Path(f"bench/results/{stamp}_{device}_distributed"), device)
        dist.destroy_process_group()
        return
    torch.set_num_threads(args.threads)
    rows = _single(args, "cpu")
    for world in args.ranks:
        rows += _spawn(args, world)
    write(rows, args, args.out or Path(f"bench/results/{stamp}_cpu_distributed"), "cpu")


if __name__ == "__main__":
    main()
