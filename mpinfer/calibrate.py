"""Calibration: measure the actual cluster's links and save a profile the planner uses instead
of its presets (`mpinfer plan --calibrate` under the launcher, then `mpinfer plan --profile`).

What is measured, each over message sizes from 8 bytes up, with MPI through comm.Group (the
calls the engine makes) and, where CuPy's NCCL and a GPU are there, with NCCL:
- point to point: ping-pong between ranks 0 and 1 (inside node 0) and between rank 0 and the
  first rank of node 1 (across nodes); one message takes half a round trip (OSU osu_latency);
- all-reduce: over the ranks of node 0, and over the first rank of every node; back-to-back
  calls after a barrier, the slowest rank's time per call (OSU osu_allreduce).
Nodes are the topology's (MPINFER_RANKS_PER_NODE pretends). Each size is the median of TRIALS
trials. Every series is fitted by t = latency + bytes / bandwidth, least squares on relative
error (weights 1/t), so the small sizes set the latency and the large ones the bandwidth.

For the planner an all-reduce fit over T ranks is a ring's 2(T-1) steps: step latency =
latency / 2(T-1), bus bandwidth = bandwidth x 2(T-1)/T (nccl-tests' busbw); the ring of node 0
gives the intra-node steps, the ring of one rank per node the network's.
"""

import datetime
import json
import statistics
import time

import numpy as np

from .errors import UserError, one_line
from .presets import Link

SIZES = [8 * 4**k for k in range(12)]  # 8 B .. 32 MiB
TRIAL_S = 0.02  # aim of one trial's length
TRIALS = 5
VERSION = 1


def calibrate(world, max_bytes=SIZES[-1]):
    """Measure the links every rank of world takes part in; the profile (a dict) on rank 0,
    None on the others. Collective over world."""
    from mpi4py import MPI

    from .topology import ranks_per_node

    if world.size < 2:
        raise UserError("calibration measures between ranks: run it on 2 or more (mpiexec -n 2 mpinfer plan --calibrate)")
    sizes = [s for s in SIZES if s <= max_bytes]
    if not sizes:
        raise UserError(f"--max-bytes {max_bytes} is below the smallest size measured, {SIZES[0]} bytes")
    per_node = ranks_per_node(world)
    nodes = world.size // per_node
    groups = {"intra": ([0, 1], list(range(per_node))) if per_node > 1 else None,
              "inter": ([0, per_node], list(range(0, world.size, per_node))) if nodes > 1 else None}
    backends = ["mpi"] + ["nccl"] * _nccl_usable(world, MPI)
    links = {}
    for kind, members in groups.items():
        if members is None:
            continue
        pair, ring = members
        links[kind] = {b: {"p2p": _series(world, pair, sizes, b, "p2p", MPI),
                           "all_reduce": {"ranks": len(ring), **_series(world, ring, sizes, b, "all_reduce", MPI)}}
                       for b in backends}
    if world.rank:
        return None
    return {"mpinfer_profile": VERSION, "date": datetime.date.today().isoformat(), "world": world.size,
            "ranks_per_node": per_node, "mpi": MPI.Get_library_version().splitlines()[0].strip(), "links": links}


def save(profile, path):
    with open(path, "w") as f:
        json.dump(profile, f, indent=2)


def load_links(path, backend=None):
    """{"intra": Link, "inter": Link} of the links a profile measured (NCCL's when measured,
    else MPI's; or the backend named)."""
    try:
        with open(path) as f:
            profile = json.load(f)
        if profile.get("mpinfer_profile") != VERSION:
            raise ValueError(f"not an mpinfer profile of version {VERSION}")
        out = {}
        for kind, measured in profile["links"].items():
            b = backend or ("nccl" if "nccl" in measured else "mpi")
            out[kind] = to_link(f"{kind}-node {b}, measured", measured[b])
        return out
    except OSError as e:
        raise UserError(f"{path}: cannot read the profile ({one_line(e)})") from None
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not a calibration profile ({one_line(e)})") from None


def to_link(name, measured):
    """A planner Link from one backend's fits: the ping-pong as is, the all-reduce over T
    ranks as 2(T-1) ring steps."""
    p2p, ar = measured["p2p"], measured["all_reduce"]
    steps = 2 * (ar["ranks"] - 1)
    return Link(name, p2p["latency_s"], p2p["bandwidth_Bps"], ar["latency_s"] / steps,
                ar["bandwidth_Bps"] * steps / ar["ranks"])


