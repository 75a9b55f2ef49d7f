"""Funnel-Transformer on effattn: the fused relative attention, the pooling/up-sampling helpers, and
Hugging Face's FunnelModel / FunnelBaseModel patched in place, against the unpatched model."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import FunnelBaseModel, FunnelConfig, FunnelModel
from transformers.models.funnel import modeling_funnel as mf

import effattn.nn as enn
from effattn.integrations import funnel as ef


def _config(attention_type="relative_shift", pooling_type="mean", separate_cls=True, truncate_seq=True, **kw):
    base = dict(vocab_size=50, d_model=32, n_head=2, d_head=8, d_inner=48, block_sizes=[1, 1, 1],
                num_decoder_layers=1, hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                attention_type=attention_type, pooling_type=pooling_type, separate_cls=separate_cls,
                truncate_seq=truncate_seq)
    base.update(kw)
    return FunnelConfig(**base)


def _inputs(B, T, device):
    ids = torch.randint(0, 50, (B, T), device=device)
    mask = torch.ones(B, T, dtype=torch.long, device=device)
    mask[1, T - T // 3:] = 0  # padding at the end of the second sequence
    types = torch.zeros(B, T, dtype=torch.long, device=device)
    types[:, 0] = 2  # [cls]
    types[:, T // 2:] = 1  # second segment
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=types)


# Whole models against Hugging Face's (float32, eager PyTorch): the error of every layer adds up, so these
# tolerances are the models', not the kernels' (effattn.testing.TOLERANCES bounds one attention call).
def _compare_models(model, patched, inputs, *, atol=2e-5):
    out = model(**inputs).last_hidden_state
    out_p = patched(**inputs).last_hidden_state
    assert out_p.shape == out.shape
    torch.testing.assert_close(out_p, out, atol=atol, rtol=1e-4)
    w = torch.randn_like(out)
    (out * w).sum().backward()
    (out_p * w).sum().backward()
    params = dict(model.named_parameters())
    for name, p in patched.named_parameters():
        g, g_ref = p.grad, params[name].grad
        if g_ref is None:
            assert g is None or not g.any(), name
            continue
        torch.testing.assert_close(g, g_ref, atol=10 * atol, rtol=1e-3, msg=lambda m, name=name: f"grad of {name}: {m}")


CASES = [(a, p, s, t) for a, p, (s, t) in itertools.product(
    ["relative_shift", "factorized"], ["mean", "max"], [(True, True), (True, False), (False, True), (False, False)])]
# The fused layer's kernels: Triton (on CPU through its interpreter, at a few points of each grid) and the
# C++ CPU kernels (CPU tensors only).
KERNEL_BACKENDS = ["triton", "cpp"]


def _kernel_backend(device: str, backend: str) -> str:
    if backend == "cpp" and device != "cpu":
        pytest.skip("the C++ kernels run on CPU tensors (tested on the CPU)")
    return backend


@pytest.mark.parametrize("attention_type,pooling_type,separate_cls,truncate_seq", CASES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.interpreter_subset(attention_type=["relative_shift"], pooling_type=["mean"], separate_cls=[True],
                                truncate_seq=[True])
def test_patched_funnel_model_matches_huggingface(device, backend, attention_type, pooling_type, separate_cls,
                                                  truncate_seq):
    cfg = _config(attention_type, pooling_type, separate_cls, truncate_seq)
    model = FunnelModel(cfg).to(device).eval()
    patched = ef.patch(copy.deepcopy(model), backend=_kernel_backend(device, backend))
    assert ef.is_patched(patched) and not ef.is_patched(model)
    _compare_models(model, patched, _inputs(2, 15, device))


@pytest.mark.parametrize("attention_type", ["relative_shift", "factorized"])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.interpreter_subset(attention_type=[])  # on the interpreter: the FunnelModel case above
def test_patched_funnel_base_model_matches_huggingface(device, backend, attention_type):
    cfg = _config(attention_type, block_sizes=[1, 2, 1], block_repeats=[1, 1, 2])
    model = FunnelBaseModel(cfg).to(device).eval()
    patched = ef.patch(copy.deepcopy(model), backend=_kernel_backend(device, backend))
    _compare_models(model, patched, _inputs(2, 21, device))


def test_patched_model_under_autocast(device):
    """Mixed precision: projections in bfloat16, parameters in float32 (the kernels get one dtype); on the
    device's compiled kernels (Triton on CUDA, the C++ kernels on CPU)."""
    model = FunnelModel(_config("factorized")).to(device).eval()
    patched = ef.patch(copy.deepcopy(model), backend="triton" if device == "cuda" else "cpp")
    inputs = _inputs(2, 13, device)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        expected = model(**inputs).last_hidden_state
        got = patched(**inputs).last_hidden_state
    assert got.dtype == expected.dtype
    torch.testing.assert_close(got.float(), expected.float(), atol=6e-2, rtol=6e-2)
    got.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in patched.parameters() if p.requires_grad
               and p.grad is not None)


