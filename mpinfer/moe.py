"""The mixture-of-experts block (Mixtral, Qwen2-MoE, Qwen3-MoE) and expert parallelism (EP).

Legend: T tokens of the step on this rank, E experts, A experts per token, D hidden, I expert
size, S ranks of the EP group, P ranks of the TP group. A pair is one (token, expert) choice;
a step routes T*A of them.

Router, as transformers: softmax over the E logits in float32, the A largest (ties to the
lower expert id), renormalised to sum 1 where the architecture does (Mixtral always, Qwen's
norm_topk_prob). Pairs are sorted by expert, so each expert runs one matmul over all its
tokens (no per-token loop); outputs are weighted and summed per token in slot order.

Placement: expert e lives on EP rank e // (E/S), its home. Hot-expert replication gives
each of the k most loaded experts of a layer (in that order) one more copy, on the EP rank
with the least expected load, taking the share of the expert's pairs that evens the two
ranks out (none, and no copy, when the home is not the busier one). A source splits its
pairs of the expert by those shares, in token order (the first part to the home). Which
copy computes a pair does not change its value.

The two EP patterns of mapping.py:
- Inside a replica (S divides P): every rank of the TP group holds the same T tokens, so
  dispatch is local: a rank computes the pairs placed on its EP rank, on its 1/(P/S) slice
  of those experts' I, and the one TP all-reduce a dense MLP needs anyway sums slices and
  experts. No all-to-all and the dense layer's bytes.
- Across replicas (S = r*P ranks of r replicas): ranks hold different tokens. A rank routes
  its share (1/P) of its replica's tokens and sends each pair's row to the rank holding its
  expert: counts first (an S x E matrix, MPI_Alltoall), then the rows (MPI_Alltoallv); the
  expert outputs return the same way (combine) and are weighted and summed at the source.
  With P > 1 a TP all-reduce then assembles the replica's T rows, the shared expert's
  row-parallel sum folded in. With uniform routing (S-1)/S of the pairs leave their rank,
  twice per layer.

Capacity (optional, off by default): an expert takes at most C = ceil(factor * A * T_step / E)
pairs per step, T_step the tokens its EP group routes in the step; pairs beyond C, in order
of (source rank, token), skip the expert: their weight is dropped, not renormalised (Switch
Transformer), so the residual passes unchanged. Tokens then depend on what shares a step.
"""

import dataclasses
import math

import numpy as np

from .errors import UserError
from .layers import MLP, Linear


@dataclasses.dataclass(frozen=True)
class EP:
    """This rank's place for expert parallelism. size, rank: the EP group; group: its
    comm.Group when it spans replicas (rows move by all-to-all), else None; slices, slice:
    the parts each expert's I is cut into (moe_tp = P/S inside a replica) and mine."""

    size: int = 1
    rank: int = 0
    group: object = None
    slices: int = 1
    slice: int = 0
    capacity_factor: float = 0.0

    @classmethod
    def of(cls, topo, capacity_factor=0.0):
        m = topo.mapping
        across = m.tp % m.ep != 0
        return cls(m.ep, m.ep_rank, topo.ep if across else None, m.moe_tp, m.moe_tp_rank, capacity_factor)


def check_ep(cfg, ep, slices):
    """UserError naming the numbers when an EP layout does not fit the model."""
    if ep > 1 and not cfg.num_experts:
        raise UserError(f"parallel.ep = {ep}, but the model has no experts (a dense model takes ep = 1)")
    if cfg.num_experts % ep:
        raise UserError(f"parallel.ep = {ep} does not divide the model's {cfg.num_experts} experts")
    if cfg.num_experts and cfg.expert_size % slices:
        raise UserError(f"tp / ep = {slices} does not divide the model's expert size {cfg.expert_size}")


