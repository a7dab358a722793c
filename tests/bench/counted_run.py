"""`mpinfer run` of a job on every rank, then each rank's communication counters (calls, bytes,
seconds per operation of every group: comm.Group's) to FOLDER/counters-<rank>.json. The
results file holds rank 0's only; bench_planner.py needs the receiving pipeline stage's too.

Each all-reduce runs after a barrier, timed apart as <group>.peer_wait.seconds: the barrier
takes up the wait for a peer that arrives late (its compute ran longer), so what remains in
<group>.all_reduce.seconds is the exchange itself, what the cost model predicts. The engine
has no such barrier; the tokens do not change. Every all-reduce and pipeline receive is also
kept as (bytes, seconds) under "samples", for the comparison call by call.

    mpiexec -n 2 python -m mpi4py tests/bench/counted_run.py JOB.toml FOLDER [--set k=v ...]
"""

import json
import os
import sys
import time

from mpi4py import MPI

from mpinfer.comm import Group
from mpinfer.engine import runner
from mpinfer.topology import Topology

ALL_REDUCE, RECV = Group.all_reduce, Group.recv
SAMPLES = {}  # "tp.all_reduce" -> [[bytes, seconds] per call]


class Recorded(Topology):
    """The job's Topology, kept for its counters after the run."""

    made = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        Recorded.made.append(self)


def _sample(group, op, nbytes, seconds):
    """One call's (payload bytes, seconds), kept per group and op for the per-call comparison."""
    SAMPLES.setdefault(f"{group.name}.{op}", []).append([int(nbytes), seconds])


def all_reduce_after_barrier(self, x):
    if self.size > 1:
        start = time.perf_counter()
        self.comm.Barrier()
        self._time("peer_wait", time.perf_counter() - start)
        start = time.perf_counter()
        out = ALL_REDUCE(self, x)
        _sample(self, "all_reduce", x.nbytes, time.perf_counter() - start)
        return out
    return ALL_REDUCE(self, x)


def recv_sampled(self, shape, dtype, source, tag=0):
    request, x = RECV(self, shape, dtype, source, tag)
    timer = request.timer
    request.timer = lambda s: (timer(s), _sample(self, "recv", x.nbytes, s))
    return request, x


def main(job, folder, *args):
    runner.Topology = Recorded
    Group.all_reduce, Group.recv = all_reduce_after_barrier, recv_sampled
    code = runner.run_job(job, [a for a in args if a != "--set"], overwrite=True)
    with open(os.path.join(folder, f"counters-{MPI.COMM_WORLD.rank}.json"), "w") as f:
        json.dump({**Recorded.made[-1].counters(), "samples": SAMPLES}, f)
    sys.exit(code)


if __name__ == "__main__":
    main(*sys.argv[1:])
