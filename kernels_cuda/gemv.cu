// Decode-shaped skinny GEMM, M <= 16 rows: C = A W^T (+ bias), memory-bound on W; or its SwiGLU.
//
//   A    (M, K) bf16 bits, row-major, M <= 16 (the tokens of a decode step)
//   W    (N, K) bf16 bits, row-major (a Hugging Face Linear weight, (out, in))
//   bias (N,)   float32, or a null pointer for none
//   C    (M, N) float32, row-major
//
// SwiGLU (the *_swiglu kernels, as gemm.cu's): W's rows are an MLP's gate and up interleaved,
// row 2i = gate_i, row 2i + 1 = up_i (N = 2I even), bias alike, and C is (M, N/2) float32,
// C[m, i] = silu(acc[m, 2i] + b[2i]) * (acc[m, 2i + 1] + b[2i + 1]), silu(x) = x / (1 + exp(-x)).
// Applied after the sum over all of K: by the block when gridDim.y == 1, else by
// gemv_reduce_swiglu over the partials (which the plain kernels write: no bias, no activation).
//
// Three versions of one kernel, blocks of 8 warps = 256 threads; a warp owns 16 output
// columns (two n8 tiles) and takes 32-wide K blocks of its block's K range
// [blockIdx.y * kc, min(K, (blockIdx.y + 1) * kc)) in turn with the other warps of its
// column group (WARPS_K of them), UNROLL K blocks per loop trip; the next trip's loads are
// issued before this trip's mma, so each thread has 2 x 2 x UNROLL independent 16-byte W
// loads in flight (ld.global.nc, no L1 allocation: W is streamed once; A, small and
// re-read by every block, stays in L1/L2).
//   gemv_bf16        WARPS_K 8, UNROLL 4: 16 columns per block  (ceil(N/64) < 132)
//   gemv_bf16_k2     WARPS_K 2, UNROLL 4: 64 columns per block  (ceil(N/64) >= 132 SMs)
//   gemv_bf16_k2_u2  WARPS_K 2, UNROLL 2: 64 columns per block  (same, K <= 1024)
// (choices measured on an H200 with W read from memory; the wrapper picks.)
// The products run on the tensor cores (mma.m16n8k16, A rows >= M are zero registers):
// a dot product may sum K in any order, so lane (g = lane/4, t = lane%4) loads the 8
// contiguous K values [kb + 8t, kb + 8t + 8) of W row g and of A rows g and g + 8 with one
// 16-byte load each, and uses their words 2s, 2s+1 as the mma's k (2t, 2t+1) and
// (2t+8, 2t+9) of k-step s = 0, 1: A and W see the same permutation of K, so no shuffles.
// The WARPS_K warps' accumulators of a column group are summed in shared memory in warp
// order (deterministic).
// Output: gridDim.y == 1 -> C (+ bias); else float32 partials P (gridDim.y, M, N), no
// bias, summed in split order by gemv_reduce (deterministic, no atomics).
//
// gemv_reduce: C[i] = sum_s P[s][i] + bias[i % N] over the M*N elements; any 1-D launch
// covering M*N threads. gemv_reduce_swiglu: C (M, N/2) from the same sums of each column
// pair (2i, 2i + 1); a launch covering M*N/2 threads.
//
// Launch: grid (ceil(N / columns per block), splits), block (256), 8 KB static shared
// memory, kc a multiple of 256 with splits = ceil(K / kc). Constraints: 1 <= M <= 16,
// K % 8 == 0, A and W 16-byte aligned; N even for SwiGLU. N arbitrary (columns >= N are not loaded or
// stored). Registers: 110 / 106 / 68 per thread, no spills (2 blocks per SM at least).
// The wrapper (mpinfer/backend/cuda_gemm.py) splits K (gemv_bf16 only) when ceil(N/16)
// blocks leave some of the 132 SMs idle, and then into about two blocks per SM.
//
// Checked by bench/gpu/check_gemm.py against NumpyBackend.linear(x, w, b) on the same
// bf16-rounded inputs; timed as bytes (W + A + C) per second against util.copy_bandwidth()
// and next to torch.matmul in bf16 (cuBLAS). SwiGLU: against NumpyBackend.swiglu_linear on
// the [gate; up] rows, timed next to the unfused gemv + silu_mul (swiglu.cu).
#include "common.cuh"

#define GEMV_WARPS 8
#define GEMV_NT 2  // n8 tiles per warp: 16 columns

struct u32x4 { unsigned x, y, z, w; };

