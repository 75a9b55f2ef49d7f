"""The tiled SIMD CPU kernels behind ``backend="cpp"`` (csrc/cpu/attn_tiled.cpp, simd_*.cpp).

What tests/csrc/test_cpp_backend.py does not: results bit-identical whatever the number of threads,
every compiled instruction set (AVX-512, AVX2, portable) against the float64 reference, a seeded fuzz
over shapes and options, head dims up to Funnel's fused ~1100, strided inputs and rows that see no key.
Outputs are NaN-poisoned (tests/conftest.py).
"""

from __future__ import annotations

import contextlib
import random

import pytest
import torch

import effattn
from effattn import BlockMask, _ext, cuda_ops, reference
from effattn.testing import assert_close
from tests.helpers import compare_with_reference, make_qkv

ISAS = ["avx512", "avx2", "portable"]


@pytest.fixture(scope="module")
def ext():
    module = _ext.load()
    if not hasattr(module, "cpu_set_isa"):
        pytest.fail(f"the loaded effattn._C ({module.__file__}) was built from older sources (no cpu_set_isa): "
                    "rebuild it, or remove it so that the JIT build of the current csrc/ is used")
    return module


@contextlib.contextmanager
def isa(ext, name: str):
    """Run the CPU kernels with the micro-kernels of ``name``; skip where this CPU cannot run them."""
    try:
        ext.cpu_set_isa(name)
    except ValueError as e:
        pytest.skip(str(e))
    try:
        assert ext.cpu_isa() == name
        yield
    finally:
        ext.cpu_set_isa("auto")


@contextlib.contextmanager
def threads(monkeypatch, n: int):
    """Launch the CPU kernels with ``params.num_threads = n``."""
    run = cuda_ops._run

    def with_threads(ext, kind, direction, p):
        p.num_threads = n
        return run(ext, kind, direction, p)

    with monkeypatch.context() as m:
        m.setattr(cuda_ops, "_run", with_threads)
        yield


def _sparse_launchers(q, k, v, bm, kpm=None):
    """out, lse, dq, dk, dv of the block-sparse launchers (cuda_ops.sparse_forward / sparse_backward) with
    fixed cotangents."""
    q, k, v = (x.detach() for x in (q, k, v))
    scale = q.shape[-1] ** -0.5
    out, lse = cuda_ops.sparse_forward(q, k, v, bm, kpm, scale=scale)
    gen = torch.Generator().manual_seed(7)
    dout = torch.randn(out.shape, generator=gen).to(out.dtype)
    dlse = torch.randn(lse.shape, generator=gen)
    return (out, lse, *cuda_ops.sparse_backward(dout, q, k, v, out, lse, dlse, bm, kpm, scale=scale)), dout, dlse


def check_sparse(q, k, v, bm, kpm=None):
    """The block-sparse launchers against the float64 reference with the equivalent dense token mask."""
    (out, lse, *grads), dout, dlse = _sparse_launchers(q, k, v, bm, kpm)
    keep = bm.to_dense()
    if kpm is not None:
        keep = keep & kpm[:, None, None, :]
    qr, kr, vr = (x.detach().double() for x in (q, k, v))
    scale = q.shape[-1] ** -0.5
    ref, ref_lse = reference.attention_forward(qr, kr, vr, keep, scale=scale)
    assert_close(out, ref, q.dtype, "fwd", "out")
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    finite = torch.isfinite(ref_lse)
    assert_close(lse[finite], ref_lse[finite], q.dtype, "lse", "lse")
    ref_grads = reference.attention_backward(dout.double(), qr, kr, vr, ref, ref_lse, keep,
                                             dlse.double().masked_fill(~finite, 0), scale=scale)
    for name, g, rg in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(g, rg, q.dtype, "grad", name)
    return out, lse


