"""Block-sparse attention over a :class:`effattn.BlockMask`: the torch ops and the public function.

``effattn::sparse_attention_fwd`` / ``_bwd`` are custom ops (fake implementations, registered
autograd) taking the mask as :meth:`BlockMask.as_tuple` gives it (a list of tensors and a list of
ints), so they trace and compile like the flash ops; :func:`sparse_attention` is the public
function. Backends: the Triton kernels of ``kernels/block_sparse_attn.py`` (time proportional to the
kept blocks) and the chunked reference, which expands the mask one chunk of query rows at a time.
"""

from __future__ import annotations

import torch

from effattn import _op, _validate
from effattn.backends import get_backend
from effattn.block_mask import BlockMask
from effattn.profile import kept_pairs
from effattn.reference import compute_dtype

__all__ = ["sparse_attention"]


@torch.library.custom_op("effattn::sparse_attention_fwd", mutates_args=())
def sparse_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None,
                         block_mask_tensors: list[torch.Tensor | None], block_mask_ints: list[int], scale: float,
                         backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention forward over ``BlockMask.from_tuple((block_mask_tensors, block_mask_ints))``:
    ``out (B, Hq, Tq, Dv)``, ``lse (B, Hq, Tq)``."""
    mask = BlockMask.from_tuple((block_mask_tensors, block_mask_ints))
    out, lse = get_backend(backend).sparse_forward(q, k, v, mask, key_padding_mask, scale=scale)
    return out, lse.to(compute_dtype(q.dtype))


@sparse_attention_fwd.register_fake
def _(q, k, v, key_padding_mask, block_mask_tensors, block_mask_ints, scale, backend):
    B, Hq, Tq, _ = q.shape
    return q.new_empty(B, Hq, Tq, v.shape[-1]), q.new_empty(B, Hq, Tq, dtype=compute_dtype(q.dtype))


@torch.library.custom_op("effattn::sparse_attention_bwd", mutates_args=())
def sparse_attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                         lse: torch.Tensor, key_padding_mask: torch.Tensor | None, dlse: torch.Tensor | None,
                         block_mask_tensors: list[torch.Tensor | None], block_mask_ints: list[int], scale: float,
                         backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of :func:`sparse_attention_fwd`: ``dq, dk, dv`` (``dlse``: gradient of lse, or None)."""
    mask = BlockMask.from_tuple((block_mask_tensors, block_mask_ints))
    return get_backend(backend).sparse_backward(dout, q, k, v, out, lse, dlse, mask, key_padding_mask, scale=scale)


@sparse_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, key_padding_mask, dlse, block_mask_tensors, block_mask_ints, scale, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _pairs(q, block_mask_tensors, block_mask_ints, **_) -> int:
    per_bh = kept_pairs(BlockMask.from_tuple((block_mask_tensors, block_mask_ints)))
    return int(per_bh.expand(q.shape[0], q.shape[1]).sum())


_op.register(sparse_attention_fwd, sparse_attention_bwd, pairs=_pairs)


def _check_block_mask(block_mask, shape: _validate.QKVShape, device: torch.device) -> None:
    if not isinstance(block_mask, BlockMask):
        raise TypeError(f"block_mask must be an effattn.BlockMask, got {type(block_mask).__name__}")
    if (block_mask.q_len, block_mask.kv_len) != (shape.Tq, shape.Tk):
        raise ValueError(f"block_mask was built for (Tq, Tk) = {(block_mask.q_len, block_mask.kv_len)}, but q and k "
                         f"have {(shape.Tq, shape.Tk)}")
    Bm, Hm = block_mask.shape[:2]
    if Bm not in (1, shape.B) or Hm not in (1, shape.Hq):
        raise ValueError(f"block_mask has (B, H) = {(Bm, Hm)}: expected 1 or {shape.B} for B and 1 or {shape.Hq} "
                         "(query heads) for H")
    if block_mask.device != device:
        raise ValueError(f"block_mask is on {block_mask.device}, q on {device}: call block_mask.to(device)")


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask, *,
                     scale: float | None = None, key_padding_mask: torch.Tensor | None = None,
                     return_lse: bool = False, backend: str | None = None):
    """Attention restricted to the kept blocks of ``block_mask`` (and its elementwise rule).

    Args:
        q: ``(B, Hq, Tq, D)``; k: ``(B, Hkv, Tk, D)``; v: ``(B, Hkv, Tk, Dv)``; GQA, dtypes and head
            dims as :func:`effattn.flash_attention`.
        block_mask: an :class:`effattn.BlockMask` for ``(Tq, Tk)``, its B and H equal to q's or 1.
            Query ``i`` sees key ``j`` iff their block pair is FULL, or PARTIAL and the mask's rule
            holds for ``(i, j)``.
        scale: default ``1 / sqrt(D)``.
        key_padding_mask: ``(B, Tk)`` bool, True = keep.
        return_lse: also return ``lse (B, Hq, Tq)`` (differentiable too).
        backend: None (Triton on CUDA, the chunked reference on CPU) or a name.

    Returns:
        ``out (B, Hq, Tq, Dv)``, or ``(out, lse)``. A query row with no visible key returns 0.
        The Triton kernels visit only kept blocks: time proportional to their number.
    """
    shape = _validate.check_qkv(q, k, v)
    _validate.check_scale(scale)
    _validate.check_key_padding_mask(key_padding_mask, shape, q.device)
    _check_block_mask(block_mask, shape, q.device)
    backend, scale = _op.prepare(q, shape, backend, scale, mask=key_padding_mask, block_size=block_mask.block_size)
    out, lse = sparse_attention_fwd(q, k, v, key_padding_mask, *block_mask.as_tuple(), scale, backend)
    return (out, lse) if return_lse else out