class Placement:
    """The EP ranks holding a copy of each expert of one layer, and the share of each
    expert's pairs each copy takes. load (E,): expected pairs per expert, to place copies of
    the `hot` most loaded experts."""

    def __init__(self, num_experts, size, load=None, hot=0):
        home = np.arange(num_experts) // (num_experts // size)
        self.holders, shares = [[int(h)] for h in home], [[1.0] for _ in home]
        if hot and size > 1:
            load = np.asarray(load, np.float64)
            expected = np.bincount(home, weights=load, minlength=size)  # pairs per rank
            for e in np.argsort(-load, kind="stable")[:hot]:
                # the copy goes to the least loaded rank and takes what evens the two out
                to = min((r for r in range(size) if r != home[e]), key=lambda r: (expected[r], r))
                moved = min((expected[home[e]] - expected[to]) / 2, load[e])
                if moved <= 0:  # a copy would not lower the busier rank's load
                    continue
                self.holders[e].append(to)
                shares[e] = [1 - moved / load[e], moved / load[e]]
                expected[home[e]] -= moved
                expected[to] += moved
        width = max(map(len, self.holders))
        self.copies = np.array([len(h) for h in self.holders])
        self.table = np.array([h + h[-1:] * (width - len(h)) for h in self.holders])  # (E, width) ranks
        # (E, width - 1) where each copy's part of [0, 1) ends; 2 pads past the end
        self.bounds = np.array([np.cumsum(s)[:-1].tolist() + [2.0] * (width - len(s)) for s in shares]).reshape(
            num_experts, width - 1)

    def held_by(self, rank):
        return [e for e, h in enumerate(self.holders) if rank in h]

    def dest(self, experts, counts):
        """The EP rank of each pair; experts (N,) sorted, counts (E,) pairs per expert. The
        j-th of an expert's n pairs goes to the copy whose share of [0, 1) holds (j + 1/2) / n."""
        first = np.concatenate([[0], np.cumsum(counts)[:-1]])
        at = (np.arange(len(experts)) - first[experts] + 0.5) / np.maximum(counts[experts], 1)
        copy = (at[:, None] >= self.bounds[experts]).sum(axis=1)
        return self.table[experts, copy]


