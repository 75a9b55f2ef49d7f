"""Backends and dispatch.

A backend declares what it supports and, for an input it cannot run, the reasons why (as xformers'
``not_supported_reasons``). ``backend=None`` takes the first backend of :data:`AUTO_ORDER` with no
reasons; a named backend (argument or ``EFFATTN_BACKEND``) is used or raises with its reasons.
Nothing falls back silently to different semantics: every backend computes the same function
(:mod:`effattn.reference`).
"""

from __future__ import annotations

import abc
import functools
import os
from dataclasses import dataclass

import torch

from effattn import limits, reference

ENV_BACKEND = "EFFATTN_BACKEND"
AUTO = ("", "auto")
MASK_KINDS = ("none", "bool", "additive")  # AttentionCall.mask: no mask, keep/drop, added to the scores


class UnsupportedInputError(ValueError):
    """No backend (or not the one asked for) can run this input; the message lists the reasons."""


@dataclass(frozen=True)
class AttentionCall:
    """What a backend needs to know about a call to decide whether it can run it.

    ``Tq`` is the length of the output rows (the pooled length for pooled attention); ``heads`` the
    number of query heads; ``mask`` one of :data:`MASK_KINDS`; ``block_size`` the ``(BLOCK_Q,
    BLOCK_KV)`` of the BlockMask of a block-sparse call, None for a dense one; ``softcap`` and ``alibi``:
    whether the call soft-caps its scores or adds ALiBi biases (:mod:`effattn.reference`); ``varlen``: a call of
    :func:`effattn.varlen_attention` (``Tq``/``Tk`` then its longest sequences, ``batch`` the sequences).
    """

    device: torch.device
    dtype: torch.dtype
    head_dim_qk: int
    head_dim_v: int
    Tq: int
    Tk: int
    dropout: bool
    batch: int = 1
    heads: int = 1
    pool: reference.QueryPool | None = None
    mask: str = "none"
    block_size: tuple[int, int] | None = None
    softcap: bool = False  # scores soft-capped (softcap > 0)
    alibi: bool = False  # ALiBi slopes given
    varlen: bool = False  # packed variable-length sequences (effattn.varlen_attention)

    def __post_init__(self):
        if self.mask not in MASK_KINDS:
            raise ValueError(f"mask must be one of {MASK_KINDS}, got {self.mask!r}")

    @property
    def sparse(self) -> bool:
        """A block-sparse call (over a BlockMask)."""
        return self.block_size is not None


class Backend(abc.ABC):
    """Base class: ``name``, machine-level :meth:`unavailable_reasons`, per-call :meth:`not_supported_reasons`."""

    name = ""
    description = ""

    def unavailable_reasons(self) -> list[str]:
        return []

    def not_supported_reasons(self, call: AttentionCall, forced: bool = False) -> list[str]:
        return []

    @abc.abstractmethod
    def forward(self, q, k, v, mask, **kw):
        """``(out, lse)`` of :func:`effattn.reference.attention_forward`'s signature."""

    @abc.abstractmethod
    def backward(self, dout, q, k, v, out, lse, mask, dlse, **kw):
        """``(dq, dk, dv)`` of :func:`effattn.reference.attention_backward`'s signature."""

    @abc.abstractmethod
    def sparse_forward(self, q, k, v, block_mask, key_padding_mask, *, scale):
        """``(out, lse)`` of block-sparse attention over an :class:`effattn.BlockMask`."""

    @abc.abstractmethod
    def sparse_backward(self, dout, q, k, v, out, lse, dlse, block_mask, key_padding_mask, *, scale):
        """``(dq, dk, dv)`` of :meth:`sparse_forward` (``dlse``: gradient of lse, or None)."""

    # -- relative-position ("band") attention, effattn.relpos_attention: optional --
    def relpos_reasons(self, call: AttentionCall) -> list[str]:
        """Why this backend cannot run relative-position attention on ``call`` (on top of
        :meth:`not_supported_reasons`); a backend without it says so."""
        return [f"relative-position attention is not implemented in the {self.name} backend"]

    def relpos_forward(self, q, k, v, qr, R, tt, q_types, k_types, key_padding_mask, **kw):
        """``(out, lse)`` of :func:`effattn.reference.relpos_attention` (``kw``: rel_stride,
        separate_cls, cls_type, scale, dropout_p, seed)."""
        raise NotImplementedError(self.relpos_reasons(None)[0])

    def relpos_backward(self, dout, q, k, v, qr, R, tt, q_types, k_types, key_padding_mask, out, lse, dlse, **kw):
        """``(dq, dk, dv, dqr, dR, dtt)`` of :meth:`relpos_forward` (dR summed over the batch, dtt None
        without tt)."""
        raise NotImplementedError(self.relpos_reasons(None)[0])


