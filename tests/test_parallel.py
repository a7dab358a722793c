"""Tensor parallelism under real `mpiexec`: every TP layout (with data parallel replicas
beside it) gives the same tokens as one rank, log-probabilities within 1e-5 relative, and the
all-reduce traffic of the chapter's ring formula."""

import json
import os

import h5py
import numpy as np
import pytest
from test_run import mpinfer, prompt_lines, write_job

from mpinfer.io.results import read_rows


def run_rows(folder, model, ranks, *sets, env=None, n=12):
    job, out = write_job(folder, model, prompt_lines(n, seed=3), sampling={"max_new_tokens": 6, "logprobs": 2})
    done = mpinfer(ranks, "run", job, *[x for s in sets for x in ("--set", s)], env=env)
    assert done.returncode == 0, done.stderr
    return read_rows(out), out


def assert_same(rows, ref):
    assert list(rows["id"]) == list(ref["id"])
    for name in ("output_ids", "top_logprob_ids"):
        assert [x.tolist() for x in rows[name]] == [x.tolist() for x in ref[name]], name
    assert list(rows["output_text"]) == list(ref["output_text"])
    for name in ("logprobs", "top_logprobs"):  # relative to their scale, as the model tests compare logits
        a, b = np.concatenate(rows[name]), np.concatenate(ref[name])
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max(), name


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
    """One rank's rows for each architecture, made on first use."""
    made = {}

    def get(arch):
        if arch not in made:
            made[arch] = run_rows(tmp_path_factory.mktemp(f"ref-{arch}"), tiny_model(arch), 1)[0]
        return made[arch]

    return get


@pytest.mark.parametrize("arch, ranks, tp", [
    ("llama", 2, 2),          # 6 heads, 2 KV heads: one KV head per rank
    ("llama", 4, 2),          # dp 2 x tp 2
    ("mistral", 2, 2),        # sliding window
    ("qwen2", 2, 2),          # QKV bias, mixed windows
    ("llama_bias", 3, 1),     # dp 3 (no TP), biases and tied head
    ("qwen3", 4, 4),          # 4 heads, 2 KV heads: each KV head held by 2 ranks; q/k norm
    ("llama_gguf", 4, 2),     # tied embeddings: vocab-parallel head = embedding rows
])
def test_tp_layouts_match_one_rank(tiny_model, reference, tmp_path, arch, ranks, tp):
    rows, out = run_rows(tmp_path, tiny_model(arch), ranks, f"parallel.tp={tp}")
    assert_same(rows, reference(arch))
    with h5py.File(out, "r") as f:
        layout = json.loads(f.attrs["layout"])
        assert (layout["tp"], layout["dp"]) == (tp, ranks // tp)
        if tp > 1:  # rank 0's TP group: two all-reduces per layer and one for the embedding per step
            layers = json.loads(f.attrs["model"])["num_layers"]
            assert f.attrs["comm.tp.all_reduce.calls"] % (2 * layers + 1) == 0
            assert f.attrs["comm.tp.all_reduce.ring_bytes"] == pytest.approx(
                2 * (tp - 1) / tp * f.attrs["comm.tp.all_reduce.bytes"])


def test_ring_bytes_per_token_on_one_replica(tiny_model, tmp_path):
    """With one replica every fed token passes every all-reduce exactly once."""
    rows, out = run_rows(tmp_path, tiny_model("llama"), 2, "parallel.tp=2")
    with h5py.File(out, "r") as f:
        cfg = json.loads(f.attrs["model"])
        fed = sum(len(p) + len(o) - 1 for p, o in zip(rows["prompt_ids"], rows["output_ids"]))
        assert f.attrs["comm.tp.all_reduce.bytes"] == (2 * cfg["num_layers"] + 1) * cfg["hidden_size"] * 4 * fed
        assert f.attrs["comm.tp.all_reduce.ring_bytes"] == f.attrs["comm.tp.all_reduce.bytes"]  # 2(2-1)/2 = 1


@pytest.mark.parametrize("sets, env, expected", [
    (["parallel.tp=4"], None, "parallel.tp = 4 does not divide the model's attention heads 6"),
    (["parallel.tp=2"], {"MPINFER_RANKS_PER_NODE": "1"}, "tp=2 does not divide the 1 ranks of a node"),
    (["parallel.tp=3"], None, "does not divide the world of 4 ranks"),
])
def test_bad_layouts_are_refused(tiny_model, tmp_path, sets, env, expected):
    job, out = write_job(tmp_path, tiny_model("llama"), prompt_lines(2))
    done = mpinfer(4, "run", job, *[x for s in sets for x in ("--set", s)], env=env)
    assert done.returncode == 2, done.stderr
    err = done.stderr.strip().splitlines()[-1]
    assert err.startswith("mpinfer: error: ") and expected in err, done.stderr
    assert not out.exists()


def test_smollm2_tp3_matches_one_rank(smollm2, tmp_path):
    """The real model: 9 heads and 3 KV heads over 3 ranks, vocabulary 49152 / 3."""
    lines = [{"id": "a", "messages": [{"role": "user", "content": "What is the capital of France?"}]},
             {"id": "b", "prompt": "The three laws of thermodynamics are"}]
    rows = {}
    for ranks in (1, 3):
        job, out = write_job(tmp_path / str(ranks), smollm2, lines, sampling={"max_new_tokens": 8, "logprobs": 2})
        done = mpinfer(ranks, "run", job, "--set", f"parallel.tp={ranks}")
        assert done.returncode == 0, done.stderr
        rows[ranks] = read_rows(out)
    assert_same(rows[3], rows[1])
    assert rows[1]["output_text"][0] == "The capital of France is Paris."
