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

DECODE_CHUNK = 16  # sequences per decode-attention task: its gathered K/V (a few MB) stay in cache
ROW_CHUNK = 64  # rows per task of an element-wise op


class NumpyBackend:
    """threads: how many cores this rank may use (default: its BLAS thread count). Attention
    and element-wise ops are split over them in chunks; NumPy releases the GIL inside each."""

    name = "numpy"

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

    def to_numpy(self, x):
        return x

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

    def rmsnorm(self, x, w, eps):
        # x (..., n), w (n,): normalise over the last axis, as transformers' RMSNorm in float32
        variance = np.mean(np.square(x), axis=-1, keepdims=True)
        return x * (1.0 / np.sqrt(variance + eps)) * w

    def rope(self, x, cos, sin):
        # x (T, heads, Dh); cos, sin (T, Dh/2). Rotates the pairs (i, i + Dh/2) ("rotate half").
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        c, s = cos[:, None, :], sin[:, None, :]
        return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)

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
        queries. Returns (T, H, Dh)."""
        return self.partial_attention(q, k, v, q_pos, np.arange(len(k)), window)[0]

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
        # pool (slots total, Hkv, Dh) of one layer; the new tokens' x (T, Hkv, Dh) go to rows slots (T,)
        pool[slots] = x

    def paged_attention(self, q, k_pool, v_pool, batch, window):
        """attention() for every sequence of a batch, reading K/V from the paged pools.
        q (T, H, Dh), the sequences' new tokens concatenated; batch: kvcache.Batch (block
        tables, kv_lens, q_lens). Sequences with one new token (decode) are computed
        DECODE_CHUNK at a time; prefill chunks one by one. Returns (T, H, Dh); the rows of
        sequences sharded over a CP group (batch.key_pos) are left to the caller."""
        bs = batch.pool.block_size
        starts = np.concatenate([[0], np.cumsum(batch.q_lens)])
        out = np.empty_like(q)
        plain = np.array([k is None for k in batch.key_pos], bool)  # others: sharded over a CP group
        decode = np.flatnonzero((batch.q_lens == 1) & plain)
        tasks = [decode[c : c + DECODE_CHUNK] for c in range(0, len(decode), DECODE_CHUNK)]
        tasks += [[i] for i in np.flatnonzero((batch.q_lens > 1) & plain)]

        def run(seqs):
            if batch.q_lens[seqs[0]] == 1:
                rows, lens = starts[seqs], batch.kv_lens[seqs]
                tables = batch.tables[seqs, : -(-lens.max() // bs)]
                out[rows] = self._decode_attention(q[rows], k_pool, v_pool, tables, lens, bs, window)
            else:
                i = seqs[0]
                S = batch.kv_lens[i]
                slots = (batch.tables[i, :, None] * bs + np.arange(bs)).ravel()[:S]
                seq = slice(starts[i], starts[i + 1])
                out[seq] = self.attention(q[seq], k_pool[slots], v_pool[slots], np.arange(S - batch.q_lens[i], S), window)

        self._each(run, tasks)
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
