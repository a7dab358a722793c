// Prefill-shaped GEMM on tensor cores: C = A W^T (+ bias), or its SwiGLU.
//
//   A    (M, K) bf16 bits, row-major (activations)
//   W    (N, K) bf16 bits, row-major (a Hugging Face Linear weight, (out, in))
//   bias (N,)   float32, or a null pointer for none
//   C    (M, N) float32, row-major
//
// SwiGLU epilogue (the *_swiglu kernels): W holds an MLP's gate and up rows interleaved,
// row 2i = gate_i, row 2i + 1 = up_i (N = 2I even), bias alike, and
//   C    (M, N/2) float32, C[m, i] = silu(acc[m, 2i] + b[2i]) * (acc[m, 2i + 1] + b[2i + 1]),
//   silu(x) = x / (1 + exp(-x)) (as swiglu.cu): the (M, N) product is never written. An
// accumulator fragment holds columns (2t, 2t + 1) of its n8 tile at an even offset, so each
// thread holds whole (gate, up) pairs: the epilogue needs no shuffle.
//
// Kernels (one template gemm_body<BM, BN, WARPS_M, WARPS_N, STAGES, SWIGLU>, K tile 64, 8 warps
// as 2 (M) x 4 (N), 3 stages), each also as <name>_swiglu:
//   gemm_bf16_128x256: block tile 128 x 256, warp tile 64 x 64, 1 block per SM.
//       The big-problem kernel (fewest shared-memory bytes per mma).
//   gemm_bf16_128x128: block tile 128 x 128, warp tile 64 x 32, 2 blocks per SM.
//       For problems whose 128x256 grid would leave over half of the 132 SMs idle.
// (Measured on an H200: 4-warp 128x128, 16-warp 256x128 / 128x256, 256x128 and 4-stage
// versions were no faster; ~330-370 TFLOP/s at 4096..8192, about 45-50% of cuBLAS, whose wgmma
// kernels mma.sync cannot match; ncu: tensor pipe ~57% busy, stalls mostly "wait" and
// "math pipe throttle".)
//
// Per K tile: 16-byte cp.async of A and W rows into shared memory, a STAGES-deep ring of
// K tiles in flight (cp.async.wait_group STAGES-2), ldmatrix (non-transposed: both A and
// W are K-contiguous, so W's rows are the "col" B operand of mma.m16n8k16 directly) and
// mma.sync m16n8k16 bf16 with fp32 accumulators. Shared rows are 64 bf16 = 128 bytes =
// 8 chunks of 16 bytes; chunk c of row r is stored at chunk c ^ (r & 7), so the 8 row
// addresses of each ldmatrix phase (8 consecutive rows, one chunk) and the 8 cp.async
// stores of a row hit 8 different 16-byte bank groups: no bank conflicts, no padding.
//
// Budget (sm_90: 227 KB shared per block, 228 KB and 64K registers per SM):
//   128x256: smem 3 x (128 + 256) x 64 x 2 B = 144 KB, 1 block/SM; 236 registers
//            (128 fp32 accumulators + 2 x (16 A + 16 B) double-buffered fragment words +
//            addresses), no spills, under the 255 cap of __launch_bounds__(256, 1).
//   128x128: smem 3 x (128 + 128) x 64 x 2 B = 96 KB, 2 blocks/SM; 64 accumulators +
//            2 x (16 + 8) fragment words, 118 registers, no spills, under the 128 cap of
//            __launch_bounds__(256, 2).
//
// Launch: grid (ceil(M/128) * ceil(N/BN), 1, 1), block (32 x warps, 1, 1), dynamic shared
// memory as above (opt-in above 48 KB). The 1-D grid is walked in groups of 8 block-rows
// (all N tiles of 8 M tiles before the next 8) so concurrently running blocks share A and
// W tiles in L2.
// Constraints: K % 8 == 0 (16-byte rows), A and W 16-byte aligned; N even for SwiGLU. M, N
// arbitrary: rows of A and W past M or N and the K tail past K are zero-filled by cp.async
// (src size 0), stores past M or N are skipped. Offsets are 64-bit.
//
// Checked by bench/gpu/check_gemm.py against NumpyBackend.linear(x, w, b) on the same
// bf16-rounded inputs (GPU float32 matmul of those inputs at the big shapes); timed
// against torch.matmul in bf16 (cuBLAS); SwiGLU against NumpyBackend.swiglu_linear on the
// [gate; up] rows and timed against the unfused gemm + silu_mul (swiglu.cu). Wrapper:
// mpinfer/backend/cuda_gemm.py gemm().
#include "common.cuh"

#define GEMM_BK 64  // bf16 per shared row: 128 bytes, 8 chunks of 16 bytes
#define GEMM_GROUP_M 8

