#!/usr/bin/env bash
# On the GPU machine (bare image with torch, cupy-cuda13x, cuda-bindings, NCCL; no registry):
# the carried wheels in .whl/ (MPICH, mpi4py, gguf: see bench/gpu/README.md) installed under
# /tmp/mpi, then the check. The report and log go to $OUT (default /tmp/out).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
# --prefix, not --target: only a prefix install keeps the MPICH wheel's lib/ (libmpi, which
# mpi4py finds through LD_LIBRARY_PATH) next to its bin/mpiexec
python3 -m pip install -q --no-index --no-deps --no-compile --prefix /tmp/mpi .whl/*.whl || exit 1
site=$(echo /tmp/mpi/lib/python3*/site-packages)
export PATH=/tmp/mpi/bin:$PATH LD_LIBRARY_PATH=/tmp/mpi/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export PYTHONPATH=$PWD:$site PYTHONUNBUFFERED=1 MPINFER_KERNEL_CACHE=/tmp/mpinfer-kernels
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
python3 bench/gpu/check.py "$OUT/report.json" "$@" 2>&1 | tee "$OUT/log.txt"
