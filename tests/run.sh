#!/usr/bin/env bash
# Set everything up (.venv with mpinfer, MPICH, pytest, transformers on CPU) and run the
# whole test suite. Extra arguments go to pytest: bash tests/run.sh -k gguf
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/.ci/setup" mpi,test
cd "$root"
export HF_HUB_OFFLINE=1  # the reference models are built or fetched by the tests, never from a hub
exec .venv/bin/python -m pytest -q -rs --durations=10 tests "$@"
