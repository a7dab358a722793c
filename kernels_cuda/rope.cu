// rope.cu: rotary position embedding, "rotate half" (pairs (i, i + Dh/2)), as NumpyBackend.rope:
//   out[t, h, i]        = x[t, h, i] * cos[t, i] - x[t, h, i + half] * sin[t, i]
//   out[t, h, i + half] = x[t, h, i + half] * cos[t, i] + x[t, h, i] * sin[t, i]     (i < half)
// x, out float32 (T, heads, Dh) contiguous, half = Dh / 2; cos, sin float32 (T, half) contiguous.
// out may be x (in place): each element pair is read and written by one thread only, so x and
// out carry no __restrict__.
//
// Kernels: rope_v4(x, cos, sin, out, heads, half) 4 pairs per step (16-byte loads of x's two
//          halves, cos and sin; two 16-byte stores). Needs half % 4 == 0 and x, cos, sin, out
//          16-byte aligned.
//          rope_s1(...) one pair per step, any half and alignment (the wrapper's fallback).
// Launch: one block per token (grid = T), block min(256, heads * half / V rounded up to 32);
// the block's threads stride over the token's heads * half / V steps. cos/sin of a token
// are read once per head (from L1/L2). No shared memory.
// Checked: bench/gpu/check_elementwise.py against NumpyBackend.rope on bf16-rounded x and
// float32 cos/sin; timed as bw_frac (x read, out written, cos/sin read) next to a cupy
// device-to-device copy of the same bytes. rope_v4 / rope_s1 are not on the backend's path
// since rope_kv_store.cu fused them with the KV store: kept as check_rope.py's unfused baseline.
//
// rope_tables(pos, inv_freq, cos, sin, T, half): a step's cos/sin tables on the device, as
//   mpinfer/rope.cos_sin: cos[t, i] = float32(cos(float64(pos[t]) * inv_freq[i])), likewise sin.
//   pos (T,) int32, inv_freq (half,) float64 (rope.inv_freq: every scaling variant is in it),
//   cos, sin (T, half) float32. The angle is one correctly rounded double product (__dmul_rn: no
//   contraction), as NumPy's; CUDA's double sincos is within 2 ulp, so the float32 results equal
//   NumPy's unless the exact value lies within ~2^-50 relative of a float32 rounding boundary.
//   One thread per element: grid ceil(T * half / 256), block 256. (The graphs of decode steps
//   read positions from a device buffer, so the tables cannot come from the host.)
#include "common.cuh"

template <int V>
__device__ __forceinline__ void rope_token(const float* x, const float* __restrict__ cos,
                                           const float* __restrict__ sin, float* out, int heads, int half) {
    const long long t = blockIdx.x;
    const int q = half / V;  // steps per head
    const long long row = t * heads * 2 * half;
    for (int u = threadIdx.x; u < heads * q; u += blockDim.x) {
        const int h = u / q;
        const int j = (u - h * q) * V;  // index in the first half
        const long long p = row + (long long)h * 2 * half + j;
        float a[V], b[V], c[V], s[V], o1[V], o2[V];
        load_f32<V>(x + p, a);
        load_f32<V>(x + p + half, b);
        load_f32<V>(cos + t * half + j, c);
        load_f32<V>(sin + t * half + j, s);
        rope_turn<V>(a, b, c, s, o1, o2);
        store_f32<V>(out + p, o1);
        store_f32<V>(out + p + half, o2);
    }
}

extern "C" __global__ void rope_v4(const float* x, const float* cos, const float* sin, float* out, int heads,
                                   int half) {
    rope_token<4>(x, cos, sin, out, heads, half);
}

extern "C" __global__ void rope_s1(const float* x, const float* cos, const float* sin, float* out, int heads,
                                   int half) {
    rope_token<1>(x, cos, sin, out, heads, half);
}

extern "C" __global__ void rope_tables(const int* __restrict__ pos, const double* __restrict__ inv_freq,
                                       float* __restrict__ cos_out, float* __restrict__ sin_out, int T, int half) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)T * half) return;
    const int t = (int)(i / half), j = (int)(i % half);
    double s, c;
    sincos(__dmul_rn((double)pos[t], inv_freq[j]), &s, &c);
    cos_out[i] = (float)c;
    sin_out[i] = (float)s;
}
