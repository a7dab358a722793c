"""Offline batch throughput on the real SmolLM2-135M-Instruct: 64 chat prompts, 64 new tokens,
greedy. mpinfer's engine (continuous batching, paged KV cache) next to transformers
`generate` with batching (left padding), same prompts, same machine and thread count, in the
same run; then `mpinfer run` end to end on 1 and on 2 MPI ranks (data parallel).

    .venv/bin/python tests/bench/bench_batch.py   # writes tests/bench/results/<date>-<host>-batch.json

Ratios > 1 mean mpinfer is faster. Not a test: timings vary with the machine's load.
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
from report import header, save  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from mpinfer.backend import get_backend  # noqa: E402
from mpinfer.params import SamplingParams  # noqa: E402
from mpinfer.engine.scheduler import Scheduler  # noqa: E402
from mpinfer.fetch import fetch_smollm2  # noqa: E402
from mpinfer.io.prompts import Request  # noqa: E402
from mpinfer.io.results import read_rows  # noqa: E402
from mpinfer.kvcache import PagedKVCache  # noqa: E402
from mpinfer.model import Decoder  # noqa: E402
from mpinfer.tokenizer import load_tokenizer  # noqa: E402
from mpinfer.weights import open_checkpoint  # noqa: E402

NEW = 64
TOPICS = ["photosynthesis", "the water cycle", "black holes", "the French revolution", "vaccines", "plate tectonics",
          "compound interest", "recursion", "the immune system", "volcanoes", "supply and demand", "gravity",
          "the internet", "DNA", "climate", "electricity"]
FORMS = ["Explain {} in simple terms.", "What is the most important fact about {}?",
         "Write a short paragraph about {}.", "Give me three questions a student might ask about {}."]
QUESTIONS = [form.format(topic) for form in FORMS for topic in TOPICS]  # 64


def ours(model, tokenizer, prompts):
    pool = PagedKVCache.for_model(model, 2**30, 16, model.config.num_layers)
    sched = Scheduler(model, tokenizer, pool, max_batch_tokens=512, max_seqs=128)
    sched.add([Request(i, str(i), np.asarray(p, np.int32), SamplingParams(max_new_tokens=NEW)) for i, p in enumerate(prompts)])
    out = {}
    t = time.perf_counter()
    while not sched.idle:
        for r in sched.step():
            out[r["index"]] = r["output_ids"]
    return time.perf_counter() - t, [out[i] for i in range(len(prompts))]


def transformers_generate(model, prompts, pad, eos, batch):
    outs, t = [], time.perf_counter()
    for start in range(0, len(prompts), batch):
        part = prompts[start : start + batch]
        width = max(map(len, part))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in part])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in part])
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                                 pad_token_id=pad, eos_token_id=eos)
        for row in gen[:, width:].tolist():  # cut after the first EOS, as mpinfer stops there
            outs.append(row[: row.index(eos) + 1] if eos in row else row)
    return time.perf_counter() - t, outs


def end_to_end(path, ranks, folder):
    """`mpinfer run` on `ranks` ranks: (wall time of the command, generated tokens per second
    after start-up as the results file's metrics give them, the rows)."""
    prompts = os.path.join(folder, "p.jsonl")
    with open(prompts, "w") as f:
        for i, q in enumerate(QUESTIONS):
            f.write(json.dumps({"id": str(i), "messages": [{"role": "user", "content": q}]}) + "\n")
    job = os.path.join(folder, "job.toml")
    with open(job, "w") as f:
        f.write(f'[model]\npath = "{path}"\n[input]\npath = "p.jsonl"\n[output]\npath = "r{ranks}.h5"\n'
                f'[sampling]\nmax_new_tokens = {NEW}\n')
    bin_ = os.path.dirname(sys.executable)
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}  # mpinfer shares the cores
    t = time.perf_counter()
    subprocess.run([os.path.join(bin_, "mpiexec"), "-n", str(ranks), os.path.join(bin_, "mpinfer"), "run", job],
                   check=True, env=env, capture_output=True)
    wall = time.perf_counter() - t
    results = os.path.join(folder, f"r{ranks}.h5")
    with h5py.File(results, "r") as f:
        rate = f.attrs["generated_tokens"] / (f.attrs["wall_s"] - f.attrs["startup_s"])
    return wall, float(rate), read_rows(results)


def main():
    torch.set_num_threads(THREADS)
    path = fetch_smollm2()
    folder, name = os.path.split(path)
    ckpt = open_checkpoint(path)
    tokenizer = load_tokenizer(path, ckpt)
    model = Decoder(ckpt, get_backend("numpy"))
    prompts = [tokenizer.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    ref = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    ref_tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    eos = ref_tok.eos_token_id
    pad = ref_tok.pad_token_id if ref_tok.pad_token_id is not None else eos

    ours(model, tokenizer, prompts[:4])  # warm up both
    transformers_generate(ref, prompts[:4], pad, eos, 4)
    t_ours, out_ours = ours(model, tokenizer, prompts)
    runs = {b: transformers_generate(ref, prompts, pad, eos, b) for b in (64, 16)}
    best = min(runs, key=lambda b: runs[b][0])
    t_ref, out_ref = runs[best]
    tokens_ours, tokens_ref = sum(map(len, out_ours)), sum(map(len, out_ref))
    same = sum(a == b for a, b in zip(out_ours, out_ref))
    prefix = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))) for a, b in zip(out_ours, out_ref)]

    with tempfile.TemporaryDirectory() as tmp:
        e2e = {n: end_to_end(path, n, tmp) for n in (1, 2)}
    ref_rate = tokens_ref / t_ref
    report = {
        **header(THREADS),
        "threads": THREADS,
        "model": name,
        "workload": f"{len(prompts)} chat prompts ({sum(map(len, prompts))} prompt tokens), up to {NEW} new tokens, greedy",
        "one_replica_in_process": {
            "note": f"mpinfer's scheduler in this process with {THREADS} BLAS threads vs transformers generate "
                    f"with torch.set_num_threads({THREADS}); generation only (models loaded)",
            "mpinfer_tok_per_s": tokens_ours / t_ours,
            "transformers_tok_per_s": ref_rate,
            "transformers_batch": best,
            "transformers_tok_per_s_by_batch": {b: sum(map(len, o)) / t for b, (t, o) in runs.items()},
            "ratio": (tokens_ours / t_ours) / ref_rate,
            "identical_outputs": f"{same}/{len(prompts)}",
            "tokens_before_first_difference": f"{sum(prefix)}/{tokens_ref}",
        },
        "mpinfer_run": {
            "note": "`mpiexec -n N mpinfer run` on the same prompts (ranks share the cores: "
                    f"{THREADS}/N BLAS threads each); tok/s after start-up (validation + load), from the results file",
            "ranks_1": {"wall_s": e2e[1][0], "tok_per_s": e2e[1][1], "ratio_to_transformers": e2e[1][1] / ref_rate},
            "ranks_2": {"wall_s": e2e[2][0], "tok_per_s": e2e[2][1], "ratio_to_transformers": e2e[2][1] / ref_rate},
            "dp2_over_dp1": e2e[2][1] / e2e[1][1],
            "same_outputs_as_in_process": all(e2e[n][2]["output_ids"][i].tolist() == out_ours[int(e2e[n][2]["id"][i])]
                                              for n in (1, 2) for i in range(len(prompts))),
        },
    }
    save(report, "batch")


if __name__ == "__main__":
    main()