def _grid_reasons(call: AttentionCall, most: int) -> list[str]:
    if max(call.batch, call.heads) > most:
        return [f"batch ({call.batch}) and heads ({call.heads}) must each be <= {most} (CUDA launch grid)"]
    return []


def _score_mod_reasons(call: AttentionCall, where: str, softcap: bool = False, alibi: bool = False) -> list[str]:
    """Reasons for the score modifiers ``call`` uses that ``where`` lacks (``softcap``/``alibi``: it has them)."""
    reasons = []
    if call.softcap and not softcap:
        reasons.append(f"softcap is not implemented in {where}")
    if call.alibi and not alibi:
        reasons.append(f"alibi_slopes is not implemented in {where}")
    return reasons


def _pool_reasons(call: AttentionCall) -> list[str]:
    if call.pool is not None and call.pool.separate_cls and call.pool.stride == 1:
        return ["separate_cls with stride 1 (the [cls] row would be pooled twice)"]
    return []


def _visible_rows(block_mask, key_padding_mask):
    """``(r0, r1) -> bool (B|1, H|1, r1 - r0, Tk)``: the mask's visibility of a chunk of query rows."""

    def rows(r0: int, r1: int) -> torch.Tensor:
        visible = block_mask.dense_rows(r0, r1)
        return visible if key_padding_mask is None else visible & key_padding_mask[:, None, None, :]

    return rows


class ReferenceBackend(Backend):
    """Chunked PyTorch implementation: any device, no T x T matrix, float64 capable."""

    name = "reference"
    description = "chunked PyTorch attention (CPU path and test reference)"
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

    def not_supported_reasons(self, call, forced=False):
        return [] if call.dtype in self.dtypes else [f"dtype {call.dtype} not supported"]

    def forward(self, q, k, v, mask, *, varlen=None, **kw):
        if varlen is not None:
            return reference.varlen_forward(q, k, v, varlen, **kw)
        return reference.attention_forward(q, k, v, mask, **kw)

    def backward(self, dout, q, k, v, out, lse, mask, dlse, *, varlen=None, **kw):
        if varlen is not None:
            return reference.varlen_backward(dout, q, k, v, out, lse, dlse, varlen, **kw)
        return reference.attention_backward(dout, q, k, v, out, lse, mask, dlse, **kw)

    def sparse_forward(self, q, k, v, block_mask, key_padding_mask, *, scale):
        return reference.sparse_attention_forward(q, k, v, _visible_rows(block_mask, key_padding_mask), scale=scale)

    def sparse_backward(self, dout, q, k, v, out, lse, dlse, block_mask, key_padding_mask, *, scale):
        return reference.sparse_attention_backward(dout, q, k, v, out, lse, dlse,
                                                   _visible_rows(block_mask, key_padding_mask), scale=scale)

    def relpos_reasons(self, call):
        return []

    def relpos_forward(self, q, k, v, qr, R, tt, q_types, k_types, key_padding_mask, **kw):
        return reference.relpos_attention(q, k, v, qr, R, tt=tt, q_types=q_types, k_types=k_types,
                                          key_padding_mask=key_padding_mask, **kw)

    def relpos_backward(self, dout, q, k, v, qr, R, tt, q_types, k_types, key_padding_mask, out, lse, dlse, **kw):
        return reference.relpos_attention_backward(dout, q, k, v, qr, R, tt, q_types, k_types, key_padding_mask, out,
                                                   lse, dlse, **kw)