// Element offset of (row, 16-byte chunk) inside a [rows][64] bf16 shared tile, swizzled.
__device__ __forceinline__ int swz(int row, int chunk) { return row * GEMM_BK + ((chunk ^ (row & 7)) << 3); }

// One K tile of ROWS rows of a (rows_total, K) row-major matrix into a swizzled shared
// tile by THREADS threads; rows >= rows_total and columns >= K are zero-filled.
template <int ROWS, int THREADS>
__device__ __forceinline__ void load_tile(bf16* s, const bf16* g, int row0, int rows_total, int k0, int K, int tid) {
#pragma unroll
    for (int i = 0; i < ROWS * 8 / THREADS; i++) {
        int idx = tid + i * THREADS;
        int r = idx >> 3, c = idx & 7;
        int gr = row0 + r, gk = k0 + c * 8;
        bool ok = gr < rows_total && gk < K;
        const bf16* src = ok ? g + (size_t)gr * K + gk : g;  // a valid address even when nothing is read
        cp_async16(s + swz(r, c), src, ok ? 16 : 0);
    }
}

// Block tile BM x BN of A W^T from WARPS_M x WARPS_N warps, STAGES K tiles in flight; under
// SWIGLU its (M, BN/2) tile of silu(gate) * up goes to C (M, N/2).
template <int BM, int BN, int WARPS_M, int WARPS_N, int STAGES, bool SWIGLU>
__device__ __forceinline__ void gemm_body(const bf16* __restrict__ A, const bf16* __restrict__ W,
                                          const float* __restrict__ bias, float* __restrict__ C, int M, int N, int K) {
    constexpr int BK = GEMM_BK, THREADS = WARPS_M * WARPS_N * 32;
    constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;  // warp tile
    constexpr int MI = WM / 16, NI = WN / 8;              // mma tiles per warp
    static_assert(NI % 2 == 0 && (BM * 8) % THREADS == 0 && (BN * 8) % THREADS == 0, "tile shape");
    extern __shared__ __align__(128) unsigned char smem_raw[];
    bf16* sA = (bf16*)smem_raw;        // [STAGES][BM][BK]
    bf16* sB = sA + STAGES * BM * BK;  // [STAGES][BN][BK]

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = (warp / WARPS_N) * WM, wn = (warp % WARPS_N) * WN;

    // grouped tile order for L2 reuse
    const int tiles_m = (M + BM - 1) / BM, tiles_n = (N + BN - 1) / BN;
    const int pid = blockIdx.x;
    const int group = pid / (GEMM_GROUP_M * tiles_n);
    const int first_m = group * GEMM_GROUP_M;
    const int group_m = min(tiles_m - first_m, GEMM_GROUP_M);
    const int tile_m = first_m + (pid % (GEMM_GROUP_M * tiles_n)) % group_m;
    const int tile_n = (pid % (GEMM_GROUP_M * tiles_n)) / group_m;
    const int m0 = tile_m * BM, n0 = tile_n * BN;

    float acc[MI][NI][4];
#pragma unroll
    for (int i = 0; i < MI; i++)
#pragma unroll
        for (int j = 0; j < NI; j++)
#pragma unroll
            for (int c = 0; c < 4; c++) acc[i][j][c] = 0.f;

    const int ktiles = (K + BK - 1) / BK;
#pragma unroll
    for (int s = 0; s < STAGES - 1; s++) {
        if (s < ktiles) {
            load_tile<BM, THREADS>(sA + s * BM * BK, A, m0, M, s * BK, K, tid);
            load_tile<BN, THREADS>(sB + s * BN * BK, W, n0, N, s * BK, K, tid);
        }
        cp_async_commit();
    }

    // ldmatrix lane roles. A (x4 = 16 rows x 16 k): lanes 0-15 rows 0-15 at k 0-7,
    // lanes 16-31 rows 0-15 at k 8-15 -> registers a0..a3 of mma's A fragment.
    // W (x4 = two n8 tiles x 16 k): lanes 0-7 n 0-7 k 0-7, 8-15 n 0-7 k 8-15,
    // 16-23 n 8-15 k 0-7, 24-31 n 8-15 k 8-15 -> {b0, b1} of n tile 0, then of n tile 1.
    const int a_row = wm + (lane & 15), a_chunk = lane >> 4;
    const int b_row = wn + (lane & 7) + ((lane >> 4) << 3), b_chunk = (lane >> 3) & 1;

    for (int kt = 0; kt < ktiles; kt++) {
        cp_async_wait<STAGES - 2>();  // tile kt has landed (for this thread's copies)
        __syncthreads();              // ... for every thread's, and stage (kt-1) % STAGES is free
        {
            int nk = kt + STAGES - 1;
            if (nk < ktiles) {
                int s = nk % STAGES;
                load_tile<BM, THREADS>(sA + s * BM * BK, A, m0, M, nk * BK, K, tid);
                load_tile<BN, THREADS>(sB + s * BN * BK, W, n0, N, nk * BK, K, tid);
            }
            cp_async_commit();  // always, so the group count per iteration stays one
        }
        const bf16* tA = sA + (kt % STAGES) * BM * BK;
        const bf16* tB = sB + (kt % STAGES) * BN * BK;
        // fragments double-buffered: k step ks + 1 is read from shared memory while the
        // mma of step ks run
        unsigned af[2][MI][4], bfr[2][NI][2];
        auto load_frags = [&](int ks, unsigned (&fa)[MI][4], unsigned (&fb)[NI][2]) {
#pragma unroll
            for (int i = 0; i < MI; i++) ldmatrix_x4(fa[i], tA + swz(a_row + i * 16, ks * 2 + a_chunk));
#pragma unroll
            for (int j = 0; j < NI / 2; j++) {
                unsigned r[4];
                ldmatrix_x4(r, tB + swz(b_row + j * 16, ks * 2 + b_chunk));
                fb[2 * j][0] = r[0];
                fb[2 * j][1] = r[1];
                fb[2 * j + 1][0] = r[2];
                fb[2 * j + 1][1] = r[3];
            }
        };
        load_frags(0, af[0], bfr[0]);
#pragma unroll
        for (int ks = 0; ks < BK / 16; ks++) {
            if (ks + 1 < BK / 16) load_frags(ks + 1, af[(ks + 1) & 1], bfr[(ks + 1) & 1]);
#pragma unroll
            for (int i = 0; i < MI; i++)
#pragma unroll
                for (int j = 0; j < NI; j++) mma_bf16_16816(acc[i][j], af[ks & 1][i], bfr[ks & 1][j]);
        }
    }
    cp_async_wait<0>();  // no copy may be left in flight at exit (only empty groups remain)

    // Epilogue: accumulator (i, j) holds rows g, g+8 and columns 2t, 2t+1 of a 16x8 tile.
    const int g = lane >> 2, t = lane & 3;
    const bool pairs = (N & 1) == 0;  // float2 stores need an even row stride
#pragma unroll
    for (int j = 0; j < NI; j++) {
        const int col = n0 + wn + j * 8 + 2 * t;  // even: under SWIGLU gate col / 2, up beside it
        float b0 = 0.f, b1 = 0.f;
        if (bias) {
            if (col < N) b0 = bias[col];
            if (col + 1 < N) b1 = bias[col + 1];
        }
#pragma unroll
        for (int i = 0; i < MI; i++) {
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const int row = m0 + wm + i * 16 + g + h * 8;
                if (row >= M) continue;
                const float v0 = acc[i][j][2 * h] + b0, v1 = acc[i][j][2 * h + 1] + b1;
                if constexpr (SWIGLU) {  // N even: col < N holds the whole pair
                    if (col < N) C[(size_t)row * (N >> 1) + (col >> 1)] = v0 / (1.0f + expf(-v0)) * v1;
                } else {
                    float* dst = C + (size_t)row * N + col;
                    if (pairs && col + 1 < N) {
                        *(float2*)dst = make_float2(v0, v1);
                    } else {
                        if (col < N) dst[0] = v0;
                        if (col + 1 < N) dst[1] = v1;
                    }
                }
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(256, 1)
gemm_bf16_128x256(const bf16* __restrict__ A, const bf16* __restrict__ W, const float* __restrict__ bias,
                  float* __restrict__ C, int M, int N, int K) {
    gemm_body<128, 256, 2, 4, 3, false>(A, W, bias, C, M, N, K);
}

extern "C" __global__ void __launch_bounds__(256, 1)
gemm_bf16_128x256_swiglu(const bf16* __restrict__ A, const bf16* __restrict__ W, const float* __restrict__ bias,
                         float* __restrict__ C, int M, int N, int K) {
    gemm_body<128, 256, 2, 4, 3, true>(A, W, bias, C, M, N, K);
}

extern "C" __global__ void __launch_bounds__(256, 2)
gemm_bf16_128x128(const bf16* __restrict__ A, const bf16* __restrict__ W, const float* __restrict__ bias,
                  float* __restrict__ C, int M, int N, int K) {
    gemm_body<128, 128, 2, 4, 3, false>(A, W, bias, C, M, N, K);
}

extern "C" __global__ void __launch_bounds__(256, 2)
gemm_bf16_128x128_swiglu(const bf16* __restrict__ A, const bf16* __restrict__ W, const float* __restrict__ bias,
                         float* __restrict__ C, int M, int N, int K) {
    gemm_body<128, 128, 2, 4, 3, true>(A, W, bias, C, M, N, K);
}
