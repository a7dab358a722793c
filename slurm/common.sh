# Sourced by the sbatch scripts of this folder (not submitted itself). It finds mpinfer,
# sets the BLAS threads and the kernel cache, and defines run_mpinfer.
#
#   MPINFER_VENV     the virtual environment holding mpinfer and mpiexec
#                    (default: .venv of this repository, made by bash .ci/setup)
#   MPINFER_KERNEL_CACHE   where compiled CUDA kernels are kept (default: node-local
#                    ${SLURM_TMPDIR:-/tmp}/mpinfer-kernels-$USER: every rank of a node reads
#                    the cubins its first rank compiled, nothing goes to the shared filesystem)
#   MPINFER_REQUEUE=N  when mpinfer stops resumably (exit 75: time limit warning or
#                    preemption), requeue this job, at most N times (SLURM_RESTART_COUNT):
#                    the requeued job continues the results file. SLURM makes a requeued
#                    job eligible again after a short hold (about two minutes).
venv=${MPINFER_VENV:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv}
[ -x "$venv/bin/mpinfer" ] || { echo "mpinfer: no $venv/bin/mpinfer; set MPINFER_VENV" >&2; exit 2; }
threads=${SLURM_CPUS_PER_TASK:-1}
export OPENBLAS_NUM_THREADS=$threads OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads
export MPINFER_KERNEL_CACHE=${MPINFER_KERNEL_CACHE:-${SLURM_TMPDIR:-/tmp}/mpinfer-kernels-${USER:-$(id -u)}}

# run_mpinfer ARGS...: `mpinfer run ARGS` on every task of the allocation, SLURM_NTASKS ranks
# placed node by node (consecutive ranks on a node, as mpinfer's layout requires), started by
# the MPICH wheel's mpiexec: it launches its proxies through srun, so scancel --signal reaches
# every rank. (srun --mpi=pmi2 directly also starts a correct world, but with the wheel's UCX
# rank 0 may hang in MPI_Finalize after the stop signal.) Each rank takes the GPU of its
# node-local rank. Exits with mpinfer's code: 0 done, 75 stopped resumably, 2 bad input.
run_mpinfer() {
    local status=0 per_node=$(( SLURM_NTASKS / ${SLURM_JOB_NUM_NODES:-1} ))
    "$venv/bin/mpiexec" -n "$SLURM_NTASKS" -ppn "$per_node" "$venv/bin/mpinfer" run "$@" || status=$?
    if [ "$status" = 75 ] && [ "${SLURM_RESTART_COUNT:-0}" -lt "${MPINFER_REQUEUE:-0}" ]; then
        scontrol requeue "$SLURM_JOB_ID" && echo "mpinfer: stopped resumably; job $SLURM_JOB_ID requeued" >&2
    fi
    exit "$status"
}
