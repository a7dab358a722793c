// embedding.cu: vocabulary-parallel embedding lookup, as NumpyBackend.embedding:
//   out[t, :] = table[ids[t] - offset, :]  if offset <= ids[t] < offset + Vp, else 0
// (another tensor-parallel rank holds the other rows; the all-reduce adds them up).
// table uint16 bf16 bits (Vp, D) contiguous; ids int32 or int64 (T,) contiguous;
// out float32 (T, D) contiguous.
//
// Kernels: embedding_{i32, i64}_v8(table, ids, out, D, Vp, offset) 8 columns per step (one
//          16-byte load of the table row, two 16-byte stores). Needs D % 8 == 0 and table, out
//          16-byte aligned.
//          embedding_{i32, i64}_s1(...) one column per step, any D and alignment (fallback).
// Launch: one block per token (grid = T), block min(256, D / V rounded up to 32), the
// block's threads stride over the row. No shared memory.
// Checked: bench/gpu/check_elementwise.py against NumpyBackend.embedding (ids inside and
// outside [offset, offset + Vp), Vp 49152); timed as bw_frac (rows read, out written) next to a
// cupy device-to-device copy of the same bytes.
#include "common.cuh"

template <int V> __device__ __forceinline__ void row_to_f32(const bf16* p, float* o, bool inside) {
    if constexpr (V == 8) {
        uint4 a = make_uint4(0u, 0u, 0u, 0u);  // bf16 zero bits: the row of another rank
        if (inside) a = *reinterpret_cast<const uint4*>(p);
        reinterpret_cast<float4*>(o)[0] = make_float4(bf16x2_lo(a.x), bf16x2_hi(a.x), bf16x2_lo(a.y), bf16x2_hi(a.y));
        reinterpret_cast<float4*>(o)[1] = make_float4(bf16x2_lo(a.z), bf16x2_hi(a.z), bf16x2_lo(a.w), bf16x2_hi(a.w));
    } else {
        for (int i = 0; i < V; ++i) o[i] = inside ? bf2f(p[i]) : 0.0f;
    }
}

template <int V, typename Id>
__device__ __forceinline__ void embedding_token(const bf16* __restrict__ table, const Id* __restrict__ ids,
                                                float* __restrict__ out, int cols, long long vp, long long offset) {
    const long long t = blockIdx.x;
    const long long local = (long long)ids[t] - offset;
    const bool inside = local >= 0 && local < vp;
    const bf16* row = table + (inside ? local : 0) * cols;
    float* o = out + t * cols;
    for (int u = threadIdx.x; u < cols / V; u += blockDim.x) row_to_f32<V>(row + u * V, o + u * V, inside);
}

#define EMBEDDING_ENTRY(NAME, V, ID)                                                                  \
    extern "C" __global__ void NAME(const bf16* table, const ID* ids, float* out, int cols, long long vp, \
                                    long long offset) {                                              \
        embedding_token<V, ID>(table, ids, out, cols, vp, offset);                                    \
    }

EMBEDDING_ENTRY(embedding_i32_v8, 8, int)
EMBEDDING_ENTRY(embedding_i32_s1, 1, int)
EMBEDDING_ENTRY(embedding_i64_v8, 8, long long)
EMBEDDING_ENTRY(embedding_i64_s1, 1, long long)
