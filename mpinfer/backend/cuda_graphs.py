"""CUDA graphs of decode steps: a decode step launches a few hundred small kernels (8B-shaped:
~10 per layer), whose launch costs from Python are as long as the GPU's work at small
batches. Captured once per shape bucket and replayed, a step is one host-to-device copy of
its inputs, one graph launch and one copy of the logits back.

Which steps (takes()): every row a decode row (q_len 1) of a sequence not sharded over a CP
group, at most MAX_ROWS of them. Which models (of()): only where everything a step does is
GPU work that a stream capture can record, so
  - a whole model (pp = 1): a pipeline stage hands host arrays to MPI between its layers and
    the next stage's;
  - no MoE layer: routing's pair bookkeeping runs on the host and shapes the step by the
    routing;
  - no TP group, or one that all-reduces over NCCL (cuda_comm.NcclGroup) without sequence
    parallelism: host-staged MPI collectives (groups across nodes, ranks sharing a GPU) and
    sp's all-gather / reduce-scatter copy through host memory, which a capture cannot hold.
    (The group's counters count a replay's all-reduces as the capture recorded them; their
    seconds are the eager steps' only.)
Prefill and mixed steps run eagerly, as every step does on the other layouts.

Buckets: B rows padded up to a power of two, the block-table width (blocks of the longest
sequence) up to a power of two of at least MIN_WIDTH. Padded rows decode token 0 at position
0 over one key (block 0, row 0: memory of the pool, never written by them) with slot -1, so
they store nothing, and their logits are dropped; padded table columns lie past every
sequence's length and are never read.

Static inputs: one int32 device buffer per graph, [ids | positions | slots | kv_lens] (rows
each) then tables (rows, width), rewritten by one host-to-device copy before each replay; the
capture's Batch carries a cuda_backend._Meta of views into it, so the layers read nothing
from the host. Memory: the graphs' intermediates come from one cupy MemoryPool of their own:
a warm-up pass fills it, the capture takes the same blocks again (no cudaMalloc while
capturing), and nothing else allocates from it. The graphs may share its blocks because
they run one at a time, each writing its intermediates before reading them, and its logits
are copied out before the next one runs; what must outlive a replay (inputs) stays
referenced by its _Graph, so the pool never hands it out again. The logits go to one buffer
per row bucket outside that pool (its graphs of every table width share it: at a 128k
vocabulary a buffer of 128 rows is 64 MB, which one per graph would multiply by the widths).

Ordering: the graphs run on a stream of their own (a capture needs one), which first waits
for the work queued on the current stream (an eager step may still be storing K/V), and the
logits' copy back makes the host wait for the graph before any later work is queued.
"""

import sys

import cupy
import numpy as np
from mpi4py import MPI

from ..errors import one_line
from ..kvcache import Batch
from .cuda_backend import _Meta
from .cuda_comm import NcclGroup

MAX_ROWS = 128  # larger decode batches run eagerly: launches are a small part of their step (engine.max_seqs: 128)
MIN_WIDTH = 16  # blocks: the smallest table width of a bucket (256 tokens of 16)


def _bucket(n, least):
    """The smallest power of two >= max(n, least)."""
    return 1 << (max(n, least) - 1).bit_length()


class _Graph:
    """One bucket's captured step: the graph, its static inputs, its logits (rows, V/P) float32
    and the TP group's counts it adds at each replay ({op: {field: value}})."""

    def __init__(self, graph, inputs, logits, counts):
        self.graph, self.inputs, self.logits, self.counts = graph, inputs, logits, counts


