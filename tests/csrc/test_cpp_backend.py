"""What is particular to the C++ CPU implementation of the extension (``backend="cpp"``): selection by
``EFFATTN_BACKEND``, what it declines, that automatic dispatch never picks it, and its registered ops.

It runs the tiled algorithm of the CUDA kernels (csrc/cuda) with the same shared rules
(csrc/common/attn_rules.h). Its comparisons with the float64 reference are the tests of the public
functions (tests/api/), which run on every backend through the ``backend`` fixture (tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

import effattn
from effattn import BlockMask, _ext, cuda_ops, reference
from effattn.reference import QueryPool
from effattn.testing import assert_close
from tests.helpers import compare_with_reference, make_qkv


@pytest.fixture(autouse=True)
def _small_tiles(monkeypatch):
    """Tiles of 16 x 16 queries x keys: several tiles, ragged edges and every walk at small sizes."""
    monkeypatch.setattr(cuda_ops, "CPU_TILE", (16, 16))


def test_env_selects_cpp(monkeypatch):
    monkeypatch.setenv("EFFATTN_BACKEND", "cpp")
    q, k, v = make_qkv(B=1, Hq=2, Tq=9, D=16, dtype=torch.float32, requires_grad=False)
    out = effattn.flash_attention(q, k, v)
    ref = effattn.flash_attention(q.double(), k.double(), v.double(), backend="reference")
    assert_close(out, ref, torch.float32, "fwd", "out")


def test_cpp_dropout_bad_probability():
    """Dropout runs in the C++ kernels (tests/csrc/test_cpu_kernel.py); a probability outside [0, 1) is
    refused before any kernel, naming the argument."""
    q, k, v = make_qkv(B=1, Hq=2, Tq=9, D=16, dtype=torch.float32, requires_grad=False)
    with pytest.raises(ValueError, match="dropout_p"):
        effattn.flash_attention(q, k, v, dropout_p=1.0, backend="cpp")


def test_automatic_order():
    """CPU tensors run the C++ kernels automatically (before the reference); the CUDA C++ kernels only when named."""
    order = effattn.backends.AUTO_ORDER
    assert order.index("cpp") < order.index("reference") and "cuda" not in order


def test_automatic_choice_on_cpu():
    from effattn.backends import AttentionCall, select_backend

    def call(dtype, dropout=False):
        return AttentionCall(device=torch.device("cpu"), dtype=dtype, head_dim_qk=64, head_dim_v=64, Tq=8, Tk=8,
                             dropout=dropout)

    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert select_backend(call(dtype)).name == "cpp"
    assert select_backend(call(torch.float64)).name == "reference"  # the float64 path is the reference
    assert select_backend(call(torch.float32, dropout=True)).name == "cpp"  # dropout with the reference's bits
    assert select_backend(call(torch.float64), "cpp").name == "cpp"  # named: its scalar float64 path


# ----------------------------------------------------------------------------------------------
# the registered ops (custom ops with fake implementations and autograd) on the cpp backend
# ----------------------------------------------------------------------------------------------
def test_opcheck_flash():
    q, k, v = make_qkv(Hq=4, Hkv=2, Tq=9, Tk=13, D=16, dtype=torch.float32)
    mask = torch.rand(2, 1, 1, 13) > 0.2
    args = (q, k, v, mask, 0.25, 3, 0, k.shape[2] - q.shape[2], 0.0, 0, 0.0, None, "cpp")
    torch.library.opcheck(torch.ops.effattn.attention_fwd.default, args)


def test_opcheck_pooled():
    q, k, v = make_qkv(Hq=2, Tq=11, D=16, dtype=torch.float32)
    args = (q, k, v, None, 0.25, -1, 0, 2, "mean", True, False, 0.0, 0, "cpp")
    torch.library.opcheck(torch.ops.effattn.pooled_attention_fwd.default, args)


def test_opcheck_sparse():
    q, k, v = make_qkv(Hq=2, Tq=40, Tk=40, D=16, dtype=torch.float32)
    bm = BlockMask.causal(40, 40, block_size=16)
    args = (q, k, v, None, *bm.as_tuple(), 0.25, "cpp")
    torch.library.opcheck(torch.ops.effattn.sparse_attention_fwd.default, args)


# ----------------------------------------------------------------------------------------------
# score modifiers (softcap, alibi_slopes), forward and backward, against the float64 reference;
# outputs NaN-poisoned (tests/conftest.py)
# ----------------------------------------------------------------------------------------------
def _slopes(B: int, Hq: int, per_batch: bool = False) -> torch.Tensor:
    """ALiBi slopes: the paper's geometric ones per head ``(Hq,)``, or random ones per batch and head ``(B, Hq)``."""
    if per_batch:
        return torch.rand(B, Hq) * 0.5
    return 2.0 ** (-8.0 * torch.arange(1, Hq + 1) / Hq)


