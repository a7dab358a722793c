"""Run under mpiexec -n 2 (python tests/mpi_sp_check.py MODEL_FOLDER): sequence parallelism
inside a TP group of 2 against plain TP on one forward pass of 37 tokens (three sequences).

- the logits are the same (within 1e-5 relative);
- between layers each rank holds 18 or 19 of the 37 rows instead of all 37, and the layers'
  RMSNorms on the two ranks together normalise each row once, not twice;
- the bytes on the wire are the same: a reduce-scatter plus an all-gather per ring all-reduce,
  (T-1)/T * n each, so the layers' all-reduce ring bytes split exactly into the two halves
  (the embedding's reduce-scatter has no gather; the sampled rows' gather is counted apart).
Prints one JSON line (rank 0); exits non-zero on a failure.
"""

import json
import sys

import numpy as np
from mpi4py import MPI
from mpi_script import run

from mpinfer.backend import get_backend
from mpinfer.kvcache import PagedKVCache
from mpinfer.model import Decoder
from mpinfer.topology import Topology
from mpinfer.weights import open_checkpoint

WORLD = MPI.COMM_WORLD


def forward(ckpt, sp, ids, counts):
    topo = Topology(WORLD, tp=2)
    be = get_backend("numpy")
    normed = []
    rmsnorm = be.rmsnorm  # count the rows each norm runs on (the NumPy add_rmsnorm calls it too)
    be.rmsnorm = lambda x, w, eps, *a: normed.append(x.shape[0] if x.ndim == 2 else 0) or rmsnorm(x, w, eps, *a)
    model = Decoder(ckpt, be, topo.tp, sp=sp)
    pool = PagedKVCache.for_model(model, 2**24, 16, model.config.num_layers)
    seqs = [pool.sequence() for _ in counts]
    batch = pool.batch(seqs, counts)
    x = model.run_layers(model.embed_tokens(ids), batch)
    last = np.cumsum(counts) - 1
    logits = model.logits(model.final_rows(x, batch, last))
    return logits, x.shape[0], sum(normed), topo.tp.counters()


def main():
    ckpt = open_checkpoint(sys.argv[1])
    counts = [20, 1, 16]
    ids = np.random.default_rng(0).integers(3, 300, sum(counts))
    plain, rows_plain, normed_plain, c_plain = forward(ckpt, False, ids, counts)
    sp, rows_sp, normed_sp, c_sp = forward(ckpt, True, ids, counts)
    T, L, R, D = sum(counts), ckpt.config.num_layers, len(counts), ckpt.config.hidden_size
    err = float(np.abs(sp - plain).max() / np.abs(plain).max())
    assert err <= 1e-5, err
    assert rows_plain == T and rows_sp == [18, 19][WORLD.rank], rows_sp
    total = WORLD.allreduce(normed_sp)
    # two norms a layer over every row on each rank, against each row once over both; the
    # final norm runs on the R sampled rows on every rank either way
    assert normed_plain == 2 * L * T + R and total == 2 * L * T + 2 * R, (normed_plain, total)
    ring = c_plain["tp.all_reduce.ring_bytes"]  # 2L + 1 all-reduces of T x D floats
    assert ring == (2 * L + 1) * 2 * (1 / 2) * T * D * 4
    assert c_sp["tp.reduce_scatter.ring_bytes"] == ring / 2  # the first half of every all-reduce
    layers_gather = c_sp["tp.all_gather_rows.ring_bytes"] - (1 / 2) * R * D * 4  # less the sampled rows
    assert layers_gather == ring / 2 * 2 * L / (2 * L + 1), (layers_gather, ring)  # the second half, but the embedding's
    if WORLD.rank == 0:
        print(json.dumps({"rel_err": err, "rows_between_layers": [rows_plain, rows_sp], "rows_normed_by_rank_0":
                          [normed_plain, normed_sp], "all_reduce_ring_bytes": ring,
                          "reduce_scatter_ring_bytes": c_sp["tp.reduce_scatter.ring_bytes"],
                          "all_gather_ring_bytes": c_sp["tp.all_gather_rows.ring_bytes"]}), flush=True)


if __name__ == "__main__":
    run(main)