// streamed once: read-only path, not kept in L1, 256-byte L2 prefetch
__device__ __forceinline__ u32x4 ld_stream(const bf16* p) {
    u32x4 r;
    asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    return r;
}
// re-read by many blocks: read-only path, cached in L1
__device__ __forceinline__ u32x4 ld_cached(const bf16* p) {
    u32x4 r;
    asm volatile("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    return r;
}
__device__ __forceinline__ unsigned word(const u32x4& v, int i) { return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w; }
__device__ __forceinline__ float silu_mul(float gate, float up) { return gate / (1.0f + expf(-gate)) * up; }

// WARPS_K warps along K (summed in shared memory) x GEMV_WARPS / WARPS_K warps along N;
// each warp loads UNROLL 32-wide K blocks per loop trip. SWIGLU: C (M, N/2) when gridDim.y == 1.
template <int WARPS_K, int UNROLL, bool SWIGLU>
__device__ __forceinline__ void gemv_body(const bf16* __restrict__ A, const bf16* __restrict__ W,
                                          const float* __restrict__ bias, float* __restrict__ out, int M, int N,
                                          int K, int kc) {
    constexpr int WARPS_N = GEMV_WARPS / WARPS_K, COLS = WARPS_N * GEMV_NT * 8;  // columns per block
    __shared__ float red[GEMV_WARPS][GEMV_NT * 128];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wk = warp % WARPS_K, wn = warp / WARPS_K;
    const int g = lane >> 2, t = lane & 3;
    const int n0 = blockIdx.x * COLS + wn * (GEMV_NT * 8);  // this warp's first column
    const int kbeg = blockIdx.y * kc, kend = min(K, kbeg + kc);
    const int nblocks = (kend - kbeg + 31) >> 5;  // 32-wide K blocks of this split

    const bool a_lo = g < M, a_hi = g + 8 < M;  // A rows g and g + 8 exist
    const bf16* a_lo_row = A + (size_t)g * K;
    const bf16* a_hi_row = A + (size_t)(g + 8) * K;
    const bf16* w_row[GEMV_NT];
    bool w_ok[GEMV_NT];
#pragma unroll
    for (int j = 0; j < GEMV_NT; j++) {
        const int n = n0 + j * 8 + g;
        w_ok[j] = n < N;
        w_row[j] = W + (size_t)(w_ok[j] ? n : 0) * K;
    }

    float acc[GEMV_NT][4];
#pragma unroll
    for (int j = 0; j < GEMV_NT; j++)
#pragma unroll
        for (int c = 0; c < 4; c++) acc[j][c] = 0.f;

    // One loop trip's loads: UNROLL K blocks x (NT W rows + A rows g, g + 8) per lane;
    // K blocks past the range load zeros (and add nothing).
    struct Trip { u32x4 w[UNROLL][GEMV_NT], lo[UNROLL], hi[UNROLL]; };
    const u32x4 zero = {0u, 0u, 0u, 0u};
    auto load = [&](Trip& f, int b) {
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            const int k = kbeg + ((b + u * WARPS_K) << 5) + 8 * t;  // this lane's 8 K values
            const bool k_ok = k < kend;                                // K % 8 == 0: all 8 or none
#pragma unroll
            for (int j = 0; j < GEMV_NT; j++) f.w[u][j] = (k_ok && w_ok[j]) ? ld_stream(w_row[j] + k) : zero;
            f.lo[u] = (k_ok && a_lo) ? ld_cached(a_lo_row + k) : zero;
            f.hi[u] = (k_ok && a_hi) ? ld_cached(a_hi_row + k) : zero;
        }
    };
    auto compute = [&](const Trip& f) {
#pragma unroll
        for (int u = 0; u < UNROLL; u++)
#pragma unroll
            for (int s = 0; s < 2; s++) {
                const unsigned a[4] = {word(f.lo[u], 2 * s), word(f.hi[u], 2 * s), word(f.lo[u], 2 * s + 1),
                                       word(f.hi[u], 2 * s + 1)};
#pragma unroll
                for (int j = 0; j < GEMV_NT; j++) {
                    const unsigned bw[2] = {word(f.w[u][j], 2 * s), word(f.w[u][j], 2 * s + 1)};
                    mma_bf16_16816(acc[j], a, bw);
                }
            }
    };
    // two trips in flight: the next trip's loads are issued before this trip's mma
    constexpr int TRIP = WARPS_K * UNROLL;  // K blocks per loop trip of a warp row
    Trip f0, f1;
    load(f0, wk);
    for (int b = wk; b < nblocks; b += 2 * TRIP) {
        load(f1, b + TRIP);
        compute(f0);
        load(f0, b + 2 * TRIP);
        compute(f1);
    }

    // accumulator c of n tile j: row g + 8 * (c >> 1), column 8j + 2t + (c & 1)
#pragma unroll
    for (int j = 0; j < GEMV_NT; j++)
#pragma unroll
        for (int c = 0; c < 4; c++) red[warp][j * 128 + c * 32 + lane] = acc[j][c];
    __syncthreads();
    // element ei = j * 128 + c * 32 + l of warp column en: the WARPS_K warps' sum of it
    auto total = [&](int en, int ei) {
        float v = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS_K; w++) v += red[en * WARPS_K + w][ei];
        return v;
    };
    const int col0 = blockIdx.x * COLS;
    if (SWIGLU && gridDim.y == 1) {
        // one step per (gate, up) pair: elements c = 2h and 2h + 1 of lane l, columns 2i, 2i + 1
        for (int e = tid; e < WARPS_N * GEMV_NT * 64; e += GEMV_WARPS * 32) {
            const int en = e / (GEMV_NT * 64), ep = e % (GEMV_NT * 64);  // warp column, pair
            const int j = ep >> 6, h = (ep >> 5) & 1, l = ep & 31;
            const int ei = j * 128 + h * 64 + l;
            const int row = (l >> 2) + (h << 3);
            const int col = col0 + en * (GEMV_NT * 8) + j * 8 + 2 * (l & 3);  // even: N even holds the pair
            if (row < M && col < N) {
                const float gate = total(en, ei) + (bias ? bias[col] : 0.f);
                const float up = total(en, ei + 32) + (bias ? bias[col + 1] : 0.f);
                out[(size_t)row * (N >> 1) + (col >> 1)] = silu_mul(gate, up);
            }
        }
        return;
    }
    for (int e = tid; e < WARPS_N * GEMV_NT * 128; e += GEMV_WARPS * 32) {
        const int en = e / (GEMV_NT * 128), ei = e % (GEMV_NT * 128);  // warp column, element
        const int j = ei >> 7, c = (ei >> 5) & 3, l = ei & 31;
        const float v = total(en, ei);
        const int row = (l >> 2) + ((c >> 1) << 3);
        const int col = col0 + en * (GEMV_NT * 8) + j * 8 + 2 * (l & 3) + (c & 1);
        if (row < M && col < N) {
            if (gridDim.y == 1) {
                out[(size_t)row * N + col] = v + (bias ? bias[col] : 0.f);
            } else {
                out[((size_t)blockIdx.y * M + row) * N + col] = v;
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)
gemv_bf16(const bf16* __restrict__ A, const bf16* __restrict__ W, const float* __restrict__ bias,
          float* __restrict__ out, int M, int N, int K, int kc) {
    gemv_body<GEMV_WARPS, 4, false>(A, W, bias, out, M, N, K, kc);
}

extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)
gemv_bf16_swiglu(const bf16* __restrict__ A, const bf16* __restrict__ W, const float* __restrict__ bias,
                 float* __restrict__ out, int M, int N, int K, int kc) {
    gemv_body<GEMV_WARPS, 4, true>(A, W, bias, out, M, N, K, kc);
}

extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)
gemv_bf16_k2(const bf16* __restrict__ A, const bf16* __restrict__ W, const float* __restrict__ bias,
             float* __restrict__ out, int M, int N, int K, int kc) {
    gemv_body<2, 4, false>(A, W, bias, out, M, N, K, kc);
}

extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)
gemv_bf16_k2_swiglu(const bf16* __restrict__ A, const bf16* __restrict__ W, const float* __restrict__ bias,
                    float* __restrict__ out, int M, int N, int K, int kc) {
    gemv_body<2, 4, true>(A, W, bias, out, M, N, K, kc);
}

extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)
gemv_bf16_k2_u2(const bf16* __restrict__ A, const bf16* __restrict__ W, const float* __restrict__ bias,
                float* __restrict__ out, int M, int N, int K, int kc) {
    gemv_body<2, 2, false>(A, W, bias, out, M, N, K, kc);
}

extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)
gemv_bf16_k2_u2_swiglu(const bf16* __restrict__ A, const bf16* __restrict__ W, const float* __restrict__ bias,
                       float* __restrict__ out, int M, int N, int K, int kc) {
    gemv_body<2, 2, true>(A, W, bias, out, M, N, K, kc);
}

extern "C" __global__ void gemv_reduce(const float* __restrict__ part, const float* __restrict__ bias,
                                       float* __restrict__ C, int MN, int N, int splits) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= MN) return;
    float v = bias ? bias[i % N] : 0.f;
    for (int s = 0; s < splits; s++) v += part[(size_t)s * MN + i];
    C[i] = v;
}

extern "C" __global__ void gemv_reduce_swiglu(const float* __restrict__ part, const float* __restrict__ bias,
                                              float* __restrict__ C, int MI, int N, int splits) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;  // C (M, N/2) element; MI = M * N/2
    if (i >= MI) return;
    const int MN = 2 * MI, p = 2 * i, col = p % N;  // N even: the pair (col, col + 1) in one row
    float gate = bias ? bias[col] : 0.f, up = bias ? bias[col + 1] : 0.f;
    for (int s = 0; s < splits; s++) {
        const float2 v = *(const float2*)(part + (size_t)s * MN + p);
        gate += v.x;
        up += v.y;
    }
    C[i] = silu_mul(gate, up);
}
