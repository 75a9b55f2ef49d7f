"""``effattn.flash_attn_interface`` (flash-attn 2.x's functions) against a float64 reference of flash-attn's
semantics, written here in flash-attn's ``(B, T, H, D)`` layout like the ``attention_ref`` of flash-attn's
tests: bottom-right causal and window masks, GQA by repeating KV heads, the soft cap on the scaled scores,
ALiBi after the cap, and rows with no visible key giving 0. The varlen functions are checked against it
applied per sequence (the packed tensors sliced by ``cu_seqlens``), ``flash_attn_with_kvcache`` against it
on the caches as they should be after the in-place append. Backends are chosen automatically (CPU
tensors: the C++ kernels, or the reference where those decline, varlen included)."""

import math

import pytest
import torch

import effattn.flash_attn_interface as fai
from effattn.flash_attn_interface import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
)
from effattn.testing import assert_close


def attention_ref(q, k, v, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, softmax_scale=None):
    """flash-attn's attention in float64: q ``(B, Tq, H, D)``, k/v ``(B, Tk, Hkv, D)`` -> out ``(B, Tq, H, Dv)``,
    lse ``(B, H, Tq)`` (-inf where a query sees no key)."""
    q, k, v = q.double(), k.double(), v.double()
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    k, v = k.repeat_interleave(H // Hkv, dim=2), v.repeat_interleave(H // Hkv, dim=2)
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale
    s = torch.einsum("bthd,bshd->bhts", q, k) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    left, right = window_size[0], 0 if causal else window_size[1]
    dist = torch.arange(Tq)[:, None] + Tk - Tq - torch.arange(Tk)[None, :]  # i + Tk - Tq - j
    visible = torch.ones(Tq, Tk, dtype=torch.bool)
    if left >= 0:
        visible &= dist <= left
    if right >= 0:
        visible &= -dist <= right
    if alibi_slopes is not None:
        s = s - alibi_slopes.double().reshape(-1, H, 1, 1) * dist.abs()
    empty = ~visible.any(-1)[:, None]  # (Tq, 1)
    s = s.masked_fill(~visible, -math.inf).masked_fill(empty, 0.0)
    p = torch.softmax(s, dim=-1).masked_fill(empty, 0.0)
    lse = torch.logsumexp(s, dim=-1).masked_fill(empty[:, 0], -math.inf)
    return torch.einsum("bhts,bshd->bthd", p, v), lse


def rand(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device).requires_grad_()


def check(fn, inputs, ref_inputs, dtype, args=(), ref_fn=attention_ref, **kw):
    """Run ``fn(*inputs, *args, **kw)`` and ``ref_fn`` on ``ref_inputs`` (a function of float64 copies of
    ``inputs`` returning q, k, v); compare out, lse and the gradients of every input."""
    out, lse, s_dmask = fn(*inputs, *args, return_attn_probs=True, **kw)
    copies = [x.detach().cpu().double().requires_grad_() for x in inputs]
    ref, ref_lse = ref_fn(*ref_inputs(*copies), **kw)
    assert s_dmask is None
    assert lse.dtype == torch.float32
    assert out.is_contiguous() and lse.is_contiguous()
    assert_close(out, ref, dtype, "fwd", "out")
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse.cpu()), empty), "softmax_lse: rows with no visible key differ"
    assert_close(lse.cpu().masked_fill(empty, 0.0), ref_lse.masked_fill(empty, 0.0), dtype, "lse", "softmax_lse")
    dout = torch.randn_like(out)
    out.backward(dout)
    ref.backward(dout.cpu().double())
    for i, (x, c) in enumerate(zip(inputs, copies)):
        assert_close(x.grad, c.grad, dtype, "grad", f"grad of input {i}")


def unpacked(q, k, v):
    return q, k, v