class TritonBackend(Backend):
    """The Triton kernels of ``effattn.kernels``: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``."""

    name = "triton"
    description = "Triton flash-attention kernels (fwd + bwd)"
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    # effattn.limits says why each limit is what it is
    max_head_dim_qk = limits.TRITON_MAX_HEAD_DIM_QK
    max_head_dim_qk_fp32 = limits.TRITON_MAX_HEAD_DIM_QK_FP32
    max_head_dim_v = limits.TRITON_MAX_HEAD_DIM_V
    max_grid_yz = limits.MAX_GRID_YZ
    max_pool_stride = limits.TRITON_MAX_POOL_STRIDE

    @functools.cached_property
    def _import_error(self) -> str | None:
        try:
            import triton  # noqa: F401
        except Exception as e:  # pragma: no cover - depends on the machine
            return f"triton cannot be imported ({type(e).__name__}: {e})"
        return None

    @property
    def interpret(self) -> bool:
        return os.environ.get("TRITON_INTERPRET", "0") == "1"

    def unavailable_reasons(self):
        reasons = [self._import_error] if self._import_error else []
        if not reasons and not torch.cuda.is_available() and not self.interpret:
            reasons.append("no CUDA device (set TRITON_INTERPRET=1 before importing triton to interpret on CPU)")
        return reasons

    def not_supported_reasons(self, call, forced=False):
        reasons = self.unavailable_reasons()
        if call.device.type == "cpu":
            if not self.interpret:
                reasons.append("CPU tensors need the Triton interpreter (TRITON_INTERPRET=1)")
            elif not forced:
                reasons.append("CPU tensors run the interpreted kernels only when asked for by name (testing)")
        elif call.device.type != "cuda":
            reasons.append(f"device type {call.device.type!r} not supported")
        if call.dtype not in self.dtypes:
            reasons.append(f"dtype {call.dtype} not supported (float16, bfloat16, float32)")
        for what, d, most in (("q/k", call.head_dim_qk, self.max_head_dim_qk), ("v", call.head_dim_v,
                                                                                self.max_head_dim_v)):
            if d > most:
                reasons.append(f"head dim of {what} is {d}, more than {most}")
        if call.dtype == torch.float32 and self.max_head_dim_qk_fp32 < call.head_dim_qk <= self.max_head_dim_qk:
            reasons.append(f"float32 with a q/k head dim above {self.max_head_dim_qk_fp32} (is {call.head_dim_qk}) "
                           "does not fit in shared memory: use float16/bfloat16")
        reasons += _grid_reasons(call, self.max_grid_yz)
        if call.dropout and max(call.Tq, call.Tk) > limits.DROPOUT_MAX_LEN:
            reasons.append("dropout needs sequence lengths below 2**32 (32-bit Philox counters)")
        if call.pool is not None and call.pool.stride > self.max_pool_stride:
            reasons.append(f"pooling stride {call.pool.stride} is more than {self.max_pool_stride}")
        return reasons + _pool_reasons(call) + _score_mod_reasons(call, "the Triton kernels", softcap=True, alibi=True)

    @property
    def _kernels(self):
        from effattn.kernels import flash_attn
        return flash_attn

    def forward(self, q, k, v, mask, **kw):
        return self._kernels.flash_attn_forward(q, k, v, mask, **kw)

    def backward(self, dout, q, k, v, out, lse, mask, dlse, **kw):
        return self._kernels.flash_attn_backward(dout, q, k, v, out, lse, mask, dlse, **kw)

    def sparse_forward(self, q, k, v, block_mask, key_padding_mask, *, scale):
        from effattn.kernels import block_sparse_attn
        return block_sparse_attn.sparse_attn_forward(q, k, v, block_mask, key_padding_mask, scale=scale)

    def sparse_backward(self, dout, q, k, v, out, lse, dlse, block_mask, key_padding_mask, *, scale):
        from effattn.kernels import block_sparse_attn
        return block_sparse_attn.sparse_attn_backward(dout, q, k, v, out, lse, block_mask, key_padding_mask,
                                                      dlse=dlse, scale=scale)

    @functools.cached_property
    def _relpos_kernels(self):
        try:
            from effattn.kernels import relpos_attn
        except Exception as e:  # the file is optional: no kernel, a reason
            return f"the relative-position Triton kernels cannot be imported ({type(e).__name__}: {e})"
        missing = [n for n in ("relpos_attn_forward", "relpos_attn_backward") if not hasattr(relpos_attn, n)]
        return f"kernels/relpos_attn.py lacks {', '.join(missing)}" if missing else relpos_attn

    def relpos_reasons(self, call):
        kernels = self._relpos_kernels
        if isinstance(kernels, str):
            return [kernels]
        reasons = []
        dtypes = getattr(kernels, "SUPPORTED_DTYPES", self.dtypes)
        if call is not None and call.dtype not in dtypes:
            reasons.append(f"dtype {call.dtype} not supported by the relative-position kernels")
        most = getattr(kernels, "MAX_HEAD_DIM", None)
        if call is not None and most is not None and max(call.head_dim_qk, call.head_dim_v) > most:
            reasons.append(f"head dims above {most} are not supported by the relative-position kernels")
        return reasons

    def relpos_forward(self, q, k, v, qr, R, tt, q_types, k_types, key_padding_mask, **kw):
        return self._relpos_kernels.relpos_attn_forward(q, k, v, qr, R, tt, q_types, k_types, key_padding_mask, **kw)

    def relpos_backward(self, dout, q, k, v, qr, R, tt, q_types, k_types, key_padding_mask, out, lse, dlse, **kw):
        return self._relpos_kernels.relpos_attn_backward(dout, q, k, v, qr, R, tt, q_types, k_types,
                                                         key_padding_mask, out, lse, dlse, **kw)


