"""tests/interpreter.py: installed under the interpreter, and a kernel calling device functions, its own and
triton.language's (tl.zeros, tl.sum), computes the right numbers."""

import os

import pytest
import torch
import triton
import triton.language as tl

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="the Triton interpreter is off (a GPU)")


@triton.jit
def _square(x):
    return x * x


@triton.jit
def _kernel(x_ptr, out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    acc = tl.zeros([N], dtype=tl.float32)
    for _ in range(3):
        acc += _square(tl.load(x_ptr + offs))
    tl.store(out_ptr + tl.program_id(0), tl.sum(acc, axis=0))


def test_installed_and_device_calls_compute_the_same():
    from triton.runtime import interpreter as ti

    from tests import interpreter

    assert interpreter.install(), "this Triton lacks the interpreter internals tests/interpreter.py relies on"
    assert getattr(ti.InterpretedFunction.__call__, "_effattn", False)
    x = torch.randn(16)
    out = torch.full((2,), float("nan"))
    _kernel[(2,)](x, out, N=16)
    torch.testing.assert_close(out, (3 * x * x).sum().expand(2))
