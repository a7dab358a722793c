// Token sampling: greedy argmax and the seeded temperature / top-k / top-p / min-p sampler.
// Reference: mpinfer/engine/sampling.py (sample, filtered_probs, uniform, philox4x32);
// wrappers: mpinfer/backend/cuda_sampling.py. R rows (requests), V vocabulary.
//
// argmax_partial(logits f32 (R, V), pval f32 (R, S) out, pidx i32 (R, S) out, V, chunk, vec)
//   grid (S, R), any block size that is a multiple of 32 (<= 1024; the wrapper uses 512). Block
//   (s, r) reduces logits[r, s*chunk : (s+1)*chunk] to (max, lowest id of the max). vec = 1
//   reads float4 and needs V % 4 == 0, chunk % 4 == 0 and a 16-byte aligned base.
// argmax_final(pval, pidx, out i32 (R,), S): grid R, block 32, S <= 32; ties to the lower id
//   (np.argmax for NaN-free rows).
// sample_keys(logits f32 (R, V), keys u64 (R, V) out, total = R*V, V)
//   keys = (order-reversing image of the logit) << 32 | id: an ascending sort of a row's keys
//   (cupy.sort, axis -1) lists the ids by logit descending, ties by lower id, as
//   sampling.top_ids (-0.0 is folded onto +0.0, which NumPy treats as equal).
// sample_rows(logits, keys sorted, temperature f64 (R,), n i32 (R,), top_p f64, min_p f64,
//             seed u64, key u64, step i64, scratch f64 (R, ld), ld, nmax, out i32 (R,), V)
//   grid R, block 256 (any multiple of 32). n = the candidates kept by top-k (top_k, or V when
//   top_k is 0 or >= V), nmax >= max n, ld >= nmax + nmax / 64 + 1 (probabilities, then the
//   leaves of the pairwise sum). Exactly filtered_probs + sample in float64: exp(scaled - max)
//   by all threads; every sum is NumPy's pairwise sum (np.sum of a contiguous float64 array:
//   leaves summed in parallel, the fixed tree above them by thread 0) and every cumulative
//   sum runs left to right (np.cumsum) in warp 0, so the probabilities, the cuts and the
//   chosen token are bit-for-bit the reference's (up to the last bit of exp, libdevice vs the
//   host's, which moves a choice only when u or top_p sits within ~1e-16 of a boundary).
//   Candidate probabilities are descending, so the min-p mask is a prefix (min_p <= 1
//   assumed). Double arithmetic uses the _rn intrinsics so --use_fast_math (fmad) cannot fuse
//   it. Temperature 0 returns the first candidate (= argmax).
//
// Checked by bench/gpu/check_routing.py: argmax against np.argmax (rows with ties), sample
// against engine.sampling.sample for 256 rows with mixed parameters (mismatches must be 0);
// argmax timed next to torch.argmax.
#include "common.cuh"

#define NO_ID 0x7fffffff
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ void take_if_better(float& v, int& id, float ov, int oid) {
    if (ov > v || (ov == v && oid < id)) { v = ov; id = oid; }
}

__device__ __forceinline__ void warp_argmax(float& v, int& id) {
    for (int o = 16; o > 0; o >>= 1)
        take_if_better(v, id, __shfl_xor_sync(0xffffffffu, v, o), __shfl_xor_sync(0xffffffffu, id, o));
}

extern "C" __global__ void argmax_partial(const float* __restrict__ logits, float* __restrict__ pval,
                                          int* __restrict__ pidx, int V, int chunk, int vec) {
    __shared__ float sv[32];
    __shared__ int si[32];
    const int r = blockIdx.y, s = blockIdx.x;
    const int lo = s * chunk, hi = min(V, lo + chunk);
    const float* x = logits + (size_t)r * V;
    float best = NEG_INF;
    int id = NO_ID;
    if (vec) {  // lo and hi are multiples of 4
        for (int i = lo + 4 * threadIdx.x; i < hi; i += 4 * blockDim.x) {
            float4 q = *reinterpret_cast<const float4*>(x + i);
            take_if_better(best, id, q.x, i);
            take_if_better(best, id, q.y, i + 1);
            take_if_better(best, id, q.z, i + 2);
            take_if_better(best, id, q.w, i + 3);
        }
    } else {
        for (int i = lo + threadIdx.x; i < hi; i += blockDim.x) take_if_better(best, id, x[i], i);
    }
    warp_argmax(best, id);
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) { sv[w] = best; si[w] = id; }
    __syncthreads();
    if (w == 0) {
        best = lane < (int)(blockDim.x >> 5) ? sv[lane] : NEG_INF;
        id = lane < (int)(blockDim.x >> 5) ? si[lane] : NO_ID;
        warp_argmax(best, id);
        if (lane == 0) {
            pval[(size_t)r * gridDim.x + s] = best;
            pidx[(size_t)r * gridDim.x + s] = id;
        }
    }
}

