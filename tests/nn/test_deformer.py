"""DeFormer (effattn.nn.deformer): the decomposed lower layers against separate runs, the split extremes,
the context cache (equal to the packed mode, computed once, LRU, invalidation), gradients, key padding,
and argument errors. Float64 on the reference backend unless a test says otherwise."""

from __future__ import annotations

import pytest
import torch

from effattn.nn.deformer import CachedContext, ContextKey, DeFormerEncoder, EncoderLayer
from effattn.testing import TOLERANCES

D, H, FF = 16, 2, 32
F64 = torch.float64

# float64 throughout: the equalities below hold up to float64 rounding, the table's float64 rows
CLOSE = dict(zip(("atol", "rtol"), TOLERANCES[torch.float64]["fwd"]))
GRAD_CLOSE = dict(zip(("atol", "rtol"), TOLERANCES[torch.float64]["grad"]))


def _model(n_layers=3, split=2, dtype=F64, **kw) -> DeFormerEncoder:
    kw.setdefault("block_size", 16)
    enc = DeFormerEncoder.build(n_layers, D, H, FF, split, **kw).to(dtype)
    with torch.no_grad():  # LayerNorms away from the identity, so that every parameter matters
        for layer in enc.layers:
            for norm in (layer.norm1, layer.norm2):
                norm.weight.add_(0.3 * torch.randn_like(norm.weight))
                norm.bias.add_(0.3 * torch.randn_like(norm.bias))
    return enc.eval()


def _states(*shape, dtype=F64, requires_grad=False):
    return torch.randn(*shape, dtype=dtype).requires_grad_(requires_grad)


def _segments(B, Tq, Tc):
    return torch.cat([torch.zeros(B, Tq, dtype=torch.long), torch.ones(B, Tc, dtype=torch.long)], dim=1)


def _manual(enc, q, c, qm=None, cm=None):
    """DeFormer written out with the layers alone: each segment by itself below the split, jointly above."""
    for layer in enc.layers[:enc.split_layer]:
        q = layer(q, key_padding_mask=qm)
        c = layer(c, key_padding_mask=cm)
    x = torch.cat([q, c.expand(q.shape[0], -1, -1)], dim=1)
    mask = None
    if qm is not None or cm is not None:
        qm = torch.ones(q.shape[:2], dtype=torch.bool) if qm is None else qm
        cm = torch.ones(c.shape[:2], dtype=torch.bool) if cm is None else cm
        mask = torch.cat([qm, cm.expand(q.shape[0], -1)], dim=1)
    for layer in enc.layers[enc.split_layer:]:
        x = layer(x, key_padding_mask=mask)
    return x


def _lower_calls(enc):
    """Lengths of the sequences each lower layer is called on."""
    calls = {i: [] for i in range(enc.split_layer)}
    for i in calls:
        enc.layers[i].register_forward_hook(lambda m, args, out, i=i: calls[i].append(args[0].shape[1]))
    return calls


# ----------------------------------------------------------------------------------------------
# the layer
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_encoder_layer_matches_torch(activation):
    """EncoderLayer is torch's post-LN TransformerEncoderLayer (weights copied), key padding included."""
    ref = torch.nn.TransformerEncoderLayer(D, H, FF, dropout=0.0, activation=activation, batch_first=True,
                                           norm_first=False, dtype=F64).eval()
    ours = EncoderLayer(D, H, FF, activation=activation).to(F64).eval()
    with torch.no_grad():
        ours.qkv.weight.copy_(ref.self_attn.in_proj_weight)
        ours.qkv.bias.copy_(ref.self_attn.in_proj_bias)
        for name in ("out_proj",):
            getattr(ours, name).load_state_dict(getattr(ref.self_attn, name).state_dict())
        for name in ("linear1", "linear2", "norm1", "norm2"):
            getattr(ours, name).load_state_dict(getattr(ref, name).state_dict())
    x = _states(2, 21, D)
    keep = torch.ones(2, 21, dtype=torch.bool)
    keep[1, 15:] = False
    torch.testing.assert_close(ours(x), ref(x))
    out, out_ref = ours(x, key_padding_mask=keep), ref(x, src_key_padding_mask=~keep)
    torch.testing.assert_close(out[keep], out_ref[keep])  # torch's fast path may zero the padded rows


