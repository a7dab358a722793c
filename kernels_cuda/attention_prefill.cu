// attention_prefill: flash attention (online softmax) over "segments" of queries and keys,
// with K/V gathered from one layer's paged bf16 pool. Serves prefill chunks over the paged
// cache, plain causal attention and the partial attention of context parallelism.
//
// attn_varlen_d64 / attn_varlen_d128 (Dh = 64 / 128):
//   q         (T, H, Dh) float32 (after RoPE), converted to bf16 when staged in shared memory
//   k_pool, v_pool (R, Hkv, Dh) bf16 bits; H = G * Hkv, query head h reads KV head h / G
//   seg_q     (nseg + 1,) int32: segment s owns query rows seg_q[s] .. seg_q[s+1]-1
//   q_pos     (T,) int32: position of each query row (any order inside a segment)
//   seg_k     (nseg + 1,) int32: segment s owns keys key_slots[seg_k[s] .. seg_k[s+1]-1]
//   key_slots pool row of each key; key_pos its position, INCREASING inside a segment
//   out       (T, H, Dh) float32: softmax over the visible keys (0 where none is visible)
//   lse       (T, H) float32: log-sum-exp of the visible scaled scores (-inf where none)
//   Key j is visible to the query at p iff key_pos[j] <= p and (window == 0 or p - key_pos[j]
//   < window): exactly NumpyBackend.partial_attention, which is the reference.
// Launch: block 128 threads (4 warps x 16 query rows), one block per (64-row query tile of a
//   segment, query head): grid (ceil(T / 64) + nseg, H) -- an upper bound on the tiles; a block
//   finds its segment by a warp prefix sum over seg_q and spare blocks exit. Tiles are numbered
//   backwards so the long (late) causal tiles start first.
//   Dynamic shared memory (64 + 2 * 64) * Dh * 2 bytes (48 KB at Dh 128: set the opt-in).
// Per block: binary searches give the key range that any of its queries can see (causality:
//   key_pos <= max q_pos; window: key_pos > min q_pos - window); that range runs in tiles of 64
//   keys. K and V tiles come by cp.async (16-byte chunks, XOR-swizzled rows so ldmatrix has no
//   bank conflicts), in the FlashAttention-2 order: V(j) loads during S = Q K(j)^T, K(j+1)
//   during softmax and O += P V(j). mma.sync m16n8k16 bf16 with fp32 accumulators; the running
//   max and sum per query row stay in registers; only tiles that straddle a boundary are masked.
// Checked against NumpyBackend.partial_attention (bench/gpu/check_attention.py), timed against
//   torch scaled_dot_product_attention(is_causal=True) bf16 (flash).
#include "common.cuh"

#define BM 64    // query rows per block
#define BN 64    // keys per tile
#define NT 128   // threads per block

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// 16-byte chunk index of (row, chunk) in a [rows][DH] bf16 tile: chunks XOR-swizzled by row % 8
template <int DH>
__device__ __forceinline__ int swz(int row, int chunk) { return row * (DH / 8) + (chunk ^ (row & 7)); }

// number of keys in key_pos[a..b) that are <= v (key_pos increasing)
__device__ __forceinline__ int count_le(const int* key_pos, int a, int b, int v) {
    int lo = a, hi = b;
    while (lo < hi) {
        int mid = (lo + hi) >> 1;
        if (key_pos[mid] <= v) lo = mid + 1; else hi = mid;
    }
    return lo;
}

// K or V tile: keys [t0, t0 + BN) of the range ending at k_hi (past it: zero-filled rows)
template <int DH>
__device__ __forceinline__ void load_kv_tile(bf16* s, const bf16* __restrict__ pool, const int* __restrict__ key_slots,
                                             int t0, int k_hi, int Hkv, int kvh, int tid) {
    constexpr int CH = DH / 8;  // chunks per row
#pragma unroll
    for (int i = 0; i < BN * CH / NT; i++) {
        int c = tid + i * NT, r = c / CH, ch = c % CH, kk = t0 + r;
        const bf16* src = pool;
        int bytes = 0;
        if (kk < k_hi) {
            src = pool + ((size_t)key_slots[kk] * Hkv + kvh) * DH + ch * 8;
            bytes = 16;
        }
        cp_async16(s + swz<DH>(r, ch) * 8, src, bytes);
    }
}