extern "C" __global__ void argmax_final(const float* __restrict__ pval, const int* __restrict__ pidx,
                                        int* __restrict__ out, int S) {
    const int r = blockIdx.x, lane = threadIdx.x;
    float best = lane < S ? pval[(size_t)r * S + lane] : NEG_INF;
    int id = lane < S ? pidx[(size_t)r * S + lane] : NO_ID;
    warp_argmax(best, id);
    if (lane == 0) out[r] = id;
}

extern "C" __global__ void sample_keys(const float* __restrict__ logits, unsigned long long* __restrict__ keys,
                                       long long total, int V) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        unsigned u = __float_as_uint(logits[i]);
        if (u == 0x80000000u) u = 0u;                        // -0.0 ties with +0.0
        unsigned up = (u & 0x80000000u) ? ~u : (u | 0x80000000u);  // ascending in the float
        keys[i] = ((unsigned long long)(~up) << 32) | (unsigned)(i % V);  // descending
    }
}

// ---- float64 helpers that reproduce NumPy's arithmetic order ----

// NumPy's pairwise_sum leaf (n <= 128): 8 strided accumulators, then the tail
__device__ double pairwise_leaf(const double* a, int n) {
    if (n < 8) {
        double r = 0.0;
        for (int i = 0; i < n; i++) r = __dadd_rn(r, a[i]);
        return r;
    }
    double r[8];
#pragma unroll
    for (int j = 0; j < 8; j++) r[j] = a[j];
    int i = 8;
    for (; i < n - (n % 8); i += 8) {
#pragma unroll
        for (int j = 0; j < 8; j++) r[j] = __dadd_rn(r[j], a[i + j]);
    }
    double res = __dadd_rn(__dadd_rn(__dadd_rn(r[0], r[1]), __dadd_rn(r[2], r[3])),
                           __dadd_rn(__dadd_rn(r[4], r[5]), __dadd_rn(r[6], r[7])));
    for (; i < n; i++) res = __dadd_rn(res, a[i]);
    return res;
}

// np.sum of a contiguous float64 array is a fixed tree: n > 128 splits at h = n/2 - (n/2) % 8
// into sum(left) + sum(right); n <= 128 is a leaf (pairwise_leaf). pairwise_tree walks that
// tree with an explicit stack (depth <= 31 for int n), gets leaf k's sum from leaf(k, start,
// len) and adds the results as NumPy does. Leaves hold >= 64 values when n > 128, so there are
// at most max(1, n / 64) of them.
template <class Leaf>
__device__ double pairwise_tree(int n, Leaf leaf) {
    int st[32], ln[32], phase[32];
    double left[32];
    int sp = 0, k = 0;
    st[0] = 0;
    ln[0] = n;
    for (;;) {
        while (ln[sp] > 128) {  // descend into left halves
            int h = ln[sp] / 2;
            h -= h % 8;
            phase[sp] = 1;
            st[sp + 1] = st[sp];
            ln[sp + 1] = h;
            sp++;
        }
        double ret = leaf(k++, st[sp], ln[sp]);
        for (;;) {  // hand ret to the parents until one still needs its right half
            if (sp == 0) return ret;
            sp--;
            if (phase[sp] == 1) {
                int h = ln[sp] / 2;
                h -= h % 8;
                left[sp] = ret;
                phase[sp] = 2;
                st[sp + 1] = st[sp] + h;
                ln[sp + 1] = ln[sp] - h;
                sp++;
                break;
            }
            ret = __dadd_rn(left[sp], ret);
        }
    }
}

// p[0:n] /= np.sum(p[0:n]), by the whole block: the leaves are summed in parallel (leaf k by
// thread k % blockDim) into leafsum, then thread 0 adds them up the tree. Ends with a barrier.
__device__ void normalise(double* p, int n, double* leafsum, double* s_sum) {
    pairwise_tree(n, [&](int k, int start, int len) {
        if (k % (int)blockDim.x == (int)threadIdx.x) leafsum[k] = pairwise_leaf(p + start, len);
        return 0.0;
    });
    __syncthreads();
    if (threadIdx.x == 0) *s_sum = pairwise_tree(n, [&](int k, int, int) { return leafsum[k]; });
    __syncthreads();
    const double s = *s_sum;
    for (int i = threadIdx.x; i < n; i += blockDim.x) p[i] = __ddiv_rn(p[i], s);
    __syncthreads();
}

