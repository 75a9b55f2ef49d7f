"""Property-based fuzz (hypothesis) of the compiled CPU backend, ``backend="cpp"``, against the float64
reference: flash attention, attention masks, pooled attention and block-sparse attention.

Each example draws a case (shapes, dtype, layout and options; the case is a plain dict, printed by
hypothesis when an example fails), seeds torch from a drawn integer, builds random inputs and compares
out, lse and the gradients of q, k, v (and of lse, when drawn) with the float64 reference through
:func:`tests.helpers.compare_with_reference`. Gradients with respect to float masks are not supported
by effattn (``attn_mask`` must not require grad), so none are compared.

Per example, too: the tiles of the scalar float64 path (``effattn.cuda_ops.CPU_TILE``), the backward
variant (``EFFATTN_CPU_BACKWARD`` fused / split) and the SIMD instruction set of the micro-kernels.

A case the backend declines (:class:`effattn.UnsupportedInputError`, e.g. dropout while the extension
has none) is rejected (``hypothesis.reject``) and counted: a test fails when more than half of its
examples were declined, so that the fuzz cannot silently test nothing.

Environment: ``EFFATTN_FUZZ_EXAMPLES=N`` runs ``N`` examples per test (default: a few dozen, ~1 min for
the file on one core); ``EFFATTN_FUZZ_RANDOM=1`` draws fresh examples (default: derandomized, the same
examples every run); ``EFFATTN_FUZZ_TIMES=1`` (with ``pytest -s``) prints each test's slowest examples.
Outputs are NaN-poisoned (tests/conftest.py).
"""

from __future__ import annotations

import collections
import contextlib
import os
import time

import pytest
import torch
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

import effattn
from effattn import BlockMask, MaskRule, _ext, _validate, cuda_ops
from effattn import flash as _flash
from effattn.testing import assert_close
from tests.helpers import compare_with_reference, make_qkv

_EXAMPLES = int(os.environ.get("EFFATTN_FUZZ_EXAMPLES", "0") or 0)
_RANDOM = os.environ.get("EFFATTN_FUZZ_RANDOM", "") not in ("", "0")


def fuzz_settings(default_examples: int):
    return settings(max_examples=_EXAMPLES or default_examples, deadline=None, derandomize=not _RANDOM,
                    database=None, suppress_health_check=list(HealthCheck), print_blob=False)


# ----------------------------------------------------------------------------------------------
# strategies
# ----------------------------------------------------------------------------------------------
# lengths: 1, primes, and both sides of the tile edges (64 keys / 64 fp32 or 128 half query rows in the
# SIMD path; 16, 32, 64 in the float64 path; block sizes 16 / 32 / 64)
EDGE_LENGTHS = [1, 2, 3, 5, 7, 13, 15, 16, 17, 31, 32, 33, 47, 63, 64, 65, 97, 127, 128, 129, 191, 192, 193, 199, 200]
lengths = st.one_of(st.sampled_from(EDGE_LENGTHS), st.integers(1, 200))
HEAD_DIMS = [1, 8, 16, 24, 40, 64, 80, 96, 128, 160, 256]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# window sides: unbounded, 0, and values around the tile boundaries
window_sides = st.one_of(st.sampled_from([None, -1, 0, 1, 2, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129]),
                         st.integers(0, 250))
CPU_TILES = [(16, 16), (16, 32), (64, 64)]
ISAS = ["avx512", "avx2", "portable"]
seeds = st.integers(0, 2**31 - 1)


def _dtypes(float64: bool = True):
    """float32 / float16 / bfloat16, and (one draw in eight) float64, the scalar path of ``CPU_TILE``."""
    base = st.sampled_from(DTYPES)
    return st.one_of(base, base, base, base, base, base, base, st.just(torch.float64)) if float64 else base


@st.composite
def qkv_shapes(draw, same_len: bool = False, float64: bool = True):
    """B, heads (Hkv dividing Hq), lengths, head dims (Dqk != Dv allowed), dtype, layout."""
    Hq = draw(st.integers(1, 4))
    Hkv = draw(st.sampled_from([h for h in (1, 2, 3, 4) if Hq % h == 0]))
    Tq = draw(lengths)
    Tk = Tq if same_len or draw(st.booleans()) else draw(lengths)
    D = draw(st.sampled_from(HEAD_DIMS))
    Dv = D if draw(st.booleans()) else draw(st.sampled_from(HEAD_DIMS))
    dtype = draw(_dtypes(float64))
    if dtype == torch.float64:  # the scalar float64 path is slow: keep it small
        Tq, Tk = min(Tq, 80), min(Tk, 80)
        if same_len:
            Tk = Tq
    return dict(B=draw(st.integers(1, 2)), Hq=Hq, Hkv=Hkv, Tq=Tq, Tk=Tk, D=D, Dv=Dv, dtype=dtype,
                layout=draw(st.sampled_from(["bhtd", "bthd"])))


