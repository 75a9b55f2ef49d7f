#!/usr/bin/env bash
# The check on a CUDA machine, in one command; the default parts take about 7 minutes:
#
#   bash bench/gpu_check.sh            # from anywhere; runs in the repository root
#
# 1. nvidia-smi and the versions of python, torch, CUDA, triton;
# 2. "tests": the test suite on CUDA (EFFATTN_TEST_DEVICE=cuda), time-boxed, logged to $OUT/tests_cuda.log;
# 3. "flash": the h100 preset of `python -m bench` on CUDA, time-boxed, its files written to $OUT;
# 4. "funnel": the h100-funnel preset of `python -m bench` (pooled-query attention, pooled in the kernel or
#    first; the Funnel layer of both attention types against Hugging Face's), time-boxed, files funnel.*;
#    then the whole Funnel base model, eager against the fused routes (`python -m bench.studies.funnel_model`,
#    T = 1k, 4k, 8k), files funnel_model.json, funnel_model.md;
# 5. "sparse": the h100-sparse preset of `python -m bench` (block-sparse attention against the kept share,
#    next to dense attention, and the masks' build times), time-boxed, files sparse.*;
# 6. "ops": the h100-ops preset of `python -m bench` (pooled, sparse, Funnel layer, mask prediction),
#    time-boxed, files ops.json, ops.md, ops_sparse.png;
# 7. "cuda": the C++/CUDA extension: its build (sm_90 only unless EFFATTN_CUDA_ARCHS says otherwise),
#    its tests on the GPU, the kernels on the GPU against the same kernels on the host emulator
#    (backend "cuda-emu"), and compute-sanitizer over a few of them, logged to $OUT/tests_cuda_ext.log;
# 8. "new": the tests of what has not yet run on a GPU besides the extension (the relative-position
#    band kernels and the Funnel layer on them; varlen, split-KV decoding, the flash-attn interface and the
#    Hugging Face integration) on CUDA, logged to $OUT/tests_new.log;
# 9. "varlen": the h100-varlen preset of `python -m bench` (packed sequences against padding + SDPA and
#    segment ids; decoding against SDPA and a plain flash call), time-boxed, files varlen.json, varlen.md.
# GPU_CHECK_PARTS (default "cuda new varlen funnel": what has never run on a GPU, about 8 minutes) picks the
# steps; all of them do not fit one 10-minute call: split them, e.g. "tests" then "flash ops"
# (funnel and sparse: the sweeps of those ops in depth; ops covers them more thinly).
#
# Uses the machine's own python, torch and triton (PYTHON overrides the interpreter); installs
# nothing and needs no network. Output directory: $OUT, or bench/results when OUT is unset. It holds
# at most 8 files per call (the device tool's limit): tests_cuda.log, tests_cuda_ext.log;
# attention.json, attention.md, attention_tflops.png, attention_roofline.png; ops.json, ops.md,
# ops_sparse.png; funnel.json, funnel.md, funnel_model.json, funnel_model.md; sparse.json, sparse.md; varlen.json, varlen.md (plots of those
# made from the JSON).
#
# Time: tests at most TEST_TIMEOUT_S; the flash benchmark stops starting new rows after the preset's
# budget and is interrupted (SIGINT: it still writes its files) at BENCH_TIMEOUT_S, and likewise the
# others at FUNNEL_TIMEOUT_S, SPARSE_TIMEOUT_S, OPS_TIMEOUT_S. Exit status: 0 when the tests pass and
# no benchmark found a wrong output of effattn's.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
OUT_DIR="${OUT:-bench/results}"
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
TEST_TIMEOUT_S="${TEST_TIMEOUT_S:-230}"
BENCH_TIMEOUT_S="${BENCH_TIMEOUT_S:-110}"
FUNNEL_TIMEOUT_S="${FUNNEL_TIMEOUT_S:-60}"
FUNNEL_MODEL_TIMEOUT_S="${FUNNEL_MODEL_TIMEOUT_S:-60}"
VARLEN_TIMEOUT_S="${VARLEN_TIMEOUT_S:-75}"
SPARSE_TIMEOUT_S="${SPARSE_TIMEOUT_S:-100}"
OPS_TIMEOUT_S="${OPS_TIMEOUT_S:-180}"
CUDA_TIMEOUT_S="${CUDA_TIMEOUT_S:-200}"
NEW_TIMEOUT_S="${NEW_TIMEOUT_S:-100}"
export EFFATTN_CUDA_ARCHS="${EFFATTN_CUDA_ARCHS:-90}"  # the extension's build: this GPU's arch only
PARTS="${GPU_CHECK_PARTS:-cuda new varlen funnel}"
test_rc=0 bench_rc=0 funnel_rc=0 sparse_rc=0 ops_rc=0 cuda_rc=0 new_rc=0 varlen_rc=0
KILL_AFTER_S=15
mkdir -p "$OUT_DIR"

