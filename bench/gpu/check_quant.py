"""GPU check of the products on quantized weights (mpinfer/backend/cuda_quant.py: gemv_q.cu,
dequant.cu; the CUDA backend's linear() on a quant.QuantTensor).

Weights: random float32 W (N, K) ~ N(0, 1/K) quantized by the `gguf` library
(gguf.quants.quantize) to Q8_0, Q4_0 and Q4_1 blocks, and those bytes are what the kernels
read. References (the numbers mpinfer/quant.py and cuda_quant.py define):
  gemv_q (M <= 16): the same bytes dequantized by the library (gguf.quants.dequantize), then
    a float32 matmul with the same bf16-rounded A (+ bias). Products and scales are exact,
    so rel_err should be ~1e-6 (pass: < 1e-2).
  dequant: bf16 bits of the library's dequantization, bit for bit (mismatches must be 0), on
    random bytes whose fp16 scales are finite (subnormals and zeros included).
  prefill (M > 16, the backend's path: dequant into a bf16 scratch, then cuda_gemm.gemm):
    float32 A @ bf16(dequantize(W)).T on the GPU; rel_err ~1e-6 (pass: < 1e-2).

Correctness of gemv_q: M 1, 3, 16 at 576 x 1536 (split K), ragged K = 32, 96, 544 (a partial
256-wide chunk) and odd N. At the timed shapes (N x K = 4096 x 4096, 14336 x 4096,
4096 x 14336) every format at M = 1, 4, 16 (gemv_q) and PREFILL_M (dequant + gemm), each
checked, then timed as check_gemm.py does it: CUDA graphs replayed, cycling through copies
of W over 3x the L2 so W comes from memory. Reported: "us"; bw_frac = bytes read and written
(W blocks + A + C; prefill: + the bf16 scratch written and read) / time / copy bandwidth;
ratio = our bf16 product (cuda_gemm.gemm: the gemv at M <= 16, the GEMM above) on the same
shape / ours (the issue's aim: >= 3 for Q4 at M = 1, aim_3x_bf16), and torch.matmul bf16
(cuBLAS) beside it. The dequant rows at the timed shapes give its share of a prefill product.
"""

import os
from concurrent.futures import ThreadPoolExecutor

import cupy
import gguf.quants
import numpy as np
from gguf import GGMLQuantizationType

from check_gemm import _graph_us, _row, _torch_us, _weight_copies
from mpinfer.backend.cuda_backend import CudaBackend
from mpinfer.backend.cuda_gemm import gemm
from mpinfer.backend.cuda_quant import dequantize, gemv_q, gemv_q_plan
from mpinfer.quant import BLOCK_BYTES, QuantTensor
from util import bf16_bits, bits_to_f32, copy_bandwidth, poisoned, rel_err, result

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
DEQUANT_CHECKS = [(40, 32), (1001, 544)]  # N, K: random bytes, bit-exact
TIMED = [(4096, 4096), (14336, 4096), (4096, 14336)]  # N, K
TIME_M = (1, 4, 16)
PREFILL_M = 512


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


def _kernel(fmt, M, N, K):
    return f"gemv_{fmt}_{gemv_q_plan(N, K)[0]}" if M <= 16 else f"dequant_{fmt} + gemm_bf16"


def _run_checked(fmt, a, wq_gpu, b, N, K):
    """gemv_q into a poisoned buffer -> numpy float32 (M, N)."""
    M = a.shape[0]
    out = gemv_q(cupy.asarray(a), wq_gpu, fmt, N, K, None if b is None else cupy.asarray(b), out=poisoned((M, N)))
    return cupy.asnumpy(out)


def _check(rng, fmt, M, N, K, with_bias):
    wq, wref = _quantize(_weights(rng, N, K), fmt)
    a, af, b = _inputs(rng, M, K, N, with_bias)
    ref = af @ wref.T + (0 if b is None else b)
    out = _run_checked(fmt, a, cupy.asarray(wq).ravel(), b, N, K)
    return result(_kernel(fmt, M, N, K), [M, N, K], out, ref, fmt=fmt, bias=with_bias)


