"""Attention and KV-cache writes of the CUDA backend (kernels_cuda/attention_prefill.cu,
attention_decode.cu, kv_store.cu, rope_kv_store.cu).

Shapes: T query rows, H query heads, Hkv KV heads (H = G * Hkv, query head h reads KV head
h // G), Dh head dim (64 or 128), R pool rows (num_blocks * block_size), B sequences. KV pools
are one layer's cupy uint16 arrays of bf16 bits, (R, Hkv, Dh); queries and outputs float32.
Index arrays are int32 cupy arrays. The NumPy backend's partial_attention / paged_attention /
store_kv are the references (bench/gpu/check_attention.py).
"""

import math

import cupy
import numpy as np

from . import kernels
from .kernels import require

PREFILL_MI = {64: 2, 128: 1}  # m16 row tiles per warp of the prefill kernel, per head dim (measured fastest on H200)
DECODE_CHUNKS = (1024, 512, 256, 128)  # keys per decode split, largest first
DECODE_TABLE = 256  # block-table entries a decode split stages (TAB in attention_decode.cu)
SM_COUNT = 132
HEAD_DIMS = (64, 128)


def _check_pool(name, pool, Hkv=None, Dh=None):
    require(isinstance(pool, cupy.ndarray) and pool.dtype == np.uint16 and pool.ndim == 3 and pool.flags.c_contiguous,
            f"{name}: need a C-contiguous cupy uint16 (bf16 bits) array (R, Hkv, Dh), got "
            f"{type(pool).__name__} {getattr(pool, 'dtype', '?')} {getattr(pool, 'shape', '?')}")
    if Hkv is not None:
        require(pool.shape[1:] == (Hkv, Dh), f"{name}: shape {pool.shape}, need (R, {Hkv}, {Dh})")


def _check_array(name, a, dtype, ndim):
    require(isinstance(a, cupy.ndarray) and a.dtype == dtype and a.ndim == ndim and a.flags.c_contiguous,
            f"{name}: need a C-contiguous cupy {np.dtype(dtype).name} array of {ndim} dims, got "
            f"{type(a).__name__} {getattr(a, 'dtype', '?')} {getattr(a, 'shape', '?')}")


def _check_heads(op, q, k_pool, v_pool):
    """q (T, H, Dh) float32 and the K/V pools (R, Hkv, Dh) bf16 of one op; returns (T, H, Dh, Hkv)."""
    _check_array(f"{op} q", q, np.float32, 3)
    T, H, Dh = q.shape
    require(Dh in HEAD_DIMS, f"{op} q: head dim {Dh}, need one of {HEAD_DIMS}")
    _check_pool(f"{op} k_pool", k_pool)
    Hkv = k_pool.shape[1]
    require(Hkv > 0 and H % Hkv == 0, f"{op}: {H} query heads not a multiple of {Hkv} KV heads")
    _check_pool(f"{op} k_pool", k_pool, Hkv, Dh)
    _check_pool(f"{op} v_pool", v_pool, Hkv, Dh)
    require(v_pool.shape == k_pool.shape, f"{op} v_pool: shape {v_pool.shape}, need {k_pool.shape}")
    return T, H, Dh, Hkv