echo "== machine"
nvidia-smi || echo "nvidia-smi failed (exit $?)"
"$PYTHON" - <<'EOF'
import platform
import torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA runtime {torch.version.cuda}")
try:
    import triton
    print(f"triton {triton.__version__}")
except Exception as e:
    print(f"triton not importable: {e}")
if torch.cuda.is_available():
    print(f"GPU {torch.cuda.get_device_name()}, capability {torch.cuda.get_device_capability()}")
else:
    print("torch sees no CUDA device")
EOF
"$PYTHON" -m effattn.info || echo "effattn.info failed (exit $?)"

if [[ " $PARTS " == *" cuda "* ]]; then
    echo "== C++/CUDA extension: build, tests on the GPU, compute-sanitizer (at most ${CUDA_TIMEOUT_S} s)"
    timeout -k "$KILL_AFTER_S" "$CUDA_TIMEOUT_S" bash -c '
        "$0" -c "from effattn import _ext; m = _ext.load(); print(\"extension built, CUDA:\", m.WITH_CUDA, m.CUDA_ARCHS)" &&
        EFFATTN_TEST_DEVICE=cuda "$0" -m pytest tests/csrc/test_cuda_ext.py tests/csrc/test_cuda_backend.py tests/csrc/test_cpp_backend.py \
            -q -n 8 -p no:cacheprovider -rfs &&
        EFFATTN_TEST_DEVICE=cuda "$0" -m pytest tests/csrc/test_cuda_emu.py -q -p no:cacheprovider -rfs \
            -k matches_the_device &&
        compute-sanitizer --tool memcheck --error-exitcode 1 "$0" -m pytest tests/csrc/test_cuda_backend.py -q -x \
            -p no:cacheprovider -k "sizes or unaligned or sparse_random or pooled"' "$PYTHON" 2>&1 \
        | tee "$OUT_DIR/tests_cuda_ext.log"
    cuda_rc=${PIPESTATUS[0]}
fi

if [[ " $PARTS " == *" new "* ]]; then
    echo "== tests of the relative-position band kernels and the Funnel layer on CUDA (at most ${NEW_TIMEOUT_S} s)"
    EFFATTN_TEST_DEVICE=cuda EFFATTN_AUTOTUNE=0 timeout -k "$KILL_AFTER_S" "$NEW_TIMEOUT_S" \
        "$PYTHON" -m pytest tests/kernels/test_relpos_attn.py tests/api/test_relpos.py tests/nn/test_funnel.py \
        tests/api/test_varlen.py tests/api/test_flash_attn_interface.py tests/integrations/test_transformers.py \
        -q -n "${TEST_WORKERS:-16}" -p no:cacheprovider -rfs -W ignore 2>&1 | tee "$OUT_DIR/tests_new.log"
    new_rc=${PIPESTATUS[0]}
fi

if [[ " $PARTS " == *" tests "* ]]; then
    echo "== tests on CUDA (at most ${TEST_TIMEOUT_S} s)"
    # EFFATTN_AUTOTUNE=0: one config per head-dim class (compile time stays bounded); every config of
    # the tables is still compiled and checked by tests/kernels/test_kernel_configs.py. Workers compile in parallel.
    EFFATTN_TEST_DEVICE=cuda EFFATTN_AUTOTUNE=0 timeout -k "$KILL_AFTER_S" "$TEST_TIMEOUT_S" \
        "$PYTHON" -m pytest tests -q -n "${TEST_WORKERS:-16}" -p no:cacheprovider -rf -W ignore 2>&1 \
        | tee "$OUT_DIR/tests_cuda.log"
    test_rc=$?
    [ "$test_rc" -eq 124 ] && echo "tests stopped after ${TEST_TIMEOUT_S} s" | tee -a "$OUT_DIR/tests_cuda.log"
fi

