"""GPU check of the quantized-weight GEMM (mpinfer/backend/cuda_quant.py: gemv_q.cu).

Weights: random float32 W (N, K) ~ N(0, 1/K) quantized by the `gguf` library
(gguf.quants.quantize) to Q8_0, Q4_0 and Q4_1 blocks, and those bytes are what the kernel
reads. Reference: the same bytes dequantized by the library (gguf.quants.dequantize), then
a float32 matmul with the same bf16-rounded A (+ bias) on the CPU. The kernel's products
and scales are exact, so rel_err should be ~1e-6 (pass: < 1e-2).

Correctness: M 1, 3, 16 at 576 x 1536 (split K), ragged K = 32, 96, 544 (a partial
256-wide chunk) and odd N, and at the timed shapes. Timing (M = 1, 16; N x K = 4096 x 4096,
14336 x 4096, 4096 x 14336), as check_gemm.py does it: CUDA graphs replayed, cycling through
copies of W over 3x the L2 so W comes from memory. Reported: "us", bw_frac = (W blocks + A +
C bytes) / time / copy bandwidth, ratio = our bf16 gemv (cuda_gemm.gemm) time / ours on the
same shape (the issue's aim: >= 3 for Q4 at M = 1), and torch.matmul bf16 (cuBLAS) beside it.
"""

import os
from concurrent.futures import ThreadPoolExecutor

import cupy
import gguf.quants
import numpy as np
from gguf import GGMLQuantizationType

from check_gemm import _graph_us, _row, _torch_us, _weight_copies
from mpinfer.backend.cuda_gemm import gemm
from mpinfer.backend.cuda_quant import gemv_q, gemv_q_plan
from util import bf16_bits, bits_to_f32, copy_bandwidth, poisoned, result