class _ExtensionBackend(Backend):
    """Common part of the backends of the compiled extension (``csrc/``, loaded by :mod:`effattn._ext`).

    The extension is built at install time when possible, else on first use (JIT): only a call that
    names the backend (``forced``) builds it; probing (automatic dispatch, ``effattn.info``) does not.
    """

    device_type = ""
    dtypes: tuple[torch.dtype, ...] = ()

    def _extension_reasons(self, build: bool) -> list[str]:
        from effattn import _ext
        if not build and not _ext.is_ready():
            return ["the extension is not built yet (it is built on first use with backend=" f"{self.name!r})"]
        why = _ext.unavailable_reason()
        return [why] if why else []

    def unavailable_reasons(self):
        return self._extension_reasons(build=False)

    def not_supported_reasons(self, call, forced=False):
        reasons = self._extension_reasons(build=forced)
        if call.device.type != self.device_type:
            reasons.append(f"tensors must be on {self.device_type}, got {call.device.type}")
        if call.dtype not in self.dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in self.dtypes)
            reasons.append(f"dtype {call.dtype} not supported ({names})")
        if max(call.Tq, call.Tk) > limits.EXT_MAX_LEN:
            reasons.append("sequence lengths must be below 2**31")
        return reasons + _pool_reasons(call)

    @property
    def _ops(self):
        from effattn import cuda_ops
        return cuda_ops

    def forward(self, q, k, v, mask, *, varlen=None, **kw):
        if varlen is not None:  # CppBackend only (CUDA declines): one launch; float64 one dense launch per sequence
            if q.dtype == torch.float64:
                return reference.varlen_forward(q, k, v, varlen, forward=self._ops.attn_forward, **kw)
            return self._ops.varlen_forward(q, k, v, varlen, **kw)
        return self._ops.attn_forward(q, k, v, mask, **kw)

    def backward(self, dout, q, k, v, out, lse, mask, dlse, *, varlen=None, **kw):
        if varlen is not None:
            if q.dtype == torch.float64:
                return reference.varlen_backward(dout, q, k, v, out, lse, dlse, varlen,
                                                 backward=self._ops.attn_backward, **kw)
            return self._ops.varlen_backward(dout, q, k, v, out, lse, dlse, varlen, **kw)
        return self._ops.attn_backward(dout, q, k, v, out, lse, mask, dlse, **kw)

    def sparse_forward(self, q, k, v, block_mask, key_padding_mask, *, scale):
        return self._ops.sparse_forward(q, k, v, block_mask, key_padding_mask, scale=scale)

    def sparse_backward(self, dout, q, k, v, out, lse, dlse, block_mask, key_padding_mask, *, scale):
        return self._ops.sparse_backward(dout, q, k, v, out, lse, dlse, block_mask, key_padding_mask, scale=scale)


