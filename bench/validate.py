"""Each provider's output checked against the op's reference before it is timed.

The reference is the op's (:meth:`bench.ops.Op.reference`): float64, except half-precision inputs on
CUDA, where float32 is used to keep the sweep short (its own error, about 1e-6, is three orders
below the half-precision tolerances). The tolerances are the project's one table,
:data:`effattn.testing.TOLERANCES` (times the op's ``tolerance_factor``): the output against the
``fwd`` row, the gradients (modes ``bwd`` and ``fwd+bwd``) against the ``grad`` row.

A predicted block mask (op ``predict``) is checked against the same predictor run in the
reference precision: at most :data:`PREDICT_MISMATCH` of its blocks may differ (near-ties of the
scores may flip in lower precision).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bench.cases import Case
from bench.ops import OPS, Reference, reference_dtype

# Largest share of predicted blocks allowed to differ from the reference-precision prediction.
PREDICT_MISMATCH = {torch.float32: 0.01, torch.float16: 0.05, torch.bfloat16: 0.05}

__all__ = ["Inputs", "Reference", "check", "compute_reference", "grad_targets", "provider_outputs", "reference_dtype"]


@dataclass
class Inputs:
    """One input set: the op's ``args`` (leaves that require grad where the op has a backward) and ``dout``."""

    args: tuple[torch.Tensor, ...]
    dout: torch.Tensor | None

    @property
    def args_inference(self) -> tuple[torch.Tensor, ...]:
        """The args detached (same storage): a forward-only call sees inputs that need no gradient."""
        return tuple(a.detach() for a in self.args)


def compute_reference(case: Case, inputs: Inputs, context: object = None, ref: Reference | None = None) -> Reference:
    """The reference for ``case`` on ``inputs``; gradients added when ``case`` needs them (reusing ``ref``)."""
    return OPS[case.op].reference(case, inputs.args, inputs.dout, context, ref)


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``||x - ref|| / ||ref||`` in float64 (NaN when x has a NaN)."""
    x, ref = x.detach().double(), ref.detach().double()
    return float(torch.linalg.vector_norm(x - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-300))


def _check_prediction(case: Case, outputs: dict) -> tuple[float, str | None]:
    got, want = outputs["out"], outputs["expected"]
    if got.shape != want.shape:
        return math.nan, f"kept blocks: shape {tuple(got.shape)} != {tuple(want.shape)}"
    mismatch = float((got != want).double().mean())
    allowed = PREDICT_MISMATCH[case.torch_dtype]
    if mismatch > allowed:
        return mismatch, f"{mismatch:.1%} of the blocks differ from the {reference_dtype(case)} prediction " \
                         f"(at most {allowed:.0%})"
    return mismatch, None


def check(case: Case, outputs: dict[str, torch.Tensor], ref: Reference) -> tuple[float, str | None]:
    """Compare ``outputs`` (``out`` and, for backward modes, the gradients) with ``ref``.

    Returns the largest relative error (predict: the share of blocks that differ) and, when an output
    is out of tolerance (or NaN), a message.
    """
    from effattn.testing import TOLERANCES, max_violation

    op = OPS[case.op]
    if case.op == "predict":
        return _check_prediction(case, outputs)
    expected = {"out": ref.out}
    if case.needs_grad:
        expected.update(zip(op.grad_names, ref.grads))
    worst, failures = 0.0, []
    for name, want in expected.items():
        got = outputs[name]
        if got.shape != want.shape:
            failures.append(f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}")
            continue
        atol, rtol = (op.tolerance_factor * t for t in TOLERANCES[case.torch_dtype]["fwd" if name == "out" else "grad"])
        err = relative_error(got, want)
        worst = err if math.isnan(err) else max(worst, err)
        violation = max_violation(got, want, atol, rtol)
        if violation > 0:
            failures.append(f"{name}: rel err {err:.2e}, out of atol={atol:g}, rtol={rtol:g} by {violation:.2e}")
    return worst, ("; ".join(failures) or None)


def kept_block_grid(block_mask) -> torch.Tensor:
    """bool ``(B, H, nQb, nKb)``: the blocks a mask keeps (PARTIAL or FULL)."""
    from effattn.block_mask import NONE

    return block_mask.block_kinds() != NONE


def grad_targets(fn, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """What a backward differentiates: the op's ``args`` and then ``fn.params``, where ``fn`` has weights
    (the Funnel layer's: a training step computes their gradients too)."""
    return tuple(args) + tuple(getattr(fn, "params", ()))


def provider_outputs(case: Case, fn, inputs: Inputs) -> dict[str, torch.Tensor]:
    """Run ``fn`` on ``inputs`` as ``case.mode`` needs: the output and, for backward modes, the gradients.

    A predictor (op ``predict``) gives ``out`` (its kept blocks) and ``expected`` (the same predictor's
    in the reference precision, from ``fn.reference``) and ``kept`` (the share of blocks kept).
    """
    if case.op == "predict":
        with torch.no_grad():
            mask = fn(*inputs.args_inference)
            expected = fn.reference(*(a.detach().to(reference_dtype(case)) for a in inputs.args))
        from bench.ops import kept_fraction

        return {"out": kept_block_grid(mask), "expected": kept_block_grid(expected),
                "kept": torch.tensor(kept_fraction(mask))}
    if not case.needs_grad:
        with torch.no_grad():
            return {"out": fn(*inputs.args_inference)}
    out = fn(*inputs.args)
    grads = torch.autograd.grad(out, grad_targets(fn, inputs.args), inputs.dout)
    return {"out": out.detach(), **dict(zip(OPS[case.op].grad_names, grads))}  # the args' gradients
