"""Analytic FLOPs and bytes of effattn's ops, and their registration with ``torch.utils.flop_counter``.

Counting convention (FlashAttention's): a matmul of ``(m, k) @ (k, n)`` is ``2 m k n`` FLOPs, and only
query/key pairs the op must compute count: for dense, causal and windowed attention the visible
pairs (exact, bottom-right or top-left), for pooled attention the pairs of the pooled queries, for
block-sparse attention the elements of the kept blocks (what the kernel computes).

* forward: ``S = Q K^T`` and ``O = P V``: ``2 · pairs · (Dqk + Dv)`` per (batch, query head);
* backward (the kernels recompute ``S``): ``S``, ``dV = P^T dO``, ``dP = dO V^T``, ``dQ = dS K``,
  ``dK = dS^T Q``: ``2 · pairs · (3 Dqk + 2 Dv)`` — 2.5x the forward when ``Dqk = Dv``.

Bytes are the minimum a fused kernel moves through memory: its inputs read once, its outputs
written once (``lse`` as float32); ``naive_bytes`` adds the ``Tq x Tk`` scores and probabilities a
materialising implementation writes and reads. After ``import effattn``, ``FlopCounterMode`` counts
effattn's ops with these formulas (each op registers its own, beside its definition, from
:func:`attention_flops` and the pair counts :func:`visible_pairs` / :func:`kept_pairs`; this module
imports no op).

Measured (:func:`measure`, :func:`measure_ceilings`, :func:`roofline_plot`): the time of a call of
an op or a whole model (:mod:`effattn.timing`: CUDA events or ``torch.utils.benchmark``), its peak
memory, its FLOPs (given, or counted by ``FlopCounterMode`` over one call, effattn's ops included),
and the achieved TFLOP/s and GB/s against the device's ceilings measured here: a large matmul
and a large copy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from effattn import timing as _timing

__all__ = ["AttentionCost", "Ceilings", "Measurement", "attention_cost", "attention_flops", "count_flops",
           "funnel_layer_flops", "kept_pairs", "measure", "measure_ceilings", "relpos_band_products", "relpos_flops",
           "roofline_plot", "visible_pairs"]

LSE_BYTES = 4  # lse and delta are float32 rows


@dataclass(frozen=True)
class AttentionCost:
    """FLOPs and bytes of one attention call (forward and backward)."""

    fwd_flops: int
    bwd_flops: int
    fwd_bytes: int
    bwd_bytes: int
    naive_fwd_bytes: int  # + scores and probabilities of a materialising implementation

    @property
    def fwd_intensity(self) -> float:
        """Arithmetic intensity of the forward, FLOP/byte."""
        return self.fwd_flops / max(1, self.fwd_bytes)

    @property
    def bwd_intensity(self) -> float:
        return self.bwd_flops / max(1, self.bwd_bytes)


def visible_pairs(Tq: int, Tk: int, window_left: int = -1, window_right: int = -1, diag_offset: int = 0,
                  q_pos_stride: int = 1, clamp_first: bool = False) -> int:
    """Number of (query, key) pairs with ``-left <= j - pos_i <= right``, ``pos_i = i·stride + diag_offset``
    (``clamp_first``: positions clamped at 0, as for a pooled [cls] query); -1 = unbounded. O(Tq)."""
    pos = torch.arange(Tq, dtype=torch.int64) * q_pos_stride + diag_offset
    if clamp_first:
        pos = pos.clamp_min(0)
    lo = (pos - window_left).clamp_min(0) if window_left >= 0 else torch.zeros_like(pos)
    hi = (pos + window_right).clamp_max(Tk - 1) if window_right >= 0 else torch.full_like(pos, Tk - 1)
    return int((hi - lo + 1).clamp_min(0).sum())


def attention_flops(pairs: int, head_dim_qk: int, head_dim_v: int, backward: bool = False) -> int:
    """FLOPs of attention over ``pairs`` (query, key) pairs, summed over every (batch, query head):
    ``2 · pairs · (Dqk + Dv)`` forward, ``2 · pairs · (3 Dqk + 2 Dv)`` backward."""
    return 2 * pairs * ((3 * head_dim_qk + 2 * head_dim_v) if backward else (head_dim_qk + head_dim_v))


def attention_cost(batch: int, heads_q: int, heads_kv: int, Tq: int, Tk: int, head_dim_qk: int, head_dim_v: int,
                   pairs_per_head: int, element_bytes: int = 2, q_rows: int | None = None) -> AttentionCost:
    """Cost of attention computing ``pairs_per_head`` (query, key) pairs per (batch, query head).

    ``q_rows``: rows of q read (the unpooled length for pooled attention; default ``Tq``)."""
    BH = batch * heads_q
    fwd = attention_flops(BH * pairs_per_head, head_dim_qk, head_dim_v)
    bwd = attention_flops(BH * pairs_per_head, head_dim_qk, head_dim_v, backward=True)
    q_el = BH * (Tq if q_rows is None else q_rows) * head_dim_qk
    kv_el = batch * heads_kv * Tk * (head_dim_qk + head_dim_v)
    o_el = BH * Tq * head_dim_v
    fwd_bytes = (q_el + kv_el + o_el) * element_bytes + BH * Tq * LSE_BYTES
    # backward: read q, k, v, o, dO, lse; write delta (and read it), dq, dk, dv
    bwd_bytes = (2 * q_el + 2 * kv_el + 2 * o_el) * element_bytes + 3 * BH * Tq * LSE_BYTES
    naive = fwd_bytes + 2 * 2 * BH * Tq * Tk * element_bytes  # scores and probabilities, written and read
    return AttentionCost(fwd, bwd, fwd_bytes, bwd_bytes, naive)


def kept_pairs(block_mask) -> torch.Tensor:
    """Elements of the kept blocks of a BlockMask per (b, h), ragged edge blocks counted by their
    existing rows/columns: the pairs the block-sparse kernels compute. int64 ``(B, H)``."""
    bm = block_mask
    block_q, block_kv = bm.block_size
    total = None
    for num, idx in ((bm.kv_num_blocks, bm.kv_indices), (bm.full_kv_num_blocks, bm.full_kv_indices)):
        nq, nk = idx.shape[-2:]
        rows = torch.full((nq,), block_q, dtype=torch.int64)
        rows[-1] = bm.q_len - block_q * (nq - 1)
        cols = torch.full((nk,), block_kv, dtype=torch.int64)
        cols[-1] = bm.kv_len - block_kv * (nk - 1)
        listed = torch.arange(nk) < num.cpu().to(torch.int64)[..., None]
        pairs = ((cols[idx.cpu().to(torch.int64)] * listed).sum(-1) * rows).sum(-1)
        total = pairs if total is None else total + pairs
    return total


# ----------------------------------------------------------------------------------------------
# relative-position attention and Funnel's attention layer
# ----------------------------------------------------------------------------------------------
from effattn.relpos_cpu import CPU_TILE as RELPOS_TILE  # noqa: E402 - (query rows, keys) of a C++ CPU kernel tile


def relpos_band_products(Tq: int, Tk: int, rel_stride: int, tile: tuple[int, int] = RELPOS_TILE) -> int:
    """(query row, table row) products of the band GEMMs per (batch, head): every tile of ``rows`` queries
    and ``cols`` keys multiplies its rows with ``rel_stride * (rows - 1) + cols`` table rows."""
    bm, bn = tile
    rows = [min(bm, Tq - m) for m in range(0, Tq, bm)]
    n_key_tiles = -(-Tk // bn)
    return sum(r * (rel_stride * (r - 1) * n_key_tiles + Tk) for r in rows)


def relpos_flops(batch: int, heads: int, Tq: int, Tk: int, head_dim_qk: int, head_dim_v: int, rel_stride: int = 1,
                 backward: bool = False, tile: tuple[int, int] = RELPOS_TILE) -> int:
    """FLOPs of :func:`effattn.relpos_attention`: the content GEMMs of :func:`attention_flops` over all
    ``Tq x Tk`` pairs plus the band GEMMs of the position term (:func:`relpos_band_products`, D wide):
    one forward (``qr R_band^T``), three backward (recomputed, ``dqr = dP R_band``, ``dR += dP^T qr``)."""
    pairs = batch * heads * Tq * Tk
    band = batch * heads * relpos_band_products(Tq, Tk, rel_stride, tile) * head_dim_qk
    return attention_flops(pairs, head_dim_qk, head_dim_v, backward) + 2 * band * (3 if backward else 1)


def funnel_layer_flops(*, batch: int, Tq: int, Tk: int, d_model: int, n_head: int, d_head: int, impl: str,
                       rel_stride: int = 1, rel_len: int | None = None, token_types: bool = True,
                       backward: bool = False) -> int:
    """Matmul FLOPs of one Funnel attention layer (projections, scores, output projection), in the
    counting of ``torch.utils.flop_counter`` (``2 m k n`` per matmul; elementwise work uncounted).

    ``impl``: ``"band"`` (effattn's fused layer, :func:`relpos_flops`), ``"features"`` (the position
    and token-type terms as ``d_model + n_types + 2`` extra QK features of one flash attention call;
    ``n_types = 2`` non-[cls] types), or Hugging Face's eager layer, ``"relative_shift"`` (``rel_len``:
    rows of its relative position embedding, ``position_embeds[...].shape[0]``, e.g. ``2 T`` for a
    layer of block 0) or ``"factorized"`` (its four ``Tq x Tk x d_model`` einsums). Eager layers:
    forward only (``backward`` is for the fused routes: the flash/relpos backward, plus twice each
    projection's forward).
    """
    H, Dh = n_head, d_head
    proj = 2 * batch * (Tq * d_model * H * Dh * 2 + Tk * d_model * H * Dh * 2)  # q, post_proj; k, v
    tt = 2 * batch * Tq * H * Dh * 2 if token_types else 0  # (q + r_s_bias) . seg_embed
    if impl == "band":
        table = 2 * (rel_stride * (Tq - 1) + Tk) * d_model * H * Dh  # R = pe @ r_kernel
        attn = relpos_flops(batch, H, Tq, Tk, Dh, Dh, rel_stride, backward=backward)
        return attn + (2 * (proj + tt + table) if backward else proj + tt + table)
    if impl == "features":
        extra = d_model + (4 if token_types else 0)
        coef = 2 * batch * Tq * H * Dh * d_model  # c = (q + r_r_bias) r_kernel
        attn = attention_flops(batch * H * Tq * Tk, Dh + extra, Dh, backward=backward)
        return attn + (2 * (proj + tt + coef) if backward else proj + tt + coef)
    if backward:
        raise ValueError("funnel_layer_flops: the eager layers are counted forward only")
    content = 2 * batch * H * Tq * Tk * Dh * 2  # (q + r_w_bias) k^T and P v
    if impl == "relative_shift":
        if rel_len is None:
            raise ValueError("funnel_layer_flops: impl='relative_shift' needs rel_len")
        pos = 2 * rel_len * d_model * H * Dh + 2 * batch * H * Tq * rel_len * Dh
    elif impl == "factorized":
        pos = 2 * batch * Tq * H * Dh * d_model + 2 * (2 * batch * H * Tq * Tk * d_model)
    else:
        raise ValueError(f"impl must be 'band', 'features', 'relative_shift' or 'factorized', got {impl!r}")
    return proj + tt + content + pos


# ----------------------------------------------------------------------------------------------
# measured: time, achieved rates, device ceilings, roofline
# ----------------------------------------------------------------------------------------------
# Ceiling measurements: square matmul side and copied bytes, per device type.
CEILING_MATMUL_N = {"cuda": 8192, "cpu": 1024}
CEILING_COPY_BYTES = {"cuda": 1 << 30, "cpu": 1 << 27}
# Roofline plot size and resolution.
ROOFLINE_INCHES = (6.0, 4.5)
ROOFLINE_DPI = 100


def _device(device) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.device(device).type
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device is cuda, but torch.cuda.is_available() is False")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    return name


@dataclass(frozen=True)
class Ceilings:
    """What the device reached here: a ``(n, n) @ (n, n)`` matmul in ``dtype`` and a copy of ``copy_bytes``."""

    device: str
    device_name: str
    dtype: str
    matmul_tflops: float
    copy_gbps: float  # bytes read + written per second, 1e9

    @property
    def ridge_intensity(self) -> float:
        """FLOP/byte where the bandwidth roof meets the compute roof."""
        return self.matmul_tflops * 1e12 / (self.copy_gbps * 1e9)


def measure_ceilings(device=None, dtype: torch.dtype | None = None,
                     config: _timing.TimingConfig | None = None) -> Ceilings:
    """Measure the matmul and copy ceilings of ``device`` (default: CUDA when present, else CPU).

    ``dtype``: of the matmul (default bfloat16 on CUDA, float32 on CPU). Sizes: :data:`CEILING_MATMUL_N`,
    :data:`CEILING_COPY_BYTES`; timing as :func:`effattn.timing.time_ms`."""
    dev = _device(device)
    dtype = dtype or (torch.bfloat16 if dev == "cuda" else torch.float32)
    config = config or _timing.TimingConfig()
    n = CEILING_MATMUL_N[dev]
    a, b = (torch.randn(n, n, device=dev, dtype=dtype) for _ in range(2))
    mm_ms = _timing.time_ms(lambda: a @ b, dev, config)
    src = torch.empty(CEILING_COPY_BYTES[dev] // 4, device=dev, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    copy_ms = _timing.time_ms(lambda: dst.copy_(src), dev, config)
    moved = 2 * src.nbytes
    name = torch.cuda.get_device_name() if dev == "cuda" else "CPU"
    return Ceilings(device=dev, device_name=name, dtype=str(dtype).removeprefix("torch."),
                    matmul_tflops=2 * n**3 / (mm_ms * 1e-3) / 1e12, copy_gbps=moved / (copy_ms * 1e-3) / 1e9)


@dataclass(frozen=True)
class Measurement:
    """One measured call: median ``ms``, ``flops`` and ``bytes`` of one call (None: unknown), peak memory."""

    label: str
    ms: float
    flops: int | None
    bytes: int | None
    peak_bytes: int | None
    ceilings: Ceilings | None = None

    @property
    def tflops(self) -> float | None:
        return None if self.flops is None else self.flops / (self.ms * 1e-3) / 1e12

    @property
    def gbps(self) -> float | None:
        return None if self.bytes is None else self.bytes / (self.ms * 1e-3) / 1e9

    @property
    def intensity(self) -> float | None:
        """FLOP/byte (None without both counts)."""
        return None if not self.flops or not self.bytes else self.flops / self.bytes

    @property
    def compute_fraction(self) -> float | None:
        """Achieved TFLOP/s over the matmul ceiling."""
        return None if self.tflops is None or self.ceilings is None else self.tflops / self.ceilings.matmul_tflops

    @property
    def bandwidth_fraction(self) -> float | None:
        """Achieved GB/s over the copy ceiling."""
        return None if self.gbps is None or self.ceilings is None else self.gbps / self.ceilings.copy_gbps

    def __str__(self) -> str:
        parts = [f"{self.label or 'call'}: {self.ms:.4g} ms"]
        if self.tflops is not None:
            frac = "" if self.compute_fraction is None else f" ({self.compute_fraction:.1%} of matmul)"
            parts.append(f"{self.tflops:.4g} TFLOP/s{frac}")
        if self.gbps is not None:
            frac = "" if self.bandwidth_fraction is None else f" ({self.bandwidth_fraction:.1%} of copy)"
            parts.append(f"{self.gbps:.4g} GB/s{frac}")
        if self.peak_bytes is not None:
            parts.append(f"peak {self.peak_bytes / _timing.MIB:.4g} MiB")
        return ", ".join(parts)


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` as ``torch.utils.flop_counter.FlopCounterMode`` counts them (effattn's ops
    by the formulas of this module; a backward inside ``fn`` included)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def measure(fn: Callable[[], object], *, label: str = "", flops: int | None = None, bytes: int | None = None,
            count: bool = True, device=None, ceilings: Ceilings | None = None,
            config: _timing.TimingConfig | None = None) -> Measurement:
    """Time ``fn`` (no arguments: an op call, a model's forward, a training step) and measure its peak memory.

    ``flops``: of one call; when None and ``count``, counted with :func:`count_flops` (None when it counts
    nothing: an op without a registered formula, such as torch's CPU SDPA). ``bytes``: of one
    call (e.g. ``attention_cost(...).fwd_bytes``); None leaves GB/s unknown. ``ceilings``: from
    :func:`measure_ceilings` on the same device, for the achieved fractions."""
    dev = _device(device)
    if flops is None and count:
        flops = count_flops(fn) or None  # 0: FlopCounterMode has no formula for what ran (e.g. CPU SDPA)
    for name, value in (("flops", flops), ("bytes", bytes)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"{name} must be a non-negative int or None, got {value!r}")
    config = config or _timing.TimingConfig()
    ms = _timing.time_ms(fn, dev, config)
    peak = _timing.peak_memory_bytes(fn, dev)
    return Measurement(label=label, ms=ms, flops=flops, bytes=bytes, peak_bytes=peak, ceilings=ceilings)


def roofline_plot(measurements: Sequence[Measurement], path, ceilings: Ceilings, title: str = "") -> Path:
    """Write a roofline PNG to ``path``: ``min(matmul ceiling, copy ceiling x intensity)`` against arithmetic
    intensity (log-log) and each measurement with both counts as a point, one colour per label. Needs
    matplotlib."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("roofline_plot needs matplotlib (pip install matplotlib)") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [m for m in measurements if m.intensity is not None and m.tflops]
    intensities = [m.intensity for m in points] + [ceilings.ridge_intensity]
    lo = 10 ** math.floor(math.log10(min(intensities) / 4))
    hi = 10 ** math.ceil(math.log10(max(intensities) * 4))
    xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    roof = [min(ceilings.matmul_tflops, ceilings.copy_gbps * 1e9 * x / 1e12) for x in xs]
    fig, ax = plt.subplots(figsize=ROOFLINE_INCHES)
    ax.plot(xs, roof, "k-", linewidth=1.5,
            label=f"roof: {ceilings.matmul_tflops:.3g} TFLOP/s ({ceilings.dtype} matmul), "
                  f"{ceilings.copy_gbps:.3g} GB/s (copy)")
    labels = list(dict.fromkeys(m.label or "call" for m in points))  # one colour and legend entry per label
    for i, label in enumerate(labels):
        mine = [m for m in points if (m.label or "call") == label]
        ax.plot([m.intensity for m in mine], [m.tflops for m in mine], "o", color=f"C{i % 10}", label=label,
                markersize=4, alpha=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    if points:
        ax.set_ylim(min(m.tflops for m in points) / 3, ceilings.matmul_tflops * 2)
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("TFLOP/s")
    ax.set_title(title or f"roofline, {ceilings.device_name}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, loc="upper left")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=ROOFLINE_DPI)
    plt.close(fig)
    return path
