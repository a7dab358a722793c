// Decode-shaped GEMM on GGUF-quantized weights (W4A16 / W8A16), M <= 16 rows:
// C = A W^T (+ bias), W dequantized inside the kernel; memory-bound on W's bytes.
//
//   A    (M, K) bf16 bits, row-major, 1 <= M <= 16 (the tokens of a decode step)
//   W    (N, K) in GGUF blocks, raw bytes, row-major: row n is K/32 blocks of 32 weights,
//        row n's bytes at W + n * (K/32) * BB (BB = block bytes); blocks are only 2-byte
//        aligned. Layouts (as gguf.quants / ggml, little-endian):
//          Q8_0 (BB 34): fp16 d, int8 q[32];                       w[i] = d * q[i]
//          Q4_0 (BB 18): fp16 d, uint8 qs[16];                     w[i] = d * (nib[i] - 8)
//          Q4_1 (BB 20): fp16 d, fp16 m, uint8 qs[16];             w[i] = d * nib[i] + m
//        with nib[j] = qs[j] & 15 and nib[j + 16] = qs[j] >> 4 (j < 16).
//   bias (N,)   float32, or a null pointer for none
//   C    (M, N) float32, row-major
//
// Entries gemv_<fmt>_k8 / gemv_<fmt>_k2 for fmt in q8_0, q4_0, q4_1: blocks of 8 warps;
// each warp owns 16 rows of W and WARPS_K warps (8 or 2) share a block's rows, taking the
// 256-wide K chunks (8 GGUF blocks) of the block's K range in turn:
//   k8: WARPS_K 8, 16 rows of W per block   (few rows: N < 64 * 132)
//   k2: WARPS_K 2, 64 rows of W per block   (N >= 64 * 132)
// Each warp streams its chunks through a private 3-stage ring in shared memory with
// cp.async (16-byte pieces of each row's contiguous span, 16 rows x up to 18 pieces per
// chunk, so 2 chunks = 4.6 to 8.7 KB per warp are in flight while it computes a third).
// Unaligned spans (K % 256 != 0, or a split start) are covered by the 16-byte aligned
// pieces around them, the span's start kept as an offset; a piece's bytes past the end
// of W are not read (cp.async zero-fills them).
// Products on the tensor cores with W as the mma's A operand (m16n8k16: 16 rows of W x 16
// K) and the tokens as B (n8: tokens 0..7, a second mma for tokens 8..15 when M > 8), so
// a lane's accumulators belong to the W rows whose blocks it decodes: lane (g = lane/4,
// t = lane%4) decodes rows g and g+8, elements {4t..4t+3} and {16+4t..16+4t+3} of each
// block (4 bytes of nibbles, or 2 x 4 bytes of Q8 q), which become the mma's k
// (2t, 2t+1), (2t+8, 2t+9) of k-step 0 (elements 4t.., 4t+2..) and of k-step 1
// (16+4t.., 16+4t+2..); the same lane loads the same elements of token g's A row
// (two 8-byte loads), so A and W see one permutation of K. The quantized integers are
// exact in bf16 (bits 0x4300 | x are 128 + x for x < 128, then one bf16x2 subtraction),
// so a block's two chained mma (k-steps 0, 1; zero accumulators in) give the exact-product
// dot products of A with q, and its scale is applied in fp32: acc += d * dot (+ m *
// sum(A over the block) for Q4_1, the sum from mma with an all-ones W). The fp16 scales
// are converted by bit manipulation (h2f, exact for all 65536 inputs), each by one lane
// of the 4 that need it (lane t: blocks t and t + 4 of a chunk), handed out by shuffles.
// The WARPS_K warps' accumulators of a row group are summed in shared memory in warp
// order (deterministic).
// Output: gridDim.y == 1 -> C (+ bias); else float32 partials P (gridDim.y, M, N), no
// bias, summed by gemv_reduce of kernels_cuda/gemv.cu (split order, no atomics).
//
// Launch: grid (ceil(N / (16 * 8 / WARPS_K)), splits), block (256), dynamic shared memory
// 8 warps x 3 stages x 16 rows x SLOT bytes (SLOT 176 for Q4_0 / Q4_1, 288 for Q8_0:
// 67584 / 67584 / 110592 bytes, so the wrapper sets the opt-in); qc = GGUF blocks per
// split, a multiple of 8, splits = ceil((K/32) / qc). Constraints: 1 <= M <= 16,
// K % 32 == 0, A 8-byte and W 16-byte aligned, N < 2^31. N arbitrary (rows >= N load
// row N-1's bytes and are never stored). Registers (ptxas, sm_90): 128 / 119 / 115 for
// Q4_1 / Q4_0 / Q8_0, no spills: 2 blocks per SM.
//
// Checked by bench/gpu/check_quant.py against gguf.quants.dequantize of the same bytes
// followed by a float32 matmul with the same bf16 A (rel_err < 1e-2; expected ~1e-6 as
// products and scales are exact); timed (CUDA graphs, W copies over 3x L2) as bytes
// (W blocks + A + C) per second against util.copy_bandwidth(), and against our bf16 gemv
// (cuda_gemm.gemm) and torch.matmul in bf16 on the same shape.
#include "common.cuh"