def fit(points):
    """(latency s, bandwidth bytes/s, largest relative error) of t = latency + bytes / bandwidth
    over [(bytes, seconds)], least squares on relative error."""
    x, t = np.array(points, np.float64).T
    slope, intercept = np.polyfit(x, t, 1, w=1 / t)
    if slope <= 0:
        raise UserError(f"the measured times do not grow with the message size ({points}); measure larger sizes")
    latency = max(float(intercept), 0.0)
    worst = float(np.max(np.abs(latency + x * slope - t) / t))
    return latency, float(1 / slope), worst


def _series(world, members, sizes, backend, op, MPI):
    """Collective over world: time op between `members` for every size; the fit and points."""
    comm = world.Split(0 if world.rank in members else MPI.UNDEFINED, members.index(world.rank)
                       if world.rank in members else 0)
    ops = None if comm == MPI.COMM_NULL else (_nccl_ops if backend == "nccl" else _mpi_ops)(comm, op, MPI)
    points = []
    for size in sizes:
        world.Barrier()  # one measurement at a time, the other ranks quiet
        if ops is not None:
            points.append([size, _median_time(comm, *ops, size, MPI)])
    world.Barrier()
    if ops is not None:
        comm.Free()
    latency, bandwidth, worst = fit(points) if world.rank == 0 else (0.0, 0.0, 0.0)
    return {"latency_s": latency, "bandwidth_Bps": bandwidth, "fit_max_rel_err": worst, "points": points}


def _median_time(comm, run, per_rep, size, MPI):
    """Seconds of one op of this size: the median over TRIALS of loop time / (reps x per_rep),
    each the slowest rank's; reps chosen so a trial lasts about TRIAL_S."""
    run(size, 1)  # warm up: connections, buffers
    start = time.perf_counter()
    run(size, 1)
    reps = comm.bcast(int(min(1000, max(3, TRIAL_S / max(time.perf_counter() - start, 1e-7)))))
    trials = []
    for _ in range(TRIALS):
        comm.Barrier()
        start = time.perf_counter()
        run(size, reps)
        trials.append(comm.allreduce((time.perf_counter() - start) / (reps * per_rep), op=MPI.MAX))
    return statistics.median(trials)


def _mpi_ops(comm, op, MPI):
    """(run(size, reps), messages per rep) doing reps ops of `size` bytes through a comm.Group,
    as the engine does; a ping-pong rep is two messages."""
    from .comm import Group

    group = Group(comm, "calibrate")

    def all_reduce(size, reps):
        x = np.ones(max(1, size // 4), np.float32)
        for _ in range(reps):
            group.all_reduce(x)

    def ping_pong(size, reps):
        x, peer = np.ones(size, np.uint8), 1 - group.rank
        for _ in range(reps):
            if group.rank == 0:
                group.send(x, peer).wait()
            request, x = group.recv(x.shape, x.dtype, peer)
            request.wait()
            if group.rank == 1:
                group.send(x, peer).wait()

    return (all_reduce, 1) if op == "all_reduce" else (ping_pong, 2)


def _nccl_usable(world, MPI):
    """True on every rank when every rank can import CuPy's NCCL and sees a GPU."""
    try:
        import cupy
        from cupy.cuda import nccl  # noqa: F401

        ok = cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no CuPy, no driver, no device: MPI only
        ok = False
    return bool(world.allreduce(int(ok), op=MPI.MIN))


def _nccl_ops(comm, op, MPI):
    """(run(size, reps), messages per rep) over an NCCL communicator of comm's ranks, each rank
    on its own GPU of its node."""
    import cupy
    from cupy.cuda import nccl

    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    cupy.cuda.Device(node.rank % cupy.cuda.runtime.getDeviceCount()).use()
    node.Free()
    nc = nccl.NcclCommunicator(comm.size, comm.bcast(nccl.get_unique_id() if comm.rank == 0 else None), comm.rank)
    stream = cupy.cuda.Stream(non_blocking=True)
    peer = 1 - comm.rank

    def run(size, reps):
        x = cupy.ones(max(1, size // 4), cupy.float32)
        for _ in range(reps):
            if op == "all_reduce":
                nc.allReduce(x.data.ptr, x.data.ptr, x.size, nccl.NCCL_FLOAT32, nccl.NCCL_SUM, stream.ptr)
                continue
            if comm.rank == 0:
                nc.send(x.data.ptr, x.size, nccl.NCCL_FLOAT32, peer, stream.ptr)
            nc.recv(x.data.ptr, x.size, nccl.NCCL_FLOAT32, peer, stream.ptr)
            if comm.rank == 1:
                nc.send(x.data.ptr, x.size, nccl.NCCL_FLOAT32, peer, stream.ptr)
        stream.synchronize()

    return run, 1 if op == "all_reduce" else 2