def _run_all(q, k, v, op=effattn.flash_attention, **kw):
    """out, lse and the gradients of q, k, v and lse (fixed cotangents) on the cpp backend."""
    qg, kg, vg = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out, lse = op(qg, kg, vg, return_lse=True, backend="cpp", **kw)
    gen = torch.Generator().manual_seed(7)
    dout = torch.randn(out.shape, generator=gen).to(out.dtype)
    dlse = torch.randn(lse.shape, generator=gen)
    loss = (out.float() * dout.float()).sum() + (lse.masked_fill(torch.isinf(lse), 0) * dlse).sum()
    return (out, lse, *torch.autograd.grad(loss, (qg, kg, vg)))


# ----------------------------------------------------------------------------------------------
# determinism across thread counts
# ----------------------------------------------------------------------------------------------
CASES = {
    "dense": dict(shape=dict(B=2, Hq=4, Hkv=2, Tq=200, Tk=150, D=64), kw=dict()),
    "causal_fp16": dict(shape=dict(B=1, Hq=3, Tq=257, D=40, dtype=torch.float16), kw=dict(causal=True)),
    "window_bf16": dict(shape=dict(B=1, Hq=2, Tq=190, D=32, dtype=torch.bfloat16), kw=dict(window=(40, 7))),
}


@pytest.mark.parametrize("mode", ["fused", "split"])
@pytest.mark.parametrize("case", [*CASES, "pooled", "sparse"])
def test_bit_identical_across_thread_counts(ext, monkeypatch, case, mode):
    monkeypatch.setenv("EFFATTN_CPU_BACKWARD", mode)
    if case == "pooled":
        q, k, v = make_qkv(B=2, Hq=2, Tq=301, D=32, dtype=torch.float32)
        op, kw = effattn.pooled_attention, dict(stride=3, pool="mean", separate_cls=True, causal=True)
    elif case == "sparse":
        q, k, v = make_qkv(B=1, Hq=4, Hkv=1, Tq=300, Tk=280, D=64, dtype=torch.float32)
        bm = BlockMask.bigbird(300, 280, window=(48, 48), n_global=8, n_random_blocks=1, block_size=(32, 64))
        op, kw = None, dict()
    else:
        q, k, v = make_qkv(**CASES[case]["shape"])
        op, kw = effattn.flash_attention, CASES[case]["kw"]
    runs = []
    for n in (1, 2, 3):
        with threads(monkeypatch, n):
            runs.append(_run_all(q, k, v, op=op, **kw) if op else _sparse_launchers(q, k, v, bm)[0])
    for other in runs[1:]:
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), runs[0], other):
            assert torch.equal(a, b), f"{name} differs between thread counts"


def test_threads_change_nothing_but_speed(ext, monkeypatch):
    """num_threads = 0 (the hardware's concurrency) and more threads than tasks give the same bits."""
    q, k, v = make_qkv(B=1, Hq=1, Tq=70, D=16, dtype=torch.float32)
    with threads(monkeypatch, 1):
        a = _run_all(q, k, v, causal=True)
    for n in (0, 16):
        with threads(monkeypatch, n):
            b = _run_all(q, k, v, causal=True)
        assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("mode", ["fused", "split"])
def test_backward_modes(ext, monkeypatch, mode):
    """Both backwards (a task per kv head accumulating dQ, or separate dK/dV and dQ passes) against the
    float64 reference: GQA, pooling, block-sparse."""
    monkeypatch.setenv("EFFATTN_CPU_BACKWARD", mode)
    q, k, v = make_qkv(B=2, Hq=4, Hkv=2, Tq=150, Tk=131, D=48, Dv=32, dtype=torch.float32)
    compare_with_reference(q, k, v, backend="cpp", causal=True, key_padding_mask=torch.rand(2, 131) > 0.2,
                           lse_grad=True)
    q, k, v = make_qkv(B=1, Hq=2, Tq=150, D=32, dtype=torch.bfloat16)
    compare_with_reference(q, k, v, backend="cpp", op=effattn.pooled_attention, stride=3, pool="max",
                           separate_cls=True, causal=True, lse_grad=True)
    bm = BlockMask.sliding_window(150, 150, 40, 40, block_size=(32, 64))
    check_sparse(q, k, v, bm)


