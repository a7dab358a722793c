#!/usr/bin/env bash
# On the GPU machine (bare image with torch, cupy-cuda13x, cuda-bindings, NCCL; no registry):
# a venv over the image's packages plus the carried wheels in .whl/ (MPICH, mpi4py, gguf:
# see bench/gpu/README.md), then the check. The report and log go to $OUT (default /tmp/out).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
# the image's python3 is itself a venv: the new one sees its packages through a .pth file
base=$(python3 -c 'import site; print(site.getsitepackages()[0])')
python3 -m venv /tmp/venv && /tmp/venv/bin/pip install -q --no-index --no-deps .whl/*.whl || exit 1
echo "$base" > "$(/tmp/venv/bin/python -c 'import site; print(site.getsitepackages()[0])')/image.pth"
export PATH=/tmp/venv/bin:$PATH PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MPINFER_KERNEL_CACHE=/tmp/mpinfer-kernels
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
python bench/gpu/check.py "$OUT/report.json" "$@" 2>&1 | tee "$OUT/log.txt"
