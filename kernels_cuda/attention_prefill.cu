// attention_prefill: flash attention (online softmax) over "segments" of queries and keys,
// with K/V gathered from one layer's paged bf16 pool. Serves prefill chunks over the paged
// cache, plain causal attention and the partial attention of context parallelism.
//
// attn_varlen_d{64,128}_m{1,2} (Dh = 64 / 128; MI = 1 / 2 m16 row tiles per warp):
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
// Launch: block 128 threads (4 warps x 16 * MI query rows), one block per (64 * MI-row query
//   tile of a segment, query head): grid (ceil(T / (64 * MI)) + nseg, H) -- an upper bound on
//   the tiles; a block finds its segment by a warp prefix sum over seg_q and spare blocks exit.
//   Tiles are numbered backwards so the long (late) causal tiles start first.
//   Dynamic shared memory (64 * MI + 2 * 64) * Dh * 2 bytes (48 KB and up: set the opt-in).
//   Registers (H200, NVRTC 12.9): d128_m1 244, d128_m2 255 + 168 B spilled, d64_m1 173,
//   d64_m2 247: the wrapper uses d128_m1 and d64_m2 (the faster ones measured).
// Per block: binary searches give the key range that any of its queries can see (causality:
//   key_pos <= max q_pos; window: key_pos > min q_pos - window); that range runs in tiles of 64
//   keys. K and V tiles come by cp.async (16-byte chunks, XOR-swizzled rows so ldmatrix has no
//   bank conflicts), in the FlashAttention-2 order: V(j) loads during S = Q K(j)^T, K(j+1)
//   during softmax and O += P V(j); the pool rows and positions of tile j+1 are staged in
//   shared memory during tile j, so no global index load sits between a barrier and a cp.async. mma.sync m16n8k16 bf16 with fp32 accumulators; the running
//   max and sum per query row stay in registers; only tiles that straddle a boundary are masked.
// Checked against NumpyBackend.partial_attention (bench/gpu/check_attention.py), timed against
//   torch scaled_dot_product_attention(is_causal=True) bf16 (flash): on an H200, 4096 causal
//   tokens, H 32, Hkv 8: Dh 128 ~168 TFLOP/s = 0.63x torch's ~268; Dh 64 0.72x. Tried and not
//   faster there: 3 blocks per SM (168 registers, spills), two cp.async stages of K and V with
//   one barrier per tile (0.59x at Dh 128).
// Rows of q outside every segment are not written; segments must cover rows 0..T-1.
#include "common.cuh"

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

// K or V tile of BN keys whose pool rows are staged in slots (shared memory; -1: past the end,
// zero-filled)
template <int DH>
__device__ __forceinline__ void load_kv_tile(bf16* s, const bf16* __restrict__ pool, const int* slots, int Hkv, int kvh,
                                             int tid) {
    constexpr int CH = DH / 8;  // chunks per row
#pragma unroll
    for (int i = 0; i < BN * CH / NT; i++) {
        int c = tid + i * NT, r = c / CH, ch = c % CH, slot = slots[r];
        const bf16* src = slot >= 0 ? pool + ((size_t)slot * Hkv + kvh) * DH + ch * 8 : pool;
        cp_async16(s + swz<DH>(r, ch) * 8, src, slot >= 0 ? 16 : 0);
    }
}