@pytest.mark.parametrize("attention_type", ["relative_shift", "factorized"])
@pytest.mark.interpreter_subset(attention_type=["factorized"])
def test_patched_pool_q_only_false(device, attention_type):
    cfg = _config(attention_type, pool_q_only=False)
    model = FunnelBaseModel(cfg).to(device).eval()
    _compare_models(model, ef.patch(copy.deepcopy(model), backend="triton"), _inputs(2, 14, device))


def test_large_funnel_width_runs_on_triton(device):
    """d_model 1024 (Funnel large/xlarge): 64 + 1024 + 4 QK features, a wide tile class, half precision."""
    cfg = _config("relative_shift", d_model=1024, n_head=1, d_head=64, d_inner=32, block_sizes=[1, 1],
                  num_decoder_layers=1)
    model = FunnelBaseModel(cfg).to(device, torch.float16).eval()
    patched = ef.patch(copy.deepcopy(model), backend="triton")
    inputs = _inputs(2, 9, device)
    torch.testing.assert_close(patched(**inputs).last_hidden_state.float(),
                               model(**inputs).last_hidden_state.float(), atol=3e-2, rtol=3e-2)


def test_patched_reference_backend_on_cpu():
    cfg = _config("relative_shift")
    model = FunnelModel(cfg).eval()
    _compare_models(model, ef.patch(copy.deepcopy(model), backend="reference"), _inputs(3, 12, "cpu"))


def test_patch_unpatch_and_errors():
    model = FunnelModel(_config()).eval()
    inputs = _inputs(2, 9, "cpu")
    ref = model(**inputs).last_hidden_state
    ef.patch(model, backend="reference")
    with pytest.raises(ValueError, match="output_attentions"):
        model(**inputs, output_attentions=True)
    ef.unpatch(model)
    assert not ef.is_patched(model)
    torch.testing.assert_close(model(**inputs, output_attentions=True).last_hidden_state, ref, atol=0, rtol=0)
    with pytest.raises(ValueError, match="no FunnelRelMultiheadAttention"):
        ef.patch(torch.nn.Linear(2, 2))


class _PairShapes(TorchDispatchMode):
    """Records every tensor produced whose shape holds two sequence lengths (a pairwise tensor)."""

    def __init__(self, lengths):
        super().__init__()
        self.lengths, self.seen = set(lengths), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and sum(s in self.lengths for s in t.shape) >= 2:
                self.seen.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.interpreter_subset(backend=[])  # the Triton launchers' buffers: tests/kernels/test_relpos_attn.py
def test_no_pairwise_tensor_is_formed(device, backend):
    """Forward and backward of the patched model never build a (Tq, Tk)-shaped tensor; the unpatched one does."""
    T = 43
    lengths = {43, 22, 11}  # the blocks' sequence lengths (separate_cls, truncate); no other dim takes them
    cfg = _config("relative_shift")
    model = FunnelModel(cfg).to(device).eval()
    inputs = _inputs(2, T, device)
    with _PairShapes(lengths) as unpatched:
        model(**inputs).last_hidden_state.sum().backward()
    assert unpatched.seen, "the checker must see Hugging Face's T x T tensors"
    ef.patch(model, backend=_kernel_backend(device, backend))
    model.zero_grad()
    with _PairShapes(lengths) as patched:
        model(**inputs).last_hidden_state.sum().backward()
    assert not patched.seen, patched.seen[:5]


