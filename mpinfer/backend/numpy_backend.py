"""Reference ops in NumPy, float32 on the CPU.

Shapes: T new tokens (all sequences of a batch concatenated), D hidden, H query heads,
Hkv key/value heads, G = H / Hkv query heads per KV head, Dh head dim, S cached tokens of
one sequence (including the new ones), V vocabulary, B sequences in a batch.

OpenBLAS rounds a row of a matrix product differently depending on the number of rows and
threads, so logits of one request move by ~1e-6 relative with its batch neighbours; tokens
agree unless two candidates are that close.
"""

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .. import rope
from ..context import merge

DECODE_CHUNK = 16  # sequences per decode-attention task: its gathered K/V (a few MB) stay in cache
SPLIT_KV = 2048  # keys per decode-attention task of one long sequence
PREFILL_ROWS = 256  # queries per attention task of a prefill chunk
ROW_CHUNK = 64  # rows per task of an element-wise op


class NumpyBackend:
    """threads: how many cores this rank may use (default: its BLAS thread count). Attention
    and element-wise ops are split over them in chunks; NumPy releases the GIL inside each."""

    name = "numpy"
    kv_bytes = 4  # per element of the KV cache (float32)
    quantized_formats = ()  # GGUF block formats kept as they are (quant.py): none, weights are float32

    def __init__(self, threads=None):
        threads = threads or int(os.environ.get("OPENBLAS_NUM_THREADS") or len(os.sched_getaffinity(0)))
        self.weight_bytes = 0  # of every weight() kept: what this rank holds of the model
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="mpinfer-numpy") if threads > 1 else None

    def _each(self, fn, tasks):
        """fn(task) for every task, on the pool's threads."""
        if self.pool is None or len(tasks) == 1:
            for t in tasks:
                fn(t)
        else:
            for _ in self.pool.map(fn, tasks):
                pass

    def weight(self, array):
        """A checkpoint tensor as this backend keeps it (here: contiguous float32)."""
        array = np.ascontiguousarray(array, dtype=np.float32)
        self.weight_bytes += array.nbytes
        return array

    def bias(self, array):
        """A bias, added to float32 activations (here as weight() keeps it)."""
        return self.weight(array)

    def to_numpy(self, x):
        return x

    def asarray(self, x):
        """Host activations -> this backend's (here the same arrays)."""
        return x

    def group(self, group):
        """comm.Group -> the group this backend's arrays travel over (here MPI as it is)."""
        return group

    def zeros(self, shape):
        """float32 activations of zeros."""
        return np.zeros(shape, np.float32)

    def route(self, logits, top, norm):
        """MoE router: logits (T, E) -> experts (T, top) int64 and weights (T, top) float32, as
        host arrays. Softmax in float32, the top experts by probability (ties: the lower id),
        weights renormalised to sum 1 when norm."""
        probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        experts = np.argsort(-probs, axis=-1, kind="stable")[:, :top]  # (T, A), ties: lower id
        weights = np.take_along_axis(probs, experts, axis=-1)
        if norm:
            weights /= weights.sum(axis=-1, keepdims=True)
        return experts, weights

    def decode_graphs(self, model):
        """None: graphs are the CUDA backend's (a decode step here is one Python pass anyway)."""
        return None

    def kv_pool(self, rows, heads, head_dim):
        """One layer's K or V pool: (rows, heads, head_dim) float32."""
        return np.zeros((rows, heads, head_dim), np.float32)

    def embedding(self, table, ids, offset=0):
        # table (Vp, D) holding vocabulary rows offset.., ids (T,) -> (T, D), zero rows for
        # ids outside the table (another tensor-parallel rank holds them)
        local = ids - offset
        inside = (local >= 0) & (local < len(table))
        out = table[np.where(inside, local, 0)]
        out[~inside] = 0.0
        return out

    def linear(self, x, w, b=None):
        # x (T, in), w (out, in) as Hugging Face stores it -> (T, out)
        y = x @ w.T
        if b is not None:
            y += b
        return y

    def swiglu_rows(self, array):
        """SwiGLU's gate and up parts [gate; up] (2I, ...), a weight or a bias, in the row order
        swiglu_linear reads them (here as they are; the CUDA backend interleaves them)."""
        return array

    def swiglu_linear(self, x, w, b=None):
        # x (T, in), w (2I, in) = [gate; up] (swiglu_rows order), b (2I,) -> silu(gate) * up (T, I)
        gate, up = np.split(self.linear(x, w, b), 2, axis=-1)
        return self.silu_mul(gate, up)

    def rmsnorm(self, x, w, eps, matmul_input=False):
        # x (..., n), w (n,): normalise over the last axis, as transformers' RMSNorm in float32
        # (matmul_input: the CUDA backend then returns bf16; here matmuls take float32)
        variance = np.mean(np.square(x), axis=-1, keepdims=True)
        return x * (1.0 / np.sqrt(variance + eps)) * w

    def add_rmsnorm(self, x, delta, w, eps, matmul_input=False):
        """The residual add and the norm that reads its sum: (x + delta, rmsnorm of it)."""
        s = x + delta
        return s, self.rmsnorm(s, w, eps)

    def rope(self, x, cos, sin):
        # x (T, heads, Dh); cos, sin (T, Dh/2). Rotates the pairs (i, i + Dh/2) ("rotate half").
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        c, s = cos[:, None, :], sin[:, None, :]
        return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)

    def rope_tables(self, inv_freq, batch):
        """cos, sin (T, Dh/2) float32 of the step's positions (rope.cos_sin); inv_freq (Dh/2,) float64."""
        return rope.cos_sin(inv_freq, batch.positions)

    def rope_store_kv(self, q, k, v, cos, sin, k_pool, v_pool, batch):
        """RoPE on q (T, H, Dh) and k (T, Hkv, Dh), and the step's new K and V into one layer's
        pools at batch.slots (a negative slot: not stored here). Returns (q, k) roped. (The
        CUDA backend does all of it in one pass: kernels_cuda/rope_kv_store.cu.)"""
        q, k = self.rope(q, cos, sin), self.rope(k, cos, sin)
        self.store_kv(k_pool, batch.slots, k)
        self.store_kv(v_pool, batch.slots, v)
        return q, k

    def silu_mul(self, gate, up):
        # SwiGLU: silu(gate) * up, (T, I); in place in one buffer, by chunks of rows (memory-bound)
        out = np.empty_like(gate)

        def rows(r):
            o = out[r : r + ROW_CHUNK]
            np.negative(gate[r : r + ROW_CHUNK], out=o)
            np.exp(o, out=o)
            o += 1.0
            np.divide(gate[r : r + ROW_CHUNK], o, out=o)
            o *= up[r : r + ROW_CHUNK]

        self._each(rows, range(0, len(gate), ROW_CHUNK))
        return out

    def attention(self, q, k, v, q_pos, window):
        """Causal grouped-query attention of one sequence against its cache.
        q (T, H, Dh); k, v (S, Hkv, Dh) holding positions 0..S-1; q_pos (T,) positions of the
        queries. Returns (T, H, Dh). Runs PREFILL_ROWS queries at a time over the keys up to
        their last position: the causal mask hides the rest, so nearly half the work goes."""
        out = np.empty(q.shape, np.float32)
        for r in range(0, len(q), PREFILL_ROWS):
            rows = slice(r, r + PREFILL_ROWS)
            last = int(q_pos[rows].max()) + 1
            out[rows] = self.partial_attention(q[rows], k[:last], v[:last], q_pos[rows], np.arange(min(last, len(k))),
                                               window)[0]
        return out

    def partial_attention(self, q, k, v, q_pos, k_pos, window):
        """Attention of queries q (T, H, Dh) at positions q_pos (T,) over the keys k, v
        (S, Hkv, Dh) at positions k_pos (S,) only: key j is visible to the query at p when
        k_pos[j] <= p and (window == 0 or p - k_pos[j] < window). Returns out (T, H, Dh),
        normalised over these keys, and lse (T, H) float32, the log-sum-exp of their scaled
        scores (-inf, and out 0, where none is visible), so that partial results over disjoint
        key sets merge exactly (context.merge)."""
        T, H, Dh = q.shape
        S, Hkv, _ = k.shape
        G = H // Hkv
        qg = q.reshape(T, Hkv, G, Dh).transpose(1, 2, 0, 3)  # (Hkv, G, T, Dh)
        scores = qg @ k.transpose(1, 2, 0)[:, None]  # (Hkv, G, T, S)
        scores *= 1.0 / np.sqrt(Dh)
        visible = k_pos[None, :] <= q_pos[:, None]  # (T, S)
        if window:
            visible &= q_pos[:, None] - k_pos[None, :] < window
        scores = np.where(visible, scores, -np.inf)
        top = scores.max(axis=-1, keepdims=True, initial=-np.inf)  # (Hkv, G, T, 1); -inf with no key
        top = np.where(np.isfinite(top), top, 0.0)
        p = np.exp(scores - top)
        total = p.sum(axis=-1, keepdims=True)
        with np.errstate(divide="ignore"):
            lse = (np.log(total) + top)[..., 0]  # (Hkv, G, T)
        p /= np.where(total > 0, total, 1.0)
        out = p @ v.transpose(1, 0, 2)[:, None]  # (Hkv, G, T, Dh)
        return (out.transpose(2, 0, 1, 3).reshape(T, H, Dh),
                lse.transpose(2, 0, 1).reshape(T, H).astype(np.float32))

    def store_kv(self, pool, slots, x):
        # pool (slots total, Hkv, Dh) of one layer; the new tokens' x (T, Hkv, Dh) go to rows
        # slots (T,); a negative slot: not stored here (under CP another rank stores that token)
        keep = slots >= 0
        pool[slots[keep]] = x[keep]

    def paged_attention(self, q, k_pool, v_pool, batch, window):
        """attention() for every sequence of a batch, reading K/V from the paged pools.
        q (T, H, Dh), the sequences' new tokens concatenated; batch: kvcache.Batch (block
        tables, kv_lens, q_lens). Returns (T, H, Dh); the rows of sequences sharded over a CP
        group (batch.key_pos) are left to the caller. Tasks for the threads: DECODE_CHUNK
        decoding sequences at a time; a long sequence's decode in pieces of SPLIT_KV keys,
        merged by log-sum-exp (split-KV, as FlashDecoding); a prefill chunk in blocks of
        PREFILL_ROWS queries, each over the keys up to its last position."""
        bs = batch.pool.block_size
        starts = np.concatenate([[0], np.cumsum(batch.q_lens)])
        out = np.empty_like(q)
        plain = np.array([k is None for k in batch.key_pos], bool)  # others: sharded over a CP group
        decode = np.flatnonzero((batch.q_lens == 1) & plain)
        long = decode[batch.kv_lens[decode] > SPLIT_KV]
        short = decode[batch.kv_lens[decode] <= SPLIT_KV]
        tasks = [("decode", short[c : c + DECODE_CHUNK]) for c in range(0, len(short), DECODE_CHUNK)]
        tasks += [("piece", i, a) for i in long for a in range(0, batch.kv_lens[i], SPLIT_KV)]
        tasks += [("rows", i, r) for i in np.flatnonzero((batch.q_lens > 1) & plain)
                  for r in range(0, batch.q_lens[i], PREFILL_ROWS)]
        pieces = {}

        def keys(i, a, b):  # pool slots of sequence i's keys at positions a..b-1
            return batch.pool_slots(i, np.arange(a, b))

        def run(task):
            if task[0] == "decode":
                seqs = task[1]
                rows, lens = starts[seqs], batch.kv_lens[seqs]
                tables = batch.tables[seqs, : -(-lens.max() // bs)]
                out[rows] = self._decode_attention(q[rows], k_pool, v_pool, tables, lens, bs, window)
            elif task[0] == "piece":
                _, i, a = task
                S = batch.kv_lens[i]
                slots, row = keys(i, a, min(a + SPLIT_KV, S)), starts[i]
                pieces[i, a] = self.partial_attention(q[row : row + 1], k_pool[slots], v_pool[slots], np.array([S - 1]),
                                                      np.arange(a, min(a + SPLIT_KV, S)), window)
            else:
                _, i, r = task
                first = batch.kv_lens[i] - batch.q_lens[i]  # position of the chunk's first token
                rows = slice(starts[i] + r, starts[i] + min(r + PREFILL_ROWS, batch.q_lens[i]))
                q_pos = np.arange(first + r, first + r + rows.stop - rows.start)
                slots = keys(i, 0, q_pos[-1] + 1)
                out[rows] = self.partial_attention(q[rows], k_pool[slots], v_pool[slots], q_pos,
                                                   np.arange(q_pos[-1] + 1), window)[0]

        self._each(run, tasks)
        for i in long:
            parts = [pieces[i, a] for a in range(0, batch.kv_lens[i], SPLIT_KV)]
            out[starts[i]] = merge(np.stack([o for o, _ in parts]), np.stack([l for _, l in parts]))[0][0]
        return out

    def _decode_attention(self, q, k_pool, v_pool, tables, kv_lens, bs, window):
        # q (B, H, Dh), one query per sequence at position kv_len - 1; tables (B, nb)
        B, H, Dh = q.shape
        Hkv = k_pool.shape[1]
        S = tables.shape[1] * bs  # padded to the longest sequence; the mask hides the rest
        k = k_pool.reshape(-1, bs, Hkv, Dh)[tables].reshape(B, S, Hkv, Dh).transpose(0, 2, 3, 1)  # (B, Hkv, Dh, S)
        v = v_pool.reshape(-1, bs, Hkv, Dh)[tables].reshape(B, S, Hkv, Dh).transpose(0, 2, 1, 3)  # (B, Hkv, S, Dh)
        scores = q.reshape(B, Hkv, H // Hkv, Dh) @ k  # (B, Hkv, G, S)
        scores *= 1.0 / np.sqrt(Dh)
        k_pos, q_pos = np.arange(S), kv_lens[:, None] - 1
        visible = k_pos < kv_lens[:, None]  # (B, S)
        if window:
            visible &= q_pos - k_pos < window
        scores = np.where(visible[:, None, None, :], scores, -np.inf)
        scores -= scores.max(axis=-1, keepdims=True)
        p = np.exp(scores)
        p /= p.sum(axis=-1, keepdims=True)
        return (p @ v).reshape(B, H, Dh)
