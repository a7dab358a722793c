"""Whole models on the GPU against the NumPy backend on the same weights: greedy decoding of
8 prompts x 32 new tokens, all prompts batched in every forward pass (prefill chunks through
the varlen flash kernel, decode steps through the split-KV kernel).

Per prompt the report gives the first generated position where the tokens differ, and
there the gap between the NumPy backend's top two float32 logits next to the largest
|logit difference| between the backends at that step: a divergence is a bf16 rounding
flip when the gap is smaller than that difference (both backends saw the same prefix).
"""

import time

import numpy as np

from mpinfer.kvcache import PagedKVCache
from mpinfer.model import Decoder
from mpinfer.weights import open_checkpoint


def generate(model, prompts, n):
    """Greedy: (tokens (P, n), logits (n, P, V) float32 of each step)."""
    cfg = model.config
    tokens = sum(len(p) for p in prompts) + len(prompts) * n
    pool = PagedKVCache(len(model.blocks), model.kv_heads, cfg.head_dim, tokens // 16 + 2 * len(prompts), 16, model.be)
    seqs = [pool.sequence() for _ in prompts]
    logits = model.forward(np.concatenate(prompts), seqs, [len(p) for p in prompts])
    out, steps = [], []
    for _ in range(n):
        logits = np.asarray(logits, np.float32)
        steps.append(logits)
        out.append(np.argmax(logits, axis=1))
        if len(out) < n:
            logits = model.forward(out[-1], seqs, [1] * len(prompts))
    return np.stack(out, axis=1), np.stack(steps)


def compare(folder, backend, new=32, seed=0, lens=(5, 17, 64, 100, 129, 300, 511, 700)):
    """The report's end-to-end entry for one checkpoint (a folder or a .gguf file): len(lens)
    prompts of random token ids of those lengths, new greedy tokens each; the bytes of
    weights each backend holds (a GGUF's quantized linears stay quantized on the GPU)."""
    rng = np.random.default_rng(seed)
    ckpt = open_checkpoint(folder)
    V = ckpt.config.vocab_size
    prompts_ = [rng.integers(3, V, n) for n in lens]
    runs = {}
    for name, be in (("numpy", "numpy"), ("gpu", backend)):
        from mpinfer.backend import get_backend

        t = time.perf_counter()
        model = Decoder(ckpt, get_backend(be))
        load_s = time.perf_counter() - t
        t = time.perf_counter()
        runs[name] = generate(model, prompts_, new)
        runs[name + "_s"] = (load_s, time.perf_counter() - t, model.be.weight_bytes)
        del model
    (ref_tok, ref_logits), (gpu_tok, gpu_logits) = runs["numpy"], runs["gpu"]
    per_prompt = []
    for i in range(len(prompts_)):
        differ = np.flatnonzero(ref_tok[i] != gpu_tok[i])
        row = {"prompt_tokens": lens[i], "first_difference": int(differ[0]) if len(differ) else None}
        if len(differ):
            p = int(differ[0])
            top2 = np.sort(ref_logits[p, i])[-2:]
            row["top2_gap"] = float(top2[1] - top2[0])
            row["max_logit_diff"] = float(np.max(np.abs(ref_logits[p, i] - gpu_logits[p, i])))
            row["bf16_flip"] = row["top2_gap"] <= row["max_logit_diff"]
        per_prompt.append(row)
    prefill = ref_logits[0]
    return {"model": str(folder), "layers": ckpt.config.num_layers, "vocab": V, "new_tokens": new,
            "tokens_equal": int((ref_tok == gpu_tok).sum()), "tokens_total": int(ref_tok.size),
            "prefill_logits_rel_err": float(np.linalg.norm(gpu_logits[0] - prefill) / np.linalg.norm(prefill)),
            "ok": all(r["first_difference"] is None or r["bf16_flip"] for r in per_prompt),
            "numpy_load_s": runs["numpy_s"][0], "numpy_generate_s": runs["numpy_s"][1],
            "gpu_load_s": runs["gpu_s"][0], "gpu_generate_s": runs["gpu_s"][1],
            "numpy_weight_bytes": runs["numpy_s"][2], "gpu_weight_bytes": runs["gpu_s"][2], "prompts": per_prompt}
