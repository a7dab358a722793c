"""Run under mpiexec -n 4 (python tests/mpi_context_check.py): ring attention, Ulysses and
split-KV decode over CP groups of 2 and 4 ranks against attention over the whole sequence on
one rank, for lengths from 1 to 3000, GQA and a sliding window. Each rank draws the whole
sequence's q, k, v from the same seed and keeps its zig-zag share. Prints one JSON line per
case (rank 0); exits non-zero on the first failure."""

import json

import numpy as np
from mpi4py import MPI
from mpi_script import run

from mpinfer.backend.numpy_backend import NumpyBackend
from mpinfer.comm import Group
from mpinfer.context import merge, ring_attention, split_kv_merge, ulysses_attention, zigzag

WORLD = MPI.COMM_WORLD
H, HKV, DH = 4, 2, 16


def case(be, group, length, window, seed):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((length, h, DH)).astype(np.float32) for h in (H, HKV, HKV))
    ref = be.attention(q, k, v, np.arange(length), window)
    shares = zigzag(length, group.size)
    mine = shares[group.rank]
    worst = {}
    for name, fn in (("ring", ring_attention), ("ulysses", ulysses_attention)):
        out = fn(be, q[mine], k[mine], v[mine], shares, window, group)
        worst[name] = float(np.abs(out - ref[mine]).max() / np.abs(ref).max()) if len(mine) else 0.0
    # decode: a query at position `length` over the sharded cache plus its own key (on rank 0)
    qn, kn, vn = (rng.standard_normal((1, h, DH)).astype(np.float32) for h in (H, HKV, HKV))
    full = be.attention(qn, np.concatenate([k, kn]), np.concatenate([v, vn]), np.array([length]), window)
    kpos = np.concatenate([mine, [length]]) if group.rank == 0 else mine
    ks = np.concatenate([k[mine], kn]) if group.rank == 0 else k[mine]
    vs = np.concatenate([v[mine], vn]) if group.rank == 0 else v[mine]
    out, lse = be.partial_attention(qn, ks, vs, np.array([length]), kpos, window)
    worst["split_kv"] = float(np.abs(split_kv_merge(out, lse, group) - full).max() / np.abs(full).max())
    for name, err in worst.items():
        if not err <= 1e-5:
            raise AssertionError(f"rank {WORLD.rank}: C={group.size} L={length} window={window} {name}: {err}")
    return worst


def main():
    be = NumpyBackend(threads=1)
    # merge of two halves equals the whole (the identity every method rests on)
    rng = np.random.default_rng(9)
    q, k, v = (rng.standard_normal((5, h, DH)).astype(np.float32) for h in (H, HKV, HKV))
    pos = np.arange(5)
    whole = be.attention(q, k, v, pos, 0)
    halves = [be.partial_attention(q, k[s], v[s], pos, pos[s], 0) for s in (slice(0, 2), slice(2, 5))]
    merged, _ = merge(np.stack([h[0] for h in halves]), np.stack([h[1] for h in halves]))
    assert np.abs(merged - whole).max() <= 1e-6 * np.abs(whole).max()
    for size in (2, 4):
        group = Group(WORLD.Split(WORLD.rank // size, WORLD.rank), "cp")
        for length, window in ((1, 0), (3, 0), (7, 0), (64, 0), (257, 0), (1000, 24), (3000, 0)):
            worst = case(be, group, length, window, seed=length)
            if WORLD.rank == 0:
                print(json.dumps({"cp": size, "length": length, "window": window, **worst}), flush=True)


if __name__ == "__main__":
    run(main)