@pytest.mark.parametrize("Tq,Tk", [(24, 24), (40, 17), (17, 40), (1, 40)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window_size", [(-1, -1), (5, 0), (3, 7)])
def test_masks_and_lengths(device, Tq, Tk, causal, window_size):
    inputs = rand(2, Tq, 4, 40, device=device), rand(2, Tk, 2, 40, device=device), rand(2, Tk, 2, 40, device=device)
    check(flash_attn_func, inputs, unpacked, torch.float32, causal=causal, window_size=window_size)


@pytest.mark.parametrize("D", [32, 64, 40])
@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 2), (4, 1)])
def test_head_dims_and_heads(device, D, H, Hkv):
    inputs = rand(2, 20, H, D, device=device), rand(2, 30, Hkv, D, device=device), rand(2, 30, Hkv, D, device=device)
    check(flash_attn_func, inputs, unpacked, torch.float32, causal=True, softmax_scale=0.3)


@pytest.mark.parametrize("softcap", [0.0, 2.0])
@pytest.mark.parametrize("alibi", [None, "H", "BH"])
@pytest.mark.parametrize("causal", [False, True])
def test_softcap_and_alibi(device, softcap, alibi, causal):
    slopes = {None: None, "H": torch.rand(4, device=device), "BH": torch.rand(2, 4, device=device)}[alibi]
    inputs = rand(2, 19, 4, 32, device=device), rand(2, 23, 2, 32, device=device), rand(2, 23, 2, 32, device=device)
    check(flash_attn_func, inputs, unpacked, torch.float32, causal=causal, window_size=(9, -1), softcap=softcap,
          alibi_slopes=slopes)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes(device, dtype):
    inputs = [rand(2, n, h, 64, dtype=dtype, device=device) for n, h in ((30, 4), (25, 2), (25, 2))]
    check(flash_attn_func, inputs, unpacked, dtype, causal=True, softcap=2.0, alibi_slopes=torch.rand(4, device=device))


@pytest.mark.parametrize("causal", [False, True])
def test_qkvpacked(device, causal):
    qkv = rand(2, 21, 3, 4, 40, device=device)
    check(flash_attn_qkvpacked_func, [qkv], lambda x: x.unbind(2), torch.float32, causal=causal, window_size=(3, 7))


@pytest.mark.parametrize("causal", [False, True])
def test_kvpacked(device, causal):
    inputs = rand(2, 30, 4, 32, device=device), rand(2, 18, 2, 2, 32, device=device)
    check(flash_attn_kvpacked_func, inputs, lambda q, kv: (q, *kv.unbind(2)), torch.float32, causal=causal,
          softcap=2.0, alibi_slopes=torch.rand(2, 4, device=device))


def test_inputs_are_views_and_output_layout(monkeypatch, device):
    """The packed tensors reach effattn as views (no copies); the output is a contiguous (B, Tq, H, Dv)."""
    seen, flash_attention = [], fai.flash_attention

    def spy(q, k, v, **kw):
        seen.extend((q, k, v))
        return flash_attention(q, k, v, **kw)

    monkeypatch.setattr(fai, "flash_attention", spy)
    qkv = rand(2, 9, 3, 4, 32, device=device)
    out = fai.flash_attn_qkvpacked_func(qkv)
    assert out.shape == (2, 9, 4, 32) and out.is_contiguous() and out.view(2, 9, 128).shape == (2, 9, 128)
    assert all(x._base is qkv for x in seen) and [x.shape for x in seen] == [(2, 4, 9, 32)] * 3


def test_dropout_reproducible(device):
    q, k, v = rand(2, 30, 4, 32, device=device), rand(2, 30, 2, 32, device=device), rand(2, 30, 2, 32, device=device)
    plain = flash_attn_func(q, k, v)
    torch.manual_seed(1)
    a = flash_attn_func(q, k, v, dropout_p=0.3)
    torch.manual_seed(1)
    b = flash_attn_func(q, k, v, dropout_p=0.3)
    c = flash_attn_func(q, k, v, dropout_p=0.3)
    assert torch.isfinite(a).all()
    assert not torch.allclose(a, plain)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_deterministic_accepted(device):
    q, k, v = rand(1, 10, 2, 32, device=device), rand(1, 10, 2, 32, device=device), rand(1, 10, 2, 32, device=device)
    assert torch.equal(flash_attn_func(q, k, v, deterministic=True), flash_attn_func(q, k, v))


def test_functions_are_documented():
    assert len(fai.__all__) == 7
    for name in fai.__all__:
        assert f":func:`{name}`" in fai.__doc__ and getattr(fai, name).__doc__


