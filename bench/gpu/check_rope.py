"""GPU check of RoPE's device side (issue 10): rope_tables (kernels_cuda/rope.cu), the cos/sin
tables computed on the GPU from positions, and rope_kv_store (kernels_cuda/rope_kv_store.cu),
RoPE on q and k fused with the bf16 KV store.

rope_tables against mpinfer/rope.cos_sin (float64 angles, rounded once to float32) for every
RoPE variant rope.inv_freq covers and positions up to 1M: the float32 results must be equal,
at most one float32 ulp apart (the double sincos is within 2 double ulps; a float32 rounding
boundary that close is a ~1e-8 event); the row gives the count of any inexact elements.

rope_kv_store against NumpyBackend.rope_store_kv on the column blocks of one random
(T, (H + 2 Hkv) Dh) QKV output: q and the in-place k by relative error; the pools' bits exactly
(poisoned with 0xFFFF first): bf16 of the kernel's roped k and of v at the slots, rows of
skipped tokens (slot -1) untouched.
Timed next to what ran before it: contiguous copies of q, k, v, rope of q and of k, and
kv_store of k and of v (rope.cu + kv_store.cu), same shapes.
"""

import cupy
import numpy as np
from check_elementwise import _back_to_back, _gen, _guard, _normal
from util import bf16_bits, copy_bandwidth, poisoned, rel_err

from mpinfer import rope
from mpinfer.backend import cuda_attention as ca
from mpinfer.backend import cuda_elementwise as ce
from mpinfer.backend.numpy_backend import NumpyBackend
from mpinfer.config import RopeConfig

POSITIONS = np.array([0, 1, 2, 255, 4095, 8191, 32767, 65535, 100000, 131071, 524287, 1000000])


