"""The CUDA backend: the NumPy backend's ops on one GPU, through our kernels (kernels_cuda/).

What lives where: weights and the KV cache are bf16 on the GPU (cupy uint16 arrays holding
the bits: CuPy has no bfloat16 dtype), except linear weights a GGUF file stores as Q8_0,
Q4_0 or Q4_1, which stay in their blocks (quant.QuantTensor over a cupy uint8 array; the
embedding and LM head are bf16 whatever the file holds); activations between ops are
float32 cupy arrays, so the model code's residual adds, splits and reshapes run unchanged
on either backend. Every matmul rounds its input rows to bf16 (one cast pass) and
accumulates in fp32 on the tensor cores; attention reads bf16 K/V and accumulates in fp32.
A step's metadata (positions, KV slots, block tables, lengths: _Meta) is uploaded once per
step, not once per layer, and everything derived from it (RoPE's cos/sin tables) is
computed on the GPU, so that a decode step can also run as a CUDA graph reading static
device buffers (cuda_graphs.py).

A product on a quantized weight: M <= 16 rows through gemv_q (the blocks dequantized inside
the GEMM); taller ones dequantize the weight into a bf16 scratch buffer (one per backend, the
size of the largest quantized weight: e.g. 235 MB for Llama-3-8B's fused gate/up) and run
the bf16 GEMM on it, as llama.cpp does for big batches. That costs one extra pass over the
weight per product (its blocks read, 2 bytes a weight written; the GEMM then reads bf16 as
it would anyway): for 4096 x 14336 in Q4_1, 154 MB, about 50 us at 3 TB/s, next to about
180 us for the GEMM of 512 rows at 330 TFLOP/s (+25%; +6% at 2048 rows). Estimated, not
yet measured: bench/gpu/check_quant.py times the 512-row product against the bf16 GEMM.

Shapes as in numpy_backend.py.
"""

import threading
from collections import OrderedDict

import cupy
import numpy as np

from . import cuda_attention as att
from . import cuda_elementwise as ew
from . import cuda_routing as routing
from ..quant import BLOCK_BYTES, QuantTensor
from .cuda_comm import gpu_group
from .cuda_gemm import gemm
from .cuda_quant import GEMV_Q_MAX_M, dequantize, gemv_q


