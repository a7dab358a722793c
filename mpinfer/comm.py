"""Named collectives over one parallel dimension's communicator, counting what they move.

Each Group wraps the MPI sub-communicator of one kind (tp, cp, pp, dp, ep; built by
Topology) and counts, per operation, the calls and the payload bytes, plus for all_reduce
the bytes a ring all-reduce moves per rank, 2 (T-1)/T * nbytes over a group of T ranks
(the chapter's cost model, DESIGN.md section 4), and the seconds this rank spent in the
operation (the call, and waiting on its request: time a late peer makes it wait included),
which the planner's predictions are checked against. A group of one rank does nothing and
counts nothing, so single-rank code calls the same functions at no cost.

Buffers are NumPy arrays passed to mpi4py's uppercase (buffer) methods: no pickle. MPI
infers the element type from the array (float32, float64, int32, int64, ...).

Waiting on a non-blocking request polls Test() with short sleeps instead of a blocking
Wait(): MPICH's blocking waits spin and would steal the core of another rank on an
oversubscribed node. Blocking collectives (Allreduce, Allgather, Bcast) are kept as they are; the expert-parallel
all-to-alls and agreements poll too, since the replicas they join may arrive at different
times.
"""

import time

import numpy as np
from mpi4py import MPI

POLL_S = 0.0005
SPIN_S = 0.002


def wait(mpi_request, poll_s=POLL_S):
    """Complete an mpi4py request by polling Test(): for SPIN_S yielding the core between
    polls, then with sleeps of poll_s (see the module docstring). MPICH moves a message
    only while its ranks call into MPI, so a collective of several rounds (all-to-all) would
    take a sleep per round if every poll slept."""
    start = time.perf_counter()
    while not mpi_request.Test():
        time.sleep(0 if time.perf_counter() - start < SPIN_S else poll_s)


class Request:
    """A pending send or receive; keeps its buffer alive until wait() returns. timer(seconds),
    when given, is told how long wait() took."""

    def __init__(self, mpi_request, buffer, timer=None):
        self.request, self.buffer, self.timer = mpi_request, buffer, timer

    def test(self):
        """True once the operation has completed (never blocks)."""
        return self.request.Test()

    def wait(self):
        """Block until the operation completes, polling (see the module docstring)."""
        start = time.perf_counter()
        wait(self.request)
        if self.timer is not None:
            self.timer(time.perf_counter() - start)


