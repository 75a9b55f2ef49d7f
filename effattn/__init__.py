"""effattn: fused, IO-aware attention kernels for PyTorch.

Public API:

* :func:`flash_attention` — exact attention (FlashAttention), forward and backward, GQA, causal,
  sliding window, key padding, dropout.
* :func:`scaled_dot_product_attention` — drop-in for ``torch.nn.functional.scaled_dot_product_attention``.
* :func:`pooled_attention` — Funnel-Transformer attention with queries pooled inside the kernel;
  :func:`pooled_positions`, :func:`pool_key_padding_mask` for the pooled sequence.
* :func:`sparse_attention` with a :class:`BlockMask` — block-sparse attention (kept blocks only).
* :mod:`effattn.reference` — the reference implementation every backend is tested against.
* ``python -m effattn.info`` — which backends run on this machine, and why not.
"""

import os as _os

# In a source checkout (nothing installed), the top-level kernels/ directory is effattn.kernels, as
# setup.py installs it.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(_os.path.dirname(__file__), "kernels")) and _os.path.isfile(
        _os.path.join(_root, "kernels", "flash_attn.py")):
    __path__.append(_root)  # noqa: F821 - the package's own search path

from effattn.backends import BACKENDS, UnsupportedInputError, get_backend, select_backend  # noqa: E402
from effattn.block_mask import BlockMask, MaskRule  # noqa: E402
from effattn.flash import flash_attention, scaled_dot_product_attention  # noqa: E402
from effattn.pooled import QueryPool, pool_key_padding_mask, pooled_attention, pooled_positions  # noqa: E402
from effattn.sparse import sparse_attention  # noqa: E402

# isort: split
# after the ops exist: registers their FLOP formulas with torch.utils.flop_counter
from effattn import profile  # noqa: E402,F401

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BlockMask",
    "MaskRule",
    "QueryPool",
    "UnsupportedInputError",
    "flash_attention",
    "get_backend",
    "pool_key_padding_mask",
    "pooled_attention",
    "pooled_positions",
    "scaled_dot_product_attention",
    "select_backend",
    "sparse_attention",
]
