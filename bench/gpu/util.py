"""Helpers of the GPU check script (bench/gpu/check.py) and its per-area modules.

Every check draws fresh random inputs, rounds them to bf16 where the kernel reads bf16,
runs the NumPy backend (float32) on the same rounded values as the reference, poisons the
kernel's output first (NaN) so an unwritten element fails, and times the kernel next to
a library baseline with CUDA events (median of repeats, after warm-up).
"""

import numpy as np


def bf16_bits(x):
    """float32 numpy -> uint16 bf16 bits, round to nearest even (as the kernels' f2bf)."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return u.astype(np.uint16)


def bf16_round(x):
    """float32 numpy rounded to the nearest bf16 value (still float32)."""
    return bits_to_f32(bf16_bits(x))


def bits_to_f32(bits):
    """uint16 bf16 bits (numpy or cupy) -> float32 of the same module."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def rel_err(out, ref):
    """||out - ref|| / ||ref|| in float64; inf where out has a NaN (unwritten or broken)."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    if not np.all(np.isfinite(out)):
        return float("inf")
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def poisoned(shape, dtype=np.float32):
    """A cupy output buffer full of NaN (float) or 0xFFFF.. (integers): unwritten elements show."""
    import cupy

    if np.dtype(dtype).kind == "f":
        return cupy.full(shape, np.nan, dtype)
    return cupy.full(shape, np.iinfo(dtype).max if np.dtype(dtype).kind == "u" else -1, dtype)


def time_us(fn, warmup=3, repeat=20):
    """Median microseconds of fn() on the current stream, timed with CUDA events."""
    import cupy

    for _ in range(warmup):
        fn()
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    times = []
    for _ in range(repeat):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end) * 1e3)
    return float(np.median(times))


_copy = {}


def copy_bandwidth():
    """Device-to-device copy bandwidth in bytes/s (read + written), of a 2 GiB copy: the
    ceiling of memory-bound kernels."""
    if "bw" not in _copy:
        import cupy

        n = 1 << 30
        a, b = cupy.empty(n, np.uint8), cupy.empty(n, np.uint8)
        a.fill(1)
        us = time_us(lambda: b.__setitem__(slice(None), a), warmup=2, repeat=10)
        _copy["bw"] = 2 * n / (us * 1e-6)
        del a, b
    return _copy["bw"]


def result(kernel, shape, out, ref, tol=1e-2, **timing):
    """One check's row of the report: rel_err against the reference, ok when under tol."""
    err = rel_err(out, ref)
    return {"kernel": kernel, "shape": shape, "rel_err": err, "ok": bool(err < tol), **timing}
