#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): graftline on one CUDA GPU in at most 8 minutes, results in
# benchmarks/results/gpu.json. On a machine without a GPU it says so and exits 0 at once.
#   bash benchmarks/gpu_check.sh              # run it (a GPU of 80-140 GB)
#   bash benchmarks/gpu_check.sh --dry-run    # check its inputs and print its steps; needs no GPU
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
if [ "${1:-}" != "--dry-run" ]; then
  if ! command -v nvidia-smi >/dev/null 2>&1 || ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: no CUDA GPU on this machine; nothing to check"
    exit 0
  fi
fi
export PYTHONUNBUFFERED=1
exec timeout 540 "$PY" benchmarks/gpu_check.py "$@"
