"""Mixture-of-experts throughput on this machine: a random Mixtral-shaped model (8 experts,
top-2, hidden 512, expert size 1024, 6 layers), 32 prompts of 48 token ids, 32 new tokens,
greedy. transformers `generate` (batch 32, float32, all cores) in the same run is the
baseline; then `mpinfer run` on 1 rank and on 2 ranks as data-parallel replicas (ep 1), EP
across the 2 replicas (ep 2: tokens move by all-to-all), tensor parallel (tp 2) and EP
inside it (tp 2, ep 2). Reports decode tokens/s after start-up, the ratio to transformers,
the tokens that equal transformers', the all-to-all bytes per MoE layer and token and the
expert load imbalance.

    .venv/bin/python tests/bench/bench_moe.py   # writes tests/bench/results/<date>-<host>-moe.json

Not a test: timings vary with the machine's load.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

import h5py
import numpy as np

THREADS = len(os.sched_getaffinity(0))
os.environ.setdefault("OPENBLAS_NUM_THREADS", str(THREADS))

import torch  # noqa: E402  (after the BLAS thread count is set)

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
import conftest  # noqa: E402
from report import header, save  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from mpinfer.io.results import read_rows  # noqa: E402

BIN = os.path.dirname(sys.executable)
NEW, PROMPTS, LENGTH = 32, 32, 48
SHAPE = dict(vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=8,
             num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=1024,
             rope_theta=1e6)
LAYOUTS = {"1 rank": (1, ()), "dp 2": (2, ()), "ep 2 across 2 replicas": (2, ("parallel.ep=2",)),
           "tp 2": (2, ("parallel.tp=2",)), "tp 2 x ep 2 inside": (2, ("parallel.tp=2", "parallel.ep=2"))}


def run(folder, model, prompts, ranks, sets):
    path = os.path.join(folder, "p.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps({"id": str(i), "input_ids": p}) + "\n" for i, p in enumerate(prompts))
    job = os.path.join(folder, "job.toml")
    with open(job, "w") as f:
        f.write(f'[model]\npath = "{model}"\n[input]\npath = "p.jsonl"\n[output]\npath = "r.h5"\n'
                f'[sampling]\nmax_new_tokens = {NEW}\n[engine]\nkv_cache_gb = 0.25\n')
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}  # mpinfer shares the cores
    cmd = [os.path.join(BIN, "mpiexec"), "-n", str(ranks), os.path.join(BIN, "mpinfer"), "run", job, "--overwrite"]
    subprocess.run(cmd + [x for s in sets for x in ("--set", s)], check=True, env=env, capture_output=True)
    out = os.path.join(folder, "r.h5")
    with h5py.File(out, "r") as f:
        attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
        imbalance = f["moe/imbalance"][()].round(3).tolist()
    return attrs, imbalance, [list(x) for x in read_rows(out)["output_ids"]]


def main():
    torch.set_num_threads(THREADS)
    report = header(THREADS)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, SHAPE["vocab_size"], LENGTH).tolist() for _ in range(PROMPTS)]
    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "model")
        conftest.ARCHS["mixtral_bench"] = SHAPE
        conftest.build_hf_model("mixtral_bench", model)
        ref = AutoModelForCausalLM.from_pretrained(model).eval()
        eos = ref.config.eos_token_id
        ids = torch.tensor(prompts)
        with torch.no_grad():
            ref.generate(input_ids=ids[:2], max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm up
            t = time.perf_counter()
            gen = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                               do_sample=False, pad_token_id=0, eos_token_id=eos)
            t_ref = time.perf_counter() - t
        out_ref = [row[: row.index(eos) + 1] if eos in row else row for row in gen[:, LENGTH:].tolist()]
        rate_ref = sum(map(len, out_ref)) / t_ref
        report["model"] = SHAPE
        report["transformers_generate"] = {"tok_per_s": round(rate_ref, 1), "seconds": round(t_ref, 2)}
        for name, (ranks, sets) in LAYOUTS.items():
            attrs, imbalance, out = run(tmp, model, prompts, ranks, sets)
            rate = attrs["generated_tokens"] / (attrs["wall_s"] - attrs["startup_s"])
            fed = attrs["prompt_tokens"] + attrs["generated_tokens"] - PROMPTS  # tokens through each MoE layer
            entry = {"ranks": ranks, "decode_tok_per_s": round(rate, 1), "ratio_to_transformers": round(rate / rate_ref, 3),
                     "same_tokens_as_transformers": sum(a == b for a, b in zip(out, out_ref)),
                     "expert_imbalance_per_layer": imbalance}
            if "comm.ep.all_to_all.remote_bytes" in attrs:  # rank 0's share: half the tokens of 2 ranks
                layers = SHAPE["num_hidden_layers"]
                entry["rank0_all_to_all_bytes_left_per_layer_and_token"] = round(
                    attrs["comm.ep.all_to_all.remote_bytes"] / layers / (fed / ranks), 1)
                entry["if_uniform_2x_(ep-1)/ep_x_topk_x_d_x_4"] = 2 * 0.5 * 2 * SHAPE["hidden_size"] * 4
            report[name] = entry
    save(report, "moe")


if __name__ == "__main__":
    main()
