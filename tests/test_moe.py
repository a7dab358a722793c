"""Mixture-of-experts: expert load counts against transformers' router, the placement of hot
expert copies, the capacity limit, one layer under every expert-parallel layout with its
dispatch traffic, and whole jobs (load statistics, replication, capacity) under mpiexec.
(test_parallel.py checks the tokens of every EP layout against one rank.)"""

import json
import os
import shutil
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest
import safetensors.numpy
import torch
from conftest import caches
from test_run import (BIN, assert_kept_then_resumed, mpinfer, prompt_lines, rows_by_id, start_and_wait_for_rows,
                      write_job)

from mpinfer.backend.numpy_backend import NumpyBackend
from mpinfer.engine import experts
from mpinfer.io.results import read_rows, summary
from mpinfer.layers import TP
from mpinfer.model import Decoder
from mpinfer.moe import EP, MoE, Placement
from mpinfer.weights import open_checkpoint

SCRIPT = os.path.join(os.path.dirname(__file__), "mpi_moe_check.py")


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_expert_load_matches_transformers_router(arch, tiny_model):
    from transformers import AutoModelForCausalLM

    path = tiny_model(arch)
    ours = Decoder.load(path)
    ref = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = [int(t) for t in np.random.default_rng(5).integers(3, 300, 41)]
    ours.forward(ids[:25], caches(ours), [25])  # a 25-token sequence
    (cache,) = caches(ours)  # then all 41 tokens as another sequence, in two forward passes
    ours.forward(ids[:25], [cache], [25])
    ours.forward(ids[25:], [cache], [16])
    layers, load = ours.expert_load()
    cfg = ours.config
    assert layers == [i for i, moe in enumerate(cfg.moe_layers) if moe]
    # 25 + 41 tokens routed, each to experts_per_token experts
    assert load.sum(axis=1).tolist() == [(25 + 41) * cfg.experts_per_token] * len(layers)
    with torch.no_grad():
        router_logits = ref(torch.tensor([ids]), output_router_logits=True).router_logits
    top = [torch.topk(torch.softmax(r.float(), -1), cfg.experts_per_token, -1).indices.numpy() for r in router_logits]
    expected = [np.bincount(t.ravel(), minlength=cfg.num_experts) for t in top]
    first = np.array([np.bincount(t[:25].ravel(), minlength=cfg.num_experts) for t in top])  # the first call (T, A)
    np.testing.assert_array_equal(load, first + np.array(expected))  # (MoE layers, E)


# --- expert parallelism, capacity, replication ---------------------------------------------

def test_placement_of_hot_expert_copies():
    """Loads 10 50 30 10 on 2 ranks (homes 0 0 1 1, rank loads 60 40): the hottest expert's
    copy goes to rank 1 and takes the 10 pairs that even the ranks out (a fifth); the next
    one's home is then no busier than the other rank, so it gets no copy."""
    p = Placement(4, 2, load=[10, 50, 30, 10], hot=2)
    assert p.holders == [[0], [0, 1], [1], [1]] and p.copies.tolist() == [1, 2, 1, 1]
    assert p.held_by(0) == [0, 1] and p.held_by(1) == [1, 2, 3]
    experts = np.array([0] * 3 + [1] * 10 + [3] * 2)  # sorted pairs of one source
    dest = p.dest(experts, np.bincount(experts, minlength=4))
    assert dest.tolist() == [0] * 3 + [0] * 8 + [1] * 2 + [1] * 2  # the last fifth of expert 1's pairs
    assert Placement(4, 2).holders == [[0], [0], [1], [1]]  # no load figures: homes only


def test_capacity_drops_pairs_beyond_the_limit(tiny_model):
    """capacity_factor 0.5 with 40 tokens, top-2 of 4 experts: at most 10 pairs per expert, the
    first in token order; dropped pairs just lose their weight (the others are not renormalised)."""
    ckpt = open_checkpoint(tiny_model("mixtral"))
    cfg, be = ckpt.config, NumpyBackend()
    capped = MoE(cfg, be, ckpt, 0, TP(), EP(capacity_factor=0.5))
    whole = MoE(cfg, be, ckpt, 0, TP(), EP())
    x = np.random.default_rng(1).standard_normal((40, cfg.hidden_size)).astype(np.float32)
    experts, weights = whole.route(x)
    seen, want = np.zeros(4, int), np.zeros_like(x)
    for t in range(40):  # the reference, token by token
        for e, w in zip(experts[t], weights[t]):
            if seen[e] < 10:
                gate_up, down = whole.experts[e]
                want[t] += w * down(be.silu_mul(*gate_up(x[t : t + 1])))[0]
            seen[e] += 1
    got = capped(x)
    assert capped.dropped == int(np.maximum(np.bincount(experts.ravel(), minlength=4) - 10, 0).sum()) > 0
    assert capped.load.tolist() == np.bincount(experts.ravel(), minlength=4).tolist()  # routed, dropped or not
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_moe_arrays_add_up_over_runs():
    merged = {0: {"load": np.array([3, 1]), "dropped": 1, "rank_load": np.array([3, 1]), "copies": [1, 1]}}
    first = experts.arrays(merged, {})
    assert first["moe/imbalance"][0].tolist() == [1.5] and first["moe/rank_imbalance"][0].tolist() == [1.5]
    second = experts.arrays(merged, first)  # a resumed run adds its counts to the file's
    assert second["moe/expert_load"][0].tolist() == [[6, 2]] and second["moe/dropped"][0].tolist() == [2]


