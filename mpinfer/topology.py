"""Topology: the MPI sub-communicators of a layout, built once from a Mapping and passed down.

Nodes are found by MPI itself (Split_type(COMM_TYPE_SHARED): the ranks sharing memory),
never guessed from rank numbers. The Mapping assumes each node holds consecutive world
ranks, as launchers do by default (srun --distribution=block, mpiexec); any other placement
is refused rather than silently putting a TP group across nodes.

MPINFER_RANKS_PER_NODE=k in the environment pretends that every k consecutive ranks are
one node, so the tests exercise node boundaries on one machine.
"""

import os

import numpy as np
from mpi4py import MPI

from .comm import Group
from .mapping import KINDS, Mapping


class Topology:
    """The Mapping of this rank and one comm.Group per parallel kind: .tp, .cp, .pp, .dp, .ep.

    Collective over world_comm: every rank constructs it with the same numbers. A layout
    that does not fit raises ValueError (one line, the numbers) on every rank alike.
    """

    def __init__(self, world_comm, tp=1, pp=1, cp=1, ep=1):
        self.mapping = Mapping(world_comm.Get_size(), world_comm.Get_rank(), tp=tp, pp=pp, cp=cp, ep=ep,
                               ranks_per_node=ranks_per_node(world_comm))
        for kind in KINDS:  # same order on every rank: Split is collective over the world
            setattr(self, kind, Group(world_comm.Split(*self.mapping.colour(kind)), kind))

    def groups(self):
        return [getattr(self, kind) for kind in KINDS]

    def counters(self):
        """Every group's counters in one flat dict ({"tp.all_reduce.bytes": ...})."""
        return {k: v for group in self.groups() for k, v in group.counters().items()}


def ranks_per_node(world_comm):
    """The number of ranks on each node: MPINFER_RANKS_PER_NODE when set, else what MPI's
    shared-memory split finds, checked to be the same on every node and consecutive ranks."""
    env = os.environ.get("MPINFER_RANKS_PER_NODE")
    if env:
        if not env.strip().isdigit() or int(env) < 1:
            raise ValueError(f"MPINFER_RANKS_PER_NODE={env!r} must be a whole number, at least 1")
        return int(env)
    node = world_comm.Split_type(MPI.COMM_TYPE_SHARED, key=world_comm.Get_rank())
    ranks = np.empty(node.Get_size(), np.int64)  # world ranks of my node, in node rank order
    node.Allgather(np.array([world_comm.Get_rank()], np.int64), ranks)
    node.Free()
    consecutive = bool(np.array_equal(ranks, np.arange(ranks[0], ranks[0] + len(ranks))))
    # agree over the whole world, so every rank raises the same error (none is left waiting)
    agreed = np.array([len(ranks), -len(ranks), consecutive], np.int64)
    world_comm.Allreduce(MPI.IN_PLACE, agreed, op=MPI.MIN)
    smallest, largest, all_consecutive = int(agreed[0]), -int(agreed[1]), bool(agreed[2])
    if smallest != largest:
        raise ValueError(f"nodes hold between {smallest} and {largest} ranks: launch the same number of ranks "
                         f"on every node")
    if not all_consecutive:
        raise ValueError("the ranks of a node are not consecutive world ranks: the launcher must place "
                         "consecutive ranks on a node (e.g. srun --distribution=block)")
    return smallest
