// attention_decode: one new query per sequence against its paged bf16 KV cache
// (FlashDecoding: the keys of a sequence are split into chunks handled by different blocks,
// then merged by log-sum-exp).
//
// attn_decode_d{64,128}_g{1..8}(q, k_pool, v_pool, tables, kv_lens, po, plse, H, Hkv, G, nb,
//                              log2_bs, chunk, nsplit, window, scale)
//   q        (B, H, Dh) float32; query of sequence b at position kv_lens[b] - 1
//   k_pool, v_pool (R, Hkv, Dh) bf16 bits; key position p of sequence b lives in pool row
//            tables[b, p >> log2_bs] * bs + (p & (bs - 1))
//   tables   (B, nb) int32; kv_lens (B,) int32, 1 <= kv_lens[b] <= nb * bs
//   po       (B, H, nsplit, Dh) float32, plse (B, H, nsplit) float32: each split's softmax over
//            its keys and their log-sum-exp (0 / -inf for a split with no visible key)
//   Visible keys: [max(0, L - window) if window else 0, L) with L = kv_lens[b].
// Launch: grid (nsplit, Hkv * G / GB, B), block 128 (4 warps), no dynamic shared memory;
//   split i covers key positions [i * chunk, (i + 1) * chunk). A block takes GB (the template
//   number, dividing G) query heads of one KV head, so each K/V byte is read once per block.
//   Dh / 8 lanes share a key (one 16-byte load each: 8 dims), a warp holds 32 / (Dh / 8) keys
//   per load, 4 such loads of K and 4 of V per iteration, issued one iteration ahead; scores
//   reduced by shuffles, fp32 math on CUDA cores (decode is memory-bound), online softmax per
//   lane group, merged over lane groups (shuffles) and warps (shared memory) at the end.
// attn_decode_merge(po, plse, out, nsplit, Dh): out (B, H, Dh) float32 = log-sum-exp merge of
//   the splits; grid (B * H), block (Dh).
// Checked against NumpyBackend._decode_attention / paged_attention (bench/gpu/check_attention.py),
//   timed as K/V bytes read per second against util.copy_bandwidth(), next to torch SDPA decode:
//   on an H200, B 32, Hkv 8, G 4, Dh 128, chunk 1024: 0.75 of copy bandwidth at 4096 keys, 0.86
//   at 16384 (168 registers, 3 blocks per SM). Block ids of a split are staged in shared memory
//   (TAB entries: the wrapper keeps chunk / bs + 1 <= TAB); each iteration's loads are issued one
//   iteration ahead (register double buffer).
#include "common.cuh"

#define NT 128
#define U 4  // loads of K (and of V) per lane per iteration (twice that in flight: prefetch)
#define TAB 256  // block-table entries of one split staged in shared memory: chunk / bs + 1 <= TAB

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

__device__ __forceinline__ void unpack8(const uint4& v, float f[8]) {
    f[0] = bf16x2_lo(v.x); f[1] = bf16x2_hi(v.x); f[2] = bf16x2_lo(v.y); f[3] = bf16x2_hi(v.y);
    f[4] = bf16x2_lo(v.z); f[5] = bf16x2_hi(v.z); f[6] = bf16x2_lo(v.w); f[7] = bf16x2_hi(v.w);
}

