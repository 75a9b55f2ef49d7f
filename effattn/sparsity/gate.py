"""A learned block gate (SeerAttention, Gao et al. 2024): predicts which kv blocks each q block needs.

The gate works on the block grid only, never on the ``Tq x Tk`` scores:

1. queries are mean-pooled per q block, ``q_pool (B, H, nQb, D)``; keys are pooled per kv block by
   each of ``k_pooling`` (max, min, mean over the block's existing rows) and concatenated,
   ``k_pool (B, Hkv, nKb, P·D)``;
2. per-head linear maps (``einsum`` with ``(H, D, G)`` / ``(H, P·D, G)`` weights, ``G = gate_dim``)
   give features, and the block scores are ``q_feat · k_feat / sqrt(G)`` ``(B, H, nQb, nKb)``;
3. :meth:`BlockGate.predict` keeps the top-k kv blocks of each q block (or those whose softmax
   probability over kv blocks reaches a threshold) and returns a :class:`effattn.BlockMask`;
4. :meth:`BlockGate.loss` is the KL divergence from the row-normalised block-max-pooled attention map
   of the frozen model (``kernels.block_attn_map``) to the softmax of the gate scores;
   :meth:`BlockGate.fit` distils the gate from a model's q / k by that loss.

GQA: ``k`` may have ``Hkv`` heads dividing ``n_heads``; query head ``h`` is scored against the pooled
keys of kv head ``h // (n_heads / Hkv)`` through its own key map. Causal masks are aligned to the
bottom-right corner as in :func:`effattn.flash_attention` (query ``i`` sees keys ``j <= i + Tk - Tq``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from effattn.block_mask import NONE, PARTIAL, BlockMask, MaskRule
from effattn.kernels.block_attn_map import block_attn_map_auto, num_blocks

__all__ = ["BlockGate", "attention_block_map", "causal_block_kinds"]

K_POOLINGS = ("max", "min", "mean")


def _pool(x: torch.Tensor, block: int, mode: str) -> torch.Tensor:
    """``(B, H, T, D)`` -> ``(B, H, ceil(T / block), D)``: ``mode`` over each block's existing rows."""
    B, H, T, D = x.shape
    n = num_blocks(T, block)
    pad = n * block - T
    if mode == "mean":
        total = nn.functional.pad(x, (0, 0, 0, pad)).view(B, H, n, block, D).sum(3)
        counts = torch.full((n,), float(block), dtype=x.dtype, device=x.device)
        counts[-1] = block - pad
        return total / counts[:, None]
    fill = float("-inf") if mode == "max" else float("inf")
    blocks = nn.functional.pad(x, (0, 0, 0, pad), value=fill).view(B, H, n, block, D)
    return blocks.amax(3) if mode == "max" else blocks.amin(3)


def causal_block_kinds(q_len: int, kv_len: int, block_size, device=None) -> torch.Tensor:
    """uint8 ``(nQb, nKb)`` NONE / PARTIAL / FULL of bottom-right causal attention (on the block grid)."""
    return BlockMask.causal(q_len, kv_len, block_size, device=device).block_kinds()[0, 0]


def attention_block_map(q: torch.Tensor, k: torch.Tensor, *, block_size, scale: float | None = None,
                        causal: bool = False, lse: torch.Tensor | None = None,
                        use_kernel: bool | None = None) -> torch.Tensor:
    """Block-max-pooled softmax attention ``(B, Hq, nQb, nKb)`` of ``q``/``k``: the Triton kernel on CUDA,
    the chunked torch reference elsewhere (see :mod:`effattn.kernels.block_attn_map`). No grad."""
    with torch.no_grad():
        return block_attn_map_auto(q.detach(), k.detach(), None if lse is None else lse.detach(), scale=scale,
                                   block_size=block_size, causal=causal, use_kernel=use_kernel)