@st.composite
def machine(draw):
    """What the kernels run with: float64 tiles, backward variant, instruction set."""
    return dict(tile=draw(st.sampled_from(CPU_TILES)), bwd=draw(st.sampled_from(["auto", "fused", "split"])),
                isa=draw(st.sampled_from(ISAS)))


# key padding: none, random keep (with probability p), a batch row with every key masked, all masked
KPM_KINDS = ["none", "none", "random", "random", "empty_row", "all_masked"]
kpm_kinds = st.sampled_from(KPM_KINDS)


def make_kpm(kind: str, B: int, Tk: int, p: float):
    if kind == "none":
        return None
    if kind == "all_masked":
        return torch.zeros(B, Tk, dtype=torch.bool)
    kpm = torch.rand(B, Tk) < p
    if kind == "empty_row":
        kpm[torch.randint(0, B, ())] = False
    return kpm


# the scale as a multiple of the default 1 / sqrt(Dqk) (None: the default): logits of unit-variance inputs
# have a standard deviation of the multiple. For float16 / bfloat16 the scale itself is at most 0.5: the
# backward's ``delta = rowsum(dO * O)`` reads the stored, rounded ``out`` (as every FlashAttention
# backward), an error that dS carries into dq / dk times the scale, summed over rows (and GQA heads).
# With scale 1 (D = 1 and the default, or 1.0 at D = 64) it exceeds the table's absolute 1e-2 on
# gradients that are ~0 next to ones of ~10-20 (e.g. Tk = 1, 4 heads on 1 kv head: dk exactly 0 in
# float64, 0.0128 in the kernel), while the kernel matches, to 1e-6, the float64 backward fed that same
# rounded out: not a kernel error, and out of reach of one absolute tolerance.
SCALE_FACTORS = [None, 0.1, 0.5, 2.0, 3.0]
HALF_MAX_SCALE = 0.5


def scale_factors(dtype, D):
    def ok(f):
        return dtype in (torch.float32, torch.float64) or (1.0 if f is None else f) / D**0.5 <= HALF_MAX_SCALE

    return st.sampled_from([f for f in SCALE_FACTORS if ok(f)])


def _scale(factor, D):
    return None if factor is None else factor / D**0.5


def dropouts(dtype):
    """dropout_p: 0 five draws in six. 0.9 only for float32 / float64: kept probabilities scaled by 10 make
    outputs of ~20 whose fp16 / bf16 rounding, through ``delta = rowsum(dO * O)`` in the backward, moves
    the gradients by more than the table's 1e-2 (e.g. a row with a single visible key, reference dq 0,
    kernel 0.011 = the float64 backward fed the rounded out); not a kernel error."""
    ps = [0.1, 0.3, 0.5] + ([0.9] if dtype in (torch.float32, torch.float64) else [])
    return st.one_of(*[st.just(0.0)] * 5, st.sampled_from(ps))


# ----------------------------------------------------------------------------------------------
# running one example
# ----------------------------------------------------------------------------------------------
class Declines:
    """Examples run and examples the backend declined (with the reasons), for one test."""

    def __init__(self):
        self.examples = 0
        self.declined = 0
        self.reasons: collections.Counter = collections.Counter()
        self.times = []

    def run(self, fn, case=None):
        self.examples += 1
        t0 = time.perf_counter()
        try:
            return fn()
        except (pytest.skip.Exception, effattn.UnsupportedInputError) as e:
            self.declined += 1
            self.reasons[str(e).split(": ", 1)[-1][:160]] += 1
            reject()
        finally:
            self.times.append((time.perf_counter() - t0, repr(case)[:300]))

    def check(self):
        if os.environ.get("EFFATTN_FUZZ_TIMES"):
            tot = sum(t for t, _ in self.times)
            print(f"\n{self.examples} examples, {self.declined} declined, {tot:.1f}s")
            for t, c in sorted(self.times, reverse=True)[:5]:
                print(f"  {t:.2f}s {c}")
        assert self.examples > 0, "no example ran"
        assert 2 * self.declined <= self.examples, (
            f"the cpp backend declined {self.declined} of {self.examples} examples (more than half): "
            f"{dict(self.reasons)}")


