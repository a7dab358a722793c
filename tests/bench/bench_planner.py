"""The planner's communication predictions against what runs on this machine measure.

1. Calibrate this machine's MPI on 2 ranks (`mpinfer plan --calibrate`, one core per rank as in
   the runs), message sizes up to the largest the runs send.
2. Run a random llama with a wide hidden size (1024, so each token's message is 4 KiB) on 2
   ranks as tp 2 and as pp 2 (tests/bench/counted_run.py keeps every rank's counters and
   times each all-reduce after a barrier that takes up the wait for a late peer).
3. Predict each run's communication time with the cost model (costmodel.all_reduce_time,
   p2p_time) over the calibrated links, from the operations the run counted (calls and bytes;
   the cost model is linear in both), and compare with the seconds the run's comm.Group
   timers measured: for tp 2 the all-reduces (the mean of the two ranks' timers, the wait for
   the peer apart), for pp 2 the activations stage 1 receives (the sender posts them before
   the header that announces them, so the wait is the transfer). The bytes of the cost
   model's per-token formula ((2 layers + 1) all-reduces of d x 4 bytes per token fed; d x 4
   per token over the stage boundary) are set beside the counted.
Calibration and runs are repeated REPEATS times, each calibration right before its runs, since
other work on the machine shifts both; the headline is the median ratio.

    .venv/bin/python tests/bench/bench_planner.py   # writes tests/bench/results/<date>-<host>-planner.json

Not a test: timings vary with the machine's load (recorded in the report).
"""

import json
import os
import subprocess
import sys
import tempfile

import h5py
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
import conftest  # noqa: E402
from report import header, save  # noqa: E402

from mpinfer import calibrate, planner  # noqa: E402
from mpinfer.costmodel import all_reduce_time, p2p_time  # noqa: E402

BIN = os.path.dirname(sys.executable)
HERE = os.path.dirname(__file__)
# a llama whose all-reduces are large enough to time: 4 KiB per token in float32
WIDE = dict(hidden_size=1024, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=8, max_position_embeddings=1024)
PROMPTS, LENGTH, NEW, CHUNK = 16, 96, 24, 64  # CHUNK: engine.max_batch_tokens, so messages stay <= 256 KiB
MAX_BYTES = 512 * 1024
REPEATS = 5


def mpiexec(*args, **env):
    cmd = [os.path.join(BIN, "mpiexec"), "-n", "2", *args]
    return subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, **env})


def run(folder, model, layout):
    """A counted `mpinfer run` of the prompts with one --set; (counters of rank 0 and 1, tokens fed)."""
    rng = np.random.default_rng(0)
    with open(os.path.join(folder, "p.jsonl"), "w") as f:
        for i in range(PROMPTS):
            f.write(json.dumps({"id": str(i), "input_ids": rng.integers(3, 300, LENGTH).tolist()}) + "\n")
    job = os.path.join(folder, "job.toml")
    with open(job, "w") as f:
        f.write(f'[model]\npath = "{model}"\n[input]\npath = "p.jsonl"\n[output]\npath = "r.h5"\n'
                f'[sampling]\nmax_new_tokens = {NEW}\n[engine]\nkv_cache_gb = 0.25\nmax_batch_tokens = {CHUNK}\n')
    mpiexec(sys.executable, "-m", "mpi4py", os.path.join(HERE, "counted_run.py"), job, folder, "--set", layout,
            OPENBLAS_NUM_THREADS="1")  # one core per rank
    counters = []
    for rank in (0, 1):
        with open(os.path.join(folder, f"counters-{rank}.json")) as f:
            counters.append(json.load(f))
    with h5py.File(os.path.join(folder, "r.h5"), "r") as f:
        fed = sum(len(p) for p in f["requests/prompt_ids"]) + sum(len(o) - 1 for o in f["requests/output_ids"])
    return counters, fed


