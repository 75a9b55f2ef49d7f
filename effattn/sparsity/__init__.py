"""Learned attention-sparsity predictors and their block masks.

* :class:`SparseFinder` — per-head low-rank projections trained (hinge loss against the gold
  attention graph) so that keys that matter sit near their queries; k-means clusters shared by a
  query and a key connect them, pooled to a :class:`effattn.BlockMask` on the block grid.
* :class:`BlockGate` — SeerAttention-style gate: queries/keys pooled per block, per-head linear
  maps, top-k or threshold over key blocks; distilled (KL) from the block-max-pooled attention map,
  which ``effattn.kernels.block_attn_map`` computes from a flash pass without a ``T x T`` tensor.
* :mod:`effattn.sparsity.metrics` — block sparsity, attention recall, exact-row recall, FLOPs saved.
"""

from effattn.sparsity.gate import BlockGate, attention_block_map, causal_block_kinds
from effattn.sparsity.metrics import (
                                      attention_recall,
                                      block_sparsity,
                                      exact_row_recall,
                                      row_recall,
                                      saved_attention_flops,
)
from effattn.sparsity.sparsefinder import SparseFinder, gold_positives

__all__ = [
    "BlockGate",
    "SparseFinder",
    "attention_block_map",
    "attention_recall",
    "block_sparsity",
    "causal_block_kinds",
    "exact_row_recall",
    "gold_positives",
    "row_recall",
    "saved_attention_flops",
]