class CudaBackend(_ExtensionBackend):
    """The CUDA C++ kernels of ``csrc/cuda`` (mma.sync tensor cores, sm_80+): float16/bfloat16, head dims <= 128."""

    name = "cuda"
    description = "CUDA C++ flash-attention kernels (csrc/, mma.sync, fwd + bwd)"
    device_type = "cuda"
    dtypes = (torch.float16, torch.bfloat16)
    # effattn.limits says why each limit is what it is
    max_head_dim = limits.CUDA_MAX_HEAD_DIM
    min_capability = limits.CUDA_MIN_CAPABILITY
    max_grid_yz = limits.MAX_GRID_YZ
    min_sparse_block = limits.CUDA_MIN_SPARSE_BLOCK

    def _device_reasons(self) -> list[str]:
        if not torch.cuda.is_available():
            return ["no CUDA device (torch.cuda.is_available() is False)"]
        cap = torch.cuda.get_device_capability()
        if cap < self.min_capability:
            need = ".".join(map(str, self.min_capability))
            return [f"the CUDA kernels need compute capability >= {need}, the device has {cap[0]}.{cap[1]}"]
        return []

    def _extension_reasons(self, build):
        reasons = super()._extension_reasons(build)
        if not reasons:
            from effattn import _ext
            if not _ext.load().WITH_CUDA:
                reasons.append("the extension was built without CUDA (nvcc was not found when it was built)")
        return reasons

    def unavailable_reasons(self):
        return super().unavailable_reasons() + self._device_reasons()

    def not_supported_reasons(self, call, forced=False):
        reasons = super().not_supported_reasons(call, forced)
        if call.device.type == "cuda":
            reasons += self._device_reasons()
        if call.dropout:
            reasons.append("dropout is not implemented in the CUDA kernels")
        reasons += _score_mod_reasons(call, "the CUDA kernels")
        if call.varlen:
            reasons.append("varlen is not implemented in the CUDA kernels")
        for what, d in (("q/k", call.head_dim_qk), ("v", call.head_dim_v)):
            if d > self.max_head_dim:
                reasons.append(f"head dim of {what} is {d}, more than {self.max_head_dim} (the CUDA kernels pad "
                               "smaller head dims to 64 or 128)")
        if call.sparse and min(call.block_size) < self.min_sparse_block:
            reasons.append(f"the CUDA block-sparse kernels need block sizes >= {self.min_sparse_block}, the mask has "
                           f"{call.block_size[0]} x {call.block_size[1]}")
        return reasons + _grid_reasons(call, self.max_grid_yz)


class _EmulatedOps:
    """The launchers of :mod:`effattn.cuda_ops` with ``emulate=True``: the CUDA kernels on the host emulator."""

    def __getattr__(self, name):
        from effattn import cuda_ops
        return functools.partial(getattr(cuda_ops, name), emulate=True)


class CudaEmuBackend(CudaBackend):
    """The CUDA C++ kernels of ``csrc/cuda``, compiled for the host and run on the emulator of the PTX primitives
    they use (``csrc/emu``: ``mma.sync``, ``ldmatrix``, ``cp.async``, warp shuffles, barriers, with shared and
    global memory checked): CPU tensors, float16/bfloat16, everything the ``cuda`` backend runs and nothing more.
    Slow (fibers for threads); for checking the kernels without a GPU; only when named."""

    name = "cuda-emu"
    description = "the CUDA C++ kernels on a host emulator of the PTX ISA (csrc/emu; CPU tensors, slow)"
    device_type = "cpu"

    def _device_reasons(self) -> list[str]:
        return []

    def _extension_reasons(self, build):
        from effattn import _ext
        if not build and not _ext.emu_is_ready():
            return ["the emulator's module is not built yet (it is built on first use with backend='cuda-emu')"]
        why = _ext.emu_unavailable_reason()
        return [why] if why else []

    @property
    def _ops(self):
        return _EmulatedOps()


