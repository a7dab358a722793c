// swiglu.cu: the SwiGLU activation, as NumpyBackend.silu_mul:
//   out[r, j] = gate[r, j] / (1 + exp(-gate[r, j])) * up[r, j]
// gate, up float32 (rows, I) with unit column stride and any row strides gs, us (elements):
// typically the two column halves of one (rows, 2I) GEMM output (gs = us = 2I);
// out float32 (rows, I) contiguous.
//
// Kernels: silu_mul_v4(gate, up, out, rows, I, gs, us) 4 columns per step (16-byte loads of
//          gate and up, one 16-byte store). Needs I, gs, us % 4 == 0 and gate, up, out
//          16-byte aligned.
//          silu_mul_s1(...) one element per step, any I, strides and alignment (the fallback).
// Launch: 1-D grid-stride over the rows * I / V steps (32-bit: rows * I / V < 2^31), block 256,
// grid min(ceil(steps / 256), SMs * 8). No shared memory.
// exp overflows to inf for gate < -88: 1 / inf = 0 gives -0 as NumPy does.
// Checked: bench/gpu/check_elementwise.py against NumpyBackend.silu_mul on bf16-rounded
// inputs taken as the two halves of a (T, 2I) array (and a misaligned split for s1); timed as
// bw_frac (gate, up read, out written) next to a cupy device-to-device copy of the same bytes.
#include "common.cuh"

template <int V>
__device__ __forceinline__ void silu_mul_body(const float* __restrict__ gate, const float* __restrict__ up,
                                              float* __restrict__ out, int rows, int cols, long long gs,
                                              long long us) {
    const unsigned q = (unsigned)(cols / V);  // steps per row
    const unsigned total = (unsigned)rows * q;
    const unsigned stride = gridDim.x * blockDim.x;
    for (unsigned u = blockIdx.x * blockDim.x + threadIdx.x; u < total; u += stride) {
        const unsigned r = u / q;
        const unsigned j = (u - r * q) * V;
        float g[V], x[V];
        load_f32<V>(gate + r * gs + j, g);
        load_f32<V>(up + r * us + j, x);
#pragma unroll
        for (int i = 0; i < V; ++i) g[i] = g[i] / (1.0f + expf(-g[i])) * x[i];
        store_f32<V>(out + (long long)r * cols + j, g);
    }
}

extern "C" __global__ void silu_mul_v4(const float* gate, const float* up, float* out, int rows, int cols,
                                       long long gs, long long us) {
    silu_mul_body<4>(gate, up, out, rows, cols, gs, us);
}

extern "C" __global__ void silu_mul_s1(const float* gate, const float* up, float* out, int rows, int cols,
                                       long long gs, long long us) {
    silu_mul_body<1>(gate, up, out, rows, cols, gs, us);
}
