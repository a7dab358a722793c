"""Token sampling: greedy, temperature, top-k, top-p, min-p, with a counter-based generator.

The random number of a sampling step depends only on (seed, request id, step), never on the
batch, the replica or the number of ranks, so a seeded request gets the same tokens wherever
it runs. The generator is Philox4x32-10 (Salmon et al., SC'11, the Random123 family also in
cuRAND): the step and a hash of the request id are the counter, the seed is the key, and one
call gives the 53-bit uniform that picks the token by inverse CDF over the filtered
distribution. The CUDA sampling kernel computes the same function.
"""

import hashlib

import numpy as np

_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = np.uint32(0x9E3779B9), np.uint32(0xBB67AE85)


def philox4x32(counter, key):
    """Philox4x32-10. counter: 4 uint32 arrays (or scalars), key: 2; returns 4 uint32 arrays."""
    c0, c1, c2, c3 = (np.atleast_1d(np.asarray(x, np.uint32)) for x in counter)
    k0, k1 = (np.atleast_1d(np.asarray(x, np.uint32)) for x in key)
    for _ in range(10):
        p0, p1 = c0.astype(np.uint64) * _M0, c2.astype(np.uint64) * _M1
        hi0, lo0 = (p0 >> np.uint64(32)).astype(np.uint32), p0.astype(np.uint32)
        hi1, lo1 = (p1 >> np.uint64(32)).astype(np.uint32), p1.astype(np.uint32)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = k0 + _W0, k1 + _W1  # wraps modulo 2**32 (arrays do not warn)
    return c0, c1, c2, c3


def request_key(request_id):
    """64-bit hash of a request id (a string), stable across processes and machines."""
    return int.from_bytes(hashlib.blake2b(str(request_id).encode(), digest_size=8).digest(), "little")


def uniform(seed, request_key_, step):
    """A float64 in [0, 1) for (seed, request, step): 53 random bits of one Philox call."""
    counter = (step & 0xFFFFFFFF, step >> 32, request_key_ & 0xFFFFFFFF, request_key_ >> 32)
    w0, w1, _, _ = philox4x32(counter, (seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF))
    return float((int(w0[0]) >> 5) * 2.0**26 + (int(w1[0]) >> 6)) / 2.0**53


def top_ids(values, n):
    """Ids of the n largest values, largest first, ties by lower id (as a stable argsort of
    -values, without sorting the whole vocabulary)."""
    if n < len(values):
        kth = np.partition(values, len(values) - n)[len(values) - n]
        ids = np.flatnonzero(values >= kth)  # the n largest and any ties with the n-th
    else:
        ids = np.arange(len(values))
    return ids[np.lexsort((ids, -values[ids]))][:n]


def filtered_probs(logits, params):
    """The distribution a step samples from: (token ids, probabilities), most likely first.
    Order of the filters as in transformers: temperature, top-k, top-p, min-p. Ties in the
    logits keep the lower token id first."""
    scaled = logits.astype(np.float64) / params.temperature
    order = top_ids(scaled, params.top_k if params.top_k > 0 else len(scaled))
    probs = np.exp(scaled[order] - scaled[order[0]])
    probs /= probs.sum()
    if params.top_p < 1.0:
        # smallest prefix whose mass reaches top_p (the token crossing it is kept)
        keep = int(np.searchsorted(np.cumsum(probs), params.top_p)) + 1
        order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
    if params.min_p > 0.0:
        keep = probs >= params.min_p * probs[0]
        order, probs = order[keep], probs[keep] / probs[keep].sum()
    return order, probs


def sample(logits, params, request_key_, step):
    """Token id for one request's logits (V,) at generation step `step`."""
    if params.temperature == 0.0:
        return int(np.argmax(logits))
    order, probs = filtered_probs(logits, params)
    u = uniform(params.seed, request_key_, step)
    return int(order[min(int(np.searchsorted(np.cumsum(probs), u, side="right")), len(order) - 1)])
