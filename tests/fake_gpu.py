"""A GPU stand-in for machines without one: a `cupy` module over NumPy, and the CUDA kernel
wrappers (cuda_gemm, cuda_elementwise, cuda_attention, cuda_routing, cuda_quant) replaced by
their NumPy references on the same bf16 bits. With it the CUDA backend's own code (cuda_backend.py:
weights to bf16 or kept in their GGUF blocks, the casts before each matmul, decode and
prefill products on quantized weights, the per-step attention metadata, decode and
prefill rows split between two kernels, negative KV slots, MoE routing; cuda_comm.py: the
host-staged MPI groups; the runner and the pipeline moving its arrays) runs in CI with real
MPI jobs. The kernels themselves are checked on a GPU by bench/gpu/check.py.

    import fake_gpu; fake_gpu.install()     # before mpinfer.backend.cuda_backend is imported

As a program: `python tests/fake_gpu.py ARGS...` is `mpinfer ARGS...` with the stand-in.
"""

import collections
import sys
import types

import numpy as np


def bf16_bits(x):
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def f32(bits):
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)


def _cupy():
    cp = types.ModuleType("cupy")
    cp.ndarray = np.ndarray
    cp.asarray = lambda x, dtype=None: np.array(x, dtype=dtype)  # a copy, as a host-to-device transfer
    cp.asnumpy = lambda x: np.array(x)
    for name in ("ascontiguousarray", "zeros", "empty", "empty_like", "full", "arange", "concatenate", "uint16",
                 "uint32", "float32", "int32", "int64"):
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
    cp.cuda = types.SimpleNamespace(Device=Device, runtime=types.SimpleNamespace(
        getDeviceCount=lambda: 1, getDeviceProperties=lambda i: props, memGetInfo=lambda: (60 << 30, 80 << 30)))
    return cp


def swiglu_epilogue(y):
    """The GEMM's SwiGLU epilogue on its (M, N) product (+ bias) y, whose columns are gate/up
    interleaved (2i gate_i, 2i + 1 up_i): silu(gate) * up (M, N/2), as NumpyBackend.silu_mul."""
    assert y.shape[1] % 2 == 0
    from mpinfer.backend.numpy_backend import NumpyBackend

    return NumpyBackend(threads=1).silu_mul(y[:, 0::2], y[:, 1::2])


def _kernels():
    from mpinfer.backend.numpy_backend import NumpyBackend

    ref = NumpyBackend(threads=1)
    gemm = types.ModuleType("mpinfer.backend.cuda_gemm")

    def gemm_(a, w, bias=None, swiglu=False):
        assert a.dtype == w.dtype == np.uint16 and a.flags.c_contiguous
        y = f32(a) @ f32(w).T
        y = y + bias if bias is not None else y
        return swiglu_epilogue(y) if swiglu else y

    gemm.gemm = gemm_

    ew = types.ModuleType("mpinfer.backend.cuda_elementwise")
    ew.to_bf16 = lambda x: bf16_bits(x)
    def rmsnorm(x, w, eps, bf16=False):
        y = ref.rmsnorm(x, f32(w), eps)
        return bf16_bits(y) if bf16 else y

    ew.rmsnorm = rmsnorm
    def add_rmsnorm(x, delta, w, eps, bf16=False):  # like the kernel: the sum goes into x
        x += delta
        return x, rmsnorm(x, w, eps, bf16)

    ew.add_rmsnorm = add_rmsnorm
    ew.rope = lambda x, cos, sin: ref.rope(x, cos, sin)
    ew.silu_mul = lambda gate, up: ref.silu_mul(np.ascontiguousarray(gate), np.ascontiguousarray(up))
    ew.embedding = lambda table, ids, offset: ref.embedding(f32(table), ids, offset)

    att = types.ModuleType("mpinfer.backend.cuda_attention")

    def store_kv(pool, slots, x):
        assert pool.dtype == np.uint16 and slots.dtype == np.int32
        keep = slots >= 0
        pool[slots[keep]] = bf16_bits(x[keep])

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

    att.store_kv, att.varlen_attention, att.decode_attention = store_kv, varlen_attention, decode_attention

    routing = types.ModuleType("mpinfer.backend.cuda_routing")

    def route(logits, top, norm):
        experts, weights = ref.route(logits, top, norm)
        return experts.astype(np.int32), weights

    routing.route = route

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

    quant.gemv_q, quant.dequantize = gemv_q, dequantize
    return {"cuda_gemm": gemm, "cuda_elementwise": ew, "cuda_attention": att, "cuda_routing": routing,
            "cuda_quant": quant}


def modules():
    """{sys.modules name: module or None} that puts the stand-in in place (None: forget a
    module imported before, so that it imports the stand-in)."""
    return {"cupy": _cupy(), **{f"mpinfer.backend.{k}": m for k, m in _kernels().items()},
            "mpinfer.backend.cuda_backend": None, "mpinfer.backend.cuda_comm": None}


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
