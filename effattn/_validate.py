"""Argument checks shared by effattn's public ops.

Every check runs before any kernel launch and raises ``TypeError`` (wrong kind or dtype) or
``ValueError`` (wrong shape or value) with a message that names the argument and says what was
expected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class QKVShape:
    """Sizes of an attention call: q ``(B, Hq, Tq, Dqk)``, k ``(B, Hkv, Tk, Dqk)``, v ``(B, Hkv, Tk, Dv)``."""

    B: int
    Hq: int
    Hkv: int
    Tq: int
    Tk: int
    Dqk: int
    Dv: int


def check_tensor(name: str, x, ndim: int | None = None, layout: str = "") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_nested or x.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {x.layout}"
                        + (" (nested)" if x.is_nested else ""))
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(x.shape)}")


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, names=("q", "k", "v")) -> QKVShape:
    """Check q ``(B, Hq, Tq, D)``, k ``(B, Hkv, Tk, D)``, v ``(B, Hkv, Tk, Dv)`` and return their sizes."""
    nq, nk, nv = names
    check_tensor(nq, q, 4, "(B, Hq, Tq, D)")
    check_tensor(nk, k, 4, "(B, Hkv, Tk, D)")
    check_tensor(nv, v, 4, "(B, Hkv, Tk, Dv)")
    for name, x in ((nq, q), (nk, k), (nv, v)):
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must have a floating dtype (float16, bfloat16, float32, float64), got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{nq}, {nk}, {nv} must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{nq}, {nk}, {nv} must be on one device, got {q.device}, {k.device}, {v.device}")
    B, Hq, Tq, Dqk = q.shape
    Bk, Hkv, Tk, Dk = k.shape
    if Bk != B or v.shape[0] != B:
        raise ValueError(f"batch size differs: {nq} {tuple(q.shape)}, {nk} {tuple(k.shape)}, {nv} {tuple(v.shape)}")
    if v.shape[1] != Hkv or v.shape[2] != Tk:
        raise ValueError(f"{nk} {tuple(k.shape)} and {nv} {tuple(v.shape)} must agree on (B, Hkv, Tk)")
    if Dk != Dqk:
        raise ValueError(f"head dim of {nq} ({Dqk}) and {nk} ({Dk}) must match")
    if Dqk == 0 or v.shape[3] == 0:
        raise ValueError(f"head dims must be >= 1, got {nq}/{nk} {Dqk} and {nv} {v.shape[3]}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv}) for GQA/MQA")
    return QKVShape(B, Hq, Hkv, Tq, Tk, Dqk, v.shape[3])


def check_scale(scale) -> None:
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")


def check_dropout(dropout_p) -> None:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")


def check_seed(seed) -> None:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise ValueError(f"dropout_seed must be None or an int in [0, 2**63), got {seed!r}")


def window_bounds(window) -> tuple[int, int]:
    """``window=(left, right)`` -> ints, -1 for an unbounded side (``None`` or -1 given)."""
    if window is None:
        return -1, -1
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise ValueError(f"window must be a pair (left, right), got {window!r}")
    out = []
    for side, w in zip(("left", "right"), window):
        if w is None:
            w = -1
        if isinstance(w, bool) or not isinstance(w, int) or w < -1:
            raise ValueError(f"window {side} must be an int >= 0, or -1/None for unbounded, got {w!r}")
        out.append(w)
    return out[0], out[1]


def check_key_padding_mask(mask, shape: QKVShape, device: torch.device) -> None:
    if mask is None:
        return
    check_tensor("key_padding_mask", mask)
    if mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must be bool (True = keep), got {mask.dtype}")
    if tuple(mask.shape) != (shape.B, shape.Tk):
        raise ValueError(f"key_padding_mask must have shape (B, Tk) = {(shape.B, shape.Tk)}, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"key_padding_mask must be on {device}, got {mask.device}")


def check_attn_mask(mask, target: tuple[int, ...], device: torch.device) -> None:
    """A bool or float mask broadcastable to ``target``, on ``device``, not requiring grad."""
    if mask is None:
        return
    check_tensor("attn_mask", mask)
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"attn_mask must be bool (True = take part) or floating (added to scores), got {mask.dtype}")
    try:
        if torch.broadcast_shapes(mask.shape, target) != torch.Size(target):
            raise RuntimeError
    except RuntimeError:
        raise ValueError(f"attn_mask of shape {tuple(mask.shape)} is not broadcastable to {tuple(target)}") from None
    if mask.device != device:
        raise ValueError(f"attn_mask must be on {device}, got {mask.device}")
    if mask.requires_grad:
        raise ValueError("attn_mask requires grad: gradients with respect to the mask are not supported")


def softcap_value(softcap) -> float:
    """``softcap`` (None or 0: off) as a float >= 0."""
    if softcap is None:
        return 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"softcap must be a float (0 or None: off), got {type(softcap).__name__}")
    if not (math.isfinite(softcap) and softcap >= 0.0):
        raise ValueError(f"softcap must be a finite float >= 0 (0: off), got {softcap}")
    return float(softcap)


def alibi_slopes(slopes, shape: QKVShape, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
    """``alibi_slopes`` of shape ``(Hq,)`` or ``(B, Hq)`` (floating) as a contiguous ``(B, Hq)`` tensor of
    ``dtype``, or None."""
    if slopes is None:
        return None
    check_tensor("alibi_slopes", slopes)
    if not slopes.dtype.is_floating_point:
        raise TypeError(f"alibi_slopes must be a floating tensor (float32, as flash-attn's), got {slopes.dtype}")
    if tuple(slopes.shape) not in ((shape.Hq,), (shape.B, shape.Hq)):
        raise ValueError(f"alibi_slopes must have shape (Hq,) = ({shape.Hq},) or (B, Hq) = {(shape.B, shape.Hq)}, "
                         f"got {tuple(slopes.shape)}")
    if slopes.device != device:
        raise ValueError(f"alibi_slopes must be on {device}, got {slopes.device}")
    if slopes.requires_grad:
        raise ValueError("alibi_slopes cannot require grad (the kernels give no gradient for the slopes)")
    return slopes.to(dtype).expand(shape.B, shape.Hq).contiguous()