class MoE:
    """Routed experts in place of the MLP; Qwen2-MoE adds a shared expert scaled by sigmoid(x . g).

    Counters over the job: load (E,) pairs routed by the tokens this rank routes, computed
    (E,) pairs its experts computed, dropped: pairs over capacity."""

    def __init__(self, cfg, be, ckpt, layer, tp, ep):
        self.be, self.tp, self.ep, self.top, self.norm = be, tp, ep, cfg.experts_per_token, cfg.norm_topk_prob
        E, D, I = cfg.num_experts, cfg.hidden_size, cfg.expert_size
        if cfg.arch == "mixtral":  # Mixtral's names: w1 gate, w3 up, w2 down
            p, gate, up, down = f"model.layers.{layer}.block_sparse_moe", "w1", "w3", "w2"
        else:
            p, gate, up, down = f"model.layers.{layer}.mlp", "gate_proj", "up_proj", "down_proj"
        self.router = be.weight(ckpt.get(f"{p}.gate.weight", (E, D)))  # (E, D), on every rank
        part = slice(ep.slice * I // ep.slices, (ep.slice + 1) * I // ep.slices)  # my slice of every expert

        # (gate_up, down) on my slice of I; down's partial sum completes in the TP all-reduce. Unfused:
        # gate_up returns (gate, up) and silu_mul follows (the dense MLP's is Linear(swiglu=True))
        def expert(e):
            return (Linear(be, ckpt, [(f"{p}.experts.{e}.{gate}", I, part), (f"{p}.experts.{e}.{up}", I, part)], D),
                    Linear(be, ckpt, [(f"{p}.experts.{e}.{down}", D, None)], I, cols=part))

        self._expert = expert
        self.placement = Placement(E, ep.size)
        self.experts = {e: expert(e) for e in self.placement.held_by(ep.rank)}
        self.shared = self.shared_gate = None
        if cfg.shared_expert_size:
            shared_cfg = dataclasses.replace(cfg, intermediate_size=cfg.shared_expert_size, mlp_bias=False)
            self.shared = MLP(shared_cfg, be, ckpt, layer, tp, f"{p}.shared_expert", reduce=False)
            self.shared_gate = be.weight(ckpt.get(f"{p}.shared_expert_gate.weight", (1, D)))
        self.load, self.computed, self.dropped = np.zeros(E, np.int64), np.zeros(E, np.int64), 0

    def replicate(self, load, hot):
        """Place copies of the `hot` most loaded experts (load (E,), the same on every rank of
        the EP group) and read the weights of the copies this rank now holds."""
        self.placement = Placement(len(self.router), self.ep.size, load, hot)
        for e in self.placement.held_by(self.ep.rank):
            if e not in self.experts:
                self.experts[e] = self._expert(e)

    def route(self, x):
        """x (T, D) -> experts (T, A) int64 and weights (T, A) float32."""
        return self.be.route(self.be.linear(x, self.router), self.top, self.norm)  # logits (T, E)

    def __call__(self, x):
        """x (T, D), the same on every rank of the TP group -> (T, D), summed over the TP group
        (under sequence parallelism, x and the result are this rank's rows)."""
        x = self.tp.begin(x)  # under sequence parallelism: all T rows
        T, D = x.shape
        E, A, across = len(self.router), self.top, self.ep.group is not None
        experts, weights = self.route(x)
        # my tokens: a share of the replica's when pairs move by all-to-all, else all of them
        a, b = (T * self.tp.rank // self.tp.size, T * (self.tp.rank + 1) // self.tp.size) if across else (0, T)
        pairs = experts[a:b].ravel()  # (t*A,) expert of each (token, slot) of my tokens
        order = np.argsort(pairs, kind="stable")  # pairs grouped by expert, in token order
        counts = np.bincount(pairs, minlength=E)
        self.load += counts
        keep = self._capacity(counts, T)
        if keep is not None:  # the first keep[e] pairs of each expert stay
            first = np.concatenate([[0], np.cumsum(counts)[:-1]])
            kept = np.arange(len(order)) - first[pairs[order]] < keep[pairs[order]]
            self.dropped += int(len(order) - kept.sum())
            order, counts = order[kept], keep
        dest = self.placement.dest(pairs[order], counts)  # (N,) EP rank of each pair
        if across:
            by_rank = np.argsort(dest, kind="stable")
            sent = order[by_rank]  # by (rank, expert, token)
            y = self._exchange(x[a + sent // A], dest[by_rank], pairs[sent])
        else:
            sent = order[dest == self.ep.rank]
            y = self._compute(x[sent // A], pairs[sent])
        y *= self.be.asarray(weights[a:b].ravel()[sent][:, None])
        per_pair = self.be.zeros(((b - a) * A, D))
        per_pair[sent] = y
        out = self.be.zeros((T, D))
        out[a:b] = per_pair.reshape(b - a, A, D).sum(axis=1)  # this rank's part of the sum
        if self.shared is not None:  # the gate is the same on every rank: gate * sum = sum of gate * part
            gate = 1.0 / (1.0 + np.exp(-self.be.linear(x, self.shared_gate)))  # (T, 1)
            out += gate * self.shared(x)
        return self.tp.finish(out)  # one all-reduce per MoE layer (reduce-scatter under sp)

    def _capacity(self, counts, T):
        """(E,) pairs of each expert this rank keeps this step, or None without a capacity."""
        factor = self.ep.capacity_factor
        if not factor:
            return None
        if self.ep.group is None:  # every rank routes the same tokens
            before, tokens = 0, T
        else:
            every = self.ep.group.all_gather(counts)  # (S, E)
            before, tokens = every[: self.ep.group.rank].sum(axis=0), every.sum() // self.top
        capacity = math.ceil(factor * self.top * tokens / len(self.router))
        return np.clip(capacity - before, 0, counts)

    def _exchange(self, rows, dest, experts):
        """Dispatch rows (N, D) to the EP ranks dest (N,) (sorted) holding their experts (N,),
        compute there, combine: returns the expert outputs (N, D) in the same order."""
        group, E = self.ep.group, len(self.router)
        sending = np.zeros((group.size, E), np.int64)
        np.add.at(sending, (dest, experts), 1)
        getting = group.exchange_counts(sending)  # (S, E): pairs per expert from each rank
        got = group.all_to_all(rows, sending.sum(axis=1), getting.sum(axis=1))
        y = self._compute(got, np.repeat(np.tile(np.arange(E), group.size), getting.ravel()))
        return group.all_to_all(y, getting.sum(axis=1), sending.sum(axis=1))

    def _compute(self, rows, experts):
        """rows (n, D), experts (n,) held here -> (n, D): each expert's SwiGLU on its rows,
        one matmul per expert (a partial sum over my slice of I)."""
        counts = np.bincount(experts, minlength=len(self.router))
        self.computed += counts
        order = np.argsort(experts, kind="stable")
        y = self.be.zeros(rows.shape)  # float32 (rows may come in the matmuls' input format)
        start = 0
        for e in np.flatnonzero(counts):
            gate_up, down = self.experts[e]
            idx = order[start : start + counts[e]]
            y[idx] = down(self.be.silu_mul(*gate_up(rows[idx])))
            start += counts[e]
        return y