@contextlib.contextmanager
def running_on(monkeypatch, m: dict, seed: int):
    """One example's set-up: torch seed, the float64 path's tiles, the backward variant, the ISA."""
    torch.manual_seed(seed)
    ext = _ext.load()
    with monkeypatch.context() as mp:
        mp.setattr(cuda_ops, "CPU_TILE", m["tile"])  # raising=True: fails if the name goes away
        if m["bwd"] == "auto":
            mp.delenv("EFFATTN_CPU_BACKWARD", raising=False)
        else:
            mp.setenv("EFFATTN_CPU_BACKWARD", m["bwd"])
        isa_set = False
        if hasattr(ext, "cpu_set_isa"):
            try:
                ext.cpu_set_isa(m["isa"])
                isa_set = True
            except ValueError:  # not available on this CPU: the default one
                pass
        try:
            yield
        finally:
            if isa_set:
                ext.cpu_set_isa("auto")


def _compare(q, k, v, *, lse_grad, **kwargs):
    return compare_with_reference(q, k, v, backend="cpp", lse_grad=lse_grad, **kwargs)


# ----------------------------------------------------------------------------------------------
# flash_attention: causal, window, key padding, GQA, Tq != Tk, Dqk != Dv, scale, dropout, layouts
# ----------------------------------------------------------------------------------------------
@st.composite
def flash_cases(draw):
    case = dict(shape=draw(qkv_shapes()), machine=draw(machine()), seed=draw(seeds))
    case["causal"] = draw(st.booleans())
    case["window"] = draw(st.one_of(st.none(), st.tuples(window_sides, window_sides)))
    case["kpm"] = draw(kpm_kinds)
    case["kpm_p"] = draw(st.sampled_from([0.1, 0.5, 0.9]))
    case["scale_factor"] = draw(scale_factors(case["shape"]["dtype"], case["shape"]["D"]))
    case["dropout_p"] = draw(dropouts(case["shape"]["dtype"]))
    case["lse_grad"] = draw(st.booleans())
    return case


def run_flash_case(case):
    s = case["shape"]
    q, k, v = make_qkv(**s)
    kpm = make_kpm(case["kpm"], s["B"], s["Tk"], case["kpm_p"])
    kw = dict(causal=case["causal"], window=case["window"], key_padding_mask=kpm,
              scale=_scale(case["scale_factor"], s["D"]))
    if case["dropout_p"]:
        kw.update(dropout_p=case["dropout_p"], dropout_seed=case["seed"])
    _compare(q, k, v, lse_grad=case["lse_grad"], **kw)


def test_fuzz_flash_attention(monkeypatch):
    declines = Declines()

    @fuzz_settings(80)
    @given(case=flash_cases())
    def run(case):
        with running_on(monkeypatch, case["machine"], case["seed"]):
            declines.run(lambda: run_flash_case(case), case)

    run()
    declines.check()


# ----------------------------------------------------------------------------------------------
# attention masks: bool / float, broadcast shapes, non-contiguous, with a window and either alignment
# ----------------------------------------------------------------------------------------------
def masked_attention(q, k, v, *, attn_mask=None, window=None, bottom_right=False, scale=None, dropout_p=0.0,
                     dropout_seed=0, return_lse=False, backend=None):
    """The dense op with a bool / float ``attn_mask`` broadcastable to ``(B, Hq, Tq, Tk)`` on top of a
    window (the path of :func:`effattn.scaled_dot_product_attention`, which has no lse and no window),
    so that :func:`compare_with_reference` can compare lse too."""
    shape = _validate.check_qkv(q, k, v)
    _validate.check_attn_mask(attn_mask, (shape.B, shape.Hq, shape.Tq, shape.Tk), q.device)
    left, right = _validate.window_bounds(window)
    out, lse = _flash._run(q, k, v, attn_mask, shape, scale=scale, window_left=left, window_right=right,
                           diag_offset=shape.Tk - shape.Tq if bottom_right else 0, dropout_p=dropout_p,
                           seed=dropout_seed if dropout_p else 0, backend=backend)
    return (out, lse) if return_lse else out


