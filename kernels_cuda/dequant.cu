// dequant.cu: GGUF blocks (Q8_0, Q4_0, Q4_1) -> bfloat16 bits, for the prefill product on
// quantized weights: the CUDA backend dequantizes one weight into a reusable bf16 scratch
// buffer and runs the bf16 GEMM (kernels_cuda/gemm.cu) on it, as llama.cpp does for large
// batches. Decode-shaped products (M <= 16) never come here (gemv_q.cu reads the blocks).
//
//   W    nblocks GGUF blocks of 32 weights, raw bytes (BB bytes each: Q8_0 34, Q4_0 18,
//        Q4_1 20), 2-byte aligned; a weight (N, K) row-major is N * K/32 blocks in order,
//        so the row structure does not matter here. Layouts as gguf.quants / ggml:
//          Q8_0: fp16 d, int8 q[32]              w[i] = d * q[i]
//          Q4_0: fp16 d, uint8 qs[16]            w[i] = d * (nib[i] - 8)
//          Q4_1: fp16 d, fp16 m, uint8 qs[16]    w[i] = d * nib[i] + m
//        nib[j] = qs[j] & 15, nib[j + 16] = qs[j] >> 4 (j < 16).
//   out  (nblocks * 32,) bf16 bits, 16-byte aligned: w rounded to nearest even (f2bf).
//
// The numbers are exactly bf16(gguf.quants.dequantize(W)): fp16 -> fp32 by cvt (exact,
// subnormals included), products and the Q4_1 sum in fp32 with __fmul_rn / __fadd_rn (never
// contracted into an fma: numpy rounds d * nib, then the sum), then one rounding to bf16.
//
// Entries dequant_q8_0, dequant_q4_0, dequant_q4_1 (W, out, nblocks): one step = 8
// consecutive weights of a block (4 steps a block: its 8 bytes of q, or of qs whose low or
// high nibbles they are; one 16-byte store). 1-D grid-stride, block 256, grid
// min(ceil(steps / 256), SMs * 8). No shared memory. nblocks < 2^60.
// Checked: bench/gpu/check_quant.py, bit-exact against bf16 of gguf.quants.dequantize on
// random bytes whose scales are finite (subnormals included); timed as bytes (blocks read
// + bf16 written) per second against the copy bandwidth, and inside the prefill product rows.
#include "common.cuh"

__device__ __forceinline__ float fp16_to_f32(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

template <int FMT> struct DequantFmt;
template <> struct DequantFmt<0> { enum { BB = 34, Q = 2 }; };  // Q8_0: q at byte 2
template <> struct DequantFmt<1> { enum { BB = 18, Q = 2 }; };  // Q4_0: qs at byte 2
template <> struct DequantFmt<2> { enum { BB = 20, Q = 4 }; };  // Q4_1: qs at byte 4

template <int FMT>
__device__ __forceinline__ void dequant_body(const unsigned char* __restrict__ W, bf16* __restrict__ out,
                                             long long nblocks) {
    constexpr int BB = DequantFmt<FMT>::BB, Q = DequantFmt<FMT>::Q;
    const long long steps = nblocks * 4;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long s = (long long)blockIdx.x * blockDim.x + threadIdx.x; s < steps; s += stride) {
        const int part = (int)(s & 3);  // weights 8 * part .. 8 * part + 7 of the block
        const unsigned char* blk = W + (s >> 2) * BB;
        const unsigned short* h = reinterpret_cast<const unsigned short*>(blk);
        const float d = fp16_to_f32(h[0]);
        const float m = FMT == 2 ? fp16_to_f32(h[1]) : 0.f;
        // the 8 bytes of this part: q[8 part ..] for Q8_0; qs[8 (part & 1) ..] for Q4 (nibbles
        // low for parts 0, 1, high for 2, 3); 2-byte aligned, read as 4 halves
        const unsigned short* src = reinterpret_cast<const unsigned short*>(blk + Q + 8 * (FMT == 0 ? part : part & 1));
        unsigned char q[8];
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const unsigned short x = src[i];
            q[2 * i] = (unsigned char)(x & 0xff);
            q[2 * i + 1] = (unsigned char)(x >> 8);
        }
        unsigned o[4];
#pragma unroll
        for (int i = 0; i < 4; i++) {
            float v[2];
#pragma unroll
            for (int j = 0; j < 2; j++) {
                const unsigned char b = q[2 * i + j];
                float x;
                if (FMT == 0) x = (float)(signed char)b;
                else x = (float)((part < 2 ? (b & 15) : (b >> 4)) - (FMT == 1 ? 8 : 0));
                v[j] = FMT == 2 ? __fadd_rn(__fmul_rn(d, x), m) : __fmul_rn(d, x);
            }
            o[i] = (unsigned)f2bf(v[0]) | ((unsigned)f2bf(v[1]) << 16);
        }
        reinterpret_cast<uint4*>(out)[s] = make_uint4(o[0], o[1], o[2], o[3]);
    }
}

#define DEQUANT_ENTRY(name, FMT)                                                                         \
    extern "C" __global__ void name(const unsigned char* __restrict__ W, bf16* __restrict__ out,        \
                                    long long nblocks) {                                                 \
        dequant_body<FMT>(W, out, nblocks);                                                              \
    }

DEQUANT_ENTRY(dequant_q8_0, 0)
DEQUANT_ENTRY(dequant_q4_0, 1)
DEQUANT_ENTRY(dequant_q4_1, 2)
