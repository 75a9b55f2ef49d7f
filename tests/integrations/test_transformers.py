"""``attn_implementation="effattn"`` (effattn.integrations.transformers) against transformers' ``"sdpa"``.

Tiny random-weight models built here (no downloads), on the CPU (the C++ kernels), one set of weights
per comparison: a model is run on ``"sdpa"``, switched with ``set_attn_implementation``, and run again.
Outputs are compared on non-padded positions only (a query row that sees no key is 0 in effattn).
"""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys

import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    BartConfig,
    BertConfig,
    Gemma2Config,
    LlamaConfig,
    MistralConfig,
    T5Config,
)
from transformers import masking_utils as mu
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

import effattn
from effattn.integrations import transformers as hf

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only contend under pytest -n

VOCAB, PAD = 99, 0
SIZES = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
             max_position_embeddings=64)


def _config(family: str, **kw):
    if family == "bert":
        return BertConfig(**{**SIZES, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, **kw})
    if family == "llama":
        return LlamaConfig(**SIZES, num_key_value_heads=2, pad_token_id=PAD, **kw)
    if family == "mistral":
        return MistralConfig(**SIZES, num_key_value_heads=2, sliding_window=5, pad_token_id=PAD, **kw)
    if family == "bart":
        return BartConfig(vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                          decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                          max_position_embeddings=64, dropout=0.0, attention_dropout=0.0, pad_token_id=PAD,
                          bos_token_id=1, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None, **kw)
    raise ValueError(family)


_AUTO = {"bert": AutoModel, "llama": AutoModelForCausalLM, "mistral": AutoModelForCausalLM,
         "bart": AutoModelForSeq2SeqLM}


def _model(family: str, attn_implementation="sdpa", **kw):
    torch.manual_seed(0)
    return _AUTO[family].from_config(_config(family, **kw), attn_implementation=attn_implementation).eval()


def _ids_and_mask(padding: str, B=3, T=13, pads=(0, 4, 7)):
    """Token ids and a 2-D mask (None without padding); row b has pads[b] padded positions."""
    ids = torch.randint(3, VOCAB, (B, T))
    if padding == "none":
        return ids, None
    mask = torch.ones(B, T, dtype=torch.long)
    for b, p in enumerate(pads):
        if p:
            if padding == "right":
                mask[b, T - p:] = 0
            else:
                mask[b, :p] = 0
    ids[mask == 0] = PAD
    return ids, mask


def _inputs(family: str, padding: str):
    ids, mask = _ids_and_mask(padding)
    inputs = dict(input_ids=ids, attention_mask=mask)
    if family == "bart":  # a decoder of another (odd) length: cross-attention with Tq != Tk
        dec, dec_mask = _ids_and_mask(padding, T=9, pads=(0, 2, 3))
        inputs.update(decoder_input_ids=dec, decoder_attention_mask=dec_mask)
    return inputs


def _outputs(family: str, model, inputs) -> list[torch.Tensor]:
    """The model's outputs on non-padded positions (flattened over batch and position)."""
    out = model(**inputs)

    def valid(x, mask):
        return x.flatten(0, 1) if mask is None else x[mask.bool()]

    if family == "bert":
        return [valid(out.last_hidden_state, inputs["attention_mask"])]
    if family == "bart":
        return [valid(out.logits, inputs["decoder_attention_mask"]),
                valid(out.encoder_last_hidden_state, inputs["attention_mask"])]
    return [valid(out.logits, inputs["attention_mask"])]


@pytest.fixture
def calls(monkeypatch):
    """The keyword arguments of every call the integration makes to effattn: ``{"flash": [...], "sdpa": [...]}``."""
    seen = {"flash": [], "sdpa": []}
    flash, sdpa = effattn.flash_attention, effattn.scaled_dot_product_attention

    def flash_spy(q, k, v, **kw):
        seen["flash"].append(kw)
        return flash(q, k, v, **kw)

    def sdpa_spy(q, k, v, **kw):
        seen["sdpa"].append(kw)
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(effattn, "flash_attention", flash_spy)
    monkeypatch.setattr(effattn, "scaled_dot_product_attention", sdpa_spy)
    return seen


