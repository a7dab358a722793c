"""Context parallelism (CP): one long sequence's attention spread over the C ranks of a CP group.

Legend: L tokens of the sequence, C ranks, r my place, n my tokens, H query heads and Hkv
KV heads (this TP rank's), Dh head dim. Every rank holds its share of the positions
(zigzag), computes Q/K/V for them, and the exact attention over all L keys comes from
partial results merged through their log-sum-exp (merge): softmax over a union of key sets
is the lse-weighted mix of the softmaxes over each set.

- Zig-zag shares: the sequence is cut into 2C chunks and rank r takes chunks r and 2C-1-r,
  so every rank has as many early (cheap under the causal mask) as late (dear) queries.
- Ring attention (ring): K/V shares travel around the ring, C-1 hops, each hop's send and
  receive started before the attention on the share in hand and waited for after it; a rank
  skips a share that lies wholly in its queries' future. Moves (C-1)/C * L * 2 * Hkv * Dh
  floats per rank per layer: O(L/C * d) per hop.
- Ulysses (ulysses, DeepSpeed): one all-to-all turns the sequence-sharded Q/K/V into
  head-sharded ones (all L positions, H/C heads), full causal attention runs on them, and a
  second all-to-all brings the outputs back. Moves about 4 * (C-1)/C of my n tokens' q, k, v,
  out per layer whatever C; needs H/C whole heads. Better than the ring where C is large and
  the interconnect is fast all-to-all (inside a node); the ring needs no head count and its
  hops overlap with compute, so it suits long sequences over slower links.
- Decode after a CP prefill (split-KV, as FlashDecoding across thread blocks): the KV cache
  stays sharded; each rank attends its new queries to its shard and the C partials merge.
"""

import numpy as np


def zigzag(length, size):
    """Positions (int64 arrays) of each of `size` ranks: chunks r and 2C-1-r of 2C nearly
    equal chunks of range(length)."""
    chunks = np.array_split(np.arange(length, dtype=np.int64), 2 * size)
    return [np.concatenate([chunks[r], chunks[2 * size - 1 - r]]) for r in range(size)]


def causal_work(length, size):
    """(size,) query-key pairs each rank computes for one sequence under the causal mask,
    with zig-zag shares: the query at position p sees p + 1 keys."""
    return np.array([int((share + 1).sum()) for share in zigzag(length, size)])


def merge(outs, lses):
    """outs (K, T, H, Dh) and lses (K, T, H): K partial attentions over disjoint key sets ->
    (out (T, H, Dh), lse (T, H)) over their union."""
    top = lses.max(axis=0)  # (T, H)
    top = np.where(np.isfinite(top), top, 0.0)
    w = np.exp(lses - top)  # (K, T, H); 0 for a part with no visible key
    total = w.sum(axis=0)
    out = (w[..., None] * outs).sum(axis=0) / np.where(total > 0, total, 1.0)[..., None]
    with np.errstate(divide="ignore"):
        return out.astype(np.float32), (np.log(total) + top).astype(np.float32)


def ring_attention(be, q, k, v, shares, window, group):
    """q (n, H, Dh), k, v (n, Hkv, Dh) of my positions shares[r] (the positions of every
    rank of the CP group, in group order) -> my queries' attention over all keys (n, H, Dh)."""
    size, me = group.size, group.rank
    out = np.zeros(q.shape, np.float32)
    lse = np.full(q.shape[:2], -np.inf, np.float32)
    keys = np.stack([k, v])  # (2, n, Hkv, Dh): one message per hop
    qpos = shares[me]
    for hop in range(size):
        owner = (me - hop) % size  # whose share is in hand
        if hop < size - 1:  # pass it on while computing on it
            sent = group.send(keys, (me + 1) % size, tag=hop)
            source = (me - hop - 1) % size
            request, incoming = group.recv((2, len(shares[source]), *k.shape[1:]), np.float32, (me - 1) % size, tag=hop)
        kpos = shares[owner]
        if len(kpos) and len(qpos) and kpos.min() <= qpos.max():  # else wholly in my future
            o, l = be.partial_attention(q, keys[0], keys[1], qpos, kpos, window)
            out, lse = merge(np.stack([out, o]), np.stack([lse, l]))
        if hop < size - 1:
            request.wait()
            sent.wait()
            keys = incoming
    return out


