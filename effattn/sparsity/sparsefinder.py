"""SparseFinder: a learned predictor of attention sparsity (Treviso et al. 2022, "Predicting Attention
Sparsity in Transformers"), turned into a :class:`~effattn.block_mask.BlockMask`.

Pipeline, per head ``h``:

1. **Projection.** Low-rank maps ``W_q[h], W_k[h]`` of shape ``(D, r)`` send the frozen model's queries
   and keys, each centred by its per-head mean over the training data (``q_center``, ``k_center``,
   :meth:`SparseFinder.fit_centers`), to ``q' = (q - q_center) W_q``, ``k' = (k - k_center) W_k`` in
   ``R^r`` (:meth:`SparseFinder.project`). **Why centre:** the hinge loss below only compares the
   distances of one query to its keys, so it barely sees where the cloud of queries sits relative to the
   cloud of keys (translating every ``q'`` by ``t`` changes a query's term by ``2 t . (mean k'_neg -
   mean k'_pos)``, close to 0 on average), while k-means over queries and keys together needs the two
   clouds to overlap. Without centring, the offset between them is whatever the means of ``q`` and ``k``
   (large in real models: attention logits are invariant to a shift of every key, softmax of
   ``q . (k + c)`` equals softmax of ``q . k``) make of the random initial ``W_q, W_k``: queries and keys
   then fall in disjoint clusters and no block is kept. Centring fixes that offset at 0 (the centres are
   computed once, before training, and are not trained).
2. **Gold graph and training.** The positives of query ``i`` are the smallest set of keys holding a share
   ``mass`` (e.g. 0.9) of its softmax mass (highest probabilities first; :func:`gold_positives`). As many
   negatives are drawn uniformly among the other keys. The hinge loss of query ``i`` is
   ``relu(margin + mean_{j in P_i} ||q'_i - k'_j||^2 - mean_{j in N_i} ||q'_i - k'_j||^2)``
   and :meth:`SparseFinder.loss` averages it over the queries. **Normalisation:** the paper sums the
   squared distances over the pairs; here both sums are divided by ``|P_i| = |N_i|`` (per-pair
   averaging), so that the margin does not scale with the size of the positive set. Queries whose every
   key is positive (no negative to draw) do not count. The scores are computed by chunks of query rows
   (``chunk x Tk`` at a time), never the whole ``Tq x Tk`` matrix.
3. **Grouping.** k-means (seeded k-means++ initialisation, a few Lloyd iterations, per head) over the
   projected queries and keys together, as in the paper (:meth:`SparseFinder.fit_clusters`). Each token
   then belongs to its ``top_c`` nearest centroids (:meth:`SparseFinder.cluster_ids`); query ``i`` and
   key ``j`` are connected iff they share a cluster.
4. **Block mask.** Per block of tokens, the bitset of the clusters present among its tokens; a
   ``(q block, kv block)`` pair is kept iff the two bitsets intersect (``effattn.kernels.cluster_blocks``:
   two Triton kernels on CUDA, a torch reference elsewhere). No ``Tq x Tk`` tensor is built.
   Kept blocks are FULL, the mask has no elementwise rule: it **over-approximates** the token graph (a
   kept block holds at least one connected pair, not only connected pairs), which is what block-sparse
   attention computes anyway. A sliding window and global tokens can be added (one
   :class:`~effattn.block_mask.MaskRule` holding both, united with ``|``).
   With many tokens per block and few clusters, nearly every block holds nearly every cluster and the
   ``any`` rule keeps nearly every pair. ``predict(top_k=...)`` ranks the kv blocks of each q block by
   their number of connected token pairs instead (cluster histograms per block, one matmul on the block
   grid) and keeps the ``top_k`` best.

The predicted mask is not causal: intersect it with :meth:`BlockMask.causal` (``&``) for a decoder.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from effattn.block_mask import DEFAULT_BLOCK_SIZE, FULL, KIND_DTYPE, BlockMask, MaskRule, _int
from effattn.kernels.cluster_blocks import WORD_BITS, cluster_block_edges, cluster_block_kinds_auto

__all__ = ["SparseFinder", "gold_positives"]

DEFAULT_CHUNK = 1024  # query rows per chunk of scores (chunk x Tk at a time)


# ----------------------------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------------------------
def _float(name: str, value, lo: float, hi: float, lo_open: bool = False) -> float:
    if isinstance(value, (bool, torch.Tensor)) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not (lo < value if lo_open else lo <= value) or not value <= hi or math.isnan(value):
        raise ValueError(f"{name} must lie in {'(' if lo_open else '['}{lo}, {hi}], got {value}")
    return value


def _qk(q, k, n_heads: int | None = None, head_dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Check q ``(B, H, Tq, D)`` and k ``(B, Hk, Tk, D)``; k's heads are repeated when ``Hk`` divides ``H`` (GQA)."""
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor (B, H, T, D), got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, T, D), got shape {tuple(t.shape)}")
        if t.shape[2] == 0:
            raise ValueError(f"{name} has no tokens (T = 0), shape {tuple(t.shape)}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k have batch sizes {q.shape[0]} and {k.shape[0]}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k have head dims {q.shape[3]} and {k.shape[3]}")
    if q.device != k.device:
        raise ValueError(f"q is on {q.device}, k on {k.device}")
    if n_heads is not None and q.shape[1] != n_heads:
        raise ValueError(f"q has {q.shape[1]} heads, the SparseFinder n_heads={n_heads}")
    if head_dim is not None and q.shape[3] != head_dim:
        raise ValueError(f"q has head dim {q.shape[3]}, the SparseFinder head_dim={head_dim}")
    if k.shape[1] != q.shape[1]:
        if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
            raise ValueError(f"k has {k.shape[1]} heads, q {q.shape[1]}: k's must equal or divide q's (GQA)")
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return q, k


