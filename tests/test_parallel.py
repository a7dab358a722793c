"""Tensor, pipeline and expert parallelism under real `mpiexec`: every layout (with data
parallel replicas beside it) gives the same tokens as one rank, log-probabilities within 1e-5
relative, and the traffic of the chapter's formulas (ring all-reduce, d*b per stage boundary)."""

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
from conftest import ARCHS
from test_run import BIN, mpinfer, prompt_lines, write_job

from mpinfer.io.results import read_rows
from mpinfer.mapping import stage_layers


SP_SCRIPT = os.path.join(os.path.dirname(__file__), "mpi_sp_check.py")


def run_rows(folder, model, ranks, *sets, env=None, n=12):
    """Rows of a 12-request job (greedy and seeded sampling, top-2 logprobs) on `ranks` ranks."""
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


# Every architecture with tp in {1, 2} and pp in {1..4} (the tiny models' 6 heads do not split
# in 4; qwen3's 4 heads do), and data-parallel replicas beside TP and PP.
GRID = [(arch, tp * pp, tp, pp) for arch in ARCHS for tp in (1, 2) for pp in (1, 2, 3, 4) if tp * pp > 1]
GRID += [
    ("qwen3", 4, 4, 1),          # 2 KV heads over 4 ranks: each KV head held by 2 ranks
    ("qwen3", 8, 4, 2),
    ("llama", 4, 2, 1),          # dp 2 x tp 2
    ("llama", 8, 2, 2),          # dp 2 x pp 2 x tp 2 on two "nodes" of 4 ranks
    ("llama_bias", 3, 1, 1),     # dp 3, biases and a tied head
    ("llama_bias", 4, 1, 2),     # dp 2 x pp 2
]


