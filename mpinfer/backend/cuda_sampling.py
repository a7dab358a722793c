"""Token sampling on the GPU (kernels_cuda/sampling.cu): greedy argmax and the seeded
temperature / top-k / top-p / min-p sampler, token for token equal to
mpinfer/engine/sampling.py (sample) for every row. R rows (requests), V vocabulary.
"""

import cupy
import numpy as np

from . import kernels

SMS = 132  # H100/H200: argmax splits rows so that about two blocks run per SM


def _cdiv(a, b):
    return -(-a // b)


def _fn(name):
    return kernels.function("sampling", name)


def _require_logits(logits, name):
    kernels.require(isinstance(logits, cupy.ndarray) and logits.dtype == np.float32 and logits.ndim == 2
                    and logits.flags.c_contiguous,
                    f"{name} logits: needs a C-contiguous cupy float32 (R, V) array, got {type(logits).__name__} "
                    f"{getattr(logits, 'dtype', '')} {getattr(logits, 'shape', '')}")
    R, V = logits.shape
    kernels.require(1 <= V < 2**31, f"{name} logits: needs 1 <= V < 2**31, got {logits.shape}")
    return R, V


def _out(out, R, name):
    if out is None:
        return cupy.empty(R, np.int32)
    kernels.require(isinstance(out, cupy.ndarray) and out.dtype == np.int32 and out.shape == (R,)
                    and out.flags.c_contiguous, f"{name} out: needs a contiguous cupy int32 ({R},) array")
    return out


def argmax(logits, out=None):
    """logits float32 (R, V), NaN-free -> int32 (R,): the id of each row's maximum, ties to the
    lowest id (np.argmax)."""
    R, V = _require_logits(logits, "argmax")
    out = _out(out, R, "argmax")
    if R == 0:
        return out
    kernels.require(R <= 65535, f"argmax logits: needs at most 65535 rows (grid y), got {logits.shape}")
    # S blocks per row (at most 32: the final reduction is one warp), chunks a multiple of 4
    S = max(1, min(32, _cdiv(2 * SMS, R), _cdiv(V, 2048)))
    chunk = _cdiv(_cdiv(V, S), 4) * 4
    S = _cdiv(V, chunk)
    vec = V % 4 == 0 and logits.data.ptr % 16 == 0
    pval, pidx = cupy.empty((R, S), np.float32), cupy.empty((R, S), np.int32)
    _fn("argmax_partial")((S, R), (512,), (logits, pval, pidx, np.int32(V), np.int32(chunk), np.int32(vec)))
    _fn("argmax_final")((R,), (32,), (pval, pidx, out, np.int32(S)))
    return out


def _per_row(x, dtype, R, name):
    """A per-row parameter (numpy, cupy, list or scalar) -> contiguous cupy (R,) of dtype.
    Python integers wrap to 64 bits as the reference's masks do (np.asarray would turn
    [2**64 - 1, 3] into float64)."""
    if not isinstance(x, (cupy.ndarray, np.ndarray)):
        values = list(x) if isinstance(x, (list, tuple)) else [x] * R
        if np.dtype(dtype).kind in "iu":
            x = np.array([int(v) % 2**64 for v in values], np.uint64)
        else:
            x = np.array(values, dtype)
    x = cupy.ascontiguousarray(cupy.asarray(x).astype(dtype, copy=False))
    kernels.require(x.shape == (R,), f"sample {name}: needs one value per row ({R},), got {x.shape}")
    return x


def sample(logits, temperature, top_k, top_p, min_p, seed, keys, steps, out=None):
    """logits float32 (R, V) -> int32 (R,): row r's token as engine.sampling.sample(logits[r],
    params, keys[r], steps[r]) with params (temperature[r], top_k[r], top_p[r], min_p[r],
    seed[r]). Per-row parameters (R,) as numpy or cupy arrays (or scalars): temperature float64
    >= 0 (0: greedy), top_k int (0: off), top_p and min_p float64 (min_p <= 1), seed and keys
    (request_key of the request id) uint64, steps int64 >= 0. Pass float64 values: a float32
    temperature is a different number from the reference's Python float.

    Scratch: (R, V) uint64 sort keys and about (R, most candidates kept by top-k) float64."""
    R, V = _require_logits(logits, "sample")
    out = _out(out, R, "sample")
    if R == 0:
        return out
    temperature = _per_row(temperature, np.float64, R, "temperature")
    top_k = _per_row(top_k, np.int64, R, "top_k")
    top_p = _per_row(top_p, np.float64, R, "top_p")
    min_p = _per_row(min_p, np.float64, R, "min_p")
    seed = _per_row(seed, np.uint64, R, "seed")
    keys = _per_row(keys, np.uint64, R, "keys")
    steps = _per_row(steps, np.int64, R, "steps")
    kernels.require(bool((temperature >= 0).all()), "sample temperature: needs values >= 0")
    kernels.require(bool((min_p <= 1).all()), "sample min_p: needs values <= 1")
    # candidates: ids by logit descending, ties by lower id, as one ascending sort of 64-bit keys
    sort_keys = cupy.empty((R, V), np.uint64)
    total = R * V
    _fn("sample_keys")((min(_cdiv(total, 256), 8 * 1024),), (256,), (logits, sort_keys, np.int64(total), np.int32(V)))
    sort_keys.sort(axis=-1)
    n = cupy.where((top_k > 0) & (top_k < V), top_k, V).astype(np.int32)  # candidates after top-k
    nmax = int(n.max())
    ld = nmax + nmax // 64 + 1  # a row: the probabilities, then the leaves of their pairwise sums
    scratch = cupy.empty((R, ld), np.float64)
    _fn("sample_rows")((R,), (256,), (logits, sort_keys, temperature, n, top_p, min_p, seed, keys, steps,
                                      scratch, np.int32(ld), np.int32(nmax), out, np.int32(V)))
    return out
