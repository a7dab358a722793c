// MoE routing: router softmax + top-k, pairs grouped by expert, row gather, weighted combine.
// Reference: NumpyBackend.route (what MoE.route calls) and MoE.__call__'s pair bookkeeping in
// mpinfer/moe.py; wrappers: mpinfer/backend/cuda_routing.py.
// Notation: T tokens, E experts, A = top (experts per token), a "pair" is (token t, slot a) with
// the flat index t*A + a, N pairs (T*A, or fewer after a capacity drop), D the hidden size.
//
// moe_route(logits f32 (T, E), experts i32 (T, A) out, weights f32 (T, A) out, T, E, A, norm)
//   One warp per token, block 128 (4 tokens), grid ceil(T/4). E <= 256 (8 logits per lane in
//   registers), 1 <= A <= min(E, 32). Softmax in fp32 (max-subtracted; exp evaluated in double
//   and rounded, division IEEE, so the float32 probabilities are NumPy's to ~1 ulp), then A
//   rounds of a warp argmax over the probabilities, ties to the lower expert id
//   (= np.argsort(-probs, stable)), then weights /= their sum when norm != 0.
// moe_permute(experts i32 (N,), order i32 (N,) out, counts i32 (E,) out, N, E)
//   A stable counting sort in ONE block of W warps (W*32 threads), dynamic shared memory
//   (W*E + E) * 4 bytes (<= 48 KB: the wrapper picks W). Warp w owns the contiguous pairs
//   [w*seg, (w+1)*seg): pass 1 counts them per expert (hist[w][e]); then the exclusive scan
//   over (e, w) turns hist[w][e] into the first output slot of warp w's pairs of expert e; pass
//   2 walks the same pairs again in order, 32 at a time, and ranks each pair within its warp
//   step by __match_any_sync (earlier lanes with the same expert). Result: exactly
//   np.argsort(experts, kind="stable") and np.bincount(experts, minlength=E). Experts must lie
//   in [0, E) (not checked on the device).
// moe_gather_rows(x f32 (T, D), rows i32 (N,), out f32 (N, D), N, D, vec)
//   One block per output row, block 128; vec = 1 (D % 4 == 0 and x 16-byte aligned) moves
//   float4. out[i] = x[rows[i]]; rows must lie in [0, T).
// moe_inverse(order i32 (N,), inv i32 (T*A,) in/out, N)
//   inv[order[j]] = j; inv is filled with -1 first (by the wrapper), so a dropped pair stays -1.
// moe_combine(y f32 (N, D), inv i32 (T*A,), weights f32 (T, A), out f32 (T, D), T, A, D)
//   One block per token, block 128 over D: out[t, d] = sum over a = 0..A-1 in slot order of
//   weights[t, a] * y[inv[t*A + a], d] (skipped where inv is -1). Deterministic: each output
//   element is summed by one thread in a fixed order.
//
// Checked by bench/gpu/check_routing.py against NumpyBackend.route (ids exact, weights
// rel err), np.argsort(kind="stable") / np.bincount (exact), NumPy indexing and the
// per_pair sum of MoE.__call__ (rel err), dropped pairs included; timed route + permute next
// to torch softmax + topk + stable sort + bincount, gather next to index_select, combine next
// to index_add_.
#include "common.cuh"

#define ROUTE_MAX_E 256
#define ROUTE_PER_LANE (ROUTE_MAX_E / 32)
#define NO_ID 0x7fffffff
#define NEG_INF __int_as_float(0xff800000)

// (value, id) of two lanes: the larger value, ties to the lower id; every lane ends with the same
__device__ __forceinline__ void warp_argmax(float& v, int& id) {
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, v, o);
        int oid = __shfl_xor_sync(0xffffffffu, id, o);
        if (ov > v || (ov == v && oid < id)) { v = ov; id = oid; }
    }
}

extern "C" __global__ void moe_route(const float* __restrict__ logits, int* __restrict__ experts,
                                     float* __restrict__ weights, int T, int E, int A, int norm) {
    const int t = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (t >= T) return;  // the whole warp leaves together
    const float* x = logits + (size_t)t * E;
    float p[ROUTE_PER_LANE];  // expert lane + 32*j; -1 marks "absent or already taken"
    float mx = NEG_INF;
#pragma unroll
    for (int j = 0; j < ROUTE_PER_LANE; j++) {
        int e = lane + 32 * j;
        p[j] = e < E ? x[e] : NEG_INF;
        mx = fmaxf(mx, p[j]);
    }
    mx = warp_max(mx);
    float s = 0.f;
#pragma unroll
    for (int j = 0; j < ROUTE_PER_LANE; j++) {
        if (lane + 32 * j < E) {
            p[j] = (float)exp((double)(p[j] - mx));  // not __expf: near-equal probabilities keep
            s += p[j];                                // NumPy's order (float32 exp within ~1 ulp)
        } else {
            p[j] = -1.f;
        }
    }
    s = warp_sum(s);
#pragma unroll
    for (int j = 0; j < ROUTE_PER_LANE; j++)
        if (lane + 32 * j < E) p[j] = __fdiv_rn(p[j], s);  // IEEE, not fast-math's; >= 0 beats -1

    float my_w = 0.f;  // lane a keeps slot a
    int my_e = 0;
    for (int a = 0; a < A; a++) {
        float bv = -2.f;
        int bi = NO_ID;
#pragma unroll
        for (int j = 0; j < ROUTE_PER_LANE; j++)  // ids grow with j: strict > keeps the lower id
            if (p[j] > bv) { bv = p[j]; bi = lane + 32 * j; }
        warp_argmax(bv, bi);
        if (lane == a) { my_w = bv; my_e = bi; }
#pragma unroll
        for (int j = 0; j < ROUTE_PER_LANE; j++)
            if (lane + 32 * j == bi) p[j] = -1.f;
    }
    if (norm) my_w = my_w / warp_sum(lane < A ? my_w : 0.f);
    if (lane < A) {
        experts[(size_t)t * A + lane] = my_e;
        weights[(size_t)t * A + lane] = my_w;
    }
}

