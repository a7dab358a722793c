"""Memory-bound element-wise ops of the CUDA backend: the cast to bf16, RMSNorm (plain, fused
with the residual add, optionally emitting bf16), RoPE and its cos/sin tables, SwiGLU and the embedding lookup.

Activations are float32 cupy arrays, weights bf16 carried as cupy uint16 arrays of the bits.
Each op picks the kernel variant that moves 16 bytes per load/store when its arrays are
16-byte aligned and its sizes divide (the usual case: cupy allocations are 256-byte aligned),
else the one-element-per-step variant of the same kernel. The NumPy backend
(numpy_backend.py) is the reference of every op; the kernels' manuals are the headers of
kernels_cuda/{cast,rmsnorm,rope,swiglu,embedding}.cu.
"""

from functools import lru_cache

import cupy
import numpy as np

from . import kernels
from .kernels import require

BLOCK = 256  # threads of the grid-stride kernels (cast, silu_mul)
NORM_ELEMS = 16  # rmsnorm.cu's ELEMS: elements per thread kept in registers
NORM_MAX = NORM_ELEMS * 1024  # the longest row rmsnorm takes


def _ptr(a):
    return a.data.ptr


def _aligned(*arrays):
    return all(_ptr(a) % 16 == 0 for a in arrays)