# ----------------------------------------------------------------------------------------------
# each instruction set against the float64 reference
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_isa_dense(ext, name, dtype):
    q, k, v = make_qkv(B=2, Hq=4, Hkv=2, Tq=77, Tk=93, D=80, Dv=48, dtype=dtype)
    kpm = torch.rand(2, 93) > 0.2
    with isa(ext, name):
        compare_with_reference(q, k, v, backend="cpp", causal=True, key_padding_mask=kpm, lse_grad=True)
        compare_with_reference(q, k, v, backend="cpp", window=(30, 5))


@pytest.mark.parametrize("name", ISAS)
def test_isa_pooled_and_sparse(ext, name):
    q, k, v = make_qkv(B=1, Hq=2, Tq=130, D=24, Dv=40, dtype=torch.float32)
    with isa(ext, name):
        compare_with_reference(q, k, v, backend="cpp", op=effattn.pooled_attention, stride=2, pool="max",
                               separate_cls=True, causal=True, lse_grad=True)
        bm = BlockMask.sliding_window(130, 130, 50, 10, block_size=(32, 16))
        check_sparse(q, k, v, bm)


def test_isa_names(ext):
    assert ext.cpu_isa() in ISAS
    with pytest.raises(ValueError, match="not available"):
        ext.cpu_set_isa("sse9")
    ext.cpu_set_isa("portable")
    try:
        assert ext.cpu_isa() == "portable"
    finally:
        ext.cpu_set_isa("auto")


# ----------------------------------------------------------------------------------------------
# fuzz over shapes and options (fp32, seeded)
# ----------------------------------------------------------------------------------------------
def _fuzz_case(rng: random.Random):
    Hkv = rng.choice([1, 2])
    Tq = rng.choice([1, 17, 63, 64, 65, 130, 1000])
    Tk = rng.choice([1, 17, 64, 129, 1000]) if rng.random() < 0.6 else Tq
    if Tq * Tk > 200_000:  # keep the float64 reference cheap
        Tk = 17
    shape = dict(B=rng.choice([1, 2]), Hq=Hkv * rng.choice([1, 2]), Hkv=Hkv, Tq=Tq, Tk=Tk,
                 D=rng.choice([16, 24, 64, 72, 128, 200, 256]), Dv=rng.choice([16, 40, 64, 96, 256]),
                 layout=rng.choice(["bhtd", "bthd"]))
    kw = {}
    mode = rng.choice(["none", "causal", "window", "kpm"])
    if mode == "causal":
        kw["causal"] = True
    elif mode == "window":
        kw["window"] = (rng.choice([None, 0, 9, 70]), rng.choice([None, 0, 5, 33]))
    elif mode == "kpm":
        kw["key_padding_mask"] = torch.rand(shape["B"], Tk) > 0.3
        kw["causal"] = rng.random() < 0.5
    if rng.random() < 0.3:
        kw["scale"] = rng.choice([0.05, 0.3, 1.0])
    return shape, kw


@pytest.mark.parametrize("seed", range(12))
def test_fuzz_dense(ext, seed):
    shape, kw = _fuzz_case(random.Random(seed))
    q, k, v = make_qkv(**shape, dtype=torch.float32)
    compare_with_reference(q, k, v, backend="cpp", lse_grad=True, **kw)