class BlockGate(nn.Module):
    """SeerAttention-style block gate for ``n_heads`` query heads of dimension ``head_dim``.

    Args:
        n_heads: query heads ``H`` (keys may have fewer heads dividing it: GQA).
        head_dim: ``D`` of q and k.
        gate_dim: ``G``, the width of the gate's per-head features.
        block_size: ``(BLOCK_Q, BLOCK_KV)`` of the predicted :class:`~effattn.BlockMask` (powers of two >= 16).
        k_pooling: the pooling(s) of keys per kv block, concatenated (any of ``"max"``, ``"min"``, ``"mean"``).
    """

    def __init__(self, n_heads: int, head_dim: int, gate_dim: int = 32, block_size=(64, 64),
                 k_pooling: Sequence[str] = K_POOLINGS):
        super().__init__()
        for name, value in (("n_heads", n_heads), ("head_dim", head_dim), ("gate_dim", gate_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(k_pooling, str):
            k_pooling = (k_pooling,)
        k_pooling = tuple(k_pooling)
        if not k_pooling or any(p not in K_POOLINGS for p in k_pooling):
            raise ValueError(f"k_pooling must be a non-empty sequence of {K_POOLINGS}, got {k_pooling!r}")
        # validate the block size as BlockMask does
        self.block_size = BlockMask.causal(1, 1, block_size).block_size
        self.n_heads, self.head_dim, self.gate_dim, self.k_pooling = n_heads, head_dim, gate_dim, k_pooling
        self.q_weight = nn.Parameter(torch.empty(n_heads, head_dim, gate_dim))
        self.k_weight = nn.Parameter(torch.empty(n_heads, len(k_pooling) * head_dim, gate_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w in (self.q_weight, self.k_weight):
            nn.init.normal_(w, std=1.0 / math.sqrt(w.shape[1]))

    def extra_repr(self) -> str:
        return (f"n_heads={self.n_heads}, head_dim={self.head_dim}, gate_dim={self.gate_dim}, "
                f"block_size={self.block_size}, k_pooling={self.k_pooling}")

    # ------------------------------------------------------------------------------------------
    def _check_qk(self, q: torch.Tensor, k: torch.Tensor) -> None:
        for name, t in (("q", q), ("k", k)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 4 or not t.is_floating_point():
                raise ValueError(f"{name} must be a 4-D (B, H, T, D) floating-point tensor, got "
                                 f"{t.dtype} {tuple(t.shape)}")
            if t.shape[2] == 0:
                raise ValueError(f"{name} has an empty sequence")
        if q.shape[1] != self.n_heads or q.shape[3] != self.head_dim:
            raise ValueError(f"q must have {self.n_heads} heads of dim {self.head_dim}, got shape {tuple(q.shape)}")
        if k.shape[0] != q.shape[0] or k.shape[3] != self.head_dim or k.shape[1] == 0 or self.n_heads % k.shape[1]:
            raise ValueError(f"k {tuple(k.shape)} must match q {tuple(q.shape)} in batch and head dim, with heads "
                             f"dividing {self.n_heads}")

    def scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Gate logits ``(B, H, nQb, nKb)`` for ``q (B, H, Tq, D)`` and ``k (B, Hkv, Tk, D)`` (no mask)."""
        self._check_qk(q, k)
        bq, bk = self.block_size
        w = self.q_weight
        q_pool = _pool(q.to(w.dtype), bq, "mean")  # (B, H, nQb, D)
        k_pool = torch.cat([_pool(k.to(w.dtype), bk, mode) for mode in self.k_pooling], dim=-1)
        k_pool = k_pool.repeat_interleave(self.n_heads // k.shape[1], dim=1)  # (B, H, nKb, P·D)
        q_feat = torch.einsum("bhmd,hdg->bhmg", q_pool, self.q_weight)
        k_feat = torch.einsum("bhnd,hdg->bhng", k_pool, self.k_weight)
        return torch.einsum("bhmg,bhng->bhmn", q_feat, k_feat) / math.sqrt(self.gate_dim)

    forward = scores

    def _allowed(self, q_len: int, kv_len: int, causal: bool, device) -> torch.Tensor | None:
        if not causal:
            return None
        return causal_block_kinds(q_len, kv_len, self.block_size, device)

    def log_probs(self, q: torch.Tensor, k: torch.Tensor, *, causal: bool = False) -> torch.Tensor:
        """Log-softmax of the gate scores over kv blocks ``(B, H, nQb, nKb)``; with ``causal`` the
        blocks wholly in the future get ``-inf`` (a q block that sees no key at all: every entry -inf)."""
        s = self.scores(q, k)
        kinds = self._allowed(q.shape[2], k.shape[2], causal, s.device)
        if kinds is not None:
            s = s.masked_fill(kinds == NONE, float("-inf"))
        out = torch.log_softmax(s, dim=-1)
        return torch.nan_to_num(out, nan=float("-inf"))

    def predict_flops(self, q_len: int, kv_len: int, *, batch: int = 1) -> int:
        """Analytic floating-point operations of :meth:`predict` for ``batch`` sequences of ``q_len``
        queries and ``kv_len`` keys (a multiply-add counts 2; top-k / threshold selection and the mask's
        index lists are not counted). Per head: pooling ``Tq D + P Tk D`` (``P`` key poolings), the
        linear maps ``2 G (nQb D + nKb P D)``, the block scores ``2 G nQb nKb`` and their scaling
        ``nQb nKb``. Set it against :func:`effattn.sparsity.saved_attention_flops`."""
        for name, value in (("q_len", q_len), ("kv_len", kv_len), ("batch", batch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        bq, bk = self.block_size
        nq, nk = num_blocks(q_len, bq), num_blocks(kv_len, bk)
        D, G, P = self.head_dim, self.gate_dim, len(self.k_pooling)
        pool = q_len * D + P * kv_len * D
        linear = 2 * G * (nq * D + nk * P * D)
        scores = 2 * G * nq * nk + nq * nk
        return batch * self.n_heads * (pool + linear + scores)

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, q: torch.Tensor, k: torch.Tensor, *, top_k: int | None = None, threshold: float | None = None,
                causal: bool = False, keep_diagonal: bool = True) -> BlockMask:
        """The predicted :class:`~effattn.BlockMask` ``(B, H, nQb, nKb)`` for ``q`` / ``k``.

        Exactly one of ``top_k`` (keep the ``top_k`` highest-scoring kv blocks of each q block; all of
        them when fewer exist, fewer where ``causal`` forbids blocks) or ``threshold`` (keep the kv blocks
        whose gate softmax probability is at least ``threshold``, in ``[0, 1]``).
        ``keep_diagonal``: always keep the "diagonal" kv block of each q block, the one holding key
        ``last_row + Tk - Tq`` (with ``causal``, its last visible block), counted within ``top_k``.
        Without ``causal`` kept blocks are FULL; with ``causal`` blocks cut by the diagonal are PARTIAL
        with the rule ``MaskRule(window_right=0, diag_offset=Tk - Tq)``."""
        if (top_k is None) == (threshold is None):
            raise ValueError("predict needs exactly one of top_k and threshold")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be a positive int, got {top_k!r}")
        if threshold is not None and not (isinstance(threshold, (int, float)) and 0.0 <= threshold <= 1.0):
            raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")
        s = self.scores(q, k).float()
        Tq, Tk = q.shape[2], k.shape[2]
        bq, bk = self.block_size
        nq, nk = s.shape[-2:]
        kinds = self._allowed(Tq, Tk, causal, s.device)
        allowed = torch.ones(nq, nk, dtype=torch.bool, device=s.device) if kinds is None else kinds != NONE
        s = s.masked_fill(~allowed, float("-inf"))
        if top_k is not None:
            ranked = s.clone()
            if keep_diagonal:
                ranked = ranked.masked_fill(self._diagonal(Tq, Tk, s.device) & allowed, float("inf"))
            picked = ranked.topk(min(top_k, nk), dim=-1).indices
            keep = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, picked, True)
        else:
            probs = torch.nan_to_num(torch.softmax(s, dim=-1), nan=0.0)
            keep = probs >= threshold
            if keep_diagonal:
                keep = keep | self._diagonal(Tq, Tk, s.device)
        keep = keep & allowed
        if kinds is None:
            return BlockMask.from_dense_blocks(keep, Tq, Tk, self.block_size)
        block_kinds = torch.where(keep, kinds, torch.full_like(kinds, NONE))
        if not bool((block_kinds == PARTIAL).any()):
            return BlockMask.from_block_kinds(block_kinds, Tq, Tk, self.block_size)
        return BlockMask.from_block_kinds(block_kinds, Tq, Tk, self.block_size,
                                          rule=MaskRule(window_right=0, diag_offset=Tk - Tq))

    def _diagonal(self, q_len: int, kv_len: int, device) -> torch.Tensor:
        """bool ``(nQb, nKb)``: per q block, the kv block holding key ``last_row + kv_len - q_len`` (clamped)."""
        bq, bk = self.block_size
        nq, nk = num_blocks(q_len, bq), num_blocks(kv_len, bk)
        last_row = (torch.arange(1, nq + 1, device=device) * bq).clamp_max(q_len) - 1
        col = (last_row + kv_len - q_len).clamp(0, kv_len - 1) // bk
        return torch.arange(nk, device=device)[None, :] == col[:, None]

    # ------------------------------------------------------------------------------------------
    def loss(self, q: torch.Tensor, k: torch.Tensor, target_map: torch.Tensor, *, causal: bool = False) -> torch.Tensor:
        """``KL(target || softmax(gate scores))`` over kv blocks, averaged over the (b, h, q block) rows
        whose target is not all zero. ``target_map (B, H, nQb, nKb)``: the block-max-pooled attention
        (:func:`attention_block_map`), normalised per row here."""
        logp = self.log_probs(q, k, causal=causal)
        if not isinstance(target_map, torch.Tensor) or target_map.shape != logp.shape:
            raise ValueError(f"target_map must be a tensor of shape {tuple(logp.shape)}, got "
                             f"{tuple(target_map.shape) if isinstance(target_map, torch.Tensor) else target_map!r}")
        t = target_map.detach().to(logp.dtype).clamp_min(0)
        total = t.sum(-1, keepdim=True)
        rows = total[..., 0] > 0
        t = t / total.clamp_min(torch.finfo(t.dtype).tiny)
        pos = t > 0
        kl = torch.where(pos, t * (torch.log(torch.where(pos, t, 1.0)) - torch.where(pos, logp, 0.0)), 0.0).sum(-1)
        if not bool(rows.any()):
            return kl.sum() * 0.0
        return kl[rows].mean()

    def fit(self, q_batches: Iterable[torch.Tensor], k_batches: Iterable[torch.Tensor], steps: int,
            lr: float = 1e-2, *, causal: bool = False, scale: float | None = None,
            targets: Iterable[torch.Tensor] | None = None) -> list[float]:
        """Distil the gate from a frozen model's ``q`` / ``k`` batches (cycled) with Adam for ``steps`` steps.

        The targets are the block-max-pooled attention maps of the true attention
        (:func:`attention_block_map`, computed once per batch, or given as ``targets``). Returns the
        loss of each step."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be a non-negative int, got {steps!r}")
        qs, ks = list(q_batches), list(k_batches)
        if not qs or len(qs) != len(ks):
            raise ValueError(f"need as many q batches as k batches, at least one (got {len(qs)} and {len(ks)})")
        qs, ks = [q.detach() for q in qs], [k.detach() for k in ks]
        if targets is None:
            targets = [attention_block_map(q, k, block_size=self.block_size, scale=scale, causal=causal).float()
                       for q, k in zip(qs, ks)]
        else:
            targets = list(targets)
            if len(targets) != len(qs):
                raise ValueError(f"need one target per batch ({len(qs)}), got {len(targets)}")
        opt = torch.optim.Adam(self.parameters(), lr=lr)
        losses = []
        for _, (q, k, t) in zip(range(steps), itertools.cycle(zip(qs, ks, targets))):
            opt.zero_grad(set_to_none=True)
            loss = self.loss(q, k, t, causal=causal)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        return losses