def _warps(threads, most):
    """threads rounded up to whole warps, between 32 and most."""
    return min(most, max(32, -(-threads // 32) * 32))


@lru_cache(maxsize=None)
def _sms(device):
    return cupy.cuda.runtime.getDeviceProperties(device)["multiProcessorCount"]


def _grid(steps):
    """Blocks of a grid-stride kernel over steps: at most 8 blocks of 256 (2048 threads) per SM."""
    return max(1, min(-(-steps // BLOCK), _sms(cupy.cuda.Device().id) * 8))


def _f32(name, a):
    require(a.dtype == np.float32, f"{name}: float32 needed, got {a.dtype} {a.shape}")


def _contiguous(name, a):
    require(a.flags.c_contiguous, f"{name}: a C-contiguous array needed, got strides {a.strides} for {a.shape}")


def _out(out, shape, dtype, name="out"):
    """out checked (shape, dtype, contiguity), or a new array."""
    if out is None:
        return cupy.empty(shape, dtype)
    require(tuple(out.shape) == tuple(shape) and out.dtype == dtype,
            f"{name}: {np.dtype(dtype)} {tuple(shape)} needed, got {out.dtype} {tuple(out.shape)}")
    _contiguous(name, out)
    return out


def to_bf16(x, out=None):
    """float32 x (any shape, contiguous) -> uint16 bf16 bits of the same shape, round to
    nearest even (NaN -> 0x7fc0)."""
    _f32("to_bf16 x", x)
    _contiguous("to_bf16 x", x)
    y = _out(out, x.shape, np.uint16)
    n = x.size
    if n == 0:
        return y
    vec = _aligned(x, y)
    f = kernels.function("cast", "cast_f32_bf16_v8" if vec else "cast_f32_bf16_s1")
    f((_grid(n // 8 if vec else n),), (BLOCK,), (x, y, np.int64(n)))
    return y


def _norm(kind, x, delta, w, eps, bf16, out):
    """rmsnorm.cu's {kind}_{f32,bf16}_{v8,s1} over the rows of x (..., n)."""
    _f32(f"{kind} x", x)
    _contiguous(f"{kind} x", x)
    require(x.ndim >= 1 and 1 <= x.shape[-1] <= NORM_MAX,
            f"{kind} x: rows of 1..{NORM_MAX} elements needed, got shape {x.shape}")
    n = x.shape[-1]
    require(w.dtype == np.uint16 and w.shape == (n,) and w.flags.c_contiguous,
            f"{kind} w: contiguous uint16 bf16 ({n},) needed, got {w.dtype} {w.shape}")
    y = _out(out, x.shape, np.uint16 if bf16 else np.float32)
    rows = x.size // n
    if rows == 0:
        return y
    vec = n % 8 == 0 and _aligned(x, delta, w, y)
    threads = _warps(-(-n // NORM_ELEMS), 1024)  # each thread holds NORM_ELEMS elements (2 steps of 8, or 16 of 1)
    name = f"{kind}_{'bf16' if bf16 else 'f32'}_{'v8' if vec else 's1'}"
    kernels.function("rmsnorm", name)((rows,), (threads,), (x, delta, w, y, np.int32(n), np.float32(eps)))
    return y


def rmsnorm(x, w, eps, bf16=False, out=None):
    """x float32 (..., n) contiguous, n <= 16384; w uint16 bf16 bits (n,) ->
    x * rsqrt(mean(x^2 over the last axis) + eps) * w, float32 (..., n), or with bf16=True its
    uint16 bf16 bits (round to nearest even) ready for a GEMM. As NumpyBackend.rmsnorm."""
    return _norm("rmsnorm", x, x, w, eps, bf16, out)


def add_rmsnorm(x, delta, w, eps, bf16=False, out=None):
    """Residual add fused with the next RMSNorm, one pass over the rows.
    x, delta float32 (..., n) contiguous, w uint16 bf16 (n,). Returns (s, y): s = x + delta
    IS x, UPDATED IN PLACE (the residual stream); y = rmsnorm(s, w, eps) as a new float32
    (..., n) array, or uint16 bf16 bits with bf16=True (or written into out)."""
    _f32("add_rmsnorm delta", delta)
    _contiguous("add_rmsnorm delta", delta)
    require(delta.shape == x.shape, f"add_rmsnorm delta: shape {x.shape} (as x) needed, got {delta.shape}")
    return x, _norm("add_rmsnorm", x, delta, w, eps, bf16, out)


def rope(x, cos, sin, out=None):
    """Rotary embedding, rotate-half as NumpyBackend.rope. x float32 (T, heads, Dh)
    contiguous, Dh even; cos, sin float32 (T, Dh/2) contiguous -> float32 (T, heads, Dh), a
    new array, or out (out=x rotates x in place)."""
    _f32("rope x", x)
    _contiguous("rope x", x)
    require(x.ndim == 3 and x.shape[2] % 2 == 0, f"rope x: (T, heads, even Dh) needed, got {x.shape}")
    t, heads, dh = x.shape
    half = dh // 2
    for name, a in (("cos", cos), ("sin", sin)):
        _f32(f"rope {name}", a)
        _contiguous(f"rope {name}", a)
        require(a.shape == (t, half), f"rope {name}: ({t}, {half}) needed, got {a.shape}")
    out = _out(out, x.shape, np.float32)
    if x.size == 0:
        return out
    vec = half % 4 == 0 and _aligned(x, cos, sin, out)
    v = 4 if vec else 1
    f = kernels.function("rope", "rope_v4" if vec else "rope_s1")
    f((t,), (_warps(heads * half // v, 256),), (x, cos, sin, out, np.int32(heads), np.int32(half)))
    return out


def rope_tables(positions, inv_freq, cos=None, sin=None):
    """A step's RoPE tables on the device, as rope.cos_sin: positions int32 (T,), inv_freq float64
    (half,) (rope.inv_freq) -> cos, sin float32 (T, half), new or written into cos, sin."""
    _check_1d("rope_tables positions", positions, np.int32)
    _check_1d("rope_tables inv_freq", inv_freq, np.float64)
    shape = (len(positions), len(inv_freq))
    cos, sin = _out(cos, shape, np.float32, "cos"), _out(sin, shape, np.float32, "sin")
    n = shape[0] * shape[1]
    if n:
        kernels.function("rope", "rope_tables")((-(-n // BLOCK),), (BLOCK,),
                                                (positions, inv_freq, cos, sin, np.int32(shape[0]), np.int32(shape[1])))
    return cos, sin


def _check_1d(name, a, dtype):
    require(a.dtype == dtype and a.ndim == 1 and a.flags.c_contiguous,
            f"{name}: contiguous {np.dtype(dtype)} (n,) needed, got {a.dtype} {a.shape}")


def silu_mul(gate, up, out=None):
    """SwiGLU: silu(gate) * up = gate / (1 + exp(-gate)) * up, as NumpyBackend.silu_mul.
    gate, up float32 (T, I) with unit column stride and any row stride (e.g. the two column
    halves of one (T, 2I) array) -> float32 (T, I) contiguous (new, or out)."""
    for name, a in (("gate", gate), ("up", up)):
        _f32(f"silu_mul {name}", a)
        require(a.ndim == 2 and a.shape == gate.shape,
                f"silu_mul {name}: 2-D, shape as gate {gate.shape} needed, got {a.shape}")
        require(a.strides[1] == 4 and a.strides[0] % 4 == 0 and a.strides[0] >= 0,
                f"silu_mul {name}: unit column stride and a whole-element row stride needed, got strides {a.strides}")
    rows, cols = gate.shape
    out = _out(out, gate.shape, np.float32)
    if out.size == 0:
        return out
    gs, us = gate.strides[0] // 4, up.strides[0] // 4
    vec = cols % 4 == 0 and gs % 4 == 0 and us % 4 == 0 and _aligned(gate, up, out)
    steps = rows * cols // (4 if vec else 1)
    require(steps < 2**31, f"silu_mul: at most 2^31 steps (32-bit index), got {rows} x {cols}")
    f = kernels.function("swiglu", "silu_mul_v4" if vec else "silu_mul_s1")
    f((_grid(steps),), (BLOCK,), (gate, up, out, np.int32(rows), np.int32(cols), np.int64(gs), np.int64(us)))
    return out


def silu_mul_fused(gu, out=None):
    """gu float32 (T, 2I): [gate | up] as one GEMM writes them -> silu_mul(gate, up), (T, I)."""
    require(gu.ndim == 2 and gu.shape[1] % 2 == 0, f"silu_mul_fused gu: (T, 2I) needed, got {gu.shape}")
    i = gu.shape[1] // 2
    return silu_mul(gu[:, :i], gu[:, i:], out)


def embedding(table, ids, offset=0, out=None):
    """Vocabulary-parallel lookup, as NumpyBackend.embedding. table uint16 bf16 bits (Vp, D)
    contiguous holding vocabulary rows offset..offset+Vp-1; ids int32 or int64 (T,) (a numpy
    array is copied to the device) -> float32 (T, D): the row of each id, zero for ids outside
    the table (another rank's rows)."""
    require(table.dtype == np.uint16 and table.ndim == 2 and table.shape[1] >= 1,
            f"embedding table: uint16 bf16 (Vp, D) needed, got {table.dtype} {table.shape}")
    _contiguous("embedding table", table)
    ids = cupy.ascontiguousarray(cupy.asarray(ids))
    require(ids.ndim == 1 and ids.dtype in (np.int32, np.int64),
            f"embedding ids: int32 or int64 (T,) needed, got {ids.dtype} {ids.shape}")
    vp, d = table.shape
    out = _out(out, (len(ids), d), np.float32)
    if out.size == 0:
        return out
    vec = d % 8 == 0 and _aligned(table, out)
    name = f"embedding_{'i32' if ids.dtype == np.int32 else 'i64'}_{'v8' if vec else 's1'}"
    f = kernels.function("embedding", name)
    threads = _warps(d // (8 if vec else 1), 256)
    f((len(ids),), (threads,), (table, ids, out, np.int32(d), np.int64(vp), np.int64(offset)))
    return out
