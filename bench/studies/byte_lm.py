"""A small byte-level decoder language model trained on the Python standard library's sources.

The model the learned-mask study (:mod:`bench.studies.learned_masks`) judges its predictors on: a
GPT-style pre-LayerNorm decoder (learned absolute positions, ``n_layers`` blocks of causal multi-head
attention and a 4x GELU MLP, the byte embedding tied to the output layer), whose attention goes through
an ``attention(layer, q, k, v)`` callable — by default :func:`effattn.flash_attention` with
``causal=True``, so the model is trained with effattn's own kernels; the study swaps in
:func:`effattn.sparse_attention` with a predicted mask, or a recorder of ``q, k``.

Text: every ``*.py`` file under this interpreter's standard library (``sysconfig``'s ``stdlib`` path),
outside ``site-packages``, caches and test folders, sorted by path. Each file goes to one split by a
hash of its path: ``test`` (1 in 20: held-out text for the losses and recalls), ``calib`` (1 in 20:
held-out text the predictors are fitted on) and ``train``. :func:`corpus` records the files, their
sizes and a SHA-256 per split; the checkpoint's cache key includes them, so another Python's library
trains another model.

Training is seeded and bounded by a step count (not wall time), AdamW with a linear warm-up and cosine
decay, batches of random windows of the train split drawn from a seeded generator.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

SPLITS = ("train", "calib", "test")
SKIP_DIRS = frozenset({"site-packages", "__pycache__", "test", "tests", "idle_test"})
FILE_SEPARATOR = b"\n\n"
CACHE_ENV = "EFFATTN_STUDY_CACHE"


@dataclass(frozen=True)
class LMConfig:
    n_layers: int = 4
    d_model: int = 256
    n_heads: int = 4
    seq_len: int = 1024
    mlp_ratio: int = 4
    vocab: int = 256  # bytes

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 600
    batch: int = 8
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0


# ----------------------------------------------------------------------------------------------
# text
# ----------------------------------------------------------------------------------------------
def _split_of(rel: str) -> str:
    h = int.from_bytes(hashlib.sha1(rel.encode()).digest()[:4], "big") % 20
    return "test" if h == 0 else "calib" if h == 1 else "train"


def corpus(max_bytes: int | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """``({split: uint8 tensor of bytes}, record)``: the standard library's Python sources, split by file.

    ``max_bytes`` caps the bytes read (files in path order, a whole file or none) for quick runs. The
    record holds the root, per split the file count, bytes and SHA-256 of the bytes, and the file list."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if not SKIP_DIRS & set(p.relative_to(root).parts[:-1]) and p.is_file())
    parts: dict[str, list[bytes]] = {s: [] for s in SPLITS}
    names: dict[str, list[str]] = {s: [] for s in SPLITS}
    total = 0
    for p in files:
        data = p.read_bytes()
        if max_bytes is not None and total + len(data) > max_bytes:
            continue
        rel = p.relative_to(root).as_posix()
        split = _split_of(rel)
        parts[split].append(data)
        names[split].append(rel)
        total += len(data)
    record = {"root": str(root), "files": sum(len(v) for v in names.values()), "bytes": total, "splits": {}}
    streams = {}
    for s in SPLITS:
        blob = FILE_SEPARATOR.join(parts[s])
        record["splits"][s] = {"files": len(names[s]), "bytes": len(blob),
                               "sha256": hashlib.sha256(blob).hexdigest(), "names": names[s]}
        streams[s] = torch.frombuffer(bytearray(blob), dtype=torch.uint8) if blob else torch.zeros(0, torch.uint8)
    return streams, record


def windows(stream: torch.Tensor, n: int, length: int) -> torch.Tensor:
    """``(n, length)`` int64 windows at evenly spaced offsets from the start to the end of ``stream``
    (the first at 0, the last ending at the end; a sample of the whole split, not of its first files),
    not overlapping."""
    if n < 1 or stream.numel() < n * length:
        raise ValueError(f"the text has {stream.numel()} bytes, {n} windows of {length} need {n * length}")
    start = torch.arange(n) * (stream.numel() - length) // max(1, n - 1)
    return stream[start[:, None] + torch.arange(length)].long()


