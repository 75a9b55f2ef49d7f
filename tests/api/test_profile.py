"""FLOP and byte formulas: visible-pair counts against brute force, FlopCounterMode on effattn's ops
against the analytic formulas and against FlopCounterMode on naive attention."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import effattn
from effattn import BlockMask
from effattn.profile import attention_cost, kept_pairs, visible_pairs
from effattn.reference import naive_attention
from tests.helpers import make_qkv


def _brute_pairs(Tq, Tk, wl, wr, diag, stride=1, clamp=False):
    n = 0
    for i in range(Tq):
        pos = max(i * stride + diag, 0) if clamp else i * stride + diag
        for j in range(Tk):
            d = j - pos
            n += (wl < 0 or d >= -wl) and (wr < 0 or d <= wr)
    return n


@pytest.mark.parametrize("Tq,Tk", [(1, 1), (17, 17), (30, 45), (45, 30)])
@pytest.mark.parametrize("wl,wr", [(-1, -1), (-1, 0), (5, 0), (3, 7), (0, -1)])
def test_visible_pairs_brute_force(Tq, Tk, wl, wr):
    for diag in (0, Tk - Tq, -3):
        assert visible_pairs(Tq, Tk, wl, wr, diag) == _brute_pairs(Tq, Tk, wl, wr, diag)
    assert visible_pairs(Tq, Tk, wl, wr, -1, q_pos_stride=2, clamp_first=True) == _brute_pairs(
        Tq, Tk, wl, wr, -1, stride=2, clamp=True)


def _count(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_flop_counter_dense_matches_naive_and_formula():
    q, k, v = make_qkv(B=2, Hq=4, Hkv=2, Tq=40, Tk=56, D=16, dtype=torch.float32, requires_grad=False)
    ours = _count(lambda: effattn.flash_attention(q, k, v))
    naive = _count(lambda: naive_attention(q, k, v))
    cost = attention_cost(2, 4, 2, 40, 56, 16, 16, 40 * 56)
    assert ours == naive == cost.fwd_flops == 4 * 2 * 4 * 40 * 56 * 16


def test_flop_counter_causal_backward_and_pooled():
    q, k, v = make_qkv(B=1, Hq=2, Tq=33, D=8, Dv=12, dtype=torch.float32)
    pairs = visible_pairs(33, 33, -1, 0, 0)
    with FlopCounterMode(display=False) as counter:
        effattn.flash_attention(q, k, v, causal=True).sum().backward()
    cost = attention_cost(1, 2, 2, 33, 33, 8, 12, pairs)
    assert counter.get_total_flops() == cost.fwd_flops + cost.bwd_flops
    pooled = _count(lambda: effattn.pooled_attention(q, k, v, separate_cls=True, causal=True))
    assert pooled == 2 * 2 * visible_pairs(17, 33, -1, 0, -1, q_pos_stride=2, clamp_first=True) * (8 + 12)


def test_flop_counter_sparse_counts_kept_blocks():
    q, k, v = make_qkv(B=1, Hq=2, Tq=70, D=16, dtype=torch.float32, requires_grad=False)
    bm = BlockMask.sliding_window(70, 70, 20, 0, block_size=(16, 16))
    counted = _count(lambda: effattn.sparse_attention(q, k, v, bm))
    kept = int(kept_pairs(bm).expand(1, 2).sum())
    assert counted == 2 * kept * 32
    blocks = (bm.block_kinds() != 0).nonzero().tolist()  # (b, h, m, n) of the kept blocks (H = 1)
    assert kept == 2 * sum(min(16, 70 - 16 * m) * min(16, 70 - 16 * n) for _, _, m, n in blocks)


def test_bytes_and_intensity():
    cost = attention_cost(1, 16, 16, 4096, 4096, 128, 128, 4096 * 4096, element_bytes=2)
    assert cost.fwd_bytes == (3 * 16 * 4096 * 128 + 16 * 4096 * 128) * 2 + 16 * 4096 * 4
    assert cost.naive_fwd_bytes > 10 * cost.fwd_bytes
    assert cost.fwd_intensity == pytest.approx(cost.fwd_flops / cost.fwd_bytes)
    assert cost.bwd_flops == cost.fwd_flops * 5 // 2


# ----------------------------------------------------------------------------------------------
# measured: time, rates, ceilings, roofline
# ----------------------------------------------------------------------------------------------
from effattn import profile as P  # noqa: E402
from effattn.timing import TimingConfig  # noqa: E402

FAST = TimingConfig(cpu_min_run_time_s=0.01)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_measure_counts_flops_and_rates():
    q, k, v = make_qkv(B=1, Hq=2, Tq=64, D=16, dtype=torch.float32, requires_grad=False)
    cost = attention_cost(1, 2, 2, 64, 64, 16, 16, 64 * 64, element_bytes=4)
    ceilings = P.Ceilings("cpu", "CPU", "float32", matmul_tflops=1.0, copy_gbps=10.0)
    m = P.measure(lambda: effattn.flash_attention(q, k, v), label="flash", bytes=cost.fwd_bytes, ceilings=ceilings,
                  config=FAST)
    assert m.flops == cost.fwd_flops and m.bytes == cost.fwd_bytes and m.ms > 0
    assert m.tflops == pytest.approx(cost.fwd_flops / (m.ms * 1e-3) / 1e12)
    assert m.gbps == pytest.approx(cost.fwd_bytes / (m.ms * 1e-3) / 1e9)
    assert m.intensity == pytest.approx(cost.fwd_intensity)
    assert m.compute_fraction == pytest.approx(m.tflops / 1.0) and m.bandwidth_fraction == pytest.approx(m.gbps / 10)
    assert m.peak_bytes is None or m.peak_bytes >= q.nbytes  # the output at least
    assert "flash:" in str(m) and "TFLOP/s" in str(m) and "of copy" in str(m)
    unknown = P.measure(lambda: effattn.flash_attention(q, k, v), count=False, config=FAST)
    assert unknown.flops is None and unknown.tflops is None and unknown.intensity is None


def test_measure_a_model_training_step():
    """A whole model: FlopCounterMode counts its linear layers and effattn's op, forward and backward."""
    B, H, T, D = 2, 2, 40, 8
    proj = torch.nn.Linear(H * D, 3 * H * D, bias=False)
    x = torch.randn(B, T, H * D)

    def step():
        q, k, v = proj(x).view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)
        effattn.flash_attention(q, k, v, causal=True).sum().backward()

    m = P.measure(step, config=FAST)
    linear = 2 * B * T * (H * D) * (3 * H * D)
    cost = attention_cost(B, H, H, T, T, D, D, visible_pairs(T, T, -1, 0, 0))
    # forward linear + its weight gradient (x needs no gradient) + the attention forward and backward
    assert m.flops == 2 * linear + cost.fwd_flops + cost.bwd_flops


