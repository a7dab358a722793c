"""The continuous-batching scheduler in one process: a request's tokens do not depend on its
batch neighbours, the token budget, chunking or preemption; stop rules; logprobs."""

import numpy as np
import pytest
from conftest import hf_logits

from mpinfer.params import SamplingParams
from mpinfer.engine.scheduler import Scheduler
from mpinfer.io.prompts import Request
from mpinfer.kvcache import PagedKVCache
from mpinfer.model import Decoder
from mpinfer.tokenizer import load_tokenizer
from mpinfer.weights import open_checkpoint


@pytest.fixture(scope="module")
def mistral(tiny_model):
    """Sliding window 8: decode attention must mask by window in the batched path too."""
    path = tiny_model("mistral")
    ckpt = open_checkpoint(path)
    return Decoder.load(path), load_tokenizer(path, ckpt), path


def requests(n, params, seed=1):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 60, n)
    return [Request(i, f"r{i}", rng.integers(3, 300, k).astype(np.int32), params) for i, k in enumerate(lengths)]


def run_all(model, tokenizer, reqs, max_batch_tokens=64, max_seqs=16, blocks=64, block_size=4):
    pool = PagedKVCache(model.config.num_layers, model.config.num_kv_heads, model.config.head_dim, blocks, block_size)
    sched = Scheduler(model, tokenizer, pool, max_batch_tokens, max_seqs)
    sched.add(reqs)
    out = {}
    while not sched.idle:
        for r in sched.step():
            out[r["id"]] = r
    assert len(pool.free) == blocks  # every block came back
    return out


@pytest.mark.parametrize("params", [SamplingParams(max_new_tokens=12),
                                    SamplingParams(max_new_tokens=12, temperature=0.8, top_k=50, top_p=0.9, seed=3)])
def test_alone_equals_in_batch(mistral, params):
    model, tokenizer, _ = mistral
    reqs = requests(16, params)
    together = run_all(model, tokenizer, reqs)
    # a tight pool forces preemption and recomputation; a small budget forces chunking
    squeezed = run_all(model, tokenizer, reqs, max_batch_tokens=16, blocks=24)
    for r in reqs:
        alone = run_all(model, tokenizer, [r], max_batch_tokens=512)[r.id]
        assert together[r.id]["output_ids"] == alone["output_ids"], r.id
        assert squeezed[r.id]["output_ids"] == alone["output_ids"], r.id
        n, reason = len(alone["output_ids"]), alone["finish_reason"]
        assert (n == 12 and reason == "length") or (reason == "stop" and alone["output_ids"][-1] in model.config.eos_token_ids)


def test_greedy_matches_transformers(mistral):
    from transformers import AutoModelForCausalLM

    model, tokenizer, path = mistral
    ref = AutoModelForCausalLM.from_pretrained(path).eval()
    reqs = requests(6, SamplingParams(max_new_tokens=8))
    got = run_all(model, tokenizer, reqs, max_batch_tokens=32)
    for r in reqs:
        ids = [int(t) for t in r.prompt_ids]
        for step, token in enumerate(got[r.id]["output_ids"]):
            logits = hf_logits(ref, ids)[-1]
            assert token == int(np.argmax(logits)), (r.id, step)
            lse = np.log(np.sum(np.exp(logits.astype(np.float64) - logits.max()))) + logits.max()
            assert abs(got[r.id]["logprobs"][step] - (logits[token] - lse)) < 1e-4
            ids.append(token)


def test_stop_rules(mistral):
    model, tokenizer, _ = mistral
    [r] = requests(1, SamplingParams(max_new_tokens=20))
    free = run_all(model, tokenizer, [r])[r.id]
    text, ids = free["output_text"], free["output_ids"]
    assert len(text) > 6, text
    # a stop string spanning the boundary of two tokens: cut before it, finish "stop"
    for k in range(2, len(ids)):
        a, b = tokenizer.decode(ids[: k - 1]), tokenizer.decode(ids[:k])
        if len(b) - len(a) >= 1 and len(a) >= 2:
            stop = a[-2:] + b[len(a):][:1]
            break
    cut = text.find(stop)
    params = SamplingParams(max_new_tokens=20, stop=(stop,))
    stopped = run_all(model, tokenizer, [Request(0, r.id, r.prompt_ids, params)])[r.id]
    assert stopped["finish_reason"] == "stop" and stopped["output_text"] == text[:cut]
    assert stopped["output_ids"] == ids[: len(stopped["output_ids"])]
    # a stop token id: kept as the last token, finish "stop"
    params = SamplingParams(max_new_tokens=20, stop_token_ids=(ids[3],))
    stopped = run_all(model, tokenizer, [Request(0, r.id, r.prompt_ids, params)])[r.id]
    assert stopped["output_ids"] == ids[: ids.index(ids[3]) + 1] and stopped["finish_reason"] == "stop"


def test_top_logprobs(mistral):
    model, tokenizer, _ = mistral
    [r] = requests(1, SamplingParams(max_new_tokens=5, logprobs=3))
    got = run_all(model, tokenizer, [r])[r.id]
    top = np.reshape(got["top_logprobs"], (5, 3))
    top_ids = np.reshape(got["top_logprob_ids"], (5, 3))
    assert np.all(np.diff(top, axis=1) <= 0)  # most likely first
    assert list(top_ids[:, 0]) == got["output_ids"]  # greedy picks the top one
    assert np.allclose(top[:, 0], got["logprobs"])
