"""Paged key/value cache: fixed-size blocks from one pool, a block table per sequence.

Per layer, K and V live in pools of shape (num_blocks * block_size, Hkv, Dh); token t of a
sequence sits in slot table[t // block_size] * block_size + t % block_size. A finished
sequence returns its blocks at once, and the engine admits a request only when blocks for
it are free, so memory is bounded by the pool, not by the longest request times the batch.

    pool = PagedKVCache(num_layers, kv_heads, head_dim, num_blocks=256)
    seq = pool.sequence()          # empty block table
    pool.reserve(seq, 40)          # blocks for 40 tokens, False when the pool is short
    pool.release(seq)              # blocks back to the pool
"""

import numpy as np


class SequenceCache:
    """One sequence's place in the pool: its block ids and how many tokens are cached."""

    def __init__(self, pool):
        self.pool = pool
        self.blocks = []
        self.length = 0  # tokens whose K/V are stored and committed


class PagedKVCache:
    def __init__(self, num_layers, kv_heads, head_dim, num_blocks, block_size=16):
        self.block_size = block_size
        self.k = [np.zeros((num_blocks * block_size, kv_heads, head_dim), np.float32) for _ in range(num_layers)]
        self.v = [np.zeros_like(k) for k in self.k]
        self.free = list(range(num_blocks - 1, -1, -1))  # a stack: lowest ids handed out first

    @staticmethod
    def blocks_for_bytes(cfg, kv_heads, nbytes, block_size):
        """Blocks that fit in nbytes (K and V, float32, every layer, kv_heads heads: this
        rank's share under tensor parallelism)."""
        per_block = 2 * cfg.num_layers * block_size * kv_heads * cfg.head_dim * 4
        return max(1, int(nbytes // per_block))

    @classmethod
    def for_model(cls, model, nbytes, block_size):
        """A pool of at most nbytes for this rank's part of the model."""
        cfg = model.config
        blocks = cls.blocks_for_bytes(cfg, model.kv_heads, nbytes, block_size)
        return cls(cfg.num_layers, model.kv_heads, cfg.head_dim, blocks, block_size)

    @property
    def num_blocks(self):
        return self.k[0].shape[0] // self.block_size

    def sequence(self):
        return SequenceCache(self)

    def blocks_needed(self, seq, tokens):
        """Extra blocks seq needs to hold `tokens` tokens in all."""
        return max(0, -(-tokens // self.block_size) - len(seq.blocks))

    def reserve(self, seq, tokens):
        """Make room for `tokens` tokens in all; False (and nothing taken) when the pool is short."""
        need = self.blocks_needed(seq, tokens)
        if need > len(self.free):
            return False
        seq.blocks.extend(self.free.pop() for _ in range(need))
        return True

    def release(self, seq):
        self.free.extend(reversed(seq.blocks))
        seq.blocks, seq.length = [], 0

    def batch(self, seqs, counts):
        """Where a forward pass over seqs (counts[i] new tokens each) reads and writes."""
        return Batch(self, seqs, counts)


class Batch:
    """The cache geometry of one forward pass. B sequences, T = sum(counts) new tokens.

    slots (T,) pool rows the new tokens' K/V go to; positions (T,) their positions;
    tables (B, max blocks) block ids padded with 0; kv_lens (B,) tokens each sequence
    attends to (cached + new); q_lens (B,) = counts."""

    def __init__(self, pool, seqs, counts):
        bs = pool.block_size
        for s, n in zip(seqs, counts):
            if not pool.reserve(s, s.length + n):
                raise MemoryError(f"KV cache pool of {pool.num_blocks} blocks is full")
        self.pool, self.seqs = pool, seqs
        self.q_lens = np.asarray(counts, np.int64)
        self.kv_lens = np.asarray([s.length + n for s, n in zip(seqs, counts)], np.int64)
        self.positions = np.concatenate([np.arange(s.length, s.length + n) for s, n in zip(seqs, counts)])
        width = max(len(s.blocks) for s in seqs)
        self.tables = np.zeros((len(seqs), width), np.int64)
        for i, s in enumerate(seqs):
            self.tables[i, : len(s.blocks)] = s.blocks
        seq_of_token = np.repeat(np.arange(len(seqs)), self.q_lens)
        self.slots = self.tables[seq_of_token, self.positions // bs] * bs + self.positions % bs

    def commit(self):
        """The forward pass stored every layer's K/V: the new tokens are now cached."""
        for s, n in zip(self.seqs, self.q_lens):
            s.length += int(n)