def _random_blocks(rng, fmt, N, K):
    """Random bytes as W (N, K) blocks, the fp16 scales made finite (bit 14 cleared: exponent
    below 31; subnormals and zeros stay)."""
    bb = BLOCK_BYTES[fmt]
    wq = rng.integers(0, 256, (N * K // 32, bb), dtype=np.uint8)
    wq[:, 1] &= 0xBF
    if fmt == "q4_1":
        wq[:, 3] &= 0xBF
    return wq.reshape(N, K // 32 * bb)


def _check_dequant(rng, fmt, N, K):
    wq = _random_blocks(rng, fmt, N, K)
    ref = bf16_bits(QuantTensor(fmt, wq).dequantize())
    out = cupy.asnumpy(dequantize(cupy.asarray(wq), fmt, N, K, poisoned((N, K), np.uint16)))
    bad = int((out != ref).sum())
    return {"kernel": f"dequant_{fmt}", "shape": [N, K], "mismatches": bad, "ok": bad == 0}


def _bf16_w(N, K, seed):
    """Random bf16 W (N, K) on the GPU for the bf16 baselines (their time does not depend on values)."""
    w = cupy.random.default_rng(seed).standard_normal((N, K), dtype=cupy.float32) * np.float32(K**-0.5)
    u = w.view(cupy.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(cupy.uint16)


def _baselines(rng, N, K):
    """{M: (cuda_gemm.gemm bf16 us, torch.matmul bf16 us)} on the same shape, W from memory
    for the decode M (the prefill GEMM is compute-bound: one W)."""
    ws = _weight_copies(_bf16_w(N, K, int(rng.integers(1 << 62))))
    times = {}
    for M in (*TIME_M, PREFILL_M):
        a = cupy.asarray(bf16_bits(rng.standard_normal((M, K), dtype=np.float32)))
        out = cupy.empty((M, N), np.float32)
        use = ws if M in TIME_M else ws[:1]
        times[M] = (_graph_us([lambda w=w: gemm(a, w, out=out) for w in use]), _torch_us(a, use))
    del ws
    cupy.get_default_memory_pool().free_all_blocks()
    return times


def _timed_shape(rng, be, N, K):
    """Rows for every format at one timed shape: dequant, then M in TIME_M and PREFILL_M."""
    rows = []
    base = _row("bf16 baselines", [N, K], lambda: _baselines(rng, N, K))
    if isinstance(base, dict) and "error" in base:
        rows.append(base)
        base = None
    w = _weights(rng, N, K)
    for fmt in FORMATS:
        wq, wref = _quantize(w, fmt)
        qt = be.weight(QuantTensor(fmt, wq))  # the backend's copy: (N, K/32 * BB) uint8 on the GPU
        rows.append(_row(f"dequant_{fmt}", [N, K], lambda: _timed_dequant(qt, N, K)))
        for M in (*TIME_M, PREFILL_M):
            rows.append(_row(_kernel(fmt, M, N, K), [M, N, K],
                             lambda M=M: _timed_row(rng, be, qt, wref, M, N, K, base)))
        del qt, wref
        cupy.get_default_memory_pool().free_all_blocks()
    return rows


def _timed_dequant(qt, N, K):
    out = cupy.empty((N, K), np.uint16)
    ws = _weight_copies(qt.data)
    us = _graph_us([lambda d=d: dequantize(d, qt.fmt, N, K, out) for d in ws])
    del ws
    nbytes = qt.data.nbytes + out.nbytes
    return {"kernel": f"dequant_{qt.fmt}", "shape": [N, K], "ok": True, "us": us,
            "bw_frac": nbytes / (us * 1e-6) / copy_bandwidth()}


def _timed_row(rng, be, qt, wref, M, N, K, base):
    """One format and M: the kernels' composition checked into poisoned buffers, the
    backend's linear() (which picks it) against the same reference, then timed."""
    fmt, data = qt.fmt, qt.data
    a, af, _ = _inputs(rng, M, K, N, False)
    a_gpu = cupy.asarray(a)
    out = cupy.empty((M, N), np.float32)
    if M <= 16:
        ref = af @ wref.T
        row = result(_kernel(fmt, M, N, K), [M, N, K], _run_checked(fmt, a, data, None, N, K), ref, fmt=fmt)
        ws = _weight_copies(data)
        us = _graph_us([lambda d=d: gemv_q(a_gpu, d, fmt, N, K, out=out) for d in ws])
        del ws
        nbytes = data.nbytes + 2 * M * K + 4 * M * N
    else:
        scratch = dequantize(data, fmt, N, K, poisoned((N, K), np.uint16))
        got = gemm(a_gpu, scratch, out=poisoned((M, N)))
        ref = cupy.asarray(af) @ bits_to_f32(cupy.asarray(bf16_bits(wref))).T
        row = result(_kernel(fmt, M, N, K), [M, N, K], cupy.asnumpy(got), cupy.asnumpy(ref), fmt=fmt)
        del got
        us = _graph_us([lambda: gemm(a_gpu, dequantize(data, fmt, N, K, scratch), out=out)], reps=5)
        nbytes = data.nbytes + 4 * N * K + 2 * M * K + 4 * M * N  # blocks, scratch written and read, A, C
        row["tflops"] = 2.0 * M * N * K / us / 1e6
    row["backend_linear_rel_err"] = rel_err(cupy.asnumpy(be.linear(a_gpu, qt)), cupy.asnumpy(ref))
    row["ok"] = row["ok"] and row["backend_linear_rel_err"] < 1e-2
    row.update(us=us, bw_frac=nbytes / (us * 1e-6) / copy_bandwidth())
    if base is not None:
        bf16_us, torch_us = base[M]
        row.update(baseline="cuda_gemm.gemm bf16", baseline_us=bf16_us, ratio=bf16_us / us, torch_us=torch_us,
                   torch_ratio=torch_us / us)
        if fmt.startswith("q4") and M == 1:
            row["aim_3x_bf16"] = bool(bf16_us / us >= 3.0)
    return row


def run(rng):
    rows = [_row(_kernel(fmt, m, n, k), [m, n, k], lambda fmt=fmt, m=m, n=n, k=k, b=b: _check(rng, fmt, m, n, k, b))
            for fmt in FORMATS for m, n, k, b in CHECKS]
    rows += [_row(f"dequant_{fmt}", [n, k], lambda fmt=fmt, n=n, k=k: _check_dequant(rng, fmt, n, k))
             for fmt in FORMATS for n, k in DEQUANT_CHECKS]
    be = CudaBackend(cupy.cuda.Device().id)
    for n, k in TIMED:
        rows += _timed_shape(rng, be, n, k)
    del be
    cupy.get_default_memory_pool().free_all_blocks()
    return rows