# ----------------------------------------------------------------------------------------------
# packed mode
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("split", [0, 1, 2, 3])
def test_packed_equals_separate_lower_then_joint_upper(split):
    """Packed (block mask below the split) = each segment alone below, jointly above. split 0 is the plain
    joint encoder, split 3 (all layers) encodes question and context fully separately."""
    enc = _model(3, split)
    B, Tq, Tc = 2, 21, 35  # segment boundary inside a 16-block: NONE, FULL and PARTIAL blocks
    q, c = _states(B, Tq, D), _states(B, Tc, D)
    out = enc(torch.cat([q, c], 1), _segments(B, Tq, Tc))
    torch.testing.assert_close(out, _manual(enc, q, c), **CLOSE)
    if split == 0:  # the plain joint encoder, whatever the segments
        x = torch.cat([q, c], 1)
        for layer in enc.layers:
            x = layer(x)
        torch.testing.assert_close(out, x, **CLOSE)
    if split == 3:  # fully separate encoding
        torch.testing.assert_close(out, torch.cat([enc.lower(q), enc.lower(c)], 1), **CLOSE)
    kinds = enc.segment_mask(_segments(B, Tq, Tc)).block_kinds()
    assert {0, 1, 2} <= set(kinds.unique().tolist())  # the kernel skips the cross-segment blocks


def test_lower_layers_decompose_any_segment_layout():
    """Interleaved segments (three ids, any order): each token's lower-layer state is that of its segment
    encoded alone."""
    enc = _model(2, 2)
    B, T = 2, 40
    seg = torch.randint(0, 3, (B, T))
    x = _states(B, T, D)
    out = enc(x, seg)
    for b in range(B):
        for s in range(3):
            idx = (seg[b] == s).nonzero().squeeze(1)
            alone = enc.lower(x[b:b + 1, idx])
            torch.testing.assert_close(out[b:b + 1, idx], alone, **CLOSE)


def test_key_padding_packed():
    """Padded question and context tokens (garbage values) change nothing on the real tokens: each row
    equals the unpadded example alone; the cached mode with the same masks equals the packed mode."""
    enc = _model(3, 2)
    B, Tq, Tc = 2, 9, 30
    q_len, c_len = [9, 5], [30, 21]
    q, c = _states(B, Tq, D), _states(B, Tc, D)
    qm = torch.arange(Tq)[None] < torch.tensor(q_len)[:, None]
    cm = torch.arange(Tc)[None] < torch.tensor(c_len)[:, None]
    q = q.masked_fill(~qm[..., None], 1e3)
    c = c.masked_fill(~cm[..., None], -1e3)
    out = enc(torch.cat([q, c], 1), _segments(B, Tq, Tc), torch.cat([qm, cm], 1))
    assert torch.isfinite(out).all()
    for b in range(B):
        lq, lc = q_len[b], c_len[b]
        alone = enc(torch.cat([q[b:b + 1, :lq], c[b:b + 1, :lc]], 1), _segments(1, lq, lc))
        torch.testing.assert_close(out[b:b + 1, :lq], alone[:, :lq], **CLOSE)
        torch.testing.assert_close(out[b:b + 1, Tq:Tq + lc], alone[:, lq:], **CLOSE)
    key = enc.encode_context(c, cm)
    cached = enc.forward_question(q, key, question_padding_mask=qm)
    torch.testing.assert_close(cached, out, **CLOSE)
    torch.testing.assert_close(cached, _manual(enc, q, c, qm, cm), **CLOSE)


