"""effattn.scaled_dot_product_attention against torch.nn.functional.scaled_dot_product_attention.

torch's own function, run in float64 on CPU, is the reference here: the drop-in must reproduce its
semantics (mask kinds and broadcasting, top-left causal, GQA, 3-D and 5-D inputs) and gradients, on
every backend (the reference included: the oracle here is torch's function; the ``any_backend``
fixture, tests/conftest.py).
"""

import pytest
import torch
import torch.nn.functional as F

import effattn
from effattn.testing import assert_close


def _inputs(shape_q, shape_kv, dtype, device, Ev=None):
    q = torch.randn(*shape_q, dtype=dtype, device=device, requires_grad=True)
    k = torch.randn(*shape_kv, dtype=dtype, device=device, requires_grad=True)
    vshape = (*shape_kv[:-1], Ev or shape_kv[-1])
    v = torch.randn(*vshape, dtype=dtype, device=device, requires_grad=True)
    return q, k, v


def _check(q, k, v, backend, **kw):
    dtype = q.dtype
    out = backend.run(effattn.scaled_dot_product_attention, q, k, v, **kw)
    r = [x.detach().cpu().double().requires_grad_() for x in (q, k, v)]
    ref_kw = dict(kw)
    m = kw.get("attn_mask")
    if m is not None:
        ref_kw["attn_mask"] = m.cpu() if m.dtype == torch.bool else m.cpu().double()
    ref = F.scaled_dot_product_attention(*r, **ref_kw)
    assert_close(out.cpu(), ref, dtype, "fwd", "out")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, r, dout.cpu().double())
    for name, g, rg in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(g.cpu(), rg, dtype, "grad", name)


@pytest.mark.parametrize("mask_shape", [(2, 1, 1, 40), (30, 40), (2, 3, 30, 40), (2, 1, 30, 40), (1, 3, 1, 40),
                                        (2, 1, 30, 1)])
@pytest.mark.interpreter_subset(mask_shape=[(30, 40), (2, 3, 30, 40), (2, 1, 30, 1)])
def test_bool_mask_broadcast(any_backend, mask_shape):
    q, k, v = _inputs((2, 3, 30, 32), (2, 3, 40, 32), torch.float16, any_backend.device)
    mask = torch.rand(*mask_shape, device=any_backend.device) > 0.3
    _check(q, k, v, any_backend, attn_mask=mask)


def test_float_mask(any_backend):
    q, k, v = _inputs((2, 3, 30, 32), (2, 3, 40, 32), torch.float32, any_backend.device)
    mask = torch.randn(2, 3, 30, 40, device=any_backend.device)
    mask[0, 1, 5] = float("-inf")  # an empty row
    mask[1, :, :, 7] = float("-inf")
    _check(q, k, v, any_backend, attn_mask=mask)


def test_bool_mask_with_empty_rows(any_backend):
    q, k, v = _inputs((1, 2, 20, 16), (1, 2, 20, 16), torch.float32, any_backend.device)
    mask = torch.rand(20, 20, device=any_backend.device) > 0.5
    mask[3] = False
    _check(q, k, v, any_backend, attn_mask=mask)


@pytest.mark.parametrize("L,S", [(30, 30), (20, 45), (45, 20)])
def test_is_causal_top_left(any_backend, L, S):
    q, k, v = _inputs((2, 2, L, 32), (2, 2, S, 32), torch.float16, any_backend.device)
    _check(q, k, v, any_backend, is_causal=True)


def test_gqa_scale_and_value_dim(any_backend):
    q, k, v = _inputs((2, 6, 25, 32), (2, 2, 33, 32), torch.float32, any_backend.device, Ev=20)
    _check(q, k, v, any_backend, enable_gqa=True, scale=0.2)


def test_3d_and_5d_inputs(any_backend):
    q, k, v = _inputs((3, 17, 16), (3, 21, 16), torch.float32, any_backend.device)
    _check(q, k, v, any_backend, attn_mask=torch.rand(17, 21, device=any_backend.device) > 0.2)
    q, k, v = _inputs((2, 2, 2, 11, 16), (2, 2, 2, 13, 16), torch.float32, any_backend.device)
    _check(q, k, v, any_backend, is_causal=True)


def test_dropout_runs_and_differs(any_backend):
    q, k, v = _inputs((1, 2, 30, 16), (1, 2, 30, 16), torch.float32, any_backend.device)
    a = any_backend.run(effattn.scaled_dot_product_attention, q, k, v, dropout_p=0.5)
    b = any_backend.run(effattn.scaled_dot_product_attention, q, k, v)
    assert a.shape == b.shape and not torch.equal(a, b)
    (a.sum()).backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))