@pytest.mark.parametrize("seed", range(6))
def test_fuzz_sparse(ext, seed):
    rng = random.Random(100 + seed)
    T = rng.choice([17, 100, 260])
    block = (rng.choice([16, 32, 64, 128, 256]), rng.choice([16, 32, 64, 128, 256]))
    nq, nk = -(-T // block[0]), -(-T // block[1])
    dense = torch.rand(2, 1, nq, nk) < rng.choice([0.1, 0.5, 0.9])
    bm = BlockMask.from_dense_blocks(dense, T, T, block)
    q, k, v = make_qkv(B=2, Hq=2, Tq=T, D=rng.choice([16, 64, 96]), dtype=torch.float32)
    kpm = torch.rand(2, T) > 0.2 if rng.random() < 0.5 else None
    check_sparse(q, k, v, bm, kpm)


@pytest.mark.parametrize("D,Dv", [(16, 16), (256, 256), (1100, 64)])
def test_head_dims(ext, D, Dv):
    q, k, v = make_qkv(B=1, Hq=2, Tq=70, Tk=90, D=D, Dv=Dv, dtype=torch.float32)
    compare_with_reference(q, k, v, backend="cpp", causal=True, lse_grad=True)


def test_head_dim_strided(ext):
    """Inputs whose head dim is not contiguous (element stride T) go through the strided loads."""
    q, k, v = (torch.randn(1, 2, 48, 67).transpose(2, 3).requires_grad_() for _ in range(3))
    assert q.stride(-1) != 1
    compare_with_reference(q, k, v, backend="cpp", causal=True, lse_grad=True)


# ----------------------------------------------------------------------------------------------
# rows that see no key
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_fully_masked_rows(ext, kind):
    B, H, Tq, Tk = 1, 2, 70, 90
    q, k, v = make_qkv(B=B, Hq=H, Tq=Tq, Tk=Tk, D=32, dtype=torch.float32)
    keep = torch.rand(B, H, Tq, Tk) > 0.3
    keep[:, :, 5] = False
    keep[:, 1, 60:] = False
    mask = keep if kind == "bool" else torch.zeros(B, H, Tq, Tk).masked_fill(~keep, float("-inf"))
    out = effattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend="cpp")
    ref = effattn.scaled_dot_product_attention(*(x.detach().double() for x in (q, k, v)),
                                               attn_mask=mask if kind == "bool" else mask.double(),
                                               backend="reference")
    assert (out[:, :, 5] == 0).all() and (out[:, 1, 60:] == 0).all()
    assert_close(out, ref, torch.float32, "fwd", "out")
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    assert (dq[:, :, 5] == 0).all() and (dq[:, 1, 60:] == 0).all()
    assert torch.isfinite(dk).all() and torch.isfinite(dv).all()


def test_keys_padded_out_entirely(ext):
    q, k, v = make_qkv(B=2, Hq=2, Tq=40, Tk=130, D=16, dtype=torch.bfloat16)
    kpm = torch.ones(2, 130, dtype=torch.bool)
    kpm[1] = False
    out, lse = compare_with_reference(q, k, v, backend="cpp", key_padding_mask=kpm, lse_grad=True)
    assert (out[1] == 0).all() and torch.isneginf(lse[1]).all()


@pytest.mark.parametrize("name", ["segments", "global", "causal"])
def test_partial_block_rules(ext, name):
    """PARTIAL blocks evaluate the MaskRule in the kernel: segments element by element, windows and global
    tokens by row ranges; a key padding mask on top."""
    T, block = 150, (32, 64)
    if name == "segments":
        seg = torch.tensor([[0] * 40 + [1] * 70 + [2] * 40, [0] * 100 + [1] * 50], dtype=torch.int32)
        bm = BlockMask.from_segments(seg, block_size=block)
    elif name == "global":
        bm = BlockMask.bigbird(T, T, window=(20, 9), n_global=5, n_random_blocks=1, block_size=block)
    else:
        bm = BlockMask.causal(T, T, block_size=block)
    q, k, v = make_qkv(B=2, Hq=2, Tq=T, D=32, dtype=torch.float32)
    check_sparse(q, k, v, bm, torch.rand(2, T) > 0.1)


