"""Launchers of the C++ CPU relative-position attention (``csrc/cpu/relpos_tiled.cpp``).

Fill a ``RelposParams`` of raw addresses and element strides from tensors, after checking everything
a raw-pointer launcher needs (devices, dtypes, shapes, the table's length), as :mod:`effattn.cuda_ops`
does for the other launchers. Semantics: :func:`effattn.reference.relpos_attention`. Outputs come from
:data:`_alloc` (tests swap in a NaN-filling allocator). Dropout draws the Philox bits of the reference
(:func:`effattn.reference.dropout_keep` on the counters key, query row, ``b * Hq + h``).
"""

from __future__ import annotations

import torch

from effattn import _ext, limits
from effattn.reference import DROPOUT_BITS, dropout_threshold

# Every output buffer comes from here (tests swap in a NaN-filling allocator).
_alloc = torch.empty

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# (query rows, keys) of a tile: a tile reads rel_stride * (rows - 1) + keys table rows, so keys >> rows
# keeps the band GEMM near the cost of the content GEMM (1.25x at rel_stride 1, 1.5x at 2). 64 rows: the
# GEMMs' output tiles are 64 floats wide (four AVX-512 vectors); against (32, 128), in CPU time on an
# Intel Xeon, H=12, D=64, T=1024, token types: forward -27 % (rel_stride 1) / -30 % (2), forward +
# backward -22 % / -16 %. profile.RELPOS_TILE counts the band FLOPs with this tile.
CPU_TILE = (64, 256)
SEED_LIMIT = 2**64  # the Philox key: two 32-bit words


def _fail(msg: str):
    raise ValueError(f"effattn relpos launcher: {msg}")


def _check(name, x, *, device, dtype=None, shape=None):
    if not isinstance(x, torch.Tensor) or x.layout != torch.strided:
        _fail(f"{name} must be a dense torch.Tensor")
    if x.device != device:
        _fail(f"{name} is on {x.device}, expected {device}")
    if dtype is not None and x.dtype != dtype:
        _fail(f"{name} has dtype {x.dtype}, expected {dtype}")
    if shape is not None and tuple(x.shape) != tuple(shape):
        _fail(f"{name} has shape {tuple(x.shape)}, expected {tuple(shape)}")


