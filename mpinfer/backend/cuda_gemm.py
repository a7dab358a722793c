"""Linear layers on the GPU: C = A W^T (+ bias) with bf16 inputs and float32 output.

Three kernel files (kernels_cuda/gemm.cu, gemm_wgmma.cu, gemv.cu; their headers are the
manuals): decode-shaped products (M <= 16 rows) are memory-bound on W and go to the skinny
gemv kernel; anything taller goes to a tensor-core GEMM: on Hopper the wgmma + TMA kernel
(cuda_wgmma.py), elsewhere (or when its sm_90a build fails) the mma.sync one. prefill_path()
says which. Each has a SwiGLU variant (swiglu=True) that takes an MLP's gate/up weight with
its rows interleaved (CudaBackend.swiglu_rows) and writes silu(gate) * up: half the output,
and no second pass over the product.
"""

import cupy
import numpy as np

from . import cuda_wgmma, kernels

GEMV_MAX_M = 16
SMS = 132  # H100 / H200 multiprocessors: the grids below are sized to fill them

_TILES = {  # kernel -> (block N, stages, threads); block M is 128, K tile 64
    "gemm_bf16_128x256": (256, 3, 256),
    "gemm_bf16_128x128": (128, 3, 256),
}
_GEMM_BM, _GEMM_BK = 128, 64
_GEMV_KC_UNIT = 256  # a split gemv block's K range is a multiple of 256 (8 warps x 32)


def null():
    """A null pointer argument (no bias, no output of that kind)."""
    return np.uint64(0)


def check_bias(op, bias, N):
    if bias is not None:
        kernels.require(bias.dtype == np.float32 and bias.shape == (N,) and bias.flags.c_contiguous,
                        f"{op}: bias must be contiguous float32 ({N},), got {bias.dtype} {bias.shape}")


def output(op, out, M, N):
    """out, or a new float32 (M, N) array when None; checked C-contiguous float32 (M, N)."""
    if out is None:
        out = cupy.empty((M, N), np.float32)
    kernels.require(out.dtype == np.float32 and out.shape == (M, N) and out.flags.c_contiguous,
                    f"{op}: out must be C-contiguous float32 {(M, N)}, got {out.dtype} {out.shape}")
    return out