def load():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def calibrated(folder):
    """A fresh calibration: (the planner's cluster of 2 ranks over its links, the fits)."""
    path = os.path.join(folder, "profile.json")
    mpiexec(os.path.join(BIN, "mpinfer"), "plan", "--calibrate", "--out", path, "--max-bytes", str(MAX_BYTES),
            OPENBLAS_NUM_THREADS="1")
    with open(path) as f:
        fits = json.load(f)["links"]["intra"]["mpi"]
    summary = {op: {"latency_us": round(m["latency_s"] * 1e6, 1), "bandwidth_GBps": round(m["bandwidth_Bps"] / 1e9, 3),
                    "fit_max_rel_err": round(m["fit_max_rel_err"], 3),
                    "measured_us": {n: round(t * 1e6, 1) for n, t in m["points"]}} for op, m in fits.items()}
    return planner.cluster(1, 2, links=calibrate.load_links(path, "mpi")), summary


def repeat(tmp, model):
    """Calibrate, then a tp 2 and a pp 2 run: predicted and measured communication seconds."""
    cluster, fits = calibrated(tmp)
    d, layers = WIDE["hidden_size"], WIDE["num_hidden_layers"]
    (tp0, tp1), fed = run(tmp, model, "parallel.tp=2")
    calls, nbytes = tp0["tp.all_reduce.calls"], tp0["tp.all_reduce.bytes"]
    measured = (tp0["tp.all_reduce.seconds"] + tp1["tp.all_reduce.seconds"]) / 2  # the same exchanges, timed on each
    tp = {"calls": calls, "bytes": nbytes, "bytes_from_model": (2 * layers + 1) * d * 4 * fed,
          "mean_bytes_per_call": round(nbytes / calls), "predicted_s": round(all_reduce_time(cluster, nbytes, 2, 1, calls), 5),
          "measured_s_mean_of_ranks": round(measured, 5),
          "measured_s_rank_0_1": [round(tp0["tp.all_reduce.seconds"], 5), round(tp1["tp.all_reduce.seconds"], 5)],
          "wait_for_peer_s_rank_0_1": [round(tp0["tp.peer_wait.seconds"], 5), round(tp1["tp.peer_wait.seconds"], 5)]}
    (pp0, pp1), fed = run(tmp, model, "parallel.pp=2")
    calls, nbytes = pp1["pp.recv.calls"], pp1["pp.recv.bytes"]
    pp = {"calls": calls, "bytes": nbytes, "bytes_sent_by_stage_0": pp0["pp.send.bytes"], "bytes_from_model": d * 4 * fed,
          "mean_bytes_per_call": round(nbytes / calls), "predicted_s": round(p2p_time(cluster.intra, nbytes, calls), 5),
          "measured_s_stage_1_receive": round(pp1["pp.recv.seconds"], 5)}
    for x, measured in ((tp, measured), (pp, pp1["pp.recv.seconds"])):
        x["predicted_over_measured"] = round(x["predicted_s"] / measured, 3)
    # call by call (counted_run.py's samples): is the gap in every call or in a few slow ones?
    for x, samples, one in ((tp, tp0["samples"]["tp.all_reduce"], lambda n: all_reduce_time(cluster, n, 2, 1, 1)),
                            (pp, pp1["samples"]["pp.recv"], lambda n: p2p_time(cluster.intra, n))):
        ratios = np.array([one(n) / t for n, t in samples if t > 0])
        x["per_call_predicted_over_measured_p10_p50_p90"] = [round(float(q), 3) for q in np.percentile(ratios, [10, 50, 90])]
    return {"load_average_1min": load(), "calibration": fits, "tp2_all_reduce": tp, "pp2_activations": pp}


def main():
    report = header(len(os.sched_getaffinity(0)))
    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "model")
        conftest.ARCHS["llama_wide"] = WIDE
        conftest.build_hf_model("llama_wide", model)
        repeats = [repeat(tmp, model) for _ in range(REPEATS)]
    report["predicted_over_measured_median"] = {
        k: float(np.median([r[k]["predicted_over_measured"] for r in repeats])) for k in ("tp2_all_reduce", "pp2_activations")}
    report["repeats"] = repeats
    save(report, "planner")


if __name__ == "__main__":
    main()