Q, K = (2, 8, 4, 32), (2, 8, 2, 32)
BAD = [
    ("window_size", lambda q, k, v: flash_attn_func(q, k, v, window_size=(-2, 0)), ValueError),
    ("window_size", lambda q, k, v: flash_attn_func(q, k, v, window_size=(4,)), ValueError),
    ("window_size", lambda q, k, v: flash_attn_func(q, k, v, window_size=(1.5, 0)), ValueError),
    ("window_size", lambda q, k, v: flash_attn_func(q, k, v, window_size=(True, 0)), ValueError),
    ("window_size", lambda q, k, v: flash_attn_func(q, k, v, window_size=None), ValueError),
    ("softmax_scale", lambda q, k, v: flash_attn_func(q, k, v, softmax_scale="0.1"), TypeError),
    ("deterministic", lambda q, k, v: flash_attn_func(q, k, v, deterministic=1), TypeError),
    ("return_attn_probs", lambda q, k, v: flash_attn_func(q, k, v, return_attn_probs=None), TypeError),
    ("causal", lambda q, k, v: flash_attn_func(q, k, v, causal=1), TypeError),
    ("dropout_p", lambda q, k, v: flash_attn_func(q, k, v, dropout_p=1.0), ValueError),
    ("softcap", lambda q, k, v: flash_attn_func(q, k, v, softcap=-1.0), ValueError),
    ("alibi_slopes", lambda q, k, v: flash_attn_func(q, k, v, alibi_slopes=torch.rand(2, device=q.device)), ValueError),
    ("q must be 4-D", lambda q, k, v: flash_attn_func(q[0], k, v), ValueError),
    ("k must be 4-D", lambda q, k, v: flash_attn_func(q, k[None], v), ValueError),
    ("v must be", lambda q, k, v: flash_attn_func(q, k, v.tolist()), TypeError),
    ("qkv must be 5-D", lambda q, k, v: flash_attn_qkvpacked_func(q), ValueError),
    ("qkv must be", lambda q, k, v: flash_attn_qkvpacked_func(torch.stack([q, q], 2)), ValueError),
    ("kv must be", lambda q, k, v: flash_attn_kvpacked_func(q, torch.stack([k, k, k], 2)), ValueError),
    ("q must be 4-D", lambda q, k, v: flash_attn_kvpacked_func(q[None], torch.stack([k, v], 2)), ValueError),
]


@pytest.mark.parametrize("name,call,error", BAD, ids=[f"{i}-{b[0].split()[0]}" for i, b in enumerate(BAD)])
def test_bad_inputs(monkeypatch, device, name, call, error):
    """Errors name the argument and come before any kernel runs."""
    def no_kernel(*args, **kw):
        raise AssertionError("a kernel ran")

    monkeypatch.setattr("effattn.flash.attention_fwd", no_kernel)
    q, k, v = (torch.randn(*s, device=device) for s in (Q, K, K))
    with pytest.raises(error, match=name):
        call(q, k, v)


# ----------------------------------------------------------------------------------------------
# varlen: packed sequences with cu_seqlens
# ----------------------------------------------------------------------------------------------
def cu(lengths, device):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def varlen_ref(cu_q, cu_k):
    """:func:`attention_ref` per sequence on packed ``(total, H, D)`` tensors: out ``(total_q, H, Dv)``,
    lse ``(H, total_q)``; ``alibi_slopes`` ``(H,)`` or ``(S, H)``."""
    qs, ks = cu_q.tolist(), cu_k.tolist()

    def ref(q, k, v, alibi_slopes=None, **kw):
        outs, lses = [], []
        for s in range(len(qs) - 1):
            slopes = alibi_slopes if alibi_slopes is None or alibi_slopes.dim() == 1 else alibi_slopes[s]
            o, l = attention_ref(q[None, qs[s]:qs[s + 1]], k[None, ks[s]:ks[s + 1]], v[None, ks[s]:ks[s + 1]],
                                 alibi_slopes=None if slopes is None else slopes.cpu(), **kw)
            outs.append(o[0])
            lses.append(l[0])
        return torch.cat(outs), torch.cat(lses, dim=-1)

    return ref


