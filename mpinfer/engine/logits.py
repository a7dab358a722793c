"""Logits split over the vocabulary: with tensor parallelism each rank of a TP group holds
the columns [offset, offset + V/P) of the logits (R rows, one per sampled request). Greedy
tokens, log-probabilities and top-N need only a few numbers per row and per rank, so the
full (R, V) logits are gathered only for filtered sampling (temperature, top-k/p, min-p),
which needs the whole distribution.

Every method is collective over the TP group: all ranks of a group call the same methods in
the same order (their schedulers run in lockstep). With no group it is plain NumPy.
"""

import numpy as np

from . import sampling
from .sampling import top_ids


class VocabShards:
    def __init__(self, local, offset, group=None):
        self.local, self.offset = local, offset  # (R, V/P) float32
        self.group = group if group is not None and group.size > 1 else None

    def _gather(self, x):
        return self.group.all_gather(np.ascontiguousarray(x)) if self.group else x[None]  # (P, ...)

    def logsumexp(self):
        """(R,) float64: log sum exp over the whole vocabulary, from each rank's max and sum."""
        m = self.local.max(axis=-1, keepdims=True)
        e = self.local - m
        np.exp(e, out=e)
        parts = self._gather(np.stack([m[:, 0].astype(np.float64), e.sum(axis=-1).astype(np.float64)], axis=-1))
        big = parts[:, :, 0].max(axis=0)  # (R,)
        return big + np.log(np.sum(parts[:, :, 1] * np.exp(parts[:, :, 0] - big), axis=0))

    def argmax(self):
        """(R,) greedy token ids; ties go to the lowest id, as np.argmax over the full row."""
        i = self.local.argmax(axis=-1)
        v = self.local[np.arange(len(i)), i].astype(np.float64)
        parts = self._gather(np.stack([v, (i + self.offset).astype(np.float64)], axis=-1))  # (P, R, 2)
        best = parts[:, :, 0].argmax(axis=0)  # the first (lowest-id) shard holding the maximum
        return parts[best, np.arange(parts.shape[1]), 1].astype(np.int64)

    def values(self, tokens):
        """(R,) float64 logits of the given token ids."""
        local = tokens - self.offset
        inside = (local >= 0) & (local < self.local.shape[1])
        v = np.where(inside, self.local[np.arange(len(tokens)), np.where(inside, local, 0)], 0.0).astype(np.float64)
        return self._gather(v).sum(axis=0)  # (not an all-reduce: those count the model's traffic)

    def top(self, n):
        """(R, n) ids and float32 logits of the n largest per row, ties to the lower id."""
        ids, vals = [], []
        for row in self.local:
            t = top_ids(row, n)
            ids.append(t + self.offset)
            vals.append(row[t])
        gids = self._gather(np.array(ids, np.int64)).transpose(1, 0, 2).reshape(len(ids), -1)  # (R, P*n)
        gvals = self._gather(np.array(vals, np.float32)).transpose(1, 0, 2).reshape(len(ids), -1)
        order = np.lexsort((gids, -gvals), axis=-1)[:, :n]  # by value, then by id
        return np.take_along_axis(gids, order, -1), np.take_along_axis(gvals, order, -1)

    def rows(self, which):
        """(len(which), V) full logits of some rows (gathered from every rank)."""
        part = self._gather(self.local[which])  # (P, k, V/P)
        return np.concatenate(list(part), axis=-1)


def choose(logits, wants):
    """The next token of each row: wants[i] = (SamplingParams, request key, step). Returns
    JSON-able lists: tokens, their log-probabilities, and the top-N ids and log-probabilities
    each row asked for (empty lists for N = 0). Collective over the TP group."""
    lse = logits.logsumexp()  # (R,)
    tokens = logits.argmax()  # greedy
    sampled = [i for i, (params, _, _) in enumerate(wants) if params.temperature > 0]
    if sampled:  # filtered sampling needs the whole distribution of those rows
        for i, row in zip(sampled, logits.rows(sampled)):
            params, key, step = wants[i]
            tokens[i] = sampling.sample(row, params, key, step)
    chosen = logits.values(tokens) - lse
    n_top = max(params.logprobs for params, _, _ in wants)
    top_ids, top_lps = [[] for _ in wants], [[] for _ in wants]
    if n_top:
        ids, values = logits.top(n_top)
        lps = (values - lse[:, None]).astype(np.float32)
        for i, (params, _, _) in enumerate(wants):
            top_ids[i] = ids[i, : params.logprobs].tolist()
            top_lps[i] = lps[i, : params.logprobs].tolist()
    return {"tokens": tokens.tolist(), "logprobs": chosen.tolist(), "top_ids": top_ids, "top_logprobs": top_lps}
