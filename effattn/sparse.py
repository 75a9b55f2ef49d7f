"""Block-sparse attention over a :class:`effattn.BlockMask`: the torch ops and the public function.

``effattn::sparse_attention_fwd`` / ``_bwd`` are custom ops (fake implementations, registered
autograd) taking the mask's compressed lists as tensors, so they trace and compile like the flash
ops; :func:`sparse_attention` is the public function. Backends: the Triton kernels of
``kernels/block_sparse_attn.py`` (time proportional to the kept blocks) and the chunked reference,
which expands the mask one chunk of query rows at a time.
"""

from __future__ import annotations

import math

import torch

from effattn import _validate
from effattn.backends import AttentionCall, get_backend, select_backend
from effattn.block_mask import BlockMask, MaskRule
from effattn.flash import _backward_with, _setup_context
from effattn.reference import compute_dtype

__all__ = ["sparse_attention"]


def _mask_from_args(q_len, kv_len, block_q, block_kv, lists, q_segments, kv_segments, window_left, window_right,
                    diag_offset, n_global, has_rule) -> BlockMask:
    rule = None
    if has_rule:
        rule = MaskRule(window_left=window_left, window_right=window_right, diag_offset=diag_offset,
                        q_segments=q_segments, kv_segments=kv_segments, n_global=n_global)
    return BlockMask.from_lists(*lists, q_len=q_len, kv_len=kv_len, block_size=(block_q, block_kv), rule=rule)


@torch.library.custom_op("effattn::sparse_attention_fwd", mutates_args=())
def sparse_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None,
                         kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor, full_kv_num_blocks: torch.Tensor,
                         full_kv_indices: torch.Tensor, q_num_blocks: torch.Tensor, q_indices: torch.Tensor,
                         full_q_num_blocks: torch.Tensor, full_q_indices: torch.Tensor,
                         q_segments: torch.Tensor | None, kv_segments: torch.Tensor | None, scale: float,
                         block_q: int, block_kv: int, window_left: int, window_right: int, diag_offset: int,
                         n_global: int, has_rule: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention forward: ``out (B, Hq, Tq, Dv)``, ``lse (B, Hq, Tq)``."""
    lists = (kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, q_num_blocks, q_indices,
             full_q_num_blocks, full_q_indices)
    mask = _mask_from_args(q.shape[2], k.shape[2], block_q, block_kv, lists, q_segments, kv_segments, window_left,
                           window_right, diag_offset, n_global, has_rule)
    out, lse = get_backend(backend).sparse_forward(q, k, v, mask, key_padding_mask, scale=scale)
    return out, lse.to(compute_dtype(q.dtype))


@sparse_attention_fwd.register_fake
def _(q, k, v, key_padding_mask, *args):
    B, Hq, Tq, _ = q.shape
    return q.new_empty(B, Hq, Tq, v.shape[-1]), q.new_empty(B, Hq, Tq, dtype=compute_dtype(q.dtype))


@torch.library.custom_op("effattn::sparse_attention_bwd", mutates_args=())
def sparse_attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                         lse: torch.Tensor, key_padding_mask: torch.Tensor | None, dlse: torch.Tensor | None,
                         kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor, full_kv_num_blocks: torch.Tensor,
                         full_kv_indices: torch.Tensor, q_num_blocks: torch.Tensor, q_indices: torch.Tensor,
                         full_q_num_blocks: torch.Tensor, full_q_indices: torch.Tensor,
                         q_segments: torch.Tensor | None, kv_segments: torch.Tensor | None, scale: float,
                         block_q: int, block_kv: int, window_left: int, window_right: int, diag_offset: int,
                         n_global: int, has_rule: bool,
                         backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of :func:`sparse_attention_fwd`: ``dq, dk, dv`` (``dlse``: gradient of lse, or None)."""
    lists = (kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, q_num_blocks, q_indices,
             full_q_num_blocks, full_q_indices)
    mask = _mask_from_args(q.shape[2], k.shape[2], block_q, block_kv, lists, q_segments, kv_segments, window_left,
                           window_right, diag_offset, n_global, has_rule)
    return get_backend(backend).sparse_backward(dout, q, k, v, out, lse, dlse, mask, key_padding_mask, scale=scale)


@sparse_attention_bwd.register_fake
def _(dout, q, k, v, *args):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


sparse_attention_fwd.register_autograd(_backward_with(sparse_attention_bwd), setup_context=_setup_context)


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
    call = AttentionCall(device=q.device, dtype=q.dtype, head_dim_qk=shape.Dqk, head_dim_v=shape.Dv, Tq=shape.Tq,
                         Tk=shape.Tk, dropout=False, batch=shape.B, heads=shape.Hq)
    chosen = select_backend(call, backend)
    scale = 1.0 / math.sqrt(shape.Dqk) if scale is None else float(scale)
    bm = block_mask
    rule = bm.rule
    out, lse = sparse_attention_fwd(
        q, k, v, key_padding_mask, bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices,
        bm.q_num_blocks, bm.q_indices, bm.full_q_num_blocks, bm.full_q_indices,
        rule.q_segments if rule else None, rule.kv_segments if rule else None, scale, bm.block_size[0],
        bm.block_size[1], rule.window_left if rule else -1, rule.window_right if rule else -1,
        rule.diag_offset if rule else 0, rule.n_global if rule else 0, rule is not None, chosen.name)
    return (out, lse) if return_lse else out
