// Prefill-shaped GEMM on Hopper's warpgroup tensor cores (sm_90a): C = A W^T (+ bias),
// optionally with the SwiGLU of the MLP fused into the epilogue.
//
//   A    (M, K) bf16 bits, row-major (activations)
//   W    (N, K) bf16 bits, row-major (a Linear weight, (out, in)); both operands K-major,
//        the layout wgmma reads without a transpose
//   bias (N,)   float32, or a null pointer for none
//   C    (M, N) float32, row-major; SwiGLU kernels: C (M, N/2) with
//        C[m, i] = silu(acc[m, 2i] + b[2i]) * (acc[m, 2i+1] + b[2i+1]), silu(x) = x / (1 + e^-x)
//        (W's rows interleaved gate/up: row 2i = gate_i, row 2i+1 = up_i; the bias alike)
//
// Kernels (one template wgmma_body<BN, STAGES, SWIGLU>; block tile 128 x BN, K tile 64):
//   gemm_wgmma_128x256, gemm_wgmma_swiglu_128x256: 4 stages, wgmma m64n256k16
//   gemm_wgmma_128x128, gemm_wgmma_swiglu_128x128: 6 stages, wgmma m64n128k16, for
//       problems whose 128x256 tiles would fill the SMs in more waves of the twice-longer tile
//       (the wrapper's choice: plan() in mpinfer/backend/cuda_wgmma.py)
//
// Block: 3 warpgroups (384 threads), warp-specialized.
//   warpgroup 0, the producer: setmaxnreg.dec to 40 registers; one thread issues the bulk
//     tensor copies (TMA, cp.async.bulk.tensor.2d, 128-byte swizzle) of each K tile of A
//     (box 64 x 128 rows, 16 KB) and of W (box 64 x BN rows) into a ring of STAGES shared
//     stages; each stage's "full" mbarrier completes when its bytes have landed (expect_tx).
//   warpgroups 1 and 2, the consumers: setmaxnreg.inc to 232; consumer c owns rows 64c..64c+63
//     of the block tile and all BN columns: per K tile 4 wgmma.mma_async m64nBNk16 (A and W
//     from shared memory through descriptors, fp32 accumulators in registers: BN/2 per thread),
//     committed as one group; wgmma.wait_group 1 lets the group of K tile k run while tile k+1
//     is issued, then frees the stage of tile k-1 (one arrival per consumer on its "empty"
//     mbarrier, count 2), which the producer waits for before refilling it.
//   Persistent: grid = min(tiles, SMs); block b takes tiles b, b + grid, ... in grouped order
//     (all N tiles of 8 M tiles before the next 8, so the concurrently running tiles share A
//     and W in L2). The ring runs on across tiles, so the producer fetches the next tile's
//     first stages while the consumers run the epilogue of this one.
//   Epilogue from registers: in wgmma's accumulator layout thread (warp w, lane l) of a
//     consumer holds, for each 8-column chunk j, rows 16w + l/4 (+8) and columns
//     8j + 2(l%4), +1: float2 stores (scalar ones when N is odd), or for SwiGLU the
//     (gate, up) pair itself, one float out. Rows >= M and columns >= N are not stored.
//
// Shared memory: a stage is the A tile [128][64] then the W tile [BN][64] bf16, 128-byte
// rows in the TMA's 128B swizzle (16-byte chunk c of row r at chunk c ^ (r % 8); the
// wgmma descriptors say the same: swizzle mode 128B, 8-row groups 1024 bytes apart, each
// k16 step 32 bytes further along the row). Stages start on 1024-byte boundaries (the
// swizzle atom): 128x256: 4 x 48 KB, 128x128: 6 x 32 KB = 192 KB, + mbarriers + 1 KB for
// aligning the base: at most 197,728 bytes of the 227 KB a block may opt into; 1 block per SM.
// Registers: __launch_bounds__(384, 1) caps at 168; setmaxnreg moves them to the consumers
// (128 x 40 + 256 x 232 = 64,512 of 65,536): 128 accumulators + descriptors and addresses.
//
// Tensor maps (built by the wrapper with cuTensorMapEncodeTiled: bf16, 2-D {K, rows},
// row stride 2K bytes, box {64, rows of the tile}, 128B swizzle, out-of-bounds boxes
// zero-filled) are passed by value as `const __grid_constant__` parameters, so a launch
// needs no device memory written first (which would also break CUDA graph capture): CuPy
// passes a size-one numpy array by value, the 128 bytes of the CUtensorMap.
// Zero fill: rows of A past M, rows of W past N and the K tail past K read as zeros (the
// byte count of a stage is always the whole box), so M, N are arbitrary and K needs only
// K % 8 == 0 (the TMA's 16-byte row stride); A and W 16-byte aligned. Offsets are 64-bit.
// A wait on an mbarrier that lasts over 2 s traps: a broken pipeline fails the launch with
// an error instead of hanging the process.
//
// Launch: grid (min(tiles, SMs), 1, 1), block (384, 1, 1), dynamic shared memory as above
// (opt-in beyond 48 KB); built for sm_90a only (wgmma, setmaxnreg): kernels.ARCH_SPECIFIC.
// Checked by bench/gpu/check.py: first alone in a child process (check_gemm.probe: ragged
// shapes, bias, SwiGLU), then check_gemm.py's rows "gemm wgmma": relative error against
// float32 products of the same bf16 inputs, output poisoned with NaN first, timed against
// torch.matmul in bf16 (cuBLAS) and beside the mma.sync kernel (gemm.cu) in the same run.
// CPU checks (tests/test_wgmma.py): the sm_90a cubin's SASS has HGMMA, UTMALDG and
// USETMAXREG and no local memory (ptxas: 168 registers at entry, 0 bytes spilled).
#include "common.cuh"