// By warp 0 (every lane returns the same): the first i < n at which the running sum of p,
// left to right from 0.0 as np.cumsum, exceeds target (c > target when strict, else
// c >= target); n when it never does. Lanes load 32 values at a time, one chunk ahead.
__device__ int scan_until(const double* p, int n, double target, bool strict) {
    const int lane = threadIdx.x & 31;
    double c = 0.0;
    double v = lane < n ? p[lane] : 0.0;
    for (int base = 0; base < n; base += 32) {
        double next = base + 32 + lane < n ? p[base + 32 + lane] : 0.0;
        const int m = min(32, n - base);
        for (int j = 0; j < m; j++) {
            c = __dadd_rn(c, __shfl_sync(0xffffffffu, v, j));
            if (strict ? c > target : c >= target) return base + j;
        }
        v = next;
    }
    return n;
}

// Philox4x32-10 (sampling.philox4x32): counter c, key (k0, k1)
__device__ void philox4x32_10(unsigned c[4], unsigned k0, unsigned k1) {
    for (int r = 0; r < 10; r++) {
        unsigned hi0 = __umulhi(0xD2511F53u, c[0]), lo0 = 0xD2511F53u * c[0];
        unsigned hi1 = __umulhi(0xCD9E8D57u, c[2]), lo1 = 0xCD9E8D57u * c[2];
        unsigned n0 = hi1 ^ c[1] ^ k0, n2 = hi0 ^ c[3] ^ k1;
        c[0] = n0;
        c[1] = lo1;
        c[2] = n2;
        c[3] = lo0;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
}

// sampling.uniform: 53 bits of one Philox call, counter (step lo, hi, key lo, hi), key = seed
__device__ double philox_uniform(unsigned long long seed, unsigned long long key, unsigned long long step) {
    unsigned c[4] = {(unsigned)step, (unsigned)(step >> 32), (unsigned)key, (unsigned)(key >> 32)};
    philox4x32_10(c, (unsigned)seed, (unsigned)(seed >> 32));
    double hi = (double)(c[0] >> 5), lo = (double)(c[1] >> 6);
    return __dmul_rn(__dadd_rn(__dmul_rn(hi, 67108864.0), lo), 1.0 / 9007199254740992.0);  // exact
}

__device__ __forceinline__ int key_id(unsigned long long k) { return (int)(k & 0xffffffffull); }

extern "C" __global__ void sample_rows(const float* __restrict__ logits, const unsigned long long* __restrict__ keys,
                                       const double* __restrict__ temperature, const int* __restrict__ top_n,
                                       const double* __restrict__ top_p, const double* __restrict__ min_p,
                                       const unsigned long long* __restrict__ seed,
                                       const unsigned long long* __restrict__ req_key,
                                       const long long* __restrict__ step, double* __restrict__ scratch, int ld,
                                       int nmax, int* __restrict__ out, int V) {
    __shared__ double s_sum;
    __shared__ int s_n;
    const int r = blockIdx.x;
    const unsigned long long* cand = keys + (size_t)r * V;  // ids by logit descending
    const float* x = logits + (size_t)r * V;
    double* p = scratch + (size_t)r * ld;  // this row's probabilities (n <= nmax)
    double* leafsum = p + nmax;            // and its pairwise-sum leaves (<= nmax / 64 + 1)
    const double t = temperature[r];
    if (t == 0.0) {
        if (threadIdx.x == 0) out[r] = key_id(cand[0]);
        return;
    }
    int n = top_n[r];
    // probs = exp(scaled[order] - scaled[order[0]]); probs /= probs.sum()
    const double m = __ddiv_rn((double)x[key_id(cand[0])], t);
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        p[i] = exp(__dsub_rn(__ddiv_rn((double)x[key_id(cand[i])], t), m));
    __syncthreads();
    normalise(p, n, leafsum, &s_sum);

    if (top_p[r] < 1.0) {  // keep = searchsorted(cumsum(probs), top_p) + 1, then renormalise
        if (threadIdx.x < 32) {
            int i = scan_until(p, n, top_p[r], false);
            if (threadIdx.x == 0) s_n = min(i + 1, n);
        }
        __syncthreads();
        n = s_n;
        normalise(p, n, leafsum, &s_sum);
    }
    const double mp = min_p[r];
    if (mp > 0.0) {  // probs >= min_p * probs[0]: a prefix, the probabilities being descending
        const double thr = __dmul_rn(mp, p[0]);
        int keep = 0;
        for (int base = 0; base < n; base += blockDim.x) {  // the block counts a chunk at a time
            const int i = base + threadIdx.x;
            const int c = __syncthreads_count(i < n && p[i] >= thr);
            keep += c;
            if (c < min((int)blockDim.x, n - base)) break;  // the prefix ended in this chunk
        }
        n = max(keep, 1);
        normalise(p, n, leafsum, &s_sum);
    }
    // order[min(searchsorted(cumsum(probs), u, side="right"), n - 1)]
    if (threadIdx.x < 32) {
        const double u = philox_uniform(seed[r], req_key[r], (unsigned long long)step[r]);
        const int i = scan_until(p, n, u, true);
        if (threadIdx.x == 0) out[r] = key_id(cand[min(i, n - 1)]);
    }
}
