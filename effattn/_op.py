"""What every op of effattn shares: the preamble of its public function, autograd, the dropout seed and
the registration of its FLOP formula.

An op is a pair of ``torch.library`` custom ops, ``fwd(q, k, v, mask, *extra) -> (out, lse)`` and
``bwd(dout, q, k, v, out, lse, mask, dlse, *extra) -> (dq, dk, dv)``, with the same ``extra`` arguments
(scalars, and lists of tensors that need no gradient). :func:`register` wires autograd
through them and registers their FLOPs with ``torch.utils.flop_counter``; :func:`prepare` is the
check -> :class:`~effattn.backends.AttentionCall` -> backend -> default scale step of the public
functions; :func:`draw_seed` the dropout seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import register_flop_formula

from effattn import _validate
from effattn.backends import AttentionCall, select_backend
from effattn.profile import attention_flops
from effattn.reference import QueryPool

SEED_LIMIT = 2**62  # dropout seeds drawn from torch's generator lie in [0, SEED_LIMIT)


# ----------------------------------------------------------------------------------------------
# public functions: the preamble and the seed
# ----------------------------------------------------------------------------------------------
def mask_kind(mask: torch.Tensor | None) -> str:
    """:data:`effattn.backends.MASK_KINDS` entry of a mask: none, bool (keep), or additive (float)."""
    if mask is None:
        return "none"
    return "bool" if mask.dtype == torch.bool else "additive"


def prepare(q: torch.Tensor, shape: _validate.QKVShape, backend: str | None, scale: float | None, *,
            dropout_p: float = 0.0, mask: torch.Tensor | None = None, pool: QueryPool | None = None,
            block_size: tuple[int, int] | None = None, softcap: bool = False, alibi: bool = False,
            varlen: bool = False) -> tuple[str, float]:
    """The backend that runs a checked call (by name, as the ops take it) and its scale (default
    ``1 / sqrt(Dqk)``); raises :class:`~effattn.UnsupportedInputError` with the reasons when none can."""
    call = AttentionCall(device=q.device, dtype=q.dtype, head_dim_qk=shape.Dqk, head_dim_v=shape.Dv,
                         Tq=shape.Tq if pool is None else pool.pooled_len(shape.Tq), Tk=shape.Tk,
                         dropout=dropout_p > 0.0, batch=shape.B, heads=shape.Hq, pool=pool, mask=mask_kind(mask),
                         block_size=block_size, softcap=softcap, alibi=alibi, varlen=varlen)
    chosen = select_backend(call, backend)
    return chosen.name, 1.0 / math.sqrt(shape.Dqk) if scale is None else float(scale)


def draw_seed(dropout_p: float, dropout_seed: int | None) -> int:
    """The Philox seed of a call: 0 without dropout, ``dropout_seed`` when given, else drawn from torch's
    generator (so ``torch.manual_seed`` makes it reproducible)."""
    if dropout_p == 0.0:
        return 0
    if dropout_seed is not None:
        return dropout_seed
    return int(torch.randint(0, SEED_LIMIT, (), dtype=torch.int64).item())


# ----------------------------------------------------------------------------------------------
# custom ops: autograd and FLOP formulas
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _SavedList:
    """Stands in ``ctx`` for a list argument whose ``n`` tensors were saved for backward."""

    n: int


@dataclass(frozen=True)
class _SavedTensor:
    """Stands in ``ctx`` for a tensor argument (that takes no gradient) saved for backward."""


def _is_tensor_list(x) -> bool:
    return isinstance(x, (list, tuple)) and any(isinstance(t, torch.Tensor) for t in x)


def _no_grad(tensors: list):
    """The gradient of a list argument, in the structure torch.library gives it: a list of None for a
    list of tensors, None for a list that holds a None."""
    return [None] * len(tensors) if all(t is not None for t in tensors) else None


def setup_context(ctx, inputs, output):
    """Save what ``bwd`` needs: q, k, v, out, lse, mask, and the extra arguments (lists of tensors and then
    single tensors saved for backward, flattened; scalars kept as they are). Extra tensors take no gradient."""
    q, k, v, mask, *extra = inputs
    out, lse = output
    ctx.extra = [_SavedList(len(x)) if _is_tensor_list(x) else _SavedTensor() if isinstance(x, torch.Tensor) else x
                 for x in extra]
    ctx.save_for_backward(q, k, v, out, lse, mask, *(t for x in extra if _is_tensor_list(x) for t in x),
                          *(x for x in extra if isinstance(x, torch.Tensor)))


def backward_with(bwd_op):
    """Autograd backward of a forward op ``(q, k, v, mask, *extra) -> (out, lse)`` through ``bwd_op``."""

    def backward(ctx, dout, dlse):
        q, k, v, out, lse, mask, *flat = ctx.saved_tensors
        flat = iter(flat)
        extra = [[next(flat) for _ in range(x.n)] if isinstance(x, _SavedList) else x for x in ctx.extra]
        extra = [next(flat) if isinstance(x, _SavedTensor) else x for x in extra]  # saved after the lists
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = bwd_op(dout, q, k, v, out, lse, mask, dlse, *extra)
        saved = (isinstance(x, _SavedList) for x in ctx.extra)
        return dq, dk, dv, None, *(_no_grad(x) if s else None for s, x in zip(saved, extra))

    return backward


def _register_flops(op, pairs: Callable[..., int], backward: bool) -> None:
    overload = op._opoverload  # the custom op's torch.ops.<namespace>.<name>.default
    names = [a.name for a in overload._schema.arguments]

    @register_flop_formula(overload.overloadpacket, get_raw=True)
    def formula(*args, out_val=None, **kwargs) -> int:
        bound = dict(zip(names, args), **kwargs)
        q, v = bound["q"], bound["v"]
        return attention_flops(pairs(**bound), q.shape[-1], v.shape[-1], backward=backward)


def register(fwd, bwd, pairs: Callable[..., int]) -> None:
    """Autograd of the custom op ``fwd`` through ``bwd``, and the FLOP formulas of both for
    ``torch.utils.flop_counter.FlopCounterMode``: :func:`~effattn.profile.attention_flops` of
    ``pairs(**arguments)``, the (query, key) pairs computed over all (batch, query head), called with the
    op's arguments by name (``q``, ``k``, ``window_left``, ...; it takes ``**_`` for the rest)."""
    fwd.register_autograd(backward_with(bwd), setup_context=setup_context)
    _register_flops(fwd, pairs, backward=False)
    _register_flops(bwd, pairs, backward=True)
