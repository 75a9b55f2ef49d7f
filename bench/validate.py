"""Each provider's output checked against effattn's reference before it is timed.

The reference is :func:`effattn.reference.attention_forward` / ``attention_backward`` on upcast
inputs: float64, except half-precision inputs on CUDA, where float32 is used to keep the sweep
short (its own error, about 1e-6, is three orders below the half-precision tolerances). The
tolerances are the project's one table, :data:`effattn.testing.TOLERANCES`: the output against the
``fwd`` row, the gradients (modes ``bwd`` and ``fwd+bwd``) against the ``grad`` row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bench.cases import Case

GRAD_NAMES = ("dq", "dk", "dv")


@dataclass
class Inputs:
    """One input set: ``q (B, Hq, Tq, D)``, ``k, v (B, Hkv, Tk, D)``, ``dout (B, Hq, Tq, D)``."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor

    @property
    def qkv(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.q, self.k, self.v

    @property
    def qkv_inference(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v detached (same storage): a forward-only call sees inputs that need no gradient."""
        return self.q.detach(), self.k.detach(), self.v.detach()


@dataclass
class Reference:
    """Reference output ``(B, Hq, Tq, D)`` and, once asked for, gradients ``(dq, dk, dv)``."""

    out: torch.Tensor
    lse: torch.Tensor
    grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


def reference_dtype(case: Case) -> torch.dtype:
    half = case.torch_dtype in (torch.float16, torch.bfloat16)
    return torch.float32 if half and case.device == "cuda" else torch.float64


def _mask_kwargs(case: Case) -> dict:
    return dict(scale=1.0 / math.sqrt(case.headdim), window_right=0 if case.causal else -1,
                diag_offset=case.seqlen_k - case.seqlen_q)


def compute_reference(case: Case, inputs: Inputs, ref: Reference | None = None) -> Reference:
    """The reference for ``case`` on ``inputs``; gradients added when ``case`` needs them (reusing ``ref``)."""
    from effattn.reference import attention_backward, attention_forward

    dt = reference_dtype(case)
    q, k, v = (x.detach().to(dt) for x in inputs.qkv)
    if ref is None:
        out, lse = attention_forward(q, k, v, **_mask_kwargs(case))
        ref = Reference(out=out, lse=lse)
    if case.needs_grad and ref.grads is None:
        ref.grads = attention_backward(inputs.dout.to(dt), q, k, v, ref.out, ref.lse, **_mask_kwargs(case))
    return ref


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``||x - ref|| / ||ref||`` in float64 (NaN when x has a NaN)."""
    x, ref = x.detach().double(), ref.detach().double()
    return float(torch.linalg.vector_norm(x - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-300))


def check(case: Case, outputs: dict[str, torch.Tensor], ref: Reference) -> tuple[float, str | None]:
    """Compare ``outputs`` (``out`` and, for backward modes, ``dq, dk, dv``) with ``ref``.

    Returns the largest relative error and, when an output is out of tolerance (or NaN), a message.
    """
    from effattn.testing import TOLERANCES, max_violation

    expected = {"out": ref.out}
    if case.needs_grad:
        expected.update(zip(GRAD_NAMES, ref.grads))
    worst, failures = 0.0, []
    for name, want in expected.items():
        got = outputs[name]
        if got.shape != want.shape:
            failures.append(f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}")
            continue
        atol, rtol = TOLERANCES[case.torch_dtype]["fwd" if name == "out" else "grad"]
        err = relative_error(got, want)
        worst = err if math.isnan(err) else max(worst, err)
        violation = max_violation(got, want, atol, rtol)
        if violation > 0:
            failures.append(f"{name}: rel err {err:.2e}, out of atol={atol:g}, rtol={rtol:g} by {violation:.2e}")
    return worst, ("; ".join(failures) or None)


def provider_outputs(case: Case, attn, inputs: Inputs) -> dict[str, torch.Tensor]:
    """Run ``attn`` on ``inputs`` as ``case.mode`` needs: the output and, for backward modes, the gradients."""
    if not case.needs_grad:
        with torch.no_grad():
            return {"out": attn(*inputs.qkv_inference)}
    out = attn(*inputs.qkv)
    grads = torch.autograd.grad(out, inputs.qkv, inputs.dout)
    return {"out": out.detach(), **dict(zip(GRAD_NAMES, grads))}
