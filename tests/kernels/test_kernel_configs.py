"""The GPU autotuning tables: every head-dim class has configs that fit an H100's shared memory,
and pruning picks the class of the call. (These run without a GPU: they check the tables.)"""

import pytest
import torch
import triton

from effattn.backends import TritonBackend
from effattn.kernels import flash_attn as fa

SMEM_BYTES = 227 * 1024  # H100 / A100-class opt-in shared memory per block
TABLES = {"fwd": fa.FWD_CONFIGS, "bwd_kv": fa.BWD_KV_CONFIGS, "bwd_q": fa.BWD_Q_CONFIGS}


def _smem_estimate(kind, bm, bn, stages, d, elem):
    """Bytes of the tiles a config keeps in shared memory (pipelined operands x stages), for QK head
    dim ``d`` and V head dim ``min(d, 256)`` (classes above 256 serve wide QK features only)."""
    dv = min(d, fa.MAX_HEAD_DIM)
    if kind == "fwd":  # Q resident; K, V streamed
        return bm * d * elem + stages * bn * (d + dv) * elem
    if kind == "bwd_kv":  # K, V resident; Q, dO streamed
        return bn * (d + dv) * elem + stages * bm * (d + dv) * elem
    return bm * (d + dv) * elem + stages * bn * (d + dv) * elem  # bwd_q: Q, dO resident; K, V streamed


@pytest.mark.parametrize("kind", TABLES)
@pytest.mark.parametrize("head_dim", fa.HEAD_DIM_CLASSES)
@pytest.mark.parametrize("elem", [2, 4])
def test_each_class_has_configs_that_fit(kind, head_dim, elem):
    rows = TABLES[kind][head_dim]
    assert rows
    for bm, bn, warps, stages in rows:
        assert bm >= 16 and bn >= 16 and triton.next_power_of_2(bm) == bm and triton.next_power_of_2(bn) == bn
        assert warps in (4, 8) and stages >= 1
    fits = [r for r in rows if _smem_estimate(kind, r[0], r[1], r[3], head_dim, elem) <= SMEM_BYTES]
    if elem == 4 and head_dim > TritonBackend.max_head_dim_qk_fp32:
        return  # float32 is declined above that width (tested in test_errors.py)
    assert fits, f"no {kind} config for head dim {head_dim} fits in shared memory at {elem}-byte elements"
    if elem == 2:
        assert len(fits) == len(rows), "every fp16/bf16 config should fit"


@pytest.mark.parametrize("head_dims,cls", [((16, 16), 64), ((64, 32), 64), ((128, 64), 128), ((64, 256), 256)])
def test_prune_picks_the_head_dim_class(monkeypatch, head_dims, cls):
    monkeypatch.setattr(fa, "INTERPRET", False)
    all_configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
                   for rows in fa.FWD_CONFIGS.values() for bm, bn, w, s in rows]
    kept = fa._prune_for(fa.FWD_CONFIGS)(all_configs, {}, BLOCK_DQK=head_dims[0], BLOCK_DV=head_dims[1])
    assert {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept} == set(
        fa.FWD_CONFIGS[cls])


def _config_rows():
    """The i-th config of every table, per head-dim class (the shorter tables repeat their last row)."""
    for cls in fa.HEAD_DIM_CLASSES:
        n = max(len(t[cls]) for t in TABLES.values())
        for i in range(n):
            yield pytest.param(cls, i, *(t[cls][min(i, len(t[cls]) - 1)] for t in TABLES.values()), id=f"D{cls}-{i}")


@pytest.mark.parametrize("cls,row,fwd,bwd_kv,bwd_q", list(_config_rows()))
@pytest.mark.interpreter_subset(row=[0], cls=[64, 128, 256, 1024])  # the interpreter: first configs (all on a GPU)
def test_every_gpu_config_is_correct(device, cls, row, fwd, bwd_kv, bwd_q):
    """Each tile shape of the GPU tables, forced, against the float64 reference (on CPU through the
    interpreter: the tile logic at real block sizes; on CUDA: also that each config compiles and runs)."""
    from tests.helpers import compare_with_reference, make_qkv

    D = cls // 2 + 8  # a non-power-of-two head dim inside the class (40, 72, 136, 264, 520, 1032)
    Dv = D if D <= fa.MAX_HEAD_DIM else 40  # wide classes: QK features only
    dtype = torch.float16 if D > TritonBackend.max_head_dim_qk_fp32 else torch.float32
    # lengths from the config's largest tile: at least two tiles and a ragged one on each axis, every
    # segment of the causal window walk (the window's left edge inside the keys); at most 150 x 200
    tile = max(max(c[:2]) for c in (fwd, bwd_kv, bwd_q))
    Tq = min(150, 2 * tile + 22)
    Tk = Tq + 50
    with fa.forced_configs(fwd=fwd, bwd_kv=bwd_kv, bwd_q=bwd_q):
        compare_with_reference(*make_qkv(B=1, Hq=2, Hkv=1, Tq=Tq, Tk=Tk, D=D, Dv=Dv, dtype=dtype, device=device),
                               causal=True, window=(Tk // 2, None))


class _FakeKernel:
    """Stands in for an autotuned kernel: records launches, runs out of shared memory for big tiles."""

    def __init__(self, max_block_m):
        self.max_block_m = max_block_m
        self.launched = []
        outer = self

        class _Fn:
            def __getitem__(self, grid):
                def launch(*args, BLOCK_M, BLOCK_N, num_warps, num_stages, **kw):
                    if BLOCK_M > outer.max_block_m:
                        raise fa.OutOfResources(300_000, 232_448, "shared memory")
                    outer.launched.append((BLOCK_M, BLOCK_N, num_warps, num_stages))
                return launch

        self.fn = _Fn()


def test_fixed_config_falls_back_when_out_of_resources(monkeypatch):
    """Without autotuning, the first config of the class that fits is used."""
    monkeypatch.setattr(fa, "INTERPRET", False)
    monkeypatch.setattr(fa, "AUTOTUNE", False)
    kernel = _FakeKernel(max_block_m=64)
    fa._launch(kernel, "fwd", fa.FWD_CONFIGS, lambda meta: (1,), (), {"BLOCK_DQK": 128, "BLOCK_DV": 128})
    first_fitting = next(c for c in fa.FWD_CONFIGS[128] if c[0] <= 64)
    assert kernel.launched == [first_fitting]
    with pytest.raises(fa.OutOfResources):
        fa._launch(_FakeKernel(max_block_m=16), "fwd", fa.FWD_CONFIGS, lambda meta: (1,), (),
                   {"BLOCK_DQK": 128, "BLOCK_DV": 128})