class CppBackend(_ExtensionBackend):
    """The C++ CPU implementation of the extension: the tiled algorithm of the CUDA kernels on CPU tensors."""

    name = "cpp"
    description = "C++ CPU kernels of the extension: tiled, threaded, SIMD (AVX-512 / AVX2 / portable), fwd + bwd"
    device_type = "cpu"
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

    def not_supported_reasons(self, call, forced=False):
        reasons = super().not_supported_reasons(call, forced)
        if call.dropout and max(call.Tq, call.Tk) > limits.DROPOUT_MAX_LEN:
            reasons.append("dropout needs sequence lengths below 2**32 (32-bit Philox counters)")
        reasons += _score_mod_reasons(call, "the C++ CPU kernels", softcap=True, alibi=True)
        if call.dtype == torch.float64 and not forced:
            # a scalar, single-threaded path (kept for the twin's tests): float64 goes to the reference
            reasons.append("float64 runs the reference unless backend='cpp' is named")
        return reasons

    # -- relative-position attention (csrc/cpu/relpos_tiled.cpp) --
    def relpos_reasons(self, call):
        if call is not None and call.dtype == torch.float64:
            return ["float64 is not implemented in the C++ relative-position kernel (the reference runs it)"]
        return []

    def relpos_forward(self, q, k, v, qr, R, tt, q_types, k_types, key_padding_mask, **kw):
        from effattn import relpos_cpu
        return relpos_cpu.relpos_forward(q, k, v, qr, R, tt, q_types, k_types, key_padding_mask, **kw)

    def relpos_backward(self, dout, q, k, v, qr, R, tt, q_types, k_types, key_padding_mask, out, lse, dlse, **kw):
        from effattn import relpos_cpu
        return relpos_cpu.relpos_backward(dout, q, k, v, qr, R, tt, q_types, k_types, key_padding_mask, out, lse,
                                          dlse, **kw)


BACKENDS: dict[str, Backend] = {b.name: b for b in (TritonBackend(), ReferenceBackend(), CudaBackend(), CppBackend(),
                                                    CudaEmuBackend())}
# CUDA tensors -> Triton, CPU tensors -> the C++ kernels, the reference last (float64 and whatever the others
# decline). The CUDA C++ kernels run only when named (argument or EFFATTN_BACKEND)
# until they have been checked on a GPU.
AUTO_ORDER = ("triton", "cpp", "reference")


def get_backend(name: str) -> Backend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"backend must be one of {sorted(BACKENDS)} or None, got {name!r}") from None


def _reasons(b: Backend, call: AttentionCall, forced: bool, relpos: bool) -> list[str]:
    reasons = b.not_supported_reasons(call, forced=forced)
    return reasons + b.relpos_reasons(call) if relpos else reasons


def select_backend(call: AttentionCall, backend: str | None = None, *, relpos: bool = False) -> Backend:
    """The backend to run ``call``: the named one (argument, else ``EFFATTN_BACKEND``), else the first that fits.
    ``relpos``: a relative-position attention call (:func:`effattn.relpos_attention`), which also needs the
    backend's :meth:`Backend.relpos_reasons` to be empty."""
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a str or None, got {type(backend).__name__}")
    name = backend if backend is not None else os.environ.get(ENV_BACKEND, "")
    if name not in AUTO:
        chosen = get_backend(name)
        reasons = _reasons(chosen, call, True, relpos)
        if reasons:
            source = "backend" if backend is not None else ENV_BACKEND
            raise UnsupportedInputError(f"{source}={name!r} cannot run this input: " + "; ".join(reasons))
        return chosen
    why = {}
    for candidate in AUTO_ORDER:
        reasons = _reasons(BACKENDS[candidate], call, False, relpos)
        if not reasons:
            return BACKENDS[candidate]
        why[candidate] = reasons
    lines = "\n".join(f"  {n}: {'; '.join(r)}" for n, r in why.items())
    raise UnsupportedInputError(f"no backend can run this input:\n{lines}")