template <int DH>
__device__ __forceinline__ void attn_varlen(const float* __restrict__ q, const bf16* __restrict__ k_pool,
                                            const bf16* __restrict__ v_pool, const int* __restrict__ seg_q,
                                            const int* __restrict__ q_pos, const int* __restrict__ seg_k,
                                            const int* __restrict__ key_slots, const int* __restrict__ key_pos,
                                            float* __restrict__ out, float* __restrict__ lse, int nseg, int H, int Hkv,
                                            int window, float scale) {
    extern __shared__ __align__(128) unsigned char smem[];
    bf16* sQ = reinterpret_cast<bf16*>(smem);
    bf16* sK = sQ + BM * DH;
    bf16* sV = sK + BN * DH;
    __shared__ int s_tile[3];  // segment, first row, end row
    __shared__ int s_qmin[NT / 32], s_qmax[NT / 32];

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int h = blockIdx.y, kvh = h / (H / Hkv);
    const int tile = gridDim.x - 1 - blockIdx.x;

    // which (segment, row tile) this block is: prefix sum of the segments' tile counts
    if (warp == 0) {
        if (lane == 0) s_tile[0] = -1;
        __syncwarp();
        int base = 0;
        for (int s0 = 0; s0 < nseg; s0 += 32) {
            int s = s0 + lane, n = 0, a = 0, e = 0;
            if (s < nseg) { a = seg_q[s]; e = seg_q[s + 1]; n = (e - a + BM - 1) / BM; }
            int incl = n;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                int t = __shfl_up_sync(0xffffffffu, incl, o);
                if (lane >= o) incl += t;
            }
            int excl = incl - n;
            if (s < nseg && tile >= base + excl && tile < base + incl) {
                s_tile[0] = s; s_tile[1] = a + (tile - base - excl) * BM; s_tile[2] = e;
            }
            base += __shfl_sync(0xffffffffu, incl, 31);
        }
    }
    __syncthreads();
    const int seg = s_tile[0];
    if (seg < 0) return;
    const int row0 = s_tile[1], row_end = s_tile[2];

    // the tile's query positions: min and max over its valid rows
    {
        int p = (tid < BM && row0 + tid < row_end) ? q_pos[row0 + tid] : 0x7fffffff;
        int mn = p, mx = (p == 0x7fffffff) ? -0x7fffffff : p;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            mn = min(mn, __shfl_xor_sync(0xffffffffu, mn, o));
            mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, o));
        }
        if (lane == 0) { s_qmin[warp] = mn; s_qmax[warp] = mx; }
    }

    // Q tile -> bf16 in shared memory (rows past the segment: zeros)
    constexpr int CH = DH / 8;
#pragma unroll
    for (int i = 0; i < BM * CH / NT; i++) {
        int c = tid + i * NT, r = c / CH, ch = c % CH;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (row0 + r < row_end) {
            const float4* src = reinterpret_cast<const float4*>(q + ((size_t)(row0 + r) * H + h) * DH + ch * 8);
            float4 a = src[0], b = src[1];
            v.x = pack_bf16x2(a.x, a.y); v.y = pack_bf16x2(a.z, a.w);
            v.z = pack_bf16x2(b.x, b.y); v.w = pack_bf16x2(b.z, b.w);
        }
        *reinterpret_cast<uint4*>(sQ + swz<DH>(r, ch) * 8) = v;
    }
    __syncthreads();
    int qmin = s_qmin[0], qmax = s_qmax[0];
