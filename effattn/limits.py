"""Size limits of effattn's kernels, in one place, as data (no Triton, no torch).

The backends turn them into ``not_supported_reasons`` (:mod:`effattn.backends`), the launchers of the
compiled extension check them again before a launch (:mod:`effattn.cuda_ops`), and the Triton kernels
read their constants from here. The CUDA C++ launcher states its own (``csrc/cuda/launch.cu``:
``kMaxGridYZ``, ``kMinSparseBlock``, ``kMaxHeadDim``); a test checks that they equal these.
"""

from __future__ import annotations

# ----------------------------------------------------------------------------------------------
# shared by every GPU kernel
# ----------------------------------------------------------------------------------------------
# The launch grids are (blocks, heads, batch): CUDA caps the y and z axes of a grid at 65535.
MAX_GRID_YZ = 65535
# tl.dot needs every side of a tile to be at least 16: head dims are padded up to it, and the blocks
# of a BlockMask (the tiles of the block-sparse kernels) are never smaller.
MIN_DOT_SIZE = 16
MIN_BLOCK_SIZE = MIN_DOT_SIZE
# Dropout keeps draw from Philox with 32-bit counters indexed by query and key position.
DROPOUT_MAX_LEN = 2**32 - 1

# ----------------------------------------------------------------------------------------------
# Triton kernels (kernels/flash_attn.py)
# ----------------------------------------------------------------------------------------------
# V's head dim is held in registers for the whole row block: 256 is the widest tile that fits.
TRITON_MAX_HEAD_DIM_V = 256
# Q/K may carry extra score features (e.g. Funnel's fused relative terms): the widest head-dim
# class of the kernels' config tables.
TRITON_MAX_HEAD_DIM_QK = 2048
# Wider float32 Q/K tiles do not fit in shared memory (float16/bfloat16 go up to the maximum).
TRITON_MAX_HEAD_DIM_QK_FP32 = 1024
# The loop that pools queries as they are loaded is unrolled over the stride.
TRITON_MAX_POOL_STRIDE = 16

# ----------------------------------------------------------------------------------------------
# the compiled extension (csrc/)
# ----------------------------------------------------------------------------------------------
# Sizes travel as int32 in the launch parameters.
EXT_MAX_LEN = 2**31 - 1
# The CUDA kernels are instantiated for head dims 64 and 128 (smaller dims are padded): kMaxHeadDim.
CUDA_MAX_HEAD_DIM = 128
# The CUDA kernels' tiles (64 rows / keys) must fit in a block of the mask: kMinSparseBlock.
CUDA_MIN_SPARSE_BLOCK = 64
# mma.sync m16n8k16 for bfloat16, ldmatrix and cp.async need sm_80.
CUDA_MIN_CAPABILITY = (8, 0)