def test_dispatch_traffic_and_layouts_of_one_layer(tiny_model):
    """tests/mpi_moe_check.py under mpiexec -n 4: one layer under every (tp, ep) of 4 ranks
    equals the layer on one rank; with uniform routing (S-1)/S of the pairs leave their rank."""
    done = subprocess.run([os.path.join(BIN, "mpiexec"), "-n", "4", sys.executable, SCRIPT, tiny_model("qwen3_moe")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [(r["tp"], r["ep"]) for r in results] == [(1, 4), (2, 4), (1, 2), (2, 2), (4, 2), (4, 4)]
    for r in results:
        print(r)
        assert abs(r["leaving"] - r["expected"]) < 0.03


def hf_expert_counts(folder, rows):
    """(MoE layers, E) pairs routed by transformers' router over every request's fed tokens
    (prompt and generated tokens but the last)."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(folder).eval()
    cfg = open_checkpoint(folder).config
    total = 0
    for prompt, output in zip(rows["prompt_ids"], rows["output_ids"]):
        ids = np.concatenate([prompt, output[:-1]]).astype(np.int64)
        with torch.no_grad():
            logits = ref(torch.tensor(ids[None]), output_router_logits=True).router_logits
        top = [torch.topk(torch.softmax(r.float(), -1), cfg.experts_per_token, -1).indices.numpy() for r in logits]
        total = total + np.array([np.bincount(t.ravel(), minlength=cfg.num_experts) for t in top])
    return total


def moe_job(folder, model, ranks, *sets, n=10):
    job, out = write_job(folder, model, prompt_lines(n, seed=7), sampling={"max_new_tokens": 8})
    done = mpinfer(ranks, "run", job, "--overwrite", *[x for s in sets for x in ("--set", s)])
    assert done.returncode == 0, done.stderr
    with h5py.File(out, "r") as f:
        return read_rows(out), {k: f[f"moe/{k}"][()] for k in f["moe"]}, dict(f.attrs)


def test_job_expert_load_matches_transformers(tiny_model, tmp_path):
    """EP across 2 replicas: /moe/expert_load sums to fed tokens x top-k per layer and equals
    the count from transformers' router logits on the same tokens."""
    folder = tiny_model("qwen2_moe")
    rows, moe, attrs = moe_job(tmp_path, folder, 2, "parallel.ep=2")
    assert moe["layers"].tolist() == [0, 2]  # Qwen2-MoE's layer 1 is dense
    np.testing.assert_array_equal(moe["expert_load"], hf_expert_counts(folder, rows))
    np.testing.assert_allclose(moe["imbalance"], moe["expert_load"].max(1) / moe["expert_load"].mean(1))
    assert attrs["moe.dropped"] == 0 and attrs["comm.ep.all_to_all.calls"] > 0
    shown = summary(tmp_path / "job.h5")["moe"]  # what `mpinfer inspect` prints
    assert list(shown) == ["0", "2"] and shown["0"]["imbalance"] == round(float(moe["imbalance"][0]), 3)


@pytest.fixture(scope="module")
def skewed_mixtral(tiny_model, tmp_path_factory):
    """The tiny Mixtral with skewed routers: a constant hidden feature (embedding column 0)
    that the router rows of experts 0 and 1 (at home on EP rank 0 of 2) weigh strongly, so in
    each layer most pairs go to one EP rank's experts (rank 0 or, where the feature's sign
    has turned, rank 1)."""
    folder = tmp_path_factory.mktemp("skewed")
    shutil.copytree(tiny_model("mixtral"), folder, dirs_exist_ok=True)
    path = str(folder / "model.safetensors")
    weights = safetensors.numpy.load_file(path)
    weights["model.embed_tokens.weight"][:, 0] = 2.0
    for name, w in weights.items():
        if name.endswith("block_sparse_moe.gate.weight"):
            w[:2, 0] += 0.3
    safetensors.numpy.save_file(weights, path, metadata={"format": "pt"})
    return str(folder)


def test_hot_expert_replication_keeps_tokens_and_evens_the_load(skewed_mixtral, tmp_path):
    """Copies of the 2 hottest experts, placed from a routing pass over the job's prompts or
    from an earlier results file: the tokens do not change, the busiest EP rank's load falls."""
    ref, _, _ = moe_job(tmp_path / "one", skewed_mixtral, 1)
    plain_rows, plain, _ = moe_job(tmp_path / "plain", skewed_mixtral, 2, "parallel.ep=2")
    hot_rows, hot, _ = moe_job(tmp_path / "hot", skewed_mixtral, 2, "parallel.ep=2", "moe.hot_experts=2")
    again_rows, again, _ = moe_job(tmp_path / "again", skewed_mixtral, 2, "parallel.ep=2", "moe.hot_experts=2",
                                   f"moe.load_from={tmp_path / 'plain' / 'job.h5'}")
    for rows in (plain_rows, hot_rows, again_rows):
        assert [x.tolist() for x in rows["output_ids"]] == [x.tolist() for x in ref["output_ids"]]
    print("expert load per layer", plain["expert_load"].tolist())
    for name, moe in (("none", plain), ("routing pass", hot), ("earlier file", again)):
        print(f"{name}: copies {moe['copies'].tolist()} rank load {moe['rank_load'].tolist()} "
              f"max/mean {moe['rank_imbalance'].round(3).tolist()}")
    assert (plain["rank_imbalance"] > 1.15).all()  # skewed: one EP rank's experts take most pairs
    for moe in (hot, again):
        assert (moe["copies"] > 1).any(axis=1).all()
        assert (moe["rank_load"].max(axis=1) < plain["rank_load"].max(axis=1)).all()
        np.testing.assert_array_equal(moe["expert_load"], plain["expert_load"])


def test_capacity_inside_a_replica_matches_one_rank(tiny_model, tmp_path):
    """With a capacity limit tokens depend on what shares a step; inside a replica (tp 2, ep 2)
    the steps are one rank's, so tokens and dropped pairs are the same."""
    model = tiny_model("mixtral")
    one, one_moe, _ = moe_job(tmp_path / "one", model, 1, "moe.capacity_factor=0.75")
    two, two_moe, _ = moe_job(tmp_path / "two", model, 2, "parallel.tp=2", "parallel.ep=2", "moe.capacity_factor=0.75")
    assert [x.tolist() for x in two["output_ids"]] == [x.tolist() for x in one["output_ids"]]
    assert one_moe["dropped"].sum() > 0
    np.testing.assert_array_equal(two_moe["dropped"], one_moe["dropped"])


@pytest.mark.parametrize("sets, expected", [
    (["moe.hot_experts=2"], "moe.hot_experts = 2 needs parallel.ep > 1"),
    (["parallel.ep=2", "moe.hot_experts=5"], "moe.hot_experts = 5 is more than the model's 4 experts"),
    (["parallel.ep=3"], "ep=3 must divide tp=1"),
    (["moe.capacity_factor=-1"], "moe.capacity_factor: must be >= 0"),
    (["parallel.ep=2", "moe.hot_experts=1", "moe.load_from=missing.h5"], "moe.load_from: "),
])
def test_bad_moe_settings_are_refused(tiny_model, tmp_path, sets, expected):
    job, out = write_job(tmp_path, tiny_model("mixtral"), prompt_lines(2))
    done = mpinfer(2, "run", job, *[x for s in sets for x in ("--set", s)])
    assert done.returncode == 2, done.stderr
    err = done.stderr.strip().splitlines()[-1]
    assert err.startswith("mpinfer: error: ") and expected in err, done.stderr
    assert not out.exists()


def test_sigterm_stops_expert_parallel_replicas_together(tiny_model, tmp_path):
    """SIGTERM to both replicas of an EP group mid-run: they drain together (exit 75, nothing
    lost), and the rerun completes with the uninterrupted rows; the file's expert counts then
    hold both runs' (at least the uninterrupted run's: stopped requests are recomputed)."""
    settings = dict(sampling={"max_new_tokens": 24}, parallel={"ep": 2},
                    engine={"max_batch_tokens": 16, "max_seqs": 1, "flush_seconds": 0.05})
    model = tiny_model("mixtral")
    ref_job, ref_out = write_job(tmp_path / "ref", model, prompt_lines(80, seed=7), **settings)
    assert mpinfer(2, "run", ref_job).returncode == 0
    job, out = write_job(tmp_path / "stop", model, prompt_lines(80, seed=7), **settings)
    proc, pids = start_and_wait_for_rows(job, out, 2)
    for pid in pids.values():
        os.kill(pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err
    assert_kept_then_resumed(job, out, rows_by_id(ref_out))
    with h5py.File(out, "r") as f, h5py.File(ref_out, "r") as ref:
        assert (f["moe/expert_load"][()].sum(1) >= ref["moe/expert_load"][()].sum(1)).all()
