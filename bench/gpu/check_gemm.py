"""GPU check of the linear-layer kernels (mpinfer/backend/cuda_gemm.py: gemm.cu, gemm_wgmma.cu,
gemv.cu). Rows of M > 16 are named after the path the backend's gemm() takes on this device
(prefill_path(): "wgmma" on Hopper, else "mma.sync"); one row says which it is.

Correctness: C = A W^T (+ b) against NumpyBackend().linear on the same bf16-rounded
inputs for small and ragged shapes (M in 1, 3, 16, 17, 100, 1000; N, K not multiples of
the tiles; K = 200 leaves a partial K tile), and against a float32 cupy matmul of those
inputs on the GPU for the big timed shapes (NumPy on the CPU is too slow there).
A ~ N(0, 1), W ~ N(0, 1/K), b ~ N(0, 1): outputs are O(1).

Timing (CUDA events, of calls replayed from CUDA graphs: a Python call costs as long as
a 1024^3 or decode-shaped kernel; decode shapes cycle through copies of W over 3x the L2
so W is read from memory): prefill shapes (square 1024..8192, Llama-3-8B's MLP, ragged M
and N with a bias, and the fused SwiGLU epilogue) against torch.matmul in bf16 (cuBLAS),
ratio = torch_us / us and TFLOP/s of both, with the mma.sync kernel's time and error beside
the backend's path (mma_sync_*); decode shapes (M <= 16) as bw_frac = (W + A + C bytes) /
time / copy bandwidth, with the torch.matmul time beside it.

SwiGLU epilogue (gemm(..., swiglu=True): W's rows gate/up interleaved, C = silu(gate) * up):
against NumpyBackend.swiglu_linear on the same rows stacked [gate; up] (small, ragged and
split-K shapes, and 16 x 4096 -> 2 x 14336), against float32 cupy of the same formula at the
big timed shapes; timed against the unfused pair it replaces, gemm then silu_mul (swiglu.cu)
on the stacked rows, ratio = unfused_us / us.
"""

import traceback

import cupy
import numpy as np

from mpinfer.backend import cuda_gemm, cuda_wgmma, kernels
from mpinfer.backend.cuda_elementwise import silu_mul
from mpinfer.backend.cuda_gemm import GEMV_MAX_M, gemm, gemv_plan, prefill_path
from mpinfer.backend.numpy_backend import NumpyBackend
from util import bits_to_f32, copy_bandwidth, poisoned, rel_err, result, time_us

CHECKS = [  # (M, N, K, bias): NumPy reference
    (1, 576, 1536, True),
    (1, 49152, 576, False),
    (3, 1536, 576, True),
    (5, 77, 200, True),  # N below one gemv block, K tail
    (16, 4096, 4096, False),
    (16, 14336, 4096, True),
    (17, 1001, 200, True),  # odd N: scalar stores; K = 200: partial K tile
    (100, 576, 1536, False),
    (300, 1001, 1536, True),
    (1000, 4096, 4096, True),
]
PREFILL = [  # (M, N, K, bias, swiglu): NumPy reference up to 2^34 multiply-adds, else float32 on the GPU
    (1024, 1024, 1024, False, False), (2048, 2048, 2048, False, False), (4096, 4096, 4096, False, False),
    (8192, 8192, 8192, False, False), (4096, 14336, 4096, False, False),
    (1000, 4100, 4096, True, False),  # ragged M and N: partial tiles both ways
    (4096, 2 * 14336, 4096, False, True), (1000, 2 * 1000, 1000, True, True)]  # SwiGLU; K = 1000: partial K tile
PROBE = [(300, 1001, 520, True, False), (1000, 4100, 4096, True, False), (500, 2 * 600, 264, True, True)]
DECODE = [(m, n, k) for m in (1, 4, 16) for n, k in ((4096, 4096), (14336, 4096), (4096, 14336), (49152, 576))]


