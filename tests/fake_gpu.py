"""A GPU stand-in for machines without one: a `cupy` module over NumPy, and the CUDA kernel
wrappers (cuda_gemm, cuda_elementwise, cuda_attention, cuda_routing, cuda_quant) replaced by
their NumPy references on the same bf16 bits. With it the CUDA backend's own code (cuda_backend.py:
weights to bf16 or kept in their GGUF blocks, the casts before each matmul, decode and
prefill products on quantized weights, the per-step attention metadata, decode and
prefill rows split between two kernels, negative KV slots, MoE routing; cuda_comm.py: the
host-staged MPI groups; the runner and the pipeline moving its arrays; cuda_graphs.py's
captures and replays, under a real capture's rules) runs in CI with real MPI jobs. Device
arrays are a NumPy subclass, and a kernel stand-in refuses host arrays. The kernels
themselves are checked on a GPU by bench/gpu/check.py.

    import fake_gpu; fake_gpu.install()     # before mpinfer.backend.cuda_backend is imported

As a program: `python tests/fake_gpu.py ARGS...` is `mpinfer ARGS...` with the stand-in.
"""

import collections
import contextlib
import sys
import types

import numpy as np


def bf16_bits(x):
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def f32(bits):
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)


# ---- stream capture, as a real GPU allows it. A CUDA graph records the GPU work of the code
# between begin_capture and end_capture (kernels with their pointers, copies between device
# arrays, memsets), and a replay runs that work again on whatever the arrays then hold. The
# stand-in keeps a tape of the same work: each kernel stand-in, ufunc, copy or fill on device
# arrays appends a replay that recomputes it into the array it wrote at the capture. What a
# capture cannot hold raises CaptureError: a host <-> device copy, a synchronization, a device
# value read on the host, an allocation from the shared pool (after the capture it would be
# handed to others while the graph still writes it) or one its private pool has not made
# before (a cudaMalloc while capturing: warm up first with the same allocations).

class CaptureError(RuntimeError):
    pass


class _State:
    tape = None  # list of replays while a capture is under way
    depth = 0  # > 0 inside a kernel stand-in: its NumPy work is the kernel's, not recorded apart
    pool = None  # the MemoryPool of cupy.cuda.using_allocator, or None (the shared pool)
    replays = 0  # graph launches so far (tests check that graphs ran)


STATE = _State()


def _forbid(what):
    if STATE.tape is not None:
        raise CaptureError(f"{what} during a CUDA graph capture")


def _record(replay):
    if STATE.tape is not None and STATE.depth == 0:
        STATE.tape.append(replay)


