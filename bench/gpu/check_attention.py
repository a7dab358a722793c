"""GPU check of the attention kernels (mpinfer/backend/cuda_attention.py): store_kv,
varlen (prefill / partial) attention and paged decode attention against the NumPy backend on
bf16-rounded inputs, then timings: prefill next to torch SDPA causal flash, decode as a
fraction of the copy bandwidth next to torch SDPA decode over contiguous K/V.

Pools are built like kvcache's: blocks of 16 rows handed out in shuffled order, so the block
tables are not the identity. run(rng) -> list of report rows (util.result).
"""

import traceback

import cupy
import numpy as np
from util import bf16_bits, bits_to_f32, copy_bandwidth, poisoned, rel_err, result, time_us

from mpinfer.backend import cuda_attention as ca
from mpinfer.backend import kernels
from mpinfer.backend.numpy_backend import NumpyBackend

BS = 16
ref = NumpyBackend(threads=8)


def _row(kernel, shape, fn):
    """fn() -> row dict; an exception becomes a failed row with its message."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - report every failure as a row
        return {"kernel": kernel, "shape": shape, "ok": False, "error": f"{type(e).__name__}: {e}",
                "trace": traceback.format_exc(limit=3)}


def _pool(rng, seq_lens, Hkv, Dh, spare=3):
    """Float32 bf16-rounded K, V pools (R, Hkv, Dh) and block tables (B, nb) int32 with shuffled
    block ids for sequences of seq_lens tokens."""
    need = [-(-n // BS) for n in seq_lens]
    nb = max(max(need), 1)
    total = sum(need) + spare
    ids = rng.permutation(total)
    tables = np.zeros((len(seq_lens), nb), np.int32)
    at = 0
    for i, n in enumerate(need):
        tables[i, :n] = ids[at : at + n]
        at += n
    k = bits_to_f32(bf16_bits(rng.standard_normal((total * BS, Hkv, Dh), np.float32)))
    v = bits_to_f32(bf16_bits(rng.standard_normal((total * BS, Hkv, Dh), np.float32)))
    return k, v, tables


def _slots(table, pos):
    return (table[pos // BS] * BS + pos % BS).astype(np.int32)


def _lse_row(kernel, shape, out, lse, ref_out, ref_lse, **extra):
    """Row comparing out and the finite lse; -inf lse (no visible key) must match exactly."""
    fin = np.isfinite(ref_lse)
    mism = int(np.sum(np.isfinite(lse) != fin) + np.sum(np.isnan(lse)))
    err = max(rel_err(out, ref_out), rel_err(lse[fin], ref_lse[fin]) if fin.any() else 0.0)
    zero = bool(np.all(out[~fin] == 0))  # rows with no key: out must be exactly 0
    return {"kernel": kernel, "shape": shape, "rel_err": err, "mismatches": mism + int(not zero),
            "ok": bool(err < 1e-2 and mism == 0 and zero), **extra}


def check_store(rng, T, R, Hkv=8, Dh=128):
    pool_bits = bf16_bits(rng.standard_normal((R, Hkv, Dh), np.float32))
    x = rng.standard_normal((T, Hkv, Dh), np.float32)
    slots = rng.permutation(R)[:T].astype(np.int32)
    slots[rng.random(T) < 0.1] = -1  # skipped tokens
    want = pool_bits.copy()
    keep = slots >= 0
    want[slots[keep]] = bf16_bits(x[keep])
    pool, s, xd = cupy.asarray(pool_bits), cupy.asarray(slots), cupy.asarray(x)
    ca.store_kv(pool, s, xd)
    mism = int(np.sum(pool.get() != want))
    row = {"kernel": "kv_store", "shape": f"T{T} R{R} Hkv{Hkv} Dh{Dh}", "mismatches": mism, "ok": mism == 0}
    us = _per_call_us(lambda: ca.store_kv(pool, s, xd))
    nbytes = T * Hkv * Dh * 4 + int(keep.sum()) * Hkv * Dh * 2 + T * 4
    row.update(us=us, bw_frac=nbytes / (us * 1e-6) / copy_bandwidth())
    try:
        import torch
        pt = torch.as_tensor(pool, device="cuda").view(torch.bfloat16).view(R, -1)
        xt, st = torch.as_tensor(xd, device="cuda").view(T, -1), torch.as_tensor(s, device="cuda").long()
        xk, sk = xt[st >= 0], st[st >= 0]
        row.update(baseline="torch index_copy_ bf16",
                   baseline_us=_per_call_us(lambda: pt.index_copy_(0, sk, xk.to(torch.bfloat16))))
        row["ratio"] = row["baseline_us"] / us
    except Exception as e:  # noqa: BLE001
        row["baseline_error"] = str(e)
    return row


def check_varlen(rng, name, H, Hkv, Dh, segs, window):
    """segs: list of (q positions, key positions) per segment, all of one sequence each."""
    lens = [int(max(qp.max(initial=0), kp.max(initial=0))) + 1 for qp, kp in segs]
    kf, vf, tables = _pool(rng, lens, Hkv, Dh)
    T = sum(len(qp) for qp, _ in segs)
    q = bits_to_f32(bf16_bits(rng.standard_normal((T, H, Dh), np.float32)))
    seg_q = np.concatenate([[0], np.cumsum([len(qp) for qp, _ in segs])]).astype(np.int32)
    seg_k = np.concatenate([[0], np.cumsum([len(kp) for _, kp in segs])]).astype(np.int32)
    q_pos = np.concatenate([qp for qp, _ in segs]).astype(np.int32)
    key_pos = np.concatenate([kp for _, kp in segs]).astype(np.int32)
    key_slots = np.concatenate([_slots(tables[i], kp) for i, (_, kp) in enumerate(segs)]).astype(np.int32)
    ref_out, ref_lse = np.zeros((T, H, Dh), np.float32), np.zeros((T, H), np.float32)
    for i in range(len(segs)):
        rq, rk = slice(seg_q[i], seg_q[i + 1]), key_slots[seg_k[i] : seg_k[i + 1]]
        ref_out[rq], ref_lse[rq] = ref.partial_attention(q[rq], kf[rk], vf[rk], q_pos[rq], key_pos[seg_k[i] : seg_k[i + 1]],
                                                         window)
    kp_, vp_ = cupy.asarray(bf16_bits(kf)), cupy.asarray(bf16_bits(vf))
    args = [cupy.asarray(a) for a in (q, seg_q, q_pos, seg_k, key_slots, key_pos)]
    out, lse = poisoned((T, H, Dh)), poisoned((T, H))
    ca.varlen_attention(args[0], kp_, vp_, *args[1:], window, out=out, lse=lse)
    shape = f"{name}: H{H} Hkv{Hkv} Dh{Dh} w{window} q_lens {[len(qp) for qp, _ in segs]}"
    return _lse_row("attn_varlen", shape, out.get(), lse.get(), ref_out, ref_lse)


def varlen_cases(rng):
    ar = np.arange
    chunk = lambda first, n: (ar(first, first + n), ar(0, first + n))  # prefill chunk over the cache  # noqa: E731
    cases = [
        ("chunk", 8, 2, 128, [chunk(200, 300)], 0),
        ("ragged", 9, 3, 64, [chunk(0, 1), chunk(10, 7), chunk(100, 63), chunk(0, 64), chunk(37, 65)], 0),
        ("window", 8, 2, 128, [chunk(0, 300), chunk(150, 65), chunk(500, 1)], 100),
        ("mha", 4, 4, 64, [chunk(0, 130), chunk(5, 33)], 0),
        ("smollm", 9, 3, 64, [chunk(0, 300)], 100),
    ]
    # context parallelism: zig-zag shares of a 256-token prompt in 4 chunks of 64; queries in
    # chunks 0 and 3, keys in chunks 1 and 2 (the queries of chunk 0 see none of them)
    cp = (np.concatenate([ar(0, 64), ar(192, 256)]), np.concatenate([ar(64, 128), ar(128, 192)]))
    cases.append(("cp", 8, 2, 128, [cp, (ar(64, 128), ar(0, 64))], 0))
    cases.append(("cp-window", 12, 4, 64, [cp], 100))
    return [_row("attn_varlen", c[0], lambda c=c: check_varlen(rng, *c)) for c in cases]


def check_decode(rng, name, H, Hkv, Dh, kv_lens, window):
    B = len(kv_lens)
    kf, vf, tables = _pool(rng, kv_lens, Hkv, Dh)
    q = bits_to_f32(bf16_bits(rng.standard_normal((B, H, Dh), np.float32)))
    lens = np.asarray(kv_lens, np.int32)
    want = ref._decode_attention(q, kf, vf, tables, lens, BS, window)
    got = ca.decode_attention(cupy.asarray(q), cupy.asarray(bf16_bits(kf)), cupy.asarray(bf16_bits(vf)),
                              cupy.asarray(tables), cupy.asarray(lens), BS, window)
    return result("attn_decode", f"{name}: H{H} Hkv{Hkv} Dh{Dh} w{window} B{B} kv_lens {min(kv_lens)}..{max(kv_lens)}",
                  got.get(), want)


def decode_cases(rng):
    lens = [1, 2, 17, 100, 1000, 2048, 4097, 5000]
    cases = [("g4", 32, 8, 128, lens, 0), ("g4-window", 32, 8, 128, lens, 100), ("smollm", 9, 3, 64, lens, 0),
             ("g12", 12, 1, 128, [1, 300, 3000], 0), ("g1", 4, 4, 64, [5, 600], 7)]
    return [_row("attn_decode", c[0], lambda c=c: check_decode(rng, *c)) for c in cases]


def _per_call_us(fn, n=10):
    """Median microseconds of one fn() when n run back to back: the GPU queue stays full, so the
    wrapper's Python time (tens of us) overlaps the kernels instead of being counted."""
    return time_us(lambda: [fn() for _ in range(n)]) / n


