"""Compile effattn's Triton kernels ahead of time for sm_90 (H100) without a GPU.

Run as a script (``python -m tests.kernels.aot_sm90``) in a process where ``TRITON_INTERPRET`` is unset: it
compiles a set of kernel variants to cubin with Triton's bundled ptxas and prints one JSON line per
variant (shared memory, registers, spill stack, or the error). ``tests/kernels/test_compile_sm90.py`` runs it.
This checks what the interpreter cannot: that the kernels lower to GPU code and fit the hardware.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from multiprocessing import Pool

if __name__ == "__main__":  # compiling needs the real (not interpreted) triton.jit
    os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler.compiler import ASTSource  # noqa: E402

from effattn.kernels import block_attn_map as bam  # noqa: E402
from effattn.kernels import block_sparse_attn as bsa  # noqa: E402
from effattn.kernels import cluster_blocks as cbk  # noqa: E402
from effattn.kernels import flash_attn as fa  # noqa: E402
from effattn.kernels import relpos_attn as ra  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
POINTERS = {"Q", "K", "V", "O", "DO", "DK", "DV", "DQ", "QR", "R", "TT", "DQR", "DTT"}
FP32_POINTERS = {"LSE", "DELTA", "DLSE", "OUT_MAX", "OUT_SUM", "DR", "ALIBI", "O_PART", "LSE_PART"}
INT32_POINTERS = {"QSTART", "QLEN", "KSTART", "KLEN", "QT", "KT", "KV_NUM", "KV_IDX", "FULL_NUM", "FULL_IDX", "Q_NUM",
                  "Q_IDX", "QSEG", "KSEG", "IDS", "BITS", "QB",
                  "KB"}
FLOAT_ARGS = {"qk_scale", "sm_scale", "drop_scale", "scale", "softcap2"}
TRITON_DTYPE = {"fp16": "fp16", "bf16": "bf16", "fp32": "fp32"}

# (name, kernel, dtype, head dim, (BLOCK_M, BLOCK_N, warps, stages), mask dtype or None, other constexprs)
VARIANTS = [
    ("fwd fp16 D64 causal-window bool-kpm dropout", "fwd", "fp16", 64, fa.FWD_CONFIGS[64][0], "u8",
     dict(HAS_WINDOW_LEFT=True, HAS_WINDOW_RIGHT=True, MASK_KIND=fa.MASK_BOOL, MASK_ROW_BCAST=True,
          HAS_DROPOUT=True)),
    ("fwd bf16 D128 float-mask", "fwd", "bf16", 128, fa.FWD_CONFIGS[128][0], "fp32",
     dict(MASK_KIND=fa.MASK_FLOAT)),
    ("fwd fp32 D64 ieee", "fwd", "fp32", 64, fa.FWD_CONFIGS[64][-1], None, dict(DOT_PRECISION="ieee")),
    ("dkdv fp16 D128 window dropout", "bwd_kv", "fp16", 128, fa.BWD_KV_CONFIGS[128][0], None,
     dict(HAS_WINDOW_LEFT=True, HAS_WINDOW_RIGHT=True, HAS_DROPOUT=True)),
    ("dq fp16 D80 bool-mask", "bwd_q", "fp16", 80, fa.BWD_Q_CONFIGS[128][0], "u8", dict(MASK_KIND=fa.MASK_BOOL)),
    ("fwd bf16 D128 causal softcap alibi", "fwd", "bf16", 128, fa.FWD_CONFIGS[128][0], None,
     dict(HAS_WINDOW_RIGHT=True, HAS_SOFTCAP=True, HAS_ALIBI=True)),
    ("dkdv fp16 D64 softcap alibi", "bwd_kv", "fp16", 64, fa.BWD_KV_CONFIGS[64][0], None,
     dict(HAS_SOFTCAP=True, HAS_ALIBI=True)),
    ("split-KV decode fp16 D128 16 rows causal softcap", "decode", "fp16", 128,
     (16, fa.DECODE_TILE[128][0], *fa.DECODE_TILE[128][1:]), None, dict(HAS_WINDOW_RIGHT=True, HAS_SOFTCAP=True)),
    ("fwd bf16 D64 varlen causal", "fwd", "bf16", 64, fa.FWD_CONFIGS[64][0], None,
     dict(VARLEN=True, HAS_WINDOW_RIGHT=True)),
    ("dq fp16 D128 varlen window", "bwd_q", "fp16", 128, fa.BWD_Q_CONFIGS[128][0], None,
     dict(VARLEN=True, HAS_WINDOW_LEFT=True, HAS_WINDOW_RIGHT=True)),
    ("fwd bf16 D64 pool-mean cls causal", "fwd", "bf16", 64, fa.FWD_CONFIGS[64][0], None,
     dict(POOL=2, POOL_CLS=True, HAS_WINDOW_RIGHT=True)),
    ("dkdv fp16 D128 pool-max causal", "bwd_kv", "fp16", 128, fa.BWD_KV_CONFIGS[128][0], None,
     dict(POOL=2, POOL_MAX=True, HAS_WINDOW_RIGHT=True)),
    ("dq fp16 D64 pool-max cls", "bwd_q", "fp16", 64, fa.BWD_Q_CONFIGS[64][0], None,
     dict(POOL=2, POOL_MAX=True, POOL_CLS=True)),
    ("dq bf16 D128 pool-mean cls", "bwd_q", "bf16", 128, fa.BWD_Q_CONFIGS[128][0], None,
     dict(POOL=2, POOL_CLS=True)),
    # Funnel-base's fused relative attention: QK 64 + 768 + 5 features, V 64
    ("fwd fp16 Dqk837 Dv64 kpm", "fwd", "fp16", 64, fa.FWD_CONFIGS[1024][0], "u8",
     dict(HEAD_DIM_QK=837, BLOCK_DQK=1024, MASK_KIND=fa.MASK_BOOL, MASK_ROW_BCAST=True)),
    ("dkdv fp16 Dqk837 Dv64", "bwd_kv", "fp16", 64, fa.BWD_KV_CONFIGS[1024][0], None,
     dict(HEAD_DIM_QK=837, BLOCK_DQK=1024)),
    ("dq fp16 Dqk837 Dv64", "bwd_q", "fp16", 64, fa.BWD_Q_CONFIGS[1024][0], None,
     dict(HEAD_DIM_QK=837, BLOCK_DQK=1024)),
]
KERNELS = {"fwd": fa._flash_fwd_kernel, "decode": fa._flash_decode_kernel, "bwd_kv": fa._flash_bwd_dkdv_kernel,
           "bwd_q": fa._flash_bwd_dq_kernel,
           "sparse_fwd": bsa._sparse_fwd_kernel, "sparse_bwd_kv": bsa._sparse_bwd_dkdv_kernel,
           "sparse_bwd_q": bsa._sparse_bwd_dq_kernel, "attn_map": bam._block_attn_map_kernel,
           "cluster_bitsets": cbk._cluster_bitset_kernel, "cluster_pairs": cbk._cluster_pairs_kernel,
           "relpos_fwd": ra._relpos_fwd_kernel, "relpos_bwd_kv": ra._relpos_bwd_dkdv_kernel,
           "relpos_bwd_q": ra._relpos_bwd_dq_kernel, "relpos_bwd_dr": ra._relpos_bwd_dr_kernel}
# block-sparse: tiles are the mask's blocks; (BLOCK_M, BLOCK_N, warps, stages) as the launcher uses them
SPARSE_TILE = (64, 64, bsa.NUM_WARPS, bsa.NUM_STAGES)
SPARSE_RULE = dict(HAS_WINDOW_LEFT=True, HAS_WINDOW_RIGHT=True, HAS_SEGMENTS=True, HAS_GLOBAL=True, HAS_KPM=True)
VARIANTS += [
    ("sparse fwd bf16 D128 rule+kpm", "sparse_fwd", "bf16", 128, SPARSE_TILE, None, SPARSE_RULE),
    ("sparse dkdv fp16 D64 rule+kpm", "sparse_bwd_kv", "fp16", 64, SPARSE_TILE, None, SPARSE_RULE),
    ("sparse dq fp16 D64 blocks only", "sparse_bwd_q", "fp16", 64, SPARSE_TILE, None, dict(HAS_KPM=False)),
]
VARIANTS += [("block attention map bf16 D64 causal", "attn_map", "bf16", 64, (64, 64, 4, 1), None,
              dict(CAUSAL=True, WITH_SUM=True))]
# SparseFinder's cluster bitsets (block of 128 tokens, a tile of 32 words) and block pairs (64 x 64 tiles)
VARIANTS += [("cluster bitsets block 128 32 words", "cluster_bitsets", "fp32", 0, (128, 0, cbk.NUM_WARPS, 1), None,
              dict(BLOCK=128, TOKEN_TILE=cbk.MAX_TOKEN_TILE, WORD_TILE=cbk.MAX_WORD_TILE, WORD_BITS=cbk.WORD_BITS)),
             ("cluster bitsets block 1024 1 word", "cluster_bitsets", "fp32", 0, (1024, 0, cbk.NUM_WARPS, 1), None,
              dict(BLOCK=1024, TOKEN_TILE=cbk.MAX_TOKEN_TILE, WORD_TILE=1, WORD_BITS=cbk.WORD_BITS)),
             ("cluster block pairs", "cluster_pairs", "fp32", 0, (cbk.TILE_M, cbk.TILE_N, cbk.PAIR_NUM_WARPS, 1),
              None, dict(TILE_M=cbk.TILE_M, TILE_N=cbk.TILE_N))]
# Funnel's relative-position band kernels at their first tile of the D=64 class (Funnel-base), stride 2, with
# token types and padding; the forward with dropout (the tile and band sizes as the launcher derives them)
RELPOS_FLAGS = dict(REL_STRIDE=2, SEPARATE_CLS=True, HAS_TT=True, HAS_KPM=True)
VARIANTS += [(f"relpos {kind} fp16 D64 stride 2 types kpm" + (" dropout" if kind == "fwd" else ""), f"relpos_{kind}",
              "fp16", 64, ra.CONFIGS[kind][64][0], None, dict(RELPOS_FLAGS, HAS_DROPOUT=kind == "fwd"))
             for kind in ("fwd", "bwd_kv", "bwd_q", "bwd_dr")]
# The widest tiles, whose compiles take minutes: with EFFATTN_FULL_GRIDS=1 only (as the interpreter's full grids)
if os.environ.get("EFFATTN_FULL_GRIDS", "") not in ("", "0"):
    VARIANTS += [
        ("fwd fp32 D256 ieee", "fwd", "fp32", 256, fa.FWD_CONFIGS[256][-1], None, dict(DOT_PRECISION="ieee")),
        ("dkdv bf16 D256 causal", "bwd_kv", "bf16", 256, fa.BWD_KV_CONFIGS[256][0], None,
         dict(HAS_WINDOW_RIGHT=True)),
    ]
SPARSE_DROPS = ("MASK_KIND", "MASK_ROW_BCAST", "HAS_DROPOUT", "POOL", "POOL_MAX", "POOL_CLS", "HAS_SOFTCAP",
                "HAS_ALIBI", "VARLEN")


def _signature(jit, dtype, mask_dtype, constexprs):
    sig = {}
    for name in jit.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in POINTERS:
            sig[name] = "*" + TRITON_DTYPE[dtype]
        elif name in FP32_POINTERS:
            sig[name] = "*fp32"
        elif name in INT32_POINTERS:
            sig[name] = "*i32"
        elif name in ("KPM", "OUT"):
            sig[name] = "*u8"
        elif name == "MASK":
            sig[name] = "*" + (mask_dtype or TRITON_DTYPE[dtype])
        elif name in FLOAT_ARGS:
            sig[name] = "fp32"
        elif name == "seed":
            sig[name] = "i64"
        else:
            sig[name] = "i32"
    return sig


def _resources(cubin: bytes) -> dict:
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return {"registers": int(m[1]), "stack": int(m[2])} if m else {}


def compile_variant(variant) -> dict:
    name, kind, dtype, head_dim, (bm, bn, warps, stages), mask_dtype, extra = variant
    kernel = KERNELS[kind]
    jit = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    constexprs = dict(HEAD_DIM_QK=head_dim, HEAD_DIM_V=head_dim, BLOCK_DQK=fa._block_d(head_dim),
                      BLOCK_DV=fa._block_d(head_dim), HAS_WINDOW_LEFT=False, HAS_WINDOW_RIGHT=False,
                      MASK_KIND=fa.MASK_NONE, MASK_ROW_BCAST=False, HAS_DROPOUT=False, UPCAST_DOT=False,
                      DOT_PRECISION="tf32", POOL=1, POOL_MAX=False, POOL_CLS=False, HAS_SOFTCAP=False, HAS_ALIBI=False,
                      VARLEN=False, BLOCK_M=bm, BLOCK_N=bn)
    constexprs.update(extra)
    if kind == "attn_map":
        constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=fa._block_d(head_dim), BLOCK_M=bm, BLOCK_N=bn, UPCAST_DOT=False,
                          DOT_PRECISION="tf32", **extra)
    if kind.startswith("cluster"):
        constexprs = dict(extra)
    if kind == "decode":
        constexprs = {n: constexprs[n] for n in ("HEAD_DIM_QK", "HEAD_DIM_V", "BLOCK_DQK", "BLOCK_DV",
                                                 "HAS_WINDOW_LEFT", "HAS_WINDOW_RIGHT", "HAS_SOFTCAP", "HAS_ALIBI",
                                                 "UPCAST_DOT", "DOT_PRECISION", "BLOCK_M", "BLOCK_N")}
    if kind.startswith("relpos"):
        constexprs = dict(HEAD_DIM_QK=head_dim, HEAD_DIM_V=head_dim, BLOCK_DQK=fa._block_d(head_dim),
                          BLOCK_DV=fa._block_d(head_dim), UPCAST_DOT=False, DOT_PRECISION="tf32", **extra)
        stride = extra["REL_STRIDE"]
        if kind == "relpos_bwd_dr":  # (BLOCK_T, BLOCK_M): rows lowered to the stride, the key band padded
            rows = ra._row_block(bn, bm, stride)
            constexprs.update(BLOCK_T=bm, BLOCK_M=rows, BLOCK_KW=ra.band_width(rows, bm, stride))
        else:
            rows = ra._row_block(bm, bn, stride)
            constexprs.update(BLOCK_M=rows, BLOCK_N=bn, BLOCK_W=ra.band_width(rows, bn, stride))
    if kind.startswith("sparse"):
        constexprs = {k: v for k, v in constexprs.items() if k not in SPARSE_DROPS}
        constexprs = {"HAS_SEGMENTS": False, "HAS_GLOBAL": False, **constexprs}
    start = time.perf_counter()
    try:
        src = ASTSource(jit, _signature(jit, dtype, mask_dtype, constexprs), constexprs=constexprs)
        compiled = triton.compile(src, target=TARGET, options={"num_warps": warps, "num_stages": stages})
        return {"variant": name, "shared": compiled.metadata.shared, **_resources(compiled.asm["cubin"]),
                "seconds": round(time.perf_counter() - start, 1)}
    except Exception as e:  # reported, and failed by the test
        return {"variant": name, "error": f"{type(e).__name__}: {str(e)[-800:]}"}


def main() -> None:
    with Pool(min(2, os.cpu_count() or 1)) as pool:
        for result in pool.imap_unordered(compile_variant, VARIANTS):
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.exit(main())
