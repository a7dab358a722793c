"""Tensor and pipeline parallelism on this machine, with `mpinfer run` jobs:

- memory and checkpoint bytes per rank (from the results file's `ranks.loaded`) for
  SmolLM2 on 1 rank, tp=3 and pp=2;
- the pipeline's stage idle fraction with 1, 2 and 4 micro-batches in flight (pp=2), next
  to the (P-1)/P bubble of a pipeline without micro-batching;
- TP=2 against TP=1 step time (decode tokens/s after start-up) on a random model of
  SmolLM2's size with 8 heads (SmolLM2's 9 heads do not split in 2).

    .venv/bin/python tests/bench/bench_parallel.py   # writes tests/bench/results/<date>-<host>-parallel.json

Not a test: timings vary with the machine's load.
"""

import json
import os
import subprocess
import sys
import tempfile

import h5py

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
import conftest  # noqa: E402
from report import header, save  # noqa: E402

from mpinfer.fetch import fetch_smollm2  # noqa: E402

BIN = os.path.dirname(sys.executable)
# SmolLM2's sizes with 8 heads instead of 9
SMOL8 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=8,
             num_key_value_heads=2, max_position_embeddings=8192, tie_word_embeddings=True)
QUESTIONS = [f"Write two sentences about the number {i}." for i in range(16)]


def run(folder, model, ranks, *sets, new_tokens=24):
    """`mpinfer run` on the questions; the results file's root attributes."""
    prompts = os.path.join(folder, "p.jsonl")
    with open(prompts, "w") as f:
        f.writelines(json.dumps({"messages": [{"role": "user", "content": q}]}) + "\n" for q in QUESTIONS)
    job = os.path.join(folder, "job.toml")
    with open(job, "w") as f:
        f.write(f'[model]\npath = "{model}"\n[input]\npath = "p.jsonl"\n[output]\npath = "r.h5"\n'
                f'[sampling]\nmax_new_tokens = {new_tokens}\n[engine]\nkv_cache_gb = 0.25\n')
    cmd = [os.path.join(BIN, "mpiexec"), "-n", str(ranks), os.path.join(BIN, "mpinfer"), "run", job, "--overwrite"]
    for s in sets:
        cmd += ["--set", s]
    subprocess.run(cmd, check=True, capture_output=True)
    with h5py.File(os.path.join(folder, "r.h5"), "r") as f:
        return {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}


def decode_rate(attrs):
    return attrs["generated_tokens"] / (attrs["wall_s"] - attrs["startup_s"])


def main():
    smollm2 = fetch_smollm2()
    report = header(len(os.sched_getaffinity(0)))
    with tempfile.TemporaryDirectory() as tmp:
        memory = {}
        for name, ranks, sets in (("1 rank", 1, ()), ("tp=3", 3, ("parallel.tp=3",)), ("pp=2", 2, ("parallel.pp=2",))):
            loaded = json.loads(run(tmp, smollm2, ranks, *sets, new_tokens=4)["ranks.loaded"])
            memory[name] = [{k: round(v, 1) for k, v in r.items()} for r in loaded]
        one = memory["1 rank"][0]
        report["smollm2_per_rank_MiB"] = memory
        report["smollm2_ratio_to_one_rank"] = {
            name: {k: round(max(r[k] for r in ranks) / one[k], 3) for k in ("weights_mib", "read_mib", "peak_rss_mib")}
            for name, ranks in memory.items() if name != "1 rank"}

        pipeline = {}
        for m in (1, 2, 4):
            attrs = run(tmp, smollm2, 2, "parallel.pp=2", f"parallel.micro_batches={m}")
            pipeline[f"micro_batches={m}"] = {"idle_fraction": round(attrs["pp.idle_fraction"], 3),
                                              "stage_busy_s": json.loads(attrs["pp.stage_busy_s"]),
                                              "decode_tok_per_s": round(decode_rate(attrs), 1)}
        report["smollm2_pp2"] = {"bubble_without_micro_batches": 0.5, **pipeline}

        folder = os.path.join(tmp, "model")
        conftest.ARCHS["llama_smol8"] = SMOL8
        conftest.build_hf_model("llama_smol8", folder)
        tp = {n: decode_rate(run(tmp, folder, n, f"parallel.tp={n}")) for n in (1, 2)}
        report["random_smollm2_size_8_heads"] = {"tp1_tok_per_s": round(tp[1], 1), "tp2_tok_per_s": round(tp[2], 1),
                                                 "tp2_over_tp1": round(tp[2] / tp[1], 3)}
    save(report, "parallel")


if __name__ == "__main__":
    main()