# queries / keys per sequence: empty sequences, length 1, Tq > Tk and Tq < Tk
LENS_Q, LENS_K = [3, 0, 1, 17, 8, 4], [5, 4, 1, 9, 20, 0]


def varlen_inputs(device, H, Hkv, D=32, dtype=torch.float32, lens_q=LENS_Q, lens_k=LENS_K):
    cu_q, cu_k = cu(lens_q, device), cu(lens_k, device)
    q, k, v = (rand(n, h, D, dtype=dtype, device=device) for n, h in ((sum(lens_q), H), (sum(lens_k), Hkv),
                                                                       (sum(lens_k), Hkv)))
    return [q, k, v], (cu_q, cu_k, max(lens_q), max(lens_k)), varlen_ref(cu_q, cu_k)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window_size", [(-1, -1), (5, 0), (3, 7)])
def test_varlen_masks(device, causal, window_size):
    inputs, args, ref = varlen_inputs(device, 4, 2)
    check(flash_attn_varlen_func, inputs, unpacked, torch.float32, args, ref, causal=causal, window_size=window_size)


@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 1)])
def test_varlen_heads(device, H, Hkv):
    inputs, args, ref = varlen_inputs(device, H, Hkv, D=40)
    check(flash_attn_varlen_func, inputs, unpacked, torch.float32, args, ref, causal=True, softmax_scale=0.3)


@pytest.mark.parametrize("softcap", [0.0, 2.0])
@pytest.mark.parametrize("alibi", [None, "H", "SH"])
def test_varlen_softcap_and_alibi(device, softcap, alibi):
    slopes = {None: None, "H": torch.rand(4, device=device), "SH": torch.rand(len(LENS_Q), 4, device=device)}[alibi]
    inputs, args, ref = varlen_inputs(device, 4, 2)
    check(flash_attn_varlen_func, inputs, unpacked, torch.float32, args, ref, causal=True, window_size=(9, -1),
          softcap=softcap, alibi_slopes=slopes)


def test_varlen_half(device):
    inputs, args, ref = varlen_inputs(device, 4, 2, D=64, dtype=torch.float16)
    check(flash_attn_varlen_func, inputs, unpacked, torch.float16, args, ref, causal=True, softcap=2.0,
          alibi_slopes=torch.rand(4, device=device))


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_qkvpacked(device, causal):
    lens = [7, 1, 12, 5]
    qkv, cu_seqlens = rand(sum(lens), 3, 4, 32, device=device), cu(lens, device)
    check(flash_attn_varlen_qkvpacked_func, [qkv], lambda x: x.unbind(1), torch.float32, (cu_seqlens, max(lens)),
          varlen_ref(cu_seqlens, cu_seqlens), causal=causal, window_size=(3, 7))


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_kvpacked(device, causal):
    lens_q, lens_k = [6, 13, 1], [9, 4, 7]
    cu_q, cu_k = cu(lens_q, device), cu(lens_k, device)
    inputs = rand(sum(lens_q), 4, 32, device=device), rand(sum(lens_k), 2, 2, 32, device=device)
    check(flash_attn_varlen_kvpacked_func, inputs, lambda q, kv: (q, *kv.unbind(1)), torch.float32,
          (cu_q, cu_k, max(lens_q), max(lens_k)), varlen_ref(cu_q, cu_k), causal=causal, softcap=2.0,
          alibi_slopes=torch.rand(3, 4, device=device))


def test_varlen_without_lse(device):
    (q, k, v), args, _ = varlen_inputs(device, 4, 2)
    out = flash_attn_varlen_func(q, k, v, *args, causal=True)
    assert torch.equal(out, flash_attn_varlen_func(q, k, v, *args, causal=True, return_attn_probs=True)[0])
    assert out.is_contiguous() and out.view(out.shape[0], -1).shape == (sum(LENS_Q), 4 * 32)


# ----------------------------------------------------------------------------------------------
# flash_attn_with_kvcache
# ----------------------------------------------------------------------------------------------
def kvcache_case(device, B, B_cache, Tq, t_new, Tc=12, H=4, Hkv=2, D=32):
    q = torch.randn(B, Tq, H, D, device=device)
    k_cache, v_cache = (torch.randn(B_cache, Tc, Hkv, D, device=device) for _ in range(2))
    new = [torch.randn(B, t_new, Hkv, D, device=device) for _ in range(2)] if t_new else [None, None]
    return q, k_cache, v_cache, *new