#define QW 8        // warps per block
#define QROWS 16    // W rows per warp (one mma m16 tile)
#define QCHUNK 8    // GGUF blocks per K chunk (256 K)
#define QSTAGES 3   // chunks in a warp's ring

// fp16 bits -> float, exact for every input (normals, subnormals, zeros, inf, NaN), with
// integer operations and no float subnormal arithmetic (the kernels build with ftz).
__device__ __forceinline__ float h2f(unsigned h) {
    const unsigned sign = (h & 0x8000u) << 16, em = h & 0x7fffu;
    unsigned u = em << 13;
    const unsigned e = em & 0x7c00u;
    u += (e == 0x7c00u) ? (0xe0u << 23) : (0x70u << 23);  // rebias 15 -> 127; inf / NaN -> 255
    float f = __uint_as_float(u);
    if (e == 0u) f = __uint_as_float(u + (1u << 23)) - 6.103515625e-05f;  // subnormal / zero: em * 2^-24
    return __uint_as_float(__float_as_uint(f) | sign);
}

__device__ __forceinline__ unsigned bf16x2_sub(unsigned a, unsigned b) {
    unsigned r;
    asm("sub.rn.bf16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
    return r;
}

// D = A(16x16, row) * B(16x8, col) with zero accumulators in, bf16 inputs, fp32 out
__device__ __forceinline__ void mma_bf16_16816_z(float d[4], const unsigned a[4], const unsigned b[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%10,%10,%10};"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(0.f));
}

// 16-byte global -> shared copy, L2 only (W is streamed once), src_bytes < 16 zero-fills
__device__ __forceinline__ void cp_async16_w(void* dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;" ::"r"(smem_addr(dst)), "l"(src),
                 "r"(src_bytes)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit_m() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait_m() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// 8 bytes of A (4 bf16), re-read by many warps: read-only path, cached in L1
__device__ __forceinline__ uint2 ld_a8(const bf16* p) {
    uint2 r;
    asm volatile("ld.global.nc.v2.u32 {%0,%1}, [%2];" : "=r"(r.x), "=r"(r.y) : "l"(p));
    return r;
}

// 4 bytes at a 2-byte aligned shared-memory address
__device__ __forceinline__ unsigned lds_u32_a2(const unsigned char* p) {
    const unsigned short* h = (const unsigned short*)p;
    return (unsigned)h[0] | ((unsigned)h[1] << 16);
}

// 4 bytes B0..B3 (4 consecutive elements, byte values x < 128 after the mask) -> two bf16
// pairs (B0, B1), (B2, B3) of 128 + (x & mask) (bf16 bits 0x4300 | x), taking the nibble
// at bit `shift` (0 or 4) for Q4, the low 7 bits for Q8.
struct Pairs { unsigned p0, p1; };
__device__ __forceinline__ Pairs nib_pairs(unsigned x, int shift) {
    const unsigned r = __byte_perm(x, 0u, 0x3120u) >> shift;  // bytes B0 B2 B1 B3: B0, B1 at bytes 0, 2
    return {(r & 0x000f000fu) | 0x43004300u, ((r >> 8) & 0x000f000fu) | 0x43004300u};
}

template <int FMT> struct Fmt;
template <> struct Fmt<0> { enum { BB = 34, SLOT = 288 }; };  // Q8_0
template <> struct Fmt<1> { enum { BB = 18, SLOT = 176 }; };  // Q4_0
template <> struct Fmt<2> { enum { BB = 20, SLOT = 176 }; };  // Q4_1

// The 4 bf16 pairs (mma k order: elements 4t,4t+1 | 4t+2,4t+3 | 16+4t.. | 18+4t..) of the
// exact quantized integers of this lane's elements of the block at blk (shared memory):
// q for Q8_0, q - 8 for Q4_0, q for Q4_1.
template <int FMT> __device__ __forceinline__ void decode(const unsigned char* blk, int t, unsigned w[4]) {
    if (FMT == 0) {
        // int8 q = (q & 127) - (q & 128): (128 + (q & 127)) - (128 or 256); bf16 256 = 0x4380
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const unsigned x = lds_u32_a2(blk + 2 + 16 * h + 4 * t);
            const unsigned r = __byte_perm(x, 0u, 0x3120u);
            const unsigned lo0 = (r & 0x007f007fu) | 0x43004300u, s0 = (r & 0x00800080u) | 0x43004300u;
            const unsigned lo1 = ((r >> 8) & 0x007f007fu) | 0x43004300u, s1 = ((r >> 8) & 0x00800080u) | 0x43004300u;
            w[2 * h] = bf16x2_sub(lo0, s0);
            w[2 * h + 1] = bf16x2_sub(lo1, s1);
        }
    } else {
        const unsigned x = lds_u32_a2(blk + (FMT == 1 ? 2 : 4) + 4 * t);
        const unsigned bias = FMT == 1 ? 0x43084308u : 0x43004300u;  // 136 (q - 8) or 128 (q)
        const Pairs lo = nib_pairs(x, 0), hi = nib_pairs(x, 4);
        w[0] = bf16x2_sub(lo.p0, bias);
        w[1] = bf16x2_sub(lo.p1, bias);
        w[2] = bf16x2_sub(hi.p0, bias);
        w[3] = bf16x2_sub(hi.p1, bias);
    }
}

template <int FMT, int WARPS_K>
__device__ __forceinline__ void gemv_q_body(const bf16* __restrict__ A, const unsigned char* __restrict__ W,
                                            const float* __restrict__ bias, float* __restrict__ out, int M, int N,
                                            int K, int qc) {
    constexpr int BB = Fmt<FMT>::BB, SLOT = Fmt<FMT>::SLOT, PIECES = SLOT / 16;
    constexpr int WARPS_N = QW / WARPS_K, COLS = WARPS_N * QROWS;  // W rows per block
    constexpr int STAGE = QROWS * SLOT;                            // bytes of one chunk in the ring
    extern __shared__ __align__(16) unsigned char smem[];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wk = warp % WARPS_K, wn = warp / WARPS_K;
    const int g = lane >> 2, t = lane & 3;
    unsigned char* ring = smem + warp * (QSTAGES * STAGE);

    const int nq = K >> 5;                        // GGUF blocks per row
    const long long rb = (long long)nq * BB;      // bytes per row
    const long long total = rb * N;               // bytes of W
    const int n0 = blockIdx.x * COLS + wn * QROWS;  // this warp's first W row
    const int qbeg = blockIdx.y * qc, qend = min(nq, qbeg + qc);
    const int nchunks = (qend - qbeg + QCHUNK - 1) / QCHUNK;  // of the block's K range
    const int mine = nchunks > wk ? (nchunks - wk + WARPS_K - 1) / WARPS_K : 0;  // chunks wk, wk+WARPS_K, ...

    // row r of the warp's 16 (rows >= N read row N-1): start of the span of chunk c
    auto span_start = [&](int r, int c) -> long long {
        return (long long)min(n0 + r, N - 1) * rb + (long long)(qbeg + c * QCHUNK) * BB;
    };
    // issue chunk i of this warp (if it has one) into its ring stage; always commits a group
    auto issue = [&](int i) {
        if (i < mine) {
            const int c = wk + i * WARPS_K;
            const int nb = min(QCHUNK, qend - (qbeg + c * QCHUNK));  // GGUF blocks in the chunk
            unsigned char* stage = ring + (i % QSTAGES) * STAGE;
            for (int p = lane; p < QROWS * PIECES; p += 32) {
                const int r = p / PIECES, k = p % PIECES;
                const long long s = span_start(r, c), first = s & ~15ll, src = first + 16 * k;
                if (src < s + (long long)nb * BB)
                    cp_async16_w(stage + r * SLOT + 16 * k, W + src, (int)min(16ll, total - src));
            }
        }
        cp_async_commit_m();
    };

    const bf16* a_lo = A + (size_t)g * K;        // token g
    const bf16* a_hi = A + (size_t)(g + 8) * K;  // token g + 8
    const bool lo_ok = g < M, hi_ok = g + 8 < M, two = M > 8;
    float acc[2][4];
#pragma unroll
    for (int j = 0; j < 2; j++)
#pragma unroll
        for (int c = 0; c < 4; c++) acc[j][c] = 0.f;
    const unsigned ONES[4] = {0x3f803f80u, 0x3f803f80u, 0x3f803f80u, 0x3f803f80u};  // bf16 1.0 pairs

#pragma unroll
    for (int i = 0; i < QSTAGES - 1; i++) issue(i);
    for (int i = 0; i < mine; i++) {
        issue(i + QSTAGES - 1);  // into the stage read by chunk i - 1, done before the __syncwarp below
        const int c = wk + i * WARPS_K, qb0 = qbeg + c * QCHUNK;
        const int nb = min(QCHUNK, qend - qb0);
        // A of the chunk: token g (and g + 8), elements 4t.. and 16+4t.. of each block
        uint2 xa[QCHUNK][2], xb[QCHUNK][2];
        const uint2 z = make_uint2(0u, 0u);
#pragma unroll
        for (int q = 0; q < QCHUNK; q++) {
            const int k = (qb0 + q) * 32 + 4 * t;
            const bool ok = q < nb;
            xa[q][0] = (ok && lo_ok) ? ld_a8(a_lo + k) : z;
            xa[q][1] = (ok && lo_ok) ? ld_a8(a_lo + k + 16) : z;
            xb[q][0] = (ok && hi_ok) ? ld_a8(a_hi + k) : z;
            xb[q][1] = (ok && hi_ok) ? ld_a8(a_hi + k + 16) : z;
        }
        cp_async_wait_m<QSTAGES - 1>();  // this lane's pieces of chunk i have landed
        __syncwarp();                    // ... and every lane's

        const unsigned char* stage = ring + (i % QSTAGES) * STAGE;
        const unsigned char* row_lo = stage + g * SLOT + (int)(span_start(g, c) & 15);
        const unsigned char* row_hi = stage + (g + 8) * SLOT + (int)(span_start(g + 8, c) & 15);
        // scales: this lane converts those of blocks t and t + 4 of rows g, g + 8 (d; m for Q4_1)
        float sc[2][2][2];  // [block t / t+4][row g / g+8][d / m]
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int q = t + 4 * h;
            const bool ok = q < nb;
            const unsigned short* dl = (const unsigned short*)(row_lo + q * BB);
            const unsigned short* dh = (const unsigned short*)(row_hi + q * BB);
            sc[h][0][0] = ok ? h2f(dl[0]) : 0.f;
            sc[h][1][0] = ok ? h2f(dh[0]) : 0.f;
            sc[h][0][1] = (ok && FMT == 2) ? h2f(dl[1]) : 0.f;
            sc[h][1][1] = (ok && FMT == 2) ? h2f(dh[1]) : 0.f;
        }
#pragma unroll
        for (int q = 0; q < QCHUNK; q++) {
            const int src = (lane & ~3) | (q & 3);  // the lane of this row group that converted block q
            const float d_lo = __shfl_sync(0xffffffffu, sc[q >> 2][0][0], src);
            const float d_hi = __shfl_sync(0xffffffffu, sc[q >> 2][1][0], src);
            float m_lo = 0.f, m_hi = 0.f;
            if (FMT == 2) {
                m_lo = __shfl_sync(0xffffffffu, sc[q >> 2][0][1], src);
                m_hi = __shfl_sync(0xffffffffu, sc[q >> 2][1][1], src);
            }
            if (q >= nb) continue;  // warp-uniform
            unsigned wl[4], wh[4];
            decode<FMT>(row_lo + q * BB, t, wl);
            decode<FMT>(row_hi + q * BB, t, wh);
#pragma unroll
            for (int j = 0; j < 2; j++) {  // token tiles 0..7, 8..15
                if (j == 1 && !two) break;
                const uint2* x = j == 0 ? xa[q] : xb[q];
                // the block's dot products (k-step 0 then 1), and for Q4_1 the sums of A
                float dot[4], sum[4];
                const unsigned a0[4] = {wl[0], wh[0], wl[1], wh[1]}, a1[4] = {wl[2], wh[2], wl[3], wh[3]};
                const unsigned b0[2] = {x[0].x, x[0].y}, b1[2] = {x[1].x, x[1].y};
                mma_bf16_16816_z(dot, a0, b0);
                mma_bf16_16816(dot, a1, b1);
                if (FMT == 2) {
                    mma_bf16_16816_z(sum, ONES, b0);
                    mma_bf16_16816(sum, ONES, b1);
                }
                // accumulator e: W row g + 8 * (e >> 1), token 8j + 2t + (e & 1)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const float d = e < 2 ? d_lo : d_hi;
                    acc[j][e] += d * dot[e];
                    if (FMT == 2) acc[j][e] += (e < 2 ? m_lo : m_hi) * sum[e];
                }
            }
        }
        __syncwarp();  // every lane is done with this stage before it is refilled
    }
    cp_async_wait_m<0>();
    __syncthreads();  // the ring becomes the reduction buffer

    float* red = (float*)smem;  // [warp][token tile][e][lane]