def _torch():
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return torch, SDPBackend, sdpa_kernel


def time_prefill(rng, B, S, H=32, Hkv=8, Dh=128):
    """B sequences of S tokens, causal, contiguous pool; TFLOP/s of ours and torch flash."""
    T = B * S
    q = cupy.random.default_rng(int(rng.integers(1 << 31))).standard_normal((T, H, Dh), np.float32)
    k = cupy.asarray(bf16_bits(rng.standard_normal((T, Hkv, Dh), np.float32)))
    v = cupy.asarray(bf16_bits(rng.standard_normal((T, Hkv, Dh), np.float32)))
    pos = cupy.tile(cupy.arange(S, dtype=np.int32), B)
    seg = cupy.arange(0, T + 1, S, dtype=np.int32)
    slots = cupy.arange(T, dtype=np.int32)
    flops = B * 2 * S * S * H * Dh  # 2 * 2 * S * S / 2 * H * Dh per sequence
    us = _per_call_us(lambda: ca.varlen_attention(q, k, v, seg, pos, seg, slots, pos, 0))
    f = kernels.function("attention_prefill", f"attn_varlen_d{Dh}_m{ca.PREFILL_MI[Dh]}")
    row = {"kernel": "attn_varlen", "shape": f"causal {B}x{S} H{H} Hkv{Hkv} Dh{Dh} rows{64 * ca.PREFILL_MI[Dh]}", "ok": True, "us": us,
           "tflops": flops / us * 1e-6, "regs": f.num_regs, "spill_bytes": f.local_size_bytes}
    # correctness of this very launch on a few rows of the last sequence (NumPy on 4 query rows)
    out, lse = ca.varlen_attention(q, k, v, seg, pos, seg, slots, pos, 0)
    rows = np.array([T - S, T - S + 1, T - 7, T - 1])
    qh = bits_to_f32(bf16_bits(q[cupy.asarray(rows)].get()))
    kk, vv = bits_to_f32(k[T - S :].get()), bits_to_f32(v[T - S :].get())
    ro, _ = ref.partial_attention(qh, kk, vv, rows - (T - S), np.arange(S), 0)
    row["rel_err"] = rel_err(out[cupy.asarray(rows)].get(), ro)
    row["ok"] = row["rel_err"] < 1e-2
    try:
        torch, SDPBackend, sdpa_kernel = _torch()
        qt = torch.as_tensor(q, device="cuda").view(B, S, H, Dh).transpose(1, 2).to(torch.bfloat16).contiguous()
        kt = torch.as_tensor(k, device="cuda").view(torch.bfloat16).view(B, S, Hkv, Dh).transpose(1, 2)
        vt = torch.as_tensor(v, device="cuda").view(torch.bfloat16).view(B, S, Hkv, Dh).transpose(1, 2)
        kt, vt = (t.repeat_interleave(H // Hkv, dim=1).contiguous() for t in (kt, vt))  # flash on equal heads
        sdpa = torch.nn.functional.scaled_dot_product_attention
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            bus = _per_call_us(lambda: sdpa(qt, kt, vt, is_causal=True))
        row.update(baseline="torch sdpa flash causal bf16", baseline_us=bus, baseline_tflops=flops / bus * 1e-6,
                   ratio=bus / us)
    except Exception as e:  # noqa: BLE001
        row["baseline_error"] = f"{type(e).__name__}: {e}"
    return row


def time_decode(rng, B, S, H=32, Hkv=8, Dh=128):
    """B sequences of S cached keys in shuffled blocks; bytes of K and V read per second."""
    crng = cupy.random.default_rng(int(rng.integers(1 << 31)))
    nblk = B * S // BS

    def bits():  # bf16 bits of standard normals, made on the device (GBs)
        f = crng.standard_normal((nblk * BS, Hkv, Dh), np.float32)
        return ((f.view(np.uint32) + 0x7FFF + ((f.view(np.uint32) >> 16) & 1)) >> 16).astype(np.uint16)

    k, v = bits(), bits()
    tables_np = rng.permutation(nblk).astype(np.int32).reshape(B, S // BS)
    tables = cupy.asarray(tables_np)
    lens = cupy.full((B,), S, np.int32)
    q = crng.standard_normal((B, H, Dh), np.float32)
    us = _per_call_us(lambda: ca.decode_attention(q, k, v, tables, lens, BS, 0))
    nbytes = 2 * B * S * Hkv * Dh * 2
    G = H // Hkv
    GB = max(d for d in range(1, 9) if G % d == 0)
    f = kernels.function("attention_decode", f"attn_decode_d{Dh}_g{GB}")
    chunk, nsplit = ca.decode_splits(B, Hkv * G // GB, S)
    row = {"kernel": "attn_decode", "shape": f"B{B} S{S} H{H} Hkv{Hkv} Dh{Dh} chunk{chunk}x{nsplit}", "us": us,
           "bw_frac": nbytes / (us * 1e-6) / copy_bandwidth(), "regs": f.num_regs, "spill_bytes": f.local_size_bytes}
    # correctness on two sequences of this batch, their blocks gathered into a compact pool
    out = ca.decode_attention(q, k, v, tables, lens, BS, 0)[:2].get()
    rows = cupy.asarray((tables_np[:2, :, None] * BS + np.arange(BS)).reshape(-1))
    kf, vf = bits_to_f32(k[rows].get()), bits_to_f32(v[rows].get())
    sub = np.arange(2 * S // BS, dtype=np.int32).reshape(2, -1)
    want = ref._decode_attention(q[:2].get(), kf, vf, sub, np.full(2, S, np.int32), BS, 0)
    row.update(rel_err=rel_err(out, want))
    row["ok"] = row["rel_err"] < 1e-2
    try:
        torch, _, _ = _torch()
        qt = torch.as_tensor(q, device="cuda").to(torch.bfloat16).view(B, H, 1, Dh)
        kt = torch.empty((B, Hkv, S, Dh), dtype=torch.bfloat16, device="cuda").normal_()
        vt = torch.empty_like(kt).normal_()
        sdpa = torch.nn.functional.scaled_dot_product_attention
        bus = _per_call_us(lambda: sdpa(qt, kt, vt, enable_gqa=True))
        row.update(baseline="torch sdpa decode (contiguous K/V, enable_gqa)", baseline_us=bus, ratio=bus / us)
    except Exception as e:  # noqa: BLE001
        row["baseline_error"] = f"{type(e).__name__}: {e}"
    return row


def run(rng):
    rows = [_row("kv_store", f"T{T}", lambda T=T, R=R: check_store(rng, T, R)) for T, R in ((3000, 4096), (16384, 32768))]
    rows += varlen_cases(rng)
    rows += decode_cases(rng)
    for B, S in ((1, 4096), (4, 2048)):
        rows.append(_row("attn_varlen", f"causal {B}x{S}", lambda B=B, S=S: time_prefill(rng, B, S)))
    for S in (4096, 16384):
        rows.append(_row("attn_decode", f"B32 S{S}", lambda S=S: time_decode(rng, 32, S)))
        cupy.get_default_memory_pool().free_all_blocks()
    return rows
