"""Sampling: Philox against the Random123 known-answer vectors, the filters against
transformers' logits warpers, and inverse-CDF frequencies against the distribution."""

import numpy as np
import pytest

from mpinfer.engine.logits import VocabShards
from mpinfer.engine.sampling import filtered_probs, philox4x32, request_key, sample, top_ids, uniform
from mpinfer.params import SamplingParams


@pytest.mark.parametrize("counter,key,expected", [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_known_answers(counter, key, expected):
    assert tuple(int(w[0]) for w in philox4x32(counter, key)) == expected


def test_uniform_depends_only_on_seed_request_step():
    k = request_key("q17")
    assert uniform(7, k, 3) == uniform(7, request_key("q17"), 3)
    draws = {uniform(7, k, 3), uniform(8, k, 3), uniform(7, request_key("q18"), 3), uniform(7, k, 4)}
    assert len(draws) == 4
    u = np.array([uniform(1, request_key(i), s) for i in range(100) for s in range(50)])
    assert ((0 <= u) & (u < 1)).all() and abs(u.mean() - 0.5) < 0.01 and abs(np.var(u) - 1 / 12) < 0.005


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [
    (1.0, 0, 1.0, 0.0), (0.7, 5, 1.0, 0.0), (1.3, 0, 0.8, 0.0), (1.0, 0, 1.0, 0.1), (0.9, 20, 0.95, 0.02)])
def test_filters_match_transformers_warpers(temperature, top_k, top_p, min_p):
    import torch
    from transformers.generation.logits_process import (MinPLogitsWarper, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    rng = np.random.default_rng(3)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    for _ in range(5):
        logits = (rng.standard_normal(300) * 3).astype(np.float32)
        scores = torch.tensor(logits, dtype=torch.float64)[None]
        warpers = [TemperatureLogitsWarper(temperature)] + ([TopKLogitsWarper(top_k)] if top_k else [])
        warpers += ([TopPLogitsWarper(top_p)] if top_p < 1 else []) + ([MinPLogitsWarper(min_p)] if min_p else [])
        for w in warpers:
            scores = w(None, scores)
        expected = torch.softmax(scores, -1)[0].numpy()
        ids, probs = filtered_probs(logits, params)
        ours = np.zeros(300)
        ours[ids] = probs
        assert set(ids.tolist()) == set(np.flatnonzero(expected).tolist())
        np.testing.assert_allclose(ours, expected, atol=1e-12)


def test_inverse_cdf_frequencies_follow_the_distribution():
    logits = np.log(np.array([0.5, 0.25, 0.125, 0.125]))
    params = SamplingParams(temperature=1.0)
    ids, probs = filtered_probs(logits, params)
    counts = np.zeros(4)
    for u in (np.arange(800) + 0.5) / 800:
        counts[ids[np.searchsorted(np.cumsum(probs), u, side="right")]] += 1
    np.testing.assert_array_equal(counts, [400, 200, 100, 100])
    seen = [sample(logits, params, request_key(i), 0) for i in range(4000)]
    np.testing.assert_allclose(np.bincount(seen, minlength=4) / 4000, [0.5, 0.25, 0.125, 0.125], atol=0.03)


def test_greedy_and_logprobs():
    logits = np.array([1.0, 3.0, 3.0, -2.0], np.float32)
    assert sample(logits, SamplingParams(), 0, 0) == 1  # ties: lowest id
    shards = VocabShards(logits[None], 0)
    lse = shards.logsumexp()
    ref = logits - np.log(np.exp(logits.astype(np.float64)).sum())
    assert shards.argmax().tolist() == [1]
    assert (shards.values(np.array([2])) - lse)[0] == pytest.approx(ref[2])
    top, top_values = shards.top(2)
    assert top.tolist() == [[1, 2]]
    np.testing.assert_allclose(top_values[0] - lse[0], ref[[1, 2]], rtol=1e-6)


def test_top_ids_equals_stable_argsort():
    rng = np.random.default_rng(0)
    values = rng.integers(0, 20, 500).astype(np.float32)  # many ties
    for n in (1, 5, 37, 500):
        assert top_ids(values, n).tolist() == np.argsort(-values, kind="stable")[:n].tolist()