template <int DH, int GB>
__device__ __forceinline__ void attn_decode(const float* __restrict__ q, const bf16* __restrict__ k_pool,
                                            const bf16* __restrict__ v_pool, const int* __restrict__ tables,
                                            const int* __restrict__ kv_lens, float* __restrict__ po,
                                            float* __restrict__ plse, int H, int Hkv, int G, int nb, int log2_bs,
                                            int chunk, int nsplit, int window, float scale) {
    constexpr int LPK = DH / 8;     // lanes per key
    constexpr int KPW = 32 / LPK;   // keys per warp load
    constexpr int NW = NT / 32;
    __shared__ float s_m[NW][GB], s_l[NW][GB];
    __shared__ float s_acc[NW][GB][DH];
    __shared__ int s_tab[TAB];

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int split = blockIdx.x, b = blockIdx.z;
    const int nsub = G / GB, kvh = blockIdx.y / nsub, h0 = kvh * G + (blockIdx.y % nsub) * GB;
    const int L = kv_lens[b];
    const int lo = window > 0 ? max(0, L - window) : 0;
    const int start = max(lo, split * chunk), end = min(L, (split + 1) * chunk);
    const int d0 = (lane % LPK) * 8, kl = lane / LPK;
    const float sl2 = scale * 1.4426950408889634f;  // scores kept in log2 units

    float qf[GB][8], acc[GB][8], m[GB], l[GB];
#pragma unroll
    for (int g = 0; g < GB; g++) {
        const float4* src = reinterpret_cast<const float4*>(q + ((size_t)b * H + h0 + g) * DH + d0);
        float4 x = src[0], y = src[1];
        qf[g][0] = x.x * sl2; qf[g][1] = x.y * sl2; qf[g][2] = x.z * sl2; qf[g][3] = x.w * sl2;
        qf[g][4] = y.x * sl2; qf[g][5] = y.y * sl2; qf[g][6] = y.z * sl2; qf[g][7] = y.w * sl2;
        m[g] = neg_inf(); l[g] = 0.f;
#pragma unroll
        for (int i = 0; i < 8; i++) acc[g][i] = 0.f;
    }

    // the block ids of this split's keys, staged once in shared memory
    const int blk0 = start >> log2_bs;
    if (start < end)
        for (int i = tid; i <= ((end - 1) >> log2_bs) - blk0; i += NT) s_tab[i] = tables[(size_t)b * nb + blk0 + i];
    __syncthreads();

    const int bs_mask = (1 << log2_bs) - 1;
    const size_t row_stride = (size_t)Hkv * DH;
    const bf16* kbase = k_pool + (size_t)kvh * DH + d0;
    const bf16* vbase = v_pool + (size_t)kvh * DH + d0;
    constexpr int STEP = NW * U * KPW;  // keys per block iteration

    // this lane's K and V vectors of keys base + u * KPW + kl (zeros past the end)
    auto fetch = [&](int base, uint4 kr[U], uint4 vr[U]) {
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int key = base + u * KPW + kl;
            kr[u] = make_uint4(0, 0, 0, 0);
            vr[u] = make_uint4(0, 0, 0, 0);
            if (key < end) {
                const size_t row = (size_t)s_tab[(key >> log2_bs) - blk0] * (bs_mask + 1) + (key & bs_mask);
                kr[u] = __ldg(reinterpret_cast<const uint4*>(kbase + row * row_stride));
                vr[u] = __ldg(reinterpret_cast<const uint4*>(vbase + row * row_stride));
            }
        }
    };

    uint4 kr[U], vr[U];
    int base = start + warp * U * KPW;
    fetch(base, kr, vr);