def _funnel_from_effattn_parts(model, input_ids, attention_mask, token_type_ids, backend):
    """Funnel's encoder-decoder written with effattn's parts, taking the weights of a Hugging Face model:
    effattn.nn.pool_sequence / stride_select / pool_attention_mask for the pooling layers,
    FunnelRelAttention for every attention, upsample for the decoder (Hugging Face's FFNs reused)."""
    cfg = model.config
    flags = dict(separate_cls=cfg.separate_cls, truncate=cfg.truncate_seq)

    def attention(hf_layer, query, kv, q_pos, k_pos, q_types, k_types, mask):
        layer = enn.FunnelRelAttention(cfg.d_model, cfg.n_head, cfg.d_head, layer_norm_eps=cfg.layer_norm_eps,
                                       backend=backend).to(query.device).eval()
        layer.load_state_dict(hf_layer.attention.state_dict())
        out = layer(query, kv, kv, q_pos=q_pos, k_pos=k_pos, q_types=q_types, k_types=k_types,
                    key_padding_mask=mask, separate_cls=cfg.separate_cls)
        return hf_layer.ffn(out)

    T = input_ids.shape[1]
    full = (torch.arange(T, device=input_ids.device), token_type_ids, attention_mask.bool())
    hidden = model.embeddings(input_ids)
    pos, types, mask = full
    for b, block in enumerate(model.encoder.blocks):
        pooling = b > 0 and hidden.size(1) > (2 if cfg.separate_cls else 1)
        for i, hf_layer in enumerate(block):
            for r in range(cfg.block_repeats[b]):
                if pooling and i == 0 and r == 0:
                    query = enn.pool_sequence(hidden, mode=cfg.pooling_type, **flags)
                    q_pos, q_types = enn.stride_select(pos, dim=0, **flags), enn.stride_select(types, dim=1, **flags)
                    hidden = attention(hf_layer, query, hidden, q_pos, pos, q_types, types, mask)
                    pos, types, mask = q_pos, q_types, enn.pool_attention_mask(mask, **flags)
                else:
                    hidden = attention(hf_layer, hidden, hidden, pos, pos, types, types, mask)
        if b == 0:
            first_block = hidden
    hidden = enn.upsample(hidden, stride=2 ** (len(cfg.block_sizes) - 1), target_len=T, **flags) + first_block
    for hf_layer in model.decoder.layers:
        hidden = attention(hf_layer, hidden, hidden, full[0], full[0], full[1], full[1], full[2])
    return hidden


@pytest.mark.parametrize("attention_type,pooling_type,separate_cls,truncate_seq",
                         [("relative_shift", "max", True, True), ("factorized", "mean", True, False),
                          ("relative_shift", "mean", False, True)])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.interpreter_subset(attention_type=["relative_shift"], pooling_type=["max"])
