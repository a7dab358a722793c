// cast.cu: float32 -> bfloat16 bits, round to nearest even (common.cuh's f2bf, NaN -> 0x7fc0).
// Used before every GEMM, whose operands are bf16.
//
// Kernels (x float32 (n,), y uint16 bf16 bits (n,), any shape flattened, both contiguous):
//   cast_f32_bf16_v8(x, y, n)  8 elements per step: two 16-byte loads, one 16-byte store.
//                              Needs x and y 16-byte aligned; the n % 8 tail is done by the
//                              grid's first threads after the vector loop.
//   cast_f32_bf16_s1(x, y, n)  one element per step, any alignment (the wrapper's fallback).
// Launch: 1-D grid-stride, block 256, grid min(ceil(steps / 256), SMs * 8) (a full SM's
// 2048 threads, each with 32 bytes in flight). No shared memory. n < 2^62.
// Checked: bench/gpu/check_elementwise.py, bit-exact against util.bf16_bits (random bit
// patterns incl. NaN, inf, denormals, ties; any NaN in gives a NaN out); timed against a
// cupy device-to-device copy of the same bytes (read + written), as bw_frac of the copy
// bandwidth.
#include "common.cuh"

__device__ __forceinline__ unsigned bf16x2(float lo, float hi) {
    return (unsigned)f2bf(lo) | ((unsigned)f2bf(hi) << 16);
}

extern "C" __global__ void cast_f32_bf16_v8(const float* __restrict__ x, bf16* __restrict__ y, long long n) {
    const long long steps = n >> 3;
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long stride = (long long)gridDim.x * blockDim.x;
    const float4* x4 = reinterpret_cast<const float4*>(x);
    uint4* y8 = reinterpret_cast<uint4*>(y);
    for (long long g = first; g < steps; g += stride) {
        const float4 a = x4[2 * g], b = x4[2 * g + 1];
        uint4 o;
        o.x = bf16x2(a.x, a.y);
        o.y = bf16x2(a.z, a.w);
        o.z = bf16x2(b.x, b.y);
        o.w = bf16x2(b.z, b.w);
        y8[g] = o;
    }
    const long long i = (steps << 3) + first;  // the tail: fewer than 8 elements
    if (i < n) y[i] = f2bf(x[i]);
}

extern "C" __global__ void cast_f32_bf16_s1(const float* __restrict__ x, bf16* __restrict__ y, long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) y[i] = f2bf(x[i]);
}