def store_kv(pool, slots, x):
    """pool (R, Hkv, Dh) uint16 bf16 bits, in place: pool[slots[t]] = bf16(x[t]) for every token t
    with slots[t] >= 0 (a negative slot skips the token). slots (T,) int32, x (T, Hkv, Dh) float32."""
    _check_pool("store_kv pool", pool)
    _check_array("store_kv slots", slots, np.int32, 1)
    _check_array("store_kv x", x, np.float32, 3)
    T, row = len(slots), pool.shape[1] * pool.shape[2]
    require(x.shape == (T,) + pool.shape[1:], f"store_kv x: shape {x.shape}, need ({T}, {pool.shape[1]}, {pool.shape[2]})")
    require(row % 8 == 0, f"store_kv pool: Hkv * Dh = {row}, need a multiple of 8")
    n = T * row // 8
    if n:
        kernels.function("kv_store", "kv_store_bf16")(((n + 255) // 256,), (256,),
                                                      (x, slots, pool, np.int32(T), np.int32(row), np.int32(len(pool))))
    return pool


def _rows(name, a, heads, Dh):
    """a float32 (T, heads, Dh) with contiguous rows any whole number of elements apart ->
    that row stride, in elements."""
    require(isinstance(a, cupy.ndarray) and a.dtype == np.float32 and a.ndim == 3 and a.shape[1:] == (heads, Dh)
            and a.strides[1:] == (Dh * 4, 4) and a.strides[0] % 4 == 0 and a.strides[0] >= 0,
            f"{name}: need float32 (T, {heads}, {Dh}) with contiguous rows, got {getattr(a, 'dtype', '?')} "
            f"{getattr(a, 'shape', '?')} strides {getattr(a, 'strides', '?')}")
    return a.strides[0] // 4


def rope_kv_store(q, k, v, cos, sin, slots, k_pool, v_pool):
    """RoPE and the KV store in one pass (kernels_cuda/rope_kv_store.cu). q (T, H, Dh), k, v
    (T, Hkv, Dh) float32, each token's row contiguous (e.g. column blocks of one QKV output);
    cos, sin (T, Dh/2) float32; slots (T,) int32; pools (R, Hkv, Dh) bf16 bits. Returns q roped,
    a new contiguous (T, H, Dh) array; k is roped in place; pool[slots[t]] gets bf16 of the
    roped k and of v for every slots[t] >= 0. As NumpyBackend.rope_store_kv."""
    _check_pool("rope_kv_store k_pool", k_pool)
    T, (R, Hkv, Dh) = len(q), k_pool.shape
    require(q.ndim == 3 and q.shape[2] == Dh and q.shape[1] % Hkv == 0,
            f"rope_kv_store q: shape {getattr(q, 'shape', '?')}, need (T, a multiple of {Hkv}, {Dh})")
    H, half = q.shape[1], Dh // 2
    _check_pool("rope_kv_store v_pool", v_pool, Hkv, Dh)
    sq, sk, sv = (_rows(f"rope_kv_store {n}", a, h, Dh) for n, a, h in (("q", q, H), ("k", k, Hkv), ("v", v, Hkv)))
    require(len(k) == len(v) == T and Dh % 2 == 0, f"rope_kv_store: q, k, v of {T}, {len(k)}, {len(v)} tokens")
    _check_array("rope_kv_store slots", slots, np.int32, 1)
    for name, a in (("cos", cos), ("sin", sin)):
        _check_array(f"rope_kv_store {name}", a, np.float32, 2)
        require(a.shape == (T, half), f"rope_kv_store {name}: shape {a.shape}, need ({T}, {half})")
    require(slots.shape == (T,), f"rope_kv_store slots: shape {slots.shape}, need ({T},)")
    out = cupy.empty((T, H, Dh), np.float32)
    if T == 0:
        return out
    vec = half % 4 == 0 and sq % 4 == 0 and sk % 4 == 0 and sv % 4 == 0 and all(
        a.data.ptr % 16 == 0 for a in (q, k, v, cos, sin, out))
    V = 4 if vec else 1
    threads = min(256, max(32, -(-(H + 2 * Hkv) * half // V // 32) * 32))
    f = kernels.function("rope_kv_store", "rope_kv_store_v4" if vec else "rope_kv_store_s1")
    f((T,), (threads,), (q, k, v, np.int64(sq), np.int64(sk), np.int64(sv), cos, sin, slots, out, k_pool, v_pool,
                         np.int32(H), np.int32(Hkv), np.int32(half), np.int32(R)))
    return out


def varlen_attention(q, k_pool, v_pool, seg_q, q_pos, seg_k, key_slots, key_pos, window=0, out=None, lse=None):
    """Causal (optionally sliding-window) attention over segments, K/V gathered from the pools.
    q (T, H, Dh) float32; k_pool, v_pool (R, Hkv, Dh) bf16 bits; seg_q (nseg+1,) int32 row offsets
    of the segments' queries, q_pos (T,) int32 their positions; seg_k (nseg+1,) int32 offsets into
    key_slots / key_pos (K,) int32: each segment's keys as pool rows and positions, positions
    increasing within a segment. Key j is visible to the query at p when key_pos[j] <= p and
    (window == 0 or p - key_pos[j] < window). Returns out (T, H, Dh) float32 over the visible
    keys (0 where none) and lse (T, H) float32, their log-sum-exp of scaled scores (-inf where
    none): NumpyBackend.partial_attention per segment. The segments must cover rows 0..T-1
    (rows outside them are not written; the device-side arrays are not read back to check)."""
    T, H, Dh, Hkv = _check_heads("varlen_attention", q, k_pool, v_pool)
    for name, a in (("seg_q", seg_q), ("q_pos", q_pos), ("seg_k", seg_k), ("key_slots", key_slots), ("key_pos", key_pos)):
        _check_array(f"varlen_attention {name}", a, np.int32, 1)
    nseg = len(seg_q) - 1
    require(nseg >= 0 and len(seg_k) == nseg + 1, f"varlen_attention: seg_q {seg_q.shape} and seg_k {seg_k.shape} need "
                                                  "the same length nseg + 1")
    require(len(q_pos) == T, f"varlen_attention q_pos: shape {q_pos.shape}, need ({T},)")
    require(len(key_pos) == len(key_slots), f"varlen_attention key_pos: shape {key_pos.shape}, need {key_slots.shape}")
    require(window >= 0, f"varlen_attention window: {window}, need >= 0")
    out = cupy.empty((T, H, Dh), np.float32) if out is None else out
    lse = cupy.empty((T, H), np.float32) if lse is None else lse
    require(out.shape == (T, H, Dh) and out.dtype == np.float32 and out.flags.c_contiguous,
            f"varlen_attention out: {out.dtype} {out.shape}, need float32 ({T}, {H}, {Dh}) contiguous")
    require(lse.shape == (T, H) and lse.dtype == np.float32 and lse.flags.c_contiguous,
            f"varlen_attention lse: {lse.dtype} {lse.shape}, need float32 ({T}, {H}) contiguous")
    if T == 0 or nseg == 0:
        return out, lse
    mi = PREFILL_MI[Dh]
    smem = (64 * mi + 2 * 64) * Dh * 2  # Q tile, K tile, V tile (bf16)
    f = kernels.function("attention_prefill", f"attn_varlen_d{Dh}_m{mi}", smem)
    grid = (-(-T // (64 * mi)) + nseg, H)  # an upper bound on the row tiles; spare blocks exit
    f(grid, (128,), (q, k_pool, v_pool, seg_q, q_pos, seg_k, key_slots, key_pos, out, lse, np.int32(nseg), np.int32(H),
                     np.int32(Hkv), np.int32(window), np.float32(1.0 / math.sqrt(Dh))), shared_mem=smem)
    return out, lse


def decode_splits(B, groups, max_keys, block_size=16):
    """(keys per split, splits) for B sequences x groups (KV head, head group) blocks of up to
    max_keys keys: the largest chunk that still gives a few waves of blocks over the SMs (and
    whose block ids fit the kernel's staging table)."""
    chunks = [c for c in DECODE_CHUNKS if c // block_size + 1 <= DECODE_TABLE]  # 128 always fits
    for chunk in chunks:
        nsplit = max(1, -(-max_keys // chunk))
        if B * groups * nsplit >= 4 * SM_COUNT:
            break
    return chunk, nsplit


def decode_attention(q, k_pool, v_pool, tables, kv_lens, block_size, window=0):
    """One query per sequence over its paged cache (FlashDecoding). q (B, H, Dh) float32, the
    query of sequence b at position kv_lens[b] - 1; k_pool, v_pool (R, Hkv, Dh) bf16 bits;
    tables (B, nb) int32 block ids; kv_lens (B,) int32, 1 <= kv_lens[b] <= nb * block_size (not
    checked: on the device); block_size a power of two. Keys visible: the last `window` (all when
    0). Returns out (B, H, Dh) float32: NumpyBackend._decode_attention."""
    B, H, Dh, Hkv = _check_heads("decode_attention", q, k_pool, v_pool)
    _check_array("decode_attention tables", tables, np.int32, 2)
    _check_array("decode_attention kv_lens", kv_lens, np.int32, 1)
    require(tables.shape[0] == B and kv_lens.shape == (B,),
            f"decode_attention: tables {tables.shape} and kv_lens {kv_lens.shape} need {B} rows")
    block_size, window = int(block_size), int(window)  # numpy scalars welcome
    require(block_size > 0 and block_size & (block_size - 1) == 0, f"decode_attention block_size: {block_size}, "
                                                                   "need a power of two")
    require(len(k_pool) % block_size == 0, f"decode_attention k_pool: {len(k_pool)} rows, need a multiple of "
                                           f"block_size {block_size}")
    require(window >= 0, f"decode_attention window: {window}, need >= 0")
    out = cupy.empty((B, H, Dh), np.float32)
    if B == 0:
        return out
    G = H // Hkv
    GB = max(d for d in range(1, 9) if G % d == 0)  # query heads per block
    nb = tables.shape[1]
    chunk, nsplit = decode_splits(B, Hkv * G // GB, nb * block_size, block_size)
    po = cupy.empty((B, H, nsplit, Dh), np.float32)
    plse = cupy.empty((B, H, nsplit), np.float32)
    f = kernels.function("attention_decode", f"attn_decode_d{Dh}_g{GB}")
    f((nsplit, Hkv * G // GB, B), (128,),
      (q, k_pool, v_pool, tables, kv_lens, po, plse, np.int32(H), np.int32(Hkv), np.int32(G), np.int32(nb),
       np.int32(block_size.bit_length() - 1), np.int32(chunk), np.int32(nsplit), np.int32(window),
       np.float32(1.0 / math.sqrt(Dh))))
    kernels.function("attention_decode", "attn_decode_merge")((B * H,), (Dh,), (po, plse, out, np.int32(nsplit),
                                                                                 np.int32(Dh)))
    return out