class CudaBackend:
    name = "cuda"
    kv_bytes = 2  # per element of the KV cache (bf16)
    quantized_formats = tuple(BLOCK_BYTES)  # GGUF block formats linears keep (quant.py)

    def __init__(self, device=0):
        """device: the GPU's index among those this process sees (cuda_comm.pick_device)."""
        self.device = cupy.cuda.Device(device)
        self.device.use()
        self.weight_bytes = 0
        self._held = threading.Lock()  # weight_bytes and _largest: the model loads layers on several threads
        self._uploads = OrderedDict()  # id(host array) -> (host array, device copy): the last few
        self._largest = 0  # weights of the largest quantized weight: the scratch buffer's size
        self._scratch = None  # bf16 (largest,): a quantized weight dequantized for a prefill product
        self._inv_freq = {}  # id(model's rope.inv_freq) -> (it, float64 device copy)

    def weight(self, array):
        """A checkpoint tensor (float32 numpy) -> bf16 bits on the GPU, rounded to nearest even;
        a QuantTensor -> the same blocks on the GPU."""
        if isinstance(array, QuantTensor):
            with self.device:
                out = QuantTensor(array.fmt, cupy.asarray(array.data))
            self._hold(out.data.nbytes, out.shape[0] * out.shape[1])
            return out
        u = np.ascontiguousarray(array, np.float32).view(np.uint32)
        bits = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)  # wraps only for NaN/inf inputs
        with self.device:  # the model loads layers on worker threads, whose current device is 0
            out = cupy.asarray(bits)
        self._hold(out.nbytes)
        return out

    def _hold(self, nbytes, quantized_weights=0):
        """Count a tensor put on the GPU; quantized_weights: its weights, if in GGUF blocks (the
        largest sizes the dequantization scratch buffer, which then never has to grow)."""
        with self._held:
            self.weight_bytes += nbytes
            self._largest = max(self._largest, quantized_weights)

    def bias(self, array):
        """A bias stays float32 (it is added to float32 activations; a few KB)."""
        with self.device:
            out = cupy.asarray(np.ascontiguousarray(array, np.float32))
        self._hold(out.nbytes)
        return out

    def group(self, group):
        """comm.Group -> the group for this backend's arrays: NCCL or host-staged MPI."""
        return gpu_group(group, self.device.id)

    def asarray(self, x):
        """Host activations (float32 numpy) -> the backend's (float32 on the GPU)."""
        return cupy.asarray(x)

    def to_numpy(self, x):
        return cupy.asnumpy(x)

    def zeros(self, shape):
        return cupy.zeros(shape, cupy.float32)

    def route(self, logits, top, norm):
        """As NumpyBackend.route, on the GPU (kernels_cuda/moe_routing.cu); host results (the
        MoE layer's pair bookkeeping runs on the host)."""
        experts, weights = routing.route(cupy.ascontiguousarray(logits), top, norm)
        return cupy.asnumpy(experts).astype(np.int64), cupy.asnumpy(weights)

    def kv_pool(self, rows, heads, head_dim):
        """One layer's K or V pool: (rows, heads, head_dim) bf16."""
        return cupy.zeros((rows, heads, head_dim), cupy.uint16)

    def _up(self, x, dtype):
        """A host array on the GPU as dtype (a device array passes through); the same host
        object (e.g. a CP step's key positions, used by every layer) is uploaded once. Holding
        the host array keeps its id from being reused."""
        if isinstance(x, cupy.ndarray):
            return x.astype(dtype, copy=False)
        hit = self._uploads.get(id(x))
        if hit is not None and hit[0] is x and hit[1].dtype == dtype:
            return hit[1]
        dev = cupy.asarray(np.ascontiguousarray(x, dtype))
        self._uploads[id(x)] = (x, dev)
        if len(self._uploads) > 8:
            self._uploads.popitem(last=False)
        return dev

    def decode_graphs(self, model):
        """The model's decode steps as CUDA graphs (cuda_graphs.py), or None where they cannot be."""
        from .cuda_graphs import DecodeGraphs

        return DecodeGraphs.of(model)

    def embedding(self, table, ids, offset=0):
        # ids (T,) host int64, or a decode graph's int32 device buffer
        return ew.embedding(table, self._up(ids, np.int32), offset)

    def linear(self, x, w, b=None):
        # x (T, in) float32, or bf16 bits from a matmul_input norm; w (out, in) bf16 or a
        # QuantTensor -> (T, out) float32
        return self._product(_matmul_rows(x), w, b)

    def swiglu_rows(self, array):
        """SwiGLU's gate and up parts [gate; up] (2I, ...), a host weight (or its GGUF blocks:
        whole rows) or bias, interleaved for swiglu_linear: row 2i = gate_i, row 2i + 1 = up_i
        (each GEMM thread then holds whole pairs)."""
        if isinstance(array, QuantTensor):
            return QuantTensor(array.fmt, self.swiglu_rows(array.data))
        gate, up = np.split(array, 2)
        return np.stack([gate, up], axis=1).reshape(array.shape)

    def swiglu_linear(self, x, w, b=None):
        """As NumpyBackend.swiglu_linear, w and b in swiglu_rows order: one GEMM whose epilogue
        writes silu(gate) * up (T, I), so the (T, 2I) product never goes to memory."""
        return self._product(_matmul_rows(x), w, b, swiglu=True)

    def _product(self, a, w, b, swiglu=False):
        """a (T, in) bf16 bits times w: bf16 through gemm (its SwiGLU epilogue included);
        GGUF blocks through gemv_q for decode rows (no epilogue there: silu_mul on the
        interleaved pairs after it), else dequantized into the scratch buffer, then gemm."""
        if not isinstance(w, QuantTensor):
            return gemm(a, w, b, swiglu=swiglu)  # b: float32 (bias())
        N, K = w.shape
        if len(a) <= GEMV_Q_MAX_M:
            y = gemv_q(a, w.data, w.fmt, N, K, b)  # (T, N)
            if not swiglu:
                return y
            pairs = y.reshape(-1, 2)  # (T * N/2, 2): (gate_i, up_i) of each row
            return ew.silu_mul(pairs[:, :1], pairs[:, 1:]).reshape(len(a), N // 2)
        if self._scratch is None or self._scratch.size < N * K:  # a model's weights all load first: allocated once
            self._scratch = cupy.empty(max(self._largest, N * K), cupy.uint16)  # (captured graphs keep its address)
        return gemm(a, dequantize(w.data, w.fmt, N, K, self._scratch[:N * K].reshape(N, K)), b, swiglu=swiglu)

    def rmsnorm(self, x, w, eps, matmul_input=False):
        """float32, or with matmul_input bf16 bits for the linears that read it (no cast pass)."""
        return ew.rmsnorm(cupy.ascontiguousarray(x), w, eps, bf16=matmul_input)

    def add_rmsnorm(self, x, delta, w, eps, matmul_input=False):
        """One kernel pass: x += delta (in place: x is the residual stream, owned by the
        decoder loop) and the norm of the sum."""
        return ew.add_rmsnorm(cupy.ascontiguousarray(x), cupy.ascontiguousarray(delta), w, eps, bf16=matmul_input)

    def rope_tables(self, inv_freq, batch):
        """As NumpyBackend.rope_tables, on the GPU from the step's device positions."""
        hit = self._inv_freq.get(id(inv_freq))
        if hit is None or hit[0] is not inv_freq:
            hit = self._inv_freq[id(inv_freq)] = (inv_freq, cupy.asarray(np.ascontiguousarray(inv_freq, np.float64)))
        return ew.rope_tables(_Meta.of(batch).positions, hit[1])

    def rope_store_kv(self, q, k, v, cos, sin, k_pool, v_pool, batch):
        """As NumpyBackend.rope_store_kv, one kernel pass; q comes back contiguous, k roped in place."""
        return att.rope_kv_store(q, k, v, cos, sin, _Meta.of(batch).slots, k_pool, v_pool), k

    def silu_mul(self, gate, up):
        return ew.silu_mul(gate, up)

    def partial_attention(self, q, k, v, q_pos, k_pos, window):
        """As NumpyBackend.partial_attention; k, v float32 activations or bf16 pool rows."""
        k, v = (x if x.dtype == cupy.uint16 else ew.to_bf16(cupy.ascontiguousarray(x)) for x in (k, v))
        T, S = len(q), len(k)
        return att.varlen_attention(cupy.ascontiguousarray(q), k, v, cupy.asarray([0, T], np.int32),
                                    self._up(q_pos, np.int32), cupy.asarray([0, S], np.int32),
                                    cupy.arange(S, dtype=np.int32), self._up(k_pos, np.int32), window)

    def attention(self, q, k, v, q_pos, window):
        return self.partial_attention(q, k, v, q_pos, np.arange(len(k)), window)[0]

    def paged_attention(self, q, k_pool, v_pool, batch, window):
        """As NumpyBackend.paged_attention: decoding sequences through the split-KV decode
        kernel, prefill chunks through the varlen flash kernel; rows of CP-sharded sequences
        are left to the caller."""
        meta = _Meta.of(batch)
        q = cupy.ascontiguousarray(q)
        out = cupy.empty_like(q)
        if meta.decode:
            o = att.decode_attention(q[meta.decode_rows] if meta.gather_decode else q, k_pool, v_pool, meta.tables,
                                     meta.kv_lens, batch.pool.block_size, window)
            if meta.gather_decode:
                out[meta.decode_rows] = o
            else:
                out = o
        if meta.prefill_rows is not None:
            o, _ = att.varlen_attention(q[meta.prefill_rows], k_pool, v_pool, meta.seg_q, meta.q_pos, meta.seg_k,
                                        meta.key_slots, meta.key_pos, window)
            out[meta.prefill_rows] = o
        return out


def _matmul_rows(x):
    """A matmul's input rows as the GEMM reads them: contiguous bf16 bits (cast from float32
    unless a matmul_input norm already gave bf16)."""
    return cupy.ascontiguousarray(x) if x.dtype == cupy.uint16 else ew.to_bf16(cupy.ascontiguousarray(x))


class _Meta:
    """A batch's metadata on the GPU, built once per step (every layer shares it): positions and
    slots (T,) int32 of the step's tokens, and what attention needs. decode: some rows are
    decode rows, through the decode kernel with tables (B, nb) and kv_lens (B,); gather_decode:
    they are not all the rows (decode_rows: where they are); prefill_rows (or None): the varlen
    kernel's rows and segments."""

    decode, gather_decode, decode_rows, prefill_rows = False, False, None, None

    @classmethod
    def of(cls, batch):
        meta = getattr(batch, "_cuda_meta", None)
        if meta is None:
            meta = batch._cuda_meta = cls.eager(batch)
        return meta

    @classmethod
    def for_decode(cls, positions, slots, tables, kv_lens):
        """A step of decode rows only, from device arrays (a decode graph's static buffers)."""
        meta = cls()
        meta.positions, meta.slots, meta.tables, meta.kv_lens, meta.decode = positions, slots, tables, kv_lens, True
        return meta

    @classmethod
    def eager(cls, batch):
        meta = cls()
        meta.positions, meta.slots = (cupy.asarray(a.astype(np.int32)) for a in (batch.positions, batch.slots))
        starts = np.concatenate([[0], np.cumsum(batch.q_lens)]).astype(np.int64)
        plain = np.array([k is None for k in batch.key_pos], bool)
        decode = np.flatnonzero((batch.q_lens == 1) & plain)
        prefill = np.flatnonzero((batch.q_lens > 1) & plain)
        # every row a decode row, in order: the decode kernel's output is the whole result
        meta.gather_decode = not (len(decode) == len(batch.q_lens) == starts[-1])
        if len(decode):
            bs = batch.pool.block_size
            nb = -(-int(batch.kv_lens[decode].max()) // bs)
            meta.decode = True
            meta.decode_rows = cupy.asarray(starts[decode])
            meta.tables = cupy.asarray(np.ascontiguousarray(batch.tables[decode, :nb], np.int32))
            meta.kv_lens = cupy.asarray(batch.kv_lens[decode].astype(np.int32))
        if len(prefill):
            rows, q_pos, slots, key_pos, seg_q, seg_k = [], [], [], [], [0], [0]
            for i in prefill:
                n, S = int(batch.q_lens[i]), int(batch.kv_lens[i])
                rows.append(np.arange(starts[i], starts[i] + n))
                q_pos.append(np.arange(S - n, S))
                slots.append(batch.pool_slots(i, np.arange(S)))
                key_pos.append(np.arange(S))
                seg_q.append(seg_q[-1] + n)
                seg_k.append(seg_k[-1] + S)
            meta.prefill_rows = cupy.asarray(np.concatenate(rows))
            meta.q_pos, meta.key_slots, meta.key_pos = (cupy.asarray(np.concatenate(a).astype(np.int32))
                                                        for a in (q_pos, slots, key_pos))
            meta.seg_q, meta.seg_k = cupy.asarray(seg_q, np.int32), cupy.asarray(seg_k, np.int32)
        return meta