#pragma unroll
    for (int j = 0; j < 2; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) red[warp * 256 + j * 128 + e * 32 + lane] = acc[j][e];
    __syncthreads();
    for (int x = tid; x < WARPS_N * 256; x += QW * 32) {
        const int en = x >> 8, xi = x & 255;  // warp row group, element
        const int j = xi >> 7, e = (xi >> 5) & 3, l = xi & 31;
        float v = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS_K; w++) v += red[(en * WARPS_K + w) * 256 + xi];
        const int n = blockIdx.x * COLS + en * QROWS + (l >> 2) + 8 * (e >> 1);
        const int m = 8 * j + 2 * (l & 3) + (e & 1);
        if (m < M && n < N) {
            if (gridDim.y == 1) {
                out[(size_t)m * N + n] = v + (bias ? bias[n] : 0.f);
            } else {
                out[((size_t)blockIdx.y * M + m) * N + n] = v;
            }
        }
    }
}

#define GEMV_Q_ENTRY(name, FMT, WARPS_K)                                                                       \
    extern "C" __global__ void __launch_bounds__(QW * 32, 2)                                                   \
    name(const bf16* __restrict__ A, const unsigned char* __restrict__ W, const float* __restrict__ bias,     \
         float* __restrict__ out, int M, int N, int K, int qc) {                                              \
        gemv_q_body<FMT, WARPS_K>(A, W, bias, out, M, N, K, qc);                                               \
    }

GEMV_Q_ENTRY(gemv_q8_0_k8, 0, 8)
GEMV_Q_ENTRY(gemv_q8_0_k2, 0, 2)
GEMV_Q_ENTRY(gemv_q4_0_k8, 1, 8)
GEMV_Q_ENTRY(gemv_q4_0_k2, 1, 2)
GEMV_Q_ENTRY(gemv_q4_1_k8, 2, 8)
GEMV_Q_ENTRY(gemv_q4_1_k2, 2, 2)
