// Shared device helpers for every kernel file (included with -I kernels_cuda).
// NVRTC compiles these files with no CUDA headers on its search path (CI has none), so
// bf16 is carried as its raw 16 bits (unsigned short) and every conversion and tensor-core
// instruction is written here in plain C++ and inline PTX.
#pragma once

typedef unsigned short bf16;  // bfloat16 bits: the upper half of a float32

__device__ __forceinline__ float bf2f(bf16 x) { return __uint_as_float(((unsigned)x) << 16); }

// float32 -> bfloat16, round to nearest even (as torch and ml_dtypes); NaN stays NaN
__device__ __forceinline__ bf16 f2bf(float f) {
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}

// two floats -> one register of two bf16 (lo in the low half), round to nearest even
__device__ __forceinline__ unsigned pack_bf16x2(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
__device__ __forceinline__ float bf16x2_lo(unsigned r) { return __uint_as_float(r << 16); }
__device__ __forceinline__ float bf16x2_hi(unsigned r) { return __uint_as_float(r & 0xffff0000u); }

// D += A(16x16, row) * B(16x8, col), bf16 inputs, fp32 accumulators (PTX ISA "mma.m16n8k16")
__device__ __forceinline__ void mma_bf16_16816(float d[4], const unsigned a[4], const unsigned b[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ unsigned smem_addr(const void* p) {
    return (unsigned)__cvta_generic_to_shared(p);
}

// ldmatrix: four (or two) 8x8 b16 matrices from shared memory, one row address per lane
__device__ __forceinline__ void ldmatrix_x4(unsigned r[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned r[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x2(unsigned r[2], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(smem_addr(p)));
}

// 16-byte asynchronous global -> shared copy; src_bytes < 16 zero-fills the rest (0: all zeros)
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// V consecutive floats (V = 4: one 16-byte access, p 16-byte aligned; else one at a time)
template <int V> __device__ __forceinline__ void load_f32(const float* p, float* v) {
    if constexpr (V == 4) {
        const float4 a = *reinterpret_cast<const float4*>(p);
        v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    } else {
        for (int i = 0; i < V; ++i) v[i] = p[i];
    }
}
template <int V> __device__ __forceinline__ void store_f32(float* p, const float* v) {
    if constexpr (V == 4) {
        *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
    } else {
        for (int i = 0; i < V; ++i) p[i] = v[i];
    }
}

// RoPE (rotate-half) on V pairs: (a, b) = (x[j], x[j + half]) turned by the angle whose
// cos, sin are (c, s): o1 = a c - b s, o2 = b c + a s (rope.cu, rope_kv_store.cu)
template <int V> __device__ __forceinline__ void rope_turn(const float* a, const float* b, const float* c,
                                                           const float* s, float* o1, float* o2) {
#pragma unroll
    for (int i = 0; i < V; ++i) {
        o1[i] = a[i] * c[i] - b[i] * s[i];
        o2[i] = b[i] * c[i] + a[i] * s[i];
    }
}
