// kv_store: write the new tokens' K (or V) into one layer's bf16 KV pool (paged cache).
//
// kv_store_bf16(const float* x, const int* slots, bf16* pool, int T, int row_elems, int rows)
//   x     (T, Hkv, Dh) float32, contiguous; row_elems = Hkv * Dh, a multiple of 8
//   slots (T,) int32: pool row of each token; a negative slot (or one >= rows) skips the token
//   pool  (rows, Hkv, Dh) uint16 bf16 bits, contiguous, 16-byte aligned; written in place,
//         rounded to nearest even (as util.bf16_bits / torch)
//   One thread per 8 elements: two float4 loads, one 16-byte store.
//   grid (ceil(T * row_elems / 8 / 256)), block (256), no shared memory.
// Checked against NumpyBackend.store_kv (pool[slots] = x) in bench/gpu/check_attention.py:
// the bits must match exactly ("mismatches"). Timed next to torch index_copy_ of bf16 rows: on an
// H200, 16-32k tokens x 8 x 128 run at ~0.79 of copy bandwidth, 2.4x torch.
// Not on the backend's path since rope_kv_store.cu fused RoPE with this store: kept as the
// GPU-verified baseline bench/gpu/check_rope.py times the fused kernel against (remove once
// rope_kv_store has passed there).
#include "common.cuh"

extern "C" __global__ void kv_store_bf16(const float* __restrict__ x, const int* __restrict__ slots,
                                         bf16* __restrict__ pool, int T, int row_elems, int rows) {
    const int vecs = row_elems >> 3;  // 8-element vectors per token
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)T * vecs) return;
    const int t = (int)(i / vecs), c = (int)(i % vecs);
    const int slot = slots[t];
    if (slot < 0 || slot >= rows) return;
    const float4* src = reinterpret_cast<const float4*>(x + (size_t)t * row_elems + c * 8);
    const float4 a = src[0], b = src[1];
    uint4 v;
    v.x = pack_bf16x2(a.x, a.y);
    v.y = pack_bf16x2(a.z, a.w);
    v.z = pack_bf16x2(b.x, b.y);
    v.w = pack_bf16x2(b.z, b.w);
    *reinterpret_cast<uint4*>(pool + (size_t)slot * row_elems + c * 8) = v;
}