#pragma unroll 2  // two copies: the prefetched registers swap roles instead of being moved
    for (; base < end; base += STEP) {
        uint4 kn[U], vn[U];
        fetch(base + STEP, kn, vn);  // next iteration's loads in flight during this one's math
        float s[U][GB];
#pragma unroll
        for (int u = 0; u < U; u++) {
            float kf[8];
            unpack8(kr[u], kf);
            const bool valid = base + u * KPW + kl < end;
#pragma unroll
            for (int g = 0; g < GB; g++) {
                float d = 0.f;
#pragma unroll
                for (int i = 0; i < 8; i++) d = fmaf(qf[g][i], kf[i], d);
#pragma unroll
                for (int o = LPK / 2; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
                s[u][g] = valid ? d : neg_inf();
            }
        }
#pragma unroll
        for (int g = 0; g < GB; g++) {
            float mx = m[g];
#pragma unroll
            for (int u = 0; u < U; u++) mx = fmaxf(mx, s[u][g]);
            const float bse = mx == neg_inf() ? 0.f : mx;
            const float al = exp2f(m[g] - bse);
            m[g] = mx;
            l[g] *= al;
#pragma unroll
            for (int i = 0; i < 8; i++) acc[g][i] *= al;
#pragma unroll
            for (int u = 0; u < U; u++) s[u][g] = exp2f(s[u][g] - bse);
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            float vf[8];
            unpack8(vr[u], vf);
#pragma unroll
            for (int g = 0; g < GB; g++) {
                l[g] += s[u][g];
#pragma unroll
                for (int i = 0; i < 8; i++) acc[g][i] = fmaf(s[u][g], vf[i], acc[g][i]);
            }
        }
#pragma unroll
        for (int u = 0; u < U; u++) { kr[u] = kn[u]; vr[u] = vn[u]; }
    }

    // merge the lane groups of the warp that hold the same dims (different keys)
#pragma unroll
    for (int o = LPK; o < 32; o <<= 1) {
#pragma unroll
        for (int g = 0; g < GB; g++) {
            float mo = __shfl_xor_sync(0xffffffffu, m[g], o), lo2 = __shfl_xor_sync(0xffffffffu, l[g], o);
            float mx = fmaxf(m[g], mo), bse = mx == neg_inf() ? 0.f : mx;
            float a = exp2f(m[g] - bse), c = exp2f(mo - bse);
            l[g] = l[g] * a + lo2 * c;
#pragma unroll
            for (int i = 0; i < 8; i++) acc[g][i] = acc[g][i] * a + __shfl_xor_sync(0xffffffffu, acc[g][i], o) * c;
            m[g] = mx;
        }
    }
    if (lane < LPK) {
#pragma unroll
        for (int g = 0; g < GB; g++) {
#pragma unroll
            for (int i = 0; i < 8; i++) s_acc[warp][g][d0 + i] = acc[g][i];
            if (lane == 0) { s_m[warp][g] = m[g]; s_l[warp][g] = l[g]; }
        }
    }
    __syncthreads();

    // merge the warps; write this split's (o, lse) of the GB heads
    for (int idx = tid; idx < GB * DH; idx += NT) {
        const int g = idx / DH, d = idx % DH;
        float M = neg_inf();
#pragma unroll
        for (int w = 0; w < NW; w++) M = fmaxf(M, s_m[w][g]);
        const float bse = M == neg_inf() ? 0.f : M;
        float Lsum = 0.f, O = 0.f;
#pragma unroll
        for (int w = 0; w < NW; w++) {
            float e = exp2f(s_m[w][g] - bse);
            Lsum += s_l[w][g] * e;
            O += s_acc[w][g][d] * e;
        }
        const size_t r = ((size_t)b * H + h0 + g) * nsplit + split;
        po[r * DH + d] = Lsum > 0.f ? O / Lsum : 0.f;
        if (d == 0) plse[r] = Lsum > 0.f ? (M + __log2f(Lsum)) * 0.6931471805599453f : neg_inf();
    }
}

#define ENTRY(DH, GB)                                                                                                \
    extern "C" __global__ void __launch_bounds__(NT)                                                                  \
        attn_decode_d##DH##_g##GB(const float* q, const bf16* k_pool, const bf16* v_pool, const int* tables,           \
                                  const int* kv_lens, float* po, float* plse, int H, int Hkv, int G, int nb,          \
                                  int log2_bs, int chunk, int nsplit, int window, float scale) {                       \
        attn_decode<DH, GB>(q, k_pool, v_pool, tables, kv_lens, po, plse, H, Hkv, G, nb, log2_bs, chunk, nsplit,       \
                            window, scale);                                                                            \
    }
ENTRY(64, 1) ENTRY(64, 2) ENTRY(64, 3) ENTRY(64, 4) ENTRY(64, 5) ENTRY(64, 6) ENTRY(64, 7) ENTRY(64, 8)
ENTRY(128, 1) ENTRY(128, 2) ENTRY(128, 3) ENTRY(128, 4) ENTRY(128, 5) ENTRY(128, 6) ENTRY(128, 7) ENTRY(128, 8)

// log-sum-exp merge of the splits: po (B*H, nsplit, Dh), plse (B*H, nsplit) -> out (B*H, Dh)
extern "C" __global__ void attn_decode_merge(const float* __restrict__ po, const float* __restrict__ plse,
                                             float* __restrict__ out, int nsplit, int DH) {
    const size_t bh = blockIdx.x;
    const int d = threadIdx.x;
    const float* lse = plse + bh * nsplit;
    float M = neg_inf();
    for (int i = 0; i < nsplit; i++) M = fmaxf(M, lse[i]);
    const float bse = M == neg_inf() ? 0.f : M;
    float W = 0.f, O = 0.f;
    for (int i = 0; i < nsplit; i++) {
        float w = __expf(lse[i] - bse);
        W += w;
        O += w * po[(bh * nsplit + i) * DH + d];
    }
    out[bh * DH + d] = W > 0.f ? O / W : 0.f;
}