# ----------------------------------------------------------------------------------------------
# whole models against "sdpa"
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("padding", ["none", "right", "left"])
@pytest.mark.parametrize("family", ["bert", "llama", "mistral", "bart"])
def test_outputs_and_gradients_match_sdpa(family, padding, calls):
    model = _model(family)
    inputs = _inputs(family, padding)
    results = {}
    for impl in ("sdpa", "effattn"):
        model.set_attn_implementation(impl)
        assert model.config._attn_implementation == impl
        model.zero_grad()
        outs = _outputs(family, model, inputs)
        sum(o.square().mean() for o in outs).backward()
        results[impl] = [o.detach() for o in outs], {n: p.grad.clone() for n, p in model.named_parameters()
                                                     if p.grad is not None}
    (ref, ref_grads), (got, got_grads) = results["sdpa"], results["effattn"]
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert got_grads.keys() == ref_grads.keys() and len(got_grads) > 10
    for name in got_grads:
        torch.testing.assert_close(got_grads[name], ref_grads[name], rtol=1e-5, atol=1e-5, msg=name)
    assert calls["flash"] and not calls["sdpa"]  # every attention of these models is fused
    padded = [kw["key_padding_mask"] is not None for kw in calls["flash"]]
    assert any(padded) == (padding != "none")


@pytest.mark.parametrize("family", ["llama", "mistral", "bart"])
def test_greedy_generate_matches_sdpa(family, calls):
    model = _model(family)
    ids, mask = _ids_and_mask("left" if family != "bart" else "right", T=7, pads=(0, 2, 4))
    tokens = {}
    for impl in ("sdpa", "effattn"):
        model.set_attn_implementation(impl)
        tokens[impl] = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8,
                                      do_sample=False, pad_token_id=PAD)
    assert torch.equal(tokens["effattn"], tokens["sdpa"])
    assert tokens["effattn"].shape[1] == (1 if family == "bart" else ids.shape[1]) + 8  # past Mistral's window of 5
    assert calls["flash"] and not calls["sdpa"]  # prefill and every decode step fused
    padded = [kw["key_padding_mask"] is not None for kw in calls["flash"]]
    if family == "llama":
        assert all(padded)  # the left padding, in every decode step too
    if family == "mistral":
        assert {kw["window"] for kw in calls["flash"]} == {(4, 0)}
        assert padded[0] and not padded[-1]  # the cache's window has moved past the padding


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_greedy_generate_with_static_cache(family, calls):
    """A StaticCache: generate builds the masks ahead (passed through), keys past the query are cut off."""
    model = _model(family)
    ids, mask = _ids_and_mask("left", T=7, pads=(0, 2, 4))
    tokens = {}
    for impl in ("sdpa", "effattn"):
        model.set_attn_implementation(impl)
        tokens[impl] = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8,
                                      do_sample=False, pad_token_id=PAD, cache_implementation="static")
    assert torch.equal(tokens["effattn"], tokens["sdpa"])
    assert len(calls["flash"]) == 8 * 2 and not calls["sdpa"]


def test_from_pretrained_and_from_config(tmp_path):
    model = _model("llama")
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="effattn").eval()
    assert loaded.config._attn_implementation == "effattn"
    assert _model("llama", "effattn").config._attn_implementation == "effattn"
    ids, mask = _ids_and_mask("left")
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        got = loaded(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], ref[mask.bool()], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_half_precision(family, dtype):
    model = _model(family).to(dtype)
    inputs = _inputs(family, "right")
    outs = {}
    with torch.no_grad():
        for impl in ("sdpa", "effattn"):
            model.set_attn_implementation(impl)
            outs[impl] = _outputs(family, model, inputs)[0]
    assert outs["effattn"].dtype == dtype
    torch.testing.assert_close(outs["effattn"].float(), outs["sdpa"].float(), rtol=2e-2, atol=2e-2)


def test_dropout_in_training(calls):
    model = _model("bert", "effattn", attention_probs_dropout_prob=0.3).train()
    ids, mask = _ids_and_mask("right")
    outs = []
    for _ in range(2):
        torch.manual_seed(1)
        outs.append(model(input_ids=ids, attention_mask=mask).last_hidden_state)
    outs[0].square().mean().backward()
    assert all(kw["dropout_p"] == 0.3 for kw in calls["flash"])
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)  # reproducible with torch.manual_seed
    with torch.no_grad():
        evaluated = model.eval()(input_ids=ids, attention_mask=mask).last_hidden_state
    assert not torch.allclose(outs[0], evaluated, atol=1e-3)
    assert calls["flash"][-1]["dropout_p"] == 0.0


# ----------------------------------------------------------------------------------------------
# the mask hand-off: what is fused, what falls back to the SDPA drop-in
# ----------------------------------------------------------------------------------------------
def test_padding_goes_to_key_padding_mask(calls):
    model = _model("bert", "effattn")
    ids, mask = _ids_and_mask("right")
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert len(calls["flash"]) == 2 and not calls["sdpa"]
    for kw in calls["flash"]:
        assert kw["key_padding_mask"].dtype == torch.bool
        assert torch.equal(kw["key_padding_mask"], mask.bool())
        assert kw["causal"] is False and kw["window"] is None


def _compare_with_sdpa(model, **inputs):
    outs = {}
    with torch.no_grad():
        for impl in ("sdpa", "effattn"):
            model.set_attn_implementation(impl)
            outs[impl] = model(**inputs).logits
    torch.testing.assert_close(outs["effattn"], outs["sdpa"], rtol=1e-5, atol=1e-5)


