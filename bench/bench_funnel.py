"""Deprecated: ``python -m bench.bench_funnel`` is now ``python -m bench --preset funnel`` (``h100-funnel`` on
a GPU), writing ``funnel.*``.

The harness runs what this command measured: pooled-query attention (stride 2, mean, separate [cls])
with pooling inside the kernel (``effattn``), pooled first and then effattn's flash kernel
(``effattn-prepool``), torch SDPA and FlexAttention on pre-pooled queries and naive attention (the
``pooled`` op), and one Funnel attention layer, forward and a training step's backward (the layer's
weights included), Hugging Face's eager code of both attention types (``naive``) against the fused
layer (``effattn``; the ``funnel`` op, ``--funnel-type``). This command translates its options into
the harness's, says so, and runs it.
"""

from __future__ import annotations

import sys

from bench import _deprecated
from bench.cases import PRESETS as HARNESS_PRESETS

OLD = "python -m bench.bench_funnel"
# This command's presets and the harness's that replace them.
PRESETS = {"cpu": "funnel", "h100": "h100-funnel"}
STEM = "funnel"


def _funnel_axes(preset: str) -> list[str]:
    """The harness's axes of the Funnel layer part of ``preset``, given whole (``--op funnel`` alone would
    also run the layer at the pooled part's sizes)."""
    part = next(p for p in HARNESS_PRESETS[preset].parts if "funnel" in p.ops)
    sizes = ["--tokens", str(part.tokens)] if part.tokens else ["--batch", *map(str, part.batch)]
    return ["--op", "funnel", "--seqlen", *map(str, part.seqlens), "--heads", *map(str, part.heads), *sizes,
            "--headdim", *map(str, part.headdims)]


def harness_argv(argv: list[str] | None = None) -> list[str]:
    """The ``python -m bench`` arguments equivalent to this command's ``argv``."""
    parser = _deprecated.parser(OLD, __doc__, PRESETS)
    parser.add_argument("--parts", nargs="+", choices=("pooled", "funnel"), default=("pooled", "funnel"))
    args = parser.parse_args(argv)
    preset = PRESETS[_deprecated.preset_name(args)]
    out = ["--preset", preset, *_deprecated.common_argv(args, STEM)]
    if set(args.parts) == {"pooled"}:
        out += ["--op", "pooled"]
    elif set(args.parts) == {"funnel"}:
        out += _funnel_axes(preset)
    return out


def main(argv: list[str] | None = None) -> int:
    return _deprecated.forward(OLD, "python -m bench", harness_argv(argv))


if __name__ == "__main__":
    sys.exit(main())
