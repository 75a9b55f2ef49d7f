"""``effattn.varlen_attention`` (packed sequences, KV caches) on every backend against the float64 reference.

The reference runs :func:`effattn.reference.attention_forward` per sequence; it is itself checked against one
:func:`effattn.flash_attention` call per sequence. Outputs of the kernels are NaN-poisoned (tests/conftest.py), so a
row a kernel forgets to write fails; the packed layout covers every row, so none may stay NaN.
"""

import pytest
import torch

import effattn
from effattn.testing import assert_close
from tests.helpers import skip_if_unsupported

H, HKV = 4, 2


def _cu(lens):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


def _packed(lens_q, lens_k, D=32, dtype=torch.float32, device="cpu"):
    q = torch.randn(sum(lens_q), H, D, dtype=dtype, device=device)
    k, v = (torch.randn(sum(lens_k), HKV, D, dtype=dtype, device=device) for _ in range(2))
    return q, k, v, _cu(lens_q).to(device), _cu(lens_k).to(device)


def _compare(backend, q, k, v, *args, **kwargs):
    """``varlen_attention`` on ``backend`` against the float64 reference: out, lse, dq, dk, dv."""
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    with skip_if_unsupported():
        out, lse = effattn.varlen_attention(*leaves, *args, return_lse=True, backend=backend.name, **kwargs)
    ref_leaves = [x.detach().cpu().double().requires_grad_() for x in (q, k, v)]
    ref_args = [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]
    ref_kwargs = {n: a.cpu() if isinstance(a, torch.Tensor) else a for n, a in kwargs.items()}
    ref_out, ref_lse = effattn.varlen_attention(*ref_leaves, *ref_args, return_lse=True, backend="reference",
                                                **ref_kwargs)
    assert out.shape == ref_out.shape and out.is_contiguous()
    assert_close(out.cpu(), ref_out, q.dtype, "fwd", "out")
    assert torch.equal(torch.isneginf(lse.cpu()), torch.isneginf(ref_lse)), "lse: rows with no visible key differ"
    finite = torch.isfinite(ref_lse)
    assert_close(lse.cpu()[finite], ref_lse[finite], q.dtype, "lse", "lse")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad((out * dout).float().sum(), leaves)
    ref_grads = torch.autograd.grad((ref_out * dout.cpu().double()).sum(), ref_leaves)
    for name, g, rg in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert g.shape == rg.shape
        assert_close(g.cpu(), rg, q.dtype, "grad", name)


LENGTHS = {"mixed": ([5, 1, 33, 17], [9, 3, 33, 40]), "long-q": ([40, 7], [12, 7]), "single": ([29], [29])}


@pytest.mark.parametrize("lengths", list(LENGTHS))
@pytest.mark.parametrize("mask", ["none", "causal", "window"])
@pytest.mark.interpreter_subset(lengths=["mixed"])
@pytest.mark.interpreter_subset(lengths=["long-q"], mask=["causal"])
def test_packed(backend, lengths, mask):
    """Mixed lengths (1 included), Tq > Tk and Tq < Tk per sequence (bottom-right), GQA."""
    kw = {"none": {}, "causal": dict(causal=True), "window": dict(window=(4, 2))}[mask]
    q, k, v, cq, ck = _packed(*LENGTHS[lengths], device=backend.device)
    _compare(backend, q, k, v, cq, ck, **kw)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(backend, dtype):
    q, k, v, cq, ck = _packed([13, 30], [20, 30], D=64, dtype=dtype, device=backend.device)
    _compare(backend, q, k, v, cq, ck, causal=True)


def test_score_modifiers_and_dropout(backend):
    q, k, v, cq, ck = _packed([11, 26], [19, 26], device=backend.device)
    _compare(backend, q, k, v, cq, ck, causal=True, softcap=1.5, alibi_slopes=torch.rand(2, H, device=backend.device))
    _compare(backend, q, k, v, cq, ck, dropout_p=0.25, dropout_seed=5)


def test_empty_sequence_and_empty_rows(backend):
    """A sequence with no queries, one with no keys (its rows: out 0, lse -inf)."""
    q, k, v, cq, ck = _packed([6, 0, 9], [8, 4, 0], device=backend.device)
    _compare(backend, q, k, v, cq, ck)


@pytest.mark.parametrize("causal", [False, True])
def test_kv_cache(backend, causal):
    """Keys from caches ``(S, Tc, Hkv, D)``, sequence s using its first seqused_k[s] slots (decoding: Tq small)."""
    dev = backend.device
    kc, vc = (torch.randn(3, 24, HKV, 32, device=dev) for _ in range(2))
    q = torch.randn(6, H, 32, device=dev)
    _compare(backend, q, kc, vc, _cu([1, 3, 2]).to(dev), seqused_k=torch.tensor([7, 24, 1], dtype=torch.int32,
                                                                                 device=dev), causal=causal)