def test_measure_rejects_bad_counts_and_devices():
    with pytest.raises(ValueError, match="flops"):
        P.measure(lambda: None, flops=-1, config=FAST)
    with pytest.raises(ValueError, match="bytes"):
        P.measure(lambda: None, bytes=1.5, count=False, config=FAST)
    with pytest.raises(ValueError, match="device"):
        P.measure(lambda: None, device="meta", count=False)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda"):
            P.measure_ceilings("cuda")


def test_ceilings_and_roofline(tmp_path):
    ceilings = P.measure_ceilings("cpu", config=FAST)
    assert ceilings.device == "cpu" and ceilings.matmul_tflops > 0 and ceilings.copy_gbps > 0
    assert ceilings.ridge_intensity == pytest.approx(ceilings.matmul_tflops * 1e3 / ceilings.copy_gbps)
    points = [P.Measurement("a", ms=1.0, flops=10**9, bytes=10**7, peak_bytes=None),
              P.Measurement("b", ms=2.0, flops=10**8, bytes=10**8, peak_bytes=None),
              P.Measurement("no bytes", ms=1.0, flops=10**9, bytes=None, peak_bytes=None)]
    path = P.roofline_plot(points, tmp_path / "roof.png", ceilings)
    assert path.read_bytes().startswith(PNG_MAGIC)
