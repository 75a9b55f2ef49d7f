"""Launchers of the compiled extension (``csrc/``): the CUDA kernels and the C++ CPU implementation.

Both take the same arguments, an ``AttnParams`` of raw addresses, element strides, sizes and the
CUDA stream, filled here from tensors; the extension never sees a tensor and does not link against
libtorch. Everything is checked before a launch (device, dtype, shapes, broadcastable mask, block
lists): a raw-pointer launcher must never read outside its tensors. Outputs come from :data:`_alloc`
(tests swap in a NaN-filling allocator).

Semantics are those of :mod:`effattn.reference` (same arguments as the Triton launchers of
``effattn.kernels.flash_attn`` / ``block_sparse_attn``): ``lse`` is the natural-log log-sum-exp,
``-inf`` (and output 0) for a row with no visible key; query pooling follows :class:`QueryPool`.
Dropout (dense and pooled attention) runs in the C++ CPU implementation, with the Philox draws of
:func:`effattn.reference.dropout_keep` (``csrc/common/philox.h``); the CUDA kernels do not implement it.
Nor do they implement the score modifiers of dense attention, ``softcap`` and ``alibi_slopes``, which
the C++ CPU implementation applies as the reference does.
"""

from __future__ import annotations

import math

import torch

from effattn import _ext, limits
from effattn.reference import DROPOUT_BITS, QueryPool, compute_dtype, dropout_threshold

# Every output buffer comes from here (tests swap in a NaN-filling allocator).
_alloc = torch.empty

CUDA_DTYPES = (torch.float16, torch.bfloat16)
CPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Tiles of the C++ CPU float64 path (query rows, keys); capped by the block size of a BlockMask.
CPU_TILE = (32, 32)

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3, torch.bool: 4}
_MASK_NONE, _MASK_BOOL, _MASK_ADD = 0, 1, 2
_POOL_MODES = {"mean": 0, "max": 1}


def _fail(msg: str):
    raise ValueError(f"effattn extension launcher: {msg}")


def _device_kind(q: torch.Tensor, emulate: bool = False) -> str:
    """Which launchers run: "cuda" (the CUDA kernels) or "cpu" (the C++ CPU implementation), by the tensors'
    device; with ``emulate`` the CUDA kernels on the host emulator (``effattn._emu``), on CPU tensors."""
    if emulate:
        if q.device.type != "cpu":
            _fail(f"the CUDA emulator (backend 'cuda-emu') runs on CPU tensors, got {q.device}")
        return "cuda"
    if q.device.type not in ("cpu", "cuda"):
        _fail(f"tensors must be on cpu or cuda, got {q.device}")
    return q.device.type


def _module(emulate: bool):
    """The compiled module of a launch: the extension, or the emulator's."""
    return _ext.load_emu() if emulate else _ext.load()