#define WG_BM 128
#define WG_BK 64  // bf16 per shared row: 128 bytes, the swizzle span
#define WG_GROUP_M 8
#define WG_THREADS 384

struct __align__(64) TensorMap {  // CUtensorMap: 128 opaque bytes
    unsigned long long opaque[16];
};

// ---- mbarriers (shared-memory addresses as 32-bit shared-window offsets) ----
__device__ __forceinline__ void mbar_init(unsigned bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count));
}
__device__ __forceinline__ void mbar_arrive(unsigned bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}
// one arrival that also announces `bytes` of bulk copies completing on this barrier
__device__ __forceinline__ void mbar_arrive_expect_tx(unsigned bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ bool mbar_try_wait(unsigned bar, unsigned parity) {
    unsigned done;
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}"
        : "=r"(done) : "r"(bar), "r"(parity) : "memory");
    return done;
}
__device__ __forceinline__ unsigned long long globaltimer() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
// until the phase of this parity has completed (acquire: the bytes and stores it guards are visible)
__device__ __forceinline__ void mbar_wait(unsigned bar, unsigned parity) {
    if (mbar_try_wait(bar, parity)) return;
    const unsigned long long t0 = globaltimer();
    while (!mbar_try_wait(bar, parity))
        if (globaltimer() - t0 > 2000000000ull) __trap();
}

// K tile (k0, row0) of the 2-D tensor behind map into shared memory at dst, completing on bar
__device__ __forceinline__ void tma_load(unsigned dst, const TensorMap* map, unsigned bar, int k0, int row0) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];"
        ::"r"(dst), "l"(map), "r"(k0), "r"(row0), "r"(bar) : "memory");
}