if [[ " $PARTS " == *" flash "* ]]; then
    echo "== flash benchmark, preset h100 (at most ${BENCH_TIMEOUT_S} s)"
    timeout -s INT -k "$KILL_AFTER_S" "$BENCH_TIMEOUT_S" \
        "$PYTHON" -m bench --preset h100 --device cuda --out "$OUT_DIR" \
        --providers naive sdpa-flash sdpa-efficient sdpa-cudnn flex effattn-triton
    bench_rc=$?
    rm -f "$OUT_DIR/attention_time.png" "$OUT_DIR/attention_memory.png" "$OUT_DIR/attention.csv" \
        "$OUT_DIR/attention_summary.md"  # 8 files at most (attention.md holds the summary)
fi

if [[ " $PARTS " == *" varlen "* ]]; then
    echo "== varlen and decoding benchmark (at most ${VARLEN_TIMEOUT_S} s)"
    timeout -s INT -k "$KILL_AFTER_S" "$VARLEN_TIMEOUT_S" \
        "$PYTHON" -m bench --preset h100-varlen --device cuda --out "$OUT_DIR" --stem varlen --no-plots \
        --providers sdpa effattn effattn-padded effattn-segments effattn-flash
    varlen_rc=$?
    rm -f "$OUT_DIR/varlen.csv" "$OUT_DIR/varlen_summary.md"  # 8 files at most (varlen.md holds the summary)
fi

if [[ " $PARTS " == *" funnel "* ]]; then
    echo "== Funnel benchmark (at most ${FUNNEL_TIMEOUT_S} s)"
    timeout -s INT -k "$KILL_AFTER_S" "$FUNNEL_TIMEOUT_S" \
        "$PYTHON" -m bench --preset h100-funnel --device cuda --out "$OUT_DIR" --stem funnel --no-plots \
        --providers naive sdpa flex effattn effattn-prepool effattn-features
    funnel_rc=$?
    rm -f "$OUT_DIR/funnel.csv" "$OUT_DIR/funnel_summary.md"  # 8 files at most (funnel.md holds the summary)
    echo "== Funnel model, eager against fused (at most ${FUNNEL_MODEL_TIMEOUT_S} s; files after every row)"
    timeout -k "$KILL_AFTER_S" "$FUNNEL_MODEL_TIMEOUT_S" \
        "$PYTHON" -m bench.studies.funnel_model --device cuda --seqlen 1024 4096 8192 --repeats 5 --out "$OUT_DIR"
    model_rc=$?
    [ "$model_rc" -eq 124 ] || [ "$funnel_rc" -ne 0 ] || funnel_rc=$model_rc  # a timeout keeps the rows it wrote
fi

if [[ " $PARTS " == *" sparse "* ]]; then
    echo "== block-sparse benchmark (at most ${SPARSE_TIMEOUT_S} s)"
    timeout -s INT -k "$KILL_AFTER_S" "$SPARSE_TIMEOUT_S" \
        "$PYTHON" -m bench --preset h100-sparse --device cuda --out "$OUT_DIR" --stem sparse --no-plots \
        --providers sdpa flex effattn
    sparse_rc=$?
    rm -f "$OUT_DIR/sparse.csv" "$OUT_DIR/sparse_summary.md"  # 8 files at most; the JSON holds the curves
fi

if [[ " $PARTS " == *" ops "* ]]; then
    echo "== ops benchmark, preset h100-ops (at most ${OPS_TIMEOUT_S} s)"
    timeout -s INT -k "$KILL_AFTER_S" "$OPS_TIMEOUT_S" \
        "$PYTHON" -m bench --preset h100-ops --device cuda --out "$OUT_DIR" --stem ops \
        --providers naive sdpa flex effattn gate sparsefinder
    ops_rc=$?
    rm -f "$OUT_DIR"/ops_time.png "$OUT_DIR"/ops_tflops.png "$OUT_DIR"/ops_memory.png "$OUT_DIR"/ops_roofline.png \
        "$OUT_DIR/ops.csv" "$OUT_DIR/ops_summary.md"  # 8 files at most
fi

echo "== done: tests exit $test_rc, flash benchmark exit $bench_rc, Funnel benchmark exit $funnel_rc," \
     "block-sparse benchmark exit $sparse_rc, ops benchmark exit $ops_rc, CUDA extension exit $cuda_rc," \
     "new kernels' tests exit $new_rc, varlen benchmark exit $varlen_rc;" \
     "files in $OUT_DIR:"
ls -l "$OUT_DIR"
[ "$test_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$funnel_rc" -eq 0 ] && [ "$sparse_rc" -eq 0 ] &&
    [ "$ops_rc" -eq 0 ] && [ "$cuda_rc" -eq 0 ] && [ "$new_rc" -eq 0 ] && [ "$varlen_rc" -eq 0 ]