@pytest.mark.parametrize("arch, ranks, tp, pp", GRID)
def test_layouts_match_one_rank(tiny_model, reference, tmp_path, arch, ranks, tp, pp):
    env = {"MPINFER_RANKS_PER_NODE": "4"} if ranks == 8 and tp * pp < 8 else None
    rows, out = run_rows(tmp_path, tiny_model(arch), ranks, f"parallel.tp={tp}", f"parallel.pp={pp}", env=env)
    assert_same(rows, reference(arch))
    with h5py.File(out, "r") as f:
        layout = json.loads(f.attrs["layout"])
        assert (layout["tp"], layout["pp"], layout["dp"]) == (tp, pp, ranks // tp // pp)
        if tp > 1:  # rank 0's TP group: two all-reduces per layer of its stage and one for the embedding per step
            first, last = stage_layers(json.loads(f.attrs["model"])["num_layers"], pp)[0]
            assert f.attrs["comm.tp.all_reduce.calls"] % (2 * (last - first) + 1) == 0
            assert f.attrs["comm.tp.all_reduce.ring_bytes"] == pytest.approx(
                2 * (tp - 1) / tp * f.attrs["comm.tp.all_reduce.bytes"])


# Expert parallelism (tiny models: Mixtral 4 experts, Qwen2-MoE 6 with a shared expert,
# Qwen3-MoE 8): inside a replica (ep divides tp; the rest splits each expert) and across
# replicas (ep a multiple of tp), with tp, pp and dp beside it, up to 8 ranks.
EP_GRID = [  # arch, ranks, tp, pp, ep
    ("mixtral", 2, 1, 1, 2),     # across 2 replicas
    ("mixtral", 2, 2, 1, 2),     # inside: ep = tp
    ("mixtral", 4, 1, 1, 4),     # across 4 replicas, one expert each
    ("mixtral", 4, 2, 1, 4),     # across 2 replicas of tp 2
    ("mixtral", 4, 1, 2, 2),     # across, an EP group per pipeline stage
    ("qwen2_moe", 2, 1, 1, 2),
    ("qwen2_moe", 4, 2, 1, 2),   # inside, 2 replicas beside
    ("qwen2_moe", 4, 1, 2, 2),
    ("qwen3_moe", 4, 4, 1, 2),   # inside, each expert split in 2
    ("qwen3_moe", 4, 4, 1, 4),   # inside, ep = tp
    ("qwen3_moe", 8, 1, 1, 4),   # two EP groups of 4 replicas
    ("qwen3_moe", 8, 2, 2, 4),   # across 2 replicas of tp 2 x pp 2, on two "nodes"
]


@pytest.mark.parametrize("arch, ranks, tp, pp, ep", EP_GRID)
def test_expert_parallel_layouts_match_one_rank(tiny_model, reference, tmp_path, arch, ranks, tp, pp, ep):
    env = {"MPINFER_RANKS_PER_NODE": "4"} if ranks == 8 else None
    rows, out = run_rows(tmp_path, tiny_model(arch), ranks, f"parallel.tp={tp}", f"parallel.pp={pp}",
                         f"parallel.ep={ep}", env=env)
    assert_same(rows, reference(arch))
    with h5py.File(out, "r") as f:
        assert json.loads(f.attrs["layout"])["ep"] == ep
        load, rank_load = f["moe/expert_load"][()], f["moe/rank_load"][()]
        fed = sum(len(p) + len(o) - 1 for p, o in zip(rows["prompt_ids"], rows["output_ids"]))
        assert (load.sum(axis=1) == 2 * fed).all()  # every fed token routed to 2 experts in every MoE layer
        assert rank_load.shape[1] == ep and (rank_load.sum(axis=1) == 2 * fed).all()
        assert ("comm.ep.all_to_all.calls" in f.attrs) == (tp % ep != 0)  # tokens move only across replicas


@pytest.mark.parametrize("arch, ranks, sets", [
    ("llama", 2, ["parallel.tp=2"]),
    ("llama_bias", 4, ["parallel.tp=2", "parallel.pp=2"]),  # row-parallel biases after the reduce-scatter
    ("qwen2_moe", 4, ["parallel.tp=2", "parallel.ep=2"]),  # MoE and its shared expert
    ("mixtral", 4, ["parallel.tp=2", "parallel.ep=4"]),  # EP across replicas
])
def test_sequence_parallel_layouts_match_one_rank(tiny_model, reference, tmp_path, arch, ranks, sets):
    rows, out = run_rows(tmp_path, tiny_model(arch), ranks, *sets, "parallel.sp=true")
    assert_same(rows, reference(arch))
    with h5py.File(out, "r") as f:  # the all-reduces became reduce-scatters and all-gathers
        assert "comm.tp.all_reduce.calls" not in f.attrs and f.attrs["comm.tp.reduce_scatter.calls"] > 0


def test_sequence_parallel_same_bytes_less_work(tiny_model):
    """tests/mpi_sp_check.py: one forward pass with and without sequence parallelism."""
    done = subprocess.run([os.path.join(BIN, "mpiexec"), "-n", "2", sys.executable, SP_SCRIPT, tiny_model("llama")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    print(done.stdout)


def test_auto_layout_is_chosen_explained_and_run(tiny_model, reference, tmp_path):
    """parallel.auto = true: the planner picks the layout of the 2 ranks (a tiny model fits
    anywhere, so data parallel replicas for throughput), says why, and the job runs it."""
    job, out = write_job(tmp_path, tiny_model("llama"), prompt_lines(12, seed=3),
                         sampling={"max_new_tokens": 6, "logprobs": 2}, parallel={"auto": True, "tp": 2})
    done = mpinfer(2, "run", job)
    assert done.returncode == 0, done.stderr
    assert "mpinfer: parallel.auto: tp 1, pp 1, ep 1, cp 1" in done.stdout
    assert "Best for throughput: dp 2 x tp 1" in done.stdout
    assert_same(read_rows(out), reference("llama"))
    with h5py.File(out, "r") as f:
        assert json.loads(f.attrs["layout"])["dp"] == 2  # the planner's tp 1 replaced the file's tp 2


def test_traffic_per_token_on_one_replica(tiny_model, tmp_path):
    """With one replica every fed token passes every all-reduce once and crosses the stage
    boundary once: 2 all-reduces per layer (+1 for the embedding) of d * 4 bytes each, ring
    bytes 2(T-1)/T of that, and d * 4 bytes sent from stage 0 to stage 1."""
    rows, out = run_rows(tmp_path, tiny_model("llama"), 4, "parallel.tp=2", "parallel.pp=2")
    with h5py.File(out, "r") as f:
        cfg = json.loads(f.attrs["model"])
        fed = sum(len(p) + len(o) - 1 for p, o in zip(rows["prompt_ids"], rows["output_ids"]))
        d_bytes = cfg["hidden_size"] * 4
        first, last = stage_layers(cfg["num_layers"], 2)[0]  # rank 0's stage
        assert f.attrs["comm.tp.all_reduce.bytes"] == (2 * (last - first) + 1) * d_bytes * fed
        assert f.attrs["comm.tp.all_reduce.ring_bytes"] == f.attrs["comm.tp.all_reduce.bytes"]  # 2(2-1)/2 = 1
        assert f.attrs["comm.pp.send.bytes"] == d_bytes * fed
        assert f.attrs["pp.micro_batches"] == 2 and 0 <= f.attrs["pp.idle_fraction"] < 1


@pytest.mark.parametrize("sets, env, expected", [
    (["parallel.tp=4"], None, "parallel.tp = 4 does not divide the model's attention heads 6"),
    (["parallel.tp=2"], {"MPINFER_RANKS_PER_NODE": "1"}, "tp=2 does not divide the 1 ranks of a node"),
    (["parallel.tp=3"], None, "does not divide the world of 4 ranks"),
    (["parallel.ep=2"], None, "parallel.ep = 2, but the model has no experts"),
    (["parallel.ep=3"], None, "ep=3 must divide tp=1 (EP inside a replica) or be a multiple of tp that divides"),
])
def test_bad_layouts_are_refused(tiny_model, tmp_path, sets, env, expected):
    job, out = write_job(tmp_path, tiny_model("llama"), prompt_lines(2))
    done = mpinfer(4, "run", job, *[x for s in sets for x in ("--set", s)], env=env)
    assert done.returncode == 2, done.stderr
    err = done.stderr.strip().splitlines()[-1]
    assert err.startswith("mpinfer: error: ") and expected in err, done.stderr
    assert not out.exists()


@pytest.fixture(scope="module")
def smollm2_rows(smollm2, tmp_path_factory):
    """A chat prompt and a plain prompt on SmolLM2, one rank; and a runner for other layouts."""
    lines = [{"id": "a", "messages": [{"role": "user", "content": "What is the capital of France?"}]},
             {"id": "b", "prompt": "The three laws of thermodynamics are"}]

    def run(ranks, *sets):
        job, out = write_job(tmp_path_factory.mktemp("smol"), smollm2, lines, sampling={"max_new_tokens": 8, "logprobs": 2})
        done = mpinfer(ranks, "run", job, *[x for s in sets for x in ("--set", s)])
        assert done.returncode == 0, done.stderr
        return read_rows(out)

    reference = run(1)
    assert reference["output_text"][0] == "The capital of France is Paris."
    return reference, run


@pytest.mark.parametrize("ranks, sets", [
    (3, ["parallel.tp=3"]),                      # 9 heads and 3 KV heads over 3 ranks, vocabulary 49152 / 3
    (2, ["parallel.pp=2"]),                      # 30 layers: 15 + 15
    (3, ["parallel.pp=3"]),
    (6, ["parallel.tp=3", "parallel.pp=2"]),
])
def test_smollm2_layouts_match_one_rank(smollm2_rows, ranks, sets):
    reference, run = smollm2_rows
    assert_same(run(ranks, *sets), reference)
