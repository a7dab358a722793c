// Host emulation of kernels_cuda/common.cuh and of the CUDA built-ins the kernels use, for
// tests/cuda_emu.py (g++, no GPU). A block's threads are fibers (ucontext) on one OS thread,
// resumed in turn; each runs until it waits at a barrier (__syncthreads, or the warp-wide
// exchange every warp-collective instruction makes) or returns. Blocks of a grid run one
// after the other, so a static local stands for __shared__.
//
// Warp-collective instructions (mma.sync, ldmatrix, shfl) are emulated from the PTX ISA's
// fragment tables: each lane deposits its registers or address, the warp meets, each lane
// computes its own result from all 32 deposits. Deposits alternate between two buffers, so
// one meeting per instruction suffices (a lane can be at most one instruction ahead).
// cp.async copies at once (cp.async.wait is then a no-op): a missing wait goes unseen, a
// missing __syncthreads before a stage is overwritten does not (warps run interleaved).
// Accumulation is float32 in k order: results match the tensor cores' to rounding only.
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>
#include <ucontext.h>

#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static
#define threadIdx (emu::S.cur->idx)
#define blockIdx (emu::S.block)
#define blockDim (emu::S.block_dim)
#define gridDim (emu::S.grid)

struct uint3 { unsigned x, y, z; };
struct dim3 { unsigned x, y, z; };
struct float2 { float x, y; };
struct float4 { float x, y, z, w; };
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }

namespace emu {

struct Thread {
    ucontext_t ctx;
    uint3 idx;
    int warp, lane;
    unsigned ops;  // warp exchanges made: picks the deposit buffer
    bool done;
};
struct Deposit { unsigned w[6]; const void* p; float f; };

struct State {
    dim3 grid, block_dim;
    uint3 block;
    std::vector<Thread> threads;
    std::vector<char> stacks;
    std::vector<unsigned char> dynamic_smem;
    ucontext_t sched;
    Thread* cur;
    std::function<void()> kernel;
    unsigned long progress;  // barrier arrivals and finished threads: a round without any is a deadlock
    unsigned block_count, block_gen;
    std::vector<unsigned> warp_count, warp_gen, warp_size;
    std::vector<Deposit> deposits;  // [warp][2][32]
};
inline State S;
constexpr size_t STACK = 64 * 1024;  // per thread: the kernels keep a few KB of registers

inline void yield() { swapcontext(&S.cur->ctx, &S.sched); }

// wait until `size` threads arrived at the barrier whose counters these are
inline void meet(unsigned& count, unsigned& gen, unsigned size) {
    const unsigned g = gen;
    S.progress++;
    if (++count == size) {
        count = 0;
        gen++;
    } else {
        while (gen == g) yield();
    }
}

// this lane's deposit in, the warp's 32 deposits of this instruction out
inline const Deposit* exchange(const Deposit& mine) {
    Thread* t = S.cur;
    Deposit* d = &S.deposits[(t->warp * 2 + (t->ops++ & 1)) * 32];
    d[t->lane] = mine;
    meet(S.warp_count[t->warp], S.warp_gen[t->warp], S.warp_size[t->warp]);
    return d;
}

inline void entry() {
    S.kernel();
    S.cur->done = true;
    S.progress++;
}  // returns to uc_link: the scheduler

// One block's threads to completion; false on a deadlock (threads left waiting).
inline bool run_block() {
    const unsigned n = S.block_dim.x * S.block_dim.y * S.block_dim.z, warps = (n + 31) / 32;
    S.threads.assign(n, Thread{});
    S.stacks.resize(n * STACK);
    S.block_count = S.block_gen = 0;
    S.warp_count.assign(warps, 0);
    S.warp_gen.assign(warps, 0);
    S.warp_size.assign(warps, 32);
    S.warp_size[warps - 1] = n - 32 * (warps - 1);
    S.deposits.assign(warps * 64, Deposit{});
    for (unsigned i = 0; i < n; i++) {
        Thread& t = S.threads[i];
        t.idx = {i % S.block_dim.x, i / S.block_dim.x % S.block_dim.y, i / (S.block_dim.x * S.block_dim.y)};
        t.warp = i / 32;
        t.lane = i % 32;
        getcontext(&t.ctx);
        t.ctx.uc_stack.ss_sp = &S.stacks[i * STACK];
        t.ctx.uc_stack.ss_size = STACK;
        t.ctx.uc_link = &S.sched;
        makecontext(&t.ctx, entry, 0);
    }
    for (;;) {
        const unsigned long before = S.progress;
        bool live = false;
        for (auto& t : S.threads) {
            if (t.done) continue;
            live = true;
            S.cur = &t;
            swapcontext(&S.sched, &t.ctx);
        }
        if (!live) return true;
        if (S.progress == before) return false;
    }
}

// 0, or the linear index + 1 of the block that deadlocked
inline long launch(dim3 grid, dim3 block, size_t smem, std::function<void()> kernel) {
    S.grid = grid;
    S.block_dim = block;
    S.kernel = std::move(kernel);
    S.dynamic_smem.assign(smem, 0xff);
    long id = 0;
    for (unsigned z = 0; z < grid.z; z++)
        for (unsigned y = 0; y < grid.y; y++)
            for (unsigned x = 0; x < grid.x; x++) {
                id++;
                S.block = {x, y, z};
                if (!run_block()) return id;
            }
    return 0;
}

inline unsigned short lo16(unsigned r, int hi) { return hi ? r >> 16 : r & 0xffff; }

}  // namespace emu