def random_windows(stream: torch.Tensor, n: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """``(n, length)`` int64 windows at uniformly drawn offsets of ``stream``."""
    start = torch.randint(0, stream.numel() - length + 1, (n,), generator=gen)
    return stream[start[:, None] + torch.arange(length)].long()


# ----------------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------------
def dense_attention(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention through effattn's flash kernel (the model's own attention)."""
    import effattn

    return effattn.flash_attention(q, k, v, causal=True)


class Block(nn.Module):
    def __init__(self, cfg: LMConfig, index: int):
        super().__init__()
        self.index, self.n_heads = index, cfg.n_heads
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model)
        self.out = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor, attention) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)
        a = attention(self.index, q, k, v)  # (B, H, T, D)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, C))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class ByteLM(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos = nn.Parameter(torch.zeros(cfg.seq_len, cfg.d_model))
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.apply(self._init)
        nn.init.normal_(self.pos, std=0.02)
        for b in self.blocks:  # GPT-2's scaled init of the residual projections
            for lin in (b.proj, b.out):
                nn.init.normal_(lin.weight, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, ids: torch.Tensor, attention=dense_attention) -> torch.Tensor:
        """Logits ``(B, T, 256)`` of the next byte at every position of ``ids (B, T)``."""
        T = ids.shape[1]
        if T > self.cfg.seq_len:
            raise ValueError(f"ids has {T} positions, the model was built for at most {self.cfg.seq_len}")
        x = self.embed(ids) + self.pos[:T]
        for b in self.blocks:
            x = b(x, attention)
        return self.ln_f(x) @ self.embed.weight.t()

    def loss(self, ids: torch.Tensor, attention=dense_attention) -> torch.Tensor:
        """Mean next-byte cross-entropy in nats over ``ids[:, 1:]`` (``ids (B, T + 1)``)."""
        logits = self(ids[:, :-1], attention)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


@torch.no_grad()
def bits_per_byte(model: ByteLM, ids: torch.Tensor, attention=dense_attention, batch: int = 4) -> float:
    """Held-out loss in bits per byte over the windows ``ids (N, T + 1)``."""
    total, n = 0.0, 0
    for i in range(0, ids.shape[0], batch):
        chunk = ids[i:i + batch]
        total += float(model.loss(chunk, attention)) * chunk.shape[0]
        n += chunk.shape[0]
    return total / n / math.log(2)


# ----------------------------------------------------------------------------------------------
# training, with a cached checkpoint
# ----------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "effattn" / "studies")


def checkpoint_key(lm: LMConfig, train: TrainConfig, record: dict) -> str:
    spec = {"lm": asdict(lm), "train": asdict(train), "text": {s: record["splits"][s]["sha256"] for s in SPLITS},
            "version": 1}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def lr_at(step: int, t: TrainConfig) -> float:
    if step < t.warmup:
        return t.lr * (step + 1) / t.warmup
    progress = (step - t.warmup) / max(1, t.steps - t.warmup)
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(lm: LMConfig, tc: TrainConfig, stream: torch.Tensor, *, log_every: int = 50, log=print,
          attention=dense_attention, model: ByteLM | None = None) -> tuple[ByteLM, dict]:
    """Train a fresh :class:`ByteLM` (or go on training ``model``) for ``tc.steps`` steps on ``stream``.
    Returns the model (eval mode) and a log: losses every ``log_every`` steps, wall seconds, tokens."""
    torch.manual_seed(tc.seed)
    model = ByteLM(lm) if model is None else model
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and n != "pos"]
    other = [p for n, p in model.named_parameters() if p.dim() < 2 or n == "pos"]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=tc.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(tc.seed + 1)
    history, t0 = [], time.perf_counter()
    for step in range(tc.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, tc)
        ids = random_windows(stream, tc.batch, lm.seq_len + 1, gen)
        loss = model.loss(ids, attention)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        if step % log_every == 0 or step == tc.steps - 1:
            bpb = float(loss.detach()) / math.log(2)
            history.append({"step": step, "train_bpb": bpb, "wall_s": time.perf_counter() - t0})
            log(f"step {step}/{tc.steps}: train {bpb:.3f} bits/byte, {time.perf_counter() - t0:.0f} s")
    model.eval()
    return model, {"history": history, "wall_s": time.perf_counter() - t0,
                   "tokens": tc.steps * tc.batch * lm.seq_len}


def trained_model(lm: LMConfig, tc: TrainConfig, streams: dict, record: dict, *, log=print,
                  use_cache: bool = True) -> tuple[ByteLM, dict]:
    """The model trained by :func:`train`, from the cache when a checkpoint of the same configuration
    and text is there (``info["cached"]``), else trained and saved there."""
    path = cache_dir() / f"byte_lm_{checkpoint_key(lm, tc, record)}.pt"
    if use_cache and path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        model = ByteLM(lm)
        model.load_state_dict(saved["state"])
        info = json.loads(saved["info"])
        info.update(cached=True, checkpoint=str(path))
        return model.eval(), info
    model, info = train(lm, tc, streams["train"], log=log)
    info.update(cached=False, checkpoint=str(path))
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"state": model.state_dict(), "info": json.dumps(info)}, tmp)
        tmp.replace(path)
    return model, info
