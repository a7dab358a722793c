// rope_kv_store.cu: RoPE on a step's queries and keys fused with the KV-cache store: one pass over
// the QKV projection's output instead of three (rope q, rope k, store k) plus the store of v.
// As NumpyBackend.rope_store_kv (rope.cu's rotation, kv_store.cu's rounding):
//   q_out[t, h]     = rope(q[t, h])                    float32 (T, H, Dh), contiguous (attention's input)
//   k[t, g]         = rope(k[t, g])                    in place (ring / Ulysses attention read it)
//   k_pool[slot[t]] = bf16(rope(k[t])),  v_pool[slot[t]] = bf16(v[t])   (round to nearest even)
// q, k, v float32 (T, H|Hkv, Dh), each token's row contiguous, rows sq, sk, sv elements apart (the
// column blocks of one (T, (H + 2 Hkv) Dh) GEMM output, or separate arrays after Qwen3's q/k norm);
// cos, sin (T, half) float32, half = Dh / 2; slots (T,) int32, a negative one (or >= rows) skips
// the token's store (under CP another rank stores it; padded rows of a decode graph);
// k_pool, v_pool (rows, Hkv, Dh) bf16 bits.
//
// Kernels: rope_kv_store_v4(...) 4 pairs per step: 16-byte loads and float stores, 8-byte bf16
//          stores. Needs half % 4 == 0, sq, sk, sv % 4 == 0 and q, k, v, cos, sin, q_out 16-byte
//          aligned (the wrapper checks). rope_kv_store_s1(...) one pair per step, any layout.
// Launch: one block per token (grid T), block min(256, (H + 2 Hkv) * half / V rounded up to 32);
// a step u covers pair-step j of head u / (half / V): query heads, then key heads, then value
// heads (stored as they are, the two halves of the same j). No shared memory.
// Checked: bench/gpu/check_elementwise.py against NumpyBackend.rope_store_kv (the pools' bits
// exactly, q and k within float32 rounding); timed next to rope.cu + kv_store.cu as run before.
#include "common.cuh"

template <int V> __device__ __forceinline__ void store_bf16(bf16* p, const float* v) {
    if constexpr (V == 4) {
        uint2 r;
        r.x = pack_bf16x2(v[0], v[1]);
        r.y = pack_bf16x2(v[2], v[3]);
        *reinterpret_cast<uint2*>(p) = r;
    } else {
        for (int i = 0; i < V; ++i) p[i] = f2bf(v[i]);
    }
}

template <int V>
__device__ __forceinline__ void rope_kv_token(const float* __restrict__ q, float* k, const float* __restrict__ v,
                                              long long sq, long long sk, long long sv, const float* __restrict__ cos,
                                              const float* __restrict__ sin, const int* __restrict__ slots,
                                              float* __restrict__ q_out, bf16* __restrict__ k_pool,
                                              bf16* __restrict__ v_pool, int H, int Hkv, int half, int rows) {
    const long long t = blockIdx.x;
    const int steps = half / V, dh = 2 * half;
    const int slot = slots[t];
    const bool store = slot >= 0 && slot < rows;
    const long long prow = (long long)slot * Hkv * dh;  // the token's row in the pools
    for (int u = threadIdx.x; u < (H + 2 * Hkv) * steps; u += blockDim.x) {
        const int h = u / steps;
        const int j = (u - h * steps) * V;
        float a[V], b[V];
        if (h >= H + Hkv) {  // a value head: stored as it is
            if (!store) continue;
            const int g = h - H - Hkv;
            load_f32<V>(v + t * sv + g * dh + j, a);
            load_f32<V>(v + t * sv + g * dh + j + half, b);
            store_bf16<V>(v_pool + prow + g * dh + j, a);
            store_bf16<V>(v_pool + prow + g * dh + j + half, b);
            continue;
        }
        float c[V], s[V], o1[V], o2[V];
        const float* src = h < H ? q + t * sq + (long long)h * dh + j : k + t * sk + (long long)(h - H) * dh + j;
        load_f32<V>(src, a);
        load_f32<V>(src + half, b);
        load_f32<V>(cos + t * half + j, c);
        load_f32<V>(sin + t * half + j, s);
        rope_turn<V>(a, b, c, s, o1, o2);
        if (h < H) {
            float* dst = q_out + (t * H + h) * dh + j;
            store_f32<V>(dst, o1);
            store_f32<V>(dst + half, o2);
        } else {
            const int g = h - H;
            float* dst = k + t * sk + (long long)g * dh + j;  // read above by this thread only
            store_f32<V>(dst, o1);
            store_f32<V>(dst + half, o2);
            if (store) {
                store_bf16<V>(k_pool + prow + g * dh + j, o1);
                store_bf16<V>(k_pool + prow + g * dh + j + half, o2);
            }
        }
    }
}

#define ROPE_KV_ARGS                                                                                               \
    const float *q, float *k, const float *v, long long sq, long long sk, long long sv, const float *cos,          \
        const float *sin, const int *slots, float *q_out, bf16 *k_pool, bf16 *v_pool, int H, int Hkv, int half,   \
        int rows

extern "C" __global__ void rope_kv_store_v4(ROPE_KV_ARGS) {
    rope_kv_token<4>(q, k, v, sq, sk, sv, cos, sin, slots, q_out, k_pool, v_pool, H, Hkv, half, rows);
}

extern "C" __global__ void rope_kv_store_s1(ROPE_KV_ARGS) {
    rope_kv_token<1>(q, k, v, sq, sk, sv, cos, sin, slots, q_out, k_pool, v_pool, H, Hkv, half, rows);
}