def test_packed_sequences_fall_back_to_sdpa_drop_in(calls):
    model = _model("llama")
    ids = torch.randint(3, VOCAB, (2, 13))
    position_ids = torch.cat([torch.arange(6), torch.arange(7)]).expand(2, -1)  # two documents in each row
    _compare_with_sdpa(model, input_ids=ids, position_ids=position_ids, use_cache=False)  # packing: no cache, no mask
    assert len(calls["sdpa"]) == 2 and not calls["flash"]
    assert calls["sdpa"][0]["attn_mask"].shape == (2, 1, 13, 13)


def test_user_4d_mask_falls_back_to_sdpa_drop_in(calls):
    model = _model("llama")
    ids = torch.randint(3, VOCAB, (2, 11))
    mask = torch.rand(2, 1, 11, 11) < 0.6
    mask |= torch.eye(11, dtype=torch.bool)  # every query sees a key
    _compare_with_sdpa(model, input_ids=ids, attention_mask=mask)
    assert len(calls["sdpa"]) == 2 and not calls["flash"]


def test_position_bias_runs_on_sdpa_drop_in(calls):
    torch.manual_seed(0)
    config = T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=PAD, decoder_start_token_id=PAD)
    model = AutoModelForSeq2SeqLM.from_config(config, attn_implementation="sdpa").eval()
    ids, mask = _ids_and_mask("right")
    dec = torch.randint(3, VOCAB, (3, 9))
    outs = {}
    with torch.no_grad():
        for impl in ("sdpa", "effattn"):
            model.set_attn_implementation(impl)
            outs[impl] = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    torch.testing.assert_close(outs["effattn"], outs["sdpa"], rtol=1e-5, atol=1e-5)
    assert calls["sdpa"] and not calls["flash"]


class _Module(torch.nn.Module):
    is_causal = True


def _sliding(w):
    return mu.sliding_window_causal_mask_function(w)


def _sliding_bidirectional(w):
    return mu.sliding_window_bidirectional_mask_function(w)