def _batches(name: str, batches) -> list[torch.Tensor]:
    if isinstance(batches, torch.Tensor):
        return [batches]
    if not isinstance(batches, Sequence) or not batches:
        raise TypeError(f"{name} must be a tensor or a non-empty sequence of tensors, got {type(batches).__name__}")
    return list(batches)


# ----------------------------------------------------------------------------------------------
# the gold attention graph
# ----------------------------------------------------------------------------------------------
def _scale(scale, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else _float("scale", scale, 0.0, math.inf, lo_open=True)


def _visible(r0: int, r1: int, Tq: int, Tk: int, device) -> torch.Tensor:
    """bool ``(r1 - r0, Tk)``: the keys query rows ``r0:r1`` see under bottom-right causal attention."""
    rows = torch.arange(r0, r1, device=device)
    return torch.arange(Tk, device=device)[None, :] <= rows[:, None] + (Tk - Tq)


def _positive_chunks(q: torch.Tensor, k: torch.Tensor, mass: float, scale: float, chunk: int,
                     causal: bool = False) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor | None]]:
    """``(r0, r1, positives, visible)`` per chunk of query rows: positives bool ``(B, H, r1 - r0, Tk)``;
    ``visible`` the causal keys of the rows ``(r1 - r0, Tk)`` (None without ``causal``). A row that sees
    no key has no positive."""
    Tq, Tk = q.shape[2], k.shape[2]
    kf = k.float()
    for r0 in range(0, Tq, chunk):
        r1 = min(r0 + chunk, Tq)
        s = scale * q[:, :, r0:r1].float() @ kf.transpose(-1, -2)
        visible = _visible(r0, r1, Tq, Tk, q.device) if causal else None
        if visible is not None:
            s = s.masked_fill(~visible, float("-inf"))
        p = torch.nan_to_num(torch.softmax(s, dim=-1), nan=0.0)
        sp, order = p.sort(dim=-1, descending=True)
        before = sp.cumsum(-1) - sp  # mass of the keys ranked strictly before
        # smallest prefix reaching `mass`: a key is in it iff the keys before hold less than `mass`
        # (a small tolerance so that rounding never drops the key that completes the share)
        keep = before < mass - 1e-6
        keep[..., 0] = True
        pos = torch.zeros_like(keep).scatter_(-1, order, keep)
        yield r0, r1, (pos if visible is None else pos & visible), visible


