"""Block-pooled attention maps in Triton: the distillation target of a learned block gate (SeerAttention).

For queries ``q (B, Hq, Tq, D)``, keys ``k (B, Hkv, Tk, D)`` and the log-sum-exp ``lse (B, Hq, Tq)`` of a
flash forward (natural log), the block-max-pooled attention map is

    A_max[b, h, m, n] = max_{i in q block m, j in kv block n} P[b, h, i, j],   P = softmax(scale q k^T + mask)

and the block-sum map ``A_sum`` sums ``P`` over the same rectangle instead (its rows sum to the number of
non-empty query rows of the block). The probabilities are recomputed tile by tile as ``P = exp(S - lse)``
(the flash backward's trick), so the ``Tq x Tk`` matrix never reaches memory: one program per
``(q block, head, batch)`` loops over the kv blocks and writes one ``(nKb,)`` row of the
``(B, Hq, nQb, nKb)`` float32 output(s). The tiles are the blocks (``BLOCK_M x BLOCK_N`` = ``block_size``).

Masking: optional causal attention aligned to the bottom-right corner, as in ``effattn.flash_attention``
(query ``i`` sees keys ``j <= i + Tk - Tq``); kv blocks past a q block's last visible key are not
visited (written as 0). GQA: query head ``h`` reads kv head ``h // (Hq / Hkv)``. A query row with no
visible key (``lse = -inf``) contributes 0.

:func:`block_attn_map_reference` is the same computation in plain torch (query-row chunks, float64
capable): the tests' reference and the CPU fallback (:func:`block_attn_map_auto`).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from effattn import limits
from effattn.kernels._attn_common import _dot, _tile_ptrs
from effattn.kernels.flash_attn import INTERPRET, _block_d, _dot_precision, _on_tensor_device

__all__ = ["block_attn_map", "block_attn_map_auto", "block_attn_map_reference", "num_blocks"]

NUM_WARPS = 4
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_BLOCK = limits.MIN_BLOCK_SIZE  # tl.dot needs tiles of at least 16
REFERENCE_CHUNK_ELEMENTS = 1 << 22  # scores per query-row chunk of the reference

# Every output buffer comes from here (tests swap in a NaN-filling allocator).
_alloc = torch.empty


def num_blocks(length: int, block: int) -> int:
    return (length + block - 1) // block


# ----------------------------------------------------------------------------------------------
# kernel
# ----------------------------------------------------------------------------------------------
@triton.jit
def _block_attn_map_kernel(
    Q, K, LSE, OUT_MAX, OUT_SUM,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_lb, stride_lh, stride_lt,
    stride_ob, stride_oh, stride_om, stride_on,
    n_groups, Tq, Tk, n_kv_blocks, scale, diag_offset,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, WITH_SUM: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    h_kv = h // n_groups
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Tq

    q_base = Q + tl.cast(b, tl.int64) * stride_qb + tl.cast(h, tl.int64) * stride_qh
    q = tl.load(_tile_ptrs(q_base, start_m, stride_qt, stride_qd, BLOCK_M, BLOCK_D, False),
                mask=m_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    lse = tl.load(LSE + tl.cast(b, tl.int64) * stride_lb + tl.cast(h, tl.int64) * stride_lh + offs_m * stride_lt,
                  mask=m_ok, other=float("-inf")).to(tl.float32)
    row_ok = m_ok & (lse > float("-inf"))  # rows past Tq and rows that see no key contribute 0
    lse = tl.where(row_ok, lse, 0.0)
    k_base = K + tl.cast(b, tl.int64) * stride_kb + tl.cast(h_kv, tl.int64) * stride_kh
    out_row = tl.cast(b, tl.int64) * stride_ob + tl.cast(h, tl.int64) * stride_oh + tl.cast(pid_m, tl.int64) * stride_om

    # kv blocks this q block may see: all, or (causal) up to the one holding its last row's last key
    hi = n_kv_blocks
    if CAUSAL:
        last_key = tl.minimum(start_m + BLOCK_M, Tq) - 1 + diag_offset
        hi = tl.minimum(tl.maximum(last_key + 1, 0) + BLOCK_N - 1, Tk + BLOCK_N - 1) // BLOCK_N
        hi = tl.minimum(hi, n_kv_blocks)
    for n in range(0, hi):
        start_n = n * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kT = tl.load(_tile_ptrs(k_base, start_n, stride_kt, stride_kd, BLOCK_N, BLOCK_D, True),
                     mask=(offs_n[None, :] < Tk) & (offs_d[:, None] < HEAD_DIM), other=0.0)
        s = _dot(q, kT, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), UPCAST_DOT, DOT_PRECISION) * scale
        keep = row_ok[:, None] & (offs_n[None, :] < Tk)
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= offs_m[:, None] + diag_offset)
        p = tl.where(keep, tl.exp(tl.where(keep, s - lse[:, None], 0.0)), 0.0)
        tl.store(OUT_MAX + out_row + n * stride_on, tl.max(tl.max(p, axis=1), axis=0))
        if WITH_SUM:
            tl.store(OUT_SUM + out_row + n * stride_on, tl.sum(tl.sum(p, axis=1), axis=0))
    for n in range(hi, n_kv_blocks):  # kv blocks wholly in the causal future
        tl.store(OUT_MAX + out_row + n * stride_on, 0.0)
        if WITH_SUM:
            tl.store(OUT_SUM + out_row + n * stride_on, 0.0)


# ----------------------------------------------------------------------------------------------
# argument checks (shared by the launcher and the reference)
# ----------------------------------------------------------------------------------------------
def _block_pair(block_size) -> tuple[int, int]:
    if isinstance(block_size, (tuple, list)):
        if len(block_size) != 2:
            raise ValueError(f"block_size must be an int or a pair (BLOCK_Q, BLOCK_KV), got {block_size!r}")
        sizes = tuple(block_size)
    else:
        sizes = (block_size, block_size)
    for s in sizes:
        if isinstance(s, bool) or not isinstance(s, int) or s < MIN_BLOCK or s & (s - 1):
            raise ValueError(f"block_size must be powers of two >= {MIN_BLOCK}, got {block_size!r}")
    return sizes


def _check(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor | None, block_size) -> tuple[int, int]:
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, T, D), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
    B, Hq, Tq, D = q.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch and head dim")
    if k.shape[1] == 0 or Hq % k.shape[1]:
        raise ValueError(f"query heads ({Hq}) must be a multiple of kv heads ({k.shape[1]})")
    if q.device != k.device:
        raise ValueError(f"q is on {q.device}, k on {k.device}")
    if lse is not None:
        if not isinstance(lse, torch.Tensor) or tuple(lse.shape) != (B, Hq, Tq):
            raise ValueError(f"lse must be a tensor of shape {(B, Hq, Tq)}, got "
                             f"{tuple(lse.shape) if isinstance(lse, torch.Tensor) else type(lse).__name__}")
        if lse.device != q.device:
            raise ValueError(f"lse is on {lse.device}, q on {q.device}")
    return _block_pair(block_size)


# ----------------------------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------------------------
@_on_tensor_device
def block_attn_map(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, *, scale: float, block_size,
                   causal: bool = False, return_sum: bool = False):
    """Block-max-pooled attention map ``(B, Hq, nQb, nKb)`` float32 by the Triton kernel.

    ``q (B, Hq, Tq, D)``, ``k (B, Hkv, Tk, D)`` (float16 / bfloat16 / float32, any strides; CUDA, or CPU
    under ``TRITON_INTERPRET=1``), ``lse (B, Hq, Tq)`` the natural-log row log-sum-exp of the same
    attention (``flash_attention(..., return_lse=True)``), ``scale`` the score scale used there,
    ``block_size`` an int or ``(BLOCK_Q, BLOCK_KV)`` (powers of two >= 16), ``causal`` bottom-right.
    With ``return_sum`` returns ``(max_map, sum_map)``."""
    bq, bk = _check(q, k, lse, block_size)
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype:
        raise TypeError(f"the kernel takes float16 / bfloat16 / float32 q and k of one dtype, got {q.dtype} and "
                        f"{k.dtype} (use block_attn_map_reference for float64)")
    if q.device.type != "cuda" and not INTERPRET:
        raise RuntimeError("block_attn_map needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors "
                           "(or use block_attn_map_reference / block_attn_map_auto)")
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    nq, nk = num_blocks(Tq, bq), num_blocks(Tk, bk)
    out_max = _alloc(B, Hq, nq, nk, dtype=torch.float32, device=q.device)
    out_sum = _alloc(B, Hq, nq, nk, dtype=torch.float32, device=q.device) if return_sum else out_max
    if out_max.numel():
        _block_attn_map_kernel[(nq, Hq, B)](
            q, k, lse, out_max, out_sum,
            *q.stride(), *k.stride(), *lse.stride(), *out_max.stride(),
            Hq // Hkv, Tq, Tk, nk, float(scale), Tk - Tq,
            HEAD_DIM=D, BLOCK_D=_block_d(D), BLOCK_M=bq, BLOCK_N=bk, CAUSAL=bool(causal), WITH_SUM=bool(return_sum),
            UPCAST_DOT=INTERPRET, DOT_PRECISION=_dot_precision(q.dtype),
            num_warps=NUM_WARPS,
        )
    return (out_max, out_sum) if return_sum else out_max


# ----------------------------------------------------------------------------------------------
# plain-torch reference (and CPU fallback)
# ----------------------------------------------------------------------------------------------
def block_attn_map_reference(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor | None = None, *,
                             scale: float | None = None, block_size, causal: bool = False,
                             return_sum: bool = False):
    """The same maps in plain torch, by chunks of whole q blocks (never the whole ``Tq x Tk`` matrix).

    Computes in float64 for float64 inputs, else float32, and returns that dtype. ``lse`` may be None:
    then each chunk's exact row log-sum-exp is used (the chunk holds every key of its rows).
    ``scale`` defaults to ``1 / sqrt(D)``."""
    bq, bk = _check(q, k, lse, block_size)
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    nq, nk = num_blocks(Tq, bq), num_blocks(Tk, bk)
    out_max = torch.zeros(B, Hq, nq, nk, dtype=cdt, device=q.device)
    out_sum = torch.zeros(B, Hq, nq, nk, dtype=cdt, device=q.device) if return_sum else None
    if out_max.numel() == 0:
        return (out_max, out_sum) if return_sum else out_max
    kc = k.to(cdt).repeat_interleave(Hq // Hkv, dim=1)
    pad_k = nk * bk - Tk
    blocks_per_chunk = max(1, REFERENCE_CHUNK_ELEMENTS // max(1, B * Hq * bq * Tk))
    cols = torch.arange(Tk, device=q.device)
    for m0 in range(0, nq, blocks_per_chunk):
        m1 = min(nq, m0 + blocks_per_chunk)
        r0, r1 = m0 * bq, min(Tq, m1 * bq)
        s = torch.matmul(q[:, :, r0:r1].to(cdt), kc.transpose(-1, -2)) * scale  # (B, Hq, R, Tk)
        if causal:
            rows = torch.arange(r0, r1, device=q.device)
            s = s.masked_fill(cols[None, :] > rows[:, None] + (Tk - Tq), float("-inf"))
        row_lse = torch.logsumexp(s, dim=-1) if lse is None else lse[:, :, r0:r1].to(cdt)
        empty = torch.isinf(row_lse) & (row_lse < 0)
        p = torch.exp(s - torch.where(empty, 0.0, row_lse)[..., None])
        p = p.masked_fill(empty[..., None], 0.0)
        pad_q = (m1 - m0) * bq - (r1 - r0)
        p = torch.nn.functional.pad(p, (0, pad_k, 0, pad_q)).view(B, Hq, m1 - m0, bq, nk, bk)
        out_max[:, :, m0:m1] = p.amax(dim=(3, 5))
        if return_sum:
            out_sum[:, :, m0:m1] = p.sum(dim=(3, 5))
    return (out_max, out_sum) if return_sum else out_max


def _triton_usable(q: torch.Tensor) -> bool:
    return q.dtype in SUPPORTED_DTYPES and q.device.type == "cuda"


def block_attn_map_auto(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor | None = None, *,
                        scale: float | None = None, block_size, causal: bool = False, return_sum: bool = False,
                        use_kernel: bool | None = None):
    """:func:`block_attn_map` where the Triton kernel is usable (CUDA, float16/bfloat16/float32), else
    :func:`block_attn_map_reference`. ``lse`` None: computed by ``effattn.flash_attention`` for the
    kernel (the reference computes it per chunk). ``use_kernel`` forces the choice (True on CPU needs
    ``TRITON_INTERPRET=1``)."""
    if use_kernel is None:
        use_kernel = _triton_usable(q)
    if not use_kernel:
        return block_attn_map_reference(q, k, lse, scale=scale, block_size=block_size, causal=causal,
                                        return_sum=return_sum)
    _check(q, k, lse, block_size)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if lse is None:
        import effattn

        v = k[..., :1]  # the output is not needed; the smallest v there is
        _, lse = effattn.flash_attention(q, k, v, causal=causal, scale=scale, return_lse=True,
                                         backend="triton" if q.device.type == "cpu" else None)
        lse = lse.float()
    return block_attn_map(q, k, lse, scale=scale, block_size=block_size, causal=causal, return_sum=return_sum)