#pragma unroll
    for (int w = 1; w < NT / 32; w++) { qmin = min(qmin, s_qmin[w]); qmax = max(qmax, s_qmax[w]); }

    // keys any query of the tile may see: [k_lo, k_hi)
    const int kb = seg_k[seg], ke = seg_k[seg + 1];
    const int k_hi = count_le(key_pos, kb, ke, qmax);
    const int k_lo = window > 0 ? count_le(key_pos, kb, k_hi, qmin - window) : kb;
    const int ntiles = k_hi > k_lo ? (k_hi - k_lo + BN - 1) / BN : 0;

    // this thread's two query rows (lane / 4 and lane / 4 + 8 of the warp's 16)
    const int r0 = warp * 16 + (lane >> 2);
    const int qp0 = row0 + r0 < row_end ? q_pos[row0 + r0] : -0x40000000;  // invalid row: sees no key
    const int qp1 = row0 + r0 + 8 < row_end ? q_pos[row0 + r0 + 8] : -0x40000000;
    const float sl2 = scale * 1.4426950408889634f;  // exp(x * scale) = exp2(x * sl2)

    float o[DH / 8][4];
#pragma unroll
    for (int i = 0; i < DH / 8; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m0 = neg_inf(), m1 = neg_inf(), l0 = 0.f, l1 = 0.f;

    if (ntiles > 0) load_kv_tile<DH>(sK, k_pool, key_slots, k_lo, k_hi, Hkv, kvh, tid);
    cp_async_commit();

    for (int j = 0; j < ntiles; j++) {
        const int t0 = k_lo + j * BN;
        cp_async_wait<0>();
        __syncthreads();  // K(j) landed; every warp is done with V(j-1)
        load_kv_tile<DH>(sV, v_pool, key_slots, t0, k_hi, Hkv, kvh, tid);
        cp_async_commit();

        // S = Q K^T: this warp's 16 rows x 64 keys
        float s[BN / 8][4];
#pragma unroll
        for (int n = 0; n < BN / 8; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < DH / 16; kk++) {
            unsigned a[4];
            ldmatrix_x4(a, sQ + swz<DH>(warp * 16 + (lane & 15), kk * 2 + (lane >> 4)) * 8);
#pragma unroll
            for (int np = 0; np < BN / 16; np++) {
                unsigned b[4];
                ldmatrix_x4(b, sK + swz<DH>(np * 16 + ((lane >> 4) << 3) + (lane & 7), kk * 2 + ((lane >> 3) & 1)) * 8);
                mma_bf16_16816(s[2 * np], a, b);
                mma_bf16_16816(s[2 * np + 1], a, b + 2);
            }
        }
        cp_async_wait<0>();
        __syncthreads();  // V(j) landed; every warp is done with K(j)
        if (j + 1 < ntiles) load_kv_tile<DH>(sK, k_pool, key_slots, t0 + BN, k_hi, Hkv, kvh, tid);
        cp_async_commit();

        // mask only tiles that straddle the range end, the causal diagonal or the window edge
        const int t_last = min(t0 + BN, k_hi) - 1;
        const bool partial = t0 + BN > k_hi;
        if (partial || key_pos[t_last] > qmin || (window > 0 && qmax - key_pos[t0] >= window)) {
#pragma unroll
            for (int n = 0; n < BN / 8; n++) {
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    int kk = t0 + n * 8 + (lane & 3) * 2 + e;
                    int kp = kk < k_hi ? key_pos[kk] : 0x7fffffff;
                    bool v0 = kp <= qp0 && (window == 0 || qp0 - kp < window);
                    bool v1 = kp <= qp1 && (window == 0 || qp1 - kp < window);
                    if (!v0) s[n][e] = neg_inf();
                    if (!v1) s[n][2 + e] = neg_inf();
                }
            }
        }

        // online softmax (scores unscaled; exp2 with the scale folded in)
        float mx0 = neg_inf(), mx1 = neg_inf();
#pragma unroll
        for (int n = 0; n < BN / 8; n++) {
            mx0 = fmaxf(mx0, fmaxf(s[n][0], s[n][1]));
            mx1 = fmaxf(mx1, fmaxf(s[n][2], s[n][3]));
        }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        const float n0 = fmaxf(m0, mx0), n1 = fmaxf(m1, mx1);
        const float b0 = n0 == neg_inf() ? 0.f : n0 * sl2, b1 = n1 == neg_inf() ? 0.f : n1 * sl2;
        const float al0 = exp2f(m0 * sl2 - b0), al1 = exp2f(m1 * sl2 - b1);  // 0 while m = -inf
        m0 = n0; m1 = n1;
        float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
        for (int n = 0; n < BN / 8; n++) {
            s[n][0] = exp2f(fmaf(s[n][0], sl2, -b0)); s[n][1] = exp2f(fmaf(s[n][1], sl2, -b0));
            s[n][2] = exp2f(fmaf(s[n][2], sl2, -b1)); s[n][3] = exp2f(fmaf(s[n][3], sl2, -b1));
            sum0 += s[n][0] + s[n][1];
            sum1 += s[n][2] + s[n][3];
        }
        l0 = l0 * al0 + sum0;
        l1 = l1 * al1 + sum1;
#pragma unroll
        for (int d = 0; d < DH / 8; d++) {
            o[d][0] *= al0; o[d][1] *= al0; o[d][2] *= al1; o[d][3] *= al1;
        }

        // O += P V: P (bf16) straight from the S accumulators into A fragments
#pragma unroll
        for (int kk = 0; kk < BN / 16; kk++) {
            unsigned a[4];
            a[0] = pack_bf16x2(s[2 * kk][0], s[2 * kk][1]);
            a[1] = pack_bf16x2(s[2 * kk][2], s[2 * kk][3]);
            a[2] = pack_bf16x2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            a[3] = pack_bf16x2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
            for (int dp = 0; dp < DH / 16; dp++) {
                unsigned b[4];
                ldmatrix_x4_trans(b, sV + swz<DH>(kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3), dp * 2 + (lane >> 4)) * 8);
                mma_bf16_16816(o[2 * dp], a, b);
                mma_bf16_16816(o[2 * dp + 1], a, b + 2);
            }
        }
    }
    cp_async_wait<0>();

    // normalise and write: the row sums are spread over the 4 lanes of a quad
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    const float inv0 = l0 > 0.f ? 1.f / l0 : 0.f, inv1 = l1 > 0.f ? 1.f / l1 : 0.f;
    const int c = (lane & 3) * 2;
    if (row0 + r0 < row_end) {
        float* dst = out + ((size_t)(row0 + r0) * H + h) * DH + c;
#pragma unroll
        for (int d = 0; d < DH / 8; d++) *reinterpret_cast<float2*>(dst + d * 8) = make_float2(o[d][0] * inv0, o[d][1] * inv0);
        if ((lane & 3) == 0) lse[(size_t)(row0 + r0) * H + h] = l0 > 0.f ? m0 * scale + __logf(l0) : neg_inf();
    }
    if (row0 + r0 + 8 < row_end) {
        float* dst = out + ((size_t)(row0 + r0 + 8) * H + h) * DH + c;
#pragma unroll
        for (int d = 0; d < DH / 8; d++) *reinterpret_cast<float2*>(dst + d * 8) = make_float2(o[d][2] * inv1, o[d][3] * inv1);
        if ((lane & 3) == 0) lse[(size_t)(row0 + r0 + 8) * H + h] = l1 > 0.f ? m1 * scale + __logf(l1) : neg_inf();
    }
}

#define ENTRY(NAME, DH)                                                                                               \
    extern "C" __global__ void __launch_bounds__(NT, 2)                                                                \
        NAME(const float* q, const bf16* k_pool, const bf16* v_pool, const int* seg_q, const int* q_pos,               \
             const int* seg_k, const int* key_slots, const int* key_pos, float* out, float* lse, int nseg, int H,      \
             int Hkv, int window, float scale) {                                                                       \
        attn_varlen<DH>(q, k_pool, v_pool, seg_q, q_pos, seg_k, key_slots, key_pos, out, lse, nseg, H, Hkv, window,    \
                        scale);                                                                                         \
    }
ENTRY(attn_varlen_d64, 64)
ENTRY(attn_varlen_d128, 128)