// ---- wgmma ----
// Shared-memory matrix descriptor of a K-major tile in the 128B swizzle: start address / 16,
// leading byte offset 16 (unused by swizzled K-major layouts), stride byte offset 1024
// (8 rows of 128 bytes), swizzle mode 1 = 128B in bits 62-63.
__device__ __forceinline__ unsigned long long sw128_desc(unsigned addr) {
    return (unsigned long long)((addr & 0x3FFFF) >> 4) | (1ull << 16) | (64ull << 32) | (1ull << 62);
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}
// keeps the compiler from moving accumulator reads or writes across the async wgmma
template <int R> __device__ __forceinline__ void fence_acc(float (&d)[R]) {
#pragma unroll
    for (int i = 0; i < R; i++) asm volatile("" : "+f"(d[i])::"memory");
}

#define F8(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
              "+f"(d[i + 6]), "+f"(d[i + 7])
#define F64(i) F8(i), F8(i + 8), F8(i + 16), F8(i + 24), F8(i + 32), F8(i + 40), F8(i + 48), F8(i + 56)

// d (64 x BN fp32, BN/2 per thread) += A (64 x 16) W^T, both from shared memory
template <int BN> __device__ __forceinline__ void wgmma_k16(float (&d)[BN / 2], unsigned long long da,
                                                             unsigned long long dw);
template <> __device__ __forceinline__ void wgmma_k16<256>(float (&d)[128], unsigned long long da,
                                                           unsigned long long dw) {
    asm volatile(
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
        "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
        "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
        "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "
        "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "
        "%128, %129, 1, 1, 1, 0, 0;"
        : F64(0), F64(64)
        : "l"(da), "l"(dw));
}
template <> __device__ __forceinline__ void wgmma_k16<128>(float (&d)[64], unsigned long long da,
                                                           unsigned long long dw) {
    asm volatile(
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "%64, %65, 1, 1, 1, 0, 0;"
        : F64(0)
        : "l"(da), "l"(dw));
}

// Origin (m0, n0) of tile t in grouped order: GROUP_M tile rows at a time, all their N tiles.
__device__ __forceinline__ void tile_origin(int t, int tiles_m, int tiles_n, int bn, int& m0, int& n0) {
    const int per_group = WG_GROUP_M * tiles_n;
    const int first_m = (t / per_group) * WG_GROUP_M;
    const int group_m = min(tiles_m - first_m, WG_GROUP_M);
    const int r = t % per_group;
    m0 = (first_m + r % group_m) * WG_BM;
    n0 = (r / group_m) * bn;
}