def ulysses_attention(be, q, k, v, shares, window, group):
    """As ring_attention, by two all-to-alls: rank j computes query heads
    [j*H/C, (j+1)*H/C) over all positions, with the KV heads they use."""
    size, me = group.size, group.rank
    H, Hkv, Dh = q.shape[1], k.shape[1], q.shape[2]
    mine = _ulysses_heads(H, Hkv, size)
    # to each rank j: my tokens' q of j's heads and k, v of the KV heads they use, as rows of Dh
    parts = [np.concatenate([q[:, qh].reshape(-1, Dh), k[:, kh].reshape(-1, Dh), v[:, kh].reshape(-1, Dh)])
             for qh, kh in mine]
    n = len(shares[me])
    per_token = [len(qh) + 2 * len(kh) for qh, kh in mine]
    got = group.all_to_all(np.concatenate(parts), [n * c for c in per_token],
                           [len(s) * per_token[me] for s in shares])
    qh, kh = mine[me]
    order = np.argsort(np.concatenate(shares), kind="stable")  # all positions, in sequence order
    blocks, start = [], 0
    for s in shares:  # per source rank: (its tokens, q heads | k heads | v heads, Dh)
        size_q, size_k = len(s) * len(qh), len(s) * len(kh)
        blocks.append([got[start : start + size_q].reshape(len(s), len(qh), Dh),
                       got[start + size_q : start + size_q + size_k].reshape(len(s), len(kh), Dh),
                       got[start + size_q + size_k : start + size_q + 2 * size_k].reshape(len(s), len(kh), Dh)])
        start += size_q + 2 * size_k
    qa, ka, va = (np.concatenate([b[i] for b in blocks])[order] for i in range(3))  # (L, heads, Dh)
    # my query heads use my KV heads in the same grouping as the whole head set
    out = be.attention(qa, ka, va, np.arange(len(qa)), window)  # (L, H/C, Dh)
    back = out[np.argsort(order)]  # to (source rank, its tokens) order
    rows = [back[a:b].reshape(-1, Dh) for a, b in zip(np.cumsum([0] + [len(s) for s in shares[:-1]]),
                                                       np.cumsum([len(s) for s in shares]))]
    mine_out = group.all_to_all(np.concatenate(rows), [len(s) * len(qh) for s in shares],
                                [n * len(h) for h, _ in mine])
    result = np.empty(q.shape, np.float32)
    start = 0
    for qh_j, _ in mine:  # from rank j: my tokens' outputs of its heads
        result[:, qh_j] = mine_out[start : start + n * len(qh_j)].reshape(n, len(qh_j), Dh)
        start += n * len(qh_j)
    return result


def _ulysses_heads(H, Hkv, size):
    """[(query heads, KV heads they use)] of each rank: H/C consecutive query heads each."""
    G = H // Hkv
    per = H // size
    heads = [np.arange(j * per, (j + 1) * per) for j in range(size)]
    return [(h, np.unique(h // G)) for h in heads]


def check_ulysses(H, Hkv, size):
    """None, or why H query heads over Hkv KV heads do not split for Ulysses over `size`
    ranks: each rank takes H/C whole heads, as whole groups sharing KV heads or inside one."""
    per, G = H // size, H // Hkv
    if H % size or (per % G and G % per):
        return f"{H} query heads over {Hkv} KV heads do not split into cp = {size} equal groups"
    return None


def split_kv_merge(out, lse, group):
    """Split-KV decode: out (T, H, Dh), lse (T, H) over my shard of the keys -> the
    attention over every shard of the CP group (all-gather, then merge), the same on every rank."""
    outs, lses = group.all_gather(out), group.all_gather(lse)
    return merge(outs, lses)[0]
