"""FLOP counts of attention, in FlashAttention's convention.

The forward does two matrix products per visible (query, key) pair, ``S = Q K^T`` and ``O = P V``, of
``2 * D`` FLOPs each: ``4 * B * Hq * D * pairs``. Softmax and masking are not counted. The backward
counts 2.5 times the forward (five products instead of two), forward plus backward 3.5 times.

Causal attention counts only the visible pairs, exactly: with the diagonal aligned to the
bottom-right corner, query ``i`` sees keys ``j <= i + Tk - Tq`` (``Tq (Tq + 1) / 2`` pairs when
``Tq == Tk``, not ``Tq**2 / 2``).
"""

from __future__ import annotations

from fractions import Fraction

# FLOPs per visible (query, key) pair and per head-dim element in the forward: 2 products x 2 (mul + add).
FWD_FLOPS_PER_PAIR_PER_DIM = 4
# Work of each benchmark mode relative to the forward.
MODE_FLOP_FACTOR: dict[str, Fraction] = {"fwd": Fraction(1), "bwd": Fraction(5, 2), "fwd+bwd": Fraction(7, 2)}


def visible_pairs(seqlen_q: int, seqlen_k: int, causal: bool) -> int:
    """Number of (query, key) pairs that take part in attention, per batch element and head.

    Dense: ``Tq * Tk``. Causal, bottom-right aligned: query ``i`` sees ``clamp(i + Tk - Tq + 1, 0, Tk)``
    keys; the rows that see any key see ``max(Tk - Tq, 0) + 1, ..., Tk`` keys, one more per row.
    """
    if seqlen_q < 0 or seqlen_k < 0:
        raise ValueError(f"sequence lengths must be >= 0, got Tq={seqlen_q}, Tk={seqlen_k}")
    if not causal:
        return seqlen_q * seqlen_k
    if seqlen_q == 0 or seqlen_k == 0:
        return 0
    first = max(seqlen_k - seqlen_q, 0) + 1  # keys seen by the first row that sees any
    last = seqlen_k  # keys seen by the last row
    return (first + last) * (last - first + 1) // 2


def attention_flops(batch: int, heads_q: int, seqlen_q: int, seqlen_k: int, headdim: int, causal: bool,
                    mode: str = "fwd") -> int:
    """FLOPs of one attention call ``q (B, Hq, Tq, D)``, ``k, v (B, Hkv, Tk, D)`` in ``mode``.

    GQA does not change the count: every query head still attends over ``Tk`` keys.
    """
    try:
        factor = MODE_FLOP_FACTOR[mode]
    except KeyError:
        raise ValueError(f"mode must be one of {sorted(MODE_FLOP_FACTOR)}, got {mode!r}") from None
    fwd = FWD_FLOPS_PER_PAIR_PER_DIM * batch * heads_q * headdim * visible_pairs(seqlen_q, seqlen_k, causal)
    return int(fwd * factor)


def tflops_per_s(flops: int, ms: float) -> float:
    """Rate in TFLOP/s of ``flops`` done in ``ms`` milliseconds."""
    return flops / (ms * 1e-3) / 1e12
