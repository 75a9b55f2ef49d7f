"""Bad input raises TypeError/ValueError naming the argument, before any kernel is launched."""

import pytest
import torch

import effattn
from effattn import UnsupportedInputError, reference
from effattn.kernels import flash_attn


@pytest.fixture(autouse=True)
def _no_launch(monkeypatch):
    """Any launch during these tests is a failure: errors must come before."""
    def boom(*a, **k):
        raise AssertionError("a kernel was launched")
    monkeypatch.setattr(flash_attn, "flash_attn_forward", boom)
    monkeypatch.setattr(flash_attn, "flash_attn_backward", boom)
    monkeypatch.setattr(reference, "attention_forward", boom)


def qkv(B=2, H=2, T=8, D=16, dtype=torch.float32, **over):
    t = dict(q=torch.randn(B, H, T, D, dtype=dtype), k=torch.randn(B, H, T, D, dtype=dtype),
             v=torch.randn(B, H, T, D, dtype=dtype))
    t.update(over)
    return t


FLASH_CASES = [
    (dict(q=[1.0]), {}, TypeError, "q must be a torch.Tensor"),
    (dict(q=torch.randn(2, 8, 16)), {}, ValueError, r"q must be 4-D \(B, Hq, Tq, D\)"),
    (dict(v=torch.randn(2, 2, 8)), {}, ValueError, "v must be 4-D"),
    (dict(k=torch.randn(3, 2, 8, 16)), {}, ValueError, "batch size differs"),
    (dict(k=torch.randn(2, 2, 8, 12)), {}, ValueError, r"head dim of q \(16\) and k \(12\)"),
    (dict(v=torch.randn(2, 2, 9, 16)), {}, ValueError, r"must agree on \(B, Hkv, Tk\)"),
    (dict(q=torch.randn(2, 3, 8, 16), k=torch.randn(2, 2, 8, 16), v=torch.randn(2, 2, 8, 16)), {}, ValueError,
     r"query heads \(3\) must be a multiple of key/value heads \(2\)"),
    (dict(k=torch.randn(2, 2, 8, 16, dtype=torch.float16)), {}, TypeError, "must share one dtype"),
    (dict(q=torch.randint(0, 3, (2, 2, 8, 16))), {}, TypeError, "q must have a floating dtype"),
    ({}, dict(key_padding_mask=torch.ones(2, 8)), TypeError, "key_padding_mask must be bool"),
    ({}, dict(key_padding_mask=torch.ones(2, 9, dtype=torch.bool)), ValueError,
     r"key_padding_mask must have shape \(B, Tk\) = \(2, 8\)"),
    ({}, dict(window=(1, 2, 3)), ValueError, r"window must be a pair \(left, right\)"),
    ({}, dict(window=(-3, 2)), ValueError, "window left must be an int >= 0"),
    ({}, dict(window=(1, 2.5)), ValueError, "window right must be an int"),
    ({}, dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\)"),
    ({}, dict(dropout_p="0.1"), TypeError, "dropout_p must be a float"),
    ({}, dict(scale="big"), TypeError, "scale must be a float"),
    ({}, dict(causal=1), TypeError, "causal must be a bool"),
    ({}, dict(dropout_p=0.1, dropout_seed=-1), ValueError, "dropout_seed must be"),
    ({}, dict(backend="cudnn"), ValueError,
     r"backend must be one of \['cpp', 'cuda', 'cuda-emu', 'reference', 'triton'\]"),
    ({}, dict(softcap=-1.0), ValueError, "softcap must be a finite float >= 0"),
    ({}, dict(softcap=float("inf")), ValueError, "softcap must be a finite float >= 0"),
    ({}, dict(softcap="1"), TypeError, "softcap must be a float"),
    ({}, dict(alibi_slopes=[0.5, 0.25]), TypeError, "alibi_slopes must be a torch.Tensor"),
    ({}, dict(alibi_slopes=torch.ones(3)), ValueError, r"alibi_slopes must have shape \(Hq,\) = \(2,\)"),
    ({}, dict(alibi_slopes=torch.ones(2, 2, 1)), ValueError, r"or \(B, Hq\) = \(2, 2\)"),
    ({}, dict(alibi_slopes=torch.ones(2, dtype=torch.int32)), TypeError, "alibi_slopes must be a floating tensor"),
    ({}, dict(alibi_slopes=torch.ones(2, requires_grad=True)), ValueError, "alibi_slopes cannot require grad"),
    ({}, dict(alibi_slopes=torch.ones(2), segment_ids=torch.zeros(2, 8, dtype=torch.long)), ValueError,
     "segment_ids cannot be combined with softcap or alibi_slopes"),
]


