"""effattn: fused, IO-aware attention kernels for PyTorch.

Public API:

* :func:`flash_attention` — exact attention (FlashAttention), forward and backward, GQA, causal,
  sliding window, key padding, dropout.
* :func:`scaled_dot_product_attention` — drop-in for ``torch.nn.functional.scaled_dot_product_attention``.
* :func:`pooled_attention` — Funnel-Transformer attention with queries pooled inside the kernel;
  :func:`pooled_positions`, :func:`pool_key_padding_mask` for the pooled sequence.
* :func:`relpos_attention` — attention with a relative-position table and token-type term (Funnel's
  score), the position term computed per tile from a band of the table.
* :func:`sparse_attention` with a :class:`BlockMask` — block-sparse attention (kept blocks only).
* :mod:`effattn.reference` — the reference implementation every backend is tested against.
* ``python -m effattn.info`` — which backends run on this machine, and why not.
"""

import importlib.abc as _abc
import importlib.util as _util
import os as _os
import sys as _sys


class _CheckoutKernelsFinder(_abc.MetaPathFinder):
    """``effattn.kernels`` in a source checkout that nothing installed: the top-level ``kernels/``
    directory, as setup.py's ``package_dir`` installs it. Only that one name is mapped (the root of the
    checkout is not put on the package's path, which would make ``effattn.setup``, ``effattn.tests``, ...
    importable)."""

    def __init__(self, directory: str):
        self.directory = directory

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "effattn.kernels":
            return None
        return _util.spec_from_file_location(fullname, _os.path.join(self.directory, "__init__.py"),
                                             submodule_search_locations=[self.directory])


def _find_checkout_kernels() -> None:
    here = _os.path.dirname(_os.path.abspath(__file__))
    kernels = _os.path.join(_os.path.dirname(here), "kernels")
    if _os.path.isdir(_os.path.join(here, "kernels")) or not _os.path.isfile(_os.path.join(kernels, "flash_attn.py")):
        return  # installed as a package, or not a checkout
    if not any(isinstance(f, _CheckoutKernelsFinder) for f in _sys.meta_path):
        _sys.meta_path.append(_CheckoutKernelsFinder(kernels))  # last: an installed mapping wins


_find_checkout_kernels()

from effattn import profile  # noqa: E402,F401 - effattn.profile: FLOPs, bytes and measurements
from effattn.backends import BACKENDS, UnsupportedInputError, get_backend, select_backend  # noqa: E402
from effattn.block_mask import BlockMask, MaskRule  # noqa: E402
from effattn.flash import flash_attention, scaled_dot_product_attention  # noqa: E402
from effattn.pooled import QueryPool, pool_key_padding_mask, pooled_attention, pooled_positions  # noqa: E402
from effattn.relpos import relpos_attention  # noqa: E402
from effattn.sparse import sparse_attention  # noqa: E402
from effattn.varlen import varlen_attention  # noqa: E402

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
    "relpos_attention",
    "scaled_dot_product_attention",
    "select_backend",
    "sparse_attention",
    "varlen_attention",
]