# ----------------------------------------------------------------------------------------------
# dropout: the Philox draws of the reference, in the kernels (common/philox.h, the SIMD Philox of
# simd_kernels.inc) and in the scalar float64 path
# ----------------------------------------------------------------------------------------------
def test_philox_matches_reference(ext):
    gen = torch.Generator().manual_seed(3)
    n = 600
    counters = torch.randint(0, 2**32, (4, n), generator=gen, dtype=torch.int64)
    counters[:, :4] = torch.tensor([0, 1, 2**31, 2**32 - 1])[:, None]  # edges of the uint32 range
    seeds = [0, 1, 2**32 - 1, 2**32, 2**40 + 17, 2**63 - 1, 2**64 - 1,
             *(int(s) for s in torch.randint(0, 2**62, (5,), generator=gen))]
    for seed in seeds:
        want = reference.philox_randint(seed, *counters).tolist()
        got = [ext.cpu_philox(seed, *(int(c) for c in counters[:, i])) for i in range(n)]
        assert got == want, f"seed {seed}"
    with pytest.raises(TypeError):
        ext.cpu_philox(0, 2**32, 0, 0, 0)  # counters are uint32


DROPOUT_CASES = {
    "T1": dict(shape=dict(B=2, Hq=2, Tq=1, Tk=1, D=16), kw=dict()),
    "T17_causal_gqa": dict(shape=dict(B=1, Hq=4, Hkv=2, Tq=17, Tk=17, D=24, Dv=40), kw=dict(causal=True)),
    "T100_cross": dict(shape=dict(B=2, Hq=3, Tq=100, Tk=77, D=64), kw=dict()),
    "T100_window_kpm": dict(shape=dict(B=2, Hq=2, Tq=100, D=32), kw=dict(window=(30, 5))),
}