@torch.no_grad()
def gold_positives(q: torch.Tensor, k: torch.Tensor, mass: float = 0.9, scale: float | None = None,
                   chunk: int = DEFAULT_CHUNK, causal: bool = False) -> torch.Tensor:
    """The gold attention graph: bool ``(B, H, Tq, Tk)``, True on the smallest set of keys of each query
    holding at least ``mass`` of its softmax probability (``softmax(scale * q k^T)``, scale default
    ``1/sqrt(D)``; with ``causal`` the bottom-right causal softmax, so only visible keys are positive), keys
    taken by decreasing probability. Computed by chunks of ``chunk`` query rows; the
    result itself is ``Tq x Tk`` (for tests and small sizes: :meth:`SparseFinder.loss` never builds it)."""
    q, k = _qk(q, k)
    mass = _float("mass", mass, 0.0, 1.0, lo_open=True)
    chunk = _int("chunk", chunk, minimum=1)
    scale = _scale(scale, q.shape[-1])
    return torch.cat([pos for _, _, pos, _ in _positive_chunks(q, k, mass, scale, chunk, causal)], dim=2)


# ----------------------------------------------------------------------------------------------
# the predictor
# ----------------------------------------------------------------------------------------------
class SparseFinder(nn.Module):
    """Per-head low-rank projections ``W_q, W_k (H, D, r)`` trained so that a query lies close to the keys
    it attends to, and k-means centroids ``(H, n_clusters, r)`` grouping the projected tokens.

    Args:
        n_heads, head_dim: ``H`` and ``D`` of the frozen model's queries and keys.
        rank: ``r``, the projected dimension.
        n_clusters: k-means clusters per head.
        top_c: clusters each token belongs to (its ``top_c`` nearest centroids), ``1 <= top_c <= n_clusters``.
        margin: the hinge loss margin, in squared projected distance: it sets the scale of the separation
            learned (a margin large against the initial distances keeps training until queries sit near
            their positive keys, which k-means over queries and keys together needs; the paper uses 1).
        mass: share of the softmax mass the gold positives of a query hold, in ``(0, 1]``.
        kmeans_iters: Lloyd iterations of :meth:`fit_clusters`.
        seed: seeds the initial projections, the negative sampling and k-means.

    Use: :meth:`fit` (or :meth:`loss` in one's own loop) on batches of the frozen model's ``q, k``, then
    :meth:`fit_clusters`, then :meth:`predict` per input.
    """

    def __init__(self, n_heads: int, head_dim: int, rank: int = 4, n_clusters: int = 8, top_c: int = 1, *,
                 margin: float = 1.0, mass: float = 0.9, kmeans_iters: int = 10, seed: int = 0):
        super().__init__()
        self.n_heads = _int("n_heads", n_heads, minimum=1)
        self.head_dim = _int("head_dim", head_dim, minimum=1)
        self.rank = _int("rank", rank, minimum=1)
        self.n_clusters = _int("n_clusters", n_clusters, minimum=1)
        self.top_c = _int("top_c", top_c, minimum=1)
        if self.top_c > self.n_clusters:
            raise ValueError(f"top_c must be <= n_clusters={self.n_clusters}, got {self.top_c}")
        self.margin = _float("margin", margin, 0.0, math.inf)
        self.mass = _float("mass", mass, 0.0, 1.0, lo_open=True)
        self.kmeans_iters = _int("kmeans_iters", kmeans_iters, minimum=0)
        self.seed = _int("seed", seed)
        g = torch.Generator().manual_seed(self.seed)
        std = 1.0 / math.sqrt(self.head_dim)
        self.W_q = nn.Parameter(torch.randn(self.n_heads, self.head_dim, self.rank, generator=g) * std)
        self.W_k = nn.Parameter(torch.randn(self.n_heads, self.head_dim, self.rank, generator=g) * std)
        self.register_buffer("q_center", torch.zeros(self.n_heads, self.head_dim))
        self.register_buffer("k_center", torch.zeros(self.n_heads, self.head_dim))
        self.register_buffer("centers_fitted", torch.zeros((), dtype=torch.bool))
        self.register_buffer("centroids", torch.zeros(self.n_heads, self.n_clusters, self.rank))
        self.register_buffer("clusters_fitted", torch.zeros((), dtype=torch.bool))
        self._gen = torch.Generator().manual_seed(self.seed + 1)  # negative sampling (CPU draws)

    def extra_repr(self) -> str:
        return (f"n_heads={self.n_heads}, head_dim={self.head_dim}, rank={self.rank}, n_clusters={self.n_clusters}, "
                f"top_c={self.top_c}, margin={self.margin}, mass={self.mass}")

    # ------------------------------------------------------------------------------------------
    # projection and loss
    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def fit_centers(self, q, k) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head means of the queries and keys of ``q, k`` (tensors, or sequences of tensors, pairwise
        alike), ``(H, D)`` each, stored as :attr:`q_center` / :attr:`k_center` and subtracted by
        :meth:`project` (module notes, step 1). Returns them."""
        qs, ks = _batches("q", q), _batches("k", k)
        if len(qs) != len(ks):
            raise ValueError(f"q and k have {len(qs)} and {len(ks)} batches")
        q_sum = k_sum = 0.0
        q_n = k_n = 0
        for qb, kb in zip(qs, ks):
            qb, kb = _qk(qb, kb, self.n_heads, self.head_dim)
            q_sum = q_sum + qb.double().sum(dim=(0, 2))
            k_sum = k_sum + kb.double().sum(dim=(0, 2))
            q_n += qb.shape[0] * qb.shape[2]
            k_n += kb.shape[0] * kb.shape[2]
        self.q_center.copy_((q_sum / q_n).to(self.q_center))
        self.k_center.copy_((k_sum / k_n).to(self.k_center))
        self.centers_fitted.fill_(True)
        return self.q_center, self.k_center

    def project(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``q' = (q - q_center) W_q (B, H, Tq, r)``, ``k' = (k - k_center) W_k (B, H, Tk, r)`` (float32 or
        wider; k's heads repeated under GQA; the centres are 0 until :meth:`fit_centers`)."""
        q, k = _qk(q, k, self.n_heads, self.head_dim)
        dtype = torch.promote_types(q.dtype, self.W_q.dtype)
        qc = q.to(dtype) - self.q_center.to(q.device, dtype)[:, None]
        kc = k.to(dtype) - self.k_center.to(k.device, dtype)[:, None]
        qp = torch.einsum("bhtd,hdr->bhtr", qc, self.W_q.to(dtype))
        kp = torch.einsum("bhtd,hdr->bhtr", kc, self.W_k.to(dtype))
        return qp, kp

    def loss(self, q: torch.Tensor, k: torch.Tensor, *, scale: float | None = None,
             chunk: int = DEFAULT_CHUNK, causal: bool = False) -> torch.Tensor:
        """Hinge loss (module notes) of the frozen ``q (B, H, Tq, D)``, ``k (B, H|Hkv, Tk, D)``: a scalar,
        differentiable in ``W_q, W_k``. Gold positives and distances by chunks of ``chunk`` query rows.
        ``causal``: the frozen model is a decoder (bottom-right causal): the gold graph is that of its
        causal softmax and the negatives are drawn among the keys a query sees."""
        q, k = _qk(q, k, self.n_heads, self.head_dim)
        chunk = _int("chunk", chunk, minimum=1)
        scale = _scale(scale, q.shape[-1])
        q, k = q.detach(), k.detach()
        qp, kp = self.project(q, k)
        kp2 = (kp * kp).sum(-1)  # (B, H, Tk)
        total = qp.new_zeros(())
        count = 0
        for r0, r1, pos, visible in _positive_chunks(q, k, self.mass, scale, chunk, causal):
            qc = qp[:, :, r0:r1]
            dist = (qc * qc).sum(-1, keepdim=True) + kp2[:, :, None, :] - 2 * qc @ kp.transpose(-1, -2)
            n_pos = pos.sum(-1, keepdim=True)
            n_keys = pos.shape[-1] if visible is None else visible.sum(-1)[None, None, :, None]
            n_neg = torch.minimum(n_pos, n_keys - n_pos)  # as many negatives as positives, when there are
            # uniform draw of n_neg non-positive (visible) keys: the n_neg largest of i.i.d. uniform keys
            r = torch.rand(pos.shape, generator=self._gen).to(pos.device).masked_fill_(pos, -1.0)
            if visible is not None:
                r.masked_fill_(~visible, -1.0)
            kth = r.sort(dim=-1, descending=True).values.gather(-1, (n_neg - 1).clamp_min(0))
            neg = (r >= kth) & (r >= 0) & (n_neg > 0)
            valid = n_neg[..., 0] > 0
            d_pos = (dist * pos).sum(-1) / n_pos[..., 0].clamp_min(1)
            d_neg = (dist * neg).sum(-1) / n_neg[..., 0].clamp_min(1)
            hinge = torch.relu(self.margin + d_pos - d_neg)
            total = total + (hinge * valid).sum()
            count += int(valid.sum())
        return total / max(count, 1)

    def fit(self, q_batches, k_batches, steps: int = 100, lr: float = 1e-2, *, scale: float | None = None,
            chunk: int = DEFAULT_CHUNK, clusters: bool = True, causal: bool = False) -> list[float]:
        """Train ``W_q, W_k`` with Adam for ``steps`` steps, cycling over the batches (tensors, or sequences of
        tensors, pairwise alike; ``causal`` as in :meth:`loss`), then (``clusters``) :meth:`fit_clusters` on all
        of them. The centres are
        fitted first on all the batches (:meth:`fit_centers`) unless they already are. Returns the losses."""
        qs, ks = _batches("q_batches", q_batches), _batches("k_batches", k_batches)
        if len(qs) != len(ks):
            raise ValueError(f"q_batches and k_batches have {len(qs)} and {len(ks)} batches")
        steps = _int("steps", steps, minimum=0)
        lr = _float("lr", lr, 0.0, math.inf, lo_open=True)
        if not bool(self.centers_fitted):
            self.fit_centers(qs, ks)
        opt = torch.optim.Adam([self.W_q, self.W_k], lr=lr)
        history = []
        for step in range(steps):
            q, k = qs[step % len(qs)], ks[step % len(ks)]
            opt.zero_grad(set_to_none=True)
            loss = self.loss(q, k, scale=scale, chunk=chunk, causal=causal)
            loss.backward()
            opt.step()
            history.append(float(loss.detach()))
        if clusters:
            self.fit_clusters(qs, ks)
        return history

    # ------------------------------------------------------------------------------------------
    # clusters
    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def fit_clusters(self, q, k, *, max_points: int = 65536) -> torch.Tensor:
        """k-means per head over the projected queries and keys of ``q, k`` (tensors, or sequences of tensors):
        seeded k-means++ initialisation, then :attr:`kmeans_iters` Lloyd iterations; an empty cluster keeps
        its centroid. At most ``max_points`` points per head (a seeded subsample). Returns the centroids
        ``(H, n_clusters, r)``, also stored in the module."""
        qs, ks = _batches("q", q), _batches("k", k)
        if len(qs) != len(ks):
            raise ValueError(f"q and k have {len(qs)} and {len(ks)} batches")
        max_points = _int("max_points", max_points, minimum=1)
        if not bool(self.centers_fitted):
            self.fit_centers(qs, ks)
        pts = []
        for qb, kb in zip(qs, ks):
            qp, kp = self.project(qb, kb)
            pts += [qp.transpose(0, 1).reshape(self.n_heads, -1, self.rank),
                    kp.transpose(0, 1).reshape(self.n_heads, -1, self.rank)]
        x = torch.cat(pts, dim=1).float()  # (H, N, r)
        g = torch.Generator().manual_seed(self.seed + 2)
        if x.shape[1] > max_points:
            x = x[:, torch.randperm(x.shape[1], generator=g)[:max_points].to(x.device)]
        H, N, _ = x.shape
        C = self.n_clusters
        heads = torch.arange(H, device=x.device)
        # k-means++: each next centroid drawn with probability proportional to the squared distance
        first = torch.randint(N, (H,), generator=g).to(x.device)
        cent = [x[heads, first]]
        d2 = ((x - cent[0][:, None]) ** 2).sum(-1)
        for _ in range(1, C):
            w = d2.clamp_min(0).cpu().double()
            w = torch.where(w.sum(-1, keepdim=True) > 0, w, torch.ones_like(w))  # all points coincide
            nxt = torch.multinomial(w, 1, generator=g)[:, 0].to(x.device)
            cent.append(x[heads, nxt])
            d2 = torch.minimum(d2, ((x - cent[-1][:, None]) ** 2).sum(-1))
        cent = torch.stack(cent, dim=1)  # (H, C, r)
        for _ in range(self.kmeans_iters):
            assign = torch.cdist(x, cent).argmin(-1)  # (H, N)
            sums = torch.zeros_like(cent).scatter_add_(1, assign[..., None].expand_as(x), x)
            counts = torch.zeros(H, C, device=x.device).scatter_add_(1, assign, torch.ones_like(assign, dtype=x.dtype))
            cent = torch.where(counts[..., None] > 0, sums / counts.clamp_min(1)[..., None], cent)
        self.centroids.copy_(cent.to(self.centroids.dtype))
        self.clusters_fitted.fill_(True)
        return self.centroids

    def _require_clusters(self) -> None:
        if not bool(self.clusters_fitted):
            raise RuntimeError("SparseFinder has no clusters yet: call fit_clusters(q, k) (or fit) first")

    @torch.no_grad()
    def cluster_ids(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """int32 ``(B, H, Tq, top_c)`` and ``(B, H, Tk, top_c)``: the ids of each token's ``top_c`` nearest
        centroids (nearest first)."""
        self._require_clusters()
        qp, kp = self.project(q, k)
        cent = self.centroids.to(qp.device, qp.dtype)
        return self._nearest(qp, cent), self._nearest(kp, cent)

    @torch.no_grad()
    def memberships(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """bool ``(B, H, Tq, C)`` and ``(B, H, Tk, C)``: the ``top_c`` nearest centroids of each token."""
        qi, ki = self.cluster_ids(q, k)
        return self._one_hot(qi), self._one_hot(ki)

    def _nearest(self, x: torch.Tensor, cent: torch.Tensor) -> torch.Tensor:
        B, H, T, r = x.shape
        d = torch.cdist(x, cent[None].expand(B, H, -1, -1))  # (B, H, T, C)
        return d.topk(self.top_c, dim=-1, largest=False).indices.to(torch.int32)

    def _one_hot(self, ids: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(*ids.shape[:3], self.n_clusters, dtype=torch.bool, device=ids.device)
        return out.scatter_(-1, ids.long(), True)

    # ------------------------------------------------------------------------------------------
    # the block mask
    # ------------------------------------------------------------------------------------------
    def predict_flops(self, q_len: int, kv_len: int, *, batch: int = 1, block_size=DEFAULT_BLOCK_SIZE,
                      top_k: int | None = None) -> int:
        """Analytic floating-point and bit operations of :meth:`predict` for ``batch`` sequences of
        ``q_len`` queries and ``kv_len`` keys (a multiply-add counts 2; top-k selection and the index
        lists of the mask are not counted). Per head and token: centring ``D``, projection ``2 D r``,
        distances to the ``C`` centroids ``3 C r``, one OR (bitset) or add (histogram) per cluster id
        ``top_c``; per ``(q block, kv block)`` pair: an AND and an OR per bitset word, or with ``top_k``
        the histogram product ``2 C``. Set it against :func:`effattn.sparsity.saved_attention_flops`."""
        q_len, kv_len = _int("q_len", q_len, minimum=1), _int("kv_len", kv_len, minimum=1)
        batch = _int("batch", batch, minimum=1)
        bq, bk = BlockMask.from_dense_blocks(torch.zeros(1, 1, 1, 1, dtype=torch.bool), 1, 1, block_size).block_size
        D, r, C = self.head_dim, self.rank, self.n_clusters
        per_token = D + 2 * D * r + 3 * C * r + self.top_c
        pairs = -(-q_len // bq) * -(-kv_len // bk)
        grid = pairs * 2 * (-(-C // WORD_BITS) if top_k is None else C)
        return batch * self.n_heads * ((q_len + kv_len) * per_token + grid)

    @torch.no_grad()
    def predict(self, q: torch.Tensor, k: torch.Tensor, *, window=None, n_global: int = 0,
                block_size=DEFAULT_BLOCK_SIZE, bottom_right: bool = True, top_k: int | None = None,
                use_kernel: bool | None = None) -> BlockMask:
        """The predicted :class:`BlockMask` ``(B, H, nQb, nKb)`` of ``q (B, H, Tq, D)``, ``k (B, H|Hkv, Tk, D)``.

        A block pair is FULL iff some query of the q block and some key of the kv block share a cluster,
        else NONE (no rule: a superset of the token graph, see the module notes). ``window`` (``w`` or
        ``(left, right)``, keys ``i + off - left <= j <= i + off + right``, ``off = Tk - Tq`` with
        ``bottom_right``) and ``n_global`` (rows and columns ``< n_global``) are united in as one
        :class:`MaskRule`. The block pairs come from ``effattn.kernels.cluster_blocks`` (the Triton kernels on
        CUDA, the torch reference elsewhere; ``use_kernel`` forces the choice).

        ``top_k``: keep, per q block, only the ``top_k`` kv blocks with the most connected token pairs
        (``cluster_block_edges``: cluster histograms per block, one matmul on the block grid; plain torch,
        ``use_kernel`` does not apply), among those with any; ties go to the lower kv block, on every
        device. With many tokens per block the ``any`` rule keeps nearly every pair; ``top_k`` trades
        recall for sparsity. The window and global tokens are united in afterwards, on top of the
        ``top_k``."""
        self._require_clusters()
        n_global = _int("n_global", n_global, minimum=0)
        if window is not None:
            if isinstance(window, (tuple, list)):
                if len(window) != 2:
                    raise ValueError(f"window must be an int or a pair (left, right), got {window!r}")
                left, right = (_int(f"window[{i}]", w) if w is not None else -1 for i, w in enumerate(window))
            else:
                left = right = _int("window", window, minimum=0)
        # block sizes checked by BlockMask (powers of two >= 16); read them here once
        bq, bk = BlockMask.from_dense_blocks(torch.zeros(1, 1, 1, 1, dtype=torch.bool), 1, 1, block_size).block_size
        q, k = _qk(q, k, self.n_heads, self.head_dim)
        if top_k is not None:
            top_k = _int("top_k", top_k, minimum=1)
        qi, ki = self.cluster_ids(q, k)
        if top_k is None:
            kept = cluster_block_kinds_auto(qi, ki, self.n_clusters, (bq, bk), use_kernel=use_kernel)
        else:
            edges = cluster_block_edges(qi, ki, self.n_clusters, (bq, bk)).long()  # (B, H, nQb, nKb), exact
            nk = edges.shape[-1]
            # one exact integer key per block: the count first, then the lower kv block (deterministic ties)
            key = edges * nk + (nk - 1 - torch.arange(nk, device=edges.device))
            picked = key.topk(min(top_k, nk), dim=-1).indices
            kept = torch.zeros_like(edges, dtype=torch.bool).scatter_(-1, picked, edges.gather(-1, picked) > 0)
        Tq, Tk = q.shape[2], k.shape[2]
        mask = BlockMask.from_block_kinds(kept.to(KIND_DTYPE) * FULL, Tq, Tk, (bq, bk))
        if window is None and n_global == 0:
            return mask
        if window is None:  # global only: the window emptied, as in BlockMask.global_tokens
            rule = MaskRule(window_left=0, window_right=0, diag_offset=Tk, n_global=n_global)
        else:
            rule = MaskRule(window_left=left, window_right=right, diag_offset=Tk - Tq if bottom_right else 0,
                            n_global=n_global)
        return mask | BlockMask.from_rule(rule, Tq, Tk, (bq, bk), device=mask.device)