inline void __syncthreads() {
    emu::meet(emu::S.block_count, emu::S.block_gen, (unsigned)emu::S.threads.size());
}
inline float __shfl_xor_sync(unsigned, float v, int mask) {
    emu::Deposit d{};
    d.f = v;
    return emu::exchange(d)[emu::S.cur->lane ^ mask].f;
}

// ---- kernels_cuda/common.cuh, emulated (same names and contracts)

typedef unsigned short bf16;

inline float bf2f(bf16 x) { return __uint_as_float(((unsigned)x) << 16); }
inline bf16 f2bf(float f) {
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}
inline unsigned pack_bf16x2(float lo, float hi) { return f2bf(lo) | ((unsigned)f2bf(hi) << 16); }
inline float bf16x2_lo(unsigned r) { return __uint_as_float(r << 16); }
inline float bf16x2_hi(unsigned r) { return __uint_as_float(r & 0xffff0000u); }

// mma.m16n8k16.row.col bf16 -> f32 (PTX ISA, "Matrix Fragments for mma.m16n8k16"), with
// g = lane / 4, t = lane % 4: A element (r, k) is in lane (r % 8) * 4 + (k % 8) / 2, register
// (r >= 8) + 2 (k >= 8), half k % 2; B element (k, n) in lane n * 4 + (k % 8) / 2, register
// k >= 8, half k % 2; D element c of a lane is (g + 8 (c / 2), 2t + c % 2).
inline void mma_bf16_16816(float d[4], const unsigned a[4], const unsigned b[2]) {
    emu::Deposit mine{};
    for (int i = 0; i < 4; i++) mine.w[i] = a[i];
    mine.w[4] = b[0];
    mine.w[5] = b[1];
    const emu::Deposit* all = emu::exchange(mine);
    const int lane = emu::S.cur->lane, g = lane >> 2, t = lane & 3;
    for (int c = 0; c < 4; c++) {
        const int r = g + 8 * (c >> 1), n = 2 * t + (c & 1);
        float s = d[c];
        for (int k = 0; k < 16; k++) {
            const float av = bf2f(emu::lo16(all[(r & 7) * 4 + ((k & 7) >> 1)].w[(r >= 8) + 2 * (k >= 8)], k & 1));
            const float bv = bf2f(emu::lo16(all[n * 4 + ((k & 7) >> 1)].w[4 + (k >= 8)], k & 1));
            s += av * bv;
        }
        d[c] = s;
    }
}

// ldmatrix m8n8 b16: matrix m's row j at the address of lane 8m + j; lane l receives
// (row l / 4, columns 2 (l % 4), +1) of each matrix, or with .trans (rows 2 (l % 4), +1; column l / 4)
inline void ldmatrix_n(unsigned* r, int n, const void* p, bool trans) {
    emu::Deposit mine{};
    mine.p = p;
    const emu::Deposit* all = emu::exchange(mine);
    const int l = emu::S.cur->lane;
    for (int m = 0; m < n; m++) {
        if (trans) {
            const bf16* a = (const bf16*)all[8 * m + 2 * (l & 3)].p;
            const bf16* b = (const bf16*)all[8 * m + 2 * (l & 3) + 1].p;
            r[m] = a[l >> 2] | ((unsigned)b[l >> 2] << 16);
        } else {
            const bf16* row = (const bf16*)all[8 * m + (l >> 2)].p;
            r[m] = row[2 * (l & 3)] | ((unsigned)row[2 * (l & 3) + 1] << 16);
        }
    }
}
inline void ldmatrix_x4(unsigned r[4], const void* p) { ldmatrix_n(r, 4, p, false); }
inline void ldmatrix_x4_trans(unsigned r[4], const void* p) { ldmatrix_n(r, 4, p, true); }
inline void ldmatrix_x2(unsigned r[2], const void* p) { ldmatrix_n(r, 2, p, false); }

inline void cp_async16(void* dst, const void* src, int src_bytes) {
    std::memcpy(dst, src, src_bytes);
    std::memset((char*)dst + src_bytes, 0, 16 - src_bytes);
}
inline void cp_async_commit() {}
template <int N> inline void cp_async_wait() {}

inline float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
inline float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

template <int V> inline void load_f32(const float* p, float* v) { for (int i = 0; i < V; ++i) v[i] = p[i]; }
template <int V> inline void store_f32(float* p, const float* v) { for (int i = 0; i < V; ++i) p[i] = v[i]; }