def kvcache_expected(q, k_cache, v_cache, k, v, seqlens, rows, alibi_slopes=None, **kw):
    """The caches after the append (``rows[b]`` the cache row of sequence ``b``), and the reference out/lse."""
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    t_new = 0 if k is None else k.shape[1]
    outs, lses = [], []
    for b, (n, r) in enumerate(zip(seqlens, rows)):
        if k is not None:
            k_cache[r, n:n + t_new], v_cache[r, n:n + t_new] = k[b], v[b]
        slopes = alibi_slopes if alibi_slopes is None or alibi_slopes.dim() == 1 else alibi_slopes[b]
        o, l = attention_ref(q[b:b + 1].cpu(), k_cache[r:r + 1, :n + t_new].cpu(), v_cache[r:r + 1, :n + t_new].cpu(),
                             alibi_slopes=None if slopes is None else slopes.cpu(), **kw)
        outs.append(o)
        lses.append(l)
    return k_cache, v_cache, torch.cat(outs), torch.cat(lses)


def check_kvcache(q, k_cache, v_cache, k, v, seqlens, rows, cache_seqlens, cache_batch_idx=None, **kw):
    expected_k, expected_v, ref, ref_lse = kvcache_expected(q, k_cache, v_cache, k, v, seqlens, rows,
                                                            kw.get("alibi_slopes"), **{n: x for n, x in kw.items()
                                                                                       if n != "alibi_slopes"})
    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens,
                                       cache_batch_idx=cache_batch_idx, return_softmax_lse=True, **kw)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v), "caches written wrongly"
    assert out.shape == q.shape[:3] + v_cache.shape[3:] and out.is_contiguous() and lse.is_contiguous()
    assert_close(out, ref, torch.float32, "fwd", "out")
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse.cpu()), empty), "softmax_lse: rows with no visible key differ"
    assert_close(lse.cpu().masked_fill(empty, 0.0), ref_lse.masked_fill(empty, 0.0), torch.float32, "lse", "lse")
    assert torch.equal(flash_attn_with_kvcache(q, expected_k, expected_v, cache_seqlens=cache_seqlens + (
        0 if k is None else k.shape[1]), cache_batch_idx=cache_batch_idx, **kw), out), "out without lse differs"