def _variants(dh):
    """(label, inv_freq) of every variant rope.inv_freq covers, at head dim dh."""
    base = RopeConfig(theta=500000.0)
    llama3 = RopeConfig(theta=500000.0, type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                        original_max_position=8192)
    divisors = np.random.default_rng(dh).uniform(1.0, 8.0, dh // 2)  # a GGUF rope_freqs tensor
    return [("default theta 5e5", rope.inv_freq(base, dh)), ("theta 1e4", rope.inv_freq(RopeConfig(theta=1e4), dh)),
            ("linear x4", rope.inv_freq(RopeConfig(theta=1e6, type="linear", factor=4.0), dh)),
            ("llama3", rope.inv_freq(llama3, dh)),
            ("gguf_freqs", rope.inv_freq(RopeConfig(theta=500000.0, type="gguf_freqs"), dh, divisors))]


def _tables_row(rng, dh, label, inv_freq):
    positions = np.concatenate([POSITIONS, rng.integers(0, 131072, 4000)]).astype(np.int32)
    shape = (len(positions), len(inv_freq))
    cos, sin = ce.rope_tables(cupy.asarray(positions), cupy.asarray(inv_freq), poisoned(shape), poisoned(shape))
    ref = rope.cos_sin(inv_freq, positions)
    inexact, ulps = 0, 0
    for got, want in zip((cos.get(), sin.get()), ref):
        inexact += int(np.count_nonzero(got != want))
        ulps = max(ulps, int(np.max(np.abs(got.view(np.int32).astype(np.int64) - want.view(np.int32)))))
    return [{"kernel": "rope_tables", "shape": f"{len(positions)} positions <= 1e6, Dh {dh}, {label}",
             "mismatches": inexact, "max_ulp": ulps, "ok": ulps <= 1 and inexact <= 2}]


def _store_rows(g, rng, t, h, hkv, dh, label, timed=False):
    qkv = _normal(g, (t, (h + 2 * hkv) * dh))
    q, k, v = (qkv[:, a:b].reshape(t, -1, dh) for a, b in ((0, h * dh), (h * dh, (h + hkv) * dh),
                                                            ((h + hkv) * dh, (h + 2 * hkv) * dh)))
    cos, sin = ce.rope_tables(cupy.asarray(rng.integers(0, 100000, t).astype(np.int32)),
                              cupy.asarray(rope.inv_freq(RopeConfig(theta=500000.0), dh)))
    rows = 2 * t + 16
    slots = rng.permutation(rows)[:t].astype(np.int32)
    slots[rng.random(t) < 0.1] = -1  # skipped tokens (another CP rank's; a graph's padded rows)
    pools = [cupy.full((rows, hkv, dh), 0xFFFF, np.uint16) for _ in range(2)]
    qh, kh, vh = q.get(), k.get(), v.get()
    batch = type("Batch", (), {"slots": slots})()
    scratch = [np.zeros((rows, hkv, dh), np.float32) for _ in range(2)]
    ref_q, ref_k = NumpyBackend(threads=1).rope_store_kv(qh, kh, vh, cos.get(), sin.get(), *scratch, batch)
    d_slots = cupy.asarray(slots)
    poisoned((t, h, dh))  # freed at once: the pool hands its NaN block to the kernel's output (same size)
    out = ca.rope_kv_store(q, k, v, cos, sin, d_slots, *pools)
    err = max(rel_err(out.get(), ref_q), rel_err(k.get(), ref_k))
    # the pools: exactly the bf16 bits of the kernel's own roped k (float32 fma contraction may
    # move it by an ulp from NumPy's, hence a rounding of its own) and of v; skipped rows untouched
    keep = slots >= 0
    bad = 0
    for pool, x in zip(pools, (k.get(), vh)):
        want = np.full((rows, hkv, dh), 0xFFFF, np.uint16)
        want[slots[keep]] = bf16_bits(x[keep])
        bad += int(np.count_nonzero(pool.get() != want))
    row = {"kernel": "rope_kv_store", "shape": label, "rel_err": err, "mismatches": bad,
           "ok": bool(err < 1e-6 and bad == 0)}
    if timed:
        def before():  # the backend's path before the fused kernel
            ce.rope(cupy.ascontiguousarray(q), cos, sin)
            kc = ce.rope(cupy.ascontiguousarray(k), cos, sin)
            ca.store_kv(pools[0], d_slots, kc)
            ca.store_kv(pools[1], d_slots, cupy.ascontiguousarray(v))

        us = _back_to_back(lambda: ca.rope_kv_store(q, k, v, cos, sin, d_slots, *pools))
        base = _back_to_back(before)
        nbytes = qkv.nbytes + 4 * t * (h + hkv) * dh + 2 * 2 * t * hkv * dh + cos.nbytes + sin.nbytes
        row.update({"us": us, "baseline": "contiguous copies + rope.cu x2 + kv_store.cu x2 (as before)",
                    "baseline_us": base, "ratio": base / us, "bw_frac": nbytes / (us * 1e-6) / copy_bandwidth()})
    return [row]


def run(rng):
    rows = []
    for dh in (64, 128):
        for label, inv_freq in _variants(dh):
            _guard(rows, "rope_tables", f"Dh {dh} {label}", lambda: _tables_row(rng, dh, label, inv_freq))
    for t, h, hkv, dh, timed in [(1, 32, 8, 128, False), (7, 9, 3, 64, False), (513, 32, 8, 128, False),
                                 (64, 32, 8, 128, True), (4096, 32, 8, 128, True)]:
        label = f"T {t}, H {h}, Hkv {hkv}, Dh {dh}"
        _guard(rows, "rope_kv_store", label, lambda: _store_rows(_gen(rng), rng, t, h, hkv, dh, label, timed))
    _guard(rows, "rope_kv_store", "Dh 6 s1", lambda: _store_rows(_gen(rng), rng, 33, 4, 2, 6, "T 33, H 4, Hkv 2, "
                                                                                                "Dh 6 -> s1"))
    return rows