FORMATS = {"q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0, "q4_1": GGMLQuantizationType.Q4_1}
CHECKS = [  # (M, N, K, bias), every format
    (1, 576, 1536, True),
    (3, 576, 1536, False),
    (16, 576, 1536, True),
    (1, 40, 32, True),  # one GGUF block a row: rows not 16-byte aligned
    (3, 77, 96, False),
    (16, 33, 96, True),
    (9, 1001, 544, True),  # odd N, a partial chunk, split K
]
TIMED = [(4096, 4096), (14336, 4096), (4096, 14336)]  # N, K: checked at M 1, 3, 16; timed at 1, 16
CHECK_M, TIME_M = (1, 3, 16), (1, 16)


def _rows_parallel(fn, x):
    """fn over row ranges of x in threads (the gguf numpy code releases the GIL), rows
    concatenated: quantizing 58M weights takes seconds on one core."""
    step = max(1, -(-len(x) // (4 * (os.cpu_count() or 1))))
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        return np.concatenate(list(pool.map(fn, [x[i:i + step] for i in range(0, len(x), step)])))


def _weights(rng, N, K):
    """Random float32 W (N, K) ~ N(0, 1/K), rows scaled by 0.5..2 (different block scales)."""
    w = rng.standard_normal((N, K), dtype=np.float32) * np.float32(K**-0.5)
    return w * rng.uniform(0.5, 2.0, (N, 1)).astype(np.float32)


def _quantize(w, fmt):
    """(wq (N, K/32 * block bytes) uint8, the library's float32 dequantization of wq)."""
    qtype = FORMATS[fmt]
    wq = _rows_parallel(lambda x: gguf.quants.quantize(x, qtype), w)
    return np.ascontiguousarray(wq), _rows_parallel(lambda x: gguf.quants.dequantize(x, qtype), wq)


def _inputs(rng, M, K, N, with_bias):
    """Fresh A (M, K) bf16 bits and its float32 values, bias (N,) float32 or None."""
    a = bf16_bits(rng.standard_normal((M, K), dtype=np.float32))
    b = rng.standard_normal(N, dtype=np.float32) if with_bias else None
    return a, bits_to_f32(a), b


def _kernel(fmt, N, K):
    return f"gemv_{fmt}_{gemv_q_plan(N, K)[0]}"


def _run_checked(fmt, a, wq_gpu, b, N, K):
    """gemv_q into a poisoned buffer -> numpy float32 (M, N)."""
    M = a.shape[0]
    out = gemv_q(cupy.asarray(a), wq_gpu, fmt, N, K, None if b is None else cupy.asarray(b), out=poisoned((M, N)))
    return out.get()


def _check(rng, fmt, M, N, K, with_bias):
    wq, wref = _quantize(_weights(rng, N, K), fmt)
    a, af, b = _inputs(rng, M, K, N, with_bias)
    ref = af @ wref.T + (0 if b is None else b)
    out = _run_checked(fmt, a, cupy.asarray(wq).ravel(), b, N, K)
    return result(_kernel(fmt, N, K), [M, N, K], out, ref, fmt=fmt, bias=with_bias)


def _bf16_w(N, K, seed):
    """Random bf16 W (N, K) on the GPU for the bf16 baselines (their time does not depend on values)."""
    w = cupy.random.default_rng(seed).standard_normal((N, K), dtype=cupy.float32) * np.float32(K**-0.5)
    u = w.view(cupy.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(cupy.uint16)


def _baselines(rng, N, K):
    """{M: (cuda_gemm.gemm bf16 us, torch.matmul bf16 us)} on the same shape, W from memory."""
    ws = _weight_copies(_bf16_w(N, K, int(rng.integers(1 << 62))))
    times = {}
    for M in TIME_M:
        a = cupy.asarray(bf16_bits(rng.standard_normal((M, K), dtype=np.float32)))
        out = cupy.empty((M, N), np.float32)
        times[M] = (_graph_us([lambda w=w: gemm(a, w, out=out) for w in ws]), _torch_us(a, ws))
    del ws
    cupy.get_default_memory_pool().free_all_blocks()
    return times


def _timed_shape(rng, N, K):
    """Rows for every format at one timed shape: correctness at CHECK_M, timing at TIME_M."""
    rows = []
    base = _row("bf16 baselines", [N, K], lambda: _baselines(rng, N, K))
    if isinstance(base, dict) and "error" in base:
        rows.append(base)
        base = None
    w = _weights(rng, N, K)
    for fmt in FORMATS:
        for M in CHECK_M:
            rows.append(_row(_kernel(fmt, N, K), [M, N, K],
                             lambda M=M, fmt=fmt: _timed_row(rng, fmt, w, M, N, K, base)))
        cupy.get_default_memory_pool().free_all_blocks()
    return rows


_quantized = {}  # (fmt, N, K) -> (wq on the GPU, reference), kept for the M of one shape


def _timed_row(rng, fmt, w, M, N, K, base):
    key = (fmt, N, K)
    if key not in _quantized:
        _quantized.clear()
        wq, wref = _quantize(w, fmt)
        _quantized[key] = (cupy.asarray(wq).ravel(), wref)
    wq_gpu, wref = _quantized[key]
    a, af, _ = _inputs(rng, M, K, N, False)
    row = result(_kernel(fmt, N, K), [M, N, K], _run_checked(fmt, a, wq_gpu, None, N, K), af @ wref.T, fmt=fmt)
    if M not in TIME_M:
        return row
    a_gpu = cupy.asarray(a)
    out = cupy.empty((M, N), np.float32)
    ws = _weight_copies(wq_gpu)
    us = _graph_us([lambda wq=wq: gemv_q(a_gpu, wq, fmt, N, K, out=out) for wq in ws])
    del ws
    nbytes = wq_gpu.nbytes + 2 * M * K + 4 * M * N
    row.update(us=us, bw_frac=nbytes / (us * 1e-6) / copy_bandwidth())
    if base is not None:
        bf16_us, torch_us = base[M]
        row.update(baseline="cuda_gemm.gemm bf16", baseline_us=bf16_us, ratio=bf16_us / us, torch_us=torch_us,
                   torch_ratio=torch_us / us)
        if fmt.startswith("q4") and M == 1:
            row["aim_3x_bf16"] = bool(bf16_us / us >= 3.0)
    return row


def run(rng):
    rows = [_row(_kernel(fmt, n, k), [m, n, k], lambda fmt=fmt, m=m, n=n, k=k, b=b: _check(rng, fmt, m, n, k, b))
            for fmt in FORMATS for m, n, k, b in CHECKS]
    for n, k in TIMED:
        rows += _timed_shape(rng, n, k)
    _quantized.clear()
    cupy.get_default_memory_pool().free_all_blocks()
    return rows
