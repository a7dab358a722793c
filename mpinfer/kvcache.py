"""Paged key/value cache: fixed-size blocks from one pool, a block table per sequence.

Per layer, K and V live in pools of shape (num_blocks * block_size, Hkv, Dh); token t of a
sequence sits in slot table[t // block_size] * block_size + t % block_size. A finished
sequence returns its blocks at once, and the engine admits a request only when blocks for
it are free, so memory is bounded by the pool, not by the longest request times the batch.

    pool = PagedKVCache(num_layers, kv_heads, head_dim, num_blocks=256)
    seq = pool.sequence()          # empty block table
    pool.reserve(seq, 40)          # blocks for 40 tokens, False when the pool is short
    pool.release(seq)              # blocks back to the pool

Under context parallelism (context.py) a long prompt's cache is sharded over the CP group:
each rank stores its zig-zag share of the prompt and every C-th later token (position % C),
in its own slots, and remembers their positions (`local`). Every rank reserves the same
number of blocks for such a sequence, ceil(tokens / C) + 3 (a zig-zag share exceeds
tokens / C by at most 2, the round robin by 1), so the CP ranks' pools stay alike and their
schedulers agree.
"""

import numpy as np

from .context import zigzag


class SequenceCache:
    """One sequence's place in the pool: its block ids and how many tokens are cached."""

    def __init__(self, pool):
        self.pool = pool
        self.blocks = []
        self.length = 0  # tokens whose K/V are stored (here, or over the CP group when sharded) and committed
        self.sharded = False  # a long prompt's cache, spread over the CP group
        self.local = np.zeros(0, np.int64)  # sharded: positions of the tokens stored here, in slot order


