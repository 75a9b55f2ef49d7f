#!/usr/bin/env bash
# Context parallelism on a machine with several GPUs: ring and Ulysses attention over NCCL, one GPU a rank.
#   bash bench/distributed_gpu.sh [N_GPUS] [extra bench.distributed arguments]
# Writes bench/results/<date>_cuda_distributed/ (or --out DIR): distributed.json, .csv, .md.
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-$(.venv/bin/python -c 'import torch; print(torch.cuda.device_count())')}"
shift || true
if [ "$n" -lt 2 ]; then
  echo "needs at least 2 GPUs, found $n" >&2
  exit 1
fi
exec .venv/bin/python -m torch.distributed.run --standalone --nproc_per_node="$n" -m bench.distributed \
  --device cuda --dtype bfloat16 --seq 65536 --heads 16 --dim 128 "$@"
