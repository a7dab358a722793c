"""Calibration: measure the actual cluster's links and save a profile the planner uses instead
of its presets (`mpinfer plan --calibrate` under the launcher, then `mpinfer plan --profile`).

What is measured, each over message sizes from 8 bytes up, with MPI through comm.Group (the
calls the engine makes) and, where CuPy's NCCL and a GPU are there, with NCCL:
- point to point: ping-pong between ranks 0 and 1 (inside node 0) and between rank 0 and the
  first rank of node 1 (across nodes); one message takes half a round trip (OSU osu_latency);
- all-reduce: over the ranks of node 0, and over the first rank of every node; the slowest
  rank's time per call (OSU osu_allreduce).
Nodes are the topology's (MPINFER_RANKS_PER_NODE pretends). Unlike OSU's back-to-back loops,
each op runs alone after a barrier, on data just written, right after a matrix product that
streams the rank's share of the last-level cache in weights (evict_bytes): as in a run, where
a collective follows a layer's matmul and carries what it computed. Each size is the median of
TRIALS trials of REPS ops. Every series is fitted by t = latency + bytes / bandwidth, least squares on relative
error (weights 1/t), so the small sizes set the latency and the large ones the bandwidth.

For the planner an all-reduce fit over T ranks is a ring's 2(T-1) steps: step latency =
latency / 2(T-1), bus bandwidth = bandwidth x 2(T-1)/T (nccl-tests' busbw); the ring of node 0
gives the intra-node steps, the ring of one rank per node the network's.
"""

import datetime
import glob
import json
import statistics
import time

import numpy as np

from .errors import UserError, one_line
from .presets import Link

SIZES = [8 * 4**k for k in range(12)]  # 8 B .. 32 MiB
TRIALS, REPS = 5, 20  # trials per size, ops per trial
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
    evict = evict_bytes(per_node)
    points = {(kind, b, op): _series(world, members[op == "all_reduce"], sizes, b, op, evict, MPI)
              for kind, members in groups.items() if members for b in backends for op in ("p2p", "all_reduce")}
    if world.rank:
        return None
    links = {}  # fitted on rank 0 alone, once no other rank waits for it
    for (kind, b, op), series in points.items():
        latency, bandwidth, worst = fit(series)
        links.setdefault(kind, {}).setdefault(b, {})[op] = {
            **({"ranks": len(groups[kind][1])} if op == "all_reduce" else {}),
            "latency_s": latency, "bandwidth_Bps": bandwidth, "fit_max_rel_err": worst, "points": series}
    return {"mpinfer_profile": VERSION, "date": datetime.date.today().isoformat(), "world": world.size,
            "ranks_per_node": per_node, "evict_bytes": evict, "mpi": MPI.Get_library_version().splitlines()[0].strip(),
            "links": links}


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
        raise UserError(f"the measured times do not grow with the message size ({points}): other work on the "
                        "machine, or too small a range (raise --max-bytes)")
    latency = max(float(intercept), 0.0)
    worst = float(np.max(np.abs(latency + x * slope - t) / t))
    return latency, float(1 / slope), worst


def _series(world, members, sizes, backend, op, evict, MPI):
    """Collective over world: time op between `members` for every size; [[bytes, seconds]] on
    the members (rank 0 among them)."""
    comm = world.Split(0 if world.rank in members else MPI.UNDEFINED, members.index(world.rank)
                       if world.rank in members else 0)
    ops = None if comm == MPI.COMM_NULL else (_nccl_ops if backend == "nccl" else _mpi_ops)(comm, op, MPI)
    points = []
    for size in sizes:
        world.Barrier()  # one measurement at a time, the other ranks quiet
        if ops is not None:
            points.append([size, _median_time(comm, *ops, size, evict, MPI)])
    world.Barrier()
    if ops is not None:
        comm.Free()
    return points