def _bf16_bits(x):
    """float32 cupy -> uint16 bf16 bits, round to nearest even (as util.bf16_bits)."""
    u = x.view(cupy.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(cupy.uint16)


def _inputs(rng, M, N, K, with_bias):
    """Fresh random a (M, K), w (N, K) bf16 bits and bias (N,) float32 or None, on the GPU."""
    g = cupy.random.default_rng(int(rng.integers(1 << 62)))
    a = _bf16_bits(g.standard_normal((M, K), dtype=cupy.float32))
    w = _bf16_bits(g.standard_normal((N, K), dtype=cupy.float32) * np.float32(K**-0.5))
    b = g.standard_normal(N, dtype=cupy.float32) if with_bias else None
    return a, w, b


def _checked(a, w, b, reference):
    """gemm(a, w, b) into a poisoned buffer, and reference(a, w, b): (out, ref) float32."""
    out = gemm(a, w, b, out=poisoned((a.shape[0], w.shape[0])))
    return out, reference(a, w, b)


def _numpy_ref(a, w, b):
    return NumpyBackend(threads=1).linear(bits_to_f32(a.get()), bits_to_f32(w.get()), None if b is None else b.get())


def _gpu_ref(a, w, b):
    y = bits_to_f32(a) @ bits_to_f32(w).T
    return y if b is None else y + b


def _graph_us(fns, reps=10):
    """Microseconds per call of fns (cupy launches; cycled through at least reps calls)
    replayed from one CUDA graph: GPU time without Python's launch cost, which is as long
    as a decode-shaped kernel."""
    calls = [fns[i % len(fns)] for i in range(max(reps, len(fns)))]
    s = cupy.cuda.Stream(non_blocking=True)
    with s:
        for fn in fns:  # on this stream first, so the memory pool holds their buffers for the capture
            fn()
        s.synchronize()
        s.begin_capture()
        for fn in calls:
            fn()
        graph = s.end_capture()
        return time_us(lambda: graph.launch(s)) / len(calls)


def _torch_us(a, ws, reps=10):
    """Microseconds of one torch.matmul (cuBLAS, bf16 in and out) of a by each w of ws,
    replayed from a CUDA graph cycling through ws (as _graph_us)."""
    import torch

    ta = torch.from_dlpack(a).view(torch.bfloat16)
    tws = [torch.from_dlpack(w).view(torch.bfloat16) for w in ws]
    calls = [tws[i % len(tws)] for i in range(max(reps, len(tws)))]
    for tw in tws:
        torch.matmul(ta, tw.T)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for tw in calls:
            torch.matmul(ta, tw.T)
    return time_us(g.replay) / len(calls)


def _weight_copies(w):
    """w and copies of it, together over 3x the L2 cache: timing cycles through them so W
    comes from memory, as a decode step's weights do (the H200's 60 MB L2 holds a 4096^2 W)."""
    l2 = cupy.cuda.Device().attributes["L2CacheSize"]
    return [w] + [w.copy() for _ in range(-(-3 * l2 // w.nbytes) - 1)]


def _name(M, N, K):
    """The kernel the wrapper launches for this shape."""
    return gemv_plan(N, K)[0] if M <= GEMV_MAX_M else f"gemm {prefill_path()}"


def _row(kernel, shape, fn):
    try:
        return fn()
    except Exception:
        return {"kernel": kernel, "shape": shape, "ok": False, "error": traceback.format_exc(limit=4)}


def _check(rng, M, N, K, with_bias):
    a, w, b = _inputs(rng, M, N, K, with_bias)
    out, ref = _checked(a, w, b, _numpy_ref)
    return result(_name(M, N, K), [M, N, K], out.get(), ref, bias=with_bias)


def _swiglu(y):
    """silu(y[:, 2i]) * y[:, 2i+1]: the reference of the fused epilogue (numpy or cupy)."""
    gate, up = y[:, 0::2], y[:, 1::2]
    return gate / (1 + (cupy.get_array_module(y)).exp(-gate)) * up


def _err(out, ref):
    """||out - ref|| / ||ref|| (inf where out has a NaN), ref numpy or cupy."""
    if isinstance(ref, np.ndarray):
        return rel_err(out.get(), ref)
    if not bool(cupy.isfinite(out).all()):
        return float("inf")
    return float(cupy.linalg.norm(out - ref) / cupy.linalg.norm(ref))


def _prefill(rng, M, N, K, with_bias, swiglu):
    a, w, b = _inputs(rng, M, N, K, with_bias)
    ref = (_numpy_ref if M * N * K <= 1 << 34 else _gpu_ref)(a, w, b)
    ref = _swiglu(ref) if swiglu else ref
    bb = b if b is not None else cuda_gemm.null()
    shape = (M, N // 2) if swiglu else (M, N)
    if swiglu:  # only the wgmma kernel has the fused epilogue
        kernels.require(cuda_wgmma.available(), "the wgmma kernel is off here (see the gemm path row)")
        run = lambda out: cuda_wgmma.gemm(a, w, bb, out, swiglu=True)  # noqa: E731
        name = "gemm_wgmma swiglu"
    else:
        run = lambda out: gemm(a, w, b, out=out)  # noqa: E731
        name = f"gemm {prefill_path()}"
    out = poisoned(shape)
    run(out)
    row = {"kernel": name, "shape": [M, N, K], "bias": with_bias, "rel_err": _err(out, ref)}
    us = _graph_us([lambda: run(out)], reps=5)
    if not swiglu:  # the mma.sync kernel (gemm.cu) on the same inputs, whatever path gemm() took
        out = poisoned(shape)
        cuda_gemm._gemm(a, w, bb, out, M, N, K)
        row["mma_sync_rel_err"] = _err(out, ref)
        row["mma_sync_us"] = _graph_us([lambda: cuda_gemm._gemm(a, w, bb, out, M, N, K)], reps=5)
    base = _torch_us(a, [w], reps=5)
    flop = 2.0 * M * N * K
    row.update(ok=bool(row["rel_err"] < 1e-2 and row.get("mma_sync_rel_err", 0) < 1e-2), us=us,
               baseline="torch.matmul bf16", baseline_us=base, ratio=base / us, tflops=flop / us / 1e6,
               baseline_tflops=flop / base / 1e6)
    if "mma_sync_us" in row:
        row["mma_sync_ratio"] = base / row["mma_sync_us"]
    return row


def probe(rng):
    """The wgmma kernel alone on ragged shapes (partial tiles, K tails, bias, SwiGLU) against
    NumPy, untimed: check.py runs this in a child process before anything else uses it."""
    rows = []
    for M, N, K, with_bias, swiglu in PROBE:
        a, w, b = _inputs(rng, M, N, K, with_bias)
        ref = _numpy_ref(a, w, b)
        out = poisoned((M, N // 2) if swiglu else (M, N))
        cuda_wgmma.gemm(a, w, b if with_bias else cuda_gemm.null(), out, swiglu=swiglu)
        rows.append(result("gemm_wgmma" + " swiglu" * swiglu, [M, N, K], out.get(), _swiglu(ref) if swiglu else ref,
                           bias=with_bias))
    return rows


def _path():
    """Which GEMM the backend runs for M > 16 here; on Hopper anything but wgmma is a failure."""
    path, cc = prefill_path(), cupy.cuda.Device().compute_capability
    return {"kernel": f"gemm path: {path}", "path": path, "compute_capability": cc, "ok": path == "wgmma" or cc != "90"}


def _decode(rng, M, N, K):
    a, w, b = _inputs(rng, M, N, K, False)
    out, ref = _checked(a, w, b, _gpu_ref)
    row = result(_name(M, N, K), [M, N, K], out.get(), ref.get())
    ws = _weight_copies(w)
    us = _graph_us([lambda w=w: gemm(a, w) for w in ws])
    base = _torch_us(a, ws)
    nbytes = 2 * N * K + 2 * M * K + 4 * M * N
    row.update(us=us, baseline="torch.matmul bf16", baseline_us=base, ratio=base / us,
               bw_frac=nbytes / (us * 1e-6) / copy_bandwidth())
    return row


def _empty(rng):
    a, w, _ = _inputs(rng, 0, 576, 1536, False)
    out = gemm(a, w)
    return {"kernel": "gemm (no rows)", "shape": [0, 576, 1536], "ok": out.shape == (0, 576)}


# ---- SwiGLU epilogue: N = 2I weight rows, gate/up interleaved
SWIGLU_CHECKS = [(1, 3072, 576, True), (3, 74, 600, True), (16, 28672, 4096, True), (17, 1002, 200, True),
                 (300, 1002, 1536, False)]  # (M, N = 2I, K, bias): NumPy reference
SWIGLU_TIMED = [(1, 28672, 4096), (16, 28672, 4096), (1024, 28672, 4096), (2048, 28672, 4096), (4096, 28672, 4096)]


def _swiglu_name(M, N, K):
    if M > GEMV_MAX_M:
        return f"gemm_{prefill_path()}_swiglu"
    name, _, splits, _ = gemv_plan(N, K)
    return f"{name} + gemv_reduce_swiglu" if splits > 1 else f"{name}_swiglu"


def _stacked(x):
    """Interleaved gate/up rows (2i gate_i, 2i + 1 up_i) -> [gate; up]: the unfused layout."""
    return cupy.ascontiguousarray(cupy.concatenate([x[0::2], x[1::2]]))


def _swiglu_gpu_ref(a, w, b):
    y = _gpu_ref(a, w, b)
    g, u = y[:, 0::2], y[:, 1::2]
    return g / (1 + cupy.exp(-g)) * u


def _swiglu_check(rng, M, N, K, with_bias):
    a, w, b = _inputs(rng, M, N, K, with_bias)
    out = gemm(a, w, b, out=poisoned((M, N // 2)), swiglu=True)
    ref = NumpyBackend(threads=1).swiglu_linear(bits_to_f32(a.get()), bits_to_f32(_stacked(w).get()),
                                                None if b is None else _stacked(b).get())
    return result(_swiglu_name(M, N, K), [M, N, K], out.get(), ref, bias=with_bias)


def _swiglu_timed(rng, M, N, K):
    a, w, _ = _inputs(rng, M, N, K, False)
    out = gemm(a, w, out=poisoned((M, N // 2)), swiglu=True)
    ref = _swiglu_gpu_ref(a, w, None)
    err = float(cupy.linalg.norm(out - ref) / cupy.linalg.norm(ref)) if bool(cupy.isfinite(out).all()) else float("inf")
    del out, ref
    ws, I = _stacked(w), N // 2

    def unfused():
        y = gemm(a, ws)
        return silu_mul(y[:, :I], y[:, I:])

    us = _graph_us([lambda: gemm(a, w, swiglu=True)], reps=5)
    base = _graph_us([unfused], reps=5)
    row = {"kernel": _swiglu_name(M, N, K), "shape": [M, N, K], "rel_err": err, "ok": bool(err < 1e-2), "us": us,
           "baseline": "gemm + silu_mul (unfused)", "baseline_us": base, "ratio": base / us}
    if M <= GEMV_MAX_M:
        row["bw_frac"] = (2 * N * K + 2 * M * K + 4 * M * I) / (us * 1e-6) / copy_bandwidth()
    else:
        row["tflops"] = 2.0 * M * N * K / us / 1e6
    return row


def run(rng):
    rows = [_row(_name(m, n, k), [m, n, k], lambda: _check(rng, m, n, k, bias)) for m, n, k, bias in CHECKS]
    rows.append(_row("gemm path", [], _path))
    rows += [_row(f"gemm {'swiglu' if sw else prefill_path()}", [m, n, k], lambda: _prefill(rng, m, n, k, bias, sw))
             for m, n, k, bias, sw in PREFILL]
    rows += [_row(_name(m, n, k), [m, n, k], lambda: _decode(rng, m, n, k)) for m, n, k in DECODE]
    rows.append(_row("gemm (no rows)", [0, 576, 1536], lambda: _empty(rng)))
    rows += [_row(_swiglu_name(m, n, k), [m, n, k], lambda: _swiglu_check(rng, m, n, k, bias))
             for m, n, k, bias in SWIGLU_CHECKS]
    rows += [_row(_swiglu_name(m, n, k), [m, n, k], lambda: _swiglu_timed(rng, m, n, k)) for m, n, k in SWIGLU_TIMED]
    cupy.get_default_memory_pool().free_all_blocks()
    return rows