def test_packed_gradients():
    """Training in packed mode: gradients of the input and of every parameter equal those of the written-out
    decomposition (so the block-sparse backward is right), and dropout runs."""
    enc = _model(3, 2).train()
    B, Tq, Tc = 2, 11, 23
    q, c = _states(B, Tq, D, requires_grad=True), _states(B, Tc, D, requires_grad=True)
    w = torch.randn(B, Tq + Tc, D, dtype=F64)
    params = list(enc.parameters())
    out = enc(torch.cat([q, c], 1), _segments(B, Tq, Tc))
    grads = torch.autograd.grad((out * w).sum(), [q, c, *params])
    ref = torch.autograd.grad((_manual(enc, q, c) * w).sum(), [q, c, *params])
    for (name, _), g, r in zip([("q", 0), ("c", 0), *enc.named_parameters()], grads, ref):
        torch.testing.assert_close(g, r, **GRAD_CLOSE, msg=lambda m, name=name: f"grad of {name}: {m}")
    assert all(g.abs().sum() > 0 for g in grads)

    enc_drop = _model(3, 2, dropout=0.2).train()
    out = enc_drop(torch.cat([q, c], 1), _segments(B, Tq, Tc))
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in enc_drop.parameters())


# ----------------------------------------------------------------------------------------------
# cached mode
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("context_batch", [1, 2])
def test_cached_equals_packed_and_context_is_computed_once(context_batch):
    enc = _model(3, 2)
    B, Tc = 2, 27
    c = _states(context_batch, Tc, D)
    calls = _lower_calls(enc)
    key = enc.encode_context(c)
    assert isinstance(key, ContextKey)
    assert enc.cache_info()[:4] == (0, 1, 1, enc.cache_size)
    for i, Tq in enumerate([5, 12, 19]):
        q = _states(B, Tq, D)
        out = enc.forward_question(q, key)
        assert out.shape == (B, Tq + Tc, D)
        packed = enc(torch.cat([q, c.expand(B, -1, -1)], 1), _segments(B, Tq, Tc))
        torch.testing.assert_close(out, packed, **CLOSE)
        assert enc.cache_info().hits == i + 1
    out = enc.forward_question(q, c)  # the states themselves: found in the cache by their bytes
    torch.testing.assert_close(out, packed, **CLOSE)
    assert enc.encode_context(c.clone()) == key
    info = enc.cache_info()
    assert (info.hits, info.misses, info.size) == (5, 1, 1)
    for i in range(enc.split_layer):  # the context went through each lower layer exactly once
        assert calls[i].count(Tc) == 1, calls[i]


def test_cache_key_and_invalidation():
    """A changed context, padding mask, lower-layer parameter or train/eval flag misses; a stale key raises;
    changing an upper layer keeps the cache (the cached states do not depend on it)."""
    enc = _model(3, 2)
    c, q = _states(1, 20, D), _states(2, 7, D)
    key = enc.encode_context(c)
    assert enc.encode_context(c + 1e-9) != key
    assert enc.encode_context(c, torch.ones(1, 20, dtype=torch.bool)) != key
    assert enc.cache_info().misses == 3

    with torch.no_grad():  # an upper layer changes: still a hit, and the output follows the new weights
        enc.layers[2].linear1.weight.mul_(1.5)
    assert enc.encode_context(c) == key and enc.cache_info().hits == 1
    torch.testing.assert_close(enc.forward_question(q, key), _manual(enc, q, c), **CLOSE)

    version = enc.parameter_version
    with torch.no_grad():  # a lower layer changes in place: every entry is dropped
        enc.layers[1].linear2.bias.add_(0.1)
    assert enc.parameter_version == version + 1
    info = enc.cache_info()
    assert (info.size, info.invalidations) == (0, 1)
    with pytest.raises(KeyError, match="stale"):
        enc.forward_question(q, key)
    key2 = enc.encode_context(c)
    assert key2 != key and key2.version == version + 1
    torch.testing.assert_close(enc.forward_question(q, key2), _manual(enc, q, c), **CLOSE)

    enc.layers[0].qkv.weight.grad = torch.randn_like(enc.layers[0].qkv.weight)
    for change in (lambda: enc.train(),  # dropout modules switch mode
                   lambda: enc.load_state_dict(_model(3, 2).state_dict()),
                   lambda: torch.optim.SGD(enc.layers[0].parameters(), lr=0.1).step()):
        misses = enc.cache_info().misses
        change()
        assert enc.encode_context(c) not in (key, key2)
        assert enc.cache_info().misses == misses + 1