def _check_tensor(name: str, x, *, device, dtype=None, shape=None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"effattn extension launcher: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided or x.is_nested:
        _fail(f"{name} must be a dense strided tensor")
    if x.device != device:
        _fail(f"{name} is on {x.device}, expected {device}")
    if dtype is not None and x.dtype != dtype:
        _fail(f"{name} has dtype {x.dtype}, expected {dtype}")
    if shape is not None and tuple(x.shape) != tuple(shape):
        _fail(f"{name} has shape {tuple(x.shape)}, expected {tuple(shape)}")


def _check_qkv(q, k, v, kind: str):
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, x, device=q.device, dtype=q.dtype)
        if x.dim() != 4:
            _fail(f"{name} must be 4-D (B, H, T, D), got shape {tuple(x.shape)}")
    allowed = CUDA_DTYPES if kind == "cuda" else CPU_DTYPES
    if q.dtype not in allowed:
        _fail(f"dtype {q.dtype} is not supported on {kind} (supported: {', '.join(map(str, allowed))})")
    B, Hq, _, Dqk = q.shape
    _, Hkv, Tk, Dk = k.shape
    if k.shape[0] != B or tuple(v.shape[:3]) != (B, Hkv, Tk) or Dk != Dqk or Hkv < 1 or Hq % Hkv:
        _fail(f"inconsistent shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if Dqk < 1 or v.shape[3] < 1:
        _fail("head dims must be >= 1")
    if kind == "cuda" and max(Dqk, v.shape[3]) > limits.CUDA_MAX_HEAD_DIM:
        _fail(f"the CUDA kernels support head dims up to {limits.CUDA_MAX_HEAD_DIM}, got q/k {Dqk}, v {v.shape[3]}")
    if max(q.shape[2], Tk) > limits.EXT_MAX_LEN:
        _fail(f"sequence lengths must be below 2**31, got {q.shape[2]} and {Tk}")
    if kind == "cuda" and max(B, Hq) > limits.MAX_GRID_YZ:
        _fail(f"batch ({B}) and heads ({Hq}) must each be <= {limits.MAX_GRID_YZ} (CUDA launch grid)")


def _strides(ext, x: torch.Tensor):
    return ext.Strides4(*x.stride())


def _params(ext, q, k, v, *, scale, kind):
    p = ext.AttnParams()
    B, Hq, T, Dqk = q.shape
    p.q, p.k, p.v = q.data_ptr(), k.data_ptr(), v.data_ptr()
    p.sq, p.sk, p.sv = _strides(ext, q), _strides(ext, k), _strides(ext, v)
    p.B, p.Hq, p.Hkv, p.Tq, p.Tk, p.T_in, p.T_src = B, Hq, k.shape[1], T, k.shape[2], T, T
    p.Dqk, p.Dv = Dqk, v.shape[3]
    p.dtype = _DTYPE_CODES[q.dtype]
    p.scale = float(scale)
    if kind == "cuda" and q.is_cuda:
        p.device = q.device.index if q.device.index is not None else torch.cuda.current_device()
        p.stream = torch.cuda.current_stream(q.device).cuda_stream
    elif kind == "cuda":  # the emulator: device 0, no stream
        pass
    else:
        p.tile_m, p.tile_n = CPU_TILE  # the float64 path's tiles; the others choose their own
        p.num_threads = torch.get_num_threads()
    return p


def _set_pool(p, pool: QueryPool | None, T: int) -> None:
    if pool is None:
        return
    if pool.separate_cls and pool.stride == 1:
        _fail("separate_cls with stride 1 is not supported (the [cls] row would be pooled twice)")
    p.pool_stride, p.pool_mode, p.pool_cls = pool.stride, _POOL_MODES[pool.mode], int(pool.separate_cls)
    p.Tq, p.T_src = pool.pooled_len(T), pool.source_len(T)


def _set_mask(ext, p, mask, q, keep: list) -> None:
    """A bool / float mask broadcastable to (B, Hq, Tq, Tk), read through its (broadcast) strides."""
    if mask is None:
        return
    _check_tensor("mask", mask, device=q.device)
    if mask.dtype != torch.bool and mask.dtype not in _DTYPE_CODES:
        _fail(f"mask must be bool or float16/bfloat16/float32/float64, got {mask.dtype}")
    try:
        m = mask.expand(p.B, p.Hq, p.Tq, p.Tk)
    except RuntimeError:
        _fail(f"mask of shape {tuple(mask.shape)} does not broadcast to {(p.B, p.Hq, p.Tq, p.Tk)}")
    keep.append(m)
    p.mask = m.data_ptr()
    p.smask = _strides(ext, m)
    p.mask_kind = _MASK_BOOL if m.dtype == torch.bool else _MASK_ADD
    p.mask_dtype = _DTYPE_CODES[m.dtype]


def _run(ext, kind: str, direction: str, p) -> None:
    fn = getattr(ext, f"{kind if kind == 'cuda' else 'cpu'}_{direction}")
    fn(p)


SEED_LIMIT = 2**64  # the Philox key: two 32-bit words


def _set_dropout(p, kind: str, dropout_p, seed) -> None:
    """Dropout on the probabilities (C++ CPU implementation only), keyed by ``seed``."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"effattn extension launcher: dropout_p must be a float, got {type(dropout_p).__name__}")
    if not dropout_p:
        return
    if kind == "cuda":
        _fail("dropout is not implemented in the CUDA kernels (use backend='triton' or 'reference')")
    if not 0.0 < dropout_p < 1.0 or dropout_threshold(dropout_p) >= 1 << DROPOUT_BITS:
        _fail(f"dropout_p must be in [0, 1), got {dropout_p}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        _fail(f"seed must be an int in [0, 2**64), got {seed!r}")
    p.dropout_p, p.seed = float(dropout_p), seed


def _set_score_mods(p, kind: str, softcap, alibi_slopes, q, keep: list) -> None:
    """The soft cap and the ALiBi slopes (C++ CPU implementation only; :mod:`effattn.reference`)."""
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"effattn extension launcher: softcap must be a float, got {type(softcap).__name__}")
    if not (math.isfinite(softcap) and softcap >= 0.0):
        _fail(f"softcap must be a finite float >= 0 (0: none), got {softcap}")
    if kind == "cuda" and (softcap > 0.0 or alibi_slopes is not None):
        _fail("softcap and alibi_slopes are not implemented in the CUDA kernels")
    p.softcap = float(softcap)
    if alibi_slopes is None:
        return
    _check_tensor("alibi_slopes", alibi_slopes, device=q.device, dtype=compute_dtype(q.dtype), shape=(p.B, p.Hq))
    if not alibi_slopes.is_contiguous():
        _fail("alibi_slopes must be contiguous")
    keep.append(alibi_slopes)
    p.alibi, p.alibi_sb = alibi_slopes.data_ptr(), alibi_slopes.stride(0)


# ----------------------------------------------------------------------------------------------
# dense and pooled attention
# ----------------------------------------------------------------------------------------------
def _dense_params(q, k, v, mask, scale, window_left, window_right, diag_offset, dropout_p, seed, pool,
                  softcap=0.0, alibi_slopes=None, emulate=False):
    """Checks and launch parameters shared by :func:`attn_forward` and :func:`attn_backward`:
    ``(ext, kind, params, keep)``, ``keep`` holding the tensors ``params`` points into."""
    kind = _device_kind(q, emulate)
    _check_qkv(q, k, v, kind)
    ext = _module(emulate)
    p = _params(ext, q, k, v, scale=scale, kind=kind)
    _set_dropout(p, kind, dropout_p, seed)
    _set_pool(p, pool, q.shape[2])
    p.window_left, p.window_right, p.diag_offset = int(window_left), int(window_right), int(diag_offset)
    keep: list[torch.Tensor] = []
    _set_mask(ext, p, mask, q, keep)
    _set_score_mods(p, kind, softcap, alibi_slopes, q, keep)
    return ext, kind, p, keep


def attn_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, *, scale: float,
                 window_left: int = -1, window_right: int = -1, diag_offset: int = 0, dropout_p: float = 0.0,
                 seed: int = 0, pool: QueryPool | None = None, softcap: float = 0.0,
                 alibi_slopes: torch.Tensor | None = None, emulate: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward on the tensors' device (CUDA kernels or the C++ CPU implementation).

    q ``(B, Hq, T, Dqk)``, k ``(B, Hkv, Tk, Dqk)``, v ``(B, Hkv, Tk, Dv)``, any strides; mask None or
    bool/float broadcastable to ``(B, Hq, Tq, Tk)``; with ``pool`` the queries are pooled on load and
    ``Tq = pool.pooled_len(T)``. Returns ``out (B, Hq, Tq, Dv)`` (q's dtype) and ``lse (B, Hq, Tq)``
    (float32, float64 for float64 inputs). ``dropout_p`` > 0 (CPU tensors only) drops probabilities with
    the Philox draws of ``seed``. ``softcap`` > 0 and ``alibi_slopes`` (contiguous ``(B, Hq)`` in the
    dtype of lse) modify the scores as in :mod:`effattn.reference` (CPU tensors only). ``emulate``: the CUDA
    kernels on the host emulator (CPU tensors, float16/bfloat16; :mod:`effattn._emu`).
    """
    ext, kind, p, keep = _dense_params(q, k, v, mask, scale, window_left, window_right, diag_offset, dropout_p, seed,
                                       pool, softcap, alibi_slopes, emulate)
    return _forward(ext, kind, p, q, keep)


def _forward(ext, kind, p, q, keep):
    """Allocate ``out`` and ``lse`` and launch the forward (``keep``: the tensors ``p`` points into, alive
    until the launch returns)."""
    out = _alloc(p.B, p.Hq, p.Tq, p.Dv, dtype=q.dtype, device=q.device)
    lse = _alloc(p.B, p.Hq, p.Tq, dtype=compute_dtype(q.dtype), device=q.device)
    if out.numel() == 0:
        return out, lse
    p.o, p.so, p.lse = out.data_ptr(), _strides(ext, out), lse.data_ptr()
    _run(ext, kind, "forward", p)
    return out, lse


def attn_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, mask: torch.Tensor | None, dlse: torch.Tensor | None = None, *, scale: float,
                  window_left: int = -1, window_right: int = -1, diag_offset: int = 0, dropout_p: float = 0.0,
                  seed: int = 0, pool: QueryPool | None = None, softcap: float = 0.0,
                  alibi_slopes: torch.Tensor | None = None,
                  emulate: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``dq, dk, dv`` (like q, k, v) of :func:`attn_forward`, given ``dout (B, Hq, Tq, Dv)``, the
    forward's ``out`` and ``lse`` and optionally ``dlse (B, Hq, Tq)``. With ``pool``, dq is the gradient of
    the unpooled q (rows that feed no pooled row get 0). ``dropout_p``, ``seed``, ``softcap`` and
    ``alibi_slopes`` as given to the forward (the slopes get no gradient); ``emulate`` as there."""
    ext, kind, p, keep = _dense_params(q, k, v, mask, scale, window_left, window_right, diag_offset, dropout_p, seed,
                                       pool, softcap, alibi_slopes, emulate)
    return _backward(ext, kind, p, dout, q, k, v, out, lse, dlse, pool, keep)


def _backward(ext, kind, p, dout, q, k, v, out, lse, dlse, pool, keep):
    cdt = compute_dtype(q.dtype)
    rows = (p.B, p.Hq, p.Tq)
    _check_tensor("dout", dout, device=q.device, dtype=q.dtype, shape=(*rows, p.Dv))
    _check_tensor("out", out, device=q.device, dtype=q.dtype, shape=(*rows, p.Dv))
    _check_tensor("lse", lse, device=q.device, shape=rows)
    if dlse is not None:
        _check_tensor("dlse", dlse, device=q.device, shape=rows)
    dq = _alloc(q.shape, dtype=q.dtype, device=q.device)
    dk = _alloc(k.shape, dtype=k.dtype, device=k.device)
    dv = _alloc(v.shape, dtype=v.dtype, device=v.device)
    if p.Tq == 0 or p.Tk == 0 or p.B * p.Hq == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    if pool is not None:
        dq[:, :, pool.covered_rows(q.shape[2]):].zero_()
    _launch_backward(ext, kind, p, keep, out, lse, dout, dlse, _alloc(*rows, dtype=cdt, device=q.device), dq, dk, dv)
    return dq, dk, dv


def _launch_backward(ext, kind, p, keep, out, lse, dout, dlse, delta, dq, dk, dv) -> None:
    """Point ``p`` at the backward's tensors (lse and dlse as contiguous copies in delta's dtype) and launch."""
    lse = lse.to(delta.dtype).contiguous()
    dlse = dlse.to(delta.dtype).contiguous() if dlse is not None else None
    keep += [lse, dlse, delta]
    p.o, p.so, p.lse = out.data_ptr(), _strides(ext, out), lse.data_ptr()
    p.dout, p.sdo = dout.data_ptr(), _strides(ext, dout)
    p.dlse = dlse.data_ptr() if dlse is not None else 0
    p.delta = delta.data_ptr()
    p.dq, p.dk, p.dv = dq.data_ptr(), dk.data_ptr(), dv.data_ptr()
    p.sdq, p.sdk, p.sdv = _strides(ext, dq), _strides(ext, dk), _strides(ext, dv)
    _run(ext, kind, "backward", p)


# ----------------------------------------------------------------------------------------------
# varlen (C++ CPU implementation): every sequence's tasks in one launch
# ----------------------------------------------------------------------------------------------
def _varlen_params(q, k, v, varlen, scale, window_left, window_right, dropout_p, seed, softcap, alibi_slopes):
    """q ``(1, Hq, total_q, D)``; k, v packed ``(1, Hkv, total_k, D)`` or caches ``(S, Hkv, Tc, D)``
    (:class:`effattn.reference.Varlen`)."""
    if _device_kind(q) != "cpu" or q.dtype == torch.float64:
        _fail("varlen launches run on the C++ CPU kernels (float32, float16, bfloat16)")
    S = varlen.num_seqs
    cached = k.shape[0] > 1
    if q.dim() != 4 or q.shape[0] != 1 or k.dim() != 4 or k.shape[0] != (S if cached else 1):
        _fail(f"varlen: q must be (1, Hq, total_q, D) and k (1, ...) or ({S}, ...), got q {tuple(q.shape)}, "
              f"k {tuple(k.shape)}")
    lens = [varlen.q_start, varlen.q_len, varlen.k_start, varlen.k_len]
    for name, x in zip(("q_start", "q_len", "k_start", "k_len"), lens):
        _check_tensor(name, x, device=q.device, dtype=torch.int32, shape=(S,))
    lens = [x.contiguous() for x in lens]
    kb = k.expand(1, *k.shape[1:]) if not cached else k[:1]  # shape checks only: the batch is per sequence
    vb = v.expand(1, *v.shape[1:]) if not cached else v[:1]
    ext, kind, p, keep = _dense_params(q, kb, vb, None, scale, window_left, window_right, 0, dropout_p, seed, None)
    p.k, p.v, p.sk, p.sv = k.data_ptr(), v.data_ptr(), _strides(ext, k), _strides(ext, v)
    p.B, p.stat_sh = S, p.Tq
    _set_score_mods(p, kind, softcap, alibi_slopes, q, keep)
    p.vl_q_start, p.vl_q_len, p.vl_k_start, p.vl_k_len = (x.data_ptr() for x in lens)
    p.vl_cached = int(cached)
    keep += lens
    return ext, kind, p, keep


def varlen_forward(q, k, v, varlen, *, scale: float, window_left: int = -1, window_right: int = -1,
                   dropout_p: float = 0.0, seed: int = 0, softcap: float = 0.0, alibi_slopes=None):
    """:func:`effattn.reference.varlen_forward` in one launch: ``out (1, Hq, total_q, Dv)`` (a view of
    ``(total_q, Hq, Dv)``), ``lse (1, Hq, total_q)``; rows of sequences without keys get 0 and -inf."""
    ext, kind, p, keep = _varlen_params(q, k, v, varlen, scale, window_left, window_right, dropout_p, seed, softcap,
                                        alibi_slopes)
    Hq, total_q = q.shape[1], q.shape[2]
    out = _alloc(total_q, Hq, v.shape[3], dtype=q.dtype).permute(1, 0, 2).unsqueeze(0)
    lse = _alloc(1, Hq, total_q, dtype=torch.float32)
    idle = _rows_without_keys(varlen, total_q)
    out[:, :, idle], lse[:, :, idle] = 0.0, float("-inf")
    if out.numel() == 0:
        return out, lse
    p.o, p.so, p.lse = out.data_ptr(), _strides(ext, out), lse.data_ptr()
    _run(ext, kind, "forward", p)
    return out, lse


def _rows_without_keys(varlen, total_q: int) -> torch.Tensor:
    """The packed rows the kernels do not write: outside every sequence, or of a sequence without keys."""
    idle = torch.ones(total_q, dtype=torch.bool)
    for _, rows, keys in varlen.sequences():
        if keys.stop > keys.start:
            idle[rows] = False
    return idle


def varlen_backward(dout, q, k, v, out, lse, dlse, varlen, *, scale: float, window_left: int = -1,
                    window_right: int = -1, dropout_p: float = 0.0, seed: int = 0, softcap: float = 0.0,
                    alibi_slopes=None):
    """Gradients ``dq, dk, dv`` (like q, k, v) of :func:`varlen_forward` in one launch; rows and cache slots
    outside every sequence get 0."""
    ext, kind, p, keep = _varlen_params(q, k, v, varlen, scale, window_left, window_right, dropout_p, seed, softcap,
                                        alibi_slopes)
    Hq, total_q, Dv = q.shape[1], q.shape[2], v.shape[3]
    for name, x, shape in (("dout", dout, (1, Hq, total_q, Dv)), ("out", out, (1, Hq, total_q, Dv)),
                           ("lse", lse, (1, Hq, total_q)), ("dlse", dlse, (1, Hq, total_q))):
        if x is not None:
            _check_tensor(name, x, device=q.device, shape=shape)
    dq = _alloc(total_q, Hq, q.shape[3], dtype=q.dtype).permute(1, 0, 2).unsqueeze(0)
    dq[:, :, _rows_without_keys(varlen, total_q)] = 0.0
    dk, dv = (torch.zeros(x.shape[0], x.shape[2], x.shape[1], x.shape[3], dtype=x.dtype).permute(0, 2, 1, 3)
              for x in (k, v))  # slots no sequence uses keep 0
    if total_q and k.shape[2]:
        _launch_backward(ext, kind, p, keep, out, lse, dout, dlse, torch.empty(1, Hq, total_q), dq, dk, dv)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# block-sparse attention
# ----------------------------------------------------------------------------------------------
def _block_list(ext, num: torch.Tensor, idx: torch.Tensor, B: int, H: int, n_blocks: int, n_other: int,
                name: str, device, keep: list):
    _check_tensor(f"{name} counts", num, device=device, dtype=torch.int32)
    _check_tensor(f"{name} indices", idx, device=device, dtype=torch.int32)
    if num.dim() != 3 or idx.dim() != 4 or num.shape[-1] != n_blocks or idx.shape[-2] != n_blocks:
        _fail(f"{name}: block lists of shapes {tuple(num.shape)}, {tuple(idx.shape)} do not fit {n_blocks} blocks")
    try:
        num = num.expand(B, H, n_blocks)
        idx = idx.expand(B, H, n_blocks, idx.shape[-1])
    except RuntimeError:
        _fail(f"{name}: block lists of (B, H) = {tuple(num.shape[:2])} do not broadcast to {(B, H)}")
    if device.type == "cpu" and num.numel():  # values (a GPU check would synchronise: BlockMask.check does it)
        if int(num.min()) < 0 or int(num.max()) > idx.shape[-1]:
            _fail(f"{name}: block counts out of range [0, {idx.shape[-1]}]")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n_other):
            used = torch.arange(idx.shape[-1], device=device) < num[..., None]
            vals = idx[used]
            if vals.numel() and (int(vals.min()) < 0 or int(vals.max()) >= n_other):
                _fail(f"{name}: block indices out of range [0, {n_other})")
    keep += [num, idx]
    lst = ext.BlockList()
    lst.num, lst.idx = num.data_ptr(), idx.data_ptr()
    lst.num_sb, lst.num_sh, lst.num_sm = num.stride()
    lst.idx_sb, lst.idx_sh, lst.idx_sm, lst.idx_sn = idx.stride()
    return lst


def _sparse_params(q, k, v, block_mask, key_padding_mask, scale, backward: bool, emulate: bool = False):
    kind = _device_kind(q, emulate)
    _check_qkv(q, k, v, kind)
    ext = _module(emulate)
    bm = block_mask
    B, Hq, Tq, _ = q.shape
    Tk = k.shape[2]
    if (bm.q_len, bm.kv_len) != (Tq, Tk):
        _fail(f"block_mask was built for {(bm.q_len, bm.kv_len)}, q and k have {(Tq, Tk)}")
    BQ, BKV = bm.block_size
    if kind == "cuda" and min(BQ, BKV) < limits.CUDA_MIN_SPARSE_BLOCK:
        _fail(f"the CUDA block-sparse kernels need block sizes >= {limits.CUDA_MIN_SPARSE_BLOCK}, the mask has "
              f"{BQ} x {BKV}")
    p = _params(ext, q, k, v, scale=scale, kind=kind)
    p.sparse, p.block_q, p.block_kv = 1, BQ, BKV
    nqb, nkb = -(-Tq // BQ), -(-Tk // BKV)
    keep: list[torch.Tensor] = []
    p.kv_partial = _block_list(ext, bm.kv_num_blocks, bm.kv_indices, B, Hq, nqb, nkb, "kv", q.device, keep)
    p.kv_full = _block_list(ext, bm.full_kv_num_blocks, bm.full_kv_indices, B, Hq, nqb, nkb, "full kv", q.device,
                            keep)
    if backward:
        p.q_partial = _block_list(ext, bm.q_num_blocks, bm.q_indices, B, Hq, nkb, nqb, "q", q.device, keep)
        p.q_full = _block_list(ext, bm.full_q_num_blocks, bm.full_q_indices, B, Hq, nkb, nqb, "full q", q.device,
                               keep)
    rule = bm.rule
    if rule is not None:
        p.rule_window_left, p.rule_window_right = rule.window_left, rule.window_right
        p.rule_diag_offset, p.rule_n_global = rule.diag_offset, rule.n_global
        if rule.q_segments is not None:
            qs = rule.q_segments.to(q.device, torch.int32)
            ks = rule.kv_segments.to(q.device, torch.int32)
            if qs.shape[-1] != Tq or ks.shape[-1] != Tk or qs.shape[0] not in (1, B) or ks.shape[0] not in (1, B):
                _fail(f"segment ids {tuple(qs.shape)}, {tuple(ks.shape)} do not fit (B, Tq), (B, Tk)")
            qs, ks = qs.expand(B, Tq), ks.expand(B, Tk)
            keep += [qs, ks]
            p.q_seg, p.kv_seg = qs.data_ptr(), ks.data_ptr()
            p.q_seg_sb, p.q_seg_st = qs.stride()
            p.kv_seg_sb, p.kv_seg_st = ks.stride()
    if key_padding_mask is not None:
        _check_tensor("key_padding_mask", key_padding_mask, device=q.device, dtype=torch.bool, shape=(B, Tk))
        _set_mask(ext, p, key_padding_mask[:, None, None, :], q, keep)
    return ext, kind, p, keep


def sparse_forward(q, k, v, block_mask, key_padding_mask=None, *, scale: float, emulate: bool = False):
    """Block-sparse forward over a validated :class:`effattn.BlockMask` for ``(Tq, Tk)``; key_padding_mask
    None or bool ``(B, Tk)``. Returns ``out (B, Hq, Tq, Dv)``, ``lse (B, Hq, Tq)``. ``emulate``: as
    :func:`attn_forward`."""
    ext, kind, p, keep = _sparse_params(q, k, v, block_mask, key_padding_mask, scale, backward=False, emulate=emulate)
    return _forward(ext, kind, p, q, keep)


def sparse_backward(dout, q, k, v, out, lse, dlse, block_mask, key_padding_mask=None, *, scale: float,
                    emulate: bool = False):
    """Gradients ``dq, dk, dv`` of :func:`sparse_forward` (``dlse``: gradient of lse, or None)."""
    ext, kind, p, keep = _sparse_params(q, k, v, block_mask, key_padding_mask, scale, backward=True, emulate=emulate)
    return _backward(ext, kind, p, dout, q, k, v, out, lse, dlse, None, keep)
