"""Run under mpiexec -n 4 (python tests/mpi_moe_check.py MODEL_FOLDER): one MoE layer of a
tiny Qwen3-MoE (8 experts, top-2) under every expert-parallel layout of 4 ranks, against the
same layer with every expert on one rank, and its dispatch traffic against the closed form.

The router is replaced by orthonormal rows, so on Gaussian tokens the E logits are i.i.d. and
routing is uniform: a pair's expert lives on another rank with probability (S-1)/S. The rows
that leave the ranks of an EP group are counted exactly too: 2 * D * 4 bytes for each pair
whose expert's home is another rank (its row out, its output back). The last replica has no tokens (an idle replica
joining its EP group's step). Prints one JSON line per layout; exits non-zero on a failure.
"""

import json
import sys

import numpy as np
from mpi4py import MPI
from mpi_script import run

from mpinfer.backend import get_backend
from mpinfer.layers import TP
from mpinfer.moe import EP, MoE
from mpinfer.topology import Topology
from mpinfer.weights import open_checkpoint

WORLD = MPI.COMM_WORLD
LAYOUTS = [(1, 4), (2, 4), (1, 2), (2, 2), (4, 2), (4, 4)]  # (tp, ep) over 4 ranks


def check(ckpt, tp, ep):
    topo = Topology(WORLD, tp=tp, ep=ep)
    m, cfg, be = topo.mapping, ckpt.config, get_backend("numpy")
    E, D, A = cfg.num_experts, cfg.hidden_size, cfg.experts_per_token
    layer = cfg.moe_layers.index(True)
    moe = MoE(cfg, be, ckpt, layer, TP(topo.tp), EP.of(topo))
    whole = MoE(cfg, be, ckpt, layer, TP(), EP())  # every expert, whole, on this rank
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((D, E)))
    moe.router = whole.router = np.ascontiguousarray(q.T * 4.0, np.float32)  # (E, D) orthonormal rows
    T = 0 if m.dp_rank == m.dp - 1 and m.dp > 1 else 1500 + 101 * m.dp_rank
    x = np.random.default_rng(m.dp_rank + 1).standard_normal((T, D)).astype(np.float32)  # my replica's tokens
    y, ref = moe(x), whole(x)
    err = float(np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-30)) if T else 0.0
    assert err <= 1e-5, f"rank {m.rank}: tp {tp} ep {ep}: relative error {err}"

    across = tp % ep != 0
    a, b = (T * m.tp_rank // tp, T * (m.tp_rank + 1) // tp) if across else (0, T)
    experts, _ = whole.route(x[a:b])
    remote = int((experts // (E // ep) != m.ep_rank).sum())  # pairs whose expert lives elsewhere
    counts = topo.ep.counts.get("all_to_all", {"calls": 0, "remote_bytes": 0})
    assert counts["calls"] == 2 * across, counts  # inside a replica nothing moves but the TP all-reduce
    pairs = np.array([remote, (b - a) * A, counts["remote_bytes"]], np.int64)
    topo.ep.comm.Allreduce(MPI.IN_PLACE, pairs)  # over my EP group
    # each remote pair's row leaves its source (dispatch) and its output leaves the expert's rank (combine)
    assert pairs[2] == 2 * pairs[0] * D * 4 * across, (m.rank, pairs)
    fraction = pairs[0] / pairs[1] if across else 0.0
    if across:  # uniform routing: (S-1)/S of the pairs leave their rank (thousands of pairs: within 0.03)
        assert abs(fraction - (ep - 1) / ep) < 0.03, (fraction, ep)
    return {"tp": tp, "ep": ep, "across": across, "rel_err": err, "pairs": int(pairs[1]),
            "leaving": float(fraction), "expected": (ep - 1) / ep * across, "group_remote_bytes": int(pairs[2])}


def main():
    ckpt = open_checkpoint(sys.argv[1])
    for tp, ep in LAYOUTS:
        result = check(ckpt, tp, ep)
        if WORLD.rank == 0:
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    run(main)