extern "C" __global__ void moe_permute(const int* __restrict__ pairs, int* __restrict__ order,
                                       int* __restrict__ counts, int N, int E) {
    extern __shared__ int hist[];  // (W, E) per-warp counts, then (E,) totals
    const int W = blockDim.x >> 5, w = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int* total = hist + W * E;
    for (int i = threadIdx.x; i < W * E; i += blockDim.x) hist[i] = 0;
    __syncthreads();
    const int seg = (N + W - 1) / W;
    const int lo = min(N, w * seg), hi = min(N, lo + seg);
    int* mine = hist + w * E;
    const unsigned below = (1u << lane) - 1u;  // lanes before mine

    // pass 1: per-warp histogram of its own pairs (one leader per group of equal experts adds)
    int e_next = lo + lane < hi ? pairs[lo + lane] : -1;  // loads run one step ahead
    for (int base = lo; base < hi; base += 32) {
        int e = e_next;
        e_next = base + 32 + lane < hi ? pairs[base + 32 + lane] : -1;
        unsigned peers = __match_any_sync(0xffffffffu, e);
        if (e >= 0 && (peers & below) == 0) mine[e] += __popc(peers);
        __syncwarp();
    }
    __syncthreads();
    // totals, their exclusive scan over experts, then each warp's first slot per expert
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        int c = 0;
        for (int v = 0; v < W; v++) c += hist[v * E + e];
        total[e] = c;
        counts[e] = c;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        int run = 0;
        for (int e = 0; e < E; e++) { int c = total[e]; total[e] = run; run += c; }
    }
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        int run = total[e];
        for (int v = 0; v < W; v++) { int c = hist[v * E + e]; hist[v * E + e] = run; run += c; }
    }
    __syncthreads();
    // pass 2: the same pairs in the same order; rank = warp's next slot + earlier equal lanes
    e_next = lo + lane < hi ? pairs[lo + lane] : -1;
    for (int base = lo; base < hi; base += 32) {
        int i = base + lane, e = e_next;
        e_next = base + 32 + lane < hi ? pairs[base + 32 + lane] : -1;
        unsigned peers = __match_any_sync(0xffffffffu, e);
        int slot = e >= 0 ? mine[e] + __popc(peers & below) : 0;
        __syncwarp();  // every lane has read mine[e] before the leader moves it on
        if (e >= 0) {
            order[slot] = i;
            if ((peers & below) == 0) mine[e] += __popc(peers);
        }
        __syncwarp();
    }
}

extern "C" __global__ void moe_gather_rows(const float* __restrict__ x, const int* __restrict__ rows,
                                           float* __restrict__ out, int N, int D, int vec) {
    const int i = blockIdx.x;
    if (i >= N) return;
    const float* src = x + (size_t)rows[i] * D;
    float* dst = out + (size_t)i * D;
    if (vec) {
        const float4* s4 = reinterpret_cast<const float4*>(src);
        float4* d4 = reinterpret_cast<float4*>(dst);
        for (int k = threadIdx.x; k < D / 4; k += blockDim.x) d4[k] = s4[k];
    } else {
        for (int k = threadIdx.x; k < D; k += blockDim.x) dst[k] = src[k];
    }
}

extern "C" __global__ void moe_inverse(const int* __restrict__ order, int* __restrict__ inv, int N) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j < N) inv[order[j]] = j;
}

extern "C" __global__ void moe_combine(const float* __restrict__ y, const int* __restrict__ inv,
                                       const float* __restrict__ weights, float* __restrict__ out,
                                       int T, int A, int D) {
    const int t = blockIdx.x;
    if (t >= T) return;
    const int* pos = inv + (size_t)t * A;
    const float* w = weights + (size_t)t * A;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float acc = 0.f;
        for (int a = 0; a < A; a++) {
            int j = pos[a];
            if (j >= 0) acc += w[a] * y[(size_t)j * D + d];
        }
        out[(size_t)t * D + d] = acc;
    }
}