class PagedKVCache:
    def __init__(self, num_layers, kv_heads, head_dim, num_blocks, block_size=16, be=None):
        """be: the backend whose arrays hold the pools (default: float32 numpy)."""
        self.block_size = block_size
        alloc = be.kv_pool if be is not None else lambda *shape: np.zeros(shape, np.float32)
        self.k = [alloc(num_blocks * block_size, kv_heads, head_dim) for _ in range(num_layers)]
        self.v = [alloc(num_blocks * block_size, kv_heads, head_dim) for _ in range(num_layers)]
        self.free = list(range(num_blocks - 1, -1, -1))  # a stack: lowest ids handed out first
        self.cp = None  # comm.Group of the CP group under context parallelism (set by the runner)

    @staticmethod
    def blocks_for_bytes(cfg, layers, kv_heads, nbytes, block_size, item=4):
        """Blocks that fit in nbytes (K and V of `layers` layers with kv_heads heads: this
        rank's share under tensor and pipeline parallelism; item bytes per element)."""
        per_block = 2 * max(1, layers) * block_size * kv_heads * cfg.head_dim * item
        return max(1, int(nbytes // per_block))

    @classmethod
    def for_model(cls, model, nbytes, block_size, sized_for_layers):
        """A pool for this rank's layers of the model, with as many blocks as nbytes holds
        for sized_for_layers layers (the largest pipeline stage's: every stage of a
        pipeline must have the same blocks, as the first stage's block tables apply to all)."""
        cfg = model.config
        blocks = cls.blocks_for_bytes(cfg, sized_for_layers, model.kv_heads, nbytes, block_size, model.be.kv_bytes)
        return cls(len(model.blocks), model.kv_heads, cfg.head_dim, blocks, block_size, model.be)

    @property
    def num_blocks(self):
        return self.k[0].shape[0] // self.block_size

    def sequence(self):
        return SequenceCache(self)

    def blocks_needed(self, seq, tokens):
        """Extra blocks seq needs to hold `tokens` tokens in all (its part of them when sharded)."""
        if seq.sharded:
            tokens = -(-tokens // self.cp.size) + 3
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
        seq.blocks, seq.length, seq.local = [], 0, np.zeros(0, np.int64)

    def batch(self, seqs, counts):
        """Where a forward pass over seqs (counts[i] new tokens each) reads and writes."""
        return Batch.of(self, seqs, counts)


class Batch:
    """The cache geometry of one forward pass. B sequences, T = sum(q_lens) new tokens.

    q_lens (B,) new tokens of each sequence; kv_lens (B,) tokens each attends to (cached +
    new); tables (B, max blocks) block ids padded with 0; positions (T,) of the new tokens;
    slots (T,) pool rows their K/V go to. A pipeline stage without the sequences' block
    tables builds the same geometry from geometry() of the first stage.

    With sequences sharded over a CP group (of_sharded), these describe this rank's part:
    T its tokens, kv_lens its keys, slots -1 for a token another rank stores; key_pos (B,)
    per sequence the positions of its keys here (None: 0..kv_len-1), take the indices of
    this rank's tokens among the step's (None: all), shares every CP rank's positions when
    the step is one long prompt's prefill (ring or Ulysses attention), counts (B,) the
    step's new tokens of each sequence over the whole group."""

    def __init__(self, pool, q_lens, kv_lens, tables, seqs=()):
        bs = pool.block_size
        self.pool, self.seqs = pool, seqs
        self.q_lens, self.kv_lens = np.asarray(q_lens, np.int64), np.asarray(kv_lens, np.int64)
        self.tables = np.asarray(tables, np.int64).reshape(len(self.q_lens), -1) if len(self.q_lens) else \
            np.zeros((0, 1), np.int64)  # B = 0: an empty step (an idle replica of an EP group)
        self.positions = np.concatenate([np.zeros(0, np.int64)] +
                                        [np.arange(k - q, k) for q, k in zip(self.q_lens, self.kv_lens)])
        seq_of_token = np.repeat(np.arange(len(self.q_lens)), self.q_lens)
        self.slots = self.tables[seq_of_token, self.positions // bs] * bs + self.positions % bs
        self.counts, self.key_pos, self.take, self.shares = self.q_lens, [None] * len(self.q_lens), None, None
        self._local = {}  # sequence -> its local positions after the step (sharded)

    @classmethod
    def of(cls, pool, seqs, counts):
        for s, n in zip(seqs, counts):
            if not pool.reserve(s, s.length + n):
                raise MemoryError(f"KV cache pool of {pool.num_blocks} blocks is full")
        tables = np.zeros((len(seqs), max((len(s.blocks) for s in seqs), default=1)), np.int64)
        for i, s in enumerate(seqs):
            tables[i, : len(s.blocks)] = s.blocks
        if not any(s.sharded for s in seqs):
            return cls(pool, counts, [s.length + n for s, n in zip(seqs, counts)], tables, seqs)
        batch = cls(pool, [0] * len(seqs), [0] * len(seqs), tables, seqs)
        batch._shard(counts)
        return batch

    def _shard(self, counts):
        """This rank's part of a step with sharded sequences: a long prompt's whole prefill,
        alone (its zig-zag share), or decode tokens (every rank computes them, rank
        position % C stores them)."""
        cp = self.pool.cp
        positions, slots, kv_lens, q_lens = [], [], [], []
        for i, (s, n) in enumerate(zip(self.seqs, counts)):
            pos = np.arange(s.length, s.length + n)
            if not s.sharded:
                mine, stored, keys = pos, pos, None
            elif n > 1:  # the prefill: the step holds this sequence only, from position 0
                self.shares = zigzag(n, cp.size)
                mine = stored = self.take = self.shares[cp.rank]
                keys = mine
            else:
                mine, stored = pos, pos[pos % cp.size == cp.rank]
                keys = np.concatenate([s.local, stored])
            at = np.searchsorted(mine, stored)  # stored tokens among mine
            index = np.arange(len(keys) - len(stored), len(keys)) if keys is not None else stored  # their local slots
            slot = np.full(len(mine), -1, np.int64)
            slot[at] = self.pool_slots(i, index)
            positions.append(mine)
            slots.append(slot)
            q_lens.append(len(mine))
            kv_lens.append(len(keys) if keys is not None else s.length + n)
            self.key_pos[i] = keys
            if keys is not None:
                self._local[i] = keys
        self.counts = np.asarray(counts, np.int64)
        self.q_lens, self.kv_lens = np.array(q_lens, np.int64), np.array(kv_lens, np.int64)
        self.positions, self.slots = np.concatenate(positions), np.concatenate(slots)

    def pool_slots(self, i, index):
        """Pool rows of sequence i's cache entries number index (array): through its block table."""
        bs = self.pool.block_size
        return self.tables[i, index // bs] * bs + index % bs

    def last_rows(self, x, last_tokens):
        """The hidden states (R, D) of the step's tokens at last_tokens (indices among the
        step's tokens), on every rank: a long prompt's last token lives on one CP rank only."""
        if self.shares is None:
            return x[last_tokens]
        rows = np.zeros((len(last_tokens), x.shape[1]), np.float32)
        for j, t in enumerate(last_tokens):
            owner = next(r for r, share in enumerate(self.shares) if t in share)
            if owner == self.pool.cp.rank:
                rows[j] = x[np.searchsorted(self.shares[owner], t)]
            self.pool.cp.bcast(rows[j : j + 1], root=owner)
        return rows

    def geometry(self):
        """JSON-able, for the later stages of a pipeline (of_geometry)."""
        out = {"q_lens": self.q_lens.tolist(), "kv_lens": self.kv_lens.tolist(), "tables": self.tables.tolist()}
        if self.shares is not None or any(k is not None for k in self.key_pos):  # sharded over a CP group
            out |= {"positions": self.positions.tolist(), "slots": self.slots.tolist(),
                    "key_pos": [None if k is None else k.tolist() for k in self.key_pos],
                    "shares": None if self.shares is None else [s.tolist() for s in self.shares]}
        return out

    @classmethod
    def of_geometry(cls, pool, g):
        """The batch of a later pipeline stage from the first stage's geometry()."""
        batch = cls(pool, g["q_lens"], g["kv_lens"], g["tables"])
        if "key_pos" in g:
            batch.positions, batch.slots = np.array(g["positions"], np.int64), np.array(g["slots"], np.int64)
            batch.key_pos = [None if k is None else np.array(k, np.int64) for k in g["key_pos"]]
            batch.shares = None if g["shares"] is None else [np.array(s, np.int64) for s in g["shares"]]
        return batch

    def commit(self):
        """The forward pass stored every layer's K/V: the new tokens are now cached."""
        for i, (s, n) in enumerate(zip(self.seqs, self.counts)):
            s.length += int(n)
            if i in self._local:
                s.local = self._local[i]