class DecodeGraphs:
    def __init__(self, model):
        self.model = model
        self.graphs, self.pool = {}, None  # (rows, width) -> _Graph, captured on this KV pool's arrays
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.memory = cupy.cuda.MemoryPool()  # the graphs' intermediates (module docstring)
        self.outputs = {}  # rows -> (rows, V/P) float32: the logits of that row bucket's graphs, one buffer for all widths

    @classmethod
    def of(cls, model):
        """DecodeGraphs for the model, or None where its steps cannot be captured (module docstring)."""
        tp = model.tp
        whole = model.first and model.last
        tp_ok = tp.group is None or (isinstance(tp.group, NcclGroup) and not tp.sp)
        return cls(model) if whole and not model.moe_layers() and tp_ok else None

    @staticmethod
    def takes(batch):
        """True for a step of decode rows only, at most MAX_ROWS of them."""
        q = batch.q_lens
        return (0 < len(q) <= MAX_ROWS and batch.shares is None and batch.take is None and bool((q == 1).all())
                and all(k is None for k in batch.key_pos))

    def logits(self, ids, batch):
        """The step's logits (B, V/P) float32 on the host: the bucket's graph replayed on the
        step's inputs (captured first if the bucket is new); None if the capture failed (the
        step and every later one then run eagerly)."""
        B, bs = len(ids), batch.pool.block_size
        key = (_bucket(B, 1), _bucket(-(-int(batch.kv_lens.max()) // bs), MIN_WIDTH))
        if batch.pool is not self.pool:  # the graphs hold the pools' addresses: new pools, new graphs
            self.graphs, self.pool = {}, batch.pool
        g = self.graphs.get(key) or self._capture_or_off(batch.pool, *key)
        if g is None:
            return None
        self.stream.wait_event(cupy.cuda.get_current_stream().record())
        with self.stream:
            g.inputs.set(pack(ids, batch, *key))  # the one host-to-device copy
            g.graph.launch()
            self._count(g.counts)
            return cupy.asnumpy(g.logits[:B], stream=self.stream)

    def _capture_or_off(self, pool, rows, width):
        """The bucket's new _Graph; or, where any rank of the TP group failed to capture it (the
        CUDA runtime or driver refusing part of the capture), None on every rank, one line on
        stderr from each that failed, and the model's steps eager from then on."""
        try:
            g, problem = self._capture(pool, rows, width), None
        except (cupy.cuda.runtime.CUDARuntimeError, cupy.cuda.driver.CUDADriverError) as e:  # other errors are bugs
            g, problem = None, one_line(e)
        group = self.model.tp.group
        failed = problem is not None if group is None else group.comm.allreduce(int(problem is not None), op=MPI.MAX)
        if not failed:
            return g
        if problem is not None:
            print(f"mpinfer: CUDA graph capture failed, decode steps run eagerly: {problem}", file=sys.stderr, flush=True)
        self.graphs, self.model.graphs = {}, None
        return None

    def _counts(self):
        group = self.model.tp.group
        return {} if group is None else {op: dict(c) for op, c in group.counts.items()}

    def _count(self, counts, sign=1):
        """Add counts ({op: {field: value}}) to the TP group's counters."""
        for op, c in counts.items():
            mine = self.model.tp.group.counts.setdefault(op, dict.fromkeys(c, 0))
            for field, value in c.items():
                mine[field] += sign * value

    def _capture(self, pool, rows, width):
        m = self.model
        if rows not in self.outputs:  # from the default pool, outside the graphs' own
            self.outputs[rows] = cupy.empty((rows, m.lm_head.shape[0]), np.float32)
        out = self.outputs[rows]
        self.stream.wait_event(cupy.cuda.get_current_stream().record())
        with cupy.cuda.using_allocator(self.memory.malloc), self.stream:
            inputs = cupy.zeros(4 * rows + rows * width, np.int32)
            ids, positions, slots, kv_lens = (inputs[i * rows : (i + 1) * rows] for i in range(4))
            slots.fill(-1)  # every row padding (kv_len 1 over block 0) until the first step's copy
            kv_lens.fill(1)
            batch = Batch(pool, np.ones(rows), np.ones(rows), np.zeros((rows, width)))
            batch._cuda_meta = _Meta.for_decode(positions, slots, inputs[4 * rows :].reshape(rows, width), kv_lens)

            def forward():  # Decoder.step's eager path on the static buffers, to the device logits
                return m.head(m.run_layers(m.embed_tokens(ids), batch))

            forward()  # warm-up: kernels loaded, the pool holds every block the capture takes
            self.stream.synchronize()
            before = self._counts()
            self.stream.begin_capture()
            try:
                out[...] = forward()  # the head's product is an intermediate like any other
            except BaseException:
                try:  # leave the stream out of capture mode; forward()'s error is the one to report
                    self.stream.end_capture()
                except Exception:
                    pass
                raise
            graph = self.stream.end_capture()
        # the capture counted collectives that did not run yet: they count at each replay
        counts = {op: {f: v - before.get(op, {}).get(f, 0) for f, v in c.items()} for op, c in self._counts().items()}
        self._count(counts, -1)
        g = self.graphs[rows, width] = _Graph(graph, inputs, out, counts)
        return g


def pack(ids, batch, rows, width):
    """The static inputs of a step of B <= rows decode rows, as one int32 host array:
    ids, positions, slots, kv_lens (rows each, padded rows: 0, 0, -1, 1) and the block tables
    (rows, width), padded with block 0."""
    B = len(ids)
    buf = np.zeros(4 * rows + rows * width, np.int32)
    for i, (a, pad) in enumerate(((ids, 0), (batch.positions, 0), (batch.slots, -1), (batch.kv_lens, 1))):
        buf[i * rows : i * rows + B] = a
        buf[i * rows + B : (i + 1) * rows] = pad
    nb = min(width, batch.tables.shape[1])
    buf[4 * rows :].reshape(rows, width)[:B, :nb] = batch.tables[:, :nb]
    return buf