def reduce_splits(dst, b, out, swiglu=False):
    """out (M, N) = the sum of the split-K partials dst (splits, M, N) in split order, + bias b;
    with swiglu out (M, N/2) = silu(gate) * up of those sums' column pairs (2i, 2i + 1)."""
    splits, M, N = dst.shape
    n = M * N // 2 if swiglu else M * N  # outputs
    kernels.function("gemv", "gemv_reduce_swiglu" if swiglu else "gemv_reduce")(
        (-(-n // 256), 1, 1), (256, 1, 1), (dst, b, out, np.int32(n), np.int32(N), np.int32(splits)))


def _check(a, w, bias):
    kernels.require(a.dtype == np.uint16 and a.ndim == 2,
                    f"gemm: a must be 2-D uint16 (bf16 bits), got {a.dtype} {a.shape}")
    kernels.require(w.dtype == np.uint16 and w.ndim == 2,
                    f"gemm: w must be 2-D uint16 (bf16 bits) (out, in), got {w.dtype} {w.shape}")
    kernels.require(a.flags.c_contiguous, f"gemm: a {a.shape} must be C-contiguous")
    kernels.require(w.flags.c_contiguous, f"gemm: w {w.shape} must be C-contiguous")
    kernels.require(a.shape[1] == w.shape[1], f"gemm: a {a.shape} and w {w.shape} must share K (their last axis)")
    kernels.require(a.shape[1] > 0 and a.shape[1] % 8 == 0,
                    f"gemm: K = {a.shape[1]} must be a positive multiple of 8 (16-byte rows)")
    kernels.require(a.data.ptr % 16 == 0 and w.data.ptr % 16 == 0,
                    f"gemm: a and w must be 16-byte aligned (addresses {a.data.ptr:#x}, {w.data.ptr:#x})")
    check_bias("gemm", bias, w.shape[0])


def gemm(a, w, bias=None, out=None, swiglu=False):
    """a (M, K) uint16 bf16 bits, w (N, K) uint16 bf16 bits (a Linear weight, (out, in)),
    bias (N,) float32 or None -> float32 (M, N) = a @ w.T + bias, new or written into out
    (C-contiguous float32 (M, N)). All C-contiguous, K % 8 == 0, a and w 16-byte aligned.
    swiglu: w and bias hold an MLP's gate/up rows interleaved (row 2i gate_i, 2i + 1 up_i; N
    even) -> float32 (M, N/2) = silu(gate) * up, silu(x) = x / (1 + exp(-x)), in out if given."""
    _check(a, w, bias)
    (M, K), N = a.shape, w.shape[0]
    kernels.require(not swiglu or N % 2 == 0, f"gemm: swiglu needs an even number of weight rows, got {w.shape}")
    out = output("gemm", out, M, N // 2 if swiglu else N)
    if M == 0 or N == 0:
        return out
    b = bias if bias is not None else null()
    if M <= GEMV_MAX_M:
        _gemv(a, w, b, out, M, N, K, swiglu)
    elif cuda_wgmma.available():
        cuda_wgmma.gemm(a, w, b, out, swiglu)
    else:
        _gemm(a, w, b, out, M, N, K, swiglu)
    return out


def prefill_path():
    """The GEMM gemm() runs for M > GEMV_MAX_M on this device: "wgmma" (gemm_wgmma.cu, compute
    capability 9.0) or "mma.sync" (gemm.cu)."""
    return "wgmma" if cuda_wgmma.available() else "mma.sync"


def _gemm(a, w, b, out, M, N, K, swiglu=False):
    # 128x256 tiles unless they leave over half of the SMs idle; then 128x128 (2 per SM)
    tiles_m = -(-M // _GEMM_BM)
    name = "gemm_bf16_128x256" if tiles_m * -(-N // 256) >= SMS // 2 else "gemm_bf16_128x128"
    bn, stages, threads = _TILES[name]
    smem = stages * (_GEMM_BM + bn) * _GEMM_BK * 2
    f = kernels.function("gemm", name + ("_swiglu" if swiglu else ""), smem)
    grid = (tiles_m * -(-N // bn), 1, 1)
    f(grid, (threads, 1, 1), (a, w, b, out, np.int32(M), np.int32(N), np.int32(K)), shared_mem=smem)


def gemv_plan(N, K):
    """(kernel, columns per block, splits, kc) of the gemv for w (N, K). Wide N: 64-column
    blocks (2 warps along K), with 2 K blocks per loop trip for short K. Else 16-column
    blocks (8 warps along K), whose K is cut into splits ranges of kc (a multiple of 256)
    only when the ceil(N/16) blocks leave SMs idle; then into about two blocks per SM."""
    if -(-N // 64) >= SMS:
        return ("gemv_bf16_k2_u2" if K <= 1024 else "gemv_bf16_k2"), 64, 1, K
    blocks = -(-N // 16)
    splits = 1 if blocks >= SMS else min(-(-2 * SMS // blocks), -(-K // _GEMV_KC_UNIT))
    kc = -(-K // splits)
    kc = -(-kc // _GEMV_KC_UNIT) * _GEMV_KC_UNIT
    return "gemv_bf16", 16, -(-K // kc), kc


def _gemv(a, w, b, out, M, N, K, swiglu=False):
    name, cols, splits, kc = gemv_plan(N, K)
    dst = out if splits == 1 else cupy.empty((splits, M, N), np.float32)  # split K: plain partials
    grid = (-(-N // cols), splits, 1)
    kernels.function("gemv", name + ("_swiglu" if swiglu and splits == 1 else ""))(
        grid, (256, 1, 1), (a, w, b if splits == 1 else null(), dst, np.int32(M), np.int32(N), np.int32(K),
                            np.int32(kc)))
    if splits > 1:
        reduce_splits(dst, b, out, swiglu)