def test_context_id_and_lru_eviction():
    enc = _model(2, 1, cache_size=2)
    ctx = [_states(1, 18, D) for _ in range(3)]
    ids = torch.arange(18)[None]
    k_id = enc.encode_context(ctx[0], context_id=ids)  # keyed by the token ids, not the states
    assert enc.encode_context(ctx[0], context_id=ids.clone()) == k_id
    assert enc.encode_context(ctx[0], context_id=ids + 1) != k_id
    enc.clear_cache()
    assert enc.cache_info() == (0, 0, 0, 2, 0, 0)
    with pytest.raises(KeyError, match="not in the cache"):
        enc.cached_context(k_id)

    k0, k1 = enc.encode_context(ctx[0]), enc.encode_context(ctx[1])
    assert isinstance(enc.cached_context(k0), CachedContext)  # k0 becomes the most recently used
    k2 = enc.encode_context(ctx[2])  # evicts k1
    info = enc.cache_info()
    assert (info.size, info.evictions) == (2, 1)
    q = _states(1, 6, D)
    with pytest.raises(KeyError, match="evicted"):
        enc.forward_question(q, k1)
    for k, c in ((k0, ctx[0]), (k2, ctx[2])):
        torch.testing.assert_close(enc.forward_question(q, k), _manual(enc, q, c), **CLOSE)


def test_upper_layers_read_the_cached_states():
    """The upper layers take the cached tensor itself: perturbing it changes every output row (question
    rows too, through joint attention) and the result is the joint run over the perturbed states."""
    enc = _model(3, 1)
    c, q = _states(1, 20, D), _states(2, 8, D)
    key = enc.encode_context(c)
    before = enc.forward_question(q, key)
    states = enc.cached_context(key).states
    states.add_(0.5 * torch.randn_like(states))
    after = enc.forward_question(q, key)
    assert (after[:, :8] - before[:, :8]).abs().amin(-1).gt(1e-6).all()
    joint = enc.upper(torch.cat([enc.lower(q), states.expand(2, -1, -1)], 1))
    torch.testing.assert_close(after, joint, **CLOSE)
    enc_sep = _model(2, 2)  # no upper layer: the question rows cannot see the context
    key = enc_sep.encode_context(c)
    before = enc_sep.forward_question(q, key)
    enc_sep.cached_context(key).states.add_(1.0)
    torch.testing.assert_close(enc_sep.forward_question(q, key)[:, :8], before[:, :8])


def test_cached_mode_gradients_skip_the_context():
    """Cached states are detached: no gradient reaches the context; the question's and the upper layers'
    gradients equal the packed mode's (the question's lower path never reads the context)."""
    enc = _model(3, 2).train()
    B, Tq, Tc = 2, 9, 22
    c = _states(1, Tc, D, requires_grad=True)
    q = _states(B, Tq, D, requires_grad=True)
    w = torch.randn(B, Tq + Tc, D, dtype=F64)
    out = enc.forward_question(q, c)
    assert not enc.cached_context(enc.encode_context(c)).states.requires_grad
    upper = list(enc.upper_layers.parameters())
    dq, *d_upper = torch.autograd.grad((out * w).sum(), [q, *upper], retain_graph=True)
    assert c.grad is None
    packed = enc(torch.cat([q, c.expand(B, -1, -1)], 1), _segments(B, Tq, Tc))
    dq_ref, *d_upper_ref = torch.autograd.grad((packed * w).sum(), [q, *upper])
    torch.testing.assert_close(dq, dq_ref, **GRAD_CLOSE)
    for g, r in zip(d_upper, d_upper_ref):
        torch.testing.assert_close(g, r, **GRAD_CLOSE)
    out.sum().backward()  # the lower layers get gradients through the question
    assert all(p.grad is not None for p in enc.lower_layers.parameters())


