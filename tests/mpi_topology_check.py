"""Run under mpiexec (python -m mpi4py tests/mpi_topology_check.py): builds a Topology for
every layout that fits the world and checks each group's collectives against closed forms.

Every rank fills its buffers with its world rank, so an all-reduce over a group must give
the sum of the group's world ranks, an all-gather must list them in group order, and a
message around the pipeline must carry the previous stage's rank. Counters must show the
calls, the payload bytes and, for all-reduce, the ring bytes 2 (T-1)/T * nbytes.
Exits non-zero (the whole job aborts) on the first failure.
"""

import math
import os

import numpy as np
from mpi4py import MPI

from mpinfer.mapping import KINDS
from mpinfer.topology import Topology

WORLD = MPI.COMM_WORLD
RANK, SIZE = WORLD.Get_rank(), WORLD.Get_size()


def expect(got, want, what):
    if not (got == want if isinstance(want, dict) else np.array_equal(np.asarray(got), np.asarray(want))):
        raise AssertionError(f"rank {RANK}: {what}: got {got!r}, want {want!r}")


def divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def layouts(rpn):
    """Every (tp, pp, cp, ep) that fits the world, TP inside a node."""
    for tp in divisors(rpn):
        for pp in divisors(SIZE // tp):
            for cp in divisors(SIZE // (tp * pp)):
                dp = SIZE // (tp * pp * cp)
                for ep in divisors(dp * tp):
                    if tp % ep == 0 or ep % tp == 0:
                        yield tp, pp, cp, ep


def check_group(g, ranks):
    """Collectives of one group against closed forms; ranks: the Mapping's group."""
    T = len(ranks)
    expect((g.size, g.rank), (T, ranks.index(RANK)), f"{g.name} size and rank")
    expect(g.all_gather(np.array([RANK, 10 * RANK], np.int64)), [[r, 10 * r] for r in ranks], f"{g.name} all_gather")
    x = np.full(3, float(RANK))  # float64: 24 bytes
    expect(g.all_reduce(x), [sum(ranks)] * 3, f"{g.name} all_reduce float64")
    y = np.arange(4, dtype=np.int32) + RANK  # 16 bytes
    expect(g.all_reduce(y), np.arange(4) * T + sum(ranks), f"{g.name} all_reduce int32")
    root = T - 1
    z = np.full(2, RANK if g.rank == root else -1, np.int64)  # 16 bytes
    expect(g.bcast(z, root=root), [ranks[root]] * 2, f"{g.name} bcast")
    if T == 1:
        expect(g.counts, {}, f"{g.name} counts of a group of one")
        return
    ring = 2 * (T - 1) / T * (24 + 16)  # the ring all-reduce's bytes per rank, both calls
    got = g.counts["all_reduce"]["ring_bytes"]
    if not math.isclose(got, ring):
        raise AssertionError(f"rank {RANK}: {g.name} ring bytes {got}, want {ring}")
    expect(g.counts, {"all_gather": {"calls": 1, "bytes": 16}, "all_reduce": {"calls": 2, "bytes": 40, "ring_bytes": got},
                      "bcast": {"calls": 1, "bytes": 16}}, f"{g.name} counts")
    try:
        g.all_reduce(np.zeros((4, 4))[:, ::2])
    except ValueError:
        pass
    else:
        raise AssertionError(f"rank {RANK}: {g.name} all_reduce accepted a non-contiguous array")


def check_pipeline(topo):
    """Three micro-batches around the pipeline ring, all in flight at once, in order."""
    m, pp = topo.mapping, topo.pp
    nxt, prev = (m.pp_rank + 1) % m.pp, (m.pp_rank - 1) % m.pp
    sends = [pp.send(np.full((2, 3), 10 * RANK + i, np.float32), nxt) for i in range(3)]
    recvs = [pp.recv((2, 3), np.float32, prev) for _ in range(3)]
    for i, (request, x) in enumerate(recvs):
        request.wait()
        expect(x, np.full((2, 3), 10 * m.pp_group[prev] + i), f"pp recv {i} from stage {prev}")
    for request in sends:
        request.wait()
    expect(pp.counts["send"], {"calls": 3, "bytes": 72}, "pp send counts")
    expect(pp.counts["recv"], {"calls": 3, "bytes": 72}, "pp recv counts")


def check_layout(tp, pp, cp, ep, rpn):
    topo = Topology(WORLD, tp=tp, pp=pp, cp=cp, ep=ep)
    m = topo.mapping
    expect((m.tp, m.pp, m.cp, m.ep, m.dp), (tp, pp, cp, ep, SIZE // (tp * pp * cp)), "layout")
    expect((m.ranks_per_node, m.node), (rpn, RANK // rpn), "node")
    for kind in KINDS:
        check_group(getattr(topo, kind), m.group(kind))
    if pp > 1:
        check_pipeline(topo)
    counters = topo.counters()
    for kind in KINDS:
        if len(m.group(kind)) > 1:
            expect(counters[f"{kind}.all_reduce.calls"], 2, f"{kind}.all_reduce.calls in counters()")
    if (tp, pp, cp, ep) == (2, 2, 1, 1) and RANK == 0:
        print(m.table(num_layers=30), flush=True)
    return m.describe()


def check_refused():
    """A TP group of 4 over nodes of 2 ranks is refused on every rank, with the numbers."""
    saved = os.environ.get("MPINFER_RANKS_PER_NODE")
    os.environ["MPINFER_RANKS_PER_NODE"] = "2"
    try:
        Topology(WORLD, tp=4)
    except ValueError as e:
        expect(str(e), "tp=4 does not divide the 2 ranks of a node: a TP group would cross nodes", "refusal message")
    else:
        raise AssertionError(f"rank {RANK}: tp=4 over nodes of 2 ranks was not refused")
    finally:
        if saved is None:
            del os.environ["MPINFER_RANKS_PER_NODE"]
        else:
            os.environ["MPINFER_RANKS_PER_NODE"] = saved


def main():
    rpn = int(os.environ.get("MPINFER_RANKS_PER_NODE", SIZE))  # one machine: one node unless pretending
    done = [check_layout(*layout, rpn) for layout in layouts(rpn)]
    if SIZE % 4 == 0:
        check_refused()
    if RANK == 0:
        print(f"{SIZE} ranks, {rpn} per node: {len(done)} layouts ok", *done, sep="\n  ", flush=True)


if __name__ == "__main__":
    main()
