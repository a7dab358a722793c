"""CPU benchmark on the real SmolLM2-135M-Instruct Q4_1 GGUF, mpinfer (NumPy backend) next to
transformers (PyTorch, float32) in the same run: load time, prefill and decode throughput.

    .venv/bin/python tests/bench/bench_smollm2.py      # writes tests/bench/results/<date>-<host>.json

Ratios > 1 mean mpinfer is faster. Not a test: timings vary with the machine's load.
"""

import os
import time

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from report import header, save

from mpinfer.fetch import fetch_smollm2
from mpinfer.kvcache import PagedKVCache
from mpinfer.model import Decoder

PROMPT = 512  # prefill tokens
DECODE = 64  # decode steps after the prefill


def best_of(n, fn):
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main():
    path = fetch_smollm2()
    folder, name = os.path.split(path)
    ids = [int(x) for x in np.random.default_rng(0).integers(100, 40000, PROMPT)]
    load_ours = best_of(3, lambda: Decoder.load(path))
    load_ref = best_of(1, lambda: AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32))
    ours = Decoder.load(path)
    ref = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()

    cfg = ours.config
    pool = PagedKVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, num_blocks=(PROMPT + DECODE) // 16 + 1)

    def ours_run():
        pool.release(cache := pool.sequence())
        ours.forward(ids, [cache], [len(ids)])
        return cache

    def ours_decode():
        cache = ours_run()
        for _ in range(DECODE):
            ours.forward([7], [cache], [1])

    def ref_run():  # prefill, keeping the KV cache as generate does
        with torch.no_grad():
            ref(torch.tensor([ids]), use_cache=True)

    def ref_decode():
        with torch.no_grad():
            ref.generate(torch.tensor([ids]), max_new_tokens=DECODE + 1, min_new_tokens=DECODE + 1, do_sample=False)

    prefill_ours, prefill_ref = best_of(3, ours_run), best_of(3, ref_run)
    decode_ours = (best_of(2, ours_decode) - prefill_ours) / DECODE
    decode_ref = (best_of(2, ref_decode) - prefill_ref) / DECODE
    report = {
        **header(os.cpu_count()),
        "threads": torch.get_num_threads(),
        "model": name,
        "load_s": {"mpinfer": load_ours, "transformers": load_ref, "ratio": load_ref / load_ours},
        f"prefill_{PROMPT}_tok_per_s": {"mpinfer": PROMPT / prefill_ours, "transformers": PROMPT / prefill_ref,
                                        "ratio": prefill_ref / prefill_ours},
        "decode_tok_per_s": {"mpinfer": 1 / decode_ours, "transformers": 1 / decode_ref, "ratio": decode_ref / decode_ours},
    }
    save(report)


if __name__ == "__main__":
    main()