template <int BN, int STAGES, bool SWIGLU>
__device__ __forceinline__ void wgmma_body(const TensorMap* mapA, const TensorMap* mapW, const float* __restrict__ bias,
                                           float* __restrict__ C, int M, int N, int K) {
    constexpr unsigned A_BYTES = WG_BM * WG_BK * 2, STAGE_BYTES = A_BYTES + BN * WG_BK * 2;
    extern __shared__ __align__(1024) unsigned char smem_raw[];
    const unsigned base = (smem_addr(smem_raw) + 1023u) & ~1023u;  // 128B-swizzle atoms are 1024-byte aligned
    const unsigned full = base + STAGES * STAGE_BYTES, empty = full + STAGES * 8;  // STAGES mbarriers each
    const int wg = threadIdx.x / 128, tid = threadIdx.x % 128;
    if (threadIdx.x == 0) {
        for (int s = 0; s < STAGES; s++) {
            mbar_init(full + 8 * s, 1);   // the producer's arrive.expect_tx (+ the bytes)
            mbar_init(empty + 8 * s, 2);  // one arrival per consumer warpgroup
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    const int tiles_m = (M + WG_BM - 1) / WG_BM, tiles_n = (N + BN - 1) / BN, tiles = tiles_m * tiles_n;
    const int ktiles = (K + WG_BK - 1) / WG_BK;
    int s = 0;           // ring position, and
    unsigned phase = 0;  // parity of its current round, as the producer and each consumer walk it alike

    if (wg == 0) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
        if (tid != 0) return;
        for (int t = blockIdx.x; t < tiles; t += gridDim.x) {
            int m0, n0;
            tile_origin(t, tiles_m, tiles_n, BN, m0, n0);
            for (int kt = 0; kt < ktiles; kt++) {
                mbar_wait(empty + 8 * s, phase ^ 1);  // the previous round's data consumed (round 0: passes)
                mbar_arrive_expect_tx(full + 8 * s, STAGE_BYTES);
                tma_load(base + s * STAGE_BYTES, mapA, full + 8 * s, kt * WG_BK, m0);
                tma_load(base + s * STAGE_BYTES + A_BYTES, mapW, full + 8 * s, kt * WG_BK, n0);
                if (++s == STAGES) s = 0, phase ^= 1;
            }
        }
    } else {
        asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
        const int c = wg - 1;  // this consumer's 64 rows of the tile
        const int warp = tid / 32, lane = tid % 32;
        float d[BN / 2];
        for (int t = blockIdx.x; t < tiles; t += gridDim.x) {
            int m0, n0;
            tile_origin(t, tiles_m, tiles_n, BN, m0, n0);
#pragma unroll
            for (int i = 0; i < BN / 2; i++) d[i] = 0.f;
            fence_acc(d);
            int prev = 0;
            for (int kt = 0; kt < ktiles; kt++) {
                mbar_wait(full + 8 * s, phase);
                const unsigned a = base + s * STAGE_BYTES + c * 64 * 128, w = base + s * STAGE_BYTES + A_BYTES;
                wgmma_fence();
#pragma unroll
                for (int k = 0; k < WG_BK / 16; k++) wgmma_k16<BN>(d, sw128_desc(a + 32 * k), sw128_desc(w + 32 * k));
                wgmma_commit();
                wgmma_wait<1>();  // K tile kt-1's group is done: its stage may be refilled
                if (kt > 0 && tid == 0) mbar_arrive(empty + 8 * prev);
                prev = s;
                if (++s == STAGES) s = 0, phase ^= 1;
            }
            wgmma_wait<0>();
            fence_acc(d);
            if (tid == 0) mbar_arrive(empty + 8 * prev);

            const int row0 = m0 + c * 64 + warp * 16 + (lane >> 2);
#pragma unroll
            for (int j = 0; j < BN / 8; j++) {
                const int col = n0 + j * 8 + 2 * (lane & 3);  // even
                if (col >= N) continue;
                const float b0 = bias ? bias[col] : 0.f;
                const float b1 = bias && col + 1 < N ? bias[col + 1] : 0.f;
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    const int row = row0 + 8 * h;
                    if (row >= M) continue;
                    const float v0 = d[4 * j + 2 * h] + b0, v1 = d[4 * j + 2 * h + 1] + b1;
                    if (SWIGLU) {  // N even (the wrapper checks): col + 1 < N
                        C[(size_t)row * (N / 2) + col / 2] = v0 / (1.f + __expf(-v0)) * v1;
                    } else {
                        float* dst = C + (size_t)row * N + col;
                        if ((N & 1) == 0) {
                            *(float2*)dst = make_float2(v0, v1);
                        } else {
                            dst[0] = v0;
                            if (col + 1 < N) dst[1] = v1;
                        }
                    }
                }
            }
        }
    }
}

#define WGMMA_KERNEL(name, BN, STAGES, SWIGLU)                                                                \
    extern "C" __global__ void __launch_bounds__(WG_THREADS, 1)                                               \
    name(const __grid_constant__ TensorMap mapA, const __grid_constant__ TensorMap mapW,                      \
         const float* __restrict__ bias, float* __restrict__ C, int M, int N, int K) {                        \
        wgmma_body<BN, STAGES, SWIGLU>(&mapA, &mapW, bias, C, M, N, K);                                       \
    }

WGMMA_KERNEL(gemm_wgmma_128x256, 256, 4, false)
WGMMA_KERNEL(gemm_wgmma_128x128, 128, 6, false)
WGMMA_KERNEL(gemm_wgmma_swiglu_128x256, 256, 4, true)
WGMMA_KERNEL(gemm_wgmma_swiglu_128x128, 128, 6, true)