# which dims of (B, Hq, Tq, Tk) the mask has (the others broadcast); "2d" is a (Tq, Tk) mask
MASK_SHAPES = ["2d", "1,1,Tq,Tk", "B,1,Tq,Tk", "1,H,Tq,Tk", "B,H,Tq,Tk", "B,1,1,Tk", "1,1,Tq,1", "B,H,Tq,1"]
MASK_LAYOUTS = ["contiguous", "transposed", "sliced", "expanded"]


@st.composite
def mask_cases(draw):
    case = dict(shape=draw(qkv_shapes()), machine=draw(machine()), seed=draw(seeds))
    case["mask_kind"] = draw(st.sampled_from(["bool", "float"]))
    case["mask_dtype"] = draw(st.sampled_from(["q", "float32", "float16", "bfloat16", "float64"]))
    case["mask_shape"] = draw(st.sampled_from(MASK_SHAPES))
    case["mask_layout"] = draw(st.sampled_from(MASK_LAYOUTS))
    case["keep_p"] = draw(st.sampled_from([0.1, 0.5, 0.9, 1.0]))
    case["empty_rows"] = draw(st.booleans())  # some query rows with every key masked
    case["window"] = draw(st.one_of(st.none(), st.none(), st.tuples(window_sides, window_sides)))
    case["bottom_right"] = draw(st.booleans())
    case["scale_factor"] = draw(scale_factors(case["shape"]["dtype"], case["shape"]["D"]))
    case["dropout_p"] = draw(dropouts(case["shape"]["dtype"]))
    case["lse_grad"] = draw(st.booleans())
    return case