template <int DH, int MI>
__device__ __forceinline__ void attn_varlen(const float* __restrict__ q, const bf16* __restrict__ k_pool,
                                            const bf16* __restrict__ v_pool, const int* __restrict__ seg_q,
                                            const int* __restrict__ q_pos, const int* __restrict__ seg_k,
                                            const int* __restrict__ key_slots, const int* __restrict__ key_pos,
                                            float* __restrict__ out, float* __restrict__ lse, int nseg, int H, int Hkv,
                                            int window, float scale) {
    constexpr int BM = 64 * MI;  // query rows per block: MI m16 tiles per warp
    extern __shared__ __align__(128) unsigned char smem[];
    bf16* sQ = reinterpret_cast<bf16*>(smem);
    bf16* sK = sQ + BM * DH;
    bf16* sV = sK + BN * DH;
    __shared__ int s_tile[3];  // segment, first row, end row
    __shared__ int s_qmin[NT / 32], s_qmax[NT / 32];
    __shared__ int s_slot[2][BN], s_kpos[2][BN];  // pool rows and positions of the current / next key tile

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
        int mn = 0x7fffffff, mx = -0x7fffffff;
        for (int r = tid; r < BM && row0 + r < row_end; r += NT) {
            int p = q_pos[row0 + r];
            mn = min(mn, p); mx = max(mx, p);
        }
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

    // this thread's query rows: lane / 4 and lane / 4 + 8 of each of its MI m16 tiles
    int qp[MI][2];
#pragma unroll
    for (int mi = 0; mi < MI; mi++)
#pragma unroll
        for (int hh = 0; hh < 2; hh++) {
            int r = row0 + (warp * MI + mi) * 16 + (lane >> 2) + hh * 8;
            qp[mi][hh] = r < row_end ? q_pos[r] : -0x40000000;  // invalid row: sees no key
        }
    const float sl2 = scale * 1.4426950408889634f;  // exp(x * scale) = exp2(x * sl2)

    float o[MI][DH / 8][4], m[MI][2], l[MI][2];
#pragma unroll
    for (int mi = 0; mi < MI; mi++) {
#pragma unroll
        for (int i = 0; i < DH / 8; i++) o[mi][i][0] = o[mi][i][1] = o[mi][i][2] = o[mi][i][3] = 0.f;
        m[mi][0] = m[mi][1] = neg_inf();
        l[mi][0] = l[mi][1] = 0.f;
    }

    // key tile j's pool rows and positions go to s_slot / s_kpos[j & 1] one tile ahead, so no
    // global index load sits between a barrier and the cp.async that needs it
    if (tid < BN) {
        const bool in = k_lo + tid < k_hi;
        s_slot[0][tid] = in ? key_slots[k_lo + tid] : -1;
        s_kpos[0][tid] = in ? key_pos[k_lo + tid] : 0x7fffffff;
    }
    __syncthreads();
    if (ntiles > 0) load_kv_tile<DH>(sK, k_pool, s_slot[0], Hkv, kvh, tid);
    cp_async_commit();

    for (int j = 0; j < ntiles; j++) {
        const int t0 = k_lo + j * BN, buf = j & 1;
        const bool nin = tid < BN && t0 + BN + tid < k_hi;  // the next tile's key of this thread
        const int nslot = nin ? key_slots[t0 + BN + tid] : -1, nkpos = nin ? key_pos[t0 + BN + tid] : 0x7fffffff;
        cp_async_wait<0>();
        __syncthreads();  // K(j) landed; every warp is done with V(j-1) and with s_slot[buf ^ 1]
        load_kv_tile<DH>(sV, v_pool, s_slot[buf], Hkv, kvh, tid);
        cp_async_commit();
        // mask only tiles that straddle the range end, the causal diagonal or the window edge
        const int nk = min(BN, k_hi - t0);
        const bool need_mask = nk < BN || s_kpos[buf][nk - 1] > qmin || (window > 0 && qmax - s_kpos[buf][0] >= window);

        // S = Q K^T: this warp's MI x 16 rows x 64 keys
        float s[MI][BN / 8][4];
#pragma unroll
        for (int mi = 0; mi < MI; mi++)
#pragma unroll
            for (int n = 0; n < BN / 8; n++) s[mi][n][0] = s[mi][n][1] = s[mi][n][2] = s[mi][n][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < DH / 16; kk++) {
            unsigned a[MI][4];
#pragma unroll
            for (int mi = 0; mi < MI; mi++)
                ldmatrix_x4(a[mi], sQ + swz<DH>((warp * MI + mi) * 16 + (lane & 15), kk * 2 + (lane >> 4)) * 8);
#pragma unroll
            for (int np = 0; np < BN / 16; np++) {
                unsigned b[4];
                ldmatrix_x4(b, sK + swz<DH>(np * 16 + ((lane >> 4) << 3) + (lane & 7), kk * 2 + ((lane >> 3) & 1)) * 8);
#pragma unroll
                for (int mi = 0; mi < MI; mi++) {
                    mma_bf16_16816(s[mi][2 * np], a[mi], b);
                    mma_bf16_16816(s[mi][2 * np + 1], a[mi], b + 2);
                }
            }
        }
        if (tid < BN) { s_slot[buf ^ 1][tid] = nslot; s_kpos[buf ^ 1][tid] = nkpos; }
        cp_async_wait<0>();
        __syncthreads();  // V(j) landed; every warp is done with K(j); the next tile's rows are staged
        if (j + 1 < ntiles) load_kv_tile<DH>(sK, k_pool, s_slot[buf ^ 1], Hkv, kvh, tid);
        cp_async_commit();

        if (need_mask) {
#pragma unroll
            for (int n = 0; n < BN / 8; n++) {
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    const int kp = s_kpos[buf][n * 8 + (lane & 3) * 2 + e];  // past the end: INT_MAX
#pragma unroll
                    for (int mi = 0; mi < MI; mi++)
#pragma unroll
                        for (int hh = 0; hh < 2; hh++)
                            if (!(kp <= qp[mi][hh] && (window == 0 || qp[mi][hh] - kp < window)))
                                s[mi][n][hh * 2 + e] = neg_inf();
                }
            }
        }

        // online softmax (scores unscaled; exp2 with the scale folded in)
#pragma unroll
        for (int mi = 0; mi < MI; mi++) {
#pragma unroll
            for (int hh = 0; hh < 2; hh++) {
                float mx = neg_inf();
#pragma unroll
                for (int n = 0; n < BN / 8; n++) mx = fmaxf(mx, fmaxf(s[mi][n][hh * 2], s[mi][n][hh * 2 + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                const float nm = fmaxf(m[mi][hh], mx);
                const float bse = nm == neg_inf() ? 0.f : nm * sl2;
                const float al = exp2f(m[mi][hh] * sl2 - bse);  // 0 while m = -inf
                m[mi][hh] = nm;
                float sum = 0.f;
#pragma unroll
                for (int n = 0; n < BN / 8; n++) {
                    s[mi][n][hh * 2] = exp2f(fmaf(s[mi][n][hh * 2], sl2, -bse));
                    s[mi][n][hh * 2 + 1] = exp2f(fmaf(s[mi][n][hh * 2 + 1], sl2, -bse));
                    sum += s[mi][n][hh * 2] + s[mi][n][hh * 2 + 1];
                }
                l[mi][hh] = l[mi][hh] * al + sum;
#pragma unroll
                for (int d = 0; d < DH / 8; d++) { o[mi][d][hh * 2] *= al; o[mi][d][hh * 2 + 1] *= al; }
            }
        }

        // O += P V: P (bf16) straight from the S accumulators into A fragments
#pragma unroll
        for (int kk = 0; kk < BN / 16; kk++) {
            unsigned a[MI][4];
#pragma unroll
            for (int mi = 0; mi < MI; mi++) {
                a[mi][0] = pack_bf16x2(s[mi][2 * kk][0], s[mi][2 * kk][1]);
                a[mi][1] = pack_bf16x2(s[mi][2 * kk][2], s[mi][2 * kk][3]);
                a[mi][2] = pack_bf16x2(s[mi][2 * kk + 1][0], s[mi][2 * kk + 1][1]);
                a[mi][3] = pack_bf16x2(s[mi][2 * kk + 1][2], s[mi][2 * kk + 1][3]);
            }
#pragma unroll
            for (int dp = 0; dp < DH / 16; dp++) {
                unsigned b[4];
                ldmatrix_x4_trans(b, sV + swz<DH>(kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3), dp * 2 + (lane >> 4)) * 8);
#pragma unroll
                for (int mi = 0; mi < MI; mi++) {
                    mma_bf16_16816(o[mi][2 * dp], a[mi], b);
                    mma_bf16_16816(o[mi][2 * dp + 1], a[mi], b + 2);
                }
            }
        }
    }
    cp_async_wait<0>();

    // normalise and write: the row sums are spread over the 4 lanes of a quad
    const int c = (lane & 3) * 2;
#pragma unroll
    for (int mi = 0; mi < MI; mi++)
#pragma unroll
        for (int hh = 0; hh < 2; hh++) {
            float sum = l[mi][hh];
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            const int r = row0 + (warp * MI + mi) * 16 + (lane >> 2) + hh * 8;
            if (r >= row_end) continue;
            const float inv = sum > 0.f ? 1.f / sum : 0.f;
            float* dst = out + ((size_t)r * H + h) * DH + c;
#pragma unroll
            for (int d = 0; d < DH / 8; d++)
                *reinterpret_cast<float2*>(dst + d * 8) = make_float2(o[mi][d][hh * 2] * inv, o[mi][d][hh * 2 + 1] * inv);
            if ((lane & 3) == 0) lse[(size_t)r * H + h] = sum > 0.f ? m[mi][hh] * scale + __logf(sum) : neg_inf();
        }
}

#define ENTRY(NAME, DH, MI)                                                                                           \
    extern "C" __global__ void __launch_bounds__(NT, 2)                                                                \
        NAME(const float* q, const bf16* k_pool, const bf16* v_pool, const int* seg_q, const int* q_pos,               \
             const int* seg_k, const int* key_slots, const int* key_pos, float* out, float* lse, int nseg, int H,      \
             int Hkv, int window, float scale) {                                                                       \
        attn_varlen<DH, MI>(q, k_pool, v_pool, seg_q, q_pos, seg_k, key_slots, key_pos, out, lse, nseg, H, Hkv,        \
                            window, scale);                                                                             \
    }
ENTRY(attn_varlen_d64_m1, 64, 1)
ENTRY(attn_varlen_d64_m2, 64, 2)
ENTRY(attn_varlen_d128_m1, 128, 1)
ENTRY(attn_varlen_d128_m2, 128, 2)
