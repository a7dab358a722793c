"""GPU check of the element-wise kernels (mpinfer/backend/cuda_elementwise.py): to_bf16,
rmsnorm / add_rmsnorm (float32 and bf16 output), rope, silu_mul and embedding.

Inputs are drawn on the GPU (a cupy RandomState seeded from rng, fresh per shape) and cut to
bf16-exact values where a model would hand the kernel bf16-rounded data; the reference is the
NumPy backend on host copies of the same values. Outputs are poisoned before the checked run.
Shapes cover decode and prefill (T = 1, 7, 513, 4096), ragged widths and the one-element
fallback kernels (misaligned views, widths not a multiple of the vector). The large shapes
are timed as well (10 calls queued back to back per interval, so launch overhead hides):
bw_frac = (bytes read + written) / time / util.copy_bandwidth(), next to
a cupy device-to-device copy (cudaMemcpy via cupy.copyto) of the same number of bytes.
"""

import warnings

import cupy
import numpy as np
from util import bf16_bits, bits_to_f32, copy_bandwidth, poisoned, rel_err, result, time_us

from mpinfer.backend import cuda_elementwise as ce
from mpinfer.backend.numpy_backend import NumpyBackend

EPS = 1e-6
TS = (1, 7, 513, 4096)
WIDTHS = (64, 576, 4096, 8192)  # rmsnorm n, embedding D
TIMED_T = 8192  # timed shapes: 8192 x 4096 float32 activations (128 MB)
BACK_TO_BACK = 10  # calls per timed interval

_nb = []


def _numpy():
    if not _nb:
        _nb.append(NumpyBackend())
    return _nb[0]


def _gen(rng):
    return cupy.random.RandomState(int(rng.integers(2**31)))


def _normal(g, shape, scale=1.0):
    """float32 normal values cut to bf16-exact ones (the low 16 bits cleared), on the GPU."""
    x = g.standard_normal(shape, dtype=np.float32) * np.float32(scale)
    return (x.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)


def _bf16(g, shape, scale=1.0):
    """uint16 bf16 bits of normal values (truncated), on the GPU."""
    x = g.standard_normal(shape, dtype=np.float32) * np.float32(scale)
    return (x.view(np.uint32) >> 16).astype(np.uint16)


def _misaligned(a):
    """A contiguous copy of a whose data starts 4 bytes past a 16-byte boundary."""
    buf = cupy.empty(a.size + 4, a.dtype)
    off = 4 // a.itemsize
    view = buf[off : off + a.size].reshape(a.shape)
    view[...] = a
    return view


def _poisoned(shape, dtype=np.float32):
    """util.poisoned, with uint16 filled by 0xFFFF (a NaN's bits): -1 does not fit uint16 under
    NumPy 2's scalar rules."""
    return cupy.full(shape, 0xFFFF, np.uint16) if dtype == np.uint16 else poisoned(shape, dtype)


def _back_to_back(fn):
    """fn's median time per call, from BACK_TO_BACK queued calls between two events: a call's
    Python/launch overhead (~10-20 us) then overlaps the previous kernel instead of adding to
    a ~100 us kernel's time."""
    return time_us(lambda: [fn() for _ in range(BACK_TO_BACK)]) / BACK_TO_BACK


