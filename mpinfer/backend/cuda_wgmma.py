"""The Hopper prefill GEMM: kernels_cuda/gemm_wgmma.cu (wgmma + TMA, sm_90a; its header is
the manual). cuda_gemm.gemm() runs it for M > GEMV_MAX_M where available(): on compute
capability 9.0 when the sm_90a build loads. Elsewhere, when that build fails (one line on
stderr), or with MPINFER_NO_WGMMA=1 in the environment (bench/gpu/check.py sets it when the
kernel fails its first check), the mma.sync kernel of gemm.cu runs instead.

The operands reach the kernel as tensor maps (CUtensorMap, 128 bytes, encoded on the host
by cuTensorMapEncodeTiled), passed by value: no device memory is written before a launch,
so launches stay asynchronous and can be captured in CUDA graphs.
"""

import ctypes
import os
import sys
from functools import lru_cache

import cupy
import numpy as np

from . import kernels

BM, BK, THREADS = 128, 64, 384
STAGES = {256: 4, 128: 6}  # block N -> shared-memory stages (192 KB of tiles either way)
_MAP = np.dtype((np.void, 128))  # a CUtensorMap's bytes; CuPy passes a size-one numpy array by value


@lru_cache(maxsize=None)
def available():
    """True when this device runs the wgmma kernels: compute capability 9.0 (H100, H200) and
    gemm_wgmma.cu built for sm_90a, its kernels loaded with their shared memory granted, unless
    MPINFER_NO_WGMMA is set. A failure says so once on stderr."""
    if os.environ.get("MPINFER_NO_WGMMA") or cupy.cuda.Device().compute_capability != "90":
        return False
    try:
        for bn in STAGES:
            for kind in ("", "swiglu_"):
                kernels.function("gemm_wgmma", f"gemm_wgmma_{kind}128x{bn}", smem_bytes(bn))
    except Exception as e:  # the compiler's error (KernelError), or the driver refusing the cubin or the opt-in
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f"mpinfer: gemm_wgmma.cu (sm_90a) unavailable, prefill GEMMs use mma.sync: {first}", file=sys.stderr,
              flush=True)
        return False
    return True


@lru_cache(maxsize=None)
def sms():
    """Multiprocessors of this device (132 on an H100 SXM / H200, 114 on an H100 PCIe): the persistent grid."""
    return cupy.cuda.Device().attributes["MultiProcessorCount"]


def plan(M, N, sms):
    """(block N, tiles) for C (M, N): 128x256 tiles, unless 128x128 ones (half the time each)
    fill the SMs in fewer than twice the waves (small problems, e.g. 1024^2: 32 big tiles
    on 132 SMs, 64 small ones)."""
    big, small = -(-M // BM) * -(-N // 256), -(-M // BM) * -(-N // 128)
    return (256, big) if 2 * -(-big // sms) <= -(-small // sms) else (128, small)


def smem_bytes(bn):
    """Dynamic shared memory of the kernel with block N bn: the stages, 2 mbarriers per stage,
    1 KB to align the stages to the 128B swizzle's 1024-byte atoms."""
    return STAGES[bn] * (BM + bn) * BK * 2 + STAGES[bn] * 16 + 1024


# weights hit every time (room for MoE models' thousands of expert matrices), activations
# while the memory pool hands their buffer out again
@lru_cache(maxsize=4096)
def tensor_map(ptr, rows, K, box_rows):
    """The CUtensorMap of a row-major bf16 (rows, K) matrix at device address ptr, read in
    boxes of box_rows x 64 into the 128B swizzle, out-of-bounds elements zero-filled, as a
    size-one numpy array of its 128 bytes."""
    from cuda.bindings import driver as d

    u64, u32 = d.cuuint64_t, d.cuuint32_t
    err, tmap = d.cuTensorMapEncodeTiled(
        d.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, ptr, [u64(K), u64(rows)], [u64(2 * K)],
        [u32(BK), u32(box_rows)], [u32(1), u32(1)], d.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE,
        d.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_128B, d.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
        d.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE)
    kernels.require(err == d.CUresult.CUDA_SUCCESS,
                    f"gemm: cuTensorMapEncodeTiled failed ({err.name}) for a ({rows}, {K}) bf16 matrix at {ptr:#x}")
    return np.frombuffer(ctypes.string_at(tmap.getPtr(), 128), _MAP).copy()


def gemm(a, w, b, out, swiglu=False):
    """out = a @ w.T + b (M, N), or with swiglu silu(gate) * up of its interleaved column
    pairs (M, N/2), on the wgmma kernel. a (M, K), w (N, K) uint16 bf16 bits, b float32 (N,)
    or a null pointer, out float32: checked by cuda_gemm (C-contiguous, K % 8 == 0, 16-byte
    aligned)."""
    (M, K), N = a.shape, w.shape[0]
    kernels.require(not swiglu or N % 2 == 0, f"gemm: swiglu needs interleaved gate/up rows, N = {N} is odd")
    shape = (M, N // 2) if swiglu else (M, N)
    kernels.require(out.shape == shape, f"gemm: out must be {shape}, got {out.shape}")
    bn, tiles = plan(M, N, sms())
    smem = smem_bytes(bn)
    f = kernels.function("gemm_wgmma", f"gemm_wgmma_{'swiglu_' if swiglu else ''}128x{bn}", smem)
    maps = tensor_map(a.data.ptr, M, K, BM), tensor_map(w.data.ptr, N, K, bn)
    f((min(tiles, sms()), 1, 1), (THREADS, 1, 1), (*maps, b, out, np.int32(M), np.int32(N), np.int32(K)),
      shared_mem=smem)