@pytest.mark.parametrize("tensors,kwargs,exc,msg", FLASH_CASES)
def test_flash_attention_errors(tensors, kwargs, exc, msg):
    t = qkv(**tensors)
    with pytest.raises(exc, match=msg):
        effattn.flash_attention(t["q"], t["k"], t["v"], **kwargs)


def test_nested_tensor_rejected():
    nt = torch.nested.nested_tensor([torch.randn(2, 3, 4), torch.randn(2, 5, 4)])
    t = qkv()
    with pytest.raises(TypeError, match="q must be a dense"):
        effattn.flash_attention(nt, t["k"], t["v"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for a second device")
def test_device_mismatch():
    t = qkv()
    with pytest.raises(ValueError, match="must be on one device"):
        effattn.flash_attention(t["q"].cuda(), t["k"], t["v"])


def test_device_mismatch_meta():
    """Tensors on two devices (meta and cpu: no GPU needed)."""
    t = qkv()
    with pytest.raises(ValueError, match="must be on one device"):
        effattn.flash_attention(t["q"].to("meta"), t["k"], t["v"])
    with pytest.raises(ValueError, match="key_padding_mask must be on cpu"):
        effattn.flash_attention(t["q"], t["k"], t["v"], key_padding_mask=torch.ones(2, 8, dtype=torch.bool,
                                                                                     device="meta"))


def test_forced_backend_gives_reasons():
    t = qkv(dtype=torch.float64, D=2100)
    with pytest.raises(UnsupportedInputError, match=r"backend='triton' cannot run this input: .*float64.*"
                                                    r"head dim of q/k is 2100, more than 2048"):
        effattn.flash_attention(t["q"], t["k"], t["v"], backend="triton")
    q, k, v = (torch.randn(1, 1, 4, d) for d in (16, 16, 300))
    with pytest.raises(UnsupportedInputError, match=r"head dim of v is 300, more than 256"):
        effattn.flash_attention(q, k, v, backend="triton")
    q, k, v = (torch.randn(1, 1, 4, d) for d in (1100, 1100, 64))
    with pytest.raises(UnsupportedInputError, match=r"float32 with a q/k head dim above 1024 \(is 1100\)"):
        effattn.flash_attention(q, k, v, backend="triton")


def test_launch_grid_limit_is_a_reason():
    q = torch.randn(70_000, 1, 1, 16)
    with pytest.raises(UnsupportedInputError, match=r"batch \(70000\) and heads \(1\) must each be <= 65535"):
        effattn.flash_attention(q, q, q, backend="triton")


def test_env_backend(monkeypatch):
    monkeypatch.setenv("EFFATTN_BACKEND", "nope")
    t = qkv()
    with pytest.raises(ValueError, match="backend must be one of"):
        effattn.flash_attention(t["q"], t["k"], t["v"])
    monkeypatch.setenv("EFFATTN_BACKEND", "triton")
    t = qkv(dtype=torch.float64)
    with pytest.raises(UnsupportedInputError, match="EFFATTN_BACKEND='triton' cannot run"):
        effattn.flash_attention(t["q"], t["k"], t["v"])


SDPA_CASES = [
    (dict(query=torch.randn(8, 16)), {}, ValueError, "query must be at least 3-D"),
    (dict(key=torch.randn(1, 2, 2, 8, 16)), {}, ValueError, "same number of dims"),
    (dict(key=torch.randn(3, 2, 8, 16), value=torch.randn(3, 2, 8, 16)), {}, ValueError, "leading"),
    (dict(key=torch.randn(2, 1, 8, 16), value=torch.randn(2, 1, 8, 16)), {}, ValueError, "enable_gqa=True"),
    ({}, dict(attn_mask=torch.ones(8, 8, dtype=torch.bool), is_causal=True), ValueError,
     "attn_mask must be None when is_causal"),
    ({}, dict(attn_mask=torch.ones(3, 8, 8, dtype=torch.bool)), ValueError,
     r"attn_mask of shape \(3, 8, 8\) is not broadcastable to \(2, 2, 8, 8\)"),
    ({}, dict(attn_mask=torch.ones(8, 8, dtype=torch.int32)), TypeError, "attn_mask must be bool"),
    ({}, dict(attn_mask=torch.zeros(8, 8, requires_grad=True)), ValueError, "attn_mask requires grad"),
    ({}, dict(dropout_p=-0.1), ValueError, "dropout_p must be in"),
]


@pytest.mark.parametrize("tensors,kwargs,exc,msg", SDPA_CASES)
def test_sdpa_errors(tensors, kwargs, exc, msg):
    t = dict(query=torch.randn(2, 2, 8, 16), key=torch.randn(2, 2, 8, 16), value=torch.randn(2, 2, 8, 16))
    t.update(tensors)
    with pytest.raises(exc, match=msg):
        effattn.scaled_dot_product_attention(t["query"], t["key"], t["value"], **kwargs)