MODS = ["softcap", "alibi", "alibi_batch", "both"]


def _mods(name: str, B: int, Hq: int) -> dict:
    """The modifiers' keywords of flash_attention; a cap of 1.5 puts many default-scale scores past tanh's knee."""
    return {"softcap": dict(softcap=1.5),
            "alibi": dict(alibi_slopes=_slopes(B, Hq)),
            "alibi_batch": dict(alibi_slopes=_slopes(B, Hq, per_batch=True)),
            "both": dict(softcap=1.5, alibi_slopes=_slopes(B, Hq, per_batch=True))}[name]


@pytest.mark.parametrize("mods", MODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_score_mods(dtype, mods):
    """Every dtype (float64: the scalar path) and modifier on odd sizes with GQA, causal bottom-right and key
    padding whose last batch entry pads every key (its rows see none: out 0, lse -inf, zero gradients)."""
    q, k, v = make_qkv(B=3, Hq=4, Hkv=2, Tq=37, Tk=75, D=40, dtype=dtype)
    kpm = torch.rand(3, 75) > 0.2
    kpm[2] = False
    compare_with_reference(q, k, v, backend="cpp", causal=True, key_padding_mask=kpm, lse_grad=True,
                           **_mods(mods, 3, 4))


MOD_CASES = {
    "window": dict(shape=dict(B=1, Hq=2, Tq=75, D=40), kw=dict(window=(20, 5))),
    "tq_above_tk_causal": dict(shape=dict(B=2, Hq=2, Tq=75, Tk=37, D=40), kw=dict(causal=True)),
    "tq_below_tk_window": dict(shape=dict(B=1, Hq=4, Hkv=1, Tq=37, Tk=75, D=40, Dv=24), kw=dict(window=(16, 3))),
    "below_one_tile": dict(shape=dict(B=2, Hq=2, Tq=5, Tk=7, D=40), kw=dict(causal=True)),
    "d128_gqa": dict(shape=dict(B=1, Hq=6, Hkv=2, Tq=70, Tk=90, D=128), kw=dict(causal=True)),
    "unmasked": dict(shape=dict(B=2, Hq=3, Tq=45, Tk=130, D=40), kw=dict()),
}


@pytest.mark.parametrize("mode", ["fused", "split"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(MOD_CASES))
def test_score_mods_shapes(monkeypatch, case, dtype, mode):
    """Both modifiers under windows, Tq > Tk and Tq < Tk (bottom-right positions, rows that see no key), sizes
    below one tile, head dim 128; in both backwards of the tiled kernels."""
    monkeypatch.setenv("EFFATTN_CPU_BACKWARD", mode)
    shape = MOD_CASES[case]["shape"]
    q, k, v = make_qkv(**shape, dtype=dtype)
    compare_with_reference(q, k, v, backend="cpp", lse_grad=True, **MOD_CASES[case]["kw"],
                           **_mods("both", shape["B"], shape["Hq"]))


# Decoding (Tiled::decodes): at most 16 query rows per head against many keys; the rows of a GQA group stacked in one
# tile, the keys split over tasks and merged by lse ($EFFATTN_CPU_DECODE_SPLITS forces the split).
DECODE_CASES = {
    "one_row_gqa": dict(shape=dict(B=2, Hq=8, Hkv=2, Tq=1, Tk=300, D=64), kw=dict()),
    "rows16_mqa_causal": dict(shape=dict(B=1, Hq=4, Hkv=1, Tq=16, Tk=257, D=40, Dv=24), kw=dict(causal=True)),
    "window_softcap_alibi": dict(shape=dict(B=2, Hq=4, Hkv=2, Tq=3, Tk=200, D=128),
                                 kw=dict(window=(50, 0), softcap=1.5, alibi_slopes=_slopes(2, 4, per_batch=True))),
    "window_diagonal": dict(shape=dict(B=1, Hq=2, Tq=4, Tk=150, D=32), kw=dict(window=(0, 0))),
    "group_above_tile": dict(shape=dict(B=1, Hq=16, Hkv=1, Tq=8, Tk=130, D=32), kw=dict(causal=True)),
}


@pytest.mark.parametrize("splits", [None, 1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_decoding(monkeypatch, case, dtype, splits):
    """Stacked GQA rows (one row per head up to 16, MQA, Dqk != Dv, head dim 128), bottom-right causal and windows
    (a window (0, 0): one key per row), softcap and ALiBi per
    row's head, parts of 1 or 3 key ranges; a group too big for the tile takes the ordinary path."""
    if splits is not None:
        monkeypatch.setenv("EFFATTN_CPU_DECODE_SPLITS", str(splits))
    shape = DECODE_CASES[case]["shape"]
    q, k, v = make_qkv(**shape, dtype=dtype)
    compare_with_reference(q, k, v, backend="cpp", lse_grad=True, **DECODE_CASES[case]["kw"])


def test_decoding_rows_without_keys(monkeypatch):
    """Rows that see no key (a window entirely past the keys) and a split whose range is invisible: out 0, lse -inf."""
    monkeypatch.setenv("EFFATTN_CPU_DECODE_SPLITS", "4")
    q, k, v = make_qkv(B=1, Hq=4, Hkv=2, Tq=2, Tk=260, D=32, dtype=torch.float32, requires_grad=False)
    out, lse = cuda_ops.attn_forward(q, k, v, None, scale=0.2, window_left=0, window_right=0, diag_offset=300)
    ref_out, ref_lse = reference.attention_forward(q.double(), k.double(), v.double(), None, scale=0.2,
                                                   window_left=0, window_right=0, diag_offset=300)
    assert torch.isneginf(lse).all() and torch.isneginf(ref_lse).all()
    assert torch.equal(out, torch.zeros_like(out))
    out, lse = cuda_ops.attn_forward(q, k, v, None, scale=0.2, window_left=10, window_right=0, diag_offset=-1)
    ref_out, ref_lse = reference.attention_forward(q.double(), k.double(), v.double(), None, scale=0.2,
                                                   window_left=10, window_right=0, diag_offset=-1)
    assert torch.isneginf(lse[:, :, 0]).all() and torch.isneginf(ref_lse[:, :, 0]).all()
    assert_close(out, ref_out, torch.float32, "fwd", "out")
    assert_close(lse[:, :, 1:], ref_lse[:, :, 1:], torch.float32, "lse", "lse")


@pytest.mark.parametrize("case", list(MOD_CASES))
def test_score_mods_shapes_float64(case):
    """The same cases on the scalar float64 path (tiles of 16: several per case)."""
    shape = MOD_CASES[case]["shape"]
    q, k, v = make_qkv(**shape, dtype=torch.float64)
    compare_with_reference(q, k, v, backend="cpp", lse_grad=True, **MOD_CASES[case]["kw"],
                           **_mods("both", shape["B"], shape["Hq"]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_score_mods_with_dropout(dtype):
    """Dropout's draws on top of both modifiers (the same seed as the reference)."""
    q, k, v = make_qkv(B=2, Hq=4, Hkv=2, Tq=50, Tk=41, D=40, dtype=dtype)
    compare_with_reference(q, k, v, backend="cpp", causal=True, dropout_p=0.3, dropout_seed=2**40 + 5, lse_grad=True,
                           **_mods("both", 2, 4))


@pytest.mark.parametrize("name", ["avx512", "avx2", "portable"])
def test_score_mods_isa(name):
    """The soft cap's tanh and ALiBi's bias of every instruction set; scale 1 spreads the scores over both
    forms of tanh (its polynomial and its exponential)."""
    ext = _ext.load()
    try:
        ext.cpu_set_isa(name)
    except ValueError as e:
        pytest.skip(str(e))
    try:
        q, k, v = make_qkv(B=1, Hq=2, Tq=83, Tk=70, D=48, dtype=torch.float32)
        compare_with_reference(q, k, v, backend="cpp", causal=True, scale=1.0, softcap=4.0,
                               alibi_slopes=_slopes(1, 2, per_batch=True), lse_grad=True)
    finally:
        ext.cpu_set_isa("auto")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_score_mods_take_effect(dtype):
    """A small cap, and ALiBi, really change the output and the gradients (an ignored argument fails)."""
    q, k, v = make_qkv(B=1, Hq=2, Tq=33, D=40, dtype=dtype)
    runs = {}
    for name, kw in (("plain", {}), ("softcap", dict(softcap=0.5)), ("alibi", dict(alibi_slopes=_slopes(1, 2)))):
        out = effattn.flash_attention(q, k, v, backend="cpp", **kw)
        runs[name] = (out, *torch.autograd.grad(out.sum(), (q, k)))
    for name in ("softcap", "alibi"):
        for x, y in zip(runs[name], runs["plain"]):
            assert (x - y).abs().max() > 1e-2, name


def test_pooled_through_the_launcher():
    """Pooled attention reaches the launcher without the modifiers' keywords (their defaults: none); given them,
    the launcher measures ALiBi's distances of pooled rows from the window rule's positions ([cls] at 0)."""
    q, k, v = make_qkv(B=1, Hq=2, Tq=45, D=24, dtype=torch.float32)
    compare_with_reference(q, k, v, backend="cpp", op=effattn.pooled_attention, stride=2, separate_cls=True,
                           causal=True, lse_grad=True)
    q, k, v = (x.detach() for x in (q, k, v))
    pool = QueryPool(stride=3, mode="max", separate_cls=True)
    slopes = _slopes(1, 2, per_batch=True)
    kw = dict(scale=0.3, window_right=0, diag_offset=pool.position_offset, pool=pool, softcap=1.5)
    out, lse = cuda_ops.attn_forward(q, k, v, None, alibi_slopes=slopes, **kw)
    qr, kr, vr = (x.double() for x in (q, k, v))
    ref, ref_lse = reference.attention_forward(qr, kr, vr, None, alibi_slopes=slopes.double(), **kw)
    assert_close(out, ref, torch.float32, "fwd", "out")
    assert_close(lse, ref_lse, torch.float32, "lse", "lse")
    dout = torch.randn_like(out)
    grads = cuda_ops.attn_backward(dout, q, k, v, out, lse, None, alibi_slopes=slopes, **kw)
    ref_grads = reference.attention_backward(dout.double(), qr, kr, vr, ref, ref_lse, None,
                                             alibi_slopes=slopes.double(), **kw)
    for name, g, rg in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(g, rg, torch.float32, "grad", name)


def test_score_mods_bad_arguments():
    """The launcher checks the slopes (dtype of lse, (B, Hq), contiguous) and the cap; the extension refuses the
    modifiers with block-sparse attention, whose semantics have none."""
    q, k, v = make_qkv(B=2, Hq=4, Hkv=2, Tq=8, D=16, dtype=torch.float32, requires_grad=False)
    for bad in (torch.rand(2, 4, dtype=torch.float64), torch.rand(4), torch.rand(4, 2).t()):
        with pytest.raises(ValueError, match="alibi_slopes"):
            cuda_ops.attn_forward(q, k, v, None, scale=1.0, alibi_slopes=bad)
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="softcap"):
            cuda_ops.attn_forward(q, k, v, None, scale=1.0, softcap=bad)
    bm = BlockMask.causal(8, 8, block_size=16)
    ext, kind, p, keep = cuda_ops._sparse_params(q, k, v, bm, None, 1.0, backward=False)
    p.softcap = 1.0
    with pytest.raises(ValueError, match="block-sparse"):
        cuda_ops._forward(ext, kind, p, q, keep)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_launcher_refuses_score_mods():
    q, k, v = make_qkv(B=1, Hq=2, Tq=8, D=64, dtype=torch.float16, device="cuda", requires_grad=False)
    with pytest.raises(ValueError, match="not implemented in the CUDA kernels"):
        cuda_ops.attn_forward(q, k, v, None, scale=1.0, softcap=5.0)
    with pytest.raises(ValueError, match="not implemented in the CUDA kernels"):
        cuda_ops.attn_forward(q, k, v, None, scale=1.0, alibi_slopes=torch.rand(1, 2, device="cuda"))