def test_encoder_decoder_built_from_effattn_parts(device, backend, attention_type, pooling_type, separate_cls,
                                                  truncate_seq):
    cfg = _config(attention_type, pooling_type, separate_cls, truncate_seq, num_decoder_layers=2)
    model = FunnelModel(cfg).to(device).eval()
    inputs = _inputs(2, 19, device)
    expected = model(**inputs).last_hidden_state
    got = _funnel_from_effattn_parts(model, **inputs, backend=_kernel_backend(device, backend))
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# the building blocks, against Hugging Face's helpers and against the formulas written out
# ----------------------------------------------------------------------------------------------
def test_fused_layer_matches_huggingface_layer():
    cfg = _config()
    hf = mf.FunnelRelMultiheadAttention(cfg, block_index=0).eval()
    for p in hf.parameters():
        torch.nn.init.normal_(p, std=0.3)
    layer = enn.FunnelRelAttention(cfg.d_model, cfg.n_head, cfg.d_head, layer_norm_eps=cfg.layer_norm_eps,
                                   backend="reference").eval()
    layer.load_state_dict(hf.state_dict())
    x = torch.randn(2, 11, cfg.d_model)
    types = torch.tensor([[2] + [0] * 5 + [1] * 5, [2] + [0] * 10])
    mask = torch.ones(2, 11)
    mask[0, 9:] = 0
    structure = mf.FunnelAttentionStructure(cfg)
    inputs = structure.init_attention_inputs(x, attention_mask=mask, token_type_ids=types)
    (ref,) = hf(x, x, x, inputs)
    pos = torch.arange(11)
    out = layer(x, x, x, q_pos=pos, k_pos=pos, q_types=types, k_types=types, key_padding_mask=mask.bool(),
                separate_cls=True)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_position_features_equal_sinusoid_of_distance():
    c = torch.randn(3, 7, 16, dtype=torch.float64)
    q_pos, k_pos = torch.tensor([-1, 1, 3, 5, 7, 9, 11]), torch.arange(13)
    qf, kf = enn.position_features(c, q_pos, k_pos)
    inv_freq = 1.0 / 10000 ** (torch.arange(8, dtype=torch.float64) / 8)
    d = (q_pos[:, None] - k_pos[None, :]).to(torch.float64)[..., None] * inv_freq  # (Tq, Tk, 8)
    pe = torch.cat([torch.sin(d), torch.cos(d)], -1)
    expected = torch.einsum("biD,ijD->bij", c, pe)
    torch.testing.assert_close(qf @ kf.to(torch.float64).T, expected, atol=1e-5, rtol=1e-5)


def test_token_type_features_equal_same_segment_rule():
    B, H, Tq, Tk = 2, 3, 5, 7
    diff, same = torch.randn(B, H, Tq, dtype=torch.float64), torch.randn(B, H, Tq, dtype=torch.float64)
    q_types, k_types = torch.randint(0, 4, (B, Tq)), torch.randint(0, 4, (B, Tk))
    qf, kf = enn.token_type_features(diff, same, q_types, k_types, n_types=4)
    is_same = (q_types[:, :, None] == k_types[:, None]) | (q_types[:, :, None] == 2) | (k_types[:, None] == 2)
    expected = torch.where(is_same[:, None], same[..., None], diff[..., None])
    torch.testing.assert_close(qf @ kf.to(torch.float64)[:, None].transpose(-1, -2), expected)