def _timing(fn, nbytes):
    """Time of fn, its fraction of the copy bandwidth, and a same-bytes memcpy timed alike."""
    us = _back_to_back(fn)
    src = cupy.ones(nbytes // 2, np.uint8)
    dst = cupy.empty_like(src)
    base = _back_to_back(lambda: cupy.copyto(dst, src))
    return {"us": us, "baseline": "cupy d2d copy (memcpy) of the same bytes", "baseline_us": base,
            "ratio": base / us, "bw_frac": nbytes / (us * 1e-6) / copy_bandwidth(), "GBps": nbytes / (us * 1e3)}


def _guard(rows, kernel, shape, fn):
    """rows += fn()'s rows, or one failed row with the error."""
    try:
        rows.extend(fn())
    except Exception as e:  # noqa: BLE001 -- a broken shape is reported, the rest still run
        rows.append({"kernel": kernel, "shape": shape, "ok": False, "error": f"{type(e).__name__}: {e}"})


# ---- to_bf16: bit-exact against util.bf16_bits (NaN in -> 0x7fc0, f2bf's canonical NaN)

def _cast_expected(x):
    x = np.ascontiguousarray(x)
    return np.where(np.isnan(x), np.uint16(0x7FC0), bf16_bits(x))


def _cast_row(x, shape, timed=False):
    y = _poisoned(x.shape, np.uint16)
    ce.to_bf16(x, out=y)
    bad = int(np.count_nonzero(y.get() != _cast_expected(x.get())))
    row = {"kernel": "to_bf16", "shape": shape, "mismatches": bad, "ok": bad == 0}
    if timed:
        row.update(_timing(lambda: ce.to_bf16(x, out=y), x.size * 6))
    return [row]


def _special_bits(rng, n):
    """n random float32 bit patterns (NaN, inf, denormals included) with the edge cases first."""
    bits = rng.integers(0, 2**32, n, dtype=np.uint32)
    edge = np.array([np.nan, -np.nan, np.inf, -np.inf, 3.4e38, -3.4e38, np.finfo(np.float32).max, 1e-45, -1e-45,
                     0.0, -0.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 1.0 + 2**-8 + 2**-20, 65504.0], np.float32)
    edge_bits = np.concatenate([edge.view(np.uint32), [0x7F800001, 0xFF800001, 0x7FFFFFFF, 0x3F808000,
                                                       0x3F818000, 0x7F7F8000, 0x7F7FFFFF, 0x00008000]])
    k = min(n, len(edge_bits))
    bits[:k] = edge_bits[:k].astype(np.uint32)
    return cupy.asarray(bits.view(np.float32))


def check_cast(rng, rows):
    for shape in [(1,), (7,), (1001,), (513, 576), (4096, 8192)]:
        _guard(rows, "to_bf16", shape, lambda: _cast_row(_special_bits(rng, int(np.prod(shape))).reshape(shape),
                                                         str(shape)))
    _guard(rows, "to_bf16", "(513, 576) misaligned -> s1",
           lambda: _cast_row(_misaligned(_special_bits(rng, 513 * 576).reshape(513, 576)), "(513, 576) s1"))
    _guard(rows, "to_bf16", f"({TIMED_T}, 4096) timed",
           lambda: _cast_row(_normal(_gen(rng), (TIMED_T, 4096)), f"({TIMED_T}, 4096)", timed=True))


# ---- rmsnorm, add_rmsnorm (float32 and bf16 out)

def _norm_rows(g, t, n, label, timed=False, misaligned=False):
    x = _normal(g, (t, n), 2.0)
    d = _normal(g, (t, n))
    if misaligned:
        x, d = _misaligned(x), _misaligned(d)
    wb = _bf16(g, (n,))
    xh, dh, w = x.get(), d.get(), bits_to_f32(wb.get())
    nb = _numpy()
    ref = nb.rmsnorm(xh, w, EPS)
    s_ref = xh + dh
    ref_add = nb.rmsnorm(s_ref, w, EPS)
    out = []
    for bf16 in (False, True):
        dtype = np.uint16 if bf16 else np.float32
        name = "_bf16" if bf16 else ""
        y = _poisoned((t, n), dtype)
        ce.rmsnorm(x, wb, EPS, bf16=bf16, out=y)
        got = bits_to_f32(y.get()) if bf16 else y.get()
        row = result(f"rmsnorm{name}", label, got, ref)
        if timed:
            row.update(_timing(lambda: ce.rmsnorm(x, wb, EPS, bf16=bf16, out=y), x.nbytes + y.nbytes + wb.nbytes))
        out.append(row)

        xs = x.copy()
        y = _poisoned((t, n), dtype)
        s, y = ce.add_rmsnorm(xs, d, wb, EPS, bf16=bf16, out=y)
        got = bits_to_f32(y.get()) if bf16 else y.get()
        row = result(f"add_rmsnorm{name}", label, got, ref_add)
        s_err = rel_err(s.get(), s_ref)  # the residual sum, written into x
        row.update(s_rel_err=s_err, s_in_place=s is xs, ok=row["ok"] and s_err < 1e-6 and s is xs)
        if timed:  # x keeps growing by d over the repeats: harmless for timing
            row.update(_timing(lambda: ce.add_rmsnorm(xs, d, wb, EPS, bf16=bf16, out=y),
                               2 * x.nbytes + d.nbytes + y.nbytes + wb.nbytes))
        out.append(row)
    return out


def check_rmsnorm(rng, rows):
    for t in TS:
        for n in WIDTHS:
            _guard(rows, "rmsnorm", (t, n), lambda: _norm_rows(_gen(rng), t, n, str((t, n))))
    _guard(rows, "rmsnorm", "(7, 100) s1", lambda: _norm_rows(_gen(rng), 7, 100, "(7, 100) n % 8 -> s1"))
    _guard(rows, "rmsnorm", "(5, 16384)", lambda: _norm_rows(_gen(rng), 5, 16384, "(5, 16384) longest row"))
    _guard(rows, "rmsnorm", "(513, 4096) misaligned",
           lambda: _norm_rows(_gen(rng), 513, 4096, "(513, 4096) misaligned -> s1", misaligned=True))
    _guard(rows, "rmsnorm", f"({TIMED_T}, 4096) timed",
           lambda: _norm_rows(_gen(rng), TIMED_T, 4096, f"({TIMED_T}, 4096)", timed=True))


# ---- rope

def _rope_rows(g, t, heads, dh, label, timed=False, misaligned=False):
    x = _normal(g, (t, heads, dh))
    if misaligned:
        x = _misaligned(x)
    ang = g.uniform(0, 2 * np.pi, (t, dh // 2), dtype=np.float32)  # float32 cos/sin tables
    c, s = cupy.cos(ang), cupy.sin(ang)
    ref = _numpy().rope(x.get(), c.get(), s.get())
    y = _poisoned(x.shape)
    ce.rope(x, c, s, out=y)
    row = result("rope", label, y.get(), ref)
    if timed:
        row.update(_timing(lambda: ce.rope(x, c, s, out=y), 2 * x.nbytes + c.nbytes + s.nbytes))
    out = [row]
    if not timed:
        xi = x.copy()  # in place: out=x
        out.append(result("rope_inplace", label, ce.rope(xi, c, s, out=xi).get(), ref))
    return out


def check_rope(rng, rows):
    for t in TS:
        for dh in (64, 128):
            heads = 32 if dh == 128 else 8
            _guard(rows, "rope", (t, heads, dh), lambda: _rope_rows(_gen(rng), t, heads, dh, str((t, heads, dh))))
    _guard(rows, "rope", "(7, 5, 6) s1", lambda: _rope_rows(_gen(rng), 7, 5, 6, "(7, 5, 6) half % 4 -> s1"))
    _guard(rows, "rope", "(513, 8, 128) misaligned",
           lambda: _rope_rows(_gen(rng), 513, 8, 128, "(513, 8, 128) misaligned -> s1", misaligned=True))
    _guard(rows, "rope", f"({TIMED_T}, 32, 128) timed",
           lambda: _rope_rows(_gen(rng), TIMED_T, 32, 128, f"({TIMED_T}, 32, 128)", timed=True))


# ---- silu_mul on the two halves of a (T, 2I) array

def _silu_rows(g, t, i, label, timed=False):
    gu = _normal(g, (t, 2 * i), 3.0)
    gu[0, :4] = cupy.asarray([-100.0, -30.0, 30.0, 100.0], np.float32)  # exp(100) overflows: -0
    gate, up = gu[:, :i], gu[:, i:]
    gh = gu.get()
    with warnings.catch_warnings():  # exp(100) overflows in the NumPy backend's threads
        warnings.simplefilter("ignore", RuntimeWarning)
        ref = _numpy().silu_mul(gh[:, :i], gh[:, i:])
    y = _poisoned((t, i))
    ce.silu_mul(gate, up, out=y)
    row = result("silu_mul", label, y.get(), ref)
    if timed:
        row.update(_timing(lambda: ce.silu_mul(gate, up, out=y), gu.nbytes + y.nbytes))
    return [row]


def check_silu(rng, rows):
    for t in TS:
        for i in (1536, 14336):
            _guard(rows, "silu_mul", (t, i), lambda: _silu_rows(_gen(rng), t, i, f"({t}, {i}) of ({t}, {2 * i})"))
    _guard(rows, "silu_mul", "(513, 1001) s1", lambda: _silu_rows(_gen(rng), 513, 1001, "(513, 1001) unaligned -> s1"))
    _guard(rows, "silu_mul", f"({TIMED_T}, 14336) timed",
           lambda: _silu_rows(_gen(rng), TIMED_T, 14336, f"({TIMED_T}, 14336) of ({TIMED_T}, 28672)", timed=True))


# ---- embedding, vocabulary-parallel

def _embedding_rows(g, rng, t, d, label, vp=49152, offset=49152, id_dtype=np.int64, timed=False):
    table = _bf16(g, (vp, d))
    ids = rng.integers(0, offset + vp + 1000, t).astype(id_dtype)  # ids below, inside and above the table
    ids[: min(t, 4)] = np.array([offset, offset + vp - 1, offset + vp, offset - 1], id_dtype)[: min(t, 4)]
    local = ids.astype(np.int64) - offset
    inside = (local >= 0) & (local < vp)
    # the NumPy backend on a table of just the rows looked up (row k for token k), with the
    # same in/out pattern: keeps the host copy small for a (49152, 8192) table
    rows = bits_to_f32(table[cupy.asarray(np.where(inside, local, 0))].get())
    ref = _numpy().embedding(rows, np.where(inside, offset + np.arange(t), offset - 1), offset)
    y = _poisoned((t, d))
    ce.embedding(table, cupy.asarray(ids), offset, out=y)
    row = result("embedding", label, y.get(), ref)
    row["ok"] = row["ok"] and row["rel_err"] == 0.0  # a widening copy: exact
    if timed:
        ids_gpu = cupy.asarray(ids)
        row.update(_timing(lambda: ce.embedding(table, ids_gpu, offset, out=y), y.nbytes + y.nbytes // 2 + ids.nbytes))
    return [row]


def check_embedding(rng, rows):
    for t in TS:
        for d in WIDTHS:
            _guard(rows, "embedding", (t, d),
                   lambda: _embedding_rows(_gen(rng), rng, t, d, f"T {t}, D {d}, Vp 49152, offset 49152"))
    _guard(rows, "embedding", "int32 ids", lambda: _embedding_rows(_gen(rng), rng, 513, 576, "T 513, D 576, int32 ids",
                                                                   offset=0, id_dtype=np.int32))
    _guard(rows, "embedding", "D 100 s1", lambda: _embedding_rows(_gen(rng), rng, 513, 100, "T 513, D 100 -> s1",
                                                                  vp=1000))
    _guard(rows, "embedding", f"T {TIMED_T}, D 4096 timed",
           lambda: _embedding_rows(_gen(rng), rng, TIMED_T, 4096, f"T {TIMED_T}, D 4096, Vp 49152", timed=True))


def run(rng):
    rows = []
    for check in (check_cast, check_rmsnorm, check_rope, check_silu, check_embedding):
        check(rng, rows)
        cupy.get_default_memory_pool().free_all_blocks()
    return rows
