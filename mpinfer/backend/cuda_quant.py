"""Linear layers on GGUF-quantized weights kept on the GPU (W4A16 / W8A16).

W (N, K) stays in its GGUF blocks (Q8_0, Q4_0, Q4_1: raw bytes as the file stores them,
row-major, K/32 blocks a row; mpinfer/quant.py defines their values). Two kernel files,
whose headers are the manuals:
  gemv_q.cu   C = A W^T (+ bias) for M <= 16 rows of bf16 A, W dequantized inside the
              GEMM: a decode step reads 0.56 (Q4_0) to 1.06 (Q8_0) bytes per weight, not 2.
              Numbers: float32 A @ dequantize(W).T, W exact (not rounded to bf16).
  dequant.cu  W -> bf16 bits, exactly bf16(dequantize(W)); the prefill product (M > 16) is
              that into a scratch buffer, then the bf16 GEMM (cuda_gemm.gemm).
"""

import cupy
import numpy as np

from ..quant import BLOCK_BYTES
from . import kernels
from .cuda_gemm import SMS, check_bias, null, output, reduce_splits

GEMV_Q_MAX_M = 16
# dynamic shared memory: 8 warps x 3 stages x 16 rows x a row's slot (gemv_q.cu's Fmt::SLOT)
_SMEM = {"q8_0": 8 * 3 * 16 * 288, "q4_0": 8 * 3 * 16 * 176, "q4_1": 8 * 3 * 16 * 176}
_CHUNK = 8  # GGUF blocks per K chunk of a warp (256 K); a split's K range is whole chunks


def gemv_q_plan(N, K):
    """(variant, W rows per block, splits, qc) for W (N, K): wide N -> "k2" blocks of 64
    rows (2 warps along K); else "k8" blocks of 16 rows (8 warps along K), whose K is cut
    into splits ranges of qc GGUF blocks (whole 256-wide chunks) only when the ceil(N/16)
    blocks leave SMs idle, then into about two blocks per SM."""
    chunks = -(-(K // 32) // _CHUNK)
    if -(-N // 64) >= SMS:
        return "k2", 64, 1, chunks * _CHUNK
    blocks = -(-N // 16)
    splits = 1 if blocks >= SMS else min(-(-2 * SMS // blocks), chunks)
    per_split = -(-chunks // splits)
    return "k8", 16, -(-chunks // per_split), per_split * _CHUNK


def _check_blocks(op, wq, fmt, N, K, align):
    """wq holds W (N, K) as GGUF blocks of fmt: whole blocks, C-contiguous, `align`-byte aligned."""
    kernels.require(fmt in BLOCK_BYTES, f"{op}: fmt must be one of {sorted(BLOCK_BYTES)}, got {fmt!r}")
    kernels.require(isinstance(K, (int, np.integer)) and K > 0 and K % 32 == 0,
                    f"{op}: K = {K} must be a positive multiple of 32 (whole GGUF blocks)")
    nbytes = N * (K // 32) * BLOCK_BYTES[fmt]
    kernels.require(wq.dtype == np.uint8 and wq.size == nbytes and wq.flags.c_contiguous,
                    f"{op}: wq must be C-contiguous uint8 of N * K/32 * {BLOCK_BYTES[fmt]} = {nbytes} bytes "
                    f"({fmt}, N = {N}, K = {K}), got {wq.dtype} {wq.shape}")
    kernels.require(wq.data.ptr % align == 0, f"{op}: wq must be {align}-byte aligned (address {wq.data.ptr:#x})")


def _check(a, wq, fmt, N, K, bias):
    kernels.require(isinstance(N, (int, np.integer)) and 0 <= N < 2**31, f"gemv_q: N = {N} must be in [0, 2^31)")
    _check_blocks("gemv_q", wq, fmt, N, K, 16)
    kernels.require(a.dtype == np.uint16 and a.ndim == 2 and a.shape[1] == K,
                    f"gemv_q: a must be 2-D uint16 (bf16 bits) (M, K = {K}), got {a.dtype} {a.shape}")
    kernels.require(a.shape[0] <= GEMV_Q_MAX_M, f"gemv_q: a has {a.shape[0]} rows, at most {GEMV_Q_MAX_M} allowed")
    kernels.require(a.flags.c_contiguous and a.data.ptr % 16 == 0,
                    f"gemv_q: a {a.shape} must be C-contiguous and 16-byte aligned (address {a.data.ptr:#x})")
    check_bias("gemv_q", bias, N)


def gemv_q(a, wq, fmt, N, K, bias=None, out=None):
    """a (M, K) uint16 bf16 bits, M <= 16; wq uint8 holding W (N, K) as GGUF blocks of fmt
    ("q8_0", "q4_0", "q4_1"), row-major, N * K/32 * block bytes (the tensor's bytes as the
    file stores them); bias (N,) float32 or None -> float32 (M, N) = a @ dequant(W).T + bias,
    new or written into out (C-contiguous float32 (M, N)). K % 32 == 0; a and wq 16-byte
    aligned and C-contiguous."""
    _check(a, wq, fmt, N, K, bias)
    M = a.shape[0]
    out = output("gemv_q", out, M, N)
    if M == 0 or N == 0:
        return out
    b = bias if bias is not None else null()
    variant, rows, splits, qc = gemv_q_plan(N, K)
    dst = out if splits == 1 else cupy.empty((splits, M, N), np.float32)
    f = kernels.function("gemv_q", f"gemv_{fmt}_{variant}", _SMEM[fmt])
    f((-(-N // rows), splits, 1), (256, 1, 1),
      (a, wq, b if splits == 1 else null(), dst, np.int32(M), np.int32(N), np.int32(K), np.int32(qc)),
      shared_mem=_SMEM[fmt])
    if splits > 1:
        reduce_splits(dst, b, out)
    return out


def dequantize(wq, fmt, N, K, out):
    """wq: W (N, K) as GGUF blocks of fmt (as gemv_q) -> out, C-contiguous uint16 (N, K),
    16-byte aligned: bf16 bits of W (round to nearest even), returned."""
    _check_blocks("dequantize", wq, fmt, N, K, 2)
    kernels.require(out.dtype == np.uint16 and out.shape == (N, K) and out.flags.c_contiguous and out.data.ptr % 16 == 0,
                    f"dequantize: out must be C-contiguous 16-byte aligned uint16 {(N, K)}, got {out.dtype} {out.shape}")
    steps = N * K // 8
    if steps:
        kernels.function("dequant", f"dequant_{fmt}")(
            (min(-(-steps // 256), SMS * 8), 1, 1), (256, 1, 1), (wq, out, np.int64(N * K // 32)))
    return out
