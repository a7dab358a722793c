"""Context parallelism on this machine: prefill time of one prompt against its length for
cp=1 (one rank, all cores) and cp=2 (two ranks, a core each) with ring attention and with
Ulysses, as `mpinfer run` jobs on a tiny Qwen3 (4 heads, 2 KV heads, head dim 32, 3 layers,
so attention dominates at these lengths); and the bytes each CP rank sent per layer against
the chapter's O(S/C * d): the ring passes its K/V share, (C-1) hops of S/C * 2 * Hkv * Dh *
4 bytes; Ulysses sends (C-1)/C of its q, k, v and outputs by all-to-all.

    .venv/bin/python tests/bench/bench_context.py   # writes tests/bench/results/<date>-<host>-context.json

Prefill time is the request's time to first token (ttft_s, one generated token). Not a
test: timings vary with the machine's load.
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

from mpinfer.io.results import read_rows  # noqa: E402

BIN = os.path.dirname(sys.executable)
LENGTHS = (256, 1024, 2048, 4096)
LAYOUTS = {"cp=1": (1, ()), "cp=2 ring": (2, ("parallel.cp=2",)),
           "cp=2 ulysses": (2, ("parallel.cp=2", "parallel.cp_method=ulysses"))}


def prefill(folder, model, length, ranks, sets):
    """(ttft_s, root attributes) of a one-prompt job."""
    ids = np.random.default_rng(length).integers(3, 300, length).tolist()
    with open(os.path.join(folder, "p.jsonl"), "w") as f:
        f.write(json.dumps({"id": "p", "input_ids": ids}) + "\n")
    job = os.path.join(folder, "job.toml")
    with open(job, "w") as f:
        f.write(f'[model]\npath = "{model}"\n[input]\npath = "p.jsonl"\n[output]\npath = "r.h5"\n'
                '[sampling]\nmax_new_tokens = 1\n[parallel]\ncp_threshold = 128\n[engine]\nmax_batch_tokens = 4096\n')
    cmd = [os.path.join(BIN, "mpiexec"), "-n", str(ranks), os.path.join(BIN, "mpinfer"), "run", job, "--overwrite"]
    subprocess.run(cmd + [x for s in sets for x in ("--set", s)], check=True, capture_output=True)
    out = os.path.join(folder, "r.h5")
    with h5py.File(out, "r") as f:
        attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
    return float(read_rows(out)["ttft_s"][0]), attrs


def main():
    report = header(len(os.sched_getaffinity(0)))
    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "model")
        conftest.build_hf_model("qwen3_long", model)
        cfg = {**conftest.TINY, **conftest.MORE["qwen3_long"]}
        layers, d_kv = cfg["num_hidden_layers"], cfg["num_key_value_heads"] * cfg["head_dim"]
        rows = []
        for length in LENGTHS:
            row = {"prompt_tokens": length}
            for name, (ranks, sets) in LAYOUTS.items():
                prefill(tmp, model, length, ranks, sets)  # warm the page cache and imports
                ttft, attrs = prefill(tmp, model, length, ranks, sets)
                row[f"{name} prefill_s"] = round(ttft, 4)
                if "ring" in name:
                    row["ring bytes sent per layer (rank 0)"] = attrs["comm.cp.send.bytes"] // layers
                    row["ring O(S/C*d): (C-1) * S/C * 2 * d_kv * 4"] = length // 2 * 2 * d_kv * 4
                if "ulysses" in name:
                    row["ulysses bytes left per layer (rank 0)"] = attrs["comm.cp.all_to_all.remote_bytes"] // layers
            row["cp=2 ring / cp=1 time"] = round(row["cp=2 ring prefill_s"] / row["cp=1 prefill_s"], 3)
            row["cp=2 ulysses / cp=1 time"] = round(row["cp=2 ulysses prefill_s"] / row["cp=1 prefill_s"], 3)
            rows.append(row)
        report["model"] = "tiny qwen3: 3 layers, hidden 96, 4 heads, 2 KV heads, head dim 32"
        report["prefill"] = rows
    save(report, "context")


if __name__ == "__main__":
    main()