def evict_bytes(ranks_on_node):
    """Bytes of weights the matmul before each op streams: the rank's share of the CPU's
    last-level cache (sysfs; 32 MiB when unknown). What precedes an op sets its cost: on the
    2-core VM of tests/bench/bench_planner.py a 256 KiB all-reduce took 60-100 us back to back,
    140-150 us after writing the cache share, 180-200 us after a 5 ms matmul or sleep, and the
    tp 2 run's own calls 190 us (2026-11-27). The cost model put the run's all-reduce time at
    0.6 of what it measured when calibrated back to back, 0.74 after writing the cache share,
    0.94 after the matmul (medians of repeats; tests/bench/results/*-planner.json)."""
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        with open(path) as f:
            text = f.read().strip()  # "32768K"
        sizes.append(int(text.rstrip("KM")) * {"K": 2**10, "M": 2**20}.get(text[-1], 1))
    return (max(sizes) if sizes else 2**25) // ranks_on_node


def _median_time(comm, run, per_op, size, evict, MPI):
    """Seconds of one message (one all-reduce) of this size: each op alone (run times it, after
    a barrier), right after a matmul of 16 activation rows by `evict` bytes of float32 weights;
    a trial's mean over REPS ops (per_op messages each), the slowest rank's; the median of
    TRIALS trials."""
    a = np.ones((16, 1024), np.float32)
    w = np.ones((1024, max(1, evict // 4096)), np.float32)  # (1024, N): evict bytes
    run(size)  # warm up: connections, buffers
    trials = []
    for _ in range(TRIALS):
        spent = 0.0
        for _ in range(REPS):
            a @ w
            spent += run(size)
        trials.append(comm.allreduce(spent / (REPS * per_op), op=MPI.MAX))
    return statistics.median(trials)


def _timed(comm, op):
    """Seconds op() takes, begun together on every rank of comm."""
    comm.Barrier()
    start = time.perf_counter()
    op()
    return time.perf_counter() - start


def _mpi_ops(comm, op, MPI):
    """(run(size) -> seconds, messages per op): one op of `size` bytes through a comm.Group on
    data just written (as a run's, just computed), as the engine does; a ping-pong is two
    messages."""
    from .comm import Group

    group, peer = Group(comm, "calibrate"), 1 - comm.rank

    def all_reduce(size):
        x = np.ones(max(1, size // 4), np.float32)
        return _timed(comm, lambda: group.all_reduce(x))

    def ping_pong(size):
        x = np.ones(size, np.uint8)

        def there_and_back():
            if group.rank == 0:
                group.send(x, peer).wait()
            request, y = group.recv((size,), np.uint8, peer)
            request.wait()
            if group.rank == 1:
                group.send(y, peer).wait()
        return _timed(comm, there_and_back)

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
    """(run(size) -> seconds, messages per op) over an NCCL communicator of comm's ranks, each
    rank on its own GPU of its node."""
    import cupy
    from cupy.cuda import nccl

    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    cupy.cuda.Device(node.rank % cupy.cuda.runtime.getDeviceCount()).use()
    node.Free()
    nc = nccl.NcclCommunicator(comm.size, comm.bcast(nccl.get_unique_id() if comm.rank == 0 else None), comm.rank)
    stream = cupy.cuda.Stream(non_blocking=True)
    peer = 1 - comm.rank

    def run(size):
        x = cupy.ones(max(1, size // 4), cupy.float32)
        stream.synchronize()
        return _timed(comm, lambda: one(x))

    def one(x):
        if op == "all_reduce":
            nc.allReduce(x.data.ptr, x.data.ptr, x.size, nccl.NCCL_FLOAT32, nccl.NCCL_SUM, stream.ptr)
        else:
            if comm.rank == 0:
                nc.send(x.data.ptr, x.size, nccl.NCCL_FLOAT32, peer, stream.ptr)
            nc.recv(x.data.ptr, x.size, nccl.NCCL_FLOAT32, peer, stream.ptr)
            if comm.rank == 1:
                nc.send(x.data.ptr, x.size, nccl.NCCL_FLOAT32, peer, stream.ptr)
        stream.synchronize()

    return run, 1 if op == "all_reduce" else 2