@pytest.mark.parametrize("separate_cls,truncate_seq", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("T", [1, 2, 7, 8])
def test_pooling_helpers_match_huggingface(separate_cls, truncate_seq, T):
    cfg = _config(separate_cls=separate_cls, truncate_seq=truncate_seq)
    structure = mf.FunnelAttentionStructure(cfg)
    kw = dict(separate_cls=separate_cls, truncate=truncate_seq)
    x = torch.randn(2, T, 5)
    for mode in ("mean", "max"):
        torch.testing.assert_close(enn.pool_sequence(x, mode=mode, **kw), structure.pool_tensor(x, mode=mode))
    types = torch.randint(0, 3, (2, T))
    assert torch.equal(enn.stride_select(types, dim=1, **kw), structure.stride_pool(types, 1))
    mask = (torch.rand(2, T) > 0.3).float()
    torch.testing.assert_close(enn.pool_attention_mask(mask, **kw), structure.pool_tensor(mask, mode="min"))


@pytest.mark.parametrize("separate_cls,truncate_seq", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("T,stride", [(9, 4), (16, 4), (7, 2), (5, 1)])
def test_upsample_matches_huggingface(separate_cls, truncate_seq, T, stride):
    n_pooled = max(1, math.ceil(T / stride)) + 1
    x = torch.randn(2, n_pooled, 6)
    expected = mf.upsample(x, stride, T, separate_cls=separate_cls, truncate_seq=truncate_seq)
    got = enn.upsample(x, stride=stride, target_len=T, separate_cls=separate_cls, truncate=truncate_seq)
    torch.testing.assert_close(got, expected)


# ----------------------------------------------------------------------------------------------
# the two routes of funnel_attention: "band" (effattn.relpos_attention, the default) and "features"
# ----------------------------------------------------------------------------------------------
ROUTE_CASES = [(a, s, t, q) for a, (s, t), q in itertools.product(
    ["relative_shift", "factorized"], [(True, True), (True, False), (False, True)], [True, False])]


@pytest.mark.parametrize("attention_type,separate_cls,truncate_seq,pool_q_only", ROUTE_CASES)
@pytest.mark.parametrize("route,backend", [("band", "cpp"), ("features", "reference")])
def test_routes_match_huggingface(attention_type, separate_cls, truncate_seq, pool_q_only, route, backend):
    """Random weights (not the near-zero init), token types, padding, pooling: outputs and every gradient."""
    cfg = _config(attention_type, "mean", separate_cls, truncate_seq, pool_q_only=pool_q_only)
    model = FunnelModel(cfg).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    with ef_skip():
        _compare_models(model, ef.patch(copy.deepcopy(model), backend=backend, route=route), _inputs(3, 19, "cpu"))


def ef_skip():
    from tests.helpers import skip_if_unsupported
    return skip_if_unsupported()


def test_band_geometry_and_fallback():
    from effattn.nn.funnel import band_geometry
    pos = torch.arange(9)
    assert band_geometry(pos, pos) == (1, 1, 0)
    pooled = enn.stride_select(pos, dim=0)  # [0, 1, 3, 5, 7]: [cls] + every other token
    rs, sk, off = band_geometry(pooled, pos, separate_cls=True)
    assert rs == 2 and sk == 1
    i, j = torch.arange(1, 5)[:, None], torch.arange(1, 9)[None, :]
    assert torch.equal(pooled[1:][:, None] - pos[1:][None, :], sk * (rs * i - j) + off)
    assert isinstance(band_geometry(torch.tensor([0, 1, 3]), pos), str)
    # uneven positions: the default route falls back to the features, route="band" refuses
    cfg = _config()
    layer = enn.FunnelRelAttention(cfg.d_model, cfg.n_head, cfg.d_head, backend="reference").eval()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(1, 3, cfg.d_model)
    qp = torch.tensor([0, 1, 3])
    out = layer(x, x, x, q_pos=qp, k_pos=qp)
    layer.route = "features"
    torch.testing.assert_close(out, layer(x, x, x, q_pos=qp, k_pos=qp))
    layer.route = "band"
    with pytest.raises(ValueError, match="evenly spaced"):
        layer(x, x, x, q_pos=qp, k_pos=qp)


@pytest.mark.parametrize("attention_type", ["relative_shift", "factorized"])
def test_layer_flops_of_eager_layer_match_flop_counter(attention_type):
    from torch.utils.flop_counter import FlopCounterMode

    from effattn.profile import funnel_layer_flops
    cfg = _config(attention_type, d_model=64, n_head=4, d_head=16)
    hf = mf.FunnelRelMultiheadAttention(cfg, block_index=0).eval()
    T, B = 24, 2
    x = torch.randn(B, T, cfg.d_model)
    types = torch.zeros(B, T, dtype=torch.long)
    structure = mf.FunnelAttentionStructure(cfg)
    inputs = structure.init_attention_inputs(x, token_type_ids=types)
    with FlopCounterMode(display=False) as counter:
        hf(x, x, x, inputs)
    rel_len = inputs[0][0][0].shape[0] if attention_type == "relative_shift" else None
    expected = funnel_layer_flops(batch=B, Tq=T, Tk=T, d_model=cfg.d_model, n_head=cfg.n_head, d_head=cfg.d_head,
                                  impl=attention_type, rel_len=rel_len)
    assert counter.get_total_flops() == expected
    # the fused band layer at Funnel's base shape costs at most 1.25x Hugging Face's relative_shift layer
    band = funnel_layer_flops(batch=1, Tq=512, Tk=1024, d_model=768, n_head=12, d_head=64, impl="band", rel_stride=2)
    # Hugging Face's table for that layer (relative_pos with shift 2): 2 * Tq + Tk relative positions
    eager = funnel_layer_flops(batch=1, Tq=512, Tk=1024, d_model=768, n_head=12, d_head=64, impl="relative_shift",
                               rel_len=2048)
    assert band <= 1.25 * eager