def _params(q, k, v, qr, R, tt, q_types, k_types, key_padding_mask, *, rel_stride, separate_cls, cls_type, scale,
            dropout_p, seed, keep: list):
    if q.device.type != "cpu":
        _fail(f"tensors must be on the CPU, got {q.device}")
    if q.dtype not in DTYPES:
        _fail(f"dtype {q.dtype} is not supported (float32, float16, bfloat16)")
    B, Hq, Tq, D = q.shape
    _, Hkv, Tk, _ = k.shape
    Dv = v.shape[3]
    NR = rel_stride * (Tq - 1) + Tk
    dev = q.device
    _check("k", k, device=dev, dtype=q.dtype, shape=(B, Hkv, Tk, D))
    _check("v", v, device=dev, dtype=q.dtype, shape=(B, Hkv, Tk, Dv))
    _check("qr", qr, device=dev, dtype=q.dtype, shape=(B, Hq, Tq, D))
    _check("R", R, device=dev, dtype=q.dtype, shape=(Hq, NR, D))
    if Hkv < 1 or Hq % Hkv or D < 1 or Dv < 1 or max(Tq, Tk, NR) > limits.EXT_MAX_LEN:
        _fail(f"unsupported sizes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        _fail(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if dropout_p and (not 0.0 < dropout_p < 1.0 or dropout_threshold(dropout_p) >= 1 << DROPOUT_BITS):
        _fail(f"dropout_p must be in [0, 1), got {dropout_p}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        _fail(f"seed must be an int in [0, 2**64), got {seed!r}")
    ext = _ext.load()
    p = ext.RelposParams()
    p.q, p.k, p.v, p.qr, p.R = q.data_ptr(), k.data_ptr(), v.data_ptr(), qr.data_ptr(), R.data_ptr()
    p.sq, p.sk, p.sv, p.sqr = (ext.Strides4(*x.stride()) for x in (q, k, v, qr))
    p.sR = ext.Strides4(0, *R.stride())
    if tt is not None:
        _check("tt", tt, device=dev, dtype=q.dtype, shape=(B, Hq, Tq, 2))
        qt = q_types.to(device=dev, dtype=torch.int32).contiguous()
        kt = k_types.to(device=dev, dtype=torch.int32).contiguous()
        _check("q_types", qt, device=dev, shape=(B, Tq))
        _check("k_types", kt, device=dev, shape=(B, Tk))
        keep += [qt, kt]
        p.tt, p.stt = tt.data_ptr(), ext.Strides4(*tt.stride())
        p.q_types, p.k_types = qt.data_ptr(), kt.data_ptr()
    if key_padding_mask is not None:
        m = key_padding_mask.to(device=dev, dtype=torch.uint8).contiguous()
        _check("key_padding_mask", m, device=dev, shape=(B, Tk))
        keep.append(m)
        p.kpm = m.data_ptr()
    p.B, p.Hq, p.Hkv, p.Tq, p.Tk, p.NR, p.D, p.Dv = B, Hq, Hkv, Tq, Tk, NR, D, Dv
    p.dtype = _DTYPE_CODES[q.dtype]
    p.scale = float(scale)
    p.rel_stride, p.separate_cls, p.cls_type = int(rel_stride), int(separate_cls), int(cls_type)
    p.dropout_p, p.seed = float(dropout_p), seed
    p.tile_m, p.tile_n = CPU_TILE
    p.num_threads = torch.get_num_threads()
    return ext, p


def relpos_forward(q, k, v, qr, R, tt, q_types, k_types, key_padding_mask, *, rel_stride: int,
                   separate_cls: bool, cls_type: int, scale: float, dropout_p: float = 0.0,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out (B, Hq, Tq, Dv) in q's dtype, lse (B, Hq, Tq) float32)``; ``lse`` of the undropped scores."""
    B, Hq, Tq, _ = q.shape
    Tk, Dv = k.shape[2], v.shape[3]
    out = _alloc(B, Hq, Tq, Dv, dtype=q.dtype, device=q.device)
    lse = _alloc(B, Hq, Tq, dtype=torch.float32, device=q.device)
    if Tk == 0:  # no key: every row is empty
        return out.zero_(), lse.fill_(float("-inf"))
    keep: list = []
    ext, p = _params(q, k, v, qr, R, tt, q_types, k_types, key_padding_mask, rel_stride=rel_stride,
                     separate_cls=separate_cls, cls_type=cls_type, scale=scale, dropout_p=dropout_p, seed=seed,
                     keep=keep)
    p.o, p.so, p.lse = out.data_ptr(), ext.Strides4(*out.stride()), lse.data_ptr()
    ext.cpu_relpos_forward(p)
    return out, lse


def relpos_backward(dout, q, k, v, qr, R, tt, q_types, k_types, key_padding_mask, out, lse, dlse, *,
                    rel_stride: int, separate_cls: bool, cls_type: int, scale: float, dropout_p: float = 0.0,
                    seed: int = 0):
    """``(dq, dk, dv, dqr, dR, dtt)`` in the dtypes of their inputs (dtt None without tt); ``dropout_p`` and
    ``seed`` those of the forward."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk, Dv = k.shape[1], k.shape[2], v.shape[3]
    NR = R.shape[1]
    f32 = dict(dtype=torch.float32, device=q.device)
    dq, dqr = _alloc(B, Hq, Tq, D, **f32), _alloc(B, Hq, Tq, D, **f32)
    dk, dv = _alloc(B, Hkv, Tk, D, **f32), _alloc(B, Hkv, Tk, Dv, **f32)
    dR = _alloc(Hq, NR, D, **f32)
    dtt = _alloc(B, Hq, Tq, 2, **f32) if tt is not None else None
    if Tk == 0 or Tq == 0 or B == 0:
        for g in (dq, dqr, dk, dv, dR, dtt):
            if g is not None:
                g.zero_()
    else:
        _check("dout", dout, device=q.device, dtype=q.dtype, shape=(B, Hq, Tq, Dv))
        _check("out", out, device=q.device, dtype=q.dtype, shape=(B, Hq, Tq, Dv))
        _check("lse", lse, device=q.device, dtype=torch.float32, shape=(B, Hq, Tq))
        delta = (dout.float() * out.float()).sum(-1)
        if dlse is not None:
            _check("dlse", dlse, device=q.device, shape=(B, Hq, Tq))
            delta = delta - dlse.float()
        delta = delta.contiguous()
        lse = lse.contiguous()
        keep: list = [delta, lse]
        ext, p = _params(q, k, v, qr, R, tt, q_types, k_types, key_padding_mask, rel_stride=rel_stride,
                         separate_cls=separate_cls, cls_type=cls_type, scale=scale, dropout_p=dropout_p, seed=seed,
                         keep=keep)
        p.dout, p.sdo, p.lse, p.delta = dout.data_ptr(), ext.Strides4(*dout.stride()), lse.data_ptr(), delta.data_ptr()
        p.dq, p.dk, p.dv, p.dqr, p.dR = dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), dqr.data_ptr(), dR.data_ptr()
        if dtt is not None:
            p.dtt = dtt.data_ptr()
        ext.cpu_relpos_backward(p)
    dt = q.dtype
    return (dq.to(dt), dk.to(dt), dv.to(dt), dqr.to(dt), dR.to(R.dtype),
            None if dtt is None else dtt.to(tt.dtype))
