"""Groups for GPU arrays: NCCL inside a node, MPI (host-staged) elsewhere.

A TP group whose ranks sit on one node, each on its own GPU, all-reduces over NCCL: the
group's first rank makes the unique id and broadcasts it over the group's MPI
communicator; NCCL runs on its own stream, ordered after the producing kernels and before
the consuming ones by events. Everything else (groups across nodes, several ranks sharing
one GPU, which NCCL refuses, and the ops NCCL is not used for here) goes through the
comm.Group's MPI calls with the data staged through host memory (the PyPI MPICH is not
CUDA-aware). Both keep comm.Group's counters.
"""

import socket
import time

import cupy


class StagedGroup:
    """comm.Group for cupy arrays: copies to the host, the MPI collective, copies back.
    Methods without arrays (any, exchange_counts, counters, ...) pass straight through."""

    def __init__(self, group):
        self.group = group
        self.comm, self.name, self.size, self.rank = group.comm, group.name, group.size, group.rank
        self.transport = "mpi (host-staged)"

    def __getattr__(self, name):  # the non-array methods and counters of comm.Group
        return getattr(self.group, name)

    def all_reduce(self, x):
        if self.size == 1 or not isinstance(x, cupy.ndarray):  # host arrays (e.g. logits shards) go as they are
            return self.group.all_reduce(x)
        h = cupy.asnumpy(x)
        self.group.all_reduce(h)
        x[...] = cupy.asarray(h)
        return x

    def _staged(self, op, x, *args):
        """comm.Group.op on x, through host memory when x is on the GPU (a new array back)."""
        if not isinstance(x, cupy.ndarray):  # host arrays (e.g. logits shards) go as they are
            return getattr(self.group, op)(x, *args)
        return cupy.asarray(getattr(self.group, op)(cupy.asnumpy(x), *args))

    def reduce_scatter(self, x, counts):
        return self._staged("reduce_scatter", x, counts)

    def all_gather_rows(self, x, counts):
        return self._staged("all_gather_rows", x, counts)

    def all_to_all(self, x, send_counts, recv_counts):
        return self._staged("all_to_all", x, send_counts, recv_counts)


class NcclGroup(StagedGroup):
    """All-reduce over NCCL (the TP hot path, two per layer); the rest host-staged."""

    def __init__(self, group):
        from cupy.cuda import nccl

        super().__init__(group)
        self.nccl = nccl
        uid = nccl.get_unique_id() if group.rank == 0 else None
        uid = group.comm.bcast(uid, root=0)
        self.nccl_comm = nccl.NcclCommunicator(group.size, uid, group.rank)
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.transport = "nccl"

    def all_reduce(self, x):
        """x <- sum over the group, in place (float32, C-contiguous); returns x. The current
        stream's work on x finishes first; the current stream's later work waits for the sum."""
        if not isinstance(x, cupy.ndarray):
            return self.group.all_reduce(x)
        start = time.perf_counter()
        ready = cupy.cuda.get_current_stream().record()
        self.stream.wait_event(ready)
        self.nccl_comm.allReduce(x.data.ptr, x.data.ptr, x.size, self.nccl.NCCL_FLOAT32, self.nccl.NCCL_SUM,
                                 self.stream.ptr)
        cupy.cuda.get_current_stream().wait_event(self.stream.record())
        self.group._count("all_reduce", x.nbytes, start, ring_bytes=2 * (self.size - 1) / self.size * x.nbytes)
        return x


def gpu_group(group, device):
    """The group to use for cupy arrays: NCCL when every rank of it is on this node with a
    GPU of its own, else host-staged MPI. Collective over the group."""
    if group is None or group.size == 1:
        return group
    props = cupy.cuda.runtime.getDeviceProperties(device)
    where = group.comm.allgather((socket.gethostname(), props["pciDomainID"], props["pciBusID"], props["pciDeviceID"]))
    one_node = len({w[0] for w in where}) == 1
    own_gpus = len(set(where)) == group.size
    if one_node and own_gpus:
        try:
            return NcclGroup(group)
        except ImportError:  # CuPy without its NCCL module: MPI still works
            pass
    return StagedGroup(group)


def node_local_rank(comm):
    """This rank's place among the ranks of its node (MPI's shared-memory split)."""
    from mpi4py import MPI

    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    rank = node.Get_rank()
    node.Free()
    return rank


def pick_device(comm):
    """The GPU of this rank: its node-local rank modulo the GPUs it sees (with one GPU per
    task, as srun --gpus-per-task=1 sets CUDA_VISIBLE_DEVICES, always 0)."""
    return node_local_rank(comm) % cupy.cuda.runtime.getDeviceCount()