@pytest.mark.parametrize("Tq,t_new", [(1, 0), (1, 1), (4, 0), (4, 3), (5, 2)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("rows", [None, "permutation", "subset"])
def test_kvcache(device, Tq, t_new, causal, rows):
    """Decoding (Tq = 1) and chunks (Tq > 1), with and without appended k/v, cache rows chosen or not."""
    B = 3
    row_list = {None: [0, 1, 2], "permutation": [2, 0, 1], "subset": [4, 0, 2]}[rows]
    B_cache = {None: 4, "permutation": 3, "subset": 5}[rows]
    q, k_cache, v_cache, k, v = kvcache_case(device, B, B_cache, Tq, t_new)
    seqlens = torch.randint(0, 12 - t_new + 1, (B,), dtype=torch.int32)
    seqlens[0] = 12 - t_new  # one cache filled to the last slot
    idx = None if rows is None else torch.tensor(row_list, dtype=torch.int32, device=device)
    check_kvcache(q, k_cache, v_cache, k, v, seqlens.tolist(), row_list, seqlens.to(device), idx, causal=causal)


@pytest.mark.parametrize("window_size", [(3, 0), (2, 2)])
@pytest.mark.parametrize("t_new", [0, 2])
def test_kvcache_int_seqlens_and_window(device, window_size, t_new):
    q, k_cache, v_cache, k, v = kvcache_case(device, 2, 2, 4, t_new, H=4, Hkv=1)
    check_kvcache(q, k_cache, v_cache, k, v, [7, 7], [0, 1], 7, causal=True, window_size=window_size, softcap=2.0,
                  alibi_slopes=torch.rand(2, 4, device=device), softmax_scale=0.2)


def test_kvcache_whole_cache(device):
    """Without cache_seqlens (and without k/v) every slot of the cache is a key."""
    q, k_cache, v_cache, _, _ = kvcache_case(device, 2, 2, 3, 0)
    ref, _ = attention_ref(q.cpu(), k_cache.cpu(), v_cache.cpu(), causal=True)
    assert_close(flash_attn_with_kvcache(q, k_cache, v_cache, causal=True, num_splits=4), ref, torch.float32)


@pytest.mark.parametrize("page", [1, 4, 5])
@pytest.mark.parametrize("t_new", [0, 3])
def test_kvcache_paged(device, page, t_new):
    """A paged cache (block_table into a shuffled pool of pages, any page size) gives what the contiguous caches its
    pages spell give, and the appended tokens land in the right slots of the right pages (the others untouched)."""
    B, Tq, n_pages = 3, 2, 4
    Tc = n_pages * page
    q, k_cache, v_cache, k, v = kvcache_case(device, B, B, Tq, t_new, Tc=Tc)
    seqlens = torch.randint(0, Tc - t_new + 1, (B,), dtype=torch.int32)
    seqlens[0] = Tc - t_new
    pool = B * n_pages + 2  # two pages no sequence uses
    table = torch.randperm(pool)[:B * n_pages].view(B, n_pages).to(device)
    k_pages, v_pages = (torch.randn(pool, page, *c.shape[2:], device=device) for c in (k_cache, v_cache))
    for pages, cache in ((k_pages, k_cache), (v_pages, v_cache)):
        pages[table.flatten()] = cache.reshape(B * n_pages, page, *cache.shape[2:])
    before = k_pages.clone(), v_pages.clone()
    expected_k, expected_v, ref, ref_lse = kvcache_expected(q, k_cache, v_cache, k, v, seqlens.tolist(), [0, 1, 2],
                                                            causal=True)
    out, lse = flash_attn_with_kvcache(q, k_pages, v_pages, k, v, cache_seqlens=seqlens.to(device),
                                       block_table=table.int(), causal=True, return_softmax_lse=True)
    for pages, old, expected in ((k_pages, before[0], expected_k), (v_pages, before[1], expected_v)):
        assert torch.equal(pages[table].flatten(1, 2), expected), "pages written wrongly"
        unused = torch.ones(pool, dtype=torch.bool)
        unused[table.flatten().cpu()] = False
        assert torch.equal(pages[unused.to(device)], old[unused.to(device)]), "a page outside the table was written"
    assert_close(out, ref, torch.float32, "fwd", "out")
    empty = torch.isneginf(ref_lse)  # a causal row past an empty cache sees no key
    assert torch.equal(torch.isneginf(lse.cpu()), empty)
    assert_close(lse.cpu().masked_fill(empty, 0.0), ref_lse.masked_fill(empty, 0.0), torch.float32, "lse", "lse")


# ----------------------------------------------------------------------------------------------
# bad inputs of the varlen and kvcache functions
# ----------------------------------------------------------------------------------------------
def varlen_call(**kw):
    def call(device):
        (q, k, v), (cu_q, cu_k, mq, mk), _ = varlen_inputs(device, 4, 2, lens_q=[4, 6], lens_k=[5, 7])
        args = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=mq, max_seqlen_k=mk)
        args.update((name, f(device) if callable(f) else f) for name, f in kw.items())
        return flash_attn_varlen_func(q, k, v, **args)
    return call


def i32(*values, dtype=torch.int32):
    return lambda device: torch.tensor(values, dtype=dtype, device=device)


def qkvpacked_call(cu_seqlens):
    return lambda device: flash_attn_varlen_qkvpacked_func(rand(10, 3, 4, 32, device=device), cu_seqlens(device), 6)


BAD_VARLEN = [
    ("cu_seqlens_q must be int32", varlen_call(cu_seqlens_q=i32(0, 4, 10, dtype=torch.int64)), TypeError),
    ("cu_seqlens_q must rise", varlen_call(cu_seqlens_q=i32(0, 6, 4, 10)), ValueError),
    ("cu_seqlens_k must rise", varlen_call(cu_seqlens_k=i32(0, 5, 11)), ValueError),
    ("cu_seqlens_k must rise", varlen_call(cu_seqlens_k=i32(1, 5, 12)), ValueError),
    ("cu_seqlens_q has 2 sequences", varlen_call(cu_seqlens_k=i32(0, 5, 6, 12)), ValueError),
    ("max_seqlen_q", varlen_call(max_seqlen_q=5), ValueError),
    ("max_seqlen_k", varlen_call(max_seqlen_k="7"), ValueError),
    ("block_table", varlen_call(block_table=i32(0, 1)), NotImplementedError),
    ("return_attn_probs", varlen_call(return_attn_probs=1), TypeError),
    ("alibi_slopes", varlen_call(alibi_slopes=lambda d: torch.rand(3, 4, device=d)), ValueError),
    ("cu_seqlens must be int32", qkvpacked_call(i32(0, 4, 10, dtype=torch.int64)), TypeError),
    ("cu_seqlens must rise", qkvpacked_call(i32(0, 4, 9)), ValueError),
    ("q must be 3-D", lambda d: flash_attn_varlen_func(*(rand(1, 10, 4, 32, device=d) for _ in range(3)),
                                                       i32(0, 10)(d), i32(0, 10)(d), 10, 10), ValueError),
    ("qkv must be", lambda d: flash_attn_varlen_qkvpacked_func(rand(10, 2, 4, 32, device=d), i32(0, 10)(d), 10),
     ValueError),
    ("kv must be", lambda d: flash_attn_varlen_kvpacked_func(rand(10, 4, 32, device=d), rand(10, 3, 2, 32, device=d),
                                                             i32(0, 10)(d), i32(0, 10)(d), 10, 10), ValueError),
]


@pytest.mark.parametrize("name,call,error", BAD_VARLEN,
                         ids=[f"{i}-{b[0].split()[0]}" for i, b in enumerate(BAD_VARLEN)])
def test_bad_varlen_inputs(monkeypatch, device, name, call, error):
    """Errors name the argument and come before any kernel runs."""
    def no_kernel(*args, **kw):
        raise AssertionError("a kernel ran")

    monkeypatch.setattr("effattn.varlen.varlen_attention_fwd", no_kernel)
    with pytest.raises(error, match=name):
        call(device)


def kvcache_call(**kw):
    """flash_attn_with_kvcache on q (2, 1, 4, 32), caches (2, 8, 2, 32), k/v (2, 3, 2, 32), cache_seqlens [2, 5],
    with ``kw`` replacing arguments (callables of the tensors' dict)."""
    def call(t):
        args = dict(t, cache_seqlens=i32(2, 5)(t["q"].device))
        args.update((name, f(t) if callable(f) else f) for name, f in kw.items())
        return flash_attn_with_kvcache(**args)
    return call


def on_device(make):
    return lambda t: make(t["q"].device)


BAD_KVCACHE = [
    ("cache_seqlens must be >= 0 and leave room", kvcache_call(cache_seqlens=on_device(i32(2, 6))), ValueError),
    ("cache_seqlens must be >= 0 and leave room", kvcache_call(cache_seqlens=6), ValueError),
    ("cache_seqlens must be >= 0", kvcache_call(cache_seqlens=on_device(i32(2, -1))), ValueError),
    ("cache_seqlens must be int32", kvcache_call(cache_seqlens=on_device(i32(2, 5, dtype=torch.int64))), TypeError),
    ("cache_seqlens must have shape", kvcache_call(cache_seqlens=on_device(i32(2, 5, 1))), ValueError),
    ("cache_seqlens must be an int", kvcache_call(cache_seqlens=2.0), TypeError),
    ("cache_seqlens must be given", kvcache_call(cache_seqlens=None), ValueError),
    ("k and v", kvcache_call(v=None), ValueError),
    ("cache_batch_idx must be int32", kvcache_call(cache_batch_idx=on_device(i32(1, 0, dtype=torch.int64))),
     TypeError),
    ("cache_batch_idx must lie in", kvcache_call(cache_batch_idx=on_device(i32(1, 2))), ValueError),
    ("cache_batch_idx must lie in", kvcache_call(cache_batch_idx=on_device(i32(-1, 0))), ValueError),
    ("k_cache holds 2 sequences", kvcache_call(q=lambda t: t["q"].repeat(2, 1, 1, 1), k=None, v=None,
                                               cache_seqlens=None), ValueError),
    ("k must have the dtype", kvcache_call(k=lambda t: t["k"].half()), TypeError),
    ("v must have the dtype", kvcache_call(v=lambda t: t["v"].double()), TypeError),
    ("v_cache must be", kvcache_call(v_cache=lambda t: t["v_cache"][:, :4]), ValueError),
    ("q, k_cache, v_cache must share one dtype", kvcache_call(q=lambda t: t["q"].double()), TypeError),
    ("k must be", kvcache_call(k=lambda t: t["k"][:, :, :1]), ValueError),
    ("v must be", kvcache_call(v=lambda t: t["v"][:, :2]), ValueError),
    ("head dim of q", kvcache_call(q=lambda t: t["q"][..., :16]), ValueError),
    ("block_table must be 2-D", kvcache_call(block_table=on_device(i32(0, 1))), ValueError),
    ("block_table must be int32", kvcache_call(block_table=lambda t: torch.zeros(2, 1, dtype=torch.int64,
                                                                                 device=t["q"].device)), TypeError),
    ("block_table must have shape", kvcache_call(block_table=lambda t: torch.zeros(3, 1, dtype=torch.int32,
                                                                                   device=t["q"].device)), ValueError),
    ("block_table entries must lie in", kvcache_call(block_table=lambda t: torch.tensor(
        [[0], [2]], dtype=torch.int32, device=t["q"].device)), ValueError),
    ("cache_batch_idx and block_table cannot be combined", kvcache_call(
        block_table=lambda t: torch.tensor([[0], [1]], dtype=torch.int32, device=t["q"].device),
        cache_batch_idx=on_device(i32(1, 0))), ValueError),
    ("cache_seqlens must be >= 0 and leave room", kvcache_call(  # one page of 8 slots: 6 + 3 do not fit
        block_table=lambda t: torch.tensor([[0], [1]], dtype=torch.int32, device=t["q"].device),
        cache_seqlens=on_device(i32(2, 6))), ValueError),
    ("rotary_cos", kvcache_call(rotary_cos=lambda t: torch.ones(8, 16)), NotImplementedError),
    ("rotary_sin", kvcache_call(rotary_sin=lambda t: torch.ones(8, 16)), NotImplementedError),
    ("cache_leftpad", kvcache_call(cache_leftpad=on_device(i32(0, 0))), NotImplementedError),
    ("num_splits", kvcache_call(num_splits=-1), ValueError),
    ("return_softmax_lse", kvcache_call(return_softmax_lse=1), TypeError),
    ("window_size", kvcache_call(window_size=(-2, 0)), ValueError),
]


@pytest.mark.parametrize("name,call,error", BAD_KVCACHE,
                         ids=[f"{i}-{b[0].split()[0]}" for i, b in enumerate(BAD_KVCACHE)])
def test_bad_kvcache_inputs(monkeypatch, device, name, call, error):
    """Errors name the argument and come before the caches are written or any kernel runs."""
    def no_kernel(*args, **kw):
        raise AssertionError("a kernel ran")

    monkeypatch.setattr("effattn.varlen.varlen_attention_fwd", no_kernel)
    t = dict(zip(("q", "k_cache", "v_cache", "k", "v"), kvcache_case(device, 2, 2, 1, 3, Tc=8)))
    caches = t["k_cache"].clone(), t["v_cache"].clone()
    with pytest.raises(error, match=name):
        call(t)
    assert torch.equal(t["k_cache"], caches[0]) and torch.equal(t["v_cache"], caches[1]), "a cache was written"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device (CUDA)")
def test_index_tensors_on_another_device(device):
    if device != "cuda":
        pytest.skip("the test device is the CPU")
    with pytest.raises(ValueError, match="cu_seqlens_k must be on"):
        varlen_call(cu_seqlens_k=torch.tensor([0, 5, 12], dtype=torch.int32))(device)
    t = dict(zip(("q", "k_cache", "v_cache", "k", "v"), kvcache_case(device, 2, 2, 1, 3, Tc=8)))
    with pytest.raises(ValueError, match="cache_seqlens must be on"):
        kvcache_call(cache_seqlens=torch.tensor([2, 5], dtype=torch.int32))(t)