def _allocated(a):
    """Book a new device array of a's size with the current pool (cupy rounds to 512 bytes)."""
    n = -(-a.nbytes // 512) * 512
    if STATE.tape is not None:
        if STATE.pool is None:
            raise CaptureError(f"a {n}-byte allocation from the shared memory pool during a CUDA graph capture")
        if n not in STATE.pool.sizes:
            raise CaptureError(f"a {n}-byte allocation its pool has not made before (cudaMalloc) during a CUDA graph "
                               "capture")
    if STATE.pool is not None:
        STATE.pool.sizes.add(n)


def _plain(a):
    return a.view(np.ndarray) if isinstance(a, DeviceArray) else a


def _device(result, inputs):
    """A kernel stand-in's result as device arrays; arrays in new memory are booked."""
    if isinstance(result, tuple):
        return tuple(_device(r, inputs) for r in result)
    if not isinstance(result, np.ndarray):
        return result
    if not any(isinstance(i, np.ndarray) and np.may_share_memory(result, i) for i in inputs):
        _allocated(result)
    return result.view(DeviceArray)


def _copy_into(dst, src):
    if isinstance(dst, tuple):
        for d, s in zip(dst, src):
            _copy_into(d, s)
    elif isinstance(dst, np.ndarray):
        np.copyto(_plain(dst), src)


def device_op(fn):
    """fn, a kernel's NumPy stand-in, run as the GPU would: on device arrays only (a host
    array in a kernel's arguments is a bug), its results device arrays; during a capture
    also recorded, to run again at each replay into the same result arrays."""

    def run(*args, **kwargs):
        hosts = [a for a in (*args, *kwargs.values()) if isinstance(a, np.ndarray) and not isinstance(a, DeviceArray)]
        if hosts:
            raise TypeError(f"{fn.__name__}: a host array {hosts[0].dtype} {hosts[0].shape} among a kernel's arguments")
        plain, kw = [_plain(a) for a in args], {k: _plain(v) for k, v in kwargs.items()}
        STATE.depth += 1
        try:
            result = _device(fn(*plain, **kw), plain + list(kw.values()))
        finally:
            STATE.depth -= 1
        _record(lambda: _copy_into(result, fn(*plain, **kw)))
        return result

    run.__name__ = fn.__name__
    return run


class DeviceArray(np.ndarray):
    """A cupy.ndarray stand-in: NumPy memory, with cupy's transfers (get, set) and the capture's
    rules. Views stay device arrays; ufuncs, copies and fills are recorded during a capture."""

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        plain = tuple(_plain(i) for i in inputs)
        if out is not None:
            kwargs["out"] = tuple(_plain(o) for o in out)
        fn = getattr(ufunc, method)
        STATE.depth += 1
        try:
            result = fn(*plain, **kwargs)
        finally:
            STATE.depth -= 1
        if out is not None:
            _record(lambda: fn(*plain, **kwargs))
            return out[0] if len(out) == 1 else out
        result = _device(result, plain)
        _record(lambda: _copy_into(result, fn(*plain, **kwargs)))
        return result

    def __getitem__(self, index):
        if isinstance(index, np.ndarray) and not isinstance(index, DeviceArray) or (
                isinstance(index, tuple) and any(type(i) is np.ndarray for i in index)):
            _forbid("a host index array (a host-to-device copy)")
        index = tuple(_plain(i) for i in index) if isinstance(index, tuple) else _plain(index)
        result = np.ndarray.__getitem__(self, index)
        if isinstance(result, np.ndarray) and not np.may_share_memory(result, self):  # a gather: a kernel
            _allocated(result)
            _record(lambda: np.copyto(_plain(result), np.ndarray.__getitem__(self.view(np.ndarray), index)))
        elif not isinstance(result, np.ndarray):
            _forbid("a device value read on the host")
        return result

    def __setitem__(self, index, value):
        index = tuple(_plain(i) for i in index) if isinstance(index, tuple) else _plain(index)
        value = _plain(value)
        np.ndarray.__setitem__(self.view(np.ndarray), index, value)
        _record(lambda: np.ndarray.__setitem__(self.view(np.ndarray), index, value))

    def astype(self, dtype, copy=True, **kwargs):
        if not copy and np.dtype(dtype) == self.dtype:
            return self
        return cupy_ascontiguous(self, dtype)

    def copy(self, order="C"):
        return cupy_ascontiguous(self, self.dtype, force=True)

    def fill(self, value):
        np.ndarray.fill(self, value)
        _record(lambda: np.ndarray.fill(self, value))

    def get(self, stream=None):
        _forbid("a device-to-host copy (ndarray.get)")
        return np.array(self.view(np.ndarray))

    def set(self, host, stream=None):
        _forbid("a host-to-device copy (ndarray.set)")
        np.copyto(self.view(np.ndarray), host)

    def _host_value(self, kind):
        _forbid("a device value read on the host")
        return kind(self.view(np.ndarray))

    __int__ = lambda self: self._host_value(int)
    __float__ = lambda self: self._host_value(float)
    __bool__ = lambda self: self._host_value(bool)
    __index__ = lambda self: self._host_value(int)

    def item(self):
        return self._host_value(lambda a: a.item())

    def tolist(self):
        return self._host_value(lambda a: a.tolist())


def cupy_ascontiguous(x, dtype=None, force=False):
    """cupy.ascontiguousarray: x itself when contiguous of dtype, else a device copy (a kernel)."""
    if not isinstance(x, DeviceArray):
        _forbid("a host-to-device copy (cupy.asarray of a host array)")
        out = np.array(x, dtype=dtype, order="C").view(DeviceArray)
        _allocated(out)
        return out
    dtype = x.dtype if dtype is None else np.dtype(dtype)
    if x.flags.c_contiguous and dtype == x.dtype and not force:
        return x
    out = np.ascontiguousarray(x.view(np.ndarray), dtype).copy().view(DeviceArray)
    _allocated(out)
    _record(lambda: np.copyto(out.view(np.ndarray), x.view(np.ndarray), casting="unsafe"))
    return out


def _created(make, refill=None):
    """A device array made by cupy.zeros, empty, ...: booked; during a capture refilled at each
    replay when its making writes it (a memset or a kernel)."""

    def run(*args, **kwargs):
        args = [_plain(a) for a in args]
        out = make(*args, **kwargs).view(DeviceArray)
        _allocated(out)
        if refill is not None:
            _record(lambda: np.copyto(out.view(np.ndarray), make(*args, **kwargs)))
        return out

    return run


class _Stream:
    """cupy.cuda.Stream: ordering is the program's order here; capture keeps the tape."""

    def __init__(self, non_blocking=False):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def synchronize(self):
        _forbid("a stream synchronization")

    def record(self, event=None):
        return event

    def wait_event(self, event):
        pass

    def begin_capture(self, mode=None):
        if STATE.tape is not None:
            raise CaptureError("a capture is already under way")
        STATE.tape = []

    def end_capture(self):
        tape, STATE.tape = STATE.tape, None
        return _Graph(tape)


class _Graph:
    def __init__(self, tape):
        self.tape = tape

    def launch(self, stream=None):
        STATE.replays += 1
        for replay in self.tape:
            replay()


class _MemoryPool:
    """A private pool: the sizes it has handed out (its blocks, for a capture to take again)."""

    def __init__(self, allocator=None):
        self.sizes = set()

    def malloc(self, nbytes):
        raise NotImplementedError("the stand-in allocates through NumPy; using_allocator(pool.malloc) marks the pool")


@contextlib.contextmanager
def _using_allocator(malloc):
    before, STATE.pool = STATE.pool, malloc.__self__
    try:
        yield
    finally:
        STATE.pool = before


def _asarray(x, dtype=None):
    if isinstance(x, DeviceArray):
        return x.astype(dtype or x.dtype, copy=False)
    return cupy_ascontiguous(np.asarray(x), dtype)


def _asnumpy(x, stream=None):
    _forbid("a device-to-host copy (cupy.asnumpy)")
    return np.array(_plain(x))


def _cupy():
    cp = types.ModuleType("cupy")
    cp.ndarray = DeviceArray
    cp.asarray = _asarray
    cp.asnumpy = _asnumpy
    cp.ascontiguousarray = lambda x, dtype=None: cupy_ascontiguous(x, dtype)
    cp.empty, cp.empty_like = _created(np.empty), _created(np.empty_like)
    for name in ("zeros", "full", "arange"):
        setattr(cp, name, _created(getattr(np, name), refill=True))
    cp.concatenate = device_op(lambda arrays, axis=0: np.concatenate(arrays, axis))
    for name in ("uint16", "uint32", "float32", "float64", "int32", "int64"):
        setattr(cp, name, getattr(np, name))
    cp.is_available = lambda: True

    class Device:
        def __init__(self, i=0):
            self.id, self.compute_capability = i, "90"

        def use(self):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    # one GPU of 80 GiB: ranks share it, as on the test machine
    props = {"pciDomainID": 0, "pciBusID": 0, "pciDeviceID": 0}
    cp.cuda = types.SimpleNamespace(Device=Device, Stream=_Stream, Graph=_Graph, MemoryPool=_MemoryPool,
                                    using_allocator=_using_allocator, get_current_stream=_Stream,
                                    runtime=types.SimpleNamespace(
        getDeviceCount=lambda: 1, getDeviceProperties=lambda i: props, memGetInfo=lambda: (60 << 30, 80 << 30),
        CUDARuntimeError=type("CUDARuntimeError", (RuntimeError,), {})),
                                    driver=types.SimpleNamespace(CUDADriverError=type("CUDADriverError", (RuntimeError,), {})))
    return cp


def swiglu_epilogue(y):
    """The GEMM's SwiGLU epilogue on its (M, N) product (+ bias) y, whose columns are gate/up
    interleaved (2i gate_i, 2i + 1 up_i): silu(gate) * up (M, N/2), as NumpyBackend.silu_mul."""
    assert y.shape[1] % 2 == 0
    from mpinfer.backend.numpy_backend import NumpyBackend

    return NumpyBackend(threads=1).silu_mul(y[:, 0::2], y[:, 1::2])


def _kernels():
    from mpinfer import rope
    from mpinfer.backend.numpy_backend import NumpyBackend

    ref = NumpyBackend(threads=1)
    gemm = types.ModuleType("mpinfer.backend.cuda_gemm")

    def gemm_(a, w, bias=None, swiglu=False):
        # in float64, rounded once: a row's result does not depend on the other rows (OpenBLAS's
        # float32 blocking does, which would flip bf16 roundings between batch sizes)
        assert a.dtype == w.dtype == np.uint16 and a.flags.c_contiguous
        y = (f32(a).astype(np.float64) @ f32(w).T.astype(np.float64)).astype(np.float32)
        y = y + bias if bias is not None else y
        return swiglu_epilogue(y) if swiglu else y

    gemm.gemm = device_op(gemm_)

    ew = types.ModuleType("mpinfer.backend.cuda_elementwise")

    def rmsnorm(x, w, eps, bf16=False):
        y = ref.rmsnorm(x, f32(w), eps)
        return bf16_bits(y) if bf16 else y

    def add_rmsnorm(x, delta, w, eps, bf16=False):  # like the kernel: the sum goes into x
        x += delta
        return x, rmsnorm(x, w, eps, bf16)

    def rope_tables(positions, inv_freq):
        assert positions.dtype == np.int32 and inv_freq.dtype == np.float64
        return rope.cos_sin(inv_freq, positions)

    ew.to_bf16 = device_op(bf16_bits)
    ew.rmsnorm, ew.add_rmsnorm, ew.rope_tables = device_op(rmsnorm), device_op(add_rmsnorm), device_op(rope_tables)
    ew.silu_mul = device_op(lambda gate, up: ref.silu_mul(np.ascontiguousarray(gate), np.ascontiguousarray(up)))
    ew.embedding = device_op(lambda table, ids, offset: ref.embedding(f32(table), ids, offset))

    att = types.ModuleType("mpinfer.backend.cuda_attention")

    def rope_kv_store(q, k, v, cos, sin, slots, k_pool, v_pool):  # q roped to a new array, k in place
        assert k_pool.dtype == v_pool.dtype == np.uint16 and slots.dtype == np.int32
        out = ref.rope(q, cos, sin)
        k[...] = ref.rope(k, cos, sin)
        keep = slots >= 0
        k_pool[slots[keep]] = bf16_bits(k[keep])
        v_pool[slots[keep]] = bf16_bits(v[keep])
        return out

    def varlen_attention(q, k_pool, v_pool, seg_q, q_pos, seg_k, key_slots, key_pos, window):
        T, H, Dh = q.shape
        out, lse = np.full((T, H, Dh), np.nan, np.float32), np.full((T, H), np.nan, np.float32)
        for s in range(len(seg_q) - 1):
            rows, keys = slice(seg_q[s], seg_q[s + 1]), slice(seg_k[s], seg_k[s + 1])
            slots = key_slots[keys]
            out[rows], lse[rows] = ref.partial_attention(q[rows], f32(k_pool[slots]), f32(v_pool[slots]), q_pos[rows],
                                                         key_pos[keys], window)
        return out, lse

    def decode_attention(q, k_pool, v_pool, tables, kv_lens, block_size, window):
        out = np.full(q.shape, np.nan, np.float32)
        for b, S in enumerate(kv_lens):
            pos = np.arange(S)
            slots = tables[b, pos // block_size] * block_size + pos % block_size
            out[b] = ref.partial_attention(q[b : b + 1], f32(k_pool[slots]), f32(v_pool[slots]), np.array([S - 1]), pos,
                                           window)[0][0]
        return out

    att.rope_kv_store, att.varlen_attention, att.decode_attention = (
        device_op(rope_kv_store), device_op(varlen_attention), device_op(decode_attention))

    routing = types.ModuleType("mpinfer.backend.cuda_routing")

    def route(logits, top, norm):
        experts, weights = ref.route(logits, top, norm)
        return experts.astype(np.int32), weights

    routing.route = device_op(route)

    # quantized weights: the numbers quant.py and cuda_quant.py define (gemv_q: W exact; the
    # prefill path's dequantize: W rounded to bf16); `calls` counts which path ran
    from mpinfer.quant import BLOCK_BYTES, QuantTensor

    quant = types.ModuleType("mpinfer.backend.cuda_quant")
    quant.GEMV_Q_MAX_M, quant.calls = 16, collections.Counter()

    def blocks(wq, fmt, N, K):
        assert wq.dtype == np.uint8 and wq.flags.c_contiguous and wq.size == N * K // 32 * BLOCK_BYTES[fmt]
        return QuantTensor(fmt, wq.reshape(N, -1)).dequantize()

    def gemv_q(a, wq, fmt, N, K, bias=None):
        assert a.dtype == np.uint16 and a.flags.c_contiguous and a.shape[0] <= 16 and a.shape[1] == K
        quant.calls["gemv_q"] += 1
        y = f32(a) @ blocks(wq, fmt, N, K).T
        return y + bias if bias is not None else y

    def dequantize(wq, fmt, N, K, out):
        assert out.dtype == np.uint16 and out.shape == (N, K) and out.flags.c_contiguous
        quant.calls["dequantize"] += 1
        out[...] = bf16_bits(blocks(wq, fmt, N, K))
        return out

    quant.gemv_q, quant.dequantize = device_op(gemv_q), device_op(dequantize)
    return {"cuda_gemm": gemm, "cuda_elementwise": ew, "cuda_attention": att, "cuda_routing": routing,
            "cuda_quant": quant}


def modules():
    """{sys.modules name: module or None} that puts the stand-in in place (None: forget a
    module imported before, so that it imports the stand-in)."""
    return {"cupy": _cupy(), **{f"mpinfer.backend.{k}": m for k, m in _kernels().items()},
            "mpinfer.backend.cuda_backend": None, "mpinfer.backend.cuda_comm": None,
            "mpinfer.backend.cuda_graphs": None}


def install():
    for name, module in modules().items():
        if module is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = module


if __name__ == "__main__":
    install()
    from mpinfer.cli import main

    sys.argv[0] = "mpinfer"
    main()
