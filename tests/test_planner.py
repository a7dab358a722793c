"""The layout planner: the chapter's worked numbers (DESIGN.md section 4), the layouts it
recommends for the preset models and clusters, the cost model's formulas, `mpinfer plan`
(table, --json, --emit-sbatch, one-line errors) and calibration under a real mpiexec."""

import json
import os
import subprocess
import sys

import pytest

from mpinfer import planner
from mpinfer.calibrate import fit, load_links
from mpinfer.costmodel import (Layout, Workload, all_reduce_time, all_to_all_time, estimate, memory, stage_step,
                               total_params)
from mpinfer.errors import UserError
from mpinfer.mapping import Mapping
from mpinfer.presets import GB, INTRA, MODELS

BIN = os.path.dirname(sys.executable)
LLAMA8, LLAMA70, LLAMA405 = MODELS["llama3-8b"], MODELS["llama3-70b"], MODELS["llama3-405b"]


def best(cfg, nodes, objective="throughput", work=Workload(), **cluster):
    return planner.rank(cfg, work, planner.cluster(nodes, 8, **cluster), objective)[0].layout


def nodes_of(ranks, per_node=8):
    return {r // per_node for r in ranks}


# ----- the chapter's worked numbers --------------------------------------------------------

def test_70b_tp8_all_reduce_bytes_per_decoded_token():
    """"A 70B model (d = 8192) with TP = 8 moves about 32 KB per all-reduce per decoded token
    in 16-bit". Precisely: an all-reduce's payload is one token's hidden state, d x 2 bytes =
    16,384 B; a ring all-reduce sends and receives 2 (T-1)/T of it per rank, 2 x 7/8 x 16,384
    = 28,672 B (28 KiB) at T = 8. "About 32 KB" is the ring's 2 x d x 2 = 32,768 B, the limit
    of 2 (T-1)/T -> 2 for large T, 12.5% above the T = 8 figure. Each layer does two such
    all-reduces (attention output, MLP down): 57,344 ring bytes per layer and token. The
    cost model charges exactly these bytes."""
    d, payload = LLAMA70.hidden_size, LLAMA70.hidden_size * 2
    assert d == 8192 and payload == 16_384
    ring = 2 * (8 - 1) / 8 * payload
    assert ring == 28_672 and 2 * d * 2 == 32_768 and ring / 32_768 == 0.875
    cluster = planner.cluster(1, 8)
    nvlink = INTRA["nvlink"]
    assert all_reduce_time(cluster, payload, 8) == pytest.approx(14 * nvlink.step_latency + ring / nvlink.bus_bandwidth)
    # one decoded token through the whole model: 2 all-reduces per layer + 1 for the embedding
    step = stage_step(LLAMA70, Workload(batch=1), cluster, Layout(tp=8), 1, 1, 1024, False)
    calls = 2 * LLAMA70.num_layers + 1
    assert step["tp"] == pytest.approx(calls * all_reduce_time(cluster, payload, 8))


def test_70b_in_16_bit_does_not_fit_one_80gb_gpu():
    params, _ = total_params(LLAMA70)
    assert 70.0e9 < params < 71.0e9  # 70.55B: Llama-3-70B's config
    mem = memory(LLAMA70, Workload(batch=1, prompt_len=1, gen_len=1), Layout(), 1)
    assert mem["weights"] == pytest.approx(params * 2) and mem["weights"] > 80 * GB
    assert not estimate(LLAMA70, Workload(batch=1), planner.cluster(1, 1), Layout()).fits
    with pytest.raises(UserError, match="no layout of 1 x 1 H100 SXM 80GB holds the model"):
        planner.rank(LLAMA70, Workload(batch=1), planner.cluster(1, 1))


def test_70b_on_two_nodes_tp8_inside_pp2_across():
    """One replica over 2 x 8 H100 is fastest with TP = 8 inside each node (NVLink) and PP = 2
    across the nodes: the latency plan, and the only kind of plan for 405B, which needs both
    nodes' memory. For throughput with 1024 + 256 token requests the model splits 70B
    smaller, 4 replicas of tp 4 (TP = 8's all-reduces cost 26% of its time against 12%)."""
    assert best(LLAMA70, 2, "latency") == Layout(dp=1, tp=8, pp=2, micro_batches=2)
    m = Mapping(16, 0, tp=8, pp=2, ranks_per_node=8)
    assert nodes_of(m.tp_group) == {0} and nodes_of(m.pp_group) == {0, 1}
    for objective in planner.OBJECTIVES:
        assert best(LLAMA405, 2, objective) == Layout(dp=1, tp=8, pp=2, micro_batches=2)
    assert best(LLAMA70, 2, "throughput") == Layout(dp=4, tp=4, pp=1, micro_batches=1)


def test_8b_on_one_node_for_throughput_is_data_parallel():
    top, second = planner.rank(LLAMA8, Workload(), planner.cluster(1, 8))[:2]
    assert top.layout == Layout(dp=8, tp=1, pp=1, micro_batches=1)
    assert top.parts["tp"] == top.parts["pp"] == 0 and second.throughput < top.throughput


def test_tp16_across_nodes_is_never_preferred_over_tp8_pp2():
    """The planner never offers TP across nodes (mapping.py refuses it), and the cost model
    itself rates TP = 16 over 2 nodes below TP = 8 x PP = 2 for every batch, length, network
    and objective tried: its all-reduces take 30 ring steps, two over the network, where
    TP = 8's take 14 over NVLink."""
    assert all(lay.tp <= 8 for lay in planner.layouts(LLAMA70, planner.cluster(2, 8)))
    for inter in ("ib-ndr", "ib-hdr", "roce"):
        cluster = planner.cluster(2, 8, inter=inter)
        for batch in (1, 8, 32, 128, 512):
            for prompt, gen in ((128, 128), (1024, 256), (8192, 1024)):
                work = Workload(batch=batch, prompt_len=prompt, gen_len=gen)
                tp16 = estimate(LLAMA70, work, cluster, Layout(tp=16))
                tp8pp2 = estimate(LLAMA70, work, cluster, Layout(tp=8, pp=2, micro_batches=2))
                assert tp16.request_s > tp8pp2.request_s and tp16.throughput < tp8pp2.throughput, (inter, work)


@pytest.mark.parametrize("nodes", [4, 8])
def test_moe_on_several_nodes_uses_ep_across_nodes_with_tp_inside(nodes):
    """A DeepSeek-V3-sized MoE (256 experts, 1.35 TB of 16-bit weights) on 4 and 8 nodes of
    8 H100: EP across replicas (ep a multiple of tp), its group spanning nodes, TP inside one."""
    lay = best(MODELS["deepseek-v3-sized"], nodes)
    assert lay.ep > lay.tp and lay.ep % lay.tp == 0, lay
    m = Mapping(nodes * 8, 0, tp=lay.tp, pp=lay.pp, cp=lay.cp, ep=lay.ep, ranks_per_node=8)
    assert len(nodes_of(m.ep_group)) > 1 and len(nodes_of(m.tp_group)) == 1


# ----- the cost model's pieces -------------------------------------------------------------

def test_memory_splits_experts_by_ep_and_the_rest_by_tp_and_pp():
    """Mixtral 8x7B: every layer's 8 experts of 3 x 4096 x 14336 over max(tp, ep) ranks, the
    rest (attention, router, embedding and head, vocab-parallel) over tp; the KV cache of
    (prompt + generated) tokens x 32 layers x K and V of the rank's KV heads x 2 bytes."""
    cfg, work = MODELS["mixtral-8x7b"], Workload(batch=4, prompt_len=100, gen_len=28)
    d, q, kv = 4096, 4096, 8 * 128
    experts = 32 * 8 * 3 * d * 14336
    rest = 32 * (2 * d * q + 2 * d * kv + 8 * d) + 2 * 32000 * d
    for tp, ep in ((2, 1), (2, 2), (2, 8), (4, 2)):
        mem = memory(cfg, work, Layout(tp=tp, ep=ep), 4)
        assert mem["weights"] == pytest.approx((rest / tp + experts / max(tp, ep)) * 2)
        assert mem["kv"] == pytest.approx(4 * 128 * 32 * 2 * 128 * (8 // tp) * 2)
    pp2 = memory(cfg, work, Layout(pp=2, micro_batches=2), 4)  # 16 layers + embedding | 16 + head
    assert pp2["weights"] == pytest.approx((16 * (rest / 32 - 2 * 32000 * d / 32 + experts / 32) + 32000 * d) * 2)


def test_pipeline_bubble_without_and_with_micro_batches():
    """With one micro-batch a request of 1-token prompts spends (P-1)/P of its time in the
    bubble (DESIGN.md); with M = P micro-batches decode has none, and the prefill bubble is
    (P-1)/(m+P-1) of the prefill."""
    work, cluster = Workload(batch=8, prompt_len=1, gen_len=64), planner.cluster(1, 4)
    one = estimate(LLAMA8, work, cluster, Layout(pp=4, micro_batches=1))
    assert one.parts["bubble"] / one.request_s == pytest.approx(3 / 4)
    four = estimate(LLAMA8, work, cluster, Layout(pp=4, micro_batches=4))
    prefill_step = four.ttft_s / (4 + 3)
    assert four.parts["bubble"] == pytest.approx(3 * prefill_step)
    assert four.tpot_s < one.tpot_s


def test_ep_all_to_all_moves_routed_rows_with_skew():
    """An EP group of 16 over 2 nodes: (T-1) latencies per call, the rows to the other 8 ranks
    over the NIC, to the 7 on my node over NVLink, at once."""
    cluster = planner.cluster(2, 8)
    nbytes = 1e6
    t = all_to_all_time(cluster, nbytes, 16, 2, calls=3, moving=2)
    far = 8 / 15
    assert t == pytest.approx(3 * 15 * cluster.inter.step_latency
                              + 2 * max(nbytes * (1 - far) / cluster.intra.bandwidth, nbytes * far / cluster.inter.bandwidth))


def test_choose_layout_for_parallel_auto():
    tp, pp, ep, cp, why = planner.choose_layout(LLAMA70, 16, 8, 80 * GB, objective="latency")
    assert (tp, pp, ep, cp) == (8, 2, 1, 1) and why.startswith("Best for latency: pp 2 x tp 8")
    # 24 GB GPUs cannot hold the 8B model's 16 GB of weights with 128 sequences alone
    tp, pp, ep, cp, why = planner.choose_layout(LLAMA8, 8, 8, 24 * GB)
    assert tp * pp > 1 and "Against the runner-up" in why


def test_explanation_names_the_dominant_cost_and_the_runner_up():
    ranked = planner.rank(LLAMA70, Workload(), planner.cluster(2, 8), "latency")
    text = planner.explain(ranked, "latency", Workload())
    assert f"{planner.NAMES[ranked[0].dominant]} dominates" in text
    assert f"Against the runner-up, {ranked[1].layout}" in text and "shorter requests" in text


# ----- mpinfer plan --------------------------------------------------------------------------

def plan(*args, **kw):
    return subprocess.run([os.path.join(BIN, "mpinfer"), "plan", *args], capture_output=True, text=True, timeout=120,
                          **kw)


def test_plan_table_and_json_agree():
    args = ["--model", "llama3-8b", "--nodes", "1", "--gpus-per-node", "8"]
    done = plan(*args)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("llama3-8b on 1 x 8 H100 SXM 80GB")
    assert lines[2].split()[:6] == ["1", "dp", "8", "x", "tp", "1"]
    assert "Best for throughput: dp 8 x tp 1 (8 replicas of 1 GPU" in done.stdout
    data = json.loads(plan(*args, "--json").stdout)
    top = data["layouts"][0]
    assert (top["dp"], top["tp"], top["pp"]) == (8, 1, 1) and f"{top['throughput_tok_s']:,.0f}" in lines[2]
    assert data["explanation"] in done.stdout and data["workload"]["batch"] == 128


def test_plan_emits_a_batch_script(tmp_path):
    script = tmp_path / "plan.sbatch"
    done = plan("--model", "llama3-70b", "--nodes", "2", "--objective", "latency", "--emit-sbatch", str(script))
    assert done.returncode == 0, done.stderr
    text = script.read_text()
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "srun --mpi=pmi2 --distribution=block --gpus-per-task=1 mpinfer run \"$JOB\" --set parallel.tp=8 "
                 "--set parallel.pp=2 --set parallel.ep=1 --set parallel.cp=1 --set parallel.micro_batches=2 "
                 "--set engine.max_seqs=128"):
        assert line in text
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


def test_plan_reads_a_hugging_face_folder_and_a_gguf(tiny_model, smollm2):
    done = plan("--model", tiny_model("llama"), "--gpus-per-node", "2", "--batch", "4", "--prompt-len", "100")
    assert done.returncode == 0 and "Best for throughput" in done.stdout, done.stderr
    done = plan("--model", smollm2, "--gpus-per-node", "3", "--json")  # 9 heads: tp 1 or 3
    assert done.returncode == 0, done.stderr
    assert {lay["tp"] for lay in json.loads(done.stdout)["layouts"]} == {1, 3}


@pytest.mark.parametrize("args,message", [
    (["--nodes", "1"], "plan: --model is required"),
    (["--model", "llama3-9b"], "unknown model 'llama3-9b'"),
    (["--model", "llama3-8b", "--gpu", "b200"], "unknown GPU 'b200'; one of h100, h200, a100, mi300x"),
    (["--model", "llama3-8b", "--inter", "ethernet"], "unknown inter-node link 'ethernet'"),
    (["--model", "llama3-8b", "--nodes", "two"], "plan: Invalid value for '--nodes': 'two' is not a valid integer"),
    (["--model", "llama3-8b", "--nodes", "0"], "nodes must be at least 1, got 0"),
    (["--model", "llama3-8b", "--batch", "0"], "plan: --batch must be at least 1, got 0"),
    (["--model", "llama3-8b", "--objective", "cost"], "objective 'cost' is not one of throughput, latency"),
    (["--model", "llama3-8b", "--colour"], "plan: No such option '--colour'"),
    (["--model", "llama3-405b", "--gpus-per-node", "1"], "no layout of 1 x 1 H100 SXM 80GB holds the model"),
    (["--model", "llama3-8b", "--profile", "missing.json"], "missing.json: cannot read the profile"),
])
def test_plan_bad_arguments_are_one_line(args, message):
    done = plan(*args)
    assert done.returncode == 2, done.stdout
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("mpinfer: error: ") and message in done.stderr


# ----- calibration ---------------------------------------------------------------------------

def test_fit_recovers_latency_and_bandwidth():
    points = [[n, 5e-6 + n / 2e9] for n in (8, 512, 32768, 2**21)]
    latency, bandwidth, worst = fit(points)
    assert latency == pytest.approx(5e-6) and bandwidth == pytest.approx(2e9) and worst < 1e-9


@pytest.mark.parametrize("ranks_per_node,kind", [(None, "intra"), ("1", "inter")])
def test_calibrate_under_mpiexec(tmp_path, ranks_per_node, kind):
    """2 ranks on one node measure the intra-node link; pretending each rank is a node, the
    inter-node one. The profile is written by rank 0 and `plan --profile` uses its link. Sizes
    up to 512 KiB, where the bytes outweigh the latency even on a busy machine."""
    env = {k: v for k, v in os.environ.items() if k != "MPINFER_RANKS_PER_NODE"}
    if ranks_per_node:
        env["MPINFER_RANKS_PER_NODE"] = ranks_per_node
    out = tmp_path / "profile.json"
    done = subprocess.run([os.path.join(BIN, "mpiexec"), "-n", "2", os.path.join(BIN, "mpinfer"), "plan", "--calibrate",
                           "--out", str(out), "--max-bytes", "524288"], capture_output=True, text=True, timeout=120,
                          env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("wrote") == 1 and f"{kind}  mpi" in done.stdout
    profile = json.loads(out.read_text())
    measured = profile["links"][kind]["mpi"]
    assert list(profile["links"]) == [kind] and profile["world"] == 2
    assert [n for n, _ in measured["p2p"]["points"]] == [8 * 4**k for k in range(9)]  # 8 B .. 512 KiB
    assert measured["all_reduce"]["ranks"] == 2
    link = load_links(str(out))[kind]
    assert link.latency > 0 and link.bandwidth > 0 and link.step_latency > 0 and link.bus_bandwidth > 0
    assert link.step_latency == pytest.approx(measured["all_reduce"]["latency_s"] / 2)
    done = plan("--model", "llama3-8b", "--nodes", "2", "--profile", str(out))
    assert done.returncode == 0 and f"{kind}-node mpi, measured" in done.stdout.splitlines()[0], done.stderr


def test_calibrate_needs_two_ranks(tmp_path):
    done = plan("--calibrate", "--out", str(tmp_path / "p.json"))
    assert done.returncode == 2 and "run it on 2 or more" in done.stderr and done.stderr.count("\n") == 1