def test_reference_is_one_flash_call_per_sequence():
    lens_q, lens_k = [5, 12, 1], [9, 12, 30]
    q, k, v, cq, ck = _packed(lens_q, lens_k, dtype=torch.float64)
    slopes = torch.rand(3, H, dtype=torch.float64)
    out, lse = effattn.varlen_attention(q, k, v, cq, ck, causal=True, window=(6, None), softcap=2.0,
                                        alibi_slopes=slopes, return_lse=True, backend="reference")
    for s in range(3):
        rows, keys = slice(int(cq[s]), int(cq[s + 1])), slice(int(ck[s]), int(ck[s + 1]))
        o, lse_s = effattn.flash_attention(q[rows].transpose(0, 1)[None], k[keys].transpose(0, 1)[None],
                                           v[keys].transpose(0, 1)[None], causal=True, window=(6, None), softcap=2.0,
                                           alibi_slopes=slopes[s:s + 1], return_lse=True, backend="reference")
        torch.testing.assert_close(out[rows], o[0].transpose(0, 1))
        torch.testing.assert_close(lse[:, rows], lse_s[0])


def test_dropout_stream_of_a_sequence_is_the_dense_one_of_seed_plus_s():
    q, k, v, cq, ck = _packed([7, 10], [7, 10], dtype=torch.float64)
    out = effattn.varlen_attention(q, k, v, cq, ck, dropout_p=0.5, dropout_seed=11, backend="reference")
    dense = effattn.flash_attention(q[7:].transpose(0, 1)[None], k[7:].transpose(0, 1)[None],
                                    v[7:].transpose(0, 1)[None], dropout_p=0.5, dropout_seed=12, backend="reference")
    torch.testing.assert_close(out[7:], dense[0].transpose(0, 1))


ERRORS = [
    (dict(cu_q=torch.tensor([0, 5, 20])), TypeError, "cu_seqlens_q must be int32"),
    (dict(cu_q=torch.tensor([0, 15, 12, 20], dtype=torch.int32)), ValueError, "cu_seqlens_q must rise from 0"),
    (dict(cu_q=torch.tensor([0, 5, 19], dtype=torch.int32)), ValueError, "to the packed length 20"),
    (dict(cu_k=torch.tensor([0, 30], dtype=torch.int32)), ValueError, "cu_seqlens_q has 2 sequences, cu_seqlens_k 1"),
    (dict(max_seqlen_q=10), ValueError, r"max_seqlen_q must be an int >= the longest sequence \(15\)"),
    (dict(q=torch.randn(1, 20, H, 32)), ValueError, r"q must be 3-D \(total_q, Hq, D\)"),
    (dict(seqused_k=torch.tensor([3, 4], dtype=torch.int32)), ValueError, "pass cu_seqlens_k with packed"),
    (dict(alibi_slopes=torch.rand(3, H)), ValueError, r"alibi_slopes must have shape \(Hq,\)"),
]


@pytest.mark.parametrize("change,exc,msg", ERRORS)
def test_errors(change, exc, msg):
    q, k, v, cq, ck = _packed([5, 15], [10, 20])
    args = dict(q=q, k=k, v=v, cu_q=cq, cu_k=ck)
    kwargs = {n: change.pop(n) for n in list(change) if n not in args}
    args.update(change)
    with pytest.raises(exc, match=msg):
        effattn.varlen_attention(args["q"], args["k"], args["v"], args["cu_q"], args["cu_k"], **kwargs)


def test_cache_errors():
    kc = vc = torch.randn(2, 8, HKV, 32)
    q = torch.randn(4, H, 32)
    cq = _cu([2, 2])
    with pytest.raises(ValueError, match=r"seqused_k must lie in \[0, Tc = 8\]"):
        effattn.varlen_attention(q, kc, vc, cq, seqused_k=torch.tensor([3, 9], dtype=torch.int32))
    with pytest.raises(ValueError, match="seqused_k must be int32"):
        effattn.varlen_attention(q, kc, vc, cq, seqused_k=torch.tensor([3, 4]))
    with pytest.raises(ValueError, match="the k/v caches hold 2 sequences, cu_seqlens_q 3"):
        effattn.varlen_attention(torch.randn(6, H, 32), kc, vc, _cu([2, 2, 2]),
                                 seqused_k=torch.tensor([3, 4, 1], dtype=torch.int32))


@pytest.mark.parametrize("splits", [2, 5])
@pytest.mark.parametrize("mask", ["none", "causal-window", "softcap-alibi"])
@pytest.mark.interpreter_subset(splits=[5], mask=["causal-window", "softcap-alibi"])
def test_split_kv_decoding(backend, splits, mask, monkeypatch):
    """Short query sequences against long keys: the Triton launcher and the C++ CPU kernels split the keys over
    programs / tasks and merge the parts by lse (forced here; otherwise a heuristic chooses)."""
    from effattn.kernels import flash_attn

    monkeypatch.setenv("EFFATTN_CPU_DECODE_SPLITS", str(splits))

    kw = {"none": {}, "causal-window": dict(causal=True, window=(40, None)),
          "softcap-alibi": dict(softcap=1.0, alibi_slopes=torch.rand(H, device=backend.device))}[mask]
    calls, real = [], flash_attn._decode_forward

    def spy(*args, **kwargs):
        calls.append(args[6])  # the number of splits
        return real(*args, **kwargs)

    monkeypatch.setattr(flash_attn, "_decode_forward", spy)
    q, k, v, cq, ck = _packed([1, 4, 16, 2], [70, 33, 300, 0], device=backend.device)
    with flash_attn.forced_splits(splits):
        _compare(backend, q, k, v, cq, ck, **kw)
    assert calls == ([splits] if backend.name == "triton" else [])
