"""Tolerances per dtype (one table), comparison helpers and a NaN-poisoning allocator, shared by the tests
and the benchmarks.

A kernel output is compared with the float64 reference as ``|x - ref| <= atol + rtol * |ref|``
elementwise; gradients get the looser ``grad`` row. NaN never passes.
"""

from __future__ import annotations

import torch

# dtype of the inputs -> {kind: (atol, rtol)}. "lse" is always computed in float32 (float64 for
# float64 inputs) from scores accumulated in float32, hence tighter than "fwd" for half dtypes.
TOLERANCES: dict[torch.dtype, dict[str, tuple[float, float]]] = {
    torch.float64: {"fwd": (1e-10, 1e-10), "lse": (1e-10, 1e-10), "grad": (1e-9, 1e-9)},
    torch.float32: {"fwd": (2e-5, 2e-5), "lse": (1e-4, 1e-5), "grad": (1e-4, 1e-4)},
    torch.float16: {"fwd": (2e-3, 2e-3), "lse": (1e-4, 1e-5), "grad": (1e-2, 1e-2)},
    torch.bfloat16: {"fwd": (1.6e-2, 1.6e-2), "lse": (1e-4, 1e-5), "grad": (6e-2, 6e-2)},
}
DTYPES: tuple[torch.dtype, ...] = tuple(TOLERANCES)  # every dtype a backend may support, as the table lists them


def max_violation(x: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float) -> float:
    """Largest ``|x - ref| - (atol + rtol |ref|)`` over the elements (> 0 means out of tolerance; NaN = inf)."""
    x, ref = x.detach(), ref.detach()
    diff = (x.double() - ref.double()).abs() - (atol + rtol * ref.double().abs())
    diff = torch.nan_to_num(diff, nan=float("inf"))
    return float(diff.max()) if diff.numel() else float("-inf")


def assert_close(x: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, kind: str = "fwd", name: str = "") -> None:
    """Assert ``x`` matches the float64 ``ref`` within the table's tolerance for ``dtype`` and ``kind``."""
    atol, rtol = TOLERANCES[dtype][kind]
    if x.shape != ref.shape:
        raise AssertionError(f"{name}: shape {tuple(x.shape)} != reference {tuple(ref.shape)}")
    x, ref = x.detach(), ref.detach()
    v = max_violation(x, ref, atol, rtol)
    if v > 0:
        err = (x.double() - ref.double()).abs()
        bad = torch.nan_to_num(err, nan=float("inf")).argmax()
        idx = tuple(int(i) for i in torch.unravel_index(bad, x.shape))
        raise AssertionError(
            f"{name}: {dtype} {kind} out of tolerance (atol={atol}, rtol={rtol}): max |err| "
            f"{float(torch.nan_to_num(err, nan=float('inf')).max()):.3g} at {idx}: got {float(x[idx]):.6g}, "
            f"reference {float(ref[idx]):.6g}; NaN count {int(torch.isnan(x).sum())}")


def poisoned_empty(*size, dtype=None, device=None, **kw) -> torch.Tensor:
    """``torch.empty`` filled with NaN (floating dtypes) or -1 (integer dtypes): swapped in for a kernel
    module's output allocator, so that an element the kernel forgets to write fails the comparison."""
    t = torch.empty(*size, dtype=dtype, device=device, **kw)
    return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-1)