def test_triton_backend_interpreted():
    """The packed and cached modes on the Triton kernels (interpreted on CPU) against the reference."""
    kw = dict(block_size=16)
    ref = DeFormerEncoder.build(2, 32, 2, 32, 1, **kw).eval()
    tri = DeFormerEncoder.build(2, 32, 2, 32, 1, backend="triton", **kw).eval()
    tri.load_state_dict(ref.state_dict())
    B, Tq, Tc = 1, 10, 22
    q, c = torch.randn(B, Tq, 32), torch.randn(B, Tc, 32)
    x, seg = torch.cat([q, c], 1), _segments(B, Tq, Tc)
    expected = ref(x, seg)
    atol, rtol = TOLERANCES[torch.float32]["fwd"]
    torch.testing.assert_close(tri(x, seg), expected, atol=atol, rtol=rtol)
    torch.testing.assert_close(tri.forward_question(q, c), expected, atol=atol, rtol=rtol)


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------
def test_errors():
    layers = [EncoderLayer(D, H, FF) for _ in range(3)]
    for split in (-1, 4):
        with pytest.raises(ValueError, match=r"split_layer must lie in \[0, 3\]"):
            DeFormerEncoder(layers, split)
    with pytest.raises(TypeError, match="split_layer must be an int"):
        DeFormerEncoder(layers, 1.0)
    with pytest.raises(TypeError, match="layers"):
        DeFormerEncoder(layers[0], 1)
    with pytest.raises(TypeError, match=r"layers\[1\]"):
        DeFormerEncoder([layers[0], "layer"], 1)
    with pytest.raises(ValueError, match="cache_size"):
        DeFormerEncoder(layers, 1, cache_size=0)
    with pytest.raises(ValueError, match="block_size"):
        DeFormerEncoder(layers, 1, block_size=8)
    with pytest.raises(ValueError, match="divide"):
        EncoderLayer(10, 3, 16)
    with pytest.raises(ValueError, match="activation"):
        EncoderLayer(D, H, FF, activation="swish")

    enc = DeFormerEncoder(layers, 2, block_size=16).eval()
    x, seg = torch.randn(2, 12, D), _segments(2, 5, 7)
    with pytest.raises(ValueError, match=r"segment_ids must have shape \(B, T\) = \(2, 12\)"):
        enc(x, seg[:, :-1])
    with pytest.raises(ValueError, match="segment_ids must have shape"):
        enc(x, seg[0])
    with pytest.raises(TypeError, match="segment_ids must hold integer ids"):
        enc(x, seg.float())
    with pytest.raises(TypeError, match="segment_ids must be"):
        enc(x, [0] * 12)
    with pytest.raises(ValueError, match="3-D"):
        enc(x[0], seg)
    with pytest.raises(ValueError, match="d_model"):
        enc(torch.randn(2, 12, D + 1), seg)
    with pytest.raises(TypeError, match="key_padding_mask must be bool"):
        enc(x, seg, torch.ones(2, 12))
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        enc(x, seg, torch.ones(2, 11, dtype=torch.bool))

    c = torch.randn(1, 7, D)
    key = enc.encode_context(c)
    with pytest.raises(ValueError, match="d_model"):
        enc.forward_question(torch.randn(2, 5, D + 2), key)
    with pytest.raises(ValueError, match="batch"):
        enc.forward_question(torch.randn(3, 5, D), torch.randn(2, 7, D))
    with pytest.raises(ValueError, match="ContextKey"):
        enc.forward_question(torch.randn(2, 5, D), key, context_padding_mask=torch.ones(1, 7, dtype=torch.bool))
    with pytest.raises(TypeError, match="context must be a ContextKey"):
        enc.forward_question(torch.randn(2, 5, D), "context")
    with pytest.raises(ValueError, match="float64"):
        enc.forward_question(torch.randn(2, 5, D, dtype=F64), key)
    with pytest.raises(ValueError, match="question_padding_mask must have shape"):
        enc.forward_question(torch.randn(2, 5, D), key, question_padding_mask=torch.ones(2, 7, dtype=torch.bool))
    with pytest.raises(TypeError, match="context_id must be hashable"):
        enc.encode_context(c, context_id=[1, 2])