class Group:
    """An MPI communicator of one parallel dimension, with counters.

    .comm the mpi4py communicator, .name ("tp", "pp", ...), .size, .rank (my position,
    which is my place in the Mapping's group of this kind). .counts = {op: {"calls": n,
    "bytes": payload bytes[, "ring_bytes": ...]}}; .seconds = {op: seconds spent in it}.
    """

    def __init__(self, mpi_comm, name):
        self.comm, self.name = mpi_comm, name
        self.size, self.rank = mpi_comm.Get_size(), mpi_comm.Get_rank()
        self.counts, self.seconds = {}, {}

    def _count(self, op, nbytes, start, **extra):
        """One call of op moving nbytes, begun at perf_counter() = start."""
        self._time(op, time.perf_counter() - start)
        c = self.counts.setdefault(op, {"calls": 0, "bytes": 0, **{k: 0 for k in extra}})
        c["calls"] += 1
        c["bytes"] += nbytes
        for k, v in extra.items():
            c[k] += v

    def _time(self, op, seconds):
        self.seconds[op] = self.seconds.get(op, 0.0) + seconds

    def all_reduce(self, x):
        """x <- sum of x over the group, in place; returns x. x: C-contiguous array.

        Completes a row-parallel product: with A split by input rows over the group,
        Y = X A = sum_r X_r A_r, and each rank holds one term X_r A_r.
        """
        if self.size == 1:
            return x
        _check_contiguous(x, "all_reduce")
        start = time.perf_counter()
        self.comm.Allreduce(MPI.IN_PLACE, x, op=MPI.SUM)
        # ring all-reduce: reduce-scatter then all-gather, each (T-1) steps of nbytes/T
        self._count("all_reduce", x.nbytes, start, ring_bytes=2 * (self.size - 1) / self.size * x.nbytes)
        return x

    def reduce_scatter(self, x, counts):
        """Sum x (sum(counts), ...) over the group and keep my counts[rank] rows of the sum
        (MPI_Reduce_scatter). The first half of a ring all-reduce: ring_bytes (T-1)/T * nbytes."""
        x = np.ascontiguousarray(x)
        if self.size == 1:
            return x
        start = time.perf_counter()
        row = int(np.prod(x.shape[1:], dtype=np.int64))
        out = np.empty((int(counts[self.rank]), *x.shape[1:]), x.dtype)
        self.comm.Reduce_scatter(x, out, [int(c) * row for c in counts], op=MPI.SUM)
        self._count("reduce_scatter", x.nbytes, start, ring_bytes=(self.size - 1) / self.size * x.nbytes)
        return out

    def all_gather_rows(self, x, counts):
        """Every rank's rows (counts[r] of them) stacked in rank order: (sum(counts), ...)
        (MPI_Allgatherv). The second half of a ring all-reduce: ring_bytes (T-1)/T of the result."""
        x = np.ascontiguousarray(x)
        if self.size == 1:
            return x
        start = time.perf_counter()
        row = int(np.prod(x.shape[1:], dtype=np.int64))
        out = np.empty((int(sum(counts)), *x.shape[1:]), x.dtype)
        sizes = np.asarray(counts, np.int64) * row
        self.comm.Allgatherv(x, [out, (sizes, _starts(sizes))])
        self._count("all_gather_rows", x.nbytes, start, ring_bytes=(self.size - 1) / self.size * out.nbytes)
        return out

    def all_gather(self, x):
        """Every rank's x stacked in rank order: shape (size, *x.shape). For a group of one,
        a view of x (no copy)."""
        if self.size == 1:
            return x[None]
        x = np.ascontiguousarray(x)
        out = np.empty((self.size, *x.shape), x.dtype)
        start = time.perf_counter()
        self.comm.Allgather(x, out)
        self._count("all_gather", x.nbytes, start)
        return out

    def bcast(self, x, root=0):
        """x <- root's x, in place on every rank; returns x. x: C-contiguous array."""
        if self.size == 1:
            return x
        _check_contiguous(x, "bcast")
        start = time.perf_counter()
        self.comm.Bcast(x, root=root)
        self._count("bcast", x.nbytes, start)
        return x

    def send(self, x, dest, tag=0):
        """Start sending x to group rank dest; returns a Request (call .wait() before reusing x).

        Messages between two ranks arrive in the order they were sent (per tag)."""
        x = np.ascontiguousarray(x)
        start = time.perf_counter()
        request = Request(self.comm.Isend(x, dest=dest, tag=tag), x, lambda s: self._time("send", s))
        self._count("send", x.nbytes, start)
        return request

    def recv(self, shape, dtype, source, tag=0):
        """Start receiving an array of this shape and dtype from group rank source;
        returns (Request, array): the array holds the data once the request is waited on."""
        x = np.empty(shape, dtype)
        start = time.perf_counter()
        request = Request(self.comm.Irecv(x, source=source, tag=tag), x, lambda s: self._time("recv", s))
        self._count("recv", x.nbytes, start)
        return request, x

    def all_to_all(self, x, send_counts, recv_counts):
        """Personalised exchange (MPI_Alltoallv): x (sum(send_counts), ...) holds send_counts[r]
        consecutive rows for each group rank r, in rank order; returns (sum(recv_counts), ...)
        with recv_counts[r] rows from each rank r, in rank order. The counts must agree
        pairwise (exchange_counts gives them). Counts the payload and, as remote_bytes, what
        leaves this rank (the rows for itself stay in memory)."""
        x = np.ascontiguousarray(x)
        row = int(np.prod(x.shape[1:], dtype=np.int64))
        out = np.empty((int(np.sum(recv_counts)), *x.shape[1:]), x.dtype)
        if self.size == 1:
            out[...] = x
            return out
        send, recv = np.asarray(send_counts, np.int64) * row, np.asarray(recv_counts, np.int64) * row
        start = time.perf_counter()
        wait(self.comm.Ialltoallv([x, (send, _starts(send))], [out, (recv, _starts(recv))]))
        item = x.itemsize * row
        self._count("all_to_all", x.nbytes, start, remote_bytes=(int(np.sum(send_counts)) - int(send_counts[self.rank])) * item)
        return out

    def exchange_counts(self, counts):
        """counts (size, k) int64, row r for group rank r -> (size, k): row r is what rank r
        sent me (MPI_Alltoall), so each side knows the shape of the all_to_all that follows."""
        counts = np.ascontiguousarray(counts, np.int64)
        if self.size == 1:
            return counts.copy()
        out = np.empty_like(counts)
        start = time.perf_counter()
        wait(self.comm.Ialltoall(counts, out))
        self._count("exchange_counts", counts.nbytes, start)
        return out

    def any(self, flags):
        """Element-wise logical or of a bool array over the group (a polled MPI_Iallreduce)."""
        flags = np.asarray(flags, np.int64)
        if self.size == 1:
            return flags.astype(bool)
        out = np.empty_like(flags)
        wait(self.comm.Iallreduce(flags, out, op=MPI.MAX))
        return out.astype(bool)

    def counters(self):
        """Flat {"<name>.<op>.<field>": value}, e.g. "tp.all_reduce.ring_bytes" or
        "pp.recv.seconds", for metrics."""
        flat = {f"{self.name}.{op}.{field}": value for op, c in self.counts.items() for field, value in c.items()}
        return flat | {f"{self.name}.{op}.seconds": s for op, s in self.seconds.items()}


def _starts(counts):
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)


def _check_contiguous(x, op):
    if not (isinstance(x, np.ndarray) and x.flags.c_contiguous):
        raise ValueError(f"{op} works in place on a C-contiguous numpy array, got {type(x).__name__}"
                         + (" that is not contiguous" if isinstance(x, np.ndarray) else ""))
