"""Context parallelism: zig-zag balance of causal work, ring / Ulysses / split-KV attention
against attention on one rank (tests/mpi_context_check.py under mpiexec), and whole jobs
with prompts of 1 to 4,000 tokens whose tokens and log-probabilities must equal one rank's."""

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
from test_parallel import assert_same
from test_run import BIN, mpinfer, prompt_lines, write_job

from mpinfer.backend.numpy_backend import PREFILL_ROWS, SPLIT_KV, NumpyBackend
from mpinfer.context import causal_work, zigzag
from mpinfer.io.results import read_rows
from mpinfer.kvcache import Batch, PagedKVCache

SCRIPT = os.path.join(os.path.dirname(__file__), "mpi_context_check.py")
LENGTHS = (1, 5, 63, 64, 300, 1500, 4000)  # prompts of at least THRESHOLD tokens go through the CP group
THRESHOLD = 64


@pytest.mark.parametrize("size", [2, 4])
@pytest.mark.parametrize("length", [64, 1000, 4000])
def test_zigzag_balances_causal_work(length, size):
    shares = zigzag(length, size)
    assert np.array_equal(np.sort(np.concatenate(shares)), np.arange(length))  # every position once
    work = causal_work(length, size)
    assert work.sum() == length * (length + 1) // 2
    assert np.abs(work / work.mean() - 1).max() <= 0.10, work
    # contiguous chunks would leave the last rank with (2C-1)/C of the mean work
    contiguous = np.array([int((s + 1).sum()) for s in np.array_split(np.arange(length), size)])
    assert contiguous.max() / contiguous.mean() > 1.4


def test_ring_ulysses_and_split_kv_equal_one_rank():
    done = subprocess.run([os.path.join(BIN, "mpiexec"), "-n", "4", sys.executable, SCRIPT],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(results) == 14 and all(r[m] <= 1e-5 for r in results for m in ("ring", "ulysses", "split_kv"))


def long_lines():
    rng = np.random.default_rng(4)
    lines = [{"id": f"long{n}", "input_ids": rng.integers(3, 300, n).tolist()} for n in LENGTHS]
    lines[2]["sampling"] = {"temperature": 0.8, "seed": 3}  # sampled tokens too
    return lines + prompt_lines(5, seed=2)


def run_rows(folder, model, ranks, *sets):
    job, out = write_job(folder, model, long_lines(), sampling={"max_new_tokens": 5, "logprobs": 2},
                         parallel={"cp_threshold": THRESHOLD})
    done = mpinfer(ranks, "run", job, *[x for s in sets for x in ("--set", s)])
    assert done.returncode == 0, done.stderr
    return read_rows(out), out


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
    return run_rows(tmp_path_factory.mktemp("cp1"), tiny_model("qwen3_long"), 1)[0]


@pytest.mark.parametrize("ranks, sets", [
    (2, ["parallel.cp=2"]),
    (2, ["parallel.cp=2", "parallel.cp_method=ulysses"]),
    (4, ["parallel.cp=4"]),
    (4, ["parallel.cp=4", "parallel.cp_method=ulysses"]),
    (4, ["parallel.cp=2", "parallel.tp=2"]),
    (4, ["parallel.cp=2", "parallel.tp=2", "parallel.cp_method=ulysses"]),
    (4, ["parallel.cp=2", "parallel.cp_method=ulysses"]),  # 2 replicas of cp 2
    (4, ["parallel.cp=2", "parallel.pp=2"]),  # each stage's CP group attends its layers
    (8, ["parallel.cp=2", "parallel.pp=2", "parallel.tp=2", "parallel.cp_method=ulysses"]),
])
def test_cp_layouts_match_one_rank(tiny_model, reference, tmp_path, ranks, sets):
    rows, out = run_rows(tmp_path, tiny_model("qwen3_long"), ranks, *sets)
    assert_same(rows, reference)
    with h5py.File(out, "r") as f:
        layout, cfg = json.loads(f.attrs["layout"]), json.loads(f.attrs["model"])
        cp = layout["cp"]
        assert cp == int(sets[0].split("=")[1]) and layout["dp"] * layout["tp"] * layout["pp"] * cp == ranks
        if "ulysses" not in " ".join(sets) and layout["dp"] == layout["pp"] == 1:
            # the ring: rank 0 passes on every share but the one it would get back, per layer and
            # long prompt: its own first, then its left neighbours' (hops of O(S/C * d) bytes)
            kv_bytes = 2 * cfg["num_kv_heads"] // layout["tp"] * cfg["head_dim"] * 4 * cfg["num_layers"]
            long = [len(p) for p in rows["prompt_ids"] if len(p) >= THRESHOLD]
            assert len(long) >= 4
            expected = sum(len(zigzag(n, cp)[-hop % cp]) for n in long for hop in range(cp - 1)) * kv_bytes
            assert f.attrs["comm.cp.send.bytes"] == expected


@pytest.mark.parametrize("ranks, sets, expected", [
    (4, ["parallel.cp=2", "parallel.ep=2"], "context parallelism combines with tp, pp and dp, not yet with ep"),
    (4, ["parallel.cp=4", "parallel.cp_method=ulysses"], "6 query heads over 2 KV heads do not split into cp = 4"),
    (4, ["parallel.cp=3"], "does not divide the world of 4 ranks"),
    (2, ["parallel.cp=2", "parallel.cp_method=zigzag"], "parallel.cp_method: must be one of ring, ulysses"),
    (4, ["parallel.cp=2", "parallel.tp=2", "parallel.sp=true"], "with parallel.sp = true: choose one of them"),
])
def test_bad_cp_layouts_are_refused(tiny_model, tmp_path, ranks, sets, expected):
    job, out = write_job(tmp_path, tiny_model("llama"), prompt_lines(2))
    done = mpinfer(ranks, "run", job, *[x for s in sets for x in ("--set", s)])
    assert done.returncode == 2, done.stderr
    err = done.stderr.strip().splitlines()[-1]
    assert err.startswith("mpinfer: error: ") and expected in err, done.stderr
    assert not out.exists()


@pytest.mark.parametrize("window", [0, 100])
def test_one_rank_splits_long_attention_exactly(window):
    """On one rank a long sequence's decode runs in pieces of SPLIT_KV keys merged by
    log-sum-exp, and a long prefill chunk in blocks of queries: both equal attention over
    the whole sequence at once."""
    be, S = NumpyBackend(threads=2), 5000
    assert S > 2 * SPLIT_KV and 600 > PREFILL_ROWS
    pool = PagedKVCache(1, 2, 16, num_blocks=S // 16 + 1)
    seq = pool.sequence()
    assert pool.reserve(seq, S)
    rng = np.random.default_rng(0)
    k, v = (rng.standard_normal((S, 2, 16)).astype(np.float32) for _ in range(2))
    full = Batch(pool, [S], [S], [seq.blocks])
    pool.k[0][full.slots], pool.v[0][full.slots] = k, v
    for new in (1, 600):  # a decode step, a prefill chunk ending at S
        q = rng.standard_normal((new, 4, 16)).astype(np.float32)
        got = be.paged_attention(q, pool.k[0], pool.v[0], Batch(pool, [new], [S], [seq.blocks]), window)
        want = be.attention(q, k, v, np.arange(S - new, S), window)
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