def make_mask(case, dtype):
    s = case["shape"]
    B, H, Tq, Tk = s["B"], s["Hq"], s["Tq"], s["Tk"]
    dims = {"B": B, "H": H, "Tq": Tq, "Tk": Tk, "1": 1}
    if case["mask_shape"] == "2d":
        shape = (Tq, Tk)
    else:
        shape = tuple(dims[n] for n in case["mask_shape"].split(","))
    keep = torch.rand(shape) < case["keep_p"]
    if case["empty_rows"] and shape[-2] > 1:
        keep[..., torch.randint(0, shape[-2], (max(1, shape[-2] // 5),)), :] = False
    if case["mask_kind"] == "bool":
        mask = keep
    else:
        mdt = dtype if case["mask_dtype"] == "q" else getattr(torch, case["mask_dtype"])
        mask = (2.0 * torch.randn(shape)).masked_fill(~keep, float("-inf")).to(mdt)
    layout = case["mask_layout"]
    if layout == "transposed":  # (.., Tk, Tq) storage
        mask = mask.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif layout == "sliced":  # every other element of a wider tensor
        wide = torch.zeros(*shape[:-1], 2 * shape[-1], dtype=mask.dtype)
        wide[..., ::2] = mask
        mask = wide[..., ::2]
    elif layout == "expanded" and shape[0] == 1 and len(shape) == 4:  # a zero-stride batch dim
        mask = mask.expand(B, *shape[1:])
    return mask


def run_mask_case(case):
    s = case["shape"]
    q, k, v = make_qkv(**s)
    mask = make_mask(case, s["dtype"])
    kw = dict(attn_mask=mask, window=case["window"], bottom_right=case["bottom_right"],
              scale=_scale(case["scale_factor"], s["D"]))
    if case["dropout_p"]:
        kw.update(dropout_p=case["dropout_p"], dropout_seed=case["seed"])
    _compare(q, k, v, lse_grad=case["lse_grad"], op=masked_attention, **kw)


def test_fuzz_attn_mask(monkeypatch):
    declines = Declines()

    @fuzz_settings(25)
    @given(case=mask_cases())
    def run(case):
        with running_on(monkeypatch, case["machine"], case["seed"]):
            declines.run(lambda: run_mask_case(case), case)

    run()
    declines.check()


def test_fuzz_sdpa_public(monkeypatch):
    """The public scaled_dot_product_attention (top-left is_causal, or a broadcast mask): out and grads."""
    declines = Declines()

    @fuzz_settings(10)
    @given(case=mask_cases(), causal=st.booleans())
    def run(case, causal):
        with running_on(monkeypatch, case["machine"], case["seed"]):
            declines.run(lambda: _sdpa_case(case, causal), case)

    run()
    declines.check()


def _sdpa_case(case, causal):
    s = case["shape"]
    q, k, v = make_qkv(**s)
    mask = None if causal else make_mask(case, s["dtype"])
    kw = dict(attn_mask=mask, is_causal=causal, scale=_scale(case["scale_factor"], s["D"]),
              enable_gqa=s["Hq"] != s["Hkv"])
    out = effattn.scaled_dot_product_attention(q, k, v, backend="cpp", **kw)
    qr, kr, vr = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref_kw = dict(kw, attn_mask=None if mask is None else (mask if mask.dtype == torch.bool else mask.double()))
    ref = effattn.scaled_dot_product_attention(qr, kr, vr, backend="reference", **ref_kw)
    assert_close(out, ref, s["dtype"], "fwd", "out")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad((out * dout).float().sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * dout.double()).sum(), (qr, kr, vr))
    for name, g, rg in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(g, rg, s["dtype"], "grad", name)


# ----------------------------------------------------------------------------------------------
# pooled attention: stride, mean / max, separate_cls, truncate, causal, key padding
# ----------------------------------------------------------------------------------------------
@st.composite
def pooled_cases(draw):
    case = dict(shape=draw(qkv_shapes(same_len=True)), machine=draw(machine()), seed=draw(seeds))
    case["separate_cls"] = draw(st.booleans())
    case["stride"] = draw(st.sampled_from([2, 3, 4, 5, 8, 16]) if case["separate_cls"] else
                          st.sampled_from([1, 2, 3, 4, 5, 8, 16]))
    case["pool"] = draw(st.sampled_from(["mean", "max"]))
    case["truncate"] = draw(st.booleans())
    case["causal"] = draw(st.booleans())
    case["kpm"] = draw(kpm_kinds)
    case["kpm_p"] = draw(st.sampled_from([0.1, 0.5, 0.9]))
    case["scale_factor"] = draw(scale_factors(case["shape"]["dtype"], case["shape"]["D"]))
    case["dropout_p"] = draw(dropouts(case["shape"]["dtype"]))
    case["lse_grad"] = draw(st.booleans())
    return case


def run_pooled_case(case):
    s = case["shape"]
    q, k, v = make_qkv(**s)
    kpm = make_kpm(case["kpm"], s["B"], s["Tk"], case["kpm_p"])
    kw = dict(stride=case["stride"], pool=case["pool"], separate_cls=case["separate_cls"],
              truncate=case["truncate"], causal=case["causal"], key_padding_mask=kpm,
              scale=_scale(case["scale_factor"], s["D"]))
    if case["dropout_p"]:
        kw.update(dropout_p=case["dropout_p"], dropout_seed=case["seed"])
    _compare(q, k, v, lse_grad=case["lse_grad"], op=effattn.pooled_attention, **kw)


def test_fuzz_pooled_attention(monkeypatch):
    declines = Declines()

    @fuzz_settings(20)
    @given(case=pooled_cases())
    def run(case):
        with running_on(monkeypatch, case["machine"], case["seed"]):
            declines.run(lambda: run_pooled_case(case), case)

    run()
    declines.check()


# ----------------------------------------------------------------------------------------------
# block-sparse attention: BlockMask constructors, block sizes 16 / 32 / 64, rules, segments
# ----------------------------------------------------------------------------------------------
SPARSE_KINDS = ["random", "random_per_row", "sliding_window", "causal", "global", "segments", "bigbird",
                "window_and_segments", "union", "intersection", "segment_ids"]
block_sides = st.sampled_from([16, 32, 64])


@st.composite
def sparse_cases(draw):
    kind = draw(st.sampled_from(SPARSE_KINDS))
    case = dict(kind=kind, shape=draw(qkv_shapes(same_len=kind in ("segments", "segment_ids"))),
                machine=draw(machine()), seed=draw(seeds))
    case["block_size"] = (draw(block_sides), draw(block_sides))
    case["density"] = draw(st.sampled_from([0.0, 0.1, 0.3, 0.6, 1.0]))
    case["mask_bh"] = draw(st.sampled_from(["1,1", "B,1", "1,H", "B,H"]))
    case["keep_diagonal"] = draw(st.booleans())
    case["window"] = (draw(window_sides), draw(window_sides))
    case["bottom_right"] = draw(st.booleans())
    case["n_global"] = draw(st.sampled_from([0, 1, 5, 16, 17]))
    case["n_random_blocks"] = draw(st.integers(0, 3))
    case["n_segments"] = draw(st.integers(1, 6))
    case["sorted_segments"] = draw(st.booleans())
    case["kpm"] = draw(kpm_kinds)
    case["kpm_p"] = draw(st.sampled_from([0.1, 0.5, 0.9]))
    case["scale_factor"] = draw(scale_factors(case["shape"]["dtype"], case["shape"]["D"]))
    case["lse_grad"] = draw(st.booleans())
    return case


def _segments(case, B, T):
    n = case["n_segments"]
    if case["sorted_segments"]:  # packed documents: runs of ids
        cuts = torch.sort(torch.randint(0, T + 1, (B, n - 1)), dim=-1).values
        return (torch.arange(T)[None, :, None] >= cuts[:, None, :]).sum(-1).to(torch.int32)
    return torch.randint(0, n, (B, T), dtype=torch.int32)  # any order


def make_block_mask(case):
    s = case["shape"]
    B, H, Tq, Tk = s["B"], s["Hq"], s["Tq"], s["Tk"]
    bs, kind = case["block_size"], case["kind"]
    mb = B if case["mask_bh"].startswith("B") else 1
    mh = H if case["mask_bh"].endswith("H") else 1
    gen = torch.Generator().manual_seed(case["seed"])
    left, right = case["window"]
    if kind in ("random", "random_per_row"):
        return BlockMask.random(Tq, Tk, case["density"], bs, batch=mb, heads=mh, per_row=kind == "random_per_row",
                                keep_diagonal=case["keep_diagonal"], generator=gen)
    if kind == "sliding_window":
        return BlockMask.sliding_window(Tq, Tk, left, right, bs, bottom_right=case["bottom_right"])
    if kind == "causal":
        return BlockMask.causal(Tq, Tk, bs, bottom_right=case["bottom_right"])
    if kind == "global":
        return BlockMask.global_tokens(Tq, Tk, case["n_global"], bs)
    if kind == "segments":
        return BlockMask.from_segments(_segments(case, mb, Tq), block_size=bs)
    if kind == "bigbird":
        return BlockMask.bigbird(Tq, Tk, (left, right), case["n_global"], case["n_random_blocks"], bs,
                                 generator=gen, batch=mb, heads=mh, bottom_right=case["bottom_right"])
    if kind == "window_and_segments":
        rule = MaskRule(window_left=left, window_right=right, diag_offset=Tk - Tq if case["bottom_right"] else 0,
                        q_segments=_segments(case, mb, Tq), kv_segments=_segments(case, mb, Tk),
                        n_global=case["n_global"])
        return BlockMask.from_rule(rule, Tq, Tk, bs, heads=mh)
    rule_mask = BlockMask.sliding_window(Tq, Tk, left, right, bs, bottom_right=case["bottom_right"])
    rand = BlockMask.random(Tq, Tk, case["density"], bs, batch=mb, heads=mh, generator=gen)
    return rule_mask | rand if kind == "union" else rule_mask & rand


def run_sparse_case(case):
    s = case["shape"]
    q, k, v = make_qkv(**s)
    kpm = make_kpm(case["kpm"], s["B"], s["Tk"], case["kpm_p"])
    if case["kind"] == "segment_ids":  # flash_attention(segment_ids=...) runs block-sparse (64 x 64)
        seg = _segments(case, s["B"], s["Tq"])
        kw = dict(segment_ids=seg, causal=case["bottom_right"], key_padding_mask=kpm,
                  scale=_scale(case["scale_factor"], s["D"]))
        _compare(q, k, v, lse_grad=case["lse_grad"], **kw)
        return
    bm = make_block_mask(case)
    _compare(q, k, v, lse_grad=case["lse_grad"], op=effattn.sparse_attention, block_mask=bm,
             key_padding_mask=kpm, scale=_scale(case["scale_factor"], s["D"]))


def test_fuzz_sparse_attention(monkeypatch):
    declines = Declines()

    @fuzz_settings(30)
    @given(case=sparse_cases())
    def run(case):
        with running_on(monkeypatch, case["machine"], case["seed"]):
            declines.run(lambda: run_sparse_case(case), case)

    run()
    declines.check()