@pytest.mark.parametrize("mode", ["fused", "split"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", list(DROPOUT_CASES))
def test_dropout_matches_reference(ext, monkeypatch, case, dtype, mode):
    """Output, lse and gradients (of out and lse) with dropout against the float64 reference on the same seed."""
    monkeypatch.setenv("EFFATTN_CPU_BACKWARD", mode)
    q, k, v = make_qkv(**DROPOUT_CASES[case]["shape"], dtype=dtype)
    kw = dict(DROPOUT_CASES[case]["kw"])
    if case == "T100_window_kpm":
        kw["key_padding_mask"] = torch.rand(2, 100) > 0.2
    out, _ = compare_with_reference(q, k, v, backend="cpp", dropout_p=0.3, dropout_seed=2**40 + 17, lse_grad=True,
                                    **kw)
    if q.shape[2] > 1:  # dropout happened: the undropped output differs
        plain = effattn.flash_attention(q.detach(), k.detach(), v.detach(), backend="cpp", **kw)
        assert not torch.equal(out, plain)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_pooled(ext, dtype):
    """Pooled queries draw with their pooled row index (reference.dropout_keep's ``rows``)."""
    q, k, v = make_qkv(B=2, Hq=4, Hkv=2, Tq=101, D=32, dtype=dtype)
    compare_with_reference(q, k, v, backend="cpp", op=effattn.pooled_attention, stride=3, pool="max",
                           separate_cls=True, causal=True, dropout_p=0.25, dropout_seed=99, lse_grad=True)
    compare_with_reference(q, k, v, backend="cpp", op=effattn.pooled_attention, stride=2, pool="mean",
                           dropout_p=0.5, dropout_seed=2**50 + 3)


@pytest.mark.parametrize("name", ISAS)
def test_dropout_isa(ext, name):
    """The SIMD Philox of every instruction set (draws along keys and along rows, with vector tails)."""
    q, k, v = make_qkv(B=1, Hq=2, Tq=83, Tk=70, D=48, dtype=torch.float32)
    with isa(ext, name):
        compare_with_reference(q, k, v, backend="cpp", causal=True, dropout_p=0.2, dropout_seed=12345,
                               lse_grad=True)


def test_dropout_float64_path(ext):
    """The scalar float64 path draws the same bits (reference tolerances of float64)."""
    q, k, v = make_qkv(B=1, Hq=4, Hkv=2, Tq=45, Tk=38, D=16, dtype=torch.float64)
    compare_with_reference(q, k, v, backend="cpp", causal=True, dropout_p=0.4, dropout_seed=2**33 + 5, lse_grad=True)
    q, k, v = make_qkv(B=1, Hq=2, Tq=40, D=16, dtype=torch.float64)
    compare_with_reference(q, k, v, backend="cpp", op=effattn.pooled_attention, stride=2, separate_cls=True,
                           dropout_p=0.3, dropout_seed=8, lse_grad=True)


@pytest.mark.parametrize("case", ["dense", "pooled"])
def test_dropout_bit_identical_across_threads_and_modes(ext, monkeypatch, case):
    """With dropout: the same bits for 1 and 3 threads in each backward mode; out, lse, dk, dv the same bits
    in both modes (dq is computed in another layout by the split mode: equal within tolerance)."""
    if case == "dense":
        q, k, v = make_qkv(B=2, Hq=4, Hkv=2, Tq=150, Tk=131, D=40, dtype=torch.float16)
        op, kw = effattn.flash_attention, dict(causal=True)
    else:
        q, k, v = make_qkv(B=1, Hq=2, Tq=160, D=32, dtype=torch.float32)
        op, kw = effattn.pooled_attention, dict(stride=3, pool="mean", separate_cls=True, causal=True)
    kw.update(dropout_p=0.35, dropout_seed=2**41 + 7)
    runs = {}
    for mode in ("fused", "split"):
        monkeypatch.setenv("EFFATTN_CPU_BACKWARD", mode)
        for n in (1, 3):
            with threads(monkeypatch, n):
                runs[mode, n] = _run_all(q, k, v, op=op, **kw)
    names = ("out", "lse", "dq", "dk", "dv")
    for mode in ("fused", "split"):
        for name, a, b in zip(names, runs[mode, 1], runs[mode, 3]):
            assert torch.equal(a, b), f"{mode}: {name} differs between 1 and 3 threads"
    for name, a, b in zip(names, runs["fused", 1], runs["split", 1]):
        if name == "dq":
            assert_close(a, b.double(), q.dtype, "grad", name)
        else:
            assert torch.equal(a, b), f"{name} differs between the backward modes"


def test_dropout_bad_arguments(ext):
    q, k, v = make_qkv(B=1, Hq=2, Tq=8, D=16, dtype=torch.float32, requires_grad=False)
    with pytest.raises(ValueError, match="dropout_p must be in"):
        cuda_ops.attn_forward(q, k, v, None, scale=1.0, dropout_p=1.0)
    with pytest.raises(ValueError, match="dropout_p must be in"):
        cuda_ops.attn_forward(q, k, v, None, scale=1.0, dropout_p=-0.1)
    with pytest.raises(TypeError, match="dropout_p must be a float"):
        cuda_ops.attn_forward(q, k, v, None, scale=1.0, dropout_p="0.1")
    with pytest.raises(ValueError, match="seed must be an int"):
        cuda_ops.attn_forward(q, k, v, None, scale=1.0, dropout_p=0.1, seed=2**64)
    with pytest.raises(ValueError, match="seed must be an int"):
        cuda_ops.attn_forward(q, k, v, None, scale=1.0, dropout_p=0.1, seed=-1)
    # the extension checks its own arguments too: dropout_p, and no dropout with block-sparse attention
    ext_, kind, p, keep = cuda_ops._dense_params(q, k, v, None, 1.0, -1, -1, 0, 0.0, 0, None)
    p.dropout_p = 1.0
    with pytest.raises(ValueError, match="dropout_p must be in"):
        cuda_ops._forward(ext_, kind, p, q, keep)
    bm = BlockMask.causal(8, 8, block_size=16)
    ext_, kind, p, keep = cuda_ops._sparse_params(q, k, v, bm, None, 1.0, backward=False)
    p.dropout_p = 0.1
    with pytest.raises(ValueError, match="dropout is not supported with block-sparse"):
        cuda_ops._forward(ext_, kind, p, q, keep)
