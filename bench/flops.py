"""FLOP counts of attention in the harness's terms (causal flag, mode), from :mod:`effattn.profile`.

:mod:`effattn.profile` is the one statement of the convention (FlashAttention's): two matrix products
per visible (query, key) pair, ``S = Q K^T`` and ``O = P V``, of ``2 * D`` FLOPs each, so
``4 * B * Hq * D * pairs`` forward; softmax and masking are not counted; the backward counts 2.5
times the forward (five products), forward plus backward 3.5 times. Causal attention counts only
the visible pairs, exactly: with the diagonal aligned to the bottom-right corner, query ``i`` sees
keys ``j <= i + Tk - Tq`` (``Tq (Tq + 1) / 2`` pairs when ``Tq == Tk``, not ``Tq**2 / 2``).
"""

from __future__ import annotations

MODES = ("fwd", "bwd", "fwd+bwd")


def visible_pairs(seqlen_q: int, seqlen_k: int, causal: bool) -> int:
    """Number of (query, key) pairs that take part in attention, per batch element and head: ``Tq * Tk``,
    or causal (bottom-right aligned) :func:`effattn.profile.visible_pairs` with a right window of 0."""
    from effattn.profile import visible_pairs as profile_pairs

    if seqlen_q < 0 or seqlen_k < 0:
        raise ValueError(f"sequence lengths must be >= 0, got Tq={seqlen_q}, Tk={seqlen_k}")
    if not causal:
        return seqlen_q * seqlen_k
    return profile_pairs(seqlen_q, seqlen_k, window_right=0, diag_offset=seqlen_k - seqlen_q)


def attention_flops(batch: int, heads_q: int, seqlen_q: int, seqlen_k: int, headdim: int, causal: bool,
                    mode: str = "fwd") -> int:
    """FLOPs of one attention call ``q (B, Hq, Tq, D)``, ``k, v (B, Hkv, Tk, D)`` in ``mode``
    (:func:`effattn.profile.attention_cost`). GQA does not change the count: every query head still
    attends over ``Tk`` keys."""
    from effattn.profile import attention_cost

    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    cost = attention_cost(batch, heads_q, heads_q, seqlen_q, seqlen_k, headdim, headdim,
                          visible_pairs(seqlen_q, seqlen_k, causal))
    return {"fwd": cost.fwd_flops, "bwd": cost.bwd_flops, "fwd+bwd": cost.fwd_flops + cost.bwd_flops}[mode]


def tflops_per_s(flops: int, ms: float) -> float:
    """Rate in TFLOP/s of ``flops`` done in ``ms`` milliseconds."""
    return flops / (ms * 1e-3) / 1e12