# (mask function, q_length, kv_length, q_offset, kv_offset, fused): the offsets the caches give
MASK_CASES = {
    "causal prefill": (mu.causal_mask_function, 13, 13, 0, 0, True),
    "causal decode": (mu.causal_mask_function, 1, 20, 19, 0, True),
    "causal chunk after a cache": (mu.causal_mask_function, 3, 20, 17, 0, True),
    "static cache prefill": (mu.causal_mask_function, 5, 32, 0, 0, True),
    "static cache decode": (mu.causal_mask_function, 1, 32, 9, 0, True),
    "sliding prefill": (_sliding(5), 13, 13, 0, 0, True),
    "sliding decode, full window": (_sliding(5), 1, 5, 20, 16, True),
    "sliding chunk, full window": (_sliding(5), 3, 7, 20, 16, True),
    "sliding decode, window not full": (_sliding(5), 1, 4, 3, 0, True),
    "static sliding cache": (_sliding(4), 2, 8, 3, 0, True),
    "bidirectional": (mu.bidirectional_mask_function, 13, 13, 0, 0, True),
    "cross-attention": (mu.bidirectional_mask_function, 9, 13, 0, 0, True),
    "bidirectional sliding": (_sliding_bidirectional(3), 13, 13, 0, 0, True),
    "bidirectional sliding, misaligned": (_sliding_bidirectional(3), 9, 13, 0, 0, False),
    "sliding, misaligned": (_sliding(5), 2, 3, 10, 0, False),
    "chunked": (mu.chunked_causal_mask_function(4, torch.zeros(3, dtype=torch.long)), 13, 13, 0, 0, False),
    "overlay": (mu.or_masks(mu.causal_mask_function, lambda b, h, q, kv: kv == 0), 13, 13, 0, 0, False),
}


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("case", list(MASK_CASES))
def test_mask_hand_off_matches_dense_mask(case, padded):
    """The fused pattern (key padding + causal + window, keys cut) against transformers' own dense mask."""
    mask_function, Tq, Tk, q_offset, kv_offset, fused = MASK_CASES[case]
    B, Hq, Hkv, D = 3, 4, 2, 16
    padding = None
    if padded:
        padding = torch.ones(B, kv_offset + Tk, dtype=torch.bool)
        padding[1, :2] = False  # left padding
        padding[2, -(1 + Tk // 3):] = False  # right padding (or the unwritten end of a static cache)
    mask = hf.create_mask(B, Tq, Tk, q_offset, kv_offset, mask_function=mask_function, attention_mask=padding)
    assert mask.fused is fused
    q, k, v = torch.randn(B, Hq, Tq, D), torch.randn(B, Hkv, Tk, D), torch.randn(B, Hkv, Tk, D)
    dense = mask.dense()
    assert dense.shape == (B, 1, Tq, Tk)
    got, _ = hf.attention_forward(_Module(), q, k, v, mask)
    ref, _ = hf.attention_forward(_Module(), q, k, v, dense)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=True)
    torch.testing.assert_close(got, expected.transpose(1, 2), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("causal", [True, False])
def test_no_mask_reads_is_causal_and_sliding_window(causal):
    q, k, v = torch.randn(2, 4, 9, 16), torch.randn(2, 4, 9, 16), torch.randn(2, 4, 9, 16)
    module = _Module()
    module.is_causal = causal
    got, _ = hf.attention_forward(module, q, k, v, None, sliding_window=3)
    fn = _sliding(3) if causal else _sliding_bidirectional(3)
    dense = mu.sdpa_mask(2, 9, 9, mask_function=fn, allow_is_causal_skip=False)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    torch.testing.assert_close(got, expected.transpose(1, 2), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# softcap, unsupported arguments
# ----------------------------------------------------------------------------------------------
def _gemma2():
    torch.manual_seed(0)
    config = Gemma2Config(**SIZES, num_key_value_heads=2, head_dim=16, sliding_window=5, attn_logit_softcapping=50.0,
                          final_logit_softcapping=None, query_pre_attn_scalar=16, pad_token_id=PAD)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def test_softcap_is_passed_when_flash_attention_takes_it(monkeypatch):
    seen = []

    def flash_with_softcap(q, k, v, *, softcap=None, **kw):  # a flash_attention that takes softcap
        seen.append(softcap)
        return torch.zeros_like(q)

    monkeypatch.setattr(effattn, "flash_attention", flash_with_softcap)
    model = _gemma2()
    model.set_attn_implementation("effattn")
    with torch.no_grad():
        model(input_ids=torch.randint(3, VOCAB, (1, 7)))
    assert seen == [50.0, 50.0]


SOFTCAP = "softcap" in inspect.signature(effattn.flash_attention).parameters


@pytest.mark.skipif(not SOFTCAP, reason="effattn.flash_attention has no softcap")
def test_softcap_matches_eager():
    model = _gemma2()
    ids, mask = _ids_and_mask("left")
    outs = {}
    with torch.no_grad():
        for impl in ("eager", "effattn"):
            model.set_attn_implementation(impl)
            outs[impl] = model(input_ids=ids, attention_mask=mask).logits[mask.bool()]
    torch.testing.assert_close(outs["effattn"], outs["eager"], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(SOFTCAP, reason="effattn.flash_attention takes softcap")
def test_softcap_without_support_raises():
    model = _gemma2()
    model.set_attn_implementation("effattn")
    with pytest.raises(NotImplementedError, match="softcap"):
        model(input_ids=torch.randint(3, VOCAB, (1, 7)))


def test_softcap_with_dense_mask_raises():
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(NotImplementedError, match="softcap"):
        hf.attention_forward(_Module(), q, q, q, torch.ones(1, 1, 5, 5, dtype=torch.bool), softcap=30.0)


def test_attention_sinks_raise():
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(NotImplementedError, match="s_aux"):
        hf.attention_forward(_Module(), q, q, q, None, s_aux=torch.zeros(2))


def test_mask_for_other_keys_raises():
    q = torch.randn(1, 2, 5, 8)
    mask = hf.create_mask(1, 5, 7, mask_function=mu.causal_mask_function)
    with pytest.raises(ValueError, match="attention_mask is for 7 keys, but key has 5"):
        hf.attention_forward(_Module(), q, q, q, mask)


# ----------------------------------------------------------------------------------------------
# registration, optional dependency
# ----------------------------------------------------------------------------------------------
def test_register_is_idempotent():
    hf.register()
    hf.register()
    assert ALL_ATTENTION_FUNCTIONS["effattn"] is hf.attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS["effattn"] is hf.create_mask
    assert list(ALL_ATTENTION_FUNCTIONS.valid_keys()).count("effattn") == 1
    try:
        hf.unregister()
        assert "effattn" not in AttentionInterface._global_mapping
        assert "effattn" not in AttentionMaskInterface._global_mapping
        with pytest.raises(ValueError, match="effattn"):
            _model("llama", "effattn")
    finally:
        hf.register()
    assert _model("llama", "effattn").config._attn_implementation == "effattn"


def test_import_without_transformers(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "effattn.integrations.transformers")
    with pytest.raises(ImportError, match=r"`transformers` extra"):
        importlib.import_module("effattn.integrations.transformers")


def test_import_effattn_does_not_import_transformers():
    code = "import sys, effattn; assert 'transformers' not in sys.modules, 'transformers imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
